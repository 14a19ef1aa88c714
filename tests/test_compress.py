"""Compression: ONNX parity with PyTorch, pruning that really shrinks, int8 within an accuracy budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmpipe import params
from mmpipe.compress import prune, quantize
from mmpipe.compress.compress import CHOSEN_FILE, compress
from mmpipe.compress.onnx_model import export_onnx, input_dtypes, onnx_feeds, run_logits, session
from mmpipe.features.loader import FeatureSet, feature_modalities
from mmpipe.errors import PipelineError
from mmpipe.training.distill import map_loss, random_patterns, student_config
from mmpipe.training.model_io import load_model, only_available, to_model_inputs
from mmpipe.trust import calibration

@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def test_batch(tiny_corpus):
    data = FeatureSet(tiny_corpus / "features", split="test")
    return data.get(np.arange(len(data)))


def test_onnx_export_matches_pytorch_logits(model_dir, test_batch, tmp_path):
    model = load_model(model_dir)
    feeds = onnx_feeds(test_batch, model)
    assert list(feeds) == list(input_dtypes(model)) == ["image", "text", "text_length", "audio", "tabular_numeric",
                                                        "tabular_categories", "available"]
    assert [str(v.dtype) for v in feeds.values()] == ["uint8", "int64", "int64", "float32", "float32", "int64", "bool"]
    export_onnx(model, feeds, tmp_path / "m.onnx")
    onnx_logits = run_logits(session(tmp_path / "m.onnx"), feeds, batch_size=7)  # dynamic batch axis
    with torch.no_grad():
        torch_logits = model(to_model_inputs(test_batch, model.modalities, torch.device("cpu"))).numpy()
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4


def test_structured_pruning_removes_channels_and_macs(model_dir, test_batch):
    model = load_model(model_dir)
    example = to_model_inputs(test_batch, model.modalities, torch.device("cpu"))
    pruned = prune.structured(model, 0.5, example)
    assert prune.macs(pruned, example) <= 0.7 * prune.macs(model, example)
    convs = [m for m in pruned.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert all(c.out_channels % 8 == 0 for c in convs)  # kept in ONNX Runtime's blocks of 8
    assert sum(c.out_channels for c in convs) < sum(c.out_channels for c in model.modules()
                                                    if isinstance(c, (nn.Conv1d, nn.Conv2d)))
    assert pruned.head[-1].out_features == 10 and pruned.placeholders.shape == model.placeholders.shape
    with torch.no_grad():
        assert pruned(example).shape == (len(test_batch["label"]), 10)


@pytest.mark.parametrize("amount", [0.55, 0.6])
def test_structured_pruning_keeps_the_nearest_multiple_of_8_in_every_layer(model_dir, test_batch, amount):
    """Each layer keeps its own share rounded to the nearest block of 8 (at least 8): torch-pruning's round_to
    alone rounds down, and a 16-channel layer whose share rounds to 0 kept all 16 while the 32-channel layer
    after it kept 8."""
    model = load_model(model_dir)
    example = to_model_inputs(test_batch, model.modalities, torch.device("cpu"))
    pruned = prune.structured(model, amount, example)
    protected = {name for name, m in model.named_modules() if any(m is p for p in prune._protected(model))}
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name not in protected}
    width = lambda m: m.out_channels if isinstance(m, (nn.Conv1d, nn.Conv2d)) else m.out_features  # noqa: E731
    after = dict(pruned.named_modules())
    assert len(layers) >= 8
    for name, layer in layers.items():
        n, kept = width(layer), width(after[name])
        want = n if n <= 8 else max(8, 8 * round(n * (1 - amount) / 8 - 1e-9))
        assert kept == want, (name, n, kept, want)
    assert prune.kept_channels(16, 0.45) == 8 and prune.kept_channels(32, 0.45) == 16
    assert prune.kept_channels(24, 0.5) == 8 and prune.kept_channels(6, 0.1) == 6  # a tie rounds down


def test_unstructured_pruning_zeroes_weights_keeps_shapes(model_dir):
    model = load_model(model_dir)
    pruned = prune.unstructured(model, 0.6)
    assert prune.sparsity(model) < 0.01 and 0.4 < prune.sparsity(pruned) < 0.6  # protected layers stay dense
    before, after = model.state_dict(), pruned.state_dict()
    assert set(before) == set(after) and all(before[k].shape == after[k].shape for k in before)
    assert not any("mask" in k for k in pruned.state_dict())  # pruning made permanent


def test_int8_budget_keeps_the_most_sensitive_layers_in_fp32(model_dir, test_batch, tmp_path):
    model = load_model(model_dir)
    feeds = onnx_feeds(test_batch, model)
    export_onnx(model, feeds, tmp_path / "fp32.onnx")
    quantize.prepare(tmp_path / "fp32.onnx", tmp_path / "prepared.onnx")
    calibration = [{k: v[:32] for k, v in feeds.items()}]
    logits_of = lambda path: run_logits(session(path), feeds)  # noqa: E731
    ranked = [node for node, _ in quantize.sensitivity(tmp_path / "prepared.onnx", calibration, "minmax", logits_of)]
    assert sorted(ranked) == sorted(quantize.quantizable_nodes(tmp_path / "prepared.onnx")) and len(ranked) >= 8

    # a stand-in accuracy that only fits once the two most sensitive nodes stay in fp32
    def accuracy_of(path):
        import onnx

        graph = onnx.load(str(path)).graph
        dequantized = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
        weight_is_int8 = {n.name: n.input[1] in dequantized for n in graph.node if n.name in ranked}
        return 0.9 if not any(weight_is_int8[node] for node in ranked[:2]) else 0.5
    trials = []
    found = quantize.quantize_within_budget(tmp_path / "prepared.onnx", tmp_path / "int8.onnx", calibration, "minmax",
                                            accuracy_of, logits_of, 0.9, 0.01, trials.append)
    assert [t["excluded"] for t in trials][:3] == [[], ranked[:1], ranked[:2]]
    assert found == {"excluded": ranked[:2], "accuracy": 0.9} and (tmp_path / "int8.onnx").exists()

    none = quantize.quantize_within_budget(tmp_path / "prepared.onnx", tmp_path / "never.onnx", calibration, "minmax",
                                           lambda path: 0.0, logits_of, 0.9, 0.01, lambda row: None)
    assert none is None and not (tmp_path / "never.onnx").exists()  # nothing fits: fall back to fp32


def _int8_nodes(path) -> set[str]:
    """Nodes of a QDQ model whose weight arrives through a DequantizeLinear, i.e. were quantized."""
    import onnx

    graph = onnx.load(str(path)).graph
    dequantized = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    return {n.name for n in graph.node if n.op_type in quantize.QUANTIZABLE and n.input[1] in dequantized}


def test_latency_probe_keeps_the_layers_measured_slower_in_fp32(model_dir, test_batch, tmp_path):
    model = load_model(model_dir)
    feeds = onnx_feeds(test_batch, model)
    export_onnx(model, feeds, tmp_path / "fp32.onnx")
    prepared = tmp_path / "prepared.onnx"
    quantize.prepare(tmp_path / "fp32.onnx", prepared)
    calibration = [{k: v[:32] for k, v in feeds.items()}]
    nodes = quantize.quantizable_nodes(prepared)
    # a stand-in clock: every other layer is 1 ms faster in int8, the rest 1 ms slower, of 20 ms
    saving = {node: (1.0 if i % 2 == 0 else -1.0) for i, node in enumerate(nodes)}
    time_of = lambda path: 20.0 - sum(saving[n] for n in _int8_nodes(path))  # noqa: E731
    gains = quantize.latency_gains(prepared, calibration, "minmax", time_of, rounds=1)
    assert dict(gains) == {node: saved / 20.0 for node, saved in saving.items()}
    faster = [node for node, saved in gains if saved >= -0.02]
    logits_of = lambda path: run_logits(session(path), feeds)  # noqa: E731
    trial = quantize.quantize_within_budget(prepared, tmp_path / "int8.onnx", calibration, "minmax", lambda p: 0.9,
                                            logits_of, 0.9, 0.01, lambda row: None, candidates=faster)
    assert trial == {"excluded": [], "accuracy": 0.9}
    assert _int8_nodes(tmp_path / "int8.onnx") == set(faster) and 0 < len(faster) < len(nodes)
    assert quantize.quantize_within_budget(prepared, tmp_path / "none.onnx", calibration, "minmax", lambda p: 0.9,
                                           logits_of, 0.9, 0.01, lambda row: None, candidates=[]) is None


@pytest.mark.parametrize("method,layers", [("structured", "not_slower"), ("unstructured", "all")])
def test_compress_measures_every_variant_and_chooses_within_budget(tiny_corpus, model_dir, tmp_path, method, layers):
    cfg = params.validate("compress", {"latency_runs": 5, "max_accuracy_drop": 0.05,
                                       "prune": {"method": method, "finetune_epochs": 1},
                                       "quantize": {"calibration_samples": 64, "layers": layers}})
    result = compress(cfg, tiny_corpus / "features", model_dir, tmp_path, progress=lambda line: None)
    variants = result["variants"]
    assert set(variants) >= {"fp32", "pruned"}
    for v in variants.values():
        assert set(v) >= {"val_accuracy", "test_accuracy", "file_bytes", "gzip_bytes", "parameters", "macs_per_sample",
                          "sparsity", "latency_ms"}
        assert set(v["latency_ms"]) == {"batch_1", "batch_32"} and v["gzip_bytes"] < v["file_bytes"]
    if method == "unstructured":
        assert variants["pruned"]["sparsity"] > 0.3 and variants["pruned"]["macs_per_sample"] == variants["fp32"]["macs_per_sample"]
    else:
        assert variants["pruned"]["macs_per_sample"] < variants["fp32"]["macs_per_sample"]
    if layers == "all":  # every layer quantized unless the budget kept it in fp32
        assert "int8" in variants and variants["int8"]["fp32_nodes_slower_in_int8"] == []
        assert variants["int8"]["file_bytes"] < variants["fp32"]["file_bytes"] / 2.5
    elif "int8" in variants:  # the layers probed slower stay fp32; the file still shrinks
        int8_nodes = _int8_nodes(tmp_path / "int8.onnx")
        assert not int8_nodes & set(variants["int8"]["fp32_nodes_slower_in_int8"]) and int8_nodes
        assert variants["int8"]["file_bytes"] < variants[variants["int8"]["from"]]["file_bytes"]
    chosen = result["chosen"]
    assert variants["fp32"]["val_accuracy"] - variants[chosen]["val_accuracy"] <= 0.05
    assert chosen == min((n for n in variants if variants["fp32"]["val_accuracy"] - variants[n]["val_accuracy"] <= 0.05),
                         key=lambda n: variants[n]["file_bytes"])  # prefer: size
    assert (tmp_path / CHOSEN_FILE).read_bytes() == (tmp_path / f"{chosen}.onnx").read_bytes()
    assert not list(tmp_path.glob(".prepared*"))


def test_dynamic_int8_is_a_measured_variant_and_a_broken_one_is_left_out(tiny_corpus, model_dir, tmp_path, monkeypatch):
    """quantize.dynamic: ONNX Runtime's dynamic int8 of MatMul/Gather weights (here the text and tabular
    embedding tables) is measured like every variant; one ONNX Runtime cannot run is reported, not fatal."""
    import onnx

    cfg = params.validate("compress", {"latency_runs": 5, "max_accuracy_drop": 0.2, "prune": {"method": "none"},
                                       "quantize": {"enabled": False, "dynamic": True}})
    (tmp_path / "ok").mkdir()
    (tmp_path / "broken").mkdir()
    result = compress(cfg, tiny_corpus / "features", model_dir, tmp_path / "ok", progress=lambda line: None)
    variants = result["variants"]
    dynamic = variants["int8_dynamic"]
    assert dynamic["from"] == "fp32" and dynamic["file_bytes"] < variants["fp32"]["file_bytes"]
    assert abs(dynamic["val_accuracy"] - variants["fp32"]["val_accuracy"]) <= 0.2
    graph = onnx.load(str(tmp_path / "ok" / "int8_dynamic.onnx")).graph
    int8_tables = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert int8_tables and "DequantizeLinear" in {n.op_type for n in graph.node}  # the embedding tables, in int8
    assert result["chosen"] in ("fp32", "int8_dynamic") and "failed_variants" not in result

    def unrunnable(prepared, out_path):  # a graph ONNX Runtime refuses when the session is created
        out_path.write_bytes(b"not an onnx graph")
    monkeypatch.setattr(quantize, "quantize_dynamic_int8", unrunnable)
    lines = []
    result = compress(cfg, tiny_corpus / "features", model_dir, tmp_path / "broken", progress=lines.append)
    assert "int8_dynamic" not in result["variants"] and result["chosen"] == "fp32"
    assert "int8_dynamic" in result["failed_variants"] and not (tmp_path / "broken" / "int8_dynamic.onnx").exists()
    assert any(line.startswith("compress[int8_dynamic]: left out, ONNX Runtime cannot run it") for line in lines)


@pytest.fixture(scope="module")
def teacher_dir(tiny_corpus, tmp_path_factory):
    """A teacher twice tiny_model's widths (half of them is then about a quarter of its MACs), trained 2 epochs."""
    from mmpipe.training.train import train
    out = tmp_path_factory.mktemp("teacher") / "fusion"
    wide = params.ModelParams(dim=32, hidden=64, encoders={
        "image": {"width": 16}, "text": {"embed_dim": 16, "width": 32}, "audio": {"width": 16}, "tabular": {"width": 32}})
    train(params.TrainParams(epochs=2, batch_size=32, device="cpu"), wide, tiny_corpus / "features",
          list(feature_modalities(tiny_corpus / "features")), out, None)
    return out


