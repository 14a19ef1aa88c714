"""The bundle's MODEL_CARD.md, rendered once from this run's data, metrics and the bundle's verification."""

from __future__ import annotations

from mmpipe.modalities import MODALITIES

# model-index task types (Hugging Face model card metadata has none for multimodal inputs: these say it)
TASK_TYPES = {"category": "multimodal-classification", "number": "multimodal-regression",
              "set": "multimodal-multi-label-classification"}
# the companion metrics of each target type in the front matter: (metrics/eval.json key, model-index type, name)
COMPANIONS = {"category": [("f1_macro", "f1", "Test macro F1"), ("ece", "ece", "Test expected calibration error")],
              "number": [("mae", "mae", "Test mean absolute error"), ("rmse", "rmse", "Test RMSE")],
              "set": [("f1_macro", "f1", "Test macro F1"), ("map", "map", "Test mean average precision")]}


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


HEADLINE_NAMES = {"accuracy": "accuracy", "r2": "R²", "f1_micro": "micro-F1"}


def front_matter(name: str | None, target: dict, eval_metrics: dict, compress_metrics: dict, chosen: str,
                 modalities: list[str], model_params: dict, source: str | None) -> str:
    """MODEL_CARD.md's YAML front matter, for machines (model registries, Hugging Face Hub cards, search):
    the task, the test metrics in model-index form, the data source, each pretrained part and its licence."""
    import yaml

    t, h = eval_metrics["test"], eval_metrics.get("target", {}).get("headline", "accuracy")
    index_type = {"accuracy": "accuracy", "r2": "r_squared", "f1_micro": "f1"}.get(h, h)
    metrics = [{"type": index_type, "name": f"Test {HEADLINE_NAMES.get(h, h)} (fused, PyTorch fp32)", "value": round(t[h], 6)},
               {"type": index_type, "name": f"Test {HEADLINE_NAMES.get(h, h)} (shipped ONNX {chosen})",
                "value": round(compress_metrics["variants"][chosen][f"test_{h}"], 6)}]
    metrics += [{"type": kind, "name": label, "value": round(t[key], 6)} for key, kind, label in COMPANIONS[target["type"]]
                if t.get(key) is not None]
    parts = []
    for m in modalities:
        cfg = model_params.get("encoders", {}).get(m, {})
        if cfg.get("arch", "small_cnn") != "small_cnn":
            parts.append({"modality": m, "arch": cfg["arch"], "weights": cfg.get("weights"),
                          "license": cfg.get("license") or f"unknown (set model.encoders.{m}.license)"})
    dataset = source or "unknown"
    meta = {
        "model_name": name or "mmpipe fusion model",
        "library_name": "onnxruntime",
        "tags": ["mmpipe", "multimodal", "onnx", *modalities],
        "datasets": [dataset],
        "metrics": [metrics[0]["type"], *(kind for _, kind, _ in COMPANIONS[target["type"]])],
        "target": {"type": target["type"], "column": target.get("column", "label")},
        "inputs": modalities,
        "pretrained_parts": parts,  # their weights' licences apply to this model
        "model-index": [{"name": name or "mmpipe fusion model", "results": [{
            "task": {"type": TASK_TYPES[target["type"]], "name": f"{target['type']} from " + " + ".join(modalities)},
            "dataset": {"type": dataset, "name": dataset, "split": "test"},
            "metrics": metrics}]}],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=120) + "---\n"


def _what_it_does(target: dict, labels: list[str], modalities: list[str]) -> tuple[str, str]:
    """(the card's title phrase, the sentence saying what the model answers), by target type."""
    shown = ", ".join(labels[:20]) + (f", … ({len(labels) - 20} more)" if len(labels) > 20 else "")
    inputs = ", ".join(f"an {m}" if m[0] in "aeiou" else f"a {m}" for m in modalities)
    column, state = target.get("column", "label"), target.get("state", {})
    if target["type"] == "number":
        transform = " (trained on log1p of it)" if state.get("transform") == "log" else ""
        return ("regression model", f"Predicts the number `{column}`{transform} — answered as `{{\"value\": …}}` in "
                f"the training data's units (train range {state.get('train_min', 0):g} … {state.get('train_max', 0):g}) — "
                f"from any non-empty subset of: {inputs}.")
    if target["type"] == "set":
        return (f"{len(labels)}-tag multi-label model", f"Predicts which of {len(labels)} tags ({shown}) apply — "
                f"any number of them, none included; answered as `{{\"tags\": [...], \"scores\": {{...}}}}`, a tag given "
                f"when its probability reaches its threshold (tuned on the validation split) — from any non-empty "
                f"subset of: {inputs}.")
    return (f"{len(labels)}-class classifier",
            f"Classifies a sample into one of {len(labels)} classes ({shown}) from any non-empty subset of: {inputs}.")


