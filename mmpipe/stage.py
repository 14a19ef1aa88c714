"""Entry-point wrapper for stage scripts: user errors become one line on stderr and exit code 2
(credentials redacted)."""

from __future__ import annotations

import sys
from typing import Callable

from mmpipe.errors import PipelineError, redact


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except PipelineError as exc:
        for line in str(exc).splitlines():
            print(f"error: {redact(line)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
