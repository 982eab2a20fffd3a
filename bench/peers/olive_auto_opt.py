"""Olive's `auto-opt` on the ONNX file (CPU, int8). auto-opt takes no accuracy
criterion and reads evaluation / calibration data only from the Hugging Face hub
(`--data_name`), which this machine cannot reach, so it runs without data: it
picks its passes (peephole, transformer fusion, dynamic int8) and the bench then
measures the drop of what it wrote against the same gate as everyone else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import args, report


def main() -> None:
    a = args()
    started = time.perf_counter()
    out = a.work / "olive-out"
    olive = Path(sys.executable).parent / "olive"
    cmd = [str(olive), "auto-opt", "-m", str(a.model), "--device", "cpu"]
    cmd += ["--provider", "CPUExecutionProvider", "--precision", "int8"]
    cmd += ["-o", str(out), "--disable_telemetry", "--log_level", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stdout + proc.stderr)
    models = sorted(out.rglob("*.onnx")) if out.exists() else []
    if proc.returncode != 0 or not models:
        lines = [x for x in (proc.stderr or proc.stdout).splitlines() if x.strip()]
        report(started, failed=(lines[-1] if lines else f"exit {proc.returncode}")[:160])
        sys.exit(1)
    shutil.copy(models[0], a.out)
    for extra in models[0].parent.iterdir():  # external data files, if any
        if extra.suffix != ".onnx" and extra.is_file() and extra.name != "model_config.json":
            shutil.copy(extra, a.out.parent / extra.name)
    report(started, note="no accuracy criterion in auto-opt; dynamic int8 without data")


if __name__ == "__main__":
    main()
