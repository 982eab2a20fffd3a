"""The architectures of issue 9, built locally with nothing downloaded, and toy tasks
small enough to train them on two CPU cores in seconds.

- torchvision's mobilenet_v3_small and resnet18 (weights=None, 10 classes) on
  scikit-learn's digits, upscaled to 32x32 and repeated over 3 channels;
- a small BERT from a transformers config on a keyword-counting task (which of
  three keywords occurs most often in a padded sequence of filler tokens);
- a DBNet-style text detector (strided convs, an FPN with Resize and Add, a
  Concat, a ConvTranspose head with a sigmoid probability map) that marks the
  box around the one real digit on a canvas that also holds a scrambled one.

Every model here returns one tensor (logits or a probability map), so the same
module trains, exports to ONNX and is handed to Torch-Pruning as it is.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

OPSET = 17
VOCAB, SEQ, KEYWORDS = 100, 16, (1, 2, 3)


@dataclass
class Task:
    """Train and validation inputs (named as the model's ONNX inputs) and labels."""

    train: dict[str, np.ndarray]
    y_train: np.ndarray
    val: dict[str, np.ndarray]
    y_val: np.ndarray
    dense: bool = False
    """Labels are per-pixel masks (metric IoU) rather than classes (metric accuracy)."""


def _digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.numpy(), digits.target.astype(np.int64)


def _split(n: int, seed: int, val_share: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = round(n * (1 - val_share))
    return order[:cut], order[cut:]


def digits_task(size: int = 32, seed: int = 0) -> Task:
    x, y = _digits(size)
    x = np.repeat(x, 3, axis=1)  # the torchvision stems expect RGB
    tr, va = _split(len(x), seed)
    return Task({"input": x[tr]}, y[tr], {"input": x[va]}, y[va])


def keyword_task(n: int = 2400, seed: int = 0) -> Task:
    """Filler tokens with each of three keywords 0-3 times; the label is the keyword
    that occurs most often (ties are redrawn). Sequences are padded to SEQ with
    attention_mask 0, so the mask path of the encoder matters."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, SEQ), np.int64)
    mask = np.zeros((n, SEQ), np.int64)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        while True:
            counts = rng.integers(0, 4, len(KEYWORDS))
            if (counts == counts.max()).sum() == 1:
                break
        length = int(rng.integers(max(8, counts.sum() + 1), SEQ + 1))
        seq = rng.integers(len(KEYWORDS) + 1, VOCAB, length)
        slots = rng.choice(length, counts.sum(), replace=False)
        seq[slots] = np.repeat(KEYWORDS, counts)
        ids[i, :length], mask[i, :length], labels[i] = seq, 1, counts.argmax()
    tr, va = _split(n, seed)
    pick = lambda idx: {"input_ids": ids[idx], "attention_mask": mask[idx]}  # noqa: E731
    return Task(pick(tr), labels[tr], pick(va), labels[va])


def detection_task(n: int = 1500, seed: int = 0) -> Task:
    """A 32x32 canvas: one digit (16x16) in one half, the same digit with its pixels
    shuffled in the other, plus noise. The target marks the real digit's ink box."""
    rng = np.random.default_rng(seed)
    digits, _ = _digits(16)
    x = rng.normal(0, 0.05, (n, 1, 32, 32)).astype(np.float32)
    target = np.zeros((n, 1, 32, 32), np.float32)
    for i in range(n):
        digit = digits[rng.integers(len(digits)), 0]
        scrambled = rng.permutation(digit.reshape(-1)).reshape(digit.shape)
        left = bool(rng.integers(2))
        rows = rng.integers(0, 17, 2)
        for img, col, row in (
            (digit, 0 if left else 16, rows[0]),
            (scrambled, 16 if left else 0, rows[1]),
        ):
            x[i, 0, row : row + 16, col : col + 16] += img
        ink_r, ink_c = np.nonzero(digit > 0.3)
        r0, c0 = rows[0], 0 if left else 16
        target[
            i, 0, r0 + ink_r.min() : r0 + ink_r.max() + 1, c0 + ink_c.min() : c0 + ink_c.max() + 1
        ] = 1
    x = np.repeat(x, 3, axis=1)
    tr, va = _split(n, seed)
    return Task({"input": x[tr]}, target[tr], {"input": x[va]}, target[va], dense=True)


class TextDetector(nn.Module):
    """DBNet-style: a strided backbone, an FPN (1x1 laterals, nearest Resize, Add), the
    levels resized to 1/2 and concatenated, and a head of conv, ConvTranspose, BN,
    ConvTranspose to a one-channel probability map at the input resolution."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        w = width
        self.c1, self.c2, self.c3 = block(3, w, 2), block(w, 2 * w, 2), block(2 * w, 4 * w, 2)
        self.lat1, self.lat2, self.lat3 = (
            nn.Conv2d(w, w, 1),
            nn.Conv2d(2 * w, w, 1),
            nn.Conv2d(4 * w, w, 1),
        )
        self.head = block(3 * w, w, 1)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(w, w, 2, 2), nn.BatchNorm2d(w), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.c1(x)
        c2 = self.c2(c1)
        c3 = self.c3(c2)
        p3 = self.lat3(c3)
        p2 = self.lat2(c2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        p1 = self.lat1(c1) + F.interpolate(p2, scale_factor=2.0, mode="nearest")
        size = (p1.shape[2], p1.shape[3])
        levels = [
            p1,
            F.interpolate(p2, size=size, mode="nearest"),
            F.interpolate(p3, size=size, mode="nearest"),
        ]
        return torch.sigmoid(self.up2(self.up1(self.head(torch.cat(levels, 1)))))


class SequenceLogits(nn.Module):
    """A transformers sequence classifier (`self.model`) called as (input_ids,
    attention_mask) that returns its logits tensor only."""

    model: nn.Module
    call: dict[str, object] = {}
    """Further keyword arguments of every call."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.call).logits


class BertLogits(SequenceLogits):
    """A BertForSequenceClassification."""

    def __init__(self, attention: str = "sdpa") -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ,
            num_labels=len(KEYWORDS),
        )
        config._attn_implementation = attention  # sdpa exports from opset 14 on
        self.model = transformers.BertForSequenceClassification(config)


class LlamaLogits(SequenceLogits):
    """A LlamaForSequenceClassification (RMSNorm, rotary embeddings, 4 query heads
    sharing 2 K/V heads, SwiGLU FFN); it reads the last token before the padding, as
    Llama classifiers do."""

    call = {"use_cache": False}

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.LlamaConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ,
            pad_token_id=0,
            num_labels=len(KEYWORDS),
        )
        config._attn_implementation = "eager"
        self.model = transformers.LlamaForSequenceClassification(config)


