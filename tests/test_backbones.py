"""Pretrained backbones from local weight files: torchvision image classifiers and torchaudio speech
encoders by architecture name."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from mmpipe import params
from mmpipe.errors import PipelineError
from mmpipe.models.backbones import leading_blocks
from mmpipe.names import WEIGHTS_FILE
from mmpipe.training.model_io import load_model
from mmpipe.training.train import train

SMALL = {"dim": 16, "hidden": 16, "encoders": {"text": {"embed_dim": 8, "width": 16}, "audio": {"width": 8},
                                               "tabular": {"width": 16}}}


def random_weights(arch: str, path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision model's state dict, saved as a user would save real weights."""
    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def train_with(features, tmp_path, modalities: list[str], encoder: dict):
    """One epoch of a small fusion model of ``modalities`` on ``features``, the first one's encoder params ``encoder``."""
    model_params = params.validate("model", {**SMALL, "encoders": {**SMALL["encoders"], modalities[0]: encoder}})
    out = tmp_path / "fusion"
    result = train(params.TrainParams(epochs=1, batch_size=64, device="cpu", lr=0.01), model_params, features,
                   modalities, out, None)
    return result, out


def train_with_image(tiny_corpus, tmp_path, image: dict):
    return train_with(tiny_corpus / "features", tmp_path, ["image", "text"], image)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_frozen_blocks_keep_the_file_weights_and_the_rest_trains(tiny_corpus, tmp_path, suffix):
    state = random_weights("resnet18", tmp_path / f"resnet18{suffix}")
    result, out = train_with_image(tiny_corpus, tmp_path, {"arch": "resnet18", "weights": str(tmp_path / f"resnet18{suffix}"),
                                                         "freeze": 3})
    info = result["metrics"]["pretrained"]["image"]
    assert info["arch"] == "resnet18" and info["frozen_blocks"] == 3 and len(info["sha256"]) == 64
    assert info["warnings"] == ["resnet18's weights were trained on 224 px images, these are 32 px: "
                                "set preprocess.image.size: 224 to use what they learned"]  # the corpus's digits

    model = load_model(out)
    encoder = model.encoders["image"]
    assert encoder.frozen_blocks == ["conv1", "bn1", "layer1.0"]
    blocks = dict(leading_blocks(encoder.backbone))
    for name, block in blocks.items():
        frozen = name in encoder.frozen_blocks
        assert all(p.requires_grad != frozen for p in block.parameters()), name

    trained = load_file(str(out / WEIGHTS_FILE))
    prefix = "encoders.image.backbone."
    for key, value in state.items():
        if key.startswith("fc."):
            assert prefix + key not in trained  # the classification head is dropped
            continue
        frozen = key.split(".")[0] in ("conv1", "bn1") or key.startswith("layer1.0.")
        same = torch.equal(trained[prefix + key], value)
        if frozen:  # weights and BatchNorm statistics exactly the file's
            assert same, key
        elif key.endswith("weight") and "bn" not in key and "downsample.1" not in key:
            assert not same, f"{key} did not train"


def test_freeze_all_trains_only_the_projection_and_fusion(tiny_corpus, tmp_path):
    random_weights("resnet18", tmp_path / "r.pth")
    result, out = train_with_image(tiny_corpus, tmp_path, {"arch": "resnet18", "weights": str(tmp_path / "r.pth"),
                                                         "freeze": "all"})
    encoder = load_model(out).encoders["image"]
    assert not any(p.requires_grad for p in encoder.backbone.parameters())
    assert all(p.requires_grad for p in encoder.out.parameters())
    assert result["metrics"]["pretrained"]["image"]["trainable_parameters"] == sum(p.numel() for p in encoder.out.parameters())


def test_no_weights_file_is_random_initialisation_said_so(tiny_corpus, tmp_path):
    result, _ = train_with_image(tiny_corpus, tmp_path, {"arch": "mobilenet_v3_small"})
    info = result["metrics"]["pretrained"]["image"]
    assert info["weights"] is None and "random initialisation" in info["note"]


@pytest.mark.parametrize("image, expected", [
    ({"arch": "resnet18", "weights": "nowhere/resnet18.pth"},
     "model.encoders.image.weights: nowhere/resnet18.pth not found — get it on a connected machine with python -c"),
    ({"arch": "resnet181"}, "model.encoders.image.arch: 'resnet181' is not a torchvision classification model"),
    ({"arch": "vit_b_16"}, "model.encoders.image.arch vit_b_16 needs images of at least 224 px: set preprocess.image.size"),
])
def test_bad_backbone_choices_stop_with_one_line(tiny_corpus, tmp_path, image, expected):
    with pytest.raises(PipelineError) as err:
        train_with_image(tiny_corpus, tmp_path, image)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


