"""Distillation recovers and never silently costs accuracy.

A MobileNetV3-style classifier (depthwise convs, squeeze-excite with
hard-sigmoid, hard-swish, residual adds, BatchNorm folded into the convs by the
export, Dropout, opset 11) trained briefly on scikit-learn digits upscaled to
16x16, then pruned slightly and distilled with the pipeline step: the held-out
split the step reports is scored independently in onnxruntime, and it may not
be lower than the input's.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgeslim.api.spec import DistillConfig, PruneConfig
from edgeslim.compressor import datasets
from edgeslim.compressor.distill import KEPT_INPUT_NOTE, Distill, _split
from edgeslim.compressor.prune import Prune
from edgeslim.compressor.steps import StepContext
from edgeslim.errors import BadInput

SIZE = 16


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 4, 1)
        self.fc2 = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(w))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.Hardswish(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Hardswish(),
            SqueezeExcite(mid),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV3Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.Hardswish(),
            InvertedResidual(16, 32, 16, 1),
            InvertedResidual(16, 48, 24, 2),
            nn.Conv2d(24, 48, 1, bias=False),
            nn.BatchNorm2d(48),
            nn.Hardswish(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(48, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(pooled, 1))


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear").repeat(1, 3, 1, 1)
    order = np.random.default_rng(0).permutation(len(d.target))
    return x.numpy()[order], d.target.astype(np.int64)[order]


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Path]:
    """The trained model (opset 11) and a 512-sample labelled distillation set."""
    out = tmp_path_factory.mktemp("mnv3")
    x, y = digits_images()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = MobileNetV3Like()
    optimiser = torch.optim.Adam(module.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[:800]), torch.from_numpy(y[:800])
    for _ in range(6):  # briefly: the teacher is good, not converged
        module.train()
        for idx in torch.randperm(800).split(32):
            loss = nn.functional.cross_entropy(module(xt[idx]), yt[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    buf = io.BytesIO()
    torch.onnx.export(
        module.eval(),
        (torch.randn(1, 3, SIZE, SIZE),),
        buf,
        dynamo=False,
        opset_version=11,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    np.savez(out / "distill.npz", x=x[800:1312], y=y[800:1312])
    return onnx.load_from_string(buf.getvalue()), out / "distill.npz"


def context(source: onnx.ModelProto, tmp_path: Path) -> StepContext:
    return StepContext(
        source=source,
        workdir=tmp_path,
        load_dataset=lambda uri, sha, model: datasets.load(Path(uri), model, uri),
        load_model=lambda uri, sha: onnx.load(uri),
        evaluation_dataset="",
    )


def held_out_accuracy(model: onnx.ModelProto, dataset: Path, cfg: DistillConfig) -> float:
    data = np.load(dataset)
    _, held = _split(len(data["y"]), cfg.validation_split, cfg.seed)
    idx = held.numpy()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data["x"][idx]})[0]
    return float((logits.argmax(1) == data["y"][idx]).mean())


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_distilling_a_slightly_pruned_mobilenet_does_not_lose_held_out_accuracy(
    mobilenet, tmp_path: Path
) -> None:
    source, dataset = mobilenet
    ctx = context(source, tmp_path)
    pruned = Prune(PruneConfig(method="magnitude", sparsity=0.1)).run(source, ctx).model
    cfg = DistillConfig(dataset=str(dataset), epochs=5, batch_size=32)
    out = Distill(cfg).run(pruned, ctx)

    before = held_out_accuracy(pruned, dataset, cfg)
    after = held_out_accuracy(out.model, dataset, cfg)
    assert after >= before, (before, after, out.notes)
    notes = " | ".join(out.notes)
    assert re.search(r"\d+ of 5 epochs on 410 samples", notes), notes
    held = re.search(
        r"held out 102 samples: input accuracy ([\d.]+) .* best epoch (\d+) accuracy ([\d.]+)",
        notes,
    )
    assert held, notes
    assert float(held.group(1)) == pytest.approx(before, abs=1e-4)  # the step scored it right
    assert float(held.group(3)) == pytest.approx(after, abs=1e-4)
    if int(held.group(2)) == 0:
        assert KEPT_INPUT_NOTE in out.notes
        assert weights(out.model).keys() == weights(pruned).keys()
    else:
        assert f"kept the weights of epoch {held.group(2)}" in out.notes


def test_a_run_that_only_hurts_returns_the_input_weights_and_says_so(
    mobilenet, tmp_path: Path
) -> None:
    source, dataset = mobilenet
    # A learning rate no trained model survives: every epoch is worse than the input.
    cfg = DistillConfig(
        dataset=str(dataset), epochs=4, learning_rate=1.0, patience=2, schedule="constant"
    )
    out = Distill(cfg).run(source, context(source, tmp_path))
    assert KEPT_INPUT_NOTE in out.notes
    assert any(re.search(r"^2 of 4 epochs .*stopped early", n) for n in out.notes), out.notes
    got, want = weights(out.model), weights(source)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def test_an_epoch_draws_the_datasets_size_from_the_training_split(
    mobilenet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holding out a fifth of the data must not also cut a fifth of the optimiser
    steps: every epoch takes as many samples as the whole dataset holds (512), drawn
    evenly from the 410 training samples, and never one of the 102 held out."""
    from edgeslim.compressor import distill

    source, dataset = mobilenet
    drawn: list[np.ndarray] = []
    real = distill._shuffled_batches

    def recorded(idx, batch):
        for b in real(idx, batch):
            drawn.append(b.numpy())
            yield b

    monkeypatch.setattr(distill, "_shuffled_batches", recorded)
    cfg = DistillConfig(dataset=str(dataset), epochs=2, batch_size=32, patience=5)
    out = Distill(cfg).run(source, context(source, tmp_path))
    assert any(n.startswith("2 of 2 epochs on 410 samples") for n in out.notes), out.notes
    assert len(drawn) == 2 * 16  # 2 epochs of ceil(512 / 32) steps, not ceil(410 / 32)
    counts = np.bincount(np.concatenate(drawn), minlength=512)
    _, held = _split(512, cfg.validation_split, cfg.seed)
    assert (counts[held.numpy()] == 0).all()
    train = np.setdiff1d(np.arange(512), held.numpy())
    assert len(train) == 410 and set(counts[train].tolist()) == {2, 3}  # 1024 draws of 410