class AlbertLogits(SequenceLogits):
    """An AlbertForSequenceClassification (one set of layer weights run at both depths,
    a factorized 64-wide embedding)."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.AlbertConfig(
            embedding_size=64,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ,
            num_labels=len(KEYWORDS),
        )
        self.model = transformers.AlbertForSequenceClassification(config)


class PixelLogits(nn.Module):
    """A transformers image classifier (`self.model`) called on pixel_values that
    returns its logits tensor only."""

    model: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


class ConvNextV2Logits(PixelLogits):
    """A ConvNextV2ForImageClassification (depthwise 7x7 convs, LayerNorms over the
    channels, a Global Response Norm in every FFN) of widths 16 / 32 / 64 / 128 for
    32x32 inputs, returning its logits tensor only."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.ConvNextV2Config(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10
        )
        self.model = transformers.ConvNextV2ForImageClassification(config)


class MobileViTLogits(PixelLogits):
    """A MobileViTForImageClassification (MobileNetV2 blocks, then transformer blocks
    over unfolded 2x2 patches) for 32x32 inputs, returning its logits tensor only."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.MobileViTConfig(
            image_size=32,
            hidden_sizes=[32, 48, 64],
            neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 64],
            num_labels=10,
        )
        self.model = transformers.MobileViTForImageClassification(config)


def build(arch: str) -> tuple[nn.Module, Task]:
    """The untrained module and its task."""
    torch.manual_seed(0)
    if arch == "bert":
        return BertLogits(), keyword_task()
    if arch == "detector":
        return TextDetector(), detection_task()
    import torchvision

    return getattr(torchvision.models, arch)(num_classes=10, weights=None), digits_task()


def final_layer(module: nn.Module) -> nn.Module:
    """The layer whose outputs are the model's classes (or map): never pruned."""
    if isinstance(module, BertLogits):
        return module.model.classifier
    if isinstance(module, TextDetector):
        return module.up2
    return module.fc if hasattr(module, "fc") else module.classifier[-1]


def example(task: Task, n: int = 1) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(v[:n]) for v in task.train.values())


def export(module: nn.Module, task: Task, opset: int = OPSET) -> onnx.ModelProto:
    """The module in eval mode as ONNX (TorchScript exporter, batch and sequence dynamic)."""
    names = list(task.train)
    axes = {0: "batch", 1: "seq"} if "input_ids" in names else {0: "batch"}
    buf = io.BytesIO()
    torch.onnx.export(
        module.eval(),
        example(task, 2),
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=names,
        output_names=["output"],
        dynamic_axes={**{n: axes for n in names}, "output": {0: "batch"}},
    )
    return onnx.load_from_string(buf.getvalue())


def train(module: nn.Module, task: Task, epochs: int, lr: float = 2e-3, seed: int = 0) -> None:
    """Plain supervised training from scratch (cross-entropy, or BCE for the map)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    inputs = [torch.from_numpy(v) for v in task.train.values()]
    labels = torch.from_numpy(task.y_train)
    steps = epochs * -(-len(labels) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 64):
            idx = order[start : start + 64]
            out = module(*(t[idx] for t in inputs))
            if task.dense:
                loss = F.binary_cross_entropy(out, labels[idx])
            else:
                loss = F.cross_entropy(out, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    recalibrate_batchnorm(module, inputs)
    module.eval()


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, inputs: list[torch.Tensor]) -> None:
    """BatchNorm running statistics as the exact average over the training inputs.

    torchvision's MobileNetV3 uses momentum 0.01: after a few hundred steps its
    running statistics still remember the untrained network, and the model is at
    chance in eval mode although it fits the data in train mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    module.train()
    for start in range(0, len(inputs[0]), 256):
        module(*(t[start : start + 256] for t in inputs))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


def metric(task: Task, out: np.ndarray) -> float:
    """Accuracy, or for the map the IoU of (p > 0.5) with the target over the split."""
    if task.dense:
        pred, truth = out > 0.5, task.y_val > 0.5
        return float((pred & truth).sum() / max((pred | truth).sum(), 1))
    return float((out.argmax(1) == task.y_val).mean())