@pytest.mark.parametrize("init", ["pruned", "scratch"])
def test_distilled_student_is_within_its_macs_share_and_is_measured_per_modality_subset(tiny_corpus, teacher_dir,
                                                                                         tmp_path, init):
    """compress.distill: the student (the teacher pruned, or a fresh model at scaled widths) is at most
    max_macs_share (default 20 %) of the teacher's MACs, is trained (its epochs logged), exported and int8'd like
    the other variants, and every modality subset's test accuracy and each modality's robustness AUC are
    reported for teacher and student."""
    cfg = params.validate("compress", {"latency_runs": 5, "max_accuracy_drop": 0.2, "prune": {"method": "none"},
                                       "quantize": {"calibration_samples": 64, "layers": "all"},
                                       "distill": {"enabled": True, "init": init, "epochs": 3, "batch_size": 32,
                                                   "robustness_levels": [0.0, 1.0]}})
    logged = []
    result = compress(cfg, tiny_corpus / "features", teacher_dir, tmp_path, log=lambda name, row: logged.append((name, row)),
                      progress=lambda line: None, clean_dir=tiny_corpus / "clean")
    variants, distill = result["variants"], result["distill"]
    assert {"student", "student_int8"} <= set(variants) and variants["student_int8"]["from"] == "student"
    assert cfg.distill.max_macs_share == 0.2  # the default: well below the shipped x0.5 model's ~26 %
    assert variants["student"]["macs_per_sample"] <= 0.2 * variants["fp32"]["macs_per_sample"]
    assert distill["macs_share"] == pytest.approx(variants["student"]["macs_per_sample"]
                                                  / variants["fp32"]["macs_per_sample"], abs=1e-3)
    assert variants["student_int8"]["file_bytes"] < variants["student"]["file_bytes"] < variants["fp32"]["file_bytes"]
    rows = [row for name, row in logged if name == "distill"]
    assert len(rows) == distill["epochs_run"] == 3
    # the kept epoch is the best by the headline over every modality subset, not the all-modality one alone
    scores = [row["val_accuracy_every_subset"] for row in rows]
    assert distill["best_epoch"] == rows[scores.index(max(scores))]["epoch"]
    teacher = load_model(teacher_dir)
    assert distill["init"] == init
    assert distill["map_weight"] == (2.0 if init == "pruned" else 0.0)  # attention transfer pairs the teacher's layers
    if init == "scratch":  # its own config, at scaled widths
        assert distill["model"]["dim"] % teacher.config["model"]["attention_heads"] == 0 and distill["model"]["dim"] < 32
    else:  # the teacher's layers with channels removed: no config of its own
        assert "model" not in distill
    assert set(distill["retention"]) == {"+".join(s) for s in calibration.subsets(teacher.modalities)}
    everything = distill["retention"]["+".join(teacher.modalities)]
    assert everything["teacher"] == pytest.approx(variants["fp32"]["test_accuracy"], abs=1e-6)
    assert everything["student"] == pytest.approx(variants["student"]["test_accuracy"], abs=1e-6)
    assert everything["student_int8"] == pytest.approx(variants["student_int8"]["test_accuracy"], abs=1e-6)
    assert set(distill["robustness"]) == set(teacher.modalities)
    assert all(0.0 <= r[w] <= 1.0 for r in distill["robustness"].values() for w in ("teacher", "student"))
    assert (tmp_path / CHOSEN_FILE).read_bytes() == (tmp_path / f"{result['chosen']}.onnx").read_bytes()


