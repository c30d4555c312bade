"""Where the project keeps what it can rebuild (class images, pretraining state): never inside the repo."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$FEWSHOT_CACHE``, else ``$XDG_CACHE_HOME/fewshot_personalize``, else ``~/.cache/fewshot_personalize``."""
    if os.environ.get("FEWSHOT_CACHE"):
        return Path(os.environ["FEWSHOT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fewshot_personalize"