def model_card(predictor, dataset: dict, eval_metrics: dict, compress_metrics: dict, chosen: str,
               modalities: list[str], name: str | None, model_params: dict, target: dict | None = None,
               source: str | None = None) -> str:
    """The bundle's MODEL_CARD.md: what this model predicts, from what, how well, and its limits —
    all read from this run's data (target, labels, modalities, clean's rules) and metrics."""
    t, v = eval_metrics["test"], compress_metrics["variants"]
    shipped, labels, rules = v[chosen], dataset["labels"], dataset["clean_rules"]
    target = target or {"type": "category", "column": "label"}
    h = eval_metrics.get("target", {}).get("headline", "accuracy")
    metric = HEADLINE_NAMES.get(h, h)
    show = (lambda x: f"{x:.4f}") if h == "r2" else (lambda x: f"{100 * x:.2f} %")
    pretrained = encoder_lines(model_params, modalities)
    example = {"file": "FILE", "string": '"…"', "record": "'{\"…\": …}'"}
    title, what = _what_it_does(target, labels, modalities)
    companions = {"category": f"Macro F1 {t.get('f1_macro', 0):.4f}; expected calibration error {t.get('ece', 0):.4f}.",
                  "number": f"MAE {t.get('mae', 0):.4g}, RMSE {t.get('rmse', 0):.4g}, median absolute percentage error "
                            + (f"{100 * t['median_ape']:.1f} %." if t.get("median_ape") is not None else "–."),
                  "set": f"Macro F1 {t.get('f1_macro', 0):.4f}, mean average precision {t.get('map') or 0:.4f}, subset "
                         f"accuracy {100 * t.get('subset_accuracy', 0):.1f} %, calibration error of the tag "
                         f"probabilities {t.get('ece', 0):.4f}."}[target["type"]]
    lines = [
        front_matter(name, target, eval_metrics, compress_metrics, chosen, modalities, model_params, source),
        f"# Model card: {name or 'mmpipe fusion model'} — {title} from " + " + ".join(modalities),
        "",
        "## What it does",
        what + " Missing modalities "
        "are allowed (the model was trained with random modality dropout and has a learned placeholder for each).",
        "",
        "## Data",
        f"{dataset['samples']:,} samples after cleaning (splits: "
        + ", ".join(f"{k} {n:,}" for k, n in dataset["splits"].items())
        + "). Splits are assigned by sample id; the test split was used only for the numbers below.",
        "",
        "## Quality (test split)",
        "",
        f"| model | {metric} |",
        "|---|---|",
        f"| fused, PyTorch fp32 (evaluate stage) | {show(t[h])} |",
        f"| shipped ONNX `{chosen}` (compress stage) | {show(shipped[f'test_{h}'])} |",
        *[f"| {m} only (baseline) | {show(b[h])} |" for m, b in eval_metrics["baselines"].items()],
        "",
        companions,
        "",
        f"With only some modalities ({metric}): " + ", ".join(f"{k} {show(x[h])}" for k, x in eval_metrics["missing"].items()) + ".",
        "",
        f"Relative robustness (area under {metric} vs noise level 0..1, one modality corrupted): "
        + ", ".join(f"{m} {r['relative']:.3f}" for m, r in eval_metrics["robustness"].items()) + ".",
        "",
        "## The shipped model",
        f"`model.onnx` is the `{chosen}` variant: {shipped['file_bytes'] / 1e6:.2f} MB, "
        f"{shipped['macs_per_sample'] / 1e6:.1f} M multiply-accumulates per sample, "
        f"batch-32 CPU latency p50 {shipped['latency_ms']['batch_32']['p50']:.2f} ms on the build machine "
        f"({compress_metrics['threads']} threads). `model_fp32.onnx` is the unpruned fp32 export "
        f"({v['fp32']['file_bytes'] / 1e6:.2f} MB); `model_fp16.onnx`, where present, the same in float16 for a GPU "
        f"(`predict.py --model fp16 --device cuda`).",
        *(["", "Pretrained encoders (their weights' licences apply to this model):", *pretrained] if pretrained else []),
        "",
        "## Inputs and limits",
        "The predictor checks every input under the rules the training data was cleaned with "
        "(`manifest.json` → `clean`) and answers an error for that input instead of a prediction:",
        *[f"- {m}: {MODALITIES[m].describe_rules(rules[m])}." for m in modalities],
        {"category": "- Only these classes can be predicted; ", "set": "- Only these tags can be predicted; ",
         "number": "- Values far outside the training range are extrapolations; "}[target["type"]]
        + "inputs unlike the training data (other languages, image styles, recording conditions) are outside what was "
        "measured.",
        "",
        *trust_lines(eval_metrics, predictor, target["type"], h),
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


def trust_lines(eval_metrics: dict, predictor, kind: str, h: str) -> list[str]:
    """"How far to trust it": calibrated confidence, the conformal sets per availability pattern, each modality's
    share (evaluate's figures on the test split), and what the guarantee assumes."""
    conformal, fitted = eval_metrics.get("conformal"), (predictor.calibration or {})
    if not conformal or not fitted:
        return ([] if kind == "number" else ["Probabilities are not calibrated.", ""])
    marginal, alpha = conformal["marginal"], fitted["alpha"]
    answer = {"category": "`prediction_set` (the classes that together hold the true class)",
              "number": "`interval` (low, high; null where unbounded)",
              "set": "`prediction_set` (tags that together hold every true tag)"}[kind]
    patterns = {p: r for p, r in conformal["patterns"].items() if not r.get("small")}
    worst = min(patterns, key=lambda p: patterns[p]["coverage"]) if patterns else None
    lines = ["## How far to trust it", ""]
    if fitted.get("temperature") and "ece_calibrated" in marginal:
        lines.append(f"- Confidence is temperature-scaled, per modality-availability pattern, on the validation split: "
                     f"expected calibration error on test {marginal['ece']:.3f} → {marginal['ece_calibrated']:.3f}. "
                     "The answers themselves are unchanged.")
    lines.append(f"- Every answer carries its conformal {answer} at `alpha` {alpha:g}: it holds the truth with "
                 f"probability ≥ {1 - alpha:.0%}, for each pattern of available modalities (`--alpha` "
                 + "/".join(fitted["thresholds"]) + f"). On test: coverage {marginal['coverage']:.3f}"
                 + (f", mean size {marginal['mean_size']:.3g}" if marginal.get("mean_size") is not None else "")
                 + (f"; the lowest pattern, {worst} only, {patterns[worst]['coverage']:.3f} of {patterns[worst]['rows']} rows"
                    if worst else "") + ".")
    shares = (eval_metrics.get("attribution") or {}).get(h, {}).get("share")
    if shares:
        lines.append(f"- What each modality contributes (share of the Shapley values of test {HEADLINE_NAMES.get(h, h)}): "
                     + ", ".join(f"{m} {x:.0%}" for m, x in shares.items()) + "; `predict.py --explain` gives a "
                     "sample's own.")
    lines.append("- These guarantees assume data like the validation split's; inputs that have drifted from it void them.")
    monitor = predictor.manifest.get("monitor")
    if monitor and monitor.get("threshold") is not None:
        lines.append(f"- `python predict.py --monitor window.csv` tells whether a window of rows has drifted from the "
                     f"training data and names the modality and the statistic (exit status 1): calibrated on "
                     f"{monitor['heldout_rows']:,} held-out rows for {monitor['window_rows']}-row windows, false alarms "
                     f"{monitor['false_alarm_measured']:.1%} on windows like the training data's (allowed "
                     f"{monitor['false_alarm']:.0%}).")
    return lines + [""]


def verification_lines(checks: dict) -> list[str]:
    """The card's last section: what the export stage measured of this very bundle."""
    int8 = checks["int8_vs_its_fp32_top1_agreement"]
    h = checks.get("headline", "accuracy")
    show = (lambda x: f"R² {x:.4f}") if h == "r2" else (lambda x: f"{100 * x:.2f} %")
    agreeing = {"accuracy": "top-1 agreement", "r2": "agreement (values within 5 % of the train standard deviation)",
                "f1_micro": "agreement (identical tag sets)"}.get(h, "agreement")
    return [
        "## Verification (export stage)",
        "",
        f"- fp32 ONNX vs PyTorch, {checks['parity_samples']} test samples: max |logit difference| "
        f"{checks['fp32_onnx_vs_pytorch_max_abs_logit_diff']:.2e}",
        f"- shipped vs unpruned fp32 {agreeing} (test): {100 * checks['shipped_vs_fp32_top1_agreement']:.2f} %"
        + (f"; int8 vs the fp32 model it was quantized from: {100 * int8:.2f} %" if int8 is not None else ""),
        (f"- fp16 (`model_fp16.onnx`, for a GPU) vs fp32 on the CPU provider (test): max |logit difference| "
         f"{checks['fp16_vs_fp32_max_abs_logit_diff']:.2e}, {agreeing} {100 * checks['fp16_vs_fp32_top1_agreement']:.2f} %"
         if checks.get("fp16_vs_fp32_top1_agreement") is not None
         else "- no fp16 model: the fp32 one did not convert (ONNX Runtime's float16 converter)"),
        f"- this predictor on the raw test files: {show(checks[f'predictor_raw_test_{h}'])} "
        f"(fp32 model: {show(checks[f'predictor_raw_test_{h}_fp32'])}; evaluate stage: "
        f"{show(checks[f'evaluate_test_{h}'])}); its answers and the pipeline's agree on "
        f"{100 * checks.get('predictor_vs_pipeline_agreement_fp32', 1.0):.2f} % of them (fp32)",
        *(f"- {m} as {variant}: this predictor and the pipeline agree on {100 * r['top1_agreement']:.2f} % of "
          f"{r['items']} test items" for m, variants in checks["conversion_parity"].items() for variant, r in variants.items()),
        *([f"- the shipped model's conformal sets at alpha {checks['alpha']:g}, from this predictor on the raw test files: "
           f"coverage {checks['predictor_raw_test_coverage']:.3f}; identical to the pipeline's on "
           f"{100 * checks['predictor_vs_pipeline_set_agreement']:.2f} % of rows"] if "alpha" in checks else []),
    ]
