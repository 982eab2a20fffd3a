"""Structured pruning: how channel ids pass through layout ops.

Transpose and Gather move the channel axis; Flatten and Reshape fold it (each
id repeats over what is folded in with it; a [.., H*D] -> [.., H, D] split
turns the D ids of a head into one unit; folding the next axis in repeats each
id, as grouped-query attention's repeat_kv does); Expand keeps the channels
where they are; Concat, Split and Slice map offsets; Shape may read any size
but the channel count. A run of Reshapes and Transposes that no rule reads is
checked by executing it on index arrays (the channels may come out repeated, as
dynamo's folded grouped-query K does). Where a size written in the graph
must follow the pruned count (Reshape targets, Expand shapes, Split sizes,
Slice bounds, Resize sizes), a Fixup records it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from edgeslim.compressor.prune_graph import Block, Fixup, Renumber, Track, attr, label

if TYPE_CHECKING:
    from edgeslim.compressor.prune_graph import Model
    from edgeslim.compressor.prune_groups import UnionFind


# How a group kept whole because a Shape reads its channel count is noted.
SHAPE_READ = "its channel count is read by"
# A run of layout ops that moves the channels through other axes is checked by
# running it on index arrays: at most this many elements and ops.
LAYOUT_RUN_ELEMENTS = 1 << 20
LAYOUT_RUN_STEPS = 6


class LayoutOps:
    """Handlers for layout ops, mixed into Discovery (which provides the state)."""

    m: Model
    chan: UnionFind
    grp: UnionFind
    fixups: list[Fixup]
    renumbered: list[Renumber]
    head_splits: list[np.ndarray]

    def union(self, a: np.ndarray, b: np.ndarray) -> None: ...  # provided by Discovery

    def block(self, ids: np.ndarray, reason: str) -> None: ...

    def _nary(self, node, ins, where): ...

    def _expanded_constant(
        self, name: str, track: Track, reader: onnx.NodeProto
    ) -> onnx.NodeProto | None: ...

    def _transpose(self, node, ins, where):
        t = ins[0]
        perm = attr(node, "perm")
        rank = t.rank if perm is None else len(perm)
        if rank is None:
            raise Block(f"rank unknown at {where}")
        perm = list(perm) if perm is not None else list(reversed(range(rank)))
        new = perm.index(t.pos(where))
        return {node.output[0]: Track(new - rank, t.ids, rank, t.folded)}

    def _flatten(self, node, ins, where, axis: int | None = None):
        """[d0..dk-1, dk..] -> [outer, inner]: each channel id repeats over the positions
        folded in with it."""
        t = ins[0]
        rank = self.m.rank(node.input[0]) or 0
        dims = self.m.dims(node.input[0], need=tuple(range(1, rank)))  # the batch may vary
        if not dims:
            raise Block(f"shape of {node.input[0]} unknown at {where}")
        rank = len(dims)
        channel = rank + t.axis
        axis = int(attr(node, "axis", 1)) if axis is None else axis
        axis = axis + rank if axis < 0 else axis
        if channel < axis:
            raise Block(f"{where} folds the channels into the leading axis")
        before, after = dims[axis:channel], dims[channel + 1 :]
        if any(d is None for d in [*before, *after]):
            raise Block(f"spatial size unknown at {where}")
        outer, inner = math.prod(before), math.prod(after)  # type: ignore[arg-type]
        # Column of (o, c, i) in the flattened row is (o * C + c) * inner + i.
        ids = np.tile(np.repeat(t.ids, inner), outer)
        return {node.output[0]: Track(-1, ids, 2)}

    def _reshape(self, node, ins, where):
        t = ins[0]
        if t is None or ins[1] is not None:
            raise Block(f"it feeds the shape input of {where}")
        target = None if self._literal_zero(node) else self._shape_pieces(node)
        if t.folded:
            if target is None:
                raise Block(f"{where} has a target shape that cannot be followed")
            return self._unfold_heads(node, t, target, where)
        try:
            return self._reshape_by_rule(node, t, ins, where)
        except Block:
            moved = self._through_other_axes(node, t, where)
            if moved is None and target is not None:  # heads folded into the batch axis
                moved = self._fold_heads(node, t, target, where)
                moved = moved or self._split_heads_into_batch(node, t, target, where)
            if moved is None:
                raise
            return moved

    def _reshape_by_rule(self, node, t: Track, ins, where):
        if self._literal_zero(node):
            raise Block(f"{where} uses allowzero")
        if self._is_flatten_shape(node):
            return self._flatten(node, ins, where, 1)
        target = self._shape_pieces(node)
        if target is None or t.rank is None:
            raise Block(f"{where} has a target shape that cannot be followed")
        values = [v for v, _ in target]
        kept = self._channels_kept(node, t, target, where)
        if kept is not None:
            return kept
        others_ok = all(v != -1 for v in values[:-2])
        # A -1 before the last two is fine when those two are exactly the channels.
        exact_tail = None not in values[-2:] and math.prod(values[-2:]) == t.size
        if t.axis == -1 and len(values) == t.rank + 1 and (others_ok or exact_tail):
            if self._picked_apart(node.output[0]):
                return self._split_chunks(node, t, target, where)
            return self._split_heads(node, t, target, where)
        if t.axis == -1 and len(values) == t.rank + 2 and self._picked_apart(node.output[0]):
            return self._split_chunks(node, t, target, where)
        if t.axis == -1 and len(values) > t.rank + 1:
            # [B*N, H*D] -> [B, N, H, D]: tokens flattened for a BatchNorm (LeViT) come
            # back as they split into heads; the leading axes regroup on their own.
            return self._split_heads(node, t, target, where)
        if t.axis == -2 and (
            (len(values) == t.rank - 1 and others_ok) or self._whole_last(node, t, values)
        ):
            return self._merge_heads(node, t, target, where)
        if len(values) == t.rank and self._same_dims(node.input[0], node.output[0]):
            # A reshape that keeps every dim where it was (e.g. [B, -1, S, D] on
            # [B, H, S, D]): the channels stay put if their entry follows them.
            value, at = target[t.pos(where)]
            if value == -1:
                return {node.output[0]: t}
            if value == t.size and at is not None:
                self._constant_fixup(at, lambda kept, ids=t.ids: kept(ids), where)
                return {node.output[0]: t}
        folded = self._heads_into_batch(node, t, values, where)
        if folded is not None:
            return folded
        merged = self._merge_with_next(node, t, target, where)
        if merged is not None:
            return merged
        raise Block(f"{where} changes the channel layout in a way that cannot be followed")

    def _through_other_axes(self, node, t: Track, where):
        """A run of Reshapes and Transposes that folds the channels into other axes and
        brings them out whole again (MobileViT's unfold: [B, C, H, W] -> [B*C*nh, ph,
        nw, pw] -> Transpose -> [B, C, nh*nw, ph*pw] -> Transpose -> [B*P, N, C], and its
        fold back). No rule reads it: the run is executed in numpy on the index of every
        element's channel and of its other coordinates, once at the channel count and
        once at one fewer with the target entries equal to the count following it. The
        channels must come out whole on one axis with every other element where it was,
        both times. Tensors inside the run carry no track; None if it is no such run."""
        dims = self.m.dims(node.input[0])
        pos = t.pos(where)
        if dims is None or None in dims or len(dims) != t.rank or dims[pos] != t.size:
            return None
        if math.prod(dims) > LAYOUT_RUN_ELEMENTS or t.size < 2:
            return None
        c, fewer = t.size, t.size - 1
        shape = [1] * len(dims)
        shape[pos] = c
        channel = np.broadcast_to(np.arange(c).reshape(shape), dims)
        spatial = [*dims[:pos], 1, *dims[pos + 1 :]]
        where_else = np.broadcast_to(np.arange(math.prod(spatial)).reshape(spatial), dims)
        full = [channel, where_else]
        cut = [np.take(a, range(fewer), axis=pos) for a in full]
        fixes: list[tuple] = []
        # Each tensor of the run -> its shape at the channel count and at one fewer:
        # a target entry read by `Shape` from one of them takes that tensor's size.
        sizes = {node.input[0]: (full[0].shape, cut[0].shape)}
        step = node
        for _ in range(LAYOUT_RUN_STEPS):
            moved = self._layout_step(step, full, cut, c, fewer, fixes, sizes)
            if moved is None:
                return None
            full, cut = moved
            sizes[step.output[0]] = (full[0].shape, cut[0].shape)
            found = self._whole_channels(full, cut, c, fewer)
            if found is not None:
                k, copies = found
                self._copies_follow(fixes, t.ids, where)
                rank = full[0].ndim
                return {step.output[0]: Track(k - rank, np.repeat(t.ids, copies), rank)}
            step = self._only_reader(step.output[0])
            if step is None or step.op_type not in ("Reshape", "Transpose"):
                return None
        return None

    def _layout_step(self, node, full, cut, c: int, fewer: int, fixes: list, sizes: dict):
        """`full` and `cut` through one Reshape or Transpose, or None where it fails."""
        if node.op_type == "Transpose":
            perm = attr(node, "perm")
            return [np.transpose(a, perm) for a in full], [np.transpose(a, perm) for a in cut]
        if self._literal_zero(node):
            return None
        target = self._shape_pieces(node)
        out = self.m.dims(node.output[0])
        if target is None or out is None or len(out) != len(target):
            return None
        values = [o if v is None else v for (v, _), o in zip(target, out, strict=True)]
        if None in values:
            return None
        values = [full[0].shape[i] if v == 0 else v for i, v in enumerate(values)]
        try:
            channel = full[0].reshape(values)
        except ValueError:
            return None
        # An entry whose axis holds the channels (alone, or folded with other axes:
        # [B, C, R, ..] -> [B*C*R, ..]) holds v / c of each; fewer channels, fewer.
        # One read at run time from a tensor of the run is that tensor's size then.
        narrowed = list(values)
        read = self._sizes_read(node)
        if len(read) != len(values):
            read = [None] * len(values)
        for j, (v, (_, at)) in enumerate(zip(values, target, strict=True)):
            if read[j] is not None and read[j][0] in sizes:
                name, k = read[j]
                values[j], narrowed[j] = (int(shape[k]) for shape in sizes[name])
            elif at is not None and v > 0 and v % c == 0 and np.ptp(channel, axis=j).any():
                narrowed[j] = v // c * fewer
                fixes.append((at, v // c))
        try:
            return [a.reshape(values) for a in full], [a.reshape(narrowed) for a in cut]
        except ValueError:
            return None

    @staticmethod
    def _whole_channels(full, cut, c: int, fewer: int) -> tuple[int, int] | None:
        """(axis, copies) where the channels are whole and in order in `full`, each
        `copies` times in a row (grouped-query attention's K/V heads, expanded over
        their query heads and folded through the batch axis by torch's dynamo
        export), and in `cut` the first `fewer` of them with every other coordinate
        as in `full`."""
        channel = full[0]
        for k, n in enumerate(channel.shape):
            copies = n // c
            if n % c or not (np.moveaxis(channel, k, -1) == np.arange(c).repeat(copies)).all():
                continue
            kept = [np.take(a, range(fewer * copies), axis=k) for a in full]
            if all(a.shape == b.shape and (a == b).all() for a, b in zip(kept, cut, strict=True)):
                return k, copies
        return None

    def _channels_kept(self, node, t: Track, target, where):
        """A Reshape that only regroups the axes before and after the channels, e.g.
        [N, C, H, W] -> [N, C, H*W] (a patch embedding) or [S*B, C] -> [S, B, C]: the
        target holds C whole with the same number of elements after it, so every
        element keeps its channel. None if it is not such a Reshape."""
        dims = self.m.dims(node.input[0])
        if dims is None:
            return None
        after = dims[t.pos(where) + 1 :]
        if None in after:
            return None
        for q, (value, at) in enumerate(target):
            rest = [v for v, _ in target[q + 1 :]]
            if (
                value == t.size
                and at is not None
                and None not in rest
                and min(rest, default=1) > 0
                and math.prod(rest) == math.prod(after)
            ):
                self._constant_fixup(at, lambda kept, ids=t.ids: kept(ids), where)
                return {node.output[0]: Track(q - len(target), t.ids, len(target))}
        return None

    def _picked_apart(self, name: str) -> bool:
        """Whether a tensor, through Unsqueeze / Transpose / Squeeze, is only read by
        Gathers of one constant index each (torch's unflatten-then-select of
        nn.MultiheadAttention's packed Q/K/V projection)."""
        readers = self.m.consumers.get(name, [])
        while len(readers) == 1 and readers[0].op_type in ("Unsqueeze", "Transpose", "Squeeze"):
            name = readers[0].output[0]
            readers = self.m.consumers.get(name, [])
        return bool(readers) and all(
            r.op_type == "Gather" and r.input[0] == name and self._scalar(r.input[1])
            for r in readers
        )

    def _scalar(self, name: str) -> bool:
        value = self.m.array(name)
        return value is not None and value.size == 1 and value.ndim <= 1

    def _split_chunks(self, node, t: Track, target, where):
        """[..., K*C] -> [..., K, C] or [..., K, H, D] whose K chunks are then picked
        apart (Q, K and V of one packed projection): channel j of every chunk is one
        unit, tracked on C; with heads, each head's D channels are one unit, on H."""
        heads = len(target) == t.rank + 2
        (k, _), (c, c_at) = target[-2 - heads], target[-1 - heads]
        d = target[-1][0] if heads else 1
        if (
            None in (c, d)
            or c <= 0
            or d <= 0
            or t.size % (c * d)
            or k not in (-1, t.size // (c * d))
        ):
            raise Block(f"{where} splits the channels in a way that cannot be followed")
        chunks = t.ids.reshape(-1, c * d)
        for row in chunks[1:]:
            self.union(chunks[0], row)
        units = self._heads(chunks[0], d)
        self._constant_fixup(c_at, lambda kept, ids=units: kept(ids), where)
        return {node.output[0]: Track(-1 - heads, units, len(target))}

    def _heads_into_batch(self, node, t: Track, values, where):
        """[S, B, H*D] -> [S, B*H, D] -> Transpose -> [B, H, S, D], how
        nn.MultiheadAttention splits heads: each head's D ids are one unit, tracked on H
        of the last Reshape (whose H follows the kept heads). The two tensors between
        hold the heads inside the batch axis and carry no track; None if not this."""
        rank, d = t.rank, values[-1]
        if (
            t.axis != -1
            or len(values) != rank
            or values.count(-1) != 1
            or None in values
            or d <= 0
            or t.size % d
        ):
            return None
        batch = values.index(-1)
        dims = self.m.dims(node.input[0])
        if dims is None or any(v != dims[i] for i, v in enumerate(values[:-1]) if i != batch):
            return None
        swap = self._only_reader(node.output[0])
        unfold = swap and swap.op_type == "Transpose" and self._only_reader(swap.output[0])
        if not unfold or unfold.op_type != "Reshape":
            return None
        perm = list(attr(swap, "perm") or reversed(range(rank)))
        target = self._shape_pieces(unfold)
        heads, at = t.size // d, perm.index(batch)
        moved = [values[i] for i in perm]
        if target is None or [v for v, _ in target] != [*moved[:at], -1, heads, *moved[at + 1 :]]:
            return None
        units = self._heads(t.ids, d)
        self._constant_fixup(target[at + 1][1], lambda kept, ids=units: kept(ids), where)
        return {unfold.output[0]: Track(at + 1 - (rank + 1), units, rank + 1)}

    def _split_heads(self, node, t: Track, target, where):
        """[..., H*D] -> [..., H, D]: the D ids of each head become one unit. Where
        the leading axes regroup too ([B*N, H*D] -> [B, N, H, D]), H*D must be written
        out, or they must hold as many elements as before (then D may be -1)."""
        (h, h_at), (d, _) = target[-2], target[-1]
        if len(target) > t.rank + 1 and not (h and d and h > 0 and h * d == t.size):
            lead = [v for v, _ in target[:-2]]
            dims = self.m.dims(node.input[0])
            same_lead = (
                dims is not None
                and None not in dims[:-1]
                and all(v is not None and v > 0 for v in lead)
                and math.prod(lead) == math.prod(dims[:-1])
            )
            # D = -1, or H = -1 with D written (SegFormer's heads after onnxslim's Gemm).
            d_left = d == -1 and h and h > 0 and t.size % h == 0
            if not (same_lead and (d_left or (h == -1 and d and d > 0 and t.size % d == 0))):
                raise Block(f"{where} splits the channels in a way that cannot be followed")
        elif d == -1 and h and h > 0 and not self._lead_kept(node):
            raise Block(f"{where} splits the channels in a way that cannot be followed")
        if d == -1 and h and h > 0 and t.size % h == 0:
            d = t.size // h  # view(..., H, -1) (DeBERTa): H follows the kept heads
        if d is None or d <= 0 or t.size % d or h not in (-1, t.size // d):
            raise Block(f"{where} splits the channels in a way that cannot be followed")
        units = self._heads(t.ids, d)
        if h != -1:
            self._constant_fixup(h_at, lambda kept, ids=units: kept(ids), where)
        return {node.output[0]: Track(-2, units, len(target))}

    def _copies_follow(self, copies: list[tuple], ids: np.ndarray, where: str) -> None:
        """Each (entry, copies per unit) found where copies of one slice are written
        follows the kept count of `ids`."""
        for at, per in copies:
            self._constant_fixup(at, lambda kept, ids=ids, n=per: n * kept(ids), where)

    def _lead_kept(self, node) -> bool:
        """Whether a Reshape that adds one axis keeps the axes before the last where they
        were ([B, S, C] -> [B, S, H, D]), on the inferred or probed shapes: with D = -1
        the target alone cannot tell that from [B, H*W, C] -> [B, H, W, -1]."""
        dims, out = self.m.dims(node.input[0]), self.m.dims(node.output[0])
        return (
            dims is not None
            and out is not None
            and len(out) == len(dims) + 1
            and None not in dims[:-1]
            and out[:-2] == dims[:-1]
        )

    def _heads(self, ids: np.ndarray, d: int) -> np.ndarray:
        """Each run of d consecutive ids (a head) made one unit; one id per head."""
        rows = ids.reshape(-1, d)
        for row in rows:
            self.union(row[:1].repeat(d - 1), row[1:])
        if d > 1:
            self.head_splits.append(rows[:, 0])
        return rows[:, 0]

    def _whole_last(self, node, t: Track, values) -> bool:
        """[..., H, D] -> [..., H*D] with H*D written out: the leading axes may regroup
        freely (nn.MultiheadAttention folds sequence and batch), the last is exact."""
        dims = self.m.dims(node.input[0], need=(-1,))
        return bool(dims and dims[-1] and values[-1] == t.size * dims[-1])

    def _merge_heads(self, node, t: Track, target, where):
        """[..., H, D] -> [..., H*D]: each head id repeats over its D channels."""
        dims = self.m.dims(node.input[0], need=(-1,))
        d = dims[-1] if dims else None
        v, v_at = target[-1]
        if d is None or v not in (-1, t.size * d):
            raise Block(f"{where} merges the channels in a way that cannot be followed")
        if v != -1:
            self._constant_fixup(v_at, lambda kept, ids=t.ids, d=d: kept(ids) * d, where)
        return {node.output[0]: Track(-1, np.repeat(t.ids, d), len(target))}

    def _merge_with_next(self, node, t: Track, target, where):
        """[.., C, R, ..] -> [.., C*R, ..]: the axis after the channels folds into them,
        each channel id repeating R times; what grouped-query attention's repeat_kv
        writes (K/V heads expanded to [B, KVH, R, S, D], then [B, KVH*R, S, D]), so
        every query head meets the id of the K/V head it reads. The dims around must
        stay where they are (checked on the inferred or probed shapes, which carry
        the computed batch and sequence entries); None if it is not this."""
        if t.rank is None or len(target) != t.rank - 1:
            return None
        pos = t.pos(where)
        dims, out = self.m.dims(node.input[0]), self.m.dims(node.output[0])
        if pos + 1 >= t.rank or dims is None or out is None or None in dims or None in out:
            return None
        repeat = dims[pos + 1]
        if out != [*dims[:pos], t.size * repeat, *dims[pos + 2 :]]:
            return None
        value, at = target[pos]
        if value != -1:
            if value != t.size * repeat:
                return None
            self._constant_fixup(at, lambda kept, ids=t.ids, r=repeat: kept(ids) * r, where)
        return {node.output[0]: Track(t.axis + 1, np.repeat(t.ids, repeat), t.rank - 1)}

    def _expand(self, node, ins, where):
        """Broadcasting to a shape leaves the channels where they are (right-aligned);
        the shape's entry there is 1 (kept as it is), or the channel count, which must
        be a constant that follows the kept channels (repeat_kv's [B, KVH, R, S, D])."""
        t = ins[0]
        if t is None or ins[1] is not None:
            raise Block(f"it feeds the shape of {where}")
        shape = self.m.entries(node.input[1])
        if shape is None or t.rank is None:
            raise Block(f"{where} has a computed shape")
        rank = max(t.rank, len(shape))
        if len(shape) >= -t.axis:
            k = len(shape) + t.axis
            if shape[k] != 1:
                at = self._entry_at(node, 1, k) if shape[k] == t.size else None
                if at is None:
                    raise Block(f"{where} expands the channels to a computed or other size")
                self._constant_fixup(at, lambda kept, ids=t.ids: kept(ids), where)
        return {node.output[0]: Track(t.axis, t.ids, rank)}

    def _tile(self, node, ins, where):
        """Tiling leaves the channels where they are if it repeats them once
        (SwiftFormer's global query, repeated over the tokens)."""
        t = ins[0]
        if t is None or ins[1] is not None:
            raise Block(f"it feeds the repeats of {where}")
        repeats = self.m.entries(node.input[1])
        if repeats is None or t.rank is None or len(repeats) != t.rank:
            raise Block(f"{where} has computed or misshapen repeats")
        if repeats[t.rank + t.axis] is None:
            tiled = self._tiled_into_batch(t, repeats, where)
            if tiled is not None:
                return {node.output[0]: tiled}
            raise Block(f"{where} repeats the channels a computed number of times")
        if repeats[t.rank + t.axis] != 1:
            raise Block(f"{where} repeats the channels")
        return {node.output[0]: t}

    def _repeats_of_one(self, name: str, axis: int, depth: int = 0) -> list | None:
        """Where the size of `name`'s `axis` (negative) is written, when that axis
        is copies of one slice: an Expand of a size-1 axis, perhaps folded by a
        Reshape [.., 1, R, ..] -> [.., R, ..] and moved by Transposes. That is
        multi-query attention's repeat_kv (one K/V head expanded over the query
        heads), whose copies may be cut like any channels. The entries to fix, or
        None if it is not this."""
        node = self.m.producers.get(name)
        rank = self.m.rank(name)
        # Only where nothing else reads the way: its sizes change with the kept heads.
        if node is None or rank is None or depth > 8 or not -rank <= axis < 0:
            return None
        if self.m.uses(name) != 1:
            return None
        k = rank + axis
        if node.op_type == "Transpose":
            perm = attr(node, "perm") or list(reversed(range(rank)))
            return self._repeats_of_one(node.input[0], perm[k] - rank, depth + 1)
        if node.op_type in ("Mul", "Div", "Add", "Sub") and len(node.input) == 2:
            # A constant that is the same for every copy (sdpa's scale) keeps them copies.
            scale = [self.m.array(i) for i in node.input]
            if scale[0] is None and scale[1] is not None:
                const = scale[1]
                if const.ndim < -axis or const.shape[axis] == 1:
                    return self._repeats_of_one(node.input[0], axis, depth + 1)
            return None
        if node.op_type in ("Cast", "Identity"):
            return self._repeats_of_one(node.input[0], axis, depth + 1)
        if node.op_type == "Expand":
            dims, shape = self.m.dims(node.input[0]), self.m.entries(node.input[1])
            if dims is None or shape is None or len(shape) < -axis:
                return None
            if len(dims) >= -axis and dims[axis] != 1:
                return None
            at = self._entry_at(node, 1, len(shape) + axis)
            return None if at is None else [(at, 1)]
        if node.op_type == "Reshape" and not self._literal_zero(node):
            dims, target = self.m.dims(node.input[0]), self._shape_pieces(node)
            out = self.m.dims(name)
            if dims is None or target is None or out is None or None in dims or k + 1 >= len(dims):
                return None
            if dims[k] != 1 or out != [*dims[:k], dims[k + 1], *dims[k + 2 :]]:
                return None
            inner = self._repeats_of_one(node.input[0], k + 1 - len(dims), depth + 1)
            value, at = target[k]
            if inner is None or (value != -1 and at is None):
                return None
            return inner if value == -1 else [*inner, (at, 1)]
        return None

    def _copies_run(self, name: str, axis: int) -> list | None:
        """The same where Reshapes fold the copies through other axes (torch's dynamo
        exporter writes multi-query K as [B, 1, R, S, D] -> [B*R, S, D] -> Transpose
        -> [B, R, D, S]): back from `name` through Reshapes, Transposes and scalar
        scales to an Expand that grows one size-1 axis to R, then forward on index
        arrays of the copy and of every other coordinate, at R copies and at one
        fewer, as for a layout run. The copies must come out whole on `axis`.
        (entry, copies per kept one) pairs, or None."""
        chain: list[onnx.NodeProto] = []
        walked: list[onnx.NodeProto] = []
        node = self.m.producers.get(name)
        while node is not None and node.op_type != "Expand" and len(chain) <= LAYOUT_RUN_STEPS:
            walked.append(node)
            if node.op_type in ("Transpose", "Reshape"):
                chain.append(node)
            elif node.op_type in ("Mul", "Div", "Add", "Sub"):
                const = self.m.array(node.input[1]) if len(node.input) == 2 else None
                if const is None or const.size != 1:
                    return None
            elif node.op_type not in ("Cast", "Identity"):
                return None
            node = self.m.producers.get(node.input[0])
        if node is None or node.op_type != "Expand":
            return None
        # Their sizes change: nothing else may read them, but a Shape whose sizes only
        # become targets of the chain's own Reshapes (dynamic shapes), which follow.
        run = {n.output[0] for n in chain if n.op_type == "Reshape"}
        for step in (node, *walked):
            readers = self.m.consumers.get(step.output[0], [])
            others = [
                r
                for r in readers
                if r.op_type != "Shape" or not self._only_run_sizes(r.output[0], run)
            ]
            if len(others) != 1 or self.m.uses(step.output[0]) != len(readers):
                return None
        dims, out = self.m.dims(node.input[0]), self.m.dims(node.output[0])
        shape = self.m.entries(node.input[1])
        if dims is None or out is None or shape is None or None in out or len(dims) != len(out):
            return None
        grown = [j for j, (a, b) in enumerate(zip(dims, out, strict=True)) if a == 1 and b > 1]
        if len(grown) != 1 or math.prod(out) > LAYOUT_RUN_ELEMENTS:
            return None
        j, c = grown[0], out[grown[0]]
        at = self._entry_at(node, 1, len(shape) - len(out) + j)
        if at is None:
            return None
        index = [1] * len(out)
        index[j] = c
        rest = [*out[:j], 1, *out[j + 1 :]]
        full = [
            np.broadcast_to(np.arange(c).reshape(index), out),
            np.broadcast_to(np.arange(math.prod(rest)).reshape(rest), out),
        ]
        cut = [np.take(a, range(c - 1), axis=j) for a in full]
        fixes: list[tuple] = []
        sizes = {node.output[0]: (full[0].shape, cut[0].shape)}
        for step in reversed(chain):
            moved = self._layout_step(step, full, cut, c, c - 1, fixes, sizes)
            if moved is None:
                return None
            full, cut = moved
            sizes[step.output[0]] = (full[0].shape, cut[0].shape)
        if self._whole_channels(full, cut, c, c - 1) != (full[0].ndim + axis, 1):
            return None
        return [(at, 1), *fixes]

    def _entry_at(self, reader, index: int, pos: int, depth: int = 0):
        """Where entry `pos` of the shape vector at reader.input[index] is written as a
        constant, through Concat and Where (a torch `expand` exports Where(shape == -1,
        1, shape)): (node, input, pos) for a Fixup, or None."""
        name = reader.input[index]
        arr = self.m.array(name)
        if arr is not None:
            return (reader, index, pos) if 0 <= pos < arr.size else None
        node = self.m.producers.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "Concat" and attr(node, "axis", 0) in (0, -1):
            offset = 0
            for i, part in enumerate(node.input):
                n = len(self.m.entries(part) or [])
                if not n:
                    return None
                if pos < offset + n:
                    return self._entry_at(node, i, pos - offset, depth + 1)
                offset += n
            return None
        if node.op_type == "Where":
            cond = self.m.entries(node.input[0])
            if cond is None or not cond or cond[pos if len(cond) > 1 else 0] is None:
                return None
            picked = 1 if cond[pos if len(cond) > 1 else 0] else 2
            width = len(self.m.entries(node.input[picked]) or [])
            return self._entry_at(node, picked, pos if width > 1 else 0, depth + 1)
        if node.op_type == "Reshape" and self.m.rank(node.input[0]) == 1:
            flat = self.m.array(node.input[1])  # a vector reshaped to [-1] is itself
            if flat is not None and flat.reshape(-1).tolist() == [-1]:
                return self._entry_at(node, 0, pos, depth + 1)
        return None

    def _same_dims(self, a: str, b: str) -> bool:
        da, db = self.m.dims(a), self.m.dims(b)
        return da is not None and None not in da and da == db

    def _constant_fixup(self, at, value, where) -> None:
        if at is None:
            raise Block(f"{where} has a computed head count")
        node, index, pos = at
        self.fixups.append(Fixup(node, index, pos, value))

    def _literal_zero(self, node) -> bool:
        """Whether `node` (a Reshape) may read a 0 in its target as 0 rather than "the
        input's dim": with `allowzero` (which torch's dynamo exporter sets on every
        Reshape) and a 0 or a computed entry the rules cannot see (a computed target
        whose pieces are unknown). A size read by `Shape` is a computed piece the rules
        never read as a copy, so [B, S, -1, D] with B and S read at run time passes."""
        if not attr(node, "allowzero", 0):
            return False
        pieces = self._shape_pieces(node)
        return pieces is None or any(value == 0 for value, _ in pieces)

    def _shape_pieces(self, node):
        """A Reshape's target as [(value or None if computed, (node, input, pos) or None)]."""
        name = node.input[1]
        arr = self.m.array(name)
        if arr is not None:  # a constant other Reshapes may share: this node's own copy
            return [(int(v), (node, 1, i)) for i, v in enumerate(arr.reshape(-1))]
        read = self._shape_axes(name)
        if read is not None:  # Reshape(x, Shape(y)): all sizes read at run time
            return [(None, None)] * len(read)
        concat = self.m.producers.get(name)
        if concat is None or concat.op_type != "Concat" or attr(concat, "axis", 0) != 0:
            return None
        pieces = []
        for index, part in enumerate(concat.input):
            value = self.m.array(part)
            if value is None:
                dims = self.m.dims(part, need=(0,))
                if dims is None or len(dims) != 1 or dims[0] is None:
                    return None
                pieces += [(None, None)] * int(dims[0])
            else:
                pieces += [(int(v), (concat, index, i)) for i, v in enumerate(value.reshape(-1))]
        return pieces

    def _sizes_read(self, node) -> list[tuple[str, int] | None]:
        """For each entry of a Reshape's target: (tensor, axis) where the entry is that
        tensor's size read at run time (a Concat of `Shape(x)` slices, as exports with
        dynamic shapes write [B*H, S, D] from K's own shape), else None."""
        whole = self._shape_axes(node.input[1])
        if whole is not None:
            return list(whole)
        concat = self.m.producers.get(node.input[1])
        if (
            self.m.array(node.input[1]) is not None
            or concat is None
            or concat.op_type != "Concat"
            or attr(concat, "axis", 0) != 0
        ):
            return [None] * len(self._shape_pieces(node) or [])
        read: list[tuple[str, int] | None] = []
        for part in concat.input:
            axes = self._shape_axes(part)
            if axes is not None:
                read += axes
                continue
            dims = self.m.dims(part, need=(0,))
            read += [None] * int(dims[0] if dims and dims[0] is not None else 0)
        return read

    def _shape_axes(self, name: str) -> list[tuple[str, int]] | None:
        """[(x, axis), ...] where `name` is `Shape(x)` (start / end too), a constant
        Slice of it or one entry Gathered and Unsqueezed, else None."""
        node = self.m.producers.get(name)
        if node is not None and node.op_type == "Slice":
            inner = self._shape_axes(node.input[0])
            bounds = None if inner is None else self._vector_slice(node, len(inner))
            return None if bounds is None else inner[slice(*bounds)]
        if node is not None and node.op_type == "Unsqueeze":  # of one Gather: torch's export
            picked = self.m.producers.get(node.input[0])
            if picked is not None and picked.op_type == "Squeeze":  # of a one-entry Slice
                inner = self._shape_axes(picked.input[0])
                return inner if inner is not None and len(inner) == 1 else None
            if picked is None or picked.op_type != "Gather" or self.m.rank(name) != 1:
                return None
            inner, index = self._shape_axes(picked.input[0]), self._gathered(picked)
            if inner is None or index is None or len(index) != 1:
                return None
            return [inner[index[0]]]
        if node is None or node.op_type != "Shape":
            return None
        rank = self.m.rank(node.input[0])
        if rank is None:
            return None
        start, end, _ = slice(attr(node, "start"), attr(node, "end")).indices(rank)
        return [(node.input[0], k) for k in range(start, end)]

    def _is_flatten_shape(self, node) -> bool:
        data, shape_name = node.input[0], node.input[1]
        target = self.m.array(shape_name)
        if target is not None:
            values = target.reshape(-1).tolist()
            if len(values) != 2 or values[1] != -1:
                return False
            dims = self.m.dims(data, need=(0,))
            return values[0] == 0 or bool(dims and dims[0] == values[0])
        return self._is_batch_concat(shape_name, data)

    def _is_batch_concat(self, shape_name: str, data: str) -> bool:
        """Concat(Unsqueeze(Gather(Shape(data), 0)), [-1]): what `x.view(x.size(0), -1)` exports."""
        concat = self.m.producers.get(shape_name)
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            return False
        tail = self.m.array(concat.input[1])
        if tail is None or tail.reshape(-1).tolist() != [-1]:
            return False
        unsq = self.m.producers.get(concat.input[0])
        gather = unsq and unsq.op_type == "Unsqueeze" and self.m.producers.get(unsq.input[0])
        if not gather or gather.op_type != "Gather" or self._gathered(gather) != [0]:
            return False
        shape = self.m.producers.get(gather.input[0])
        return bool(shape and shape.op_type == "Shape" and shape.input[0] == data)

    def _gathered(self, gather) -> list[int] | None:
        idx = self.m.array(gather.input[1])
        if attr(gather, "axis", 0) != 0 or idx is None:
            return None
        return [int(i) for i in idx.reshape(-1)]

    def _shape(self, node, ins, where):
        """Reading the sizes of other axes is fine; reading the channel count is not."""
        t = ins[0]
        rank = t.rank
        readers = self.m.consumers.get(node.output[0], [])
        if rank is not None and node.output[0] not in self.m.outputs and readers:
            start, end, _ = slice(attr(node, "start"), attr(node, "end")).indices(rank)
            pos = t.pos(where)
            if not start <= pos < end:
                return {}
            k = pos - start
            if t.folded:
                if all(
                    self._reads_other_dims(r, k, end - start)
                    or (
                        r.op_type == "Gather"
                        and [i % (end - start) for i in self._gathered(r) or []] == [k]
                        and self._folded_size_read(r.output[0], t, where)
                    )
                    for r in readers
                ):
                    return {}
                raise Block(f"{SHAPE_READ} {where}, with the heads folded into the batch")
            if all(
                self._reads_other_dims(r, k, end - start)
                or self._only_own_resize_sizes(r.output[0], node.input[0], pos)
                or self._broadcasts_back(r, node.output[0], node.input[0], pos - rank)
                for r in readers
            ) or self._only_run_sizes(node.output[0], self._run_from(node.input[0])):
                return {}
        raise Block(f"{SHAPE_READ} {where}")

    def _run_from(self, name: str) -> set[str]:
        """The outputs of the Reshapes in the runs `_through_other_axes` may execute
        from `name`."""
        found: set[str] = set()
        for first in self.m.consumers.get(name, []):
            step = first
            for _ in range(LAYOUT_RUN_STEPS):
                if step is None or step.op_type not in ("Reshape", "Transpose"):
                    break
                if step.op_type == "Reshape":
                    found.add(step.output[0])
                step = self._only_reader(step.output[0])
        return found

    def _only_run_sizes(self, name: str, run: set[str], depth: int = 0) -> bool:
        """Whether the sizes in `name` (read by Shape from a tensor that then starts a
        run of Reshapes and Transposes) only become target entries of that run's
        Reshapes: the run is executed with each such entry taking its tensor's size
        at the kept count (see `_layout_step`), as it will at run time. The fold and
        unfold of sdpa's K under a dynamic-shape export ([B, H, S, D] to [B*H, S, D]
        and back to [B, H, D, S], every size read from K's own shape) is such a run."""
        readers = self.m.consumers.get(name, [])
        if not readers or self.m.uses(name) != len(readers) or depth > 4:
            return False
        for r in readers:
            if r.op_type == "Reshape" and list(r.input[1:]) == [name] and r.output[0] in run:
                continue
            passes = r.op_type in ("Concat", "Unsqueeze") or (
                r.op_type in ("Slice", "Gather") and r.input[0] == name
            )
            if not (
                passes
                and list(r.input).count(name) == 1
                and self._only_run_sizes(r.output[0], run, depth + 1)
            ):
                return False
        return True

    def _broadcasts_back(self, expand, shape: str, data: str, axis: int) -> bool:
        """Whether `expand` stretches a statistic of `data` over `data`'s own shape (the
        vector `shape`), to meet only `data` in elementwise ops: F.normalize's
        x / Expand(norm, Shape(x)). At run time it takes whatever channel count `data`
        has, pruned or not."""
        readers = self.m.consumers.get(expand.output[0], [])
        return (
            expand.op_type == "Expand"
            and list(expand.input[1:]) == [shape]
            and expand.input[0] != shape
            and bool(readers)
            and self.m.uses(expand.output[0]) == len(readers)
            and self._expanded_to_shape_of(expand.output[0], data, axis)
            and all(r.op_type in ("Add", "Sub", "Mul", "Div") and data in r.input for r in readers)
        )

    def _expanded_to_shape_of(self, name: str, data: str, axis: int) -> bool:
        """Whether `name` is Expand(s, Shape(data)) with s of size 1 on `axis` (negative)."""
        node = self.m.producers.get(name)
        if node is None or node.op_type != "Expand":
            return False
        shape = self.m.producers.get(node.input[1])
        if shape is None or shape.op_type != "Shape" or list(shape.input) != [data]:
            return False
        if shape.attribute:  # start / end: part of the shape only
            return False
        dims = self.m.dims(node.input[0])
        return dims is not None and (len(dims) < -axis or dims[axis] == 1)

    def _reads_other_dims(self, reader, k: int, n: int) -> bool:
        """Whether a Gather or Slice of an n-long shape vector leaves out its entry k
        (e.g. a detector reading only H and W of an NCHW tensor)."""
        if reader.op_type == "Gather":
            picked = self._gathered(reader)
            return picked is not None and k not in [i % n for i in picked]
        if reader.op_type == "Slice" and len(reader.input) >= 3:
            bounds = self._vector_slice(reader, n)
            return bounds is not None and k not in range(*bounds)
        return False

    def _vector_slice(self, node, n: int) -> tuple[int, int] | None:
        """(start, end) of a Slice on axis 0 with step 1 and constant bounds of an n-long
        vector, else None."""
        consts = [self.m.array(x) if x else None for x in [*node.input[1:], "", "", ""][:4]]
        starts, ends, axes, steps = consts
        if starts is None or ends is None or starts.size != 1:
            return None
        if len(node.input) > 3 and node.input[3] and axes is None:
            return None
        if axes is not None and int(axes.reshape(-1)[0]) not in (0, -1):
            return None
        if len(node.input) > 4 and node.input[4] and (steps is None or int(steps[0]) != 1):
            return None
        start, end, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])).indices(n)
        return start, end

    def _only_own_resize_sizes(self, name: str, data: str, pos: int, depth: int = 0) -> bool:
        """Whether shape values read from `data` only become the `sizes` of Resizes of
        `data` itself, with its channel count landing on the channel axis: what
        F.interpolate(x, size=...) exports (Concat(Shape(x)[0:2], size) -> Resize(x)).
        The Resize then writes whatever channel count x has, pruned or not."""
        readers = self.m.consumers.get(name, [])
        if not readers or self.m.uses(name) != len(readers) or depth > 4:
            return False
        for r in readers:
            if r.op_type in ("Concat", "Cast", "Unsqueeze") and list(r.input).count(name) == 1:
                if not self._only_own_resize_sizes(r.output[0], data, pos, depth + 1):
                    return False
            elif (
                r.op_type != "Resize"
                or len(r.input) < 4
                or r.input[3] != name
                or r.input[0] != data
                or name in r.input[:3]
                or not self._size_echo(name, pos, data, pos)
            ):
                return False
        return True

    def _size_echo(self, name: str, index: int, data: str, pos: int, depth: int = 0) -> bool:
        """Whether element `index` of the integer vector `name` is, at run time, dim `pos`
        of tensor `data` (followed through Shape, Slice, Gather, Concat, Unsqueeze, Cast)."""
        node = self.m.producers.get(name)
        if node is None or depth > 8:
            return False
        op = node.op_type
        if op == "Shape":
            rank = self.m.rank(data)
            if node.input[0] != data or rank is None:
                return False
            start, _, _ = slice(attr(node, "start"), attr(node, "end")).indices(rank)
            return start + index == pos
        if op == "Cast":
            return self._size_echo(node.input[0], index, data, pos, depth + 1)
        if op == "Unsqueeze":  # a scalar made a 1-vector
            return (
                index == 0
                and self.m.rank(node.input[0]) == 0
                and self._size_echo(node.input[0], 0, data, pos, depth + 1)
            )
        if op == "Gather":
            picked = self._gathered(node)
            if picked is None or index >= len(picked) or picked[index] < 0:
                return False
            return self._size_echo(node.input[0], picked[index], data, pos, depth + 1)
        if op == "Slice":
            dims = self.m.dims(node.input[0], need=(0,))
            bounds = dims and len(dims) == 1 and dims[0] and self._vector_slice(node, dims[0])
            if not bounds:
                return False
            return self._size_echo(node.input[0], bounds[0] + index, data, pos, depth + 1)
        if op == "Concat" and attr(node, "axis", 0) in (0, -1):
            offset = 0
            for part in node.input:
                dims = self.m.dims(part, need=(0,))
                if not dims or len(dims) != 1 or dims[0] is None:
                    return False
                if index < offset + dims[0]:
                    return self._size_echo(part, index - offset, data, pos, depth + 1)
                offset += dims[0]
        return False

    def _gather(self, node, ins, where):
        t = ins[0]
        if t is None or ins[1] is not None:
            raise Block(f"it is used as indices of {where}")
        pos = t.pos(where)
        axis = int(attr(node, "axis", 0)) % t.rank  # type: ignore[operator]
        if axis == pos:
            return self._pick_channels(node, t, where)
        k = self.m.rank(node.input[1])
        if k is None:
            raise Block(f"rank of the indices unknown at {where}")
        rank = t.rank - 1 + k  # type: ignore[operator]
        new_pos = pos if axis > pos else pos - 1 + k
        return {node.output[0]: Track(new_pos - rank, t.ids, rank)}

    def _pick_channels(self, node, t: Track, where):
        """A Gather of the channels by a constant index vector (a shuffle, see
        prune_graph.shuffles_to_gathers): each output channel carries the id of the
        channel it copies; the indices are cut with the removed ones and renumbered."""
        idx = self.m.array(node.input[1])
        if idx is None or idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise Block(f"{where} picks channels")
        if not ((idx >= -t.size) & (idx < t.size)).all():
            raise Block(f"{where} picks channels out of range")
        ids = t.ids[idx % t.size]
        self.member(node, 1, 0, ids, "param")
        self.renumbered.append(Renumber(node, t.ids))
        return {node.output[0]: Track(t.axis, ids, t.rank)}

    def _axes(self, node, where) -> list[int]:
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            arr = self.m.array(node.input[1])
            if arr is None:
                raise Block(f"{where} has computed axes")
            axes = arr.reshape(-1).tolist()
        if not axes:
            raise Block(f"{where} has no explicit axes")
        return [int(a) for a in axes]

    def _unsqueeze(self, node, ins, where):
        t = ins[0]
        if ins[1:] and any(ins[1:]):
            raise Block(f"it feeds the axes of {where}")
        pos = t.pos(where)
        rank = t.rank + len(self._axes(node, where))  # type: ignore[operator]
        axes = sorted(a % rank for a in self._axes(node, where))
        kept = [i for i in range(rank) if i not in axes]
        return {node.output[0]: Track(kept[pos] - rank, t.ids, rank)}

    def _squeeze(self, node, ins, where):
        t = ins[0]
        if ins[1:] and any(ins[1:]):
            raise Block(f"it feeds the axes of {where}")
        pos = t.pos(where)
        axes = [a % t.rank for a in self._axes(node, where)]  # type: ignore[operator]
        if pos in axes:
            raise Block(f"{where} squeezes the channel axis")
        rank = t.rank - len(axes)  # type: ignore[operator]
        return {node.output[0]: Track(pos - sum(a < pos for a in axes) - rank, t.ids, rank)}

    def _concat(self, node, ins, where):
        tracked = [t for t in ins if t is not None]
        ref = tracked[0]
        pos = ref.pos(where)
        axis = int(attr(node, "axis", 0)) % ref.rank  # type: ignore[operator]
        if axis != pos:  # concatenated along another axis: the channels must line up
            for name, t in zip(node.input, ins, strict=True):
                constant = self.m.array(name) is not None
                if t is None and not constant and not self._expanded_constant(name, ref, node):
                    raise Block(f"{where} joins it with a tensor whose channels are not tracked")
            return self._nary(node, ins, where)
        parts = []
        for name, t in zip(node.input, ins, strict=True):
            if t is not None:
                if t.axis != ref.axis:
                    raise Block(f"{where} joins tensors of different ranks")
                parts.append(t.ids)
                continue
            dims = self.m.dims(name, need=(axis,))
            if dims is None or len(dims) != ref.rank or dims[axis] is None:
                raise Block(f"shape of {name} unknown at {where}")
            fixed = self.chan.add(dims[axis])  # channels nobody may remove
            self.grp.add(dims[axis])
            self.block(fixed, f"untracked input of {where}")
            parts.append(fixed)
        return {node.output[0]: Track(ref.axis, np.concatenate(parts), ref.rank)}

    def _split(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds the sizes of {where}")
        pos = t.pos(where)
        axis = int(attr(node, "axis", 0)) % t.rank  # type: ignore[operator]
        outs = [o for o in node.output]
        if axis != pos:
            return {o: t for o in outs if o}
        sizes = attr(node, "split")
        at: str | int = "split"
        if sizes is None and len(node.input) > 1 and node.input[1]:
            arr = self.m.array(node.input[1])
            if arr is None:
                raise Block(f"{where} has computed sizes")
            sizes, at = arr.reshape(-1).tolist(), 1
        if sizes is None:
            if t.size % len(outs):
                raise Block(f"{where} splits unevenly")
            sizes = [t.size // len(outs)] * len(outs)
            at = "split" if self.m.opset < 13 else 1
            self._explicit_split(node, sizes, at)
        bounds = np.cumsum([0, *sizes])
        result = {}
        for k, out in enumerate(outs):
            ids = t.ids[bounds[k] : bounds[k + 1]]
            self.fixups.append(Fixup(node, at, k, lambda kept, ids=ids: kept(ids)))
            if out:
                result[out] = Track(t.axis, ids, t.rank)
        return result

    def _explicit_split(self, node, sizes: list[int], at: str | int) -> None:
        """Write out the equal split, so it can follow uneven pruning."""
        for a in list(node.attribute):
            if a.name == "num_outputs":
                node.attribute.remove(a)
        if at == "split":
            node.attribute.append(onnx.helper.make_attribute("split", sizes))
            return
        name = f"{node.output[0]}__split"
        self.m.graph.initializer.append(
            numpy_helper.from_array(np.array(sizes, dtype=np.int64), name)
        )
        self.m.inits[name] = self.m.graph.initializer[-1]
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = name
        self.m.consumers[name] = [node]

    def _slice(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds the bounds of {where}")
        if self.m.opset < 10:
            raise Block(f"{where} (attribute form) cannot follow the channels")
        pos = t.pos(where)
        consts = [self.m.array(n) if n else None for n in [*node.input[1:], "", "", ""][:4]]
        starts, ends, axes, steps = consts
        if len(node.input) > 3 and node.input[3] and axes is None:
            raise Block(f"{where} has computed axes")
        # Bounds computed at run time (rotary embeddings slice each head at
        # `d // 2` read from Shape) only matter on the channel axis; their count
        # says which axes are sliced when `axes` is left out.
        count = len(starts) if starts is not None else len(self.m.entries(node.input[1]) or [])
        if axes is None and not count:
            raise Block(f"{where} has computed bounds")
        axes_l = list(range(count)) if axes is None else [int(a) for a in axes]
        axes_l = [a % t.rank for a in axes_l]  # type: ignore[operator]
        if pos not in axes_l:
            return {node.output[0]: t}
        if starts is None or ends is None:
            raise Block(f"{where} has computed bounds")
        if len(node.input) > 4 and node.input[4] and steps is None:
            raise Block(f"{where} has computed steps")
        k = axes_l.index(pos)
        if steps is not None and int(steps[k]) != 1:
            raise Block(f"{where} steps over the channels")
        start, end, _ = slice(int(starts[k]), int(ends[k])).indices(t.size)
        ids = t.ids[start:end]
        head = t.ids[:start]
        self.fixups.append(Fixup(node, 1, k, lambda kept, head=head: kept(head)))
        self.fixups.append(
            Fixup(node, 2, k, lambda kept, head=head, ids=ids: kept(head) + kept(ids))
        )
        return {node.output[0]: Track(t.axis, ids, t.rank)}

    def _pad(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds a parameter of {where}")
        pads = attr(node, "pads")
        if pads is None and len(node.input) > 1:
            arr = self.m.array(node.input[1])
            if arr is None:
                raise Block(f"{where} has computed pads")
            pads = arr.reshape(-1).tolist()
        axes = [a % t.rank for a in self._axes_or_all(node, t)]  # type: ignore[operator]
        pos = t.pos(where)
        if pos in axes:
            k = axes.index(pos)
            if pads[k] or pads[k + len(axes)]:
                raise Block(f"{where} pads the channels")
        return {node.output[0]: t}

    def _axes_or_all(self, node, t: Track) -> list[int]:
        if node.op_type == "Pad" and len(node.input) > 3 and node.input[3]:
            arr = self.m.array(node.input[3])
            if arr is None:
                raise Block(f"Pad {label(node)} has computed axes")
            return arr.reshape(-1).tolist()
        return list(range(t.rank))  # type: ignore[arg-type]

    def _resize(self, node, ins, where):
        t = ins[0]
        if t is None or any(ins[1:]):
            raise Block(f"it feeds a parameter of {where}")
        pos = t.pos(where)
        if node.op_type == "Upsample" and self.m.opset < 9:
            scales = attr(node, "scales")
            if scales is None or scales[pos] != 1:
                raise Block(f"{where} scales the channels")
            return {node.output[0]: t}
        # Resize: X, roi, scales, sizes (opset 11+); X, scales (opset 10, Upsample 9).
        scale_at = 1 if node.op_type == "Upsample" or self.m.opset < 11 else 2
        names = list(node.input) + [""] * 4
        scales = self.m.array(names[scale_at]) if names[scale_at] else None
        sizes = self.m.array(names[3]) if scale_at == 2 and names[3] else None
        if scales is not None and scales.size:
            if scales.reshape(-1)[pos] != 1:
                raise Block(f"{where} scales the channels")
        elif sizes is not None:
            self.fixups.append(Fixup(node, 3, pos, lambda kept, ids=t.ids: kept(ids)))
        elif not (names[3] and self._size_echo(names[3], pos, node.input[0], pos)):
            raise Block(f"{where} has computed scales")
        return {node.output[0]: t}
