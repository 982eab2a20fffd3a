"""Build the digits example: a small CNN teacher trained on scikit-learn's
bundled handwritten digits (no download), exported to ONNX, plus train/val
splits in edgeslim's .npz dataset format.

    python examples/digits/build.py --out out/demo/data

writes cnn.onnx, train.npz and val.npz under --out.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


class DigitsCNN(nn.Module):
    """Deliberately wider than the task needs, like most models shipped to edge teams."""

    def __init__(self, width: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def splits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # N,1,8,8 in [0, 1]
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y
    )
    return x_train, x_val, y_train, y_val


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for start in range(0, len(xt), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model: nn.Module, path: Path, opset: int = 17) -> None:
    # The TorchScript-based exporter (dynamo=False) writes the plain
    # Conv/Relu/MaxPool/Flatten/Gemm graph most real-world files still have.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def reexport(trained: Path, path: Path, opset: int, constant_weights: bool = False) -> None:
    """The trained `cnn.onnx` written again as an older or third-party exporter
    would: at `opset`, and with `constant_weights` every weight in a Constant node
    instead of an initializer (what tests and benches feed the compressor)."""
    import onnx
    from onnx import helper, numpy_helper

    net = DigitsCNN()
    weights = onnx.load(str(trained)).graph.initializer
    net.load_state_dict(
        {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in weights}
    )
    export(net.eval(), path, opset)
    if constant_weights:
        model = onnx.load(str(path))
        g = model.graph
        constants = [helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]
        nodes = constants + list(g.node)
        del g.initializer[:]
        del g.node[:]
        g.node.extend(nodes)
        onnx.save(model, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo/data"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_val, y_train, y_val = splits(args.seed)
    model = DigitsCNN()
    train(model, x_train, y_train, args.epochs, args.seed)
    export(model, args.out / "cnn.onnx")
    np.savez(args.out / "train.npz", x=x_train, y=y_train)
    np.savez(args.out / "val.npz", x=x_val, y=y_val)
    summary = {
        "model": str(args.out / "cnn.onnx"),
        "valAccuracy": round(accuracy(model, x_val, y_val), 4),
        "trainSamples": len(x_train),
        "valSamples": len(x_val),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
