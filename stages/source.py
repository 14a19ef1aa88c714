"""source: fingerprint ``data.source`` into data/source.json.

Runs on every ``dvc repro`` (always_changed) and takes a moment; ``collect`` depends on its
output, so collect re-runs exactly when the user's manifest or files changed.
"""

from mmpipe import layout, params
from mmpipe.data.source import fingerprint
from mmpipe.io import write_json_atomic
from mmpipe.stage import run_stage

OUT = layout.SOURCE


def main() -> None:
    data = params.load("data")
    write_json_atomic(OUT, fingerprint(data))


if __name__ == "__main__":
    run_stage(main)