@pytest.mark.parametrize("content, expected", [
    (b"not a torch file at all", "is not a state dict that torch can read safely"),
    ("other_arch", "does not fit resnet18"),
    ("resnet34", "does not fit resnet18"),
    ("pickled_module", "is not a state dict that torch can read safely"),
])
def test_unusable_weight_files_stop_with_one_line(tiny_corpus, tmp_path, content, expected):
    path = tmp_path / "w.pth"
    if content == "other_arch":
        random_weights("mobilenet_v3_small", path)
    elif content == "resnet34":  # same names for the first blocks, other shapes and extra blocks
        random_weights("resnet34", path)
    elif content == "pickled_module":  # a whole pickled model: refused by weights_only loading, never unpickled
        torch.save(torchvision.models.get_model("resnet18", weights=None), path)
    else:
        path.write_bytes(content)
    with pytest.raises(PipelineError) as err:
        train_with_image(tiny_corpus, tmp_path, {"arch": "resnet18", "weights": str(path)})
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("image, expected", [
    ({"weights": "w.pth"}, "weights, freeze and checkpointing apply to a pretrained arch"),
    ({"arch": "resnet18", "freeze": -1}, "freeze"),
    ({"arch": "resnet18", "freeze": "some"}, "freeze"),
    ({"arch": "resnet18", "lr_scale": 0}, "lr_scale"),
])
def test_backbone_params_are_validated(image, expected):
    with pytest.raises(Exception) as err:
        params.validate("model", {"encoders": {"image": image}})
    assert expected in str(err.value)


def test_lr_scale_gives_the_backbone_its_own_parameter_group(tiny_corpus, tmp_path):
    from mmpipe.training.train import param_groups

    random_weights("resnet18", tmp_path / "r.pth")
    result, out = train_with_image(tiny_corpus, tmp_path, {"arch": "resnet18", "lr_scale": 0.25})
    model = load_model(out)
    groups = param_groups(model, lr=0.01)
    backbone = {id(p) for p in model.encoders["image"].backbone.parameters()}
    assert [g["lr"] for g in groups] == [0.01, 0.0025]
    assert {id(p) for p in groups[1]["params"]} == backbone
    assert not backbone & {id(p) for p in groups[0]["params"]}


@pytest.mark.parametrize("arch, count, first, last", [
    ("resnet18", 10, ["conv1", "bn1", "layer1.0"], "layer4.1"),
    ("efficientnet_b0", 18, ["features.0", "features.1.0", "features.2.0"], "features.8"),
    ("vit_b_16", 16, ["class_token", "conv_proj", "encoder.pos_embedding"], "encoder.ln"),
])
def test_blocks_are_the_backbones_parameterised_children_in_order(arch, count, first, last):
    from mmpipe.models.backbones import _drop_head

    net = torchvision.models.get_model(arch, weights=None)
    _drop_head(net)
    names = [name for name, _ in leading_blocks(net)]
    assert len(names) == count and names[:3] == first and names[-1] == last
    assert sum(p.numel() for p in net.parameters()) == sum(  # every parameter in exactly one block
        b.numel() if isinstance(b, torch.nn.Parameter) else sum(p.numel() for p in b.parameters())
        for _, b in leading_blocks(net))


# --------------------------------------------------------------------------- speech encoders (torchaudio)

# A wav2vec 2.0 of the real architecture, small enough for a test: five convolutions, two transformer layers.
TINY_WAV2VEC2 = {"extractor_mode": "group_norm", "extractor_conv_layer_config": [[16, 10, 5], [16, 3, 2], [16, 3, 2],
                                                                                  [16, 3, 2], [16, 2, 2]],
                 "extractor_conv_bias": False, "encoder_embed_dim": 32, "encoder_projection_dropout": 0.0,
                 "encoder_pos_conv_kernel": 16, "encoder_pos_conv_groups": 4, "encoder_num_layers": 2,
                 "encoder_num_heads": 2, "encoder_attention_dropout": 0.0, "encoder_ff_interm_features": 64,
                 "encoder_ff_interm_dropout": 0.0, "encoder_dropout": 0.0, "encoder_layer_norm_first": False,
                 "encoder_layer_drop": 0.0}


def tiny_wav2vec2(path, seed: int = 2) -> dict[str, torch.Tensor]:
    """A randomly initialised torchaudio wav2vec 2.0 (TINY_WAV2VEC2), saved as torchaudio's pretrained
    bundles' ``get_model().state_dict()`` would be."""
    import torchaudio

    torch.manual_seed(seed)
    state = torchaudio.models.wav2vec2_model(**TINY_WAV2VEC2, aux_num_out=None).state_dict()
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def waveform_features(tiny_corpus, tmp_path_factory):
    """tiny_corpus's features with audio as waveforms (preprocess.audio.features: waveform)."""
    from mmpipe.features.preprocess import preprocess

    root = tmp_path_factory.mktemp("waveform") / "features"
    for m in ("image", "text", "tabular"):
        (root / m).parent.mkdir(parents=True, exist_ok=True)
        (root / m).symlink_to(tiny_corpus / "features" / m)
    (root / "audio").mkdir()
    preprocess("audio", params.validate("preprocess", {"workers": 1, "audio": {"features": "waveform"}}),
               tiny_corpus / "clean", root / "audio")
    return root


