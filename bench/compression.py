"""Compression benchmark on the digits example: edgeslim's pipelines versus what a
user does by hand with onnxruntime's `quantize_dynamic` alone.

    python bench/compression.py [--data out/bench/data] [--epochs 30]

Prints a markdown table: file size and gzip (download) ratios against the fp32
source, accuracy and its drop, batch-1 latency p50 and speedup (one thread).
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from edgeslim.api.spec import CompressedModel, Metric
from edgeslim.compressor import datasets, evaluate
from edgeslim.compressor.pipeline import compress

ROOT = Path(__file__).resolve().parent.parent
LATENCY_RUNS = 300

PIPELINES: dict[str, list[dict]] = {
    "edgeslim: static int8 only": [{"quantize": {"mode": "static"}}],
    "edgeslim: magnitude 0.8 + distill + static int8": [
        {"prune": {"method": "magnitude", "sparsity": 0.8}},
        {"distill": {"dataset": "{train}", "epochs": 15}},
        {"quantize": {"mode": "static"}},
    ],
    "edgeslim: demo (structured 0.5 + distill + static int8)": [
        {"simplify": {}},
        {"prune": {"method": "structured", "sparsity": 0.5}},
        {"distill": {"dataset": "{train}", "epochs": 15}},
        {"quantize": {"mode": "static", "opTypes": ["Conv", "Gemm", "MatMul"]}},
    ],
    "edgeslim: structured 0.75 + distill + static int8": [
        {"simplify": {}},
        {"prune": {"method": "structured", "sparsity": 0.75}},
        {"distill": {"dataset": "{train}", "epochs": 25}},
        {"quantize": {"mode": "static"}},
    ],
}


def measure(model: onnx.ModelProto, data: datasets.Dataset) -> dict[str, float]:
    raw = model.SerializeToString()
    sess = evaluate.session(model)
    out = evaluate.run_batched(sess, data)
    return {
        "size": len(raw),
        "gzip": len(gzip.compress(raw, compresslevel=9, mtime=0)),
        "accuracy": evaluate.metric(Metric.accuracy, out, out, data.labels),
        "p50": evaluate.latency(sess, data, LATENCY_RUNS).p50_ms,
    }


def by_hand_dynamic(source: Path, workdir: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import quantize_dynamic

    dst = workdir / "dynamic.onnx"
    quantize_dynamic(source, dst)  # the one-liner most tutorials show
    return onnx.load(dst)


def run_pipeline(index: int, steps: list[dict], data_dir: Path, workdir: Path) -> onnx.ModelProto:
    train = str(data_dir / "train.npz")
    pipeline = [
        {
            kind: {k: train if v == "{train}" else v for k, v in cfg.items()}
            for kind, cfg in step.items()
        }
        for step in steps
    ]
    spec = {
        "apiVersion": "edgeslim.io/v1alpha1",
        "kind": "CompressedModel",
        "metadata": {"name": "bench"},
        "spec": {
            "source": {"uri": str(data_dir / "cnn.onnx")},
            "evaluation": {
                "dataset": str(data_dir / "val.npz"),
                "maxMetricDrop": 1.0,
                "latencyRuns": 5,
            },
            "pipeline": pipeline,
        },
    }
    obj = CompressedModel.model_validate(spec)
    outcome = compress(obj, output=str(workdir / f"run-{index}"), workdir=workdir)
    return onnx.load(outcome.model_uri)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "out" / "bench" / "data")
    parser.add_argument("--epochs", type=int, default=30, help="teacher training epochs")
    args = parser.parse_args()
    if not (args.data / "val.npz").exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples/digits/build.py"),
                "--out",
                str(args.data),
                "--epochs",
                str(args.epochs),
            ],
            check=True,
        )
    source = onnx.load(args.data / "cnn.onnx")
    data = datasets.load(args.data / "val.npz", source)

    rows: list[tuple[str, dict[str, float]]] = [("fp32 source", measure(source, data))]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append(
            (
                "by hand: onnxruntime quantize_dynamic",
                measure(by_hand_dynamic(args.data / "cnn.onnx", work), data),
            )
        )
        for index, (label, steps) in enumerate(PIPELINES.items()):
            print(f"running {label} ...", file=sys.stderr)
            rows.append((label, measure(run_pipeline(index, steps, args.data, work), data)))

    base = rows[0][1]
    print(
        f"\ndigits CNN, {len(data)} validation samples, "
        f"latency = batch 1, 1 thread, p50 of {LATENCY_RUNS}\n"
    )
    print(
        "| approach | size | size ratio | gzip | download ratio "
        "| accuracy | drop (pts) | p50 ms | speedup |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, m in rows:
        print(
            f"| {label} | {m['size'] / 1e3:.1f} kB | {base['size'] / m['size']:.2f}x "
            f"| {m['gzip'] / 1e3:.1f} kB | {base['gzip'] / m['gzip']:.2f}x | {m['accuracy']:.4f} "
            f"| {100 * (base['accuracy'] - m['accuracy']):+.2f} | "
            f"{m['p50']:.4f} | {base['p50'] / m['p50']:.2f}x |"
        )


if __name__ == "__main__":
    main()
