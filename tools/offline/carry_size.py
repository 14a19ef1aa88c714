"""Whether the working tree and a wheelhouse fit what can be copied to a lent GPU machine (64 MiB in all).

    python tools/offline/carry_size.py .whl [--limit-mib 64]

Counts the files git tracks (as they are on disk) and every file under the wheelhouse folder; prints one line
with the three sizes and exits 1 when their sum is over the limit (``make wheelhouse`` runs it after building).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MIB = 2**20


def tracked_bytes(root: Path) -> int:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout.decode()
    return sum((root / rel).stat().st_size for rel in filter(None, listed.split("\0")) if (root / rel).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheelhouse", type=Path)
    parser.add_argument("--limit-mib", type=float, default=64.0)
    parser.add_argument("--root", type=Path, default=Path("."), help="the checkout (default: here)")
    args = parser.parse_args(argv)
    if not args.wheelhouse.is_dir():
        print(f"{args.wheelhouse}: no such folder (run make wheelhouse)")
        return 1
    tree, wheels = tracked_bytes(args.root), folder_bytes(args.wheelhouse)
    total = (tree + wheels) / MIB
    verdict = "fits" if total <= args.limit_mib else "over the limit: leave out wheels the GPU image already has"
    print(f"working tree {tree / MIB:.1f} MiB + {args.wheelhouse} {wheels / MIB:.1f} MiB = {total:.1f} MiB "
          f"(limit {args.limit_mib:g} MiB): {verdict}")
    return 0 if total <= args.limit_mib else 1


if __name__ == "__main__":
    sys.exit(main())
