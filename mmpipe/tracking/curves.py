"""Per-step curves of a stage: MLflow step metrics and DVCLive files, from one call site."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mmpipe.io import flatten, owner_tag, remove_stale_temporaries, remove_stale_temporaries_in, write_bytes_atomic

_METRIC_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_name(key: str) -> str:
    """``key`` as MLflow accepts a metric name (recall@5 -> recall_5)."""
    return _METRIC_KEY.sub("_", key)


def numeric_leaves(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of a nested metrics dict, with keys MLflow accepts."""
    out = {}
    for key, value in flatten(metrics).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[metric_name(key)] = float(value)
    return out


class Curves:
    """Per-step curves of a stage, fed from one call site to both trackers: MLflow step metrics
    (``<group>/<key>``, the run's charts) and DVCLive's files in ``folder`` (``metrics.json`` with the
    latest values, ``plots/metrics/<group>/<key>.tsv``), published after every step, so ``dvc exp show``,
    ``dvc plots show`` and DVC's VS Code extension follow a run while it trains. dvc.yaml declares the
    files (``dvcyaml=False``: DVCLive does not write its own). Outside a DVC repository only MLflow gets
    them: DVCLive would otherwise ``dvc init`` the enclosing git repository.

    DVCLive writes its files in place (a stage killed mid-write leaves a truncated metrics.json that
    ``dvc metrics show`` cannot read): it writes into a private folder beside ``folder`` instead, and
    each step's files are copied into ``folder`` one atomic rename each. What a killed run left (the
    private folder, a half-copied file) is removed by the next one."""

    def __init__(self, run: Any, folder: str | os.PathLike):
        self.run, self.live, self.folder = run, None, Path(folder)
        if any((p / ".dvc").is_dir() for p in (Path.cwd(), *Path.cwd().parents)):
            logging.getLogger("dvclive").setLevel(logging.WARNING)
            from dvclive import Live

            remove_stale_temporaries(self.folder)  # private folders of killed runs
            remove_stale_temporaries_in(self.folder)  # half-copied files of killed runs
            shutil.rmtree(self.folder, ignore_errors=True)  # a new run's curves (DVCLive's resume=False)
            self.private = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.tmp-{owner_tag()}-live-",
                                                 dir=self.folder.parent))
            self.live = Live(dir=str(self.private), dvcyaml=False, save_dvc_exp=False, report=None)

    def log(self, group: str, step: int, row: dict[str, Any]) -> None:
        # <group>/<key>, as DVCLive names them: apart from the stage's final figures (<group>.<key>, e.g.
        # the best epoch's fusion.val_accuracy), which MLflow would otherwise show as the last epoch's
        curves = {f"{group}/{k}": v for k, v in numeric_leaves(row).items() if k not in ("epoch", "step")}
        self.run.log_metrics(curves, step=step)
        if self.live is not None:
            self.live.step = step
            for key, value in curves.items():
                self.live.log_metric(key, value)
            self.live.next_step()  # writes metrics.json and the .tsv rows (privately)
            self._publish()

    def _publish(self) -> None:
        for path in sorted(p for p in self.private.rglob("*") if p.is_file()):
            write_bytes_atomic(self.folder / path.relative_to(self.private), path.read_bytes())

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
            self._publish()
            shutil.rmtree(self.private, ignore_errors=True)


@contextlib.contextmanager
def curves(run: Any, folder: str | os.PathLike) -> Iterator[Curves]:
    live = Curves(run, folder)
    try:
        yield live
    finally:
        live.close()
