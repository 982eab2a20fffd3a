"""Run an ONNX graph as a trainable torch module, then write the weights back.

Distillation needs gradients, and ONNX has none. Rather than converting the
file to torch code and re-exporting it (onnx2torch + torch.onnx.export: two
lossy translations that rename nodes, change opsets and sometimes fail), we
interpret the graph node by node with torch ops, make its float weight
initializers `nn.Parameter`s, train, and copy the trained values back into
the very same ONNX graph. The architecture never changes in training, so the
file keeps its names, opset and metadata, and only weights move.

A graph that uses an operator outside `OPS` is refused up front with the
operator and node named, before any training time is spent.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from edgeslim.compressor.torchgraph_ops import (
    OPS,
    SHAPE_OPS,
    WEIGHT_POSITIONS,
    UnsupportedModel,
    _constant,
)

__all__ = ["OPS", "OnnxModule", "UnsupportedModel", "check_supported"]

Attrs = dict[str, Any]

# Inputs that decide an output's shape: when one of them is computed from input values
# (not from shapes or constants), shape-only values cannot be cached per input shape.
SHAPE_ARGS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 3),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "TopK": (1,),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "CumSum": (1,),
    "Trilu": (1,),
}
# Operators whose output shape depends on input values however the graph is built.
VALUE_SHAPED = {"NonZero", "Compress", "Unique"}
SHAPE_CACHE_SIZE = 16


def _is_float(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def check_supported(model: onnx.ModelProto) -> None:
    """Raise UnsupportedModel naming every operator the bridge cannot run."""
    bad = sorted(
        {
            f"{n.op_type} (node {n.name or n.output[0]!r})"
            for n in model.graph.node
            if n.op_type not in OPS or n.domain not in ("", "ai.onnx")
        }
    )
    if bad:
        raise UnsupportedModel(
            "the torch bridge used for training cannot run operator "
            + ", ".join(bad[:5])
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + "; supported: "
            + ", ".join(sorted(OPS))
        )


def _weight_names(graph: onnx.GraphProto) -> set[str]:
    """Tensor names read where an operator takes a trainable weight."""
    names: set[str] = set()
    for n in graph.node:
        if n.op_type not in WEIGHT_POSITIONS:
            continue
        positions = WEIGHT_POSITIONS[n.op_type]
        for i, name in enumerate(n.input):
            if name and (positions is None or i in positions):
                names.add(name)
    return names


class OnnxModule(nn.Module):
    """An ONNX graph executed with torch ops; float weights are parameters.

    Weights are float initializers or Constant-node values read where an
    operator takes a weight (Conv/Gemm/MatMul/norm scales, Add/Mul operands,
    embedding tables). Nodes that read only constants are evaluated once here;
    nodes that read only shapes (Shape -> Gather -> Unsqueeze -> Concat ->
    Reshape chains) are evaluated once per input shape and cached.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        check_supported(model)
        graph = model.graph
        opset = opset_of(model)
        self.nodes = list(graph.node)
        self.attrs: list[Attrs] = [
            {
                **{a.name: helper.get_attribute_value(a) for a in n.attribute},
                "_opset": opset,
                "_outputs": len(n.output),
            }
            for n in self.nodes
        ]
        initializers = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        # Intermediate tensors forward() returns after the outputs (feature distillation).
        self.extra_outputs: list[str] = []
        weight_inputs = _weight_names(graph)
        bn_stats = {
            name for n in graph.node if n.op_type == "BatchNormalization" for name in n.input[3:5]
        }
        self.param_names: dict[str, str] = {}  # onnx tensor name -> parameter key
        self.constants: dict[str, Tensor] = {}
        self.params = nn.ParameterDict()

        def add(name: str, value: Tensor) -> None:
            trainable = (
                value.is_floating_point()
                and name in weight_inputs
                and value.numel() > 1
                and name not in bn_stats  # running statistics are not weights
            )
            if trainable:
                key = f"p{len(self.param_names)}"
                self.param_names[name] = key
                self.params[key] = nn.Parameter(value)
            else:
                self.constants[name] = value

        for init in graph.initializer:
            add(init.name, torch.from_numpy(numpy_helper.to_array(init).copy()))
        for node, attrs in zip(self.nodes, self.attrs, strict=True):
            if node.op_type == "Constant":
                add(node.output[0], _constant([], attrs))
        self._classify()

    def _classify(self) -> None:
        """Fold constant-only nodes now; mark shape-only nodes for the per-shape cache."""
        static = set(self.constants)
        shape_only: set[str] = set()
        self.run_nodes: list[int] = []  # evaluated on every forward
        self.shape_nodes: set[int] = set()  # evaluated once per input shape
        value_shaped = False
        for i, (node, attrs) in enumerate(zip(self.nodes, self.attrs, strict=True)):
            if node.op_type == "Constant":
                continue
            inputs = [name for name in node.input if name]
            if all(name in static for name in inputs):
                with torch.no_grad():
                    outs = self._call(node, attrs, [self.constants[n] for n in inputs], node.input)
                for name, value in zip(node.output, outs, strict=False):
                    self.constants[name] = value
                    static.add(name)
                continue
            if node.op_type in VALUE_SHAPED:
                value_shaped = True
            for pos in SHAPE_ARGS.get(node.op_type, ()):
                if pos < len(node.input) and node.input[pos]:
                    name = node.input[pos]
                    if name not in static and name not in shape_only:
                        value_shaped = True
            self.run_nodes.append(i)
            if node.op_type in SHAPE_OPS or all(n in static or n in shape_only for n in inputs):
                self.shape_nodes.add(i)
                shape_only.update(node.output)
        if value_shaped:  # output shapes depend on values: nothing can be cached per shape
            self.shape_nodes = set()
        self.shape_outputs = [
            name for i in sorted(self.shape_nodes) for name in self.nodes[i].output if name
        ]
        self._shape_cache: dict[tuple, dict[str, Tensor]] = {}

    def _call(
        self, node: onnx.NodeProto, attrs: Attrs, args: list[Tensor | None], names: Any
    ) -> tuple[Tensor, ...]:
        if node.op_type == "Constant":
            return (_constant([], attrs),)
        try:
            out = OPS[node.op_type](args, attrs)
        except UnsupportedModel as exc:
            raise UnsupportedModel(f"node {node.name!r} ({node.op_type}): {exc}") from exc
        return out if isinstance(out, tuple) else (out,)

    def forward(self, *inputs: Tensor) -> list[Tensor]:
        env: dict[str, Tensor] = dict(zip(self.input_names, inputs, strict=True))
        env.update(self.constants)
        env.update({name: self.params[key] for name, key in self.param_names.items()})
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        cached = self._shape_cache.get(key) if self.shape_nodes else None
        if cached is not None:
            env.update(cached)
        for i in self.run_nodes:
            if cached is not None and i in self.shape_nodes:
                continue
            node = self.nodes[i]
            args = [env[name] if name else None for name in node.input]
            outs = self._call(node, self.attrs[i], args, node.input)
            for name, value in zip(node.output, outs, strict=False):
                if name:
                    env[name] = value
        if cached is None and self.shape_nodes:
            if len(self._shape_cache) >= SHAPE_CACHE_SIZE:
                self._shape_cache.clear()
            self._shape_cache[key] = {n: env[n].detach() for n in self.shape_outputs}
        return [env[name] for name in [*self.output_names, *self.extra_outputs]]

    def weights(self) -> dict[str, Tensor]:
        return {name: self.params[key] for name, key in self.param_names.items()}

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with this module's trained weights in its initializers
        and Constant nodes."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        trained = {
            name: self.params[key].detach().cpu().numpy() for name, key in self.param_names.items()
        }
        for init in out.graph.initializer:
            if init.name in trained:
                dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
                init.CopyFrom(numpy_helper.from_array(trained[init.name].astype(dtype), init.name))
        for node in out.graph.node:
            if node.op_type == "Constant" and node.output[0] in trained:
                for attr in node.attribute:
                    if attr.name == "value":
                        dtype = helper.tensor_dtype_to_np_dtype(attr.t.data_type)
                        value = trained[node.output[0]].astype(dtype)
                        attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
                    elif attr.name == "value_floats":
                        del attr.floats[:]
                        attr.floats.extend(trained[node.output[0]].reshape(-1).tolist())
        return out