def train_with_audio(features, tmp_path, audio: dict):
    return train_with(features, tmp_path, ["audio", "text"], audio)


def test_waveform_features_are_the_clean_clip_and_the_predictor_makes_the_same(tiny_corpus, waveform_features):
    import json

    import pyarrow.parquet as pq

    from mmpipe.modalities import audio, inputs

    state = json.loads((waveform_features / "audio" / "state.json").read_text())
    assert state["features"] == "waveform" and "mel_filters" not in state
    features = audio.Features.from_state(waveform_features / "audio", state)
    assert features.arrays == {"audio": ((24000,), np.float16)} and features.stats is None
    table = pq.read_table(next((tiny_corpus / "clean" / "samples").glob("part-*.parquet")), columns=["audio"])
    raw = next(v for v in table.column("audio").to_pylist() if v is not None)
    errors: dict[int, str] = {}
    from_pipeline = features.transform([raw, None], ["a", "b"], errors=errors)["audio"]
    assert not errors and from_pipeline.dtype == np.float16 and not from_pipeline[1].any()
    clip, _ = audio.pcm16_wav(raw)
    np.testing.assert_array_equal(from_pipeline[0][:len(clip)], clip[:24000].astype(np.float16))
    rules = json.loads((tiny_corpus / "clean" / "dataset.json").read_text())["clean_rules"]["audio"]
    predictor = inputs.AudioInput(["audio"], state, rules, waveform_features / "audio")
    np.testing.assert_array_equal(predictor.features(raw)["audio"], from_pipeline[0])  # the same file: exactly
    recording = predictor.features(audio.as_recording(raw, 44100))["audio"].astype(np.float32)  # 44.1 kHz stereo
    reference = from_pipeline[0].astype(np.float32)
    # the stereo file's right channel is at half gain, so its mono mix is at 0.75; resampled there and
    # back, it is the same signal, not bit for bit
    error_db = 10 * np.log10(np.mean((recording - 0.75 * reference) ** 2) / np.mean((0.75 * reference) ** 2))
    assert error_db < -30, error_db


def test_speech_encoder_frozen_blocks_keep_the_file_weights_and_the_rest_trains(waveform_features, tmp_path):
    state = tiny_wav2vec2(tmp_path / "w2v.pth")
    result, out = train_with_audio(waveform_features, tmp_path, {"arch": "wav2vec2_model", "options": TINY_WAV2VEC2,
                                                                 "weights": str(tmp_path / "w2v.pth"), "freeze": 5})
    info = result["metrics"]["pretrained"]["audio"]
    assert info["arch"] == "wav2vec2_model" and (info["frozen_blocks"], info["blocks"]) == (5, 10)
    encoder = load_model(out).encoders["audio"]
    assert encoder.frozen_blocks == [f"feature_extractor.conv_layers.{i}" for i in range(5)]  # the CNN front end
    trained = load_file(str(out / WEIGHTS_FILE))
    prefix = "encoders.audio.backbone."
    for key, value in state.items():
        same = torch.equal(trained[prefix + key], value)
        if key.startswith("feature_extractor."):
            assert same and not encoder.backbone.get_parameter(key).requires_grad, key
        elif key.endswith("linear.weight") or key.endswith("proj.weight"):
            assert not same, f"{key} did not train"


def test_speech_encoder_reads_a_checkpoint_with_its_ctc_head_and_wrapped(waveform_features, tmp_path):
    """A fine-tuned ASR checkpoint (``aux`` CTC head) saved from DDP under "state_dict": the head is dropped."""
    import torchaudio

    torch.manual_seed(4)
    asr = torchaudio.models.wav2vec2_model(**TINY_WAV2VEC2, aux_num_out=29).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in asr.items()}, "epoch": 3}, tmp_path / "asr.pt")
    _, out = train_with_audio(waveform_features, tmp_path, {"arch": "wav2vec2_model", "options": TINY_WAV2VEC2,
                                                            "weights": str(tmp_path / "asr.pt"), "freeze": "all"})
    trained = load_file(str(out / WEIGHTS_FILE))
    assert torch.equal(trained["encoders.audio.backbone.encoder.transformer.layers.1.feed_forward.output_dense.weight"],
                       asr["encoder.transformer.layers.1.feed_forward.output_dense.weight"])
    assert not any(k.startswith("encoders.audio.backbone.aux") for k in trained)


