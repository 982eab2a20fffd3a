"""Structured pruning of models exported with dynamic shapes, as fleets ship them.

    python bench/dynamic_exports.py [--arch deberta-v3 deberta-v2 llama-kv2 ...]
                                    [--sparsity 0.5]

Each model is built here with random weights (nothing is downloaded), exported with
a dynamic batch (and sequence, for text) by torch's TorchScript exporter (opset 17,
`dynamic_axes`) and by its dynamo exporter (`dynamic_shapes`, the default of
`torch.onnx.export` from torch 2.9), and pruned by edgeslim's prune step alone.
It prints, per export: the layers pruned of those a group reaches, the parameters
before and after (against the file as exported), how many heads notes there are,
and whether the pruned model runs at two batch sizes. No training: the table shows
what pruning reaches; bench/pruning.py and bench/families.py measure accuracy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeslim.api.spec import PruneConfig
from edgeslim.compressor import graph
from edgeslim.compressor.prune import Prune
from tests.archs import (
    TorchAttention,
    export,
    export_dynamo,
    tiny_deberta_v2,
    tiny_deberta_v3,
    tiny_llama,
)


def _vision(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=5)

    return build


# arch -> (builder, its inputs)
ARCHS: dict[str, tuple[Callable[[], torch.nn.Module], tuple[str, ...]]] = {
    "deberta-v3": (tiny_deberta_v3, ("input_ids",)),
    "deberta-v2": (tiny_deberta_v2, ("input_ids",)),
    "llama-kv2": (lambda: tiny_llama(kv_heads=2, attention="sdpa"), ("input_ids", "mask")),
    "llama-kv1": (lambda: tiny_llama(kv_heads=1, attention="sdpa"), ("input_ids", "mask")),
    "nn-mha": (lambda: TorchAttention(need_weights=True, masked=True), ("x", "pad")),
    "convnext_tiny": (_vision("convnext_tiny"), ("input",)),
    "swin_t": (_vision("swin_t"), ("input",)),
}


def example(names: tuple[str, ...], batch: int, seq: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(batch)
    values = {
        "input_ids": rng.integers(0, 100, (batch, seq)),
        "mask": np.ones((batch, seq), np.int64),
        "x": rng.normal(size=(batch, seq, 32)).astype(np.float32),
        "pad": np.arange(seq) >= seq - 1 - np.arange(batch)[:, None],
        "input": rng.normal(size=(batch, 3, 64, 64)).astype(np.float32),
    }
    return tuple(values[n] for n in names)


def prune_row(model: onnx.ModelProto, sparsity: float, names: tuple[str, ...]) -> str:
    graph.constants_to_initializers(model)
    before, _ = graph.weight_stats(model)
    out = Prune(PruneConfig(sparsity=sparsity)).run(model, None)
    after, _ = graph.weight_stats(out.model)
    summary = next(n for n in out.notes if n.startswith("structured:"))
    reached = summary.split(":")[1].split()[0]
    heads = sum(" heads " in n and n.startswith("removed") for n in out.notes)
    session = ort.InferenceSession(
        out.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    shapes = []
    for batch in (2, 3):
        seq = 12 if "input_ids" in names else 16  # only text has a dynamic sequence
        feeds = dict(zip(names, example(names, batch, seq), strict=True))
        shapes.append(list(session.run(None, feeds)[0].shape))
    return f"{reached} | {before:,} | {after:,} | {before / after:.2f}x | {heads} | {shapes} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    print("| arch | export | layers pruned | params | after | fewer | heads notes | runs at |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for arch in args.arch:
        build, names = ARCHS[arch]
        for exporter in ("torchscript-17", "dynamo"):
            torch.manual_seed(0)
            module = build().eval()
            args_ = tuple(torch.from_numpy(a) for a in example(names, 2, 16))
            try:
                if exporter == "dynamo":
                    model = export_dynamo(module, args_, list(names))
                else:
                    model = export(module, args_, list(names), 17)
                outcome = prune_row(model, args.sparsity, names)
            except Exception as exc:  # a failed export or run is a row, not the end
                outcome = f"failed: {type(exc).__name__}: {str(exc)[:80]} | | | | | |"
            print(f"| {arch} | {exporter} | {outcome}", flush=True)


if __name__ == "__main__":
    main()
