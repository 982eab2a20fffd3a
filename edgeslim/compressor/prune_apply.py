"""Structured pruning, part 3: remove the chosen units from the graph.

Every member (an initializer and an axis) keeps the indices whose ids survive;
a weight sliced on two axes (a Conv's out- and in-channels) is cut once with
both. A constant that other nodes also read is cut once where every reader
cuts it the same way (a weight that layers share), else copied first, so each
reader keeps its own. Fixups then rewrite what follows the channel count: a
depthwise Conv's `group`, Split sizes, Slice bounds, Resize sizes and Reshape
targets.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeslim.compressor import graph as g
from edgeslim.compressor.prune_graph import fresh_name
from edgeslim.compressor.prune_groups import Groups, Model


class Surgery:
    def __init__(self, groups: Groups, removed_units: set[int]) -> None:
        self.groups = groups
        self.m: Model = groups.d.m
        self.gone = np.isin(groups.roots, np.array(sorted(removed_units), dtype=np.int64))
        # (node, input index) -> {axis: keep mask}
        self.edits: dict[tuple[int, int], tuple[onnx.NodeProto, int, dict[int, np.ndarray]]] = {}
        for mem in groups.d.members.values():
            mask = ~self.gone[mem.ids]
            if mask.all():
                continue
            _, _, axes = self.edits.setdefault((id(mem.node), mem.index), (mem.node, mem.index, {}))
            axes[mem.axis] = axes[mem.axis] & mask if mem.axis in axes else mask
        self.in_place = self._agreed()
        self.rescaled: list[str] = []
        """Channel means given a Mul after them by `apply`, as "name by kept/all"."""

    def _agreed(self) -> set[str]:
        """Shared constants that every reader cuts the same way: cut once, so layers
        that share a weight keep sharing it."""
        cuts: dict[str, list[dict[int, np.ndarray]]] = {}
        for node, index, axes in self.edits.values():
            cuts.setdefault(node.input[index], []).append(axes)
        return {
            name
            for name, each in cuts.items()
            if len(each) == self.m.uses(name) > 1
            and all(_same_cut(axes, each[0]) for axes in each[1:])
        }

    def kept(self, ids: np.ndarray) -> int:
        return int((~self.gone[ids]).sum())

    def new_shape(self, shape: tuple[int, ...], axes: dict[int, np.ndarray]) -> list[int]:
        return [int(axes[a].sum()) if a in axes else d for a, d in enumerate(shape)]

    def predicted_parameters(self, before: int) -> int:
        """weight_stats' parameter count once the edits are applied."""
        uses: dict[str, int] = {}
        done: set[str] = set()
        total = before
        for node, index, axes in self.edits.values():
            name = node.input[index]
            if name in done:
                continue  # a shared constant, cut once for all its readers
            if name in self.in_place:
                done.add(name)
            init = self.m.inits[name]
            uses.setdefault(name, 1 if name in self.in_place else self.m.uses(name))
            old = _counted(init, list(init.dims))
            new = _counted(init, self.new_shape(tuple(init.dims), axes))
            if uses[name] > 1:  # a private copy is added, the shared original stays
                uses[name] -= 1
                total += new
            else:
                total += new - old
        return total

    def apply(self) -> None:
        names = self._names()
        done: set[str] = set()
        for node, index, axes in self.edits.values():
            name = node.input[index]
            if name in done:
                continue  # a shared constant, already cut for all its readers
            if name in self.in_place:
                done.add(name)
            else:
                name = self._own(node, index, names)
            arr = self.m.array(name)
            for axis, mask in axes.items():
                arr = np.compress(mask, arr, axis=axis)
            self._replace(name, np.ascontiguousarray(arr))
        for pick in self.groups.d.renumbered:  # after the cut above
            keep = ~self.gone[pick.ids]
            if keep.all():
                continue
            name = self._own(pick.node, 1, names)
            arr = self.m.array(name)
            position = np.cumsum(keep) - 1
            self._replace(name, position[arr % len(keep)].astype(arr.dtype))
        for fix in self.groups.d.fixups:
            value = int(fix.value(self.kept))
            if value == fix.value(lambda ids: len(ids)):
                continue  # nothing removed there: leave shared constants shared
            if isinstance(fix.where, str):
                self._set_attribute(fix.node, fix.where, fix.pos, value)
            else:
                name = self._own(fix.node, fix.where, names)
                arr = self.m.array(name).copy()
                arr.reshape(-1)[fix.pos] = value
                self._replace(name, arr)

        for node, ids in self.groups.d.channel_means:
            kept = self.kept(ids)
            if kept < len(ids):
                self._scale_output(node, kept / len(ids), names)
                self.rescaled.append(f"{node.name or node.output[0]} by {kept}/{len(ids)}")

    def _scale_output(self, node: onnx.NodeProto, factor: float, names: set[str]) -> None:
        """Multiply `node`'s output by `factor`: a Mul after it takes over the output's
        name, so its readers and the graph's outputs are unchanged."""
        out = node.output[0]
        raw = fresh_name(f"{out}_of_kept", names)
        scale = fresh_name(f"{node.name or out}_kept_share", names)
        dtype = helper.tensor_dtype_to_np_dtype(self.m.elem_type(node.input[0]))
        self.m.graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype), scale))
        self.m.inits = g.initializer_map(self.m.graph)
        node.output[0] = raw
        name = fresh_name(f"{node.name or out}_rescale", names)
        mul = helper.make_node("Mul", [raw, scale], [out], name=name)
        nodes = self.m.graph.node
        position = next(i for i, n in enumerate(nodes) if n is node)
        nodes.insert(position + 1, mul)
        mul = nodes[position + 1]  # the copy the graph holds
        self.m.producers[raw], self.m.producers[out] = node, mul
        self.m.consumers[raw], self.m.consumers[scale] = [mul], [mul]

    def add_to_input(self, readers: list[tuple[onnx.NodeProto, int]], delta: np.ndarray) -> None:
        """Add `delta` to the constant each (node, input index) reads, or make it that
        constant where the input is absent (a Conv or Gemm bias). Readers that share
        one constant, and no other node, keep sharing it; else each gets a copy."""
        names = self._names()
        given = {node.input[i] if i < len(node.input) else "" for node, i in readers}
        if len(given) == 1 and (name := given.pop()) and self.m.uses(name) == len(readers):
            arr = self.m.array(name)
            self._replace(name, (arr + delta).astype(arr.dtype))
            return
        new = ""
        for node, index in readers:
            if index < len(node.input) and node.input[index]:
                name = self._own(node, index, names)
                arr = self.m.array(name)
                self._replace(name, (arr + delta).astype(arr.dtype))
                continue
            if not new:  # one new bias for all the readers that have none
                weight = self.m.array(node.input[1])
                new = fresh_name(f"{node.name or node.output[0]}_bias", names)
                init = numpy_helper.from_array(delta.astype(weight.dtype), new)
                self.m.graph.initializer.append(init)
                self.m.inits = g.initializer_map(self.m.graph)
            while len(node.input) < index:
                node.input.append("")
            node.input.append(new)
            self.m.consumers.setdefault(new, []).append(node)

    def _names(self) -> set[str]:
        names = {t.name for t in self.m.graph.initializer} | set(self.m.producers)
        return names | self.m.graph_inputs

    def _replace(self, name: str, arr: np.ndarray) -> None:
        g.replace_initializer(self.m.graph, name, arr)
        self.m.arrays[name] = arr
        self.m.inits = g.initializer_map(self.m.graph)

    def _own(self, node: onnx.NodeProto, index: int, names: set[str]) -> str:
        """The constant at node.input[index], copied first when other readers share it."""
        old = node.input[index]
        if self.m.uses(old) <= 1:
            return old
        new = fresh_name(f"{old}__pruned", names)
        self.m.graph.initializer.append(numpy_helper.from_array(self.m.array(old), new))
        node.input[index] = new
        self.m.consumers[old].remove(node)
        self.m.consumers[new] = [node]
        self.m.inits = g.initializer_map(self.m.graph)
        return new

    @staticmethod
    def _set_attribute(node: onnx.NodeProto, name: str, pos: int | None, value: int) -> None:
        for a in node.attribute:
            if a.name == name:
                if pos is None:
                    a.i = value
                else:
                    a.ints[pos] = value
                return
        raise KeyError(f"{node.name} has no attribute {name}")


def _same_cut(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _counted(init: onnx.TensorProto, dims: list[int]) -> int:
    """Elements weight_stats counts for a tensor of this type and shape."""
    n = int(np.prod(dims)) if dims else 1
    if n < 16 or init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.STRING):
        return 0
    return n
