"""Gradient checkpointing (``model.encoders.<m>.checkpointing``): memory kept for backward vs step time.

For each backbone (as bench.backbones builds it, fine-tuning every block) one AdamW step is measured
with checkpointing off and on: the bytes autograd keeps for the backward pass (counted with
``torch.autograd.graph.saved_tensors_hooks``: what activation memory a GPU would hold, measured on
any device) and training samples/s on this CPU.

    python -m bench.checkpointing --archs text:bert_base audio:wav2vec2_base --batch 8

Writes reports/checkpointing.json and prints a table. Times hold for this machine only.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from bench.backbones import batch_of, build, family, samples_per_s
from mmpipe.io import write_json_atomic
from mmpipe.training.model_io import to_model_inputs

REPORT = Path("reports/checkpointing.json")


def step_figures(spec: tuple, checkpointing: bool, batch: dict, repeats: int) -> dict:
    modality, state, encoder, _ = spec
    torch.manual_seed(0)
    model = build(modality, state, encoder, "none", checkpointing=checkpointing).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    saved: list[int] = []

    def step(count: bool = False) -> None:
        pack = (lambda t: saved.append(t.numel() * t.element_size()) or t) if count else (lambda t: t)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(batch), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step(count=True)
    return {"saved_for_backward_mb": round(sum(saved) / 2**20, 1),
            "train_samples_per_s": round(samples_per_s(step, len(batch["label"]), repeats), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["text:bert_base", "audio:wav2vec2_base"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, cpu", "archs": {}}
    for name in args.archs:
        spec = family(name, args.size, args.seconds, args.tokens)
        batch = to_model_inputs(batch_of(spec[0], spec[3], args.batch), [spec[0]], torch.device("cpu"))
        off, on = (step_figures(spec, c, batch, args.repeats) for c in (False, True))
        row = {"batch": args.batch, "off": off, "on": on,
               "memory_ratio": round(off["saved_for_backward_mb"] / on["saved_for_backward_mb"], 2),
               "time_ratio": round(off["train_samples_per_s"] / on["train_samples_per_s"], 2)}
        report["archs"][name] = row
        print(f"{name:22s} batch {args.batch}: kept for backward {off['saved_for_backward_mb']:.0f} -> "
              f"{on['saved_for_backward_mb']:.0f} MB ({row['memory_ratio']:.1f}x less), step "
              f"{off['train_samples_per_s']:.2f} -> {on['train_samples_per_s']:.2f} samples/s "
              f"({row['time_ratio']:.2f}x the time)", flush=True)
        write_json_atomic(REPORT, report)


if __name__ == "__main__":
    main()