def test_a_student_over_the_macs_share_or_of_a_pretrained_backbone_is_refused_in_one_line(tiny_corpus, model_dir,
                                                                                          tmp_path):
    cfg = params.validate("compress", {"latency_runs": 5, "prune": {"method": "none"}, "quantize": {"enabled": False},
                                       "distill": {"enabled": True, "init": "scratch", "width_scale": 0.9}})
    with pytest.raises(PipelineError, match=r"width_scale 0.9 has \d+% of the teacher's MACs, above max_macs_share"):
        compress(cfg, tiny_corpus / "features", model_dir, tmp_path, progress=lambda line: None,
                 clean_dir=tiny_corpus / "clean")
    config = load_model(model_dir).config
    encoders = config["model"]["encoders"]
    encoders["image"]["width"], encoders["text"]["width"], encoders["audio"]["width"] = 24, 128, 16  # balanced's
    config["model"]["dim"] = 128
    student = student_config(config, 0.45)["model"]  # channel counts in ONNX Runtime's blocks of 8
    assert [student["encoders"][m]["width"] for m in ("image", "text", "audio")] == [8, 56, 8] and student["dim"] == 56
    assert encoders["image"]["width"] == 24  # the teacher's config is left as it was
    config["model"]["encoders"]["image"]["arch"] = "resnet18"
    with pytest.raises(PipelineError, match="model.encoders.image.arch is resnet18: the student scales small_cnn"):
        student_config(config, 0.5)


