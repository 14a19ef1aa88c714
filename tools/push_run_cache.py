"""Push DVC's run-cache *with every output it refers to* (``make push``).

`dvc push --run-cache` (DVC 3.x) uploads the run-cache entries but only the data of the outputs
in the current dvc.lock, and never the data of `cache: false` outputs (our metrics and plot
files), which the run-cache stores locally. A clone that pulls the run-cache then cannot restore
those stages ("Some of the cache files do not exist neither locally nor on remote") and recomputes
them. This pushes the objects of every local run-cache entry first, then runs the normal push.

    python tools/push_run_cache.py [-r REMOTE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dvc.repo import Repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--remote", default=None, help="DVC remote (default: the core.remote)")
    args = parser.parse_args()
    with Repo() as repo:
        runs = Path(repo.stage_cache.cache_dir)
        entries = [(entry.parent.name, entry.name) for entry in sorted(runs.glob("*/*/*")) if entry.is_file()]
        objects = set()
        for objs in repo.stage_cache.get_used_objs(entries).values():
            objects |= objs
        result = repo.cloud.push(objects, remote=args.remote)
        if result.failed:
            raise SystemExit(f"error: {len(result.failed)} run-cache objects could not be pushed")
        pushed = repo.push(remote=args.remote, run_cache=True)
    print(f"run-cache: {len(entries)} entries, {len(result.transferred)} of their objects uploaded; "
          f"dvc push --run-cache: {pushed} files")


if __name__ == "__main__":
    main()
