"""The environment a benchmark ran in, written beside its results (versions, threads, CPU model)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int, **extra: Any) -> dict[str, Any]:
    """torch / transformers / datasets / Python versions, threads, CPU model and count, plus ``extra``."""
    import datasets
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        **extra,
    }
