"""`operator.memdebug`: the opt-in memory dump the scale bench reads."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from edgeslim.operator import memdebug


def test_dump_names_rss_the_heap_and_what_holds_it(tmp_path: Path) -> None:
    tracemalloc.start(memdebug.FRAMES)
    try:
        held = [{"metadata": {"name": f"m{i}"}} for i in range(2000)]
        memdebug.dump(tmp_path / "memory.txt")
    finally:
        tracemalloc.stop()
    text = (tmp_path / "memory.txt").read_text()
    for section in (
        "VmHWM:",
        "traced now",
        "== by line",
        "== modules by package",
        "== object types",
    ):
        assert section in text
    assert "test_memdebug.py" in text  # the 2,000 dicts above are among the top sites
    assert len(held) == 2000


def test_off_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(memdebug.ENV, raising=False)
    memdebug.install()
    assert not tracemalloc.is_tracing()
