"""The optional dependencies (pyproject.toml's extras): import one where a run needs it, or stop with
one line naming the extra to install, instead of a ModuleNotFoundError deep in a stage."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from mmpipe.errors import PipelineError

# module -> the extra of pyproject.toml that installs it
EXTRA_OF = {"transformers": "text", "tokenizers": "text", "optuna": "tune", "librosa": "dev"}


def require(module: str, needed_for: str) -> ModuleType:
    """``import module``, or a PipelineError: "<needed_for> needs <package>: pip install -e '.[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but broken (one of its own imports failed): show that as it is
        extra = EXTRA_OF.get(top, "dev")
        raise PipelineError(f"{needed_for} needs the optional package {top!r}, not installed: "
                            f"pip install -e '.[{extra}]' -c constraints.txt") from None


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None
