"""The CLI as a user runs it: `edgeslim compress` in a subprocess of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def compress(
    spec: Path, *, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`edgeslim compress SPEC --quiet`, with `env` added to this environment and one
    torch thread (the test machine's cores are shared).

    It runs in an empty working directory that must still be empty afterwards:
    a compression writes only to its scratch folder and its output."""
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [sys.executable, "-m", "edgeslim.cli", "compress", str(spec.resolve()), "--quiet"],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            timeout=timeout,
            cwd=cwd,
        )
        left = sorted(os.listdir(cwd))
    assert not left, f"edgeslim compress wrote {left} into its working directory"
    return proc