def test_auto_width_spends_the_macs_left_on_the_cheap_encoders(tiny_corpus, teacher_dir):
    """width_scale auto: the widest uniform scale within the share, then encoders widened back where the budget
    allows; the result stays within max_macs_share and no encoder is narrower than the uniform scale."""
    from mmpipe.compress.compress import student_within_share
    teacher = load_model(teacher_dir)
    data = FeatureSet(tiny_corpus / "features", split="val")
    example = to_model_inputs(data.get(np.arange(len(data))), teacher.modalities, torch.device("cpu"))
    uniform = params.CompressParams().distill.model_copy(update={"init": "scratch", "width_scale": 0.5,
                                                                 "max_macs_share": 0.4})
    scale, _, _, share_uniform = student_within_share(teacher, example, uniform)
    assert set(scale.values()) == {0.5}
    auto = uniform.model_copy(update={"width_scale": "auto"})
    scale, config, student, share = student_within_share(teacher, example, auto)
    assert scale["all"] == 0.5 and share_uniform <= share <= 0.4
    assert all(scale[m] >= 0.5 for m in teacher.modalities) and max(scale[m] for m in teacher.modalities) > 0.5
    widened = [m for m in teacher.modalities if scale[m] == 1.0 and "width" in config["model"]["encoders"][m]]
    for m in widened:  # at full width the encoder keeps the teacher's channels
        assert config["model"]["encoders"][m]["width"] == teacher.config["model"]["encoders"][m]["width"]


