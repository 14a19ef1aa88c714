"""Tracking calls that survive a flaky server: retried with backoff, then one line.

Apart from the runs (``tracking``) so that lineage and curves, which the runs module imports, can use them.
"""

from __future__ import annotations

import sys
import time

from mmpipe.errors import PipelineError, redact

RETRIES, BACKOFF_S = 3, 1.0  # our own retries, on top of MLflow's HTTP ones: also for SQLite "database is locked"


def retrying(what: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, retried with exponential backoff; then one PipelineError line (redacted)."""
    for attempt in range(RETRIES + 1):
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # MLflow, HTTP and SQLAlchemy errors alike
            if attempt == RETRIES:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise PipelineError(f"MLflow: could not {what} after {RETRIES + 1} attempts: {redact(first)}") from None
            time.sleep(BACKOFF_S * 2 ** attempt)


def best_effort(what: str, call, *args, **kwargs) -> None:
    """``retrying``, then one warning line on stderr instead of an error: for tracking calls in a
    stage's failure path, where the stage's own error must stay the one line the user sees."""
    try:
        retrying(what, call, *args, **kwargs)
    except PipelineError as exc:
        print(f"warning: {exc}", file=sys.stderr)
