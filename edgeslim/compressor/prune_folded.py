"""Structured pruning: attention heads folded into the batch axis.

Exports with a dynamic batch often compute attention on [B*H, S, D] tensors
(DeBERTa's `view(-1, S, D)` before its bmm): the heads share one axis with the
batch, which sits outside them. A *folded* track (`Track.folded`) carries the
head ids on that axis; at run time it holds n copies of them in a row, n being
the batch (or a Tile's repeat count), so cutting heads leaves n * kept there.

Ways in: a Reshape [B, H, S, D] -> [-1, S, D]; a head split straight into the
batch, [S, B, H*D] -> [S, B*H, D] (nn.MultiheadAttention); a Tile of a head-tracked
tensor by a batch computed at run time (DeBERTa's position keys). Ways out: a
Reshape [-1, H, S, S], or the merge [S, B*H, D] -> [S*B, H*D]. Where B*H, H or
H*D is written (a fixed batch's constant, Mul(B, H)), it follows the kept heads.

Only ops that treat every index of that axis alike may read it (checked in
`Discovery.visit`): element-wise ops whose other operands have size 1 there or
are copies of one slice per head (a padding mask expanded over the heads), a
MatMul of two such tensors, Softmax over another axis, Transpose, and
GatherElements along another axis whose index was expanded to the folded size.
A `Shape` that reads the folded size may hand it on to a Div by H (which gives n
again; H follows the kept count) or to the shape of an Expand that makes such an
index.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from edgeslim.compressor.prune_graph import Block, Track, label

if TYPE_CHECKING:
    import onnx

    from edgeslim.compressor.prune_graph import Model
    from edgeslim.compressor.prune_groups import UnionFind

# Ops that may read a folded track (Reshape and Shape only by the rules below).
FOLDED_READERS = {
    "Transpose", "MatMul", "Softmax", "LogSoftmax", "GatherElements", "Reshape", "Shape",
    "Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Dropout", "Neg", "Exp",
    "Sqrt", "Tanh", "Sigmoid", "Relu", "Clip", "Erf",
}  # fmt: skip
# How far a folded size read by Shape is followed through shape arithmetic.
FOLDED_READ_DEPTH = 8


class FoldedHeads:
    """Rules for heads folded into the batch axis, mixed into Discovery."""

    m: Model
    chan: UnionFind
    tracks: dict[str, Track]
    folded_indices: dict[str, np.ndarray]
    folded_gathered: set[str]
    head_counts: dict[str, tuple[np.ndarray, set[str]]]

    def union(self, a: np.ndarray, b: np.ndarray) -> None: ...

    def block(self, ids: np.ndarray, reason: str) -> None: ...

    def _constant_fixup(self, at, value, where) -> None: ...

    def _sizes_read(self, node) -> list[tuple[str, int] | None]: ...

    def _shape_pieces(self, node): ...

    def _entry_at(self, reader, index: int, pos: int, depth: int = 0): ...

    def _fold_heads(self, node, t: Track, target, where) -> dict[str, Track] | None:
        """[B, H, S, D] -> [-1, S, D]: the axis before the heads folds into them. The
        other entries must keep their axes' sizes (constants, or sizes read at run time
        from axes that hold no heads); None if the Reshape is not this."""
        if t.folded or t.rank is None or len(target) != t.rank - 1:
            return None
        pos = t.pos(where)
        values = [v for v, _ in target]
        if pos < 1 or values[pos - 1] != -1 or values.count(-1) != 1:
            return None
        dims, out = self.m.dims(node.input[0]), self.m.dims(node.output[0])
        if dims is None or out is None or None in dims or None in out:
            return None
        merged = [*dims[: pos - 1], dims[pos - 1] * dims[pos], *dims[pos + 1 :]]
        if out != merged or not self._sizes_kept(node, target, skip=pos - 1):
            return None
        return {node.output[0]: Track(pos - t.rank, t.ids, t.rank - 1, folded=True)}

    def _split_heads_into_batch(self, node, t: Track, target, where) -> dict[str, Track] | None:
        """[S, B, H*D] -> [S, B*H, D], how nn.MultiheadAttention splits its heads: each
        head's D channels become one unit, folded into the axis before. B*H is -1, or
        (a fixed batch) a constant that then follows the kept heads; None if the
        Reshape is not this."""
        if t.folded or t.axis != -1 or t.rank is None or len(target) != t.rank or t.rank < 2:
            return None
        dims, out = self.m.dims(node.input[0]), self.m.dims(node.output[0])
        d = target[-1][0]
        if dims is None or out is None or None in dims or None in out or not d or d < 2:
            return None
        heads = t.size // d
        if t.size % d or heads < 2 or out != [*dims[:-2], dims[-2] * heads, d]:
            return None
        if not self._sizes_kept(node, target[:-1], skip=t.rank - 2):
            return None
        entry = self._folded_entry(node, target, t.rank - 2, dims[-2], heads, t.ids)
        if entry is None:
            return None
        units = self._heads(t.ids, d)
        self._entry_follows(entry, units, where)
        return {node.output[0]: Track(-2, units, t.rank, folded=True)}

    def _folded_entry(self, reshape, target, pos: int, outer: int, heads: int, ids) -> tuple | None:
        """How entry `pos` of a Reshape's `target` writes the folded size `outer` * H:
        (where, factor) for the Fixup that keeps it outer * kept ((None, 0) for -1; the
        constant of a fixed batch; H in Mul(n, H), factor 1), or None if it is none of
        these. A Mul is claimed for these heads, so call this last."""
        n, n_at = target[pos]
        if n == -1:
            return None, 0
        if n is not None:
            return (n_at, outer) if n_at is not None and n == outer * heads else None
        times = self._heads_times(reshape.input[1], pos, heads, reshape.output[0], ids)
        return None if times is None else (times, 1)

    def _entry_follows(self, entry: tuple, ids, where: str) -> None:
        """The Fixup of a `_folded_entry`: that many times the kept heads of `ids`."""
        at, factor = entry
        if at is not None:
            self._constant_fixup(at, lambda kept, ids=ids, b=factor: b * kept(ids), where)

    def _heads_times(self, shape: str, pos: int, heads: int, claimant: str, ids) -> tuple | None:
        """Where the head count is written when entry `pos` of the shape vector `shape`
        is a Concat part Unsqueeze(Mul(n, H)) or Reshape(Mul(n, H), [-1]), n computed
        (a batch read at run time: TorchScript's bsz * num_heads, dynamo's index shape):
        (Mul, input, 0) for a Fixup, else None. The Mul may size several shapes (the Q,
        K and V splits, every layer's index); each one it reaches must be claimed by a
        rule for these heads (checked at the end of discovery)."""
        concat = self.m.producers.get(shape)
        if concat is None or concat.op_type != "Concat" or pos >= len(concat.input):
            return None
        if any(self.m.dims(part) != [1] for part in concat.input):
            return None
        vector = self.m.producers.get(concat.input[pos])
        if vector is None or vector.op_type not in ("Unsqueeze", "Reshape"):
            return None
        mul = self.m.producers.get(vector.input[0])
        if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
            return None
        consts = [self.m.array(name) for name in mul.input]
        at = [k for k, c in enumerate(consts) if c is not None and c.size == 1]
        if len(at) != 1 or int(consts[at[0]].reshape(-1)[0]) != heads:  # type: ignore[union-attr]
            return None
        self.head_counts.setdefault(mul.output[0], (ids, set()))[1].add(claimant)
        return (mul, at[0], 0)

    def _unclaimed_head_counts(self) -> None:
        """Every Reshape or Expand whose shape a fixed-up head count reaches must have
        been claimed by a rule for those heads: nothing else may change size."""
        for name, (ids, claimed) in self.head_counts.items():
            stray = self._stray_size_reader(name, claimed, 0)
            if stray is not None:
                self.block(ids, f"the head count in {name} also sizes {stray}")

    def _stray_size_reader(self, name: str, claimed: set[str], depth: int) -> str | None:
        if depth > FOLDED_READ_DEPTH or name in self.m.outputs:
            return name
        for r in self.m.consumers.get(name, []):
            if r.op_type in ("Reshape", "Expand") and name == r.input[1]:
                if r.output[0] not in claimed:
                    return label(r)
                continue
            if r.op_type in ("Equal", "Shape"):
                continue
            if r.op_type not in ("Unsqueeze", "Squeeze", "Concat", "Cast", "Reshape", "Where"):
                return label(r)
            stray = self._stray_size_reader(r.output[0], claimed, depth + 1)
            if stray is not None:
                return stray
        return None

    def _merge_folded_heads(self, node, t: Track, target, where) -> dict[str, Track] | None:
        """[S, B*H, D] -> [S*B, H*D], nn.MultiheadAttention's way back: each head id
        repeats over its D channels on the last axis, whose H*D follows the kept heads.
        The leading entries regroup the rest (-1, constants, sizes read at run time)."""
        dims, out = self.m.dims(node.input[0]), self.m.dims(node.output[0])
        pos = t.pos(where)
        if dims is None or out is None or None in dims or None in out:
            return None
        if pos != t.rank - 2 or len(target) != t.rank - 1:  # type: ignore[operator]
            return None
        d, (v, v_at) = dims[-1], target[-1]
        if out[-1] != t.size * d or math.prod(out[:-1]) * t.size != math.prod(dims[:-1]):
            return None
        if v != -1 and (v != t.size * d or v_at is None):
            return None
        if not self._sizes_kept(node, target[:-1], skip=-1):
            return None
        if v != -1:
            self._constant_fixup(v_at, lambda kept, ids=t.ids, d=d: kept(ids) * d, where)
        rank = t.rank - 1  # type: ignore[operator]
        return {node.output[0]: Track(-1, np.repeat(t.ids, d), rank)}

    def _unfold_heads(self, node, t: Track, target, where) -> dict[str, Track]:
        """[B*H, S, S] -> [-1, H, S, S]: the heads come out of the batch axis, on an
        axis of their own whose H follows the kept heads (B may be written: a fixed
        batch)."""
        merged = self._merge_folded_heads(node, t, target, where)
        if merged is not None:
            return merged
        pos = t.pos(where)
        values = [v for v, _ in target]
        dims, out = self.m.dims(node.input[0]), self.m.dims(node.output[0])
        if (
            len(target) != t.rank + 1  # type: ignore[operator]
            or dims is None
            or None in dims
            or values[pos] not in (-1, dims[pos] // t.size)
            or values[pos + 1] != t.size
            or target[pos + 1][1] is None
            or out is None
            or out != [*dims[:pos], dims[pos] // t.size, t.size, *dims[pos + 1 :]]
            or not self._sizes_kept(node, target, skip=pos)
        ):
            raise Block(f"{where} takes the heads out of the batch axis in a way not followed")
        self._constant_fixup(target[pos + 1][1], lambda kept, ids=t.ids: kept(ids), where)
        rank = t.rank + 1  # type: ignore[operator]
        return {node.output[0]: Track(pos + 1 - rank, t.ids, rank)}

    def _sizes_kept(self, node, target, skip: int) -> bool:
        """Whether every entry of a Reshape's target but `skip` is a constant or a size
        read at run time from an axis that carries no channels."""
        read = self._sizes_read(node)
        for j, (value, _) in enumerate(target):
            if j == skip or value is not None:
                continue
            if j >= len(read) or read[j] is None:
                return False
            name, k = read[j]
            held = self.tracks.get(name)
            if held is not None and held.rank is not None and held.rank + held.axis == k:
                return False
        return True

    def _tiled_into_batch(self, t: Track, repeats: list, where) -> Track | None:
        """Tile [H, S, D] by [n, 1, 1] with n computed at run time (DeBERTa's position
        keys, repeated over the batch): n copies of the heads in a row, a folded track."""
        pos = t.pos(where)
        if (
            t.folded
            or repeats[pos] is not None
            or any(r != 1 for j, r in enumerate(repeats) if j != pos)
        ):
            return None
        return replace(t, folded=True)

    def _folded_size_read(self, name: str, t: Track, where: str, depth: int = 0) -> bool:
        """Whether the folded size in `name` (read by Shape, then picked, cast and
        concatenated) only reaches a Div by the head count (the batch again: the count
        then follows the kept heads) or the shape of an Expand whose output is a
        GatherElements index (checked against its data when that is reached)."""
        readers = self.m.consumers.get(name, [])
        if name in self.m.outputs or depth > FOLDED_READ_DEPTH or self.m.uses(name) != len(readers):
            return False
        for r in readers:
            op = r.op_type
            if op in ("Equal", "Shape"):
                continue  # Where's test for -1, or the vector's length
            if op == "Div" and list(r.input).index(name) == 0:
                h = self.m.array(r.input[1])
                if h is None or h.size != 1 or int(h.reshape(-1)[0]) != t.size:
                    return False
                self._constant_fixup((r, 1, 0), lambda kept, ids=t.ids: kept(ids), where)
                continue
            if op == "Expand" and list(r.input) == [r.input[0], name] and r.input[0] != name:
                index = r.output[0]
                gathers = self.m.consumers.get(index, [])
                if not gathers or any(
                    gr.op_type != "GatherElements" or list(gr.input).index(index) != 1
                    for gr in gathers
                ):
                    return False
                self.folded_indices[index] = t.ids
                continue
            if op == "Where" and name == r.input[0]:
                return False
            vector = op == "Reshape" and name == r.input[0] and self.m.rank(name) in (0, 1)
            passes = op in ("Gather", "Unsqueeze", "Squeeze", "Cast", "Concat", "Identity", "Where")
            if not (vector or passes):
                return False
            if not self._folded_size_read(r.output[0], t, where, depth + 1):
                return False
        return True

    def _folded_gather(self, node, t: Track, where) -> dict[str, Track]:
        """GatherElements of folded scores by an index expanded to the folded size."""
        index = node.input[1]
        if index not in self.folded_indices:
            self._index_by_head_count(index, t, where)
        ids = self.folded_indices.get(index)
        if ids is None or len(ids) != t.size or self.m.dims(index) != self.m.dims(node.input[0]):
            raise Block(f"{where} has indices that cannot follow the heads in the batch axis")
        # The index's size follows the heads it was read from (or the head count a
        # shared constant holds: dynamo writes one index shape for every layer), so
        # those heads and the gathered ones go together, head by head.
        self.union(ids, t.ids)
        self.folded_gathered.add(index)
        return {node.output[0]: t}

    def _index_by_head_count(self, index: str, t: Track, where: str) -> None:
        """An index Expand(i, [H * n, S, S]) whose folded size is written as the head
        count times a size read at run time (torch's dynamo exporter multiplies the
        batch by H): H follows the kept heads. Every Expand to the same shape must then
        make the index of a folded gather (checked at the end of discovery)."""
        expand = self.m.producers.get(index)
        if expand is None or expand.op_type != "Expand" or len(expand.input) != 2:
            return
        pos = t.pos(where)
        dims, shape = self.m.dims(expand.input[0]), expand.input[1]
        if dims is None or len(dims) != t.rank or dims[pos] != 1:
            return
        readers = self.m.consumers.get(shape, [])
        if any(r.op_type != "Expand" or list(r.input).index(shape) != 1 for r in readers):
            return
        at = None
        for r in readers:
            at = self._heads_times(shape, pos, t.size, r.output[0], t.ids)
        if at is None:
            return
        self._constant_fixup(at, lambda kept, ids=t.ids: kept(ids), where)
        for r in readers:
            self.folded_indices.setdefault(r.output[0], t.ids)

    def _unchecked_folded_indices(self) -> None:
        """An Expand given a folded size must have made the index of a folded gather."""
        for index, ids in self.folded_indices.items():
            if index not in self.folded_gathered:
                self.block(ids, f"{index} is expanded to the size of heads folded into the batch")

    def _folded_operands(self, node: onnx.NodeProto, ins: list, where: str) -> Track | None:
        """The folded track among `ins`, after checking that every tracked input is
        folded alike and every other one has size 1 on that axis; None if none is."""
        tracked = [t for t in ins if t is not None]
        folded = [t for t in tracked if t.folded]
        if not folded:
            return None
        ref = folded[0]
        if any(not t.folded or t.axis != ref.axis or t.size != ref.size for t in tracked):
            raise Block(f"{where} meets heads folded into the batch axis with other channels")
        for t in tracked[1:]:
            self.union(ref.ids, t.ids)  # head by head, as the copies line up
        for name, t in zip(node.input, ins, strict=True):
            if t is not None or not name:
                continue
            dims = self.m.dims(name)
            wide = dims is None or (len(dims) >= -ref.axis and dims[ref.axis] != 1)
            if wide and not self._copies_over_heads(name, ref, where):
                raise Block(f"{where} meets heads folded into the batch axis with {name}")
        return ref

    def _copies_over_heads(self, name: str, t: Track, where: str) -> bool:
        """Whether `name` (read once) folds copies of one slice per head into the batch
        axis: Reshape(Expand(m, [.., H, ..]), [.., -1, ..]) with m of size 1 on the
        heads axis, as nn.MultiheadAttention folds a key padding mask [B, 1, 1, S] over
        its heads to [B*H, 1, S]. H of the Expand follows the kept heads, and so does
        the folded entry where it is written (B*H for a fixed batch, Mul(B, H))."""
        fold = self.m.producers.get(name)
        while (  # a scale the same for every copy (baddbmm's beta) keeps them copies
            fold is not None
            and self.m.uses(name) == 1
            and fold.op_type in ("Mul", "Div", "Add", "Sub", "Cast")
            and all(self.m.dims(i) in ([], [1]) for i in fold.input[1:])
            and all(self.m.array(i) is not None for i in fold.input[1:])
        ):
            name = fold.input[0]
            fold = self.m.producers.get(name)
        if fold is None or fold.op_type != "Reshape" or self.m.uses(name) != 1:
            return False
        expand = self.m.producers.get(fold.input[0])
        if expand is None or expand.op_type != "Expand" or self.m.uses(fold.input[0]) != 1:
            return False
        rank, k = self.m.rank(name), t.pos(where)
        dims, wide, out = (self.m.dims(n) for n in (expand.input[0], fold.input[0], name))
        shape, target = self.m.entries(expand.input[1]), self._shape_pieces(fold)
        if None in (rank, dims, wide, out, shape, target) or len(wide) != rank + 1:  # type: ignore[arg-type]
            return False
        h = k - rank  # the heads axis of the Expand (k + 1 of rank + 1), negative
        if len(dims) < -h or dims[h] != 1 or wide[h] != t.size or len(shape) < -h:  # type: ignore[arg-type,index]
            return False
        if out != [*wide[:k], wide[k] * t.size, *wide[k + 2 :]]:  # type: ignore[index]
            return False
        at = self._entry_at(expand, 1, len(shape) + h)  # type: ignore[arg-type]
        if at is None or shape[h] != t.size or len(target) != rank:  # type: ignore[index]
            return False
        entry = self._folded_entry(fold, target, k, wide[k], t.size, t.ids)  # type: ignore[index]
        if entry is None:
            return False
        self._constant_fixup(at, lambda kept, ids=t.ids: kept(ids), where)
        self._entry_follows(entry, t.ids, where)
        return True
