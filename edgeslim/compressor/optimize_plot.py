"""pareto.png and pareto.svg of an optimize search: download size against metric drop.

matplotlib is the optional extra `plot`; without it the search's result is
complete all the same and the caller says that the picture was skipped.
"""

from __future__ import annotations

import io

from edgeslim import storage
from edgeslim.api.result import CompressionResult, pareto_front

PNG, SVG = "pareto.png", "pareto.svg"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render(result: CompressionResult, fmt: str) -> bytes:
    """The picture as PNG or SVG bytes (the Figure API, no pyplot: no GUI, no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.add_subplot()
    measured = [c for c in result.candidates if c.drop is not None and c.gzip_size_bytes]
    for passed, colour, label in ((True, "tab:green", "passed"), (False, "tab:red", "failed")):
        group = [c for c in measured if c.passed is passed]
        ax.scatter(
            [c.gzip_size_bytes / 1e3 for c in group],
            [c.drop for c in group],
            c=colour,
            alpha=0.7,
            label=f"{label} ({len(group)})",
        )
    front = pareto_front(measured, top=len(measured))
    if front:
        ax.plot(
            [p.gzip_size_bytes / 1e3 for p in front],
            [p.drop for p in front],
            color="tab:blue",
            linewidth=1,
            drawstyle="steps-post",
            label="Pareto front",
        )
    limit = result.gate.max_metric_drop
    ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"gate {limit:g}")
    ax.axvline(
        result.source.gzip_size_bytes / 1e3,
        color="grey",
        linestyle=":",
        linewidth=1,
        label="source",
    )
    chosen = next((c for c in measured if c.index == result.chosen), None)
    if chosen is not None:
        x, y = chosen.gzip_size_bytes / 1e3, chosen.drop
        ax.scatter([x], [y], s=160, facecolors="none", edgecolors="black", linewidths=1.5)
        verdict = "chosen" if result.gate.passed else "closest (rejected)"
        ax.annotate(
            f"{verdict}: {chosen.name}\n{result.download_ratio:.1f}x smaller, drop {y:+.4f}",
            (x, y),
            xytext=(12, 12),
            textcoords="offset points",
            fontsize=8,
            arrowprops={"arrowstyle": "-", "color": "black", "linewidth": 0.8},
        )
    sizes = [c.gzip_size_bytes for c in measured] + [result.source.gzip_size_bytes]
    if max(sizes) > 30 * min(sizes):
        # Pruned candidates can be 100x smaller than the formats: on a linear axis
        # they would all sit on the y axis.
        ax.set_xscale("log")
    ax.set_xlabel("download size (gzip, kB)")
    ax.set_ylabel(f"{result.evaluation.metric} drop (lower is better)")
    ax.set_title(f"{result.name}: {len(result.candidates)} candidates", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def write(result: CompressionResult, manifest_uri: str) -> list[str]:
    """Writes both pictures beside the manifest; returns their URIs ([] without matplotlib)."""
    if not available() or not result.candidates:
        return []
    base = manifest_uri.rsplit("/", 1)[0]
    written = []
    for name, fmt, kind in ((PNG, "png", "image/png"), (SVG, "svg", "image/svg+xml")):
        written.append(storage.put_bytes(render(result, fmt), storage.join(base, name), kind))
    return written