@pytest.mark.parametrize("audio, features, expected", [
    ({"arch": "wav2vec2_model", "options": TINY_WAV2VEC2}, "logmel",
     "model.encoders.audio.arch wav2vec2_model reads waveforms: set preprocess.audio.features: waveform (now logmel)"),
    ({}, "waveform", "model.encoders.audio.arch small_cnn reads log-mel spectrograms: set preprocess.audio.features: logmel"),
    ({"arch": "wav2vec3_base"}, "waveform", "model.encoders.audio.arch: 'wav2vec3_base' is not a torchaudio speech encoder"),
    ({"arch": "wav2vec2_model", "options": {"encoder_embed_dim": 32}}, "waveform",
     "model.encoders.audio.options do not fit torchaudio.models.wav2vec2_model:"),
    ({"arch": "hubert_base", "weights": "nowhere/hubert_base.pth"}, "waveform",
     "model.encoders.audio.weights: nowhere/hubert_base.pth not found — get it on a connected machine with python -c "
     "\"import torch, torchaudio; torch.save(torchaudio.pipelines.HUBERT_BASE.get_model().state_dict(), 'hubert_base.pth')\""),
])
def test_bad_speech_encoder_choices_stop_with_one_line(tiny_corpus, waveform_features, tmp_path, audio, features, expected):
    root = waveform_features if features == "waveform" else tiny_corpus / "features"
    with pytest.raises(PipelineError) as err:
        train_with_audio(root, tmp_path, audio)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_speech_encoder_at_another_rate_or_too_short_a_clip_stops_with_one_line():
    from mmpipe.models.backbones import TorchaudioEncoder

    with pytest.raises(PipelineError, match=r"wav2vec2_model takes 16000 Hz waveforms: set clean.audio.sample_rate: "
                                            r"16000 \(now 8000\)"):
        TorchaudioEncoder("audio", "wav2vec2_model", 8000, 12000, 16, None, "none", 0.1, options=TINY_WAV2VEC2)
    with pytest.raises(PipelineError, match=r"does not take clips of 100 samples \(preprocess.audio.seconds\)"):
        TorchaudioEncoder("audio", "wav2vec2_model", 16000, 100, 16, None, "none", 0.1, options=TINY_WAV2VEC2)


