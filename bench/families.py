"""Structured pruning on architecture families the dependency groups were not tuned on.

    python bench/families.py [--arch vit swin] [--epochs N] [--sparsity S]

Each model is built from torchvision with no weights, trained briefly on
scikit-learn's digits (bench/archs.py), exported to ONNX and compressed through
the real pipeline, the way a user would write it: `simplify` (which folds the
shape arithmetic these exports carry), `prune: {method: structured}`, then
`distill` on the training split. The table gives the layers the groups reached,
the parameters before and after, and the accuracy on the held-out split.

- vit: torchvision's VisionTransformer (nn.MultiheadAttention: one packed Q/K/V
  projection, the heads folded into the batch axis), 4 layers of width 64;
- swin: torchvision's SwinTransformer (shifted windows, packed Q/K/V with
  heads, relative position bias, patch merging), two stages of width 32 and 64.

No peer row: Torch-Pruning 1.6.1 with its defaults cannot prune torchvision's
ViT (the pruned model's attention reshape fails at the first forward pass), and
ShuffleNetV2, the third family, is in bench/pruning.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import archs  # bench/archs.py: the script's folder is first on sys.path
import onnx
import pruning  # bench/pruning.py: the metric and the data files
import torch
import torchvision

from edgeslim.api.spec import CompressedModel
from edgeslim.compressor.pipeline import compress


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "vit":
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
            num_classes=10,
        )  # fmt: skip
    return torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        num_classes=10,
    )  # fmt: skip


def run(arch: str, epochs: int, sparsity: float, distill_epochs: int) -> tuple[str, list[str]]:
    task = archs.digits_task()
    module = build(arch)
    started = time.perf_counter()
    archs.train(module, task, epochs, lr=1e-3)
    source = archs.export(module, task)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pruning.write_data(task, folder)
        onnx.save(source, folder / "source.onnx")
        spec = {
            "apiVersion": "edgeslim.io/v1alpha1",
            "kind": "CompressedModel",
            "metadata": {"name": arch},
            "spec": {
                "source": {"uri": str(folder / "source.onnx")},
                "evaluation": {
                    "dataset": str(folder / "val.npz"),
                    "metric": "accuracy",
                    "maxMetricDrop": 1.0,  # the table judges, not the gate
                    "latencyRuns": 5,
                },
                "pipeline": [
                    {"simplify": {}},
                    {"prune": {"method": "structured", "sparsity": sparsity}},
                    {"distill": {"dataset": str(folder / "train.npz"), "epochs": distill_epochs}},
                ],
            },
        }
        outcome = compress(
            CompressedModel.model_validate(spec), output=str(folder / "out"), workdir=folder
        )
    r = outcome.result
    notes = [n for s in r.steps for n in s.notes if n.startswith(("structured:", "held out"))]
    summary = next(n for n in notes if n.startswith("structured:"))
    reached = summary.split(" layers pruned")[0].removeprefix("structured: ")
    row = (
        f"| {arch} | {sparsity:g} | {reached} | {r.source.parameters:,} | "
        f"{r.artifact.parameters:,} | {r.source.parameters / r.artifact.parameters:.2f}x | "
        f"{100 * r.evaluation.baseline:.1f} | {100 * r.evaluation.compressed:.1f} | "
        f"{time.perf_counter() - started:.0f} |"
    )
    return row, [f"{arch}: {n}" for n in notes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=["vit", "swin"], default=["vit", "swin"])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the source")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--distill-epochs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, notes = [], []
    for arch in args.arch:
        print(f"{arch}: training, then compressing ...", file=sys.stderr, flush=True)
        row, arch_notes = run(arch, args.epochs, args.sparsity, args.distill_epochs)
        rows.append(row)
        notes += arch_notes
        print(row, file=sys.stderr, flush=True)
    print(
        f"\nsource trained {args.epochs} epochs on digits (32x32); simplify, prune "
        f"structured {args.sparsity:g} (l1), distill {args.distill_epochs} epochs; "
        "accuracy on the held-out split; 1 torch thread\n"
    )
    print(
        "| arch | sparsity | layers pruned | params | after | fewer | source % | compressed % | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
