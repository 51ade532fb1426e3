"""Where a path lives. Public surface: `is_remote(path)`."""
from __future__ import annotations

from typing import Any


def is_remote(path: Any) -> bool:
    """True for a path with a URI scheme (gs://bucket/x, s3://...): read through etils.epath, not plain open."""
    return isinstance(path, str) and "://" in path
