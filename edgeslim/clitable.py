"""Terminal output of the CLI: rich progress bars while compressing, then the result tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeslim.api.result import ModelFigures

console = Console()
if not console.is_terminal:  # logs and CI: don't squeeze the tables into 80 columns
    console.width = 120


class _Task:
    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self.progress, self.task_id = progress, task_id

    def advance(self, amount: float = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task_id, amount)

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, status=text)


class RichProgress:
    """steps.Progress implemented with rich bars (or silence with quiet=True)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=quiet,
            transient=False,
        )

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.progress.stop()

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_Task]:
        task_id = self.progress.add_task(description, total=total, status="")
        try:
            yield _Task(self.progress, task_id)
        finally:
            self.progress.update(
                task_id,
                completed=total if total is not None else 1,
                total=total if total is not None else 1,
            )

    def log(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.log(message)


class _LineTask:
    def __init__(self, description: str, total: float | None) -> None:
        self.description, self.total, self.done, self.shown, self.status = (
            description,
            total,
            0.0,
            -1,
            "",
        )

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        if self.total:
            tenth = int(10 * self.done / self.total)
            if tenth > self.shown:
                self.shown = tenth
                console.print(
                    f"{self.description}: {10 * tenth}% {self.status}".rstrip(), highlight=False
                )

    def note(self, text: str) -> None:
        self.status = text


class LineProgress:
    """steps.Progress as plain log lines every 10%: for pod logs and CI, where bars garble."""

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_LineTask]:
        yield _LineTask(description, total)

    def log(self, message: str) -> None:
        console.print(message, highlight=False)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_result(outcome) -> None:
    r = outcome.result
    steps = Table(title="Pipeline steps", title_justify="left")
    for col in ("step", "params", "size", "gzip", "sparsity", "seconds"):
        steps.add_column(col, justify="left" if col == "step" else "right")
    for s in r.steps:
        flag = "" if s.changed else " [yellow](no change)[/]"
        flag += " [red](grew)[/]" if s.grew else ""
        steps.add_row(
            s.type + flag,
            f"{s.before.parameters:,} → {s.after.parameters:,}",
            f"{_mb(s.before.size_bytes)} → {_mb(s.after.size_bytes)}",
            f"{_mb(s.before.gzip_size_bytes)} → {_mb(s.after.gzip_size_bytes)}",
            f"{s.after.sparsity:.1%}",
            f"{s.seconds:.1f}",
        )
    console.print(steps)
    for i, s in enumerate(r.steps):
        for note in s.notes:
            console.print(f"  {i + 1}. {s.type}: {note}", highlight=False)

    table = Table(title=f"{r.name}: source vs compressed", title_justify="left")
    for col in ("", "source", "compressed", "change"):
        table.add_column(col, justify="left" if not col else "right")
    src, art = r.source, r.artifact

    def row(label: str, a: ModelFigures | float, b: float, fmt, change: str) -> None:
        table.add_row(label, fmt(a), fmt(b), change)

    row("file size", src.size_bytes, art.size_bytes, _mb, f"{r.compression_ratio:.2f}x smaller")
    row(
        "download (gzip)",
        src.gzip_size_bytes,
        art.gzip_size_bytes,
        _mb,
        f"{r.download_ratio:.2f}x smaller",
    )
    row(
        "parameters",
        src.parameters,
        art.parameters,
        lambda v: f"{v:,}",
        _ratio(src.parameters, art.parameters) + " fewer",
    )
    row("sparsity", src.sparsity, art.sparsity, lambda v: f"{v:.1%}", "")
    ev = r.evaluation
    row(
        f"{ev.metric} ({ev.samples} samples)",
        ev.baseline,
        ev.compressed,
        lambda v: f"{v:.4f}",
        f"drop {ev.drop:+.4f}",
    )
    lat = r.latency
    slow = " [red]SLOWER than source[/]" if lat.slower else ""
    row(
        "latency p50 (batch 1)",
        lat.source_p50_ms,
        lat.compressed_p50_ms,
        lambda v: f"{v:.3f} ms",
        f"{lat.speedup:.2f}x faster{slow}",
    )
    row(
        "latency p95 (batch 1)",
        lat.source_p95_ms,
        lat.compressed_p95_ms,
        lambda v: f"{v:.3f} ms",
        "",
    )
    mem = r.memory
    row(
        "peak RSS",
        mem.source_peak_rss_bytes,
        mem.compressed_peak_rss_bytes,
        _mb,
        _ratio(mem.source_peak_rss_bytes, mem.compressed_peak_rss_bytes) + " smaller",
    )
    console.print(table)
    if r.candidates:
        print_candidates(r)
    verdict = "[green]PASSED[/]" if r.gate.passed else "[red]REJECTED[/]"
    console.print(f"gate {verdict}: {r.gate.reason}")
    console.print(f"artifact {outcome.model_uri}  sha256 {art.sha256}")
    console.print(f"manifest {outcome.manifest_uri}")


def print_candidates(r) -> None:
    """The optimize search: every candidate measured, the chosen one marked."""
    search = r.search
    title = f"Candidates ({len(r.candidates)} tried"
    if search is not None:
        title += f", objective {search.objective}, {search.seconds:.0f} s"
        title += f", stopped by {search.stopped_by}" if search.stopped_by else ""
    table = Table(title=title + ")", title_justify="left")
    for col in ("#", "candidate", "gzip", "ratio", "metric", "drop", "p50", "verdict"):
        table.add_column(col, justify="left" if col in ("candidate", "verdict") else "right")
    for c in r.candidates:
        chosen = c.index == r.chosen
        measured = c.drop is not None
        verdict = "[green]passed[/]" if c.passed else f"[red]{c.reason or 'failed'}[/]"
        table.add_row(
            f"{c.index}{' *' if chosen else ''}",
            f"[bold]{c.name}[/]" if chosen else c.name,
            _mb(c.gzip_size_bytes) if measured else "-",
            _ratio(r.source.gzip_size_bytes, c.gzip_size_bytes) if measured else "-",
            f"{c.metric:.4f}" if c.metric is not None else "-",
            f"{c.drop:+.4f}" if measured else "-",
            f"{c.latency_p50_ms:.3f} ms" if c.latency_p50_ms is not None else "-",
            verdict,
        )
    console.print(table)
    if search is not None and search.sensitive_nodes:
        shown = ", ".join(search.sensitive_nodes[:8])
        more = (
            f" and {len(search.sensitive_nodes) - 8} more"
            if len(search.sensitive_nodes) > 8
            else ""
        )
        console.print(
            f"kept in float (most sensitive to quantization): {shown}{more}", highlight=False
        )