def test_a_pruned_student_starts_from_the_teachers_own_channels(tiny_corpus, teacher_dir):
    """init pruned: the student is the teacher with whole channels removed (any arch torch-pruning handles):
    within max_macs_share, narrower, and every kept filter of its first image convolution is one of the teacher's
    filters unchanged (what it learnt is kept; distillation recovers what the removed ones carried)."""
    from mmpipe.compress.compress import student_within_share
    teacher = load_model(teacher_dir)
    data = FeatureSet(tiny_corpus / "features", split="val")
    example = to_model_inputs(data.get(np.arange(len(data))), teacher.modalities, torch.device("cpu"))
    cfg = params.CompressParams().distill.model_copy(update={"max_macs_share": 0.4})
    assert cfg.init == "pruned"
    scale, config, student, share = student_within_share(teacher, example, cfg)
    assert share <= 0.4 and scale["all"] <= 0.5 and config == teacher.config
    first = lambda model: next(m for m in model.encoders["image"].modules() if isinstance(m, torch.nn.Conv2d))  # noqa: E731
    kept, full = first(student).weight.detach(), first(teacher).weight.detach()
    assert 0 < kept.shape[0] < full.shape[0]
    assert all(any(torch.equal(row, other) for other in full) for row in kept)
    with torch.no_grad():  # a working model of the same kind, judged like the teacher
        assert student(example).shape == teacher(example).shape and type(student.target) is type(teacher.target)
    assert set(scale.values()) == {scale["all"]}  # one share for every layer (no encoder widened back)


