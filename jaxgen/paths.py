"""Where jaxgen keeps what it builds between starts (compiled programs, native kernels)."""
from __future__ import annotations

import os


def cache_root() -> str:
    """$JAXGEN_CACHE_DIR, else ~/.cache/jaxgen."""
    return os.environ.get("JAXGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxgen")
