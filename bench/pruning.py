"""Structured pruning benchmark (issue 9): edgeslim's dependency groups on the ONNX
graph versus Torch-Pruning's DepGraph on the same torch module.

    python bench/pruning.py [--quick] [--arch resnet18 ...] [--sparsity 0.3 0.5 0.7]
                            [--epochs N] [--lr LR] [--criterion l1|l2|activation|taylor|fpgm]
                            [--seeds N] [--no-batch-norm] [--no-compensate-bias]

Each architecture of `bench/archs.py` is trained briefly from scratch and exported
to ONNX (the source). At every sparsity:

- edgeslim: the real pipeline (`compress`) on the source ONNX with
  `prune: {method: structured, sparsity: s, criterion}` (l1 unless --criterion)
  then `distill` on the training split (which holds out 20% of it to pick the best
  epoch; `batchNorm` on unless --no-batch-norm);
- Torch-Pruning: `MetaPruner` with `MagnitudeImportance(p=1)` (L1, edgeslim's default
  criterion too), `pruning_ratio=s`, the final layer ignored (BERT: heads pruned whole
  with `num_heads`), then the same distillation budget in plain torch (epochs,
  samples, batch, learning rate, temperature, alpha; cosine schedule, train mode)
  and exported the same way as the source.

Both results are measured the same way from their ONNX files: conv/linear layers
whose weights changed shape (on either side) and whose outputs were cut, of all of
them (the final layer's outputs are never cut); parameters; file and gzip (download)
size; batch-1 latency p50 in onnxruntime on one thread; the metric on the held-out
split after pruning and after distillation (accuracy, or IoU of the detector's map).

With `--seeds N` both tools distill N times (seeds 0..N-1; the pruning itself is
deterministic) and the table gives the mean and the spread (max - min): a pruned
mobilenet_v3_small at 0.7 ends anywhere from 93.5 to 98.0 by seed alone, so one
run per row cannot say which tool is better.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import archs  # bench/archs.py: the script's folder is first on sys.path
import numpy as np
import onnx
import torch
from torch.nn import functional as F

from edgeslim.api.spec import CompressedModel, DistillConfig, PruneConfig
from edgeslim.compressor import datasets, evaluate, graph
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.pipeline import compress
from edgeslim.compressor.prune import Prune
from edgeslim.compressor.steps import StepContext

# arch -> teacher training epochs (enough for a usable source on two cores)
ARCHS = {
    "mobilenet_v3_small": 12,
    "resnet18": 6,
    "bert": 8,
    "detector": 8,
    "shufflenet_v2_x0_5": 30,
}
CNNS = ("mobilenet_v3_small", "resnet18", "shufflenet_v2_x0_5")
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
LATENCY_RUNS = 200


@dataclass
class Result:
    layers: tuple[int, int, int]
    """(layers pruned on any side, layers whose outputs were cut, all conv/linear layers)"""
    params: int
    size: int
    gzip: int
    p50: float
    pruned: float | None
    metric: float
    seconds: float = 0.0
    spread: float = 0.0
    """max - min of the metric over the seeds (0 for one)."""


def over_seeds(runs: list[Result]) -> Result:
    """One row for several distillations of the same pruned model: the mean metric."""
    metrics = [r.metric for r in runs]
    return dataclasses.replace(
        runs[0],
        metric=sum(metrics) / len(metrics),
        spread=max(metrics) - min(metrics),
        seconds=sum(r.seconds for r in runs) / len(runs),
    )


def weight_layers(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """Conv / ConvTranspose / Gemm / MatMul nodes with a weight initializer: their weight
    shape and the axis of their output channels (neurons) in it."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    found = {}
    for n in model.graph.node:
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        shape = inits[n.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in n.attribute)
        axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if trans_b else 1}.get(n.op_type)
        found[n.name] = shape, len(shape) - 1 if axis is None else axis
    return found


def layers_changed(source: onnx.ModelProto, result: onnx.ModelProto) -> tuple[int, int, int]:
    """(weight layers whose shape changed, those whose outputs were cut, weight layers
    of the source); matched by node name, or in graph order when the names differ."""
    before, after = weight_layers(source), weight_layers(result)
    if set(before) == set(after):
        pairs = [(before[k], after[k]) for k in before]
    else:
        pairs = list(zip(before.values(), after.values(), strict=False))
    changed = sum(a[0] != b[0] for a, b in pairs)
    cut = sum(a[0][a[1]] != b[0][b[1]] for a, b in pairs)
    return changed, cut, len(before)


def dataset(task: archs.Task) -> Dataset:
    return Dataset(task.val, None, "val")