def test_the_students_selection_score_is_its_mean_headline_over_every_modality_subset(tiny_corpus, teacher_dir):
    from mmpipe.training.distill import Teacher
    model = load_model(teacher_dir)
    data = FeatureSet(tiny_corpus / "features", split="val")
    expected = []
    for subset in calibration.subsets(model.modalities):  # masking the inputs, one subset at a time
        outputs = []
        for batch in data.batches(64):
            with torch.no_grad():
                inputs = to_model_inputs(only_available(batch, model.modalities, subset), model.modalities,
                                         torch.device("cpu"))
                outputs.append(model(inputs).float())
        expected.append(data.target.headline(data.target.scores(torch.cat(outputs)).numpy(), data.labels))
    assert len(expected) == 2 ** len(model.modalities) - 1
    teacher = Teacher(load_model(teacher_dir))
    assert teacher.selection_score(model, data, torch.device("cpu")) == pytest.approx(np.mean(expected), abs=1e-9)


def test_selecting_by_the_worst_gap_subtracts_the_subset_furthest_behind_the_teacher(tiny_corpus, teacher_dir):
    """select_by mean_and_worst_gap: the mean over subsets plus the worst subset's gap to the teacher. The
    teacher judged against itself has no gap; a student whose first encoder is wiped falls behind on subsets
    that use it, and its score is its own mean minus the largest shortfall, computed here by hand."""
    from mmpipe.training.distill import Teacher, subset_scores
    data = FeatureSet(tiny_corpus / "features", split="val")
    teacher = Teacher(load_model(teacher_dir), select_by="mean_and_worst_gap")
    cpu = torch.device("cpu")
    own = subset_scores(teacher.model, data, cpu)
    assert teacher.selection_score(load_model(teacher_dir), data, cpu) == pytest.approx(np.mean(list(own.values())))
    student = load_model(teacher_dir)
    wiped = student.modalities[0]
    with torch.no_grad():
        for p in student.encoders[wiped].parameters():
            p.zero_()
    scores = subset_scores(student, data, cpu)
    gaps = {s: scores[s] - own[s] for s in scores}
    assert min(gaps.values()) < 0  # behind somewhere: the two scores below differ
    expected = np.mean(list(scores.values())) + min(gaps.values())
    assert teacher.selection_score(student, data, cpu) == pytest.approx(expected, abs=1e-9)
    assert Teacher(teacher.model).selection_score(student, data, cpu) == pytest.approx(np.mean(list(scores.values())))


def test_the_teachers_remembered_vectors_are_what_it_computes_per_batch(tiny_corpus, teacher_dir):
    """Teacher.remember encodes every train row once; a step's lookup by the batch's index gives what encoding
    the batch would (eval mode: no augmentation), so caching changes the cost, not the lesson."""
    from mmpipe.training.distill import Teacher
    teacher = Teacher(load_model(teacher_dir))
    data = FeatureSet(tiny_corpus / "features", split="train")
    modalities = teacher.model.modalities
    teacher.remember(data, modalities, torch.device("cpu"), batch_size=50)
    assert teacher.encoded.shape[:2] == (len(data), len(modalities))
    for batch in data.batches(32, shuffle=True, seed=3):
        inputs = to_model_inputs(batch, modalities, torch.device("cpu"))
        with torch.no_grad():
            torch.testing.assert_close(teacher.encoded[inputs["index"]], teacher.model.encode(inputs).float(),
                                       rtol=1e-5, atol=1e-5)


def test_the_alone_view_weighs_into_the_distillation_loss_as_alone_weight_says(tiny_corpus, teacher_dir):
    """The distillation loss is the weighted mean of three views (the batch's mask, a random subset, each modality
    alone), the third at alone_weight against the others' 1: from the losses at weights 0 and 1 the views are
    known, and the loss at weight 3 must be their weighted mean. A student pruned from the teacher disagrees with
    it, more when it sees one modality than all of them."""
    from mmpipe.training.distill import Teacher
    model = load_model(teacher_dir)
    batch = next(FeatureSet(tiny_corpus / "features", split="train").batches(32))
    inputs = to_model_inputs(batch, model.modalities, torch.device("cpu"))
    student = prune.structured(model, 0.5, inputs).eval()

    def distill_loss(weight: float) -> float:
        torch.manual_seed(0)  # the random-subset view draws the same patterns each time
        teacher = Teacher(load_model(teacher_dir), alpha=1.0, feature_weight=0.0, alone_weight=weight)
        with torch.no_grad():
            return teacher.step(student, inputs, nn.CrossEntropyLoss(), model.target)[1].item()

    both = distill_loss(0.0)  # the mean of the first two views
    alone = 3 * distill_loss(1.0) - 2 * both
    assert alone > both > 0
    assert distill_loss(3.0) == pytest.approx((2 * both + 3 * alone) / 5, rel=1e-5)


