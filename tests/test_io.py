"""Atomic outputs and what killed writers leave: temporaries named by pid *and* start time (pids are
reused: containers, CI), the scratch folder that holds a stage's temporary files beside its output,
and DVCLive's files published one atomic rename each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mmpipe.io import owner_tag, remove_stale_temporaries, scratch

ROOT = Path(__file__).resolve().parents[1]


def test_leftovers_of_a_dead_or_reused_pid_are_removed_a_live_writer_s_kept(tmp_path):
    final = tmp_path / "out"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    me = os.getpid()
    names = {"reused": f".out.tmp-{me}@1-abc",  # this pid, but another process's start time: a killed run's
             "dead": f".out.tmp-{dead}@5-abc", "dead_old_format": f".out.tmp-{dead}-abc",
             "old_rename": f".out.old-{dead}@5", "live": f".out.tmp-{owner_tag()}-abc", "other": ".out.keep"}
    for name in names.values():
        (tmp_path / name).mkdir()
    removed = {p.name for p in remove_stale_temporaries(final)}
    assert removed == {names[k] for k in ("reused", "dead", "dead_old_format", "old_rename")}
    assert (tmp_path / names["live"]).exists() and (tmp_path / names["other"]).exists()


def test_scratch_holds_the_process_s_temporary_files_beside_the_output_even_after_kill_9(tmp_path):
    final = tmp_path / "compressed"
    with scratch(final) as folder:
        assert Path(tempfile.gettempdir()) == folder and folder.parent == tmp_path
        with tempfile.TemporaryDirectory() as inner:  # as ONNX Runtime's quantizer makes them
            assert Path(inner).parent == folder
    assert not folder.exists() and Path(tempfile.gettempdir()) != folder
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, tempfile, sys\nfrom mmpipe.io import scratch\n"
        f"with scratch({str(final)!r}):\n    open(tempfile.mkstemp()[1], 'w').write('x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")], cwd=ROOT, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and any(left[0].iterdir())  # nothing of it in the system's temporary folder
    with scratch(final):  # the next run removes it
        assert not left[0].exists()


def test_curves_publish_dvclive_files_whole_and_clear_a_killed_run_s(tmp_path, monkeypatch):
    import json

    from mmpipe import tracking

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "dvclive" / "train"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    half = folder / f".metrics.json.tmp-{dead.stdout.strip()}@1-x"
    half.write_text('{"fusion": {"val_acc')  # what a kill -9 mid-copy leaves
    (tmp_path / "dvclive" / f".train.tmp-{dead.stdout.strip()}@1-live-x").mkdir()  # a killed run's private folder

    class Run:
        def log_metrics(self, metrics, step=None):
            pass

    with tracking.curves(Run(), folder) as curves:
        assert not half.exists() and [p.name for p in (tmp_path / "dvclive").iterdir() if "live" in p.name] == \
            [curves.private.name]
        for epoch in range(3):
            curves.log("fusion", epoch, {"epoch": epoch, "val_accuracy": 0.5 + epoch / 10})
            assert json.loads((folder / "metrics.json").read_text())["fusion"]["val_accuracy"] == 0.5 + epoch / 10
        rows = (folder / "plots/metrics/fusion/val_accuracy.tsv").read_text().splitlines()
        assert rows[0] == "step\tval_accuracy" and len(rows) == 4
    assert not curves.private.exists()
    assert sorted(p.name for p in (tmp_path / "dvclive").iterdir()) == ["train"]