def measure(
    model: onnx.ModelProto, source: onnx.ModelProto, task: archs.Task, pruned: float | None
) -> Result:
    raw = model.SerializeToString()
    sess = evaluate.session(model, threads=1)
    out = evaluate.run_batched(sess, dataset(task))
    return Result(
        layers=layers_changed(source, model),
        params=graph.weight_stats(model)[0],
        size=len(raw),
        gzip=len(gzip.compress(raw, compresslevel=9, mtime=0)),
        p50=evaluate.latency(sess, dataset(task), LATENCY_RUNS).p50_ms,
        pruned=pruned,
        metric=archs.metric(task, out),
    )


def quick_metric(model: onnx.ModelProto, task: archs.Task) -> float:
    return archs.metric(task, evaluate.run_batched(evaluate.session(model), dataset(task)))


def write_data(task: archs.Task, folder: Path) -> None:
    """train.npz / val.npz in edgeslim's format; the detector's masks are not class
    labels (one label per sample), so its files carry inputs only."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, inputs, labels in (
        ("train", task.train, task.y_train),
        ("val", task.val, task.y_val),
    ):
        np.savez(folder / f"{name}.npz", **inputs, **({} if task.dense else {"y": labels}))


def edgeslim(
    folder: Path,
    source: onnx.ModelProto,
    task: archs.Task,
    sparsity: float,
    budget: DistillConfig,
    criterion: str = "l1",
    compensate_bias: bool = True,
) -> tuple[Result, list[str]]:
    """The source ONNX through the real pipeline: prune (structured) then distill."""
    started = time.perf_counter()
    prune = PruneConfig(
        method="structured",
        sparsity=sparsity,
        criterion=criterion,
        compensate_bias=None if compensate_bias else False,
    )
    if criterion in ("activation", "taylor"):  # data-aware: calibrate on the training split
        prune = prune.model_copy(update={"calibration_dataset": str(folder / "train.npz")})
    spec = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "bench"},
        "spec": {
            "source": {"uri": str(folder / "source.onnx")},
            "evaluation": {
                "dataset": str(folder / "val.npz"),
                "metric": "cosine" if task.dense else "accuracy",
                "maxMetricDrop": 1e6,  # the table judges, not the gate
                "latencyRuns": 5,
            },
            "pipeline": [
                {"prune": prune.model_dump(mode="json", by_alias=True, exclude_none=True)},
                {
                    "distill": {
                        "dataset": str(folder / "train.npz"),
                        "epochs": budget.epochs,
                        "learningRate": budget.learning_rate,
                        "batchNorm": budget.batch_norm,
                        "seed": budget.seed,
                    }
                },
            ],
        },
    }
    run = folder / f"edgeslim-{sparsity}-{budget.seed}"
    run.mkdir()
    with cpu_count(torch.get_num_threads()):
        outcome = compress(
            CompressedModel.model_validate(spec), output=str(run / "out"), workdir=run, reuse=False
        )
    seconds = time.perf_counter() - started
    result = onnx.load(outcome.model_uri)
    # The pruned model before distillation: the same prune step on its own.
    loaded = onnx.load(folder / "source.onnx")
    graph.constants_to_initializers(loaded)
    ctx = StepContext(
        source=loaded,
        workdir=run,
        load_dataset=lambda uri, sha, model: datasets.load(Path(uri), model, uri),
        load_model=lambda uri, sha: onnx.load(uri),
        evaluation_dataset=str(folder / "val.npz"),
        train_datasets=[str(folder / "train.npz")],
    )
    pruned = Prune(prune).run(loaded, ctx).model
    row = measure(result, source, task, quick_metric(pruned, task))
    row.seconds = seconds
    notes = [n for step in outcome.result.steps for n in step.notes]
    return row, notes


@contextmanager
def cpu_count(n: int) -> Iterator[None]:
    """os.cpu_count() reads `n` inside the block.

    edgeslim's distill sets torch to os.cpu_count() threads; on a shared two-core
    machine two threads made an epoch eight times slower than one (measured), so
    both sides run on the bench's thread count (--threads)."""
    real = os.cpu_count
    os.cpu_count = lambda: n
    try:
        yield
    finally:
        os.cpu_count = real


