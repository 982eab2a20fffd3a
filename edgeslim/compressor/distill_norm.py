"""BatchNorm put back into a BN-folded student for the length of a distillation.

Exporters fold every BatchNormalization into the Conv before it, so the ONNX
graph of a trained CNN has no normalisation left. Structured pruning then
removes input channels of every Conv: the channels it keeps are shifted and
rescaled (measured on mobilenet_v3_small at sparsity 0.5: the pruned model is at
chance), and a BN-free student learns its way back slowly and unstably, where
the same network pruned as an `nn.Module` (Torch-Pruning) still has its BN
layers and recovers with the same epochs and learning rate.

So, for the training only, every Conv / ConvTranspose output with a spatial map
gets a BatchNorm (`RenormStudent`):

- its running statistics are measured on the training inputs and its scale and
  shift are set so that, in eval mode, it is the identity: the function scored
  before training is exactly the input model's;
- it trains in train mode (batch statistics), which conditions the optimisation
  as the original BN layers did;
- before each held-out score its running statistics are re-estimated exactly
  over the training inputs (a no-grad pass), so the score is that of the model
  that would be written;
- at the end it is folded back into the Conv's weight and bias: the written
  graph has the same nodes, names and shapes as the input.

Convs in a squeeze-excite branch (after a global pooling) and the last Conv
before an output keep no BN, as in the original networks; Convs whose output already feeds a
BatchNormalization node, that share their weight with another node, or that
have no bias to fold into are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from edgeslim.compressor import channel_map
from edgeslim.compressor.torchgraph import OnnxModule
from edgeslim.cpus import compute_threads

NORM_OPS = ("Conv", "ConvTranspose")
# Layers that end the walk back from an output (the head ends at the first of them).
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# A conv in front of a BatchNorm is scale-free, so Adam's steps (of a fixed size) move
# it by lr / |W|. Folding made its weights gamma / std times those it was trained with
# (up to 20x on mobilenet_v3_small), so they get a larger step. Measured on
# mobilenet_v3_small pruned to 0.7, same epochs: 91-93% at 1x, 96.7% at 10x, where
# Torch-Pruning's unfolded module reaches 95.7%; a higher rate for the other
# parameters instead did not help (93%).
NORMED_LR_SCALE = 10.0
# BatchNorm epsilon: small, since the statistics are the conv output's own.
EPS = 1e-3


class _Norm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over dim 1 of an (N, C, ...) tensor of any rank (1-d to 3-d convs)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(f"expected an (N, C, ...) tensor, got {input.dim()}-d")


class RenormStudent(OnnxModule):
    """An `OnnxModule` whose eligible Conv outputs pass through a BatchNorm."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.kept = channel_map.read(model)  # what structured pruning recorded
        self.norm_keys: dict[str, str] = {}  # conv output tensor -> key in self.norms
        self.norms = nn.ModuleDict()
        self._measure: dict[str, list[Tensor]] | None = None
        self.conv_of: dict[str, onnx.NodeProto] = {}
        for node in _eligible(model.graph, self.param_names):
            key = f"n{len(self.norm_keys)}"
            self.norm_keys[node.output[0]] = key
            self.conv_of[key] = node

    def _call(self, node, attrs, args, names):  # type: ignore[no-untyped-def]
        outs = super()._call(node, attrs, args, names)
        key = self.norm_keys.get(node.output[0]) if node.op_type in NORM_OPS else None
        if key is None:
            return outs
        out = outs[0]
        if out.dim() < 3:
            return outs
        if self._measure is not None:  # calibration pass: sums per channel
            x = out.detach().transpose(0, 1).reshape(out.shape[1], -1).double()
            acc = self._measure.setdefault(key, [torch.zeros(()), 0, 0])
            acc[0] = acc[0] + x.sum(1)
            acc[1] = acc[1] + (x * x).sum(1)
            acc[2] += x.shape[1]
            return outs
        if key not in self.norms:
            return outs
        return (self.norms[key](out), *outs[1:])

    @torch.no_grad()
    def attach(self, inputs: list[Tensor], batch: int, source: onnx.ModelProto) -> tuple[int, int]:
        """Measure each eligible output over `inputs` and add its BatchNorm; returns
        (norms added, those matched to the source's channels).

        A norm whose channels are matched to the source's (`_source_channels`) takes
        the source's mean and standard deviation of them as its shift and scale, as
        the original BatchNorm's own shift and scale would restore them: the student's
        channels that pruning shifted are put back where the layers after them expect
        them. Unmatched norms start as the identity."""
        self._measure = {}
        try:
            self.eval()
            for start in range(0, len(inputs[0]), batch):
                self(*(t[start : start + batch] for t in inputs))
            stats = self._measure
        finally:
            self._measure = None
        names = {key: self.conv_of[key].output[0] for key in stats}
        wanted = {}
        for key, name in names.items():
            bias = self.params[self.param_names[self.conv_of[key].input[2]]]
            picked = _source_channels(source, name, bias.detach().numpy(), self.kept.get(name))
            if picked is not None:
                wanted[name] = picked
        target = _source_stats(source, wanted, [t.numpy() for t in inputs], batch)
        for key, (total, squares, count) in stats.items():
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0)
            goal_mean, goal_var = target.get(names[key], (mean, var))
            norm = _Norm(len(mean), eps=EPS)
            norm.running_mean.copy_(mean.float())
            norm.running_var.copy_(var.float())
            norm.weight.copy_((goal_var + EPS).sqrt().float())
            norm.bias.copy_(goal_mean.float())
            self.norms[key] = norm
        return len(stats), len(target)

    def param_groups(self, params: list[nn.Parameter], lr: float) -> list[dict]:
        """Optimiser groups: the weights of the convs with a norm after them at
        `NORMED_LR_SCALE` times the learning rate, the rest at it."""
        normed = {id(self.params[self.param_names[n.input[1]]]) for n in self.conv_of.values()}
        faster = [p for p in params if id(p) in normed]
        rest = [p for p in params if id(p) not in normed]
        groups = [{"params": faster, "lr": lr * NORMED_LR_SCALE}, {"params": rest, "lr": lr}]
        return [g for g in groups if g["params"]]

    def _rescale(self, key: str, scale: Tensor) -> None:
        """Multiply the conv's output channels (weight and bias) by `scale`."""
        node = self.conv_of[key]
        weight = self.params[self.param_names[node.input[1]]]
        bias = self.params[self.param_names[node.input[2]]]
        shape = [1] * weight.dim()
        shape[0 if node.op_type == "Conv" else 1] = -1  # ConvTranspose: [in, out, ...]
        weight.mul_(scale.reshape(shape))
        bias.mul_(scale)

    @torch.no_grad()
    def recalibrate(self, inputs: list[Tensor], batch: int) -> None:
        """Running statistics as the exact average over `inputs` (batch statistics
        of each batch averaged; momentum restored after)."""
        if not self.norms:
            return
        norms = list(self.norms.values())
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        self.train()
        for start in range(0, len(inputs[0]), batch):
            self(*(t[start : start + batch] for t in inputs))
        for m in norms:
            m.momentum = 0.1
        self.eval()

    @torch.no_grad()
    def fold(self) -> None:
        """Fold every BatchNorm (eval mode) into its Conv's weight and bias, then drop it."""
        for key, norm in self.norms.items():
            node = self.conv_of[key]
            bias = self.params[self.param_names[node.input[2]]]
            scale = norm.weight / (norm.running_var + norm.eps).sqrt()
            bias.sub_(norm.running_mean)
            self._rescale(key, scale)
            bias.add_(norm.bias)
        self.norms = nn.ModuleDict()


