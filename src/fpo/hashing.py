"""Content hashes shared by the data module (example ids) and the reference cache."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def hash_json(obj: Any) -> str:
    """sha256 hex digest of ``obj`` as canonical JSON (sorted keys, no whitespace).

    Objects JSON cannot encode (paths, numpy scalars) are encoded via ``str``.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