def test_speech_encoder_blocks_and_normalisation_follow_torchaudio():
    from mmpipe.models.backbones import TorchaudioEncoder

    base = TorchaudioEncoder("audio", "wav2vec2_base", 16000, 16000, 16, None, 2, 0.1)
    names = [name for name, _ in leading_blocks(base.backbone)]
    assert names == [*(f"feature_extractor.conv_layers.{i}" for i in range(7)), "encoder.feature_projection",
                     "encoder.transformer.pos_conv_embed", "encoder.transformer.layer_norm",
                     *(f"encoder.transformer.layers.{i}" for i in range(12))]
    assert sum(p.numel() for p in base.backbone.parameters()) == sum(
        sum(p.numel() for p in b.parameters()) for _, b in leading_blocks(base.backbone))
    assert not base.normalize  # torchaudio's WAV2VEC2_BASE bundle feeds raw waveforms (LV-60k's standardises)
    normalized = TorchaudioEncoder("audio", "wav2vec2_model", 16000, 4000, 16, None, "none", 0.1, normalize=True,
                                   options=TINY_WAV2VEC2).eval()
    clip = torch.randn(2, 4000)
    with torch.no_grad():  # a standardised clip: its gain and offset do not matter
        torch.testing.assert_close(normalized(clip), normalized(3 * clip + 0.1), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- text transformers (Hugging Face)


def corpus_texts(clean_dir) -> list[str]:
    import pandas as pd

    return [t for t in pd.read_parquet(clean_dir / "samples", columns=["text"])["text"] if isinstance(t, str)]


def tiny_bert(folder, texts: list[str], seed: int = 5) -> dict[str, torch.Tensor]:
    """A tiny BERT saved as users have Hugging Face models (save_pretrained: config.json,
    model.safetensors, tokenizer.json), with a WordPiece tokenizer trained by ``tokenizers`` on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(folder)
    return model.state_dict()


@pytest.fixture(scope="module")
def bert(tiny_corpus, tmp_path_factory):
    """A tiny BERT folder and tiny_corpus's features with text tokenized by its tokenizer."""
    from mmpipe.features.preprocess import preprocess

    base = tmp_path_factory.mktemp("bert")
    state = tiny_bert(base / "tiny-bert", corpus_texts(tiny_corpus / "clean"))
    root = base / "features"
    for m in ("image", "audio", "tabular"):
        (root / m).parent.mkdir(parents=True, exist_ok=True)
        (root / m).symlink_to(tiny_corpus / "features" / m)
    (root / "text").mkdir()
    preprocess("text", params.validate("preprocess", {"workers": 1, "text": {"tokenizer": str(base / "tiny-bert"),
                                                                            "max_length": 24}}),
               tiny_corpus / "clean", root / "text")
    return SimpleNamespace(folder=base / "tiny-bert", state=state, features=root)


def train_with_text(features, tmp_path, text: dict):
    return train_with(features, tmp_path, ["text", "tabular"], text)


def test_a_pretrained_tokenizer_tokenizes_in_preprocess_and_in_the_bundle_alike(tiny_corpus, bert):
    import json

    from tokenizers import Tokenizer as HFTokenizer

    from mmpipe.modalities import inputs, text

    state = json.loads((bert.features / "text" / "state.json").read_text())
    assert state["kind"] == "pretrained" and state["model_config"]["model_type"] == "bert"
    hf = HFTokenizer.from_file(str(bert.folder / "tokenizer.json"))
    features = text.Features.from_state(bert.features / "text", state)
    sample = corpus_texts(tiny_corpus / "clean")[:5]
    ids, lengths = features.tokenizer.encode([*sample, None])
    for row, length, t in zip(ids, lengths, sample):
        assert list(row[:length]) == hf.encode(t).ids  # [CLS] ... [SEP] (the corpus's texts fit in 24 tokens)
        assert row[0] == hf.token_to_id("[CLS]") and not row[length:].any()  # [PAD] is 0
    assert lengths[-1] == 0 and not ids[-1].any()
    rules = json.loads((tiny_corpus / "clean" / "dataset.json").read_text())["clean_rules"]["text"]
    predictor = inputs.TextInput(["text", "text_length"], state, rules, bert.features / "text")
    one = predictor.features(sample[0])
    assert list(one["text"]) == list(ids[0]) and one["text_length"] == lengths[0]
    assert text.extra_requirements(state) == ["tokenizers"]


def test_transformer_frozen_blocks_keep_the_folder_weights_and_the_rest_trains(bert, tmp_path):
    result, out = train_with_text(bert.features, tmp_path, {"arch": "huggingface", "weights": str(bert.folder),
                                                            "freeze": 2})
    info = result["metrics"]["pretrained"]["text"]
    assert info["arch"] == "bert" and (info["frozen_blocks"], info["blocks"]) == (2, 3) and len(info["sha256"]) == 64
    encoder = load_model(out).encoders["text"]
    assert encoder.frozen_blocks == ["embeddings", "encoder.layer.0"]
    trained = load_file(str(out / WEIGHTS_FILE))
    prefix = "encoders.text.backbone."
    assert not any(k.startswith(prefix + "pooler") for k in trained)  # mean pooling: the [CLS] pooler is dropped
    for key, value in bert.state.items():
        if key.startswith("pooler."):
            continue
        same = torch.equal(trained[prefix + key], value)
        if key.startswith(("embeddings.", "encoder.layer.0.")):
            assert same, key
        elif key.endswith("dense.weight"):
            assert not same, f"{key} did not train"


@pytest.mark.parametrize("text, tokenizer, expected", [
    ({"arch": "huggingface"}, "char",
     "model.encoders.text.arch huggingface needs preprocess.text.tokenizer to name the model's folder"),
    ({"arch": "huggingface", "weights": "nowhere/bert"}, "bert",
     "model.encoders.text.weights: nowhere/bert not found — get it on a connected machine with python -c"),
    ({"arch": "huggingface", "weights": "EMPTY"}, "bert", "is not a transformers model folder"),
    ({"arch": "bert"}, "bert", "model.encoders.text.arch: 'bert' is not small_cnn or huggingface"),
])
def test_bad_text_encoder_choices_stop_with_one_line(tiny_corpus, bert, tmp_path, text, tokenizer, expected):
    if text.get("weights") == "EMPTY":
        (tmp_path / "empty").mkdir()
        text = {**text, "weights": str(tmp_path / "empty")}
    root = bert.features if tokenizer == "bert" else tiny_corpus / "features"
    with pytest.raises(PipelineError) as err:
        train_with_text(root, tmp_path, text)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_missing_tokenizer_folder_stops_preprocess_with_one_line(tiny_corpus, tmp_path):
    from mmpipe.features.preprocess import preprocess

    with pytest.raises(PipelineError) as err:
        preprocess("text", params.validate("preprocess", {"workers": 1, "text": {"tokenizer": "weights/text/no-such-model"}}),
                   tiny_corpus / "clean", tmp_path)
    assert str(err.value).startswith("preprocess.text.tokenizer: weights/text/no-such-model/tokenizer.json not found — "
                                     "it is char, word or a Hugging Face model folder") and "\n" not in str(err.value)
    # a model folder elsewhere under weights/: preprocess@text would not re-run when it changed
    with pytest.raises(PipelineError) as err:
        params.validate("preprocess", {"text": {"tokenizer": "weights/bert-base-uncased"}})
    assert str(err.value) == ("params.yaml: preprocess.text.tokenizer: weights/bert-base-uncased is under weights/ but not "
                              "in weights/text/ — move it there (e.g. weights/text/bert-base-uncased): DVC re-runs a "
                              "modality's stages when its own weights folder changes")


def test_a_backbone_the_dynamo_exporter_cannot_convert_exports_with_the_torchscript_one(tmp_path):
    """torchaudio's WavLM attention fails torch.export's decomposition; the graph still exports and matches."""
    import onnxruntime as ort

    from mmpipe.compress.onnx_model import export_onnx, input_dtypes
    from mmpipe.training.model_io import build_model, model_config

    wavlm = {**TINY_WAV2VEC2, "encoder_num_buckets": 32, "encoder_max_distance": 128}
    state = {"array_order": ["audio"], "arrays": {"audio": {"dtype": "float16", "shape": [8000]}},
             "features": "waveform", "sample_rate": 16000, "n_samples": 8000}
    model_params = params.validate("model", {**SMALL, "encoders": {"audio": {"arch": "wavlm_model", "options": wavlm}}})
    model = build_model(model_config(["audio"], {"audio": state}, model_params.model_dump(), list("abc"))).eval()
    feeds = {"audio": np.random.default_rng(0).standard_normal((3, 8000)).astype(np.float32),
             "available": np.ones((3, 1), bool)}
    assert list(input_dtypes(model)) == list(feeds)
    export_onnx(model, {k: v[:2] for k, v in feeds.items()}, tmp_path / "m.onnx")
    onnx_logits = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["logits"], feeds)[0]  # batch 3: dynamic axis
    with torch.no_grad():
        torch_logits = model({k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)


# --------------------------------------------------------------------------- embedding cache (preprocess.<m>.embed)

def embedded_features(raw_root, clean_dir, root, modality: str, preprocess_cfg: dict, encoder: dict):
    """``raw_root``'s features with ``modality`` preprocessed again with ``embed: true`` under ``encoder``."""
    from mmpipe.features.preprocess import preprocess

    for m in ("image", "text", "audio", "tabular"):
        if m != modality:
            (root / m).parent.mkdir(parents=True, exist_ok=True)
            (root / m).symlink_to((raw_root / m).resolve())
    (root / modality).mkdir(parents=True)
    model_params = params.validate("model", {**SMALL, "encoders": {**SMALL["encoders"], modality: encoder}})
    metrics = preprocess(modality, params.validate("preprocess", {"workers": 1, "embed_batch": 16,
                                                                  modality: {**preprocess_cfg, "embed": True}}),
                         clean_dir, root / modality, model_params)
    return metrics, model_params


def cache_case(family, tiny_corpus, waveform_features, bert, folder):
    """(modality, features without a cache, preprocess params, frozen encoder params, partner modality) of one family."""
    if family == "image":
        random_weights("resnet18", folder / "r.pth")
        return "image", tiny_corpus / "features", {}, {"arch": "resnet18", "weights": str(folder / "r.pth"),
                                                        "freeze": "all"}, "text"
    if family == "audio":
        tiny_wav2vec2(folder / "w2v.pth")
        return "audio", waveform_features, {"features": "waveform"}, {
            "arch": "wav2vec2_model", "options": TINY_WAV2VEC2, "weights": str(folder / "w2v.pth"), "freeze": "all"}, "text"
    return "text", bert.features, {"tokenizer": str(bert.folder), "max_length": 24}, {
        "arch": "huggingface", "weights": str(bert.folder), "freeze": "all"}, "tabular"


@pytest.mark.parametrize("family", ["image", "audio", "text"])
def test_cached_embeddings_train_the_same_model_as_raw_features(tiny_corpus, waveform_features, bert, tmp_path, family):
    """The cache holds the frozen backbone's output; training from it reaches raw training's validation
    accuracy, and the model trained on it scores the same on raw features (what it is shipped with)."""
    import json

    from mmpipe.features.loader import FeatureSet
    from mmpipe.names import embedding_key
    from mmpipe.models.backbones import files_sha256
    from mmpipe.training.train import accuracy

    modality, raw_root, pre, encoder, partner = cache_case(family, tiny_corpus, waveform_features, bert, tmp_path)
    metrics, model_params = embedded_features(raw_root, tiny_corpus / "clean", tmp_path / "features", modality, pre,
                                              encoder)
    state = json.loads((tmp_path / "features" / modality / "state.json").read_text())
    assert state["embedding"]["sha256"] == files_sha256(Path(encoder["weights"]))
    assert metrics["embedding"]["samples"] == metrics["available"] > 0

    # the cached vectors are the backbone's output on the raw arrays (float16), zero where unavailable
    data = FeatureSet(tmp_path / "features", split=None, modalities=(modality,), embeddings=True)
    batch = data.get(np.arange(len(data)), raw=True)
    model = load_model_like(model_params, data, modality)
    with torch.no_grad():
        fresh = model.encoders[modality].embed(*(batch[n] for n in model.arrays[modality])).numpy()
    cached, present = batch[embedding_key(modality)].numpy(), data.available[:, 0]
    assert cached.dtype == np.float16 and cached.shape == (len(data), state["embedding"]["shape"][0])
    np.testing.assert_allclose(cached[present], fresh[present].astype(np.float16), rtol=2e-3, atol=2e-3)
    assert not cached[~present].any()
    assert sorted(data.get(np.arange(4))) == sorted([embedding_key(modality), "available." + modality, "label", "index"])

    # the same model trained from the cache and from raw features (augmentation off: the raw path then draws
    # nothing more), then the cache-trained model scored on the raw arrays through its backbone
    no_augment = {**SMALL, "augment": False, "encoders": {**SMALL["encoders"], modality: encoder}}
    runs = {}
    for name, root in (("cached", tmp_path / "features"), ("raw", raw_root)):
        runs[name] = train(params.TrainParams(epochs=2, batch_size=32, device="cpu", lr=0.01),
                           params.validate("model", no_augment), root, [modality, partner], tmp_path / name, None)
    assert runs["cached"]["metrics"]["pretrained"][modality]["cached_embeddings"] is True
    assert "cached_embeddings" not in runs["raw"]["metrics"]["pretrained"][modality]
    val = FeatureSet(raw_root, split="val")
    one_sample = 1 / len(val) + 1e-9
    assert abs(runs["cached"]["metrics"]["val_accuracy"] - runs["raw"]["metrics"]["val_accuracy"]) <= one_sample
    trained = load_model(tmp_path / "cached")
    on_raw = accuracy(trained, val, [modality, partner], torch.device("cpu"))
    assert abs(on_raw - runs["cached"]["metrics"]["val_accuracy"]) <= one_sample


def load_model_like(model_params, data, modality):
    """A fresh model of ``modality`` with its backbone's weights loaded (what preprocess embedded with)."""
    from mmpipe.models.fusion import load_pretrained
    from mmpipe.training.model_io import build_model, model_config

    model = build_model(model_config([modality], data.state, model_params.model_dump(), data.label_names))
    load_pretrained(model)
    return model.eval()


@pytest.mark.parametrize("encoder, expected", [
    ({}, "preprocess.image.embed caches a pretrained backbone's output: set model.encoders.image.arch (now small_cnn)"),
    ({"arch": "resnet18", "weights": "R", "freeze": 9},
     "preprocess.image.embed needs model.encoders.image.freeze: all (now 9): a backbone that trains changes"),
    ({"arch": "resnet18", "freeze": "all"}, "preprocess.image.embed needs model.encoders.image.weights (a local weights"),
    ({"arch": "resnet18", "weights": "nowhere.pth", "freeze": "all"}, "model.encoders.image.weights: nowhere.pth not found"),
])
def test_a_backbone_that_cannot_be_cached_stops_preprocess_with_one_line(tiny_corpus, tmp_path, encoder, expected):
    if encoder.get("weights") == "R":
        random_weights("resnet18", tmp_path / "r.pth")
        encoder = {**encoder, "weights": str(tmp_path / "r.pth")}
    with pytest.raises(PipelineError) as err:
        embedded_features(tiny_corpus / "features", tiny_corpus / "clean", tmp_path / "f", "image", {}, encoder)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_a_stale_cache_stops_train_with_one_line(tiny_corpus, tmp_path):
    """Embeddings of one weights file, a model of another (a manual run outside dvc repro): refused."""
    random_weights("resnet18", tmp_path / "a.pth", seed=1)
    encoder = {"arch": "resnet18", "weights": str(tmp_path / "a.pth"), "freeze": "all"}
    embedded_features(tiny_corpus / "features", tiny_corpus / "clean", tmp_path / "f", "image", {}, encoder)
    random_weights("resnet18", tmp_path / "a.pth", seed=2)
    with pytest.raises(PipelineError) as err:  # the weights file changed: told from its sha256, before any forward pass
        train_with(tmp_path / "f", tmp_path, ["image", "text"], encoder)
    assert "the cached embeddings (preprocess.image.embed) were computed with weights of sha256 " in str(err.value)
    assert f"but {tmp_path / 'a.pth'} now has " in str(err.value)
    assert "re-run preprocess@image" in str(err.value) and "\n" not in str(err.value)
    state_file = tmp_path / "f" / "image" / "state.json"  # a cache that does not say its weights: the outputs decide
    state = json.loads(state_file.read_text())
    state["embedding"].pop("sha256")
    state_file.write_text(json.dumps(state))
    with pytest.raises(PipelineError) as err:
        train_with(tmp_path / "f", tmp_path, ["image", "text"], encoder)
    assert "the cached embeddings (preprocess.image.embed) are not this model's backbone output" in str(err.value)
    with pytest.raises(PipelineError) as err:  # the backbone would train: the cache cannot stand for it
        train_with(tmp_path / "f", tmp_path, ["image", "text"], {**encoder, "freeze": "none"})
    assert "need model.encoders.image to be the frozen backbone that computed them" in str(err.value)


def test_pruning_leaves_frozen_blocks_and_fine_tunes_on_the_cache(tiny_corpus, tmp_path):
    """compress: a frozen backbone is not pruned (nothing would train it back), so the pruned model's
    fine-tune still runs on the cached embeddings; the trainable layers do shrink."""
    from mmpipe.compress.compress import pruned_model
    from mmpipe.features.loader import FeatureSet
    from mmpipe.training.model_io import to_model_inputs

    random_weights("resnet18", tmp_path / "r.pth")
    encoder = {"arch": "resnet18", "weights": str(tmp_path / "r.pth"), "freeze": "all"}
    embedded_features(tiny_corpus / "features", tiny_corpus / "clean", tmp_path / "f", "image", {}, encoder)
    _, out = train_with(tmp_path / "f", tmp_path, ["image", "text"], encoder)
    model = load_model(out)
    example = to_model_inputs(FeatureSet(tmp_path / "f", split="val").get(np.arange(8)), model.modalities,
                              torch.device("cpu"))
    cfg = params.validate("compress", {"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": 1}})
    rows = []
    pruned = pruned_model(model, cfg, tmp_path / "f", example, lambda name, row: rows.append(row))
    assert len(rows) == 1  # one fine-tune epoch ran (on the cache: train checks it still matches the backbone)
    before, after = model.state_dict(), pruned.state_dict()
    for key, value in before.items():
        if key.startswith("encoders.image.backbone."):
            assert torch.equal(after[key], value), key
    assert after["encoders.text.conv1.weight"].shape[0] < before["encoders.text.conv1.weight"].shape[0]