def test_intermediate_features_are_matched_and_unknown_names_refused(
    mobilenet, tmp_path: Path
) -> None:
    source, dataset = mobilenet
    ctx = context(source, tmp_path)
    pooled = next(n.output[0] for n in source.graph.node if n.op_type == "GlobalAveragePool")
    pruned = Prune(PruneConfig(method="magnitude", sparsity=0.1)).run(source, ctx).model
    cfg = DistillConfig(dataset=str(dataset), epochs=2, batch_size=32, features=[pooled])
    out = Distill(cfg).run(pruned, ctx)
    assert "matching 1 intermediate tensors as well" in out.notes
    assert held_out_accuracy(out.model, dataset, cfg) >= held_out_accuracy(pruned, dataset, cfg)
    onnx.checker.check_model(out.model)

    bad = DistillConfig(dataset=str(dataset), epochs=1, features=["no/such/tensor"])
    with pytest.raises(BadInput, match="'no/such/tensor' is not a tensor computed in the source"):
        Distill(bad).run(source, ctx)


def held_out_loss(notes: list[str]) -> float:
    found = re.search(r"best epoch \d+ accuracy [\d.]+ \(loss ([\d.]+)\)", " | ".join(notes))
    assert found, notes
    return float(found.group(1))


def test_batchnorm_put_back_into_a_pruned_folded_cnn_recovers_more(
    mobilenet, tmp_path: Path
) -> None:
    """The export folded every BatchNorm into its Conv; half the channels pruned away
    leave the rest shifted. With the norms put back for training (set to the source's
    statistics of the kept channels where a conv lost no input or feeds a hard-swish,
    batch statistics,
    folded back after), the same
    epochs recover more than training the bare convs."""
    source, dataset = mobilenet
    ctx = context(source, tmp_path)
    pruned = Prune(PruneConfig(method="structured", sparsity=0.5)).run(source, ctx).model
    results = {}
    for batch_norm in (True, False):
        cfg = DistillConfig(dataset=str(dataset), epochs=4, batch_size=32, batch_norm=batch_norm)
        out = Distill(cfg).run(pruned, ctx)
        results[batch_norm] = held_out_accuracy(out.model, dataset, cfg), held_out_loss(out.notes)
        if batch_norm:
            assert (
                # Matched to the source: the 3 convs that lost no input channel (the stem
                # and the depthwise convs) and the 3 that did but feed a hard-swish;
                # pruning recorded the other 2 as unmatched.
                "trained with BatchNorm after 8 convolutions (6 set to the source's channel "
                "statistics), folded back after"
            ) in out.notes
            # Folded back: the same nodes and weight shapes as the pruned input.
            assert [n.name for n in out.model.graph.node] == [n.name for n in pruned.graph.node]
            shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
            assert {t.name: list(t.dims) for t in out.model.graph.initializer} == shapes
    (acc_bn, loss_bn), (acc_bare, loss_bare) = results[True], results[False]
    assert loss_bn < 0.95 * loss_bare, results
    assert acc_bn > acc_bare, results


def test_batchnorm_folds_back_exactly(mobilenet) -> None:
    """Norms set to a model's own channel statistics are the identity, and folding
    them into the convs changes no output."""
    from edgeslim.compressor.distill_norm import RenormStudent

    source, dataset = mobilenet
    x = np.load(dataset)["x"][:64]
    student = RenormStudent(source)
    added, matched = student.attach([torch.from_numpy(x)], 32, source)
    assert added == matched == 8
    student.fold()
    out = student.write_back(source)
    session = lambda m: ort.InferenceSession(m.SerializeToString())  # noqa: E731
    want = session(source).run(None, {"input": x})[0]
    got = session(out).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
