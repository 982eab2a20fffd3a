"""The torch bridge on whole exported architectures matches onnxruntime.

torchvision's mobilenet_v3_small (hard-swish, squeeze-excite, depthwise) and
resnet18, a small BERT from a transformers config (attention-mask logic,
Erf-GELU, LayerNorm, Gather embeddings, shape chains) and a detection /
segmentation-style head (Resize, ConvTranspose, Pad, Split, InstanceNorm,
PRelu), each exported at opsets 11, 13 and 17 with random weights. Nothing is
downloaded.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeslim.compressor.torchgraph import OnnxModule
from tests.archs import export

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

RNG = np.random.default_rng(0)


class SegHead(torch.nn.Module):
    """A small encoder-decoder with the layout ops of detection and segmentation heads."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.norm = nn.InstanceNorm2d(16, affine=True)
        self.prelu = nn.PReLU(16)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.fuse = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        s = self.prelu(self.norm(self.stem(x)))
        a, b = torch.split(s, 8, dim=1)
        a = f.softplus(self.up(a))
        b = f.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=False)
        y = self.fuse(f.pad(torch.cat([a, b], 1), (1, 1, 1, 1), mode="reflect"))
        y = f.interpolate(y, size=(x.shape[2], x.shape[3]), mode="nearest")
        return torch.sigmoid(y)


def build(arch: str, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    if arch == "bert":
        config = transformers.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=1000,
            max_position_embeddings=32,
        )
        config._attn_implementation = "eager" if opset < 14 else "sdpa"  # sdpa exports from 14
        module = transformers.BertForSequenceClassification(config)
        ids = torch.randint(0, 1000, (2, 8))
        model = export(module, (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], opset)
        mask = np.ones((3, 10), np.int64)
        mask[0, 6:] = 0  # padding: the attention-mask path (Cast, Sub, Mul, Where) runs
        return model, {"input_ids": RNG.integers(0, 1000, (3, 10)), "attention_mask": mask}
    if arch == "seghead":
        module = SegHead()
    else:
        module = getattr(torchvision.models, arch)(num_classes=10, weights=None)
    model = export(module, (torch.randn(1, 3, 32, 32),), ["input"], opset)
    return model, {"input": RNG.normal(size=(2, 3, 32, 32)).astype(np.float32)}


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18", "bert", "seghead"])
def test_bridge_matches_onnxruntime_on_exported_architectures(arch: str, opset: int) -> None:
    model, feeds = build(arch, opset)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]
    module = OnnxModule(model)
    assert module.param_names, "no trainable weights found"
    with torch.no_grad():
        got = module(*(torch.from_numpy(feeds[n]) for n in module.input_names))[0].numpy()
        again = module(*(torch.from_numpy(feeds[n]) for n in module.input_names))[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(again, got)  # the second run reuses the cached shape values


def test_constant_node_weights_are_trained_and_written_back_in_place() -> None:
    """Weights stored as Constant nodes (as some exporters write them) are parameters too,
    and write_back puts the trained values into those nodes, not into new initializers."""
    model, feeds = build("mobilenet_v3_small", 11)
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    constants = [
        onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
        for t in floats
    ]
    keep = [t for t in model.graph.initializer if t.data_type != onnx.TensorProto.FLOAT]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    module = OnnxModule(model)
    assert len(module.param_names) == 71  # every conv and linear weight and bias
    with torch.no_grad():
        got = module(torch.from_numpy(feeds["input"]))[0].numpy()
        np.testing.assert_allclose(got, session.run(None, feeds)[0], rtol=1e-3, atol=1e-4)
        for weight in module.weights().values():
            weight.mul_(0.5)
        halved = module(torch.from_numpy(feeds["input"]))[0].numpy()
    updated = module.write_back(model)
    assert len(updated.graph.initializer) == len(keep)  # still Constant nodes
    assert [n.name for n in updated.graph.node] == [n.name for n in model.graph.node]
    session = ort.InferenceSession(updated.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, feeds)[0], halved, rtol=1e-3, atol=1e-4)
