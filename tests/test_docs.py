"""The repository stands alone: nothing in it points outside it, and every citation of docs/MATH.md in the
code names a section that exists there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ".." + "/shared"  # spelled in two parts so that this file does not match itself


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


def test_nothing_refers_outside_the_repository():
    bad = []
    for path in _tracked():
        if path.suffix not in {".py", ".md", ".sh", ".toml", ".txt", ".json", ".cfg", ".yml", ".yaml", ""}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        if OUTSIDE in text:
            bad.append(str(path.relative_to(ROOT)))
    assert bad == []


def _headings() -> list[str]:
    text = (ROOT / "docs" / "MATH.md").read_text(encoding="utf-8")
    return [m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", text, flags=re.M)]


def test_every_math_citation_names_a_section():
    headings = [re.sub(r"^\d+\.\s*", "", h) for h in _headings()]
    cited: dict[str, set[str]] = {}
    for path in _tracked():
        if path.suffix != ".py":
            continue
        text = " ".join(path.read_text(encoding="utf-8").split())
        for m in re.finditer(r'MATH\.md[,:]?\s+\(?"([^"]+)"', text):
            cited.setdefault(m.group(1), set()).add(str(path.relative_to(ROOT)))
    assert len(cited) > 10  # the checker sees the citations
    missing = {c: sorted(files) for c, files in cited.items() if not any(h.startswith(c) for h in headings)}
    assert missing == {}
