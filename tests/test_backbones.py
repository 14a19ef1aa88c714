"""Pretrained image backbones from local weight files (torchvision architectures by name)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from mmpipe import params
from mmpipe.errors import PipelineError
from mmpipe.models.backbones import leading_blocks
from mmpipe.models.model_io import WEIGHTS_FILE, load_model
from mmpipe.models.train import train

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


def train_with_image(tiny_corpus, tmp_path, image: dict, epochs: int = 1):
    model_params = params.validate("model", {**SMALL, "encoders": {**SMALL["encoders"], "image": image}})
    out = tmp_path / "fusion"
    result = train(params.TrainParams(epochs=epochs, batch_size=64, device="cpu", lr=0.01), model_params,
                   tiny_corpus / "features", ["image", "text"], out, None)
    return result, out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_frozen_blocks_keep_the_file_weights_and_the_rest_trains(tiny_corpus, tmp_path, suffix):
    state = random_weights("resnet18", tmp_path / f"resnet18{suffix}")
    result, out = train_with_image(tiny_corpus, tmp_path, {"arch": "resnet18", "weights": str(tmp_path / f"resnet18{suffix}"),
                                                         "freeze": 3})
    info = result["metrics"]["pretrained"]["image"]
    assert info["arch"] == "resnet18" and info["frozen_blocks"] == 3 and len(info["sha256"]) == 64

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
    ({"weights": "w.pth"}, "weights and freeze apply to a torchvision arch"),
    ({"arch": "resnet18", "freeze": -1}, "freeze"),
    ({"arch": "resnet18", "freeze": "some"}, "freeze"),
    ({"arch": "resnet18", "lr_scale": 0}, "lr_scale"),
])
def test_backbone_params_are_validated(image, expected):
    with pytest.raises(Exception) as err:
        params.validate("model", {"encoders": {"image": image}})
    assert expected in str(err.value)


def test_lr_scale_gives_the_backbone_its_own_parameter_group(tiny_corpus, tmp_path):
    from mmpipe.models.train import param_groups

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