def test_image_size_auto_follows_the_backbone_weights_resolution(tiny_corpus, tmp_path):
    """preprocess.image.size: auto = the crop size of the chosen torchvision architecture's weights."""
    import json

    from mmpipe.features.preprocess import preprocess

    auto = params.validate("preprocess", {"workers": 1, "image": {"size": "auto"}})
    preprocess("image", auto, tiny_corpus / "clean", tmp_path,
               params.validate("model", {"encoders": {"image": {"arch": "efficientnet_b1"}}}))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["size"] == 240 and state["arrays"]["image"]["shape"] == [3, 240, 240]  # EfficientNet-B1's weights: 240 px
    assert np.load(tmp_path / "image-00000.npy", mmap_mode="r").shape[1:] == (3, 240, 240)
    for k, model_params in enumerate((params.validate("model", {}), None)):  # small_cnn: the images' own size
        (tmp_path / str(k)).mkdir()
        metrics = preprocess("image", auto, tiny_corpus / "clean", tmp_path / str(k), model_params)
        assert metrics["auto"]["size"]["value"] == 32 and "median short side" in metrics["auto"]["size"]["why"]
        assert json.loads((tmp_path / str(k) / "state.json").read_text())["size"] == 32


def saved_for_backward_bytes(model, batch) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for the backward pass of one training step, and the parameter gradients."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(batch), batch["label"])
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["audio", "text"])
def test_checkpointing_keeps_less_for_backward_and_the_same_gradients(waveform_features, bert, tmp_path, family):
    """model.encoders.<m>.checkpointing: the trainable transformer blocks recompute their activations in the
    backward pass (dropout replayed): the same gradients, less kept in memory; BatchNorm blocks are left."""
    import copy

    from mmpipe.features.loader import FeatureSet
    from mmpipe.models.fusion import load_pretrained
    from mmpipe.training.model_io import build_model, model_config
    from mmpipe.training.model_io import to_model_inputs

    if family == "audio":
        tiny_wav2vec2(tmp_path / "w.pth")
        modality, root = "audio", waveform_features
        encoder = {"arch": "wav2vec2_model", "options": {**TINY_WAV2VEC2, "encoder_dropout": 0.1},
                   "weights": str(tmp_path / "w.pth"), "freeze": 5}
    else:
        modality, root = "text", bert.features
        encoder = {"arch": "huggingface", "weights": str(bert.folder), "freeze": 1}
    data = FeatureSet(root, split="train", modalities=(modality,))
    batch = to_model_inputs(data.get(np.arange(16)), [modality], torch.device("cpu"))
    results = {}
    for checkpointing in (False, True):
        model_params = params.validate("model", {**SMALL, "encoders": {modality: {**encoder, "checkpointing": checkpointing}}})
        torch.manual_seed(0)  # the same initial projection, fusion and head
        model = build_model(model_config([modality], data.state, model_params.model_dump(), data.label_names))
        info = load_pretrained(model)[modality]
        torch.manual_seed(0)
        model.train()
        results[checkpointing] = (info, *saved_for_backward_bytes(model, batch))
        if checkpointing:
            assert [type(b).__name__.startswith("Recomputed") for b in [model.encoders[modality].backbone.get_submodule(n)
                    for n in model.encoders[modality].checkpointed_blocks]] == [True] * info["checkpointed_blocks"]
            copy.deepcopy(model)  # compress prunes a deep copy: the swapped class survives it
    (plain_info, plain_bytes, plain_grads), (info, bytes_, grads) = results[False], results[True]
    assert plain_info["checkpointed_blocks"] == 0 and info["checkpointed_blocks"] == info["blocks"] - info["frozen_blocks"]
    assert bytes_ < 0.6 * plain_bytes
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointing_leaves_batchnorm_blocks_alone(tiny_corpus, tmp_path):
    random_weights("resnet18", tmp_path / "r.pth")
    result, out = train_with_image(tiny_corpus, tmp_path, {"arch": "resnet18", "weights": str(tmp_path / "r.pth"),
                                                           "checkpointing": True})
    assert result["metrics"]["pretrained"]["image"]["checkpointed_blocks"] == 1
    assert load_model(out).encoders["image"].checkpointed_blocks == ["conv1"]  # the other blocks hold BatchNorm
    with pytest.raises(Exception) as err:
        params.validate("model", {"encoders": {"image": {"checkpointing": True}}})
    assert "checkpointing apply to a pretrained arch" in str(err.value)