def _source_channels(
    source: onnx.ModelProto, name: str, bias: np.ndarray, recorded: np.ndarray | None
) -> np.ndarray | None:
    """The source's channels of the Conv output `name` that the student's channels are:
    as structured pruning recorded them (`channel_map`), else found by their bias
    (pruning slices in order and, without bias compensation, keeps each channel's bias
    as it was). None when the record says not to match, does not fit this source, or
    the channels cannot be told apart (trained or equal biases, another model)."""
    node = next((n for n in source.graph.node if name in n.output), None)
    if node is None or node.op_type not in NORM_OPS or len(node.input) < 3:
        return None
    init = next((t for t in source.graph.initializer if t.name == node.input[2]), None)
    if init is None:
        return None
    theirs = numpy_helper.to_array(init)
    if recorded is not None:
        fits = len(recorded) == len(bias) > 0 and (np.diff(recorded) > 0).all()
        return recorded if fits and recorded[0] >= 0 and recorded[-1] < len(theirs) else None
    if len(np.unique(theirs)) != len(theirs):
        return None
    where = {float(v): i for i, v in enumerate(theirs)}
    picked = np.array([where.get(float(v), -1) for v in bias])
    if (picked < 0).any() or (np.diff(picked) <= 0).any():
        return None
    return picked


