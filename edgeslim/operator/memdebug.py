"""Where the operator's memory goes: an opt-in dump for the scale bench.

With EDGESLIM_MEMORY_DEBUG=<folder> the operator starts tracemalloc at launch
and, on SIGUSR1, writes `<folder>/memory-<n>.txt`: RSS and peak, what Python
itself holds (traced), the top allocation sites, the most numerous object
types and the thread count. Off by default: tracemalloc slows every
allocation and holds a frame per live block. `memory-peak.txt` is rewritten
whenever Python's heap grows 10% past its last dump (the heap at its highest).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

ENV = "EDGESLIM_MEMORY_DEBUG"
FRAMES = 8


def install() -> None:
    """Start tracing and dump on SIGUSR1 when EDGESLIM_MEMORY_DEBUG names a folder."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    tracemalloc.start(FRAMES)
    Path(folder).mkdir(parents=True, exist_ok=True)
    seq = iter(range(1_000_000))

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        dump(Path(folder) / f"memory-{next(seq)}.txt")

    signal.signal(signal.SIGUSR1, on_signal)
    peak = Path(folder) / "memory-peak.txt"
    threading.Thread(target=_watch_peak, args=(peak,), daemon=True).start()


def _watch_peak(path: Path) -> None:
    """Dumps (overwriting) each time Python's heap is 10% above its last dump: the
    last file shows what the heap held at its highest."""
    dumped = 0
    while True:
        time.sleep(2)
        current, _ = tracemalloc.get_traced_memory()
        if current > dumped * 1.1 and current > 8 * 2**20:
            dump(path)
            dumped = current


def _proc_status() -> str:
    lines = Path("/proc/self/status").read_text().splitlines()
    return "\n".join(ln for ln in lines if ln.startswith(("VmRSS", "VmHWM", "Threads")))


def dump(path: Path) -> None:
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    current, peak = tracemalloc.get_traced_memory()
    out = [_proc_status(), f"traced now {current / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB"]
    out.append(f"threads {threading.active_count()}, modules {len(sys.modules)}")
    out.append("\n== by file")
    for stat in snap.statistics("filename")[:25]:
        out.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d}  {stat.traceback[0].filename}")
    out.append("\n== by line")
    for stat in snap.statistics("lineno")[:40]:
        frame = stat.traceback[0]
        out.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d}  {frame.filename}:{frame.lineno}")
    out.append("\n== by traceback (top 12)")
    for stat in snap.statistics("traceback")[:12]:
        out.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d}")
        out.extend(f"      {f.filename}:{f.lineno}" for f in stat.traceback)
    out.append("\n== modules by package")
    packages = Counter(m.partition(".")[0] for m in sys.modules)
    out.extend(f"{n:9d}  {p}" for p, n in packages.most_common(30))
    out.append("\n== object types")
    counts = Counter(type(o).__qualname__ for o in gc.get_objects())
    out.extend(f"{n:9d}  {t}" for t, n in counts.most_common(40))
    path.write_text("\n".join(out) + "\n")