def torch_pruning(
    module: torch.nn.Module,
    source: onnx.ModelProto,
    task: archs.Task,
    teacher: np.ndarray,
    sparsity: float,
    budget: DistillConfig,
) -> Result:
    """Torch-Pruning's DepGraph on a copy of the module, then plain-torch distillation."""
    import torch_pruning as tp

    started = time.perf_counter()
    model = copy.deepcopy(module).eval()
    heads: dict[torch.nn.Module, int] = {}
    if isinstance(model, archs.BertLogits):
        from transformers.models.bert.modeling_bert import BertSelfAttention

        for m in model.modules():
            if isinstance(m, BertSelfAttention):
                heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads})
                heads[m.value] = m.num_attention_heads
    pruner = tp.pruner.MetaPruner(
        model,
        archs.example(task, 2),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=sparsity,
        ignored_layers=[archs.final_layer(model)],
        num_heads=heads,
        prune_num_heads=bool(heads),
        prune_head_dims=not heads,
        head_pruning_ratio=sparsity,
    )
    pruner.step()
    if heads:
        for m in model.modules():
            if isinstance(m, BertSelfAttention):
                m.num_attention_heads = pruner.num_heads[m.query]
                m.all_head_size = m.query.out_features
    pruned = quick_metric(archs.export(model, task), task)
    distill(model, task, teacher, budget)
    seconds = time.perf_counter() - started
    row = measure(archs.export(model, task), source, task, pruned)
    row.seconds = seconds
    return row


def distill(
    model: torch.nn.Module, task: archs.Task, teacher: np.ndarray, cfg: DistillConfig
) -> None:
    """Knowledge distillation with the settings of edgeslim's distill step (Hinton loss
    with labels, or MSE on a map), Adam with a cosine schedule, as one would by hand."""
    epochs = cfg.epochs
    torch.manual_seed(cfg.seed)
    inputs = [torch.from_numpy(v) for v in task.train.values()]
    targets = torch.from_numpy(teacher)
    labels = torch.from_numpy(task.y_train)
    n, t = len(targets), cfg.temperature
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / cfg.batch_size))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            out = model(*(x[idx] for x in inputs))
            if task.dense:
                loss = F.mse_loss(out, targets[idx])
            else:
                soft = F.kl_div(
                    F.log_softmax(out / t, 1), F.softmax(targets[idx] / t, 1), reduction="batchmean"
                )
                hard = F.cross_entropy(out, labels[idx])
                loss = cfg.alpha * soft * t * t + (1 - cfg.alpha) * hard
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    # As for the sources: BatchNorm statistics averaged over the training inputs.
    archs.recalibrate_batchnorm(model, inputs)
    model.eval()