def _source_stats(
    source: onnx.ModelProto, wanted: dict[str, np.ndarray], inputs: list[np.ndarray], batch: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and variance of the source's tensors in `wanted` over `inputs`,
    at the channels given."""
    from onnx import helper

    from edgeslim.compressor.evaluate import run, session

    if not wanted:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(source)
    del probe.graph.output[:]
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in wanted
    )
    weights = {t.name for t in probe.graph.initializer}
    feeds = [i.name for i in probe.graph.input if i.name not in weights]
    sess = session(probe, threads=compute_threads(), where="distill teacher")
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n in wanted}
    for start in range(0, len(inputs[0]), batch):
        feed = {k: v[start : start + batch] for k, v in zip(feeds, inputs, strict=True)}
        for n, out in zip(wanted, run(sess, feed, "distill teacher"), strict=True):
            x = np.moveaxis(out.astype(np.float64), 1, 0)[wanted[n]].reshape(len(wanted[n]), -1)
            acc = sums[n]
            acc[0], acc[1], acc[2] = acc[0] + x.sum(1), acc[1] + (x * x).sum(1), acc[2] + x.shape[1]
    result = {}
    for n, (total, squares, count) in sums.items():
        mean = total / count
        var = np.maximum(squares / count - mean * mean, 0)
        result[n] = torch.from_numpy(mean), torch.from_numpy(var)
    return result


def _eligible(graph: onnx.GraphProto, param_names: dict[str, str]) -> Iterable[onnx.NodeProto]:
    """Conv / ConvTranspose nodes a BatchNorm can be put after and folded back into."""
    uses: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = _head_tensors(graph)
    gated = _excite_tensors(graph)
    for n in graph.node:
        if n.op_type not in NORM_OPS or len(n.input) < 3:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "ConvTranspose" and group != 1:
            continue  # its weight's output axis is split by group
        w, b, out = n.input[1], n.input[2], n.output[0]
        if w not in param_names or b not in param_names or uses[w] > 1 or uses[b] > 1:
            continue
        if out in outputs or n.input[0] in gated:
            continue
        yield n


def _excite_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors of squeeze-excite branches: computed from a global pooling by ops with
    one activation input; their Convs never had a BatchNorm."""
    pools = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")
    computed = {o for n in graph.node if n.op_type != "Constant" for o in n.output}
    computed |= {i.name for i in graph.input}
    computed -= {t.name for t in graph.initializer}
    found: set[str] = set()
    for n in graph.node:  # graph order is topological
        # The branch ends where it meets another activation (the excite Mul).
        alone = all(i not in computed for i in n.input[1:])
        if n.op_type in pools or (n.input and n.input[0] in found and alone):
            found.update(n.output)
    return found


def _head_tensors(graph: onnx.GraphProto) -> set[str]:
    """The graph outputs and the tensors they are computed from without another weight
    layer between (a classifier's or a map head's last Conv keeps no BatchNorm)."""
    producer = {o: n for n in graph.node for o in n.output}
    heads: set[str] = set()
    todo = [o.name for o in graph.output]
    while todo:
        name = todo.pop()
        if name in heads:
            continue
        heads.add(name)
        node = producer.get(name)
        if node is not None and node.op_type not in WEIGHT_OPS and node.input:
            todo.append(node.input[0])
    return heads
