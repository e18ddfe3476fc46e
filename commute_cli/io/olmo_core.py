"""OLMo-core checkpoints (placeholder until its layout is pinned)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

KIND = "OLMo-core"


def detect(folder: Path) -> Any:
    del folder
    return None