def fmt_row(arch: str, s: str, method: str, r: Result, src: Result) -> str:
    pruned = "" if r.pruned is None else f"{100 * r.pruned:.1f}"
    return (
        f"| {arch} | {s} | {method} | {r.layers[0]}/{r.layers[2]} | {r.layers[1]}/{r.layers[2]} "
        f"| {r.params:,} "
        f"| {src.params / r.params:.2f}x | {r.size / 1e3:.0f} | {r.gzip / 1e3:.0f} "
        f"| {r.p50:.3f} | {pruned} | {100 * r.metric:.1f} | {100 * r.spread:.1f} "
        f"| {100 * (r.metric - src.metric):+.1f} | {r.seconds:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--epochs", type=int, default=10, help="distillation epochs (both)")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="distillation learning rate (both; default: distill's)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both)")
    parser.add_argument(
        "--criterion",
        default="l1",
        choices=["l1", "l2", "activation", "taylor", "fpgm"],
        help="edgeslim's importance criterion (Torch-Pruning: L1 magnitude)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="distillations per row (both), averaged"
    )
    parser.add_argument(
        "--no-compensate-bias",
        action="store_true",
        help="edgeslim's prune with compensateBias false (removed channels cut bare)",
    )
    parser.add_argument(
        "--no-batch-norm",
        action="store_true",
        help="edgeslim's distill without batchNorm (the convs trained bare)",
    )
    parser.add_argument("--quick", action="store_true", help="sparsity 0.5, 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.sparsity, args.epochs = [0.5], 3
    threads = args.threads
    # The distillation budget both sides get: distill's defaults unless overridden.
    budget = DistillConfig(
        dataset="train.npz", epochs=args.epochs, batch_norm=not args.no_batch_norm
    )
    if args.lr is not None:
        budget = budget.model_copy(update={"learning_rate": args.lr})

    began = time.perf_counter()
    table: list[str] = []
    notes: list[str] = []
    goals: list[str] = []
    versus: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            print(f"{arch}: training the source ...", file=sys.stderr, flush=True)
            torch.set_num_threads(threads)
            module, task = archs.build(arch)
            archs.train(module, task, ARCHS[arch])
            folder = Path(tmp) / arch
            write_data(task, folder)
            source = archs.export(module, task)
            onnx.save(source, folder / "source.onnx")
            graph.constants_to_initializers(source)
            src = measure(source, source, task, None)
            with torch.no_grad():
                teacher = module(*archs.example(task, len(task.y_train))).numpy()
            table.append(fmt_row(arch, "-", "source", src, src))
            print(table[-1], file=sys.stderr, flush=True)
            for s in args.sparsity:
                print(f"{arch} {s}: edgeslim ...", file=sys.stderr, flush=True)
                runs, peers, failed = [], [], ""
                for seed in range(args.seeds):
                    seeded = budget.model_copy(update={"seed": seed})
                    ours, step_notes = edgeslim(
                        folder, source, task, s, seeded, args.criterion, not args.no_compensate_bias
                    )
                    runs.append(ours)
                    if failed:
                        continue
                    print(f"{arch} {s}: torch-pruning ...", file=sys.stderr, flush=True)
                    try:
                        peers.append(torch_pruning(module, source, task, teacher, s, seeded))
                    except Exception as exc:  # the peer's own failure is a result too
                        failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
                ours = over_seeds(runs)
                table.append(fmt_row(arch, f"{s:g}", "edgeslim", ours, src))
                if failed:
                    table.append(f"| {arch} | {s:g} | torch-pruning | failed: {failed} |")
                    versus.append(f"{arch} {s:g}: torch-pruning failed ({failed})")
                else:
                    peer = over_seeds(peers)
                    table.append(fmt_row(arch, f"{s:g}", "torch-pruning", peer, src))
                    versus.append(_versus(arch, s, ours, peer))
                # Rows as they come (stderr), so a run cut short still shows them.
                print("\n".join(table[-2:]), file=sys.stderr, flush=True)
                notes += [f"{arch} {s:g}: {n}" for n in step_notes if _summary(n)]
                goals += _goals(arch, s, ours, src)
    minutes = (time.perf_counter() - began) / 60

    print(
        f"\nsparsity = share of channels / neurons / heads removed per group; distillation "
        f"{budget.epochs} epochs, learning rate {budget.learning_rate:g}, on the training split "
        f"(both), mean of {args.seeds} seed(s) (spread: max - min); edgeslim criterion "
        f"{args.criterion}, compensateBias {'off' if args.no_compensate_bias else 'on'}, "
        f"distill batchNorm {'on' if budget.batch_norm else 'off'}; metric on the held-out split "
        f"(accuracy %, detector: IoU %); latency batch 1, 1 thread, p50 of {LATENCY_RUNS}; "
        f"{threads} torch thread(s) on {os.cpu_count()} cores; {minutes:.1f} min\n"
    )
    print(
        "| arch | sparsity | method | layers pruned | outputs cut | params | fewer | size kB "
        "| gzip kB "
        "| p50 ms | metric pruned | metric distilled | spread | vs source | time s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(table))
    print("\nedgeslim step notes:\n" + "\n".join(f"- {n}" for n in notes))
    print("\ngoals at sparsity 0.5:\n" + "\n".join(f"- {g}" for g in goals))
    print("\nedgeslim vs torch-pruning (no worse on any row):")
    print("\n".join(f"- {v}" for v in versus))


def _summary(note: str) -> bool:
    """The notes worth a line under the table: prune's summary and distill's outcome."""
    return (
        note.startswith(("structured:", "held out", "trained with BatchNorm"))
        or "did not improve" in note
    )


def _mark(ok: bool) -> str:
    return "ok  " if ok else "MISS"


def _goals(arch: str, s: float, ours: Result, src: Result) -> list[str]:
    """The issue's goals for edgeslim at sparsity 0.5."""
    if s != 0.5:
        return []
    share = ours.layers[0] / ours.layers[2]
    ratio = src.params / ours.params
    out = [
        f"{_mark(share >= 0.9)} {arch}: {share:.0%} of conv/linear layers pruned (>= 90%)",
        f"{_mark(ratio >= 1.8)} {arch} 0.5: {ratio:.2f}x fewer parameters (>= 1.8x)",
    ]
    if arch in CNNS:
        drop = 100 * (src.metric - ours.metric)
        out.append(f"{_mark(drop <= 1)} {arch} 0.5: {drop:.1f} points below the source (<= 1)")
    return out


def _versus(arch: str, s: float, ours: Result, peer: Result) -> str:
    """edgeslim against Torch-Pruning on one row: metric, parameters, latency."""
    delta = 100 * (ours.metric - peer.metric)
    more = 100 * (ours.params / peer.params - 1)
    # Timing noise on a shared machine: within 10% counts as the same.
    return (
        f"{arch} {s:g}: metric {_mark(delta >= 0)} {delta:+.1f} points; "
        f"parameters {_mark(more <= 0)} {more:+.1f}%; "
        f"p50 {_mark(ours.p50 <= 1.1 * peer.p50)} {ours.p50:.3f} vs {peer.p50:.3f} ms"
    )


if __name__ == "__main__":
    main()