def test_the_teacher_on_augmented_views_encodes_what_the_student_is_about_to_see(tiny_corpus, teacher_dir):
    """distill.teacher_views: augmented. A student that is the teacher's copy, its encoders in training mode
    (batch-norm kept in eval so that only the augmentation differs), gets the very vectors the teacher computed
    just before: same jitter, masks and token dropout; and the teacher's call leaves the generator where it was.
    Not the clean vectors: the augmentation is really on."""
    import copy
    from mmpipe.training.distill import Teacher, activation_maps
    teacher = Teacher(load_model(teacher_dir), augmented=True, map_weight=1.0)
    student = copy.deepcopy(teacher.model)
    student.train()
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    data = FeatureSet(tiny_corpus / "features", split="train")
    teacher.remember(data, teacher.model.modalities, torch.device("cpu"))
    assert teacher.encoded is None  # per step: the views differ every time
    inputs = to_model_inputs(data.get(np.arange(32)), teacher.model.modalities, torch.device("cpu"))
    torch.manual_seed(5)
    taught, teacher_maps = teacher.encode_as_student(inputs)
    with torch.no_grad(), activation_maps(student) as maps:
        seen = student.encode(inputs)
    with torch.no_grad():
        clean = teacher.model.encode(inputs)
    torch.testing.assert_close(taught, seen, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(taught, clean, atol=1e-3)
    assert all(not encoder.training for encoder in teacher.model.encoders.values())
    # the maps of every convolutional encoder, paired one to one: the attention loss between equals is 0
    assert {"image", "audio"} <= set(teacher_maps)
    assert [len(v) for v in maps.values()] == [len(v) for v in teacher_maps.values()]
    assert map_loss(maps, teacher_maps, inputs["available"].bool(), student.modalities).item() < 1e-8
    assert not any(m._forward_hooks for m in student.modules())  # the hooks are gone after the block


def test_attention_transfer_compares_where_each_map_looks_whatever_its_channels():
    """map_loss: a student map with other channels but the same spatial attention (channel mean of squares) as
    the teacher's costs nothing, whatever its scale; a map looking elsewhere costs; rows without the modality and
    maps without spatial axes are left out."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.rand(6, 16, 4, 5, generator=g)
    attention = teacher.pow(2).mean(1, keepdim=True)
    same = (attention.expand(6, 8, 4, 5) * 3.0).sqrt()  # 8 channels, each squared = 3 x the attention
    available = torch.ones(6, 2, dtype=torch.bool)
    flat = {"audio": [torch.rand(6, 4, generator=g)]}
    assert map_loss({"audio": [same]} | {"image": flat["audio"]}, {"audio": [teacher]} | {"image": flat["audio"] * 5},
                    available, ["image", "audio"]).item() < 1e-6
    elsewhere = same.flip(-1)
    assert map_loss({"audio": [elsewhere]}, {"audio": [teacher]}, available, ["image", "audio"]).item() > 1e-3
    available[:, 1] = False
    assert map_loss({"audio": [elsewhere]}, {"audio": [teacher]}, available, ["image", "audio"]).item() == 0.0


def test_random_patterns_keep_a_non_empty_subset_of_each_rows_modalities():
    available = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]] * 500, dtype=torch.bool)
    pattern = random_patterns(available, torch.Generator().manual_seed(0))
    assert not (pattern & ~available).any()  # never a modality the row lacks
    assert (pattern.any(dim=1) == available.any(dim=1)).all()  # non-empty wherever the row has something
    full = pattern[0::4]
    assert (full.sum(dim=1) == 1).float().mean() > 0.2  # single modalities are taught often
    assert len({tuple(row.tolist()) for row in full}) == 15  # every non-empty subset occurs


@pytest.mark.parametrize("kind", ["category", "number", "set"])
def test_distillation_loss_is_least_where_the_student_says_what_the_teacher_says(kind):
    from mmpipe.targets import target_of
    spec = {"category": {"type": "category", "state": {"labels": ["a", "b", "c"]}},
            "number": {"type": "number", "state": {"mean": 0.0, "std": 1.0}},
            "set": {"type": "set", "state": {"tags": ["a", "b", "c"], "pos_weight": [1.0] * 3, "thresholds": [0.5] * 3}}}
    target = target_of(spec[kind])
    teacher = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    student = teacher.clone().requires_grad_(True)
    target.distill_loss(student, teacher, 2.0).backward()
    assert student.grad.abs().max() < 1e-6  # a minimum where the outputs agree
    assert target.distill_loss(teacher + torch.randn_like(teacher), teacher, 2.0) > target.distill_loss(teacher, teacher, 2.0)


def test_feature_loss_compares_only_the_available_vectors_relative_to_the_teachers_scale():
    from mmpipe.training.distill import feature_loss
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 3, 16, generator=g)
    available = torch.ones(8, 3, dtype=torch.bool)
    available[:, 2] = False
    student = teacher.clone()
    student[:, 2] += 100.0  # an unavailable modality's vector is what the placeholder replaces: not compared
    assert feature_loss(student, teacher, available) == 0.0
    student[:, 0] = 0.0  # a vector of zeros is as far as the teacher's own scale: 1 for those pairs
    assert feature_loss(student, teacher, available).item() == pytest.approx(0.5, abs=1e-6)
    assert feature_loss(10 * student, 10 * teacher, available).item() == pytest.approx(0.5, abs=1e-6)  # scale-free


def test_an_encoders_own_width_scale_prunes_it_to_its_own_share(tiny_corpus, teacher_dir):
    """distill.encoder_width_scale: the named encoder keeps its own share of channels (nearest block of 8), the
    others the searched scale; a name the model lacks is ignored."""
    from mmpipe.compress.compress import student_within_share
    teacher = load_model(teacher_dir)
    data = FeatureSet(tiny_corpus / "features", split="val")
    example = to_model_inputs(data.get(np.arange(len(data))), teacher.modalities, torch.device("cpu"))
    cfg = params.CompressParams().distill.model_copy(update={"max_macs_share": 1.0, "width_scale": 0.5,
                                                             "encoder_width_scale": {"audio": 1.0, "speech": 0.3}})
    scale, _, student, _ = student_within_share(teacher, example, cfg)
    assert scale["audio"] == 1.0 and scale["image"] == 0.5 and "speech" not in scale
    widths = lambda model, m: [c.out_channels for c in model.encoders[m].modules()  # noqa: E731
                               if isinstance(c, (torch.nn.Conv1d, torch.nn.Conv2d))]
    assert widths(student, "audio") == widths(teacher, "audio")  # kept whole
    assert widths(student, "image") == [prune.kept_channels(n, 0.5) for n in widths(teacher, "image")]


def test_one_layer_of_an_encoder_keeps_its_own_share(tiny_corpus, teacher_dir):
    """distill.encoder_width_scale by layer (``image.features.3``): that block keeps its own share, the rest of
    the encoder its modality's (the more specific key wins); a layer the encoder lacks is refused in one line
    that lists the ones it has."""
    from mmpipe.compress.compress import student_within_share
    teacher = load_model(teacher_dir)
    data = FeatureSet(tiny_corpus / "features", split="val")
    example = to_model_inputs(data.get(np.arange(len(data))), teacher.modalities, torch.device("cpu"))
    convs = lambda model: [c.out_channels for c in model.encoders["image"].modules()  # noqa: E731
                           if isinstance(c, torch.nn.Conv2d)]
    full = convs(teacher)
    cfg = params.CompressParams().distill.model_copy(update={
        "max_macs_share": 1.0, "width_scale": 0.5, "encoder_width_scale": {"image": 0.25, "image.features.3": 1.0}})
    scale, _, student, _ = student_within_share(teacher, example, cfg)
    assert scale["image.features.3"] == 1.0
    third = teacher.encoders["image"].features[3][0].out_channels  # the block's conv
    assert convs(student) == [n if i == 2 else prune.kept_channels(n, 0.25) for i, n in enumerate(full)]
    assert convs(student)[2] == third and convs(student)[1] < full[1]
    wrong = cfg.model_copy(update={"encoder_width_scale": {"image.features.33": 0.5}})
    with pytest.raises(PipelineError) as err:
        student_within_share(teacher, example, wrong)
    assert str(err.value).startswith("compress.distill.encoder_width_scale: image.features.33: the image encoder "
                                     "has no layer features.33 (its layers: features.0.0, ")
    assert "\n" not in str(err.value)
