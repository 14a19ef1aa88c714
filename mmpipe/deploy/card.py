"""The bundle's MODEL_CARD.md, rendered once from this run's data, metrics and the bundle's verification."""

from __future__ import annotations

from mmpipe.modalities import MODALITIES


def encoder_lines(model_params: dict, modalities: list[str]) -> list[str]:
    """One line per modality whose encoder is a pretrained backbone: its architecture and the weights
    it started from (whose licence the bundle inherits), as the model config records them."""
    lines = []
    for m in modalities:
        cfg = model_params.get("encoders", {}).get(m, {})
        if cfg.get("arch", "small_cnn") != "small_cnn":
            start = f"weights from `{cfg['weights']}`" if cfg.get("weights") else "random initialisation (no weights file)"
            lines.append(f"- {m}: `{cfg['arch']}` backbone, {start}, frozen blocks: {cfg.get('freeze', 'none')}.")
    return lines


def model_card(predictor, dataset: dict, eval_metrics: dict, compress_metrics: dict, chosen: str,
               modalities: list[str], name: str | None, model_params: dict) -> str:
    """The bundle's MODEL_CARD.md: what this model classifies, from what, how well, and its limits —
    all read from this run's data (labels, modalities, clean's rules) and metrics."""
    t, v = eval_metrics["test"], compress_metrics["variants"]
    shipped, labels, rules = v[chosen], dataset["labels"], dataset["clean_rules"]
    pretrained = encoder_lines(model_params, modalities)
    shown = ", ".join(labels[:20]) + (f", … ({len(labels) - 20} more)" if len(labels) > 20 else "")
    example = {"file": "FILE", "string": '"…"', "record": "'{\"…\": …}'"}
    lines = [
        f"# Model card: {name or 'mmpipe fusion model'} — {len(labels)}-class classifier from "
        + " + ".join(modalities),
        "",
        "## What it does",
        f"Classifies a sample into one of {len(labels)} classes ({shown}) from any non-empty subset of: "
        + ", ".join(f"an {m}" if m[0] in "aeiou" else f"a {m}" for m in modalities) + ". Missing modalities "
        "are allowed (the model was trained with random modality dropout and has a learned placeholder for each).",
        "",
        "## Data",
        f"{dataset['samples']:,} samples after cleaning (splits: "
        + ", ".join(f"{k} {n:,}" for k, n in dataset["splits"].items())
        + "). Splits are assigned by sample id; the test split was used only for the numbers below.",
        "",
        "## Quality (test split)",
        "",
        "| model | accuracy |",
        "|---|---|",
        f"| fused, PyTorch fp32 (evaluate stage) | {100 * t['accuracy']:.2f} % |",
        f"| shipped ONNX `{chosen}` (compress stage) | {100 * shipped['test_accuracy']:.2f} % |",
        *[f"| {m} only (baseline) | {100 * b['accuracy']:.2f} % |" for m, b in eval_metrics["baselines"].items()],
        "",
        f"Macro F1 {t['f1_macro']:.4f}; expected calibration error {t['ece']:.4f}.",
        "",
        "With only some modalities: " + ", ".join(f"{k} {100 * x['accuracy']:.1f} %" for k, x in eval_metrics["missing"].items()) + ".",
        "",
        "Relative robustness (area under accuracy vs noise level 0..1, one modality corrupted): "
        + ", ".join(f"{m} {r['relative']:.3f}" for m, r in eval_metrics["robustness"].items()) + ".",
        "",
        "## The shipped model",
        f"`model.onnx` is the `{chosen}` variant: {shipped['file_bytes'] / 1e6:.2f} MB, "
        f"{shipped['macs_per_sample'] / 1e6:.1f} M multiply-accumulates per sample, "
        f"batch-32 CPU latency p50 {shipped['latency_ms']['batch_32']['p50']:.2f} ms on the build machine "
        f"({compress_metrics['threads']} threads). `model_fp32.onnx` is the unpruned fp32 export "
        f"({v['fp32']['file_bytes'] / 1e6:.2f} MB).",
        *(["", "Pretrained encoders (their weights' licences apply to this model):", *pretrained] if pretrained else []),
        "",
        "## Inputs and limits",
        "The predictor checks every input under the rules the training data was cleaned with "
        "(`manifest.json` → `clean`) and answers an error for that input instead of a prediction:",
        *[f"- {m}: {MODALITIES[m].describe_rules(rules[m])}." for m in modalities],
        "- Only these classes can be predicted; inputs unlike the training data (other languages, image styles, "
        "recording conditions) are outside what was measured.",
        "- Probabilities are not perfectly calibrated (ECE above).",
        "",
        "## Use",
        "```",
        "pip install -r requirements.txt",
        "python predict.py " + " ".join(f"--{m} {example[predictor.readers[m].KIND]}" for m in modalities),
        "python predict.py --manifest samples.csv   # columns " + ", ".join(predictor.request_columns())
        + " (any of them; and optional id)",
        "```",
        "",
    ]
    return "\n".join(lines)


def verification_lines(checks: dict) -> list[str]:
    """The card's last section: what the export stage measured of this very bundle."""
    int8 = checks["int8_vs_its_fp32_top1_agreement"]
    return [
        "## Verification (export stage)",
        "",
        f"- fp32 ONNX vs PyTorch, {checks['parity_samples']} test samples: max |logit difference| "
        f"{checks['fp32_onnx_vs_pytorch_max_abs_logit_diff']:.2e}",
        f"- shipped vs unpruned fp32 top-1 agreement (test): {100 * checks['shipped_vs_fp32_top1_agreement']:.2f} %"
        + (f"; int8 vs the fp32 model it was quantized from: {100 * int8:.2f} %" if int8 is not None else ""),
        f"- this predictor on the raw test files: {100 * checks['predictor_raw_test_accuracy']:.2f} % "
        f"(fp32 model: {100 * checks['predictor_raw_test_accuracy_fp32']:.2f} %; evaluate stage: "
        f"{100 * checks['evaluate_test_accuracy']:.2f} %)",
        *(f"- {m} as {variant}: this predictor and the pipeline agree on {100 * r['top1_agreement']:.2f} % of "
          f"{r['items']} test items" for m, variants in checks["conversion_parity"].items() for variant, r in variants.items()),
    ]
