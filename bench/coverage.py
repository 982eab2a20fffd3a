"""Structured-pruning coverage on vision families made for phones and CPUs, against
Torch-Pruning.

    python bench/coverage.py [--arch swiftformer levit focalnet cvt segformer]
                             [--sparsity 0.5]
                             [--deadline 300]

Each model is built from a `transformers` config with random weights (nothing is
downloaded), exported to ONNX at opset 17 and pruned by edgeslim's prune step (which
simplifies the graph first where computed shapes need it). Torch-Pruning (MetaPruner,
L1 magnitude, the classifier ignored, its defaults otherwise) prunes the same module
in a forked child with a deadline (bench/families.py's `bounded`). There is no
training here: the table shows what each tool can reach. bench/pruning.py and
bench/families.py measure accuracy.

- swiftformer: SwiftFormer's efficient additive attention (query and key normalized
  with F.normalize, a global query tiled over the tokens), 4 stages of width 16-48;
- levit: LeViT (a BatchNorm over the flattened tokens after every linear layer,
  heads split into unequal query / key / value parts, a learnt bias per head),
  3 stages of width 32-64 at 128x128;
- focalnet: FocalNet's focal modulation (query, context and one gate per level
  from one projection, depthwise convs per level), 4 stages of width 16-128;
- cvt: CvT (convolutional token projections, attention written as Einsum),
  3 stages of width 16-48;
- segformer: SegFormer, a semantic segmenter (attention over a sequence reduced by
  a strided conv, Mix-FFN with a depthwise conv, an all-MLP decoder), 2 stages of
  width 16-32; its classifier is a 1x1 Conv, which Torch-Pruning is told to ignore.

Each tool counts the parameters of its own format (the ONNX file has the
BatchNorms that follow convs folded into them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from families import bounded

from edgeslim.api.spec import PruneConfig
from edgeslim.compressor import graph
from edgeslim.compressor.prune import Prune
from tests.archs import PHONE_VISION, export, phone_vision


def edgeslim_row(module: torch.nn.Module, size: int, sparsity: float) -> str:
    model = export(module, (torch.randn(1, 3, size, size),), ["input"], 17)
    graph.constants_to_initializers(model)
    before, _ = graph.weight_stats(model)
    out = Prune(PruneConfig(sparsity=sparsity)).run(model, None)
    after, _ = graph.weight_stats(out.model)
    summary = next(n for n in out.notes if n.startswith("structured:"))
    reached = summary.split(":")[1].split()[0]  # "47/47 layers pruned (...)"
    session = ort.InferenceSession(
        out.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    logits = session.run(None, {"input": np.zeros((2, 3, size, size), np.float32)})[0]
    return row("edgeslim", reached, before, after, f"runs in onnxruntime: {list(logits.shape)}")


def torch_pruning_row(module: torch.nn.Module, size: int, sparsity: float) -> str:
    import torch_pruning as tp

    example = torch.randn(1, 3, size, size)
    before = sum(p.numel() for p in module.parameters())
    classifiers = [
        m
        for name, m in module.named_modules()
        # the final layer: a Linear, or SegFormer's 1x1 Conv over the decoder's map
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        and ("classifier" in name or name.endswith("head"))
    ]
    pruner = tp.pruner.MetaPruner(
        module,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=sparsity,
        ignored_layers=classifiers,
    )
    pruner.step()
    after = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        logits = module(torch.zeros(2, 3, size, size))
    return row("Torch-Pruning", "-", before, after, f"runs in torch: {list(logits.shape)}")


def row(tool: str, reached: str, before: int, after: int, note: str) -> str:
    return f"| {tool} | {reached} | {before:,} | {after:,} | {before / after:.2f}x | {note} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=PHONE_VISION, default=list(PHONE_VISION))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--deadline", type=float, default=300.0)
    args = parser.parse_args()
    print("| arch | tool | layers reached | params | after | fewer | note |")
    print("|---|---|---|---:|---:|---:|---|")
    for arch in args.arch:
        torch.manual_seed(0)
        module, size = phone_vision(arch)
        module.eval()
        peers: list[tuple[str, Callable[..., str]]] = [
            ("edgeslim", edgeslim_row),
            ("Torch-Pruning", torch_pruning_row),
        ]
        for tool, run in peers:
            outcome = bounded(args.deadline, run, module, size, args.sparsity)
            if not outcome.startswith("|"):
                outcome = f"| {tool} | - | - | - | - | failed: {outcome} |"
            print(f"| {arch} {outcome}", flush=True)


if __name__ == "__main__":
    main()
