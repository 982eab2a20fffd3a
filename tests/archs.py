"""Exporting torch modules to ONNX the way third-party files are made
(TorchScript exporter, a fixed opset, dynamic batch and sequence axes), for
the tests that run real architectures, and the digits example's builder."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from types import ModuleType

import onnx
import torch
from torch import nn

DIGITS_BUILD = Path(__file__).resolve().parent.parent / "examples" / "digits" / "build.py"


def digits_build() -> ModuleType:
    """examples/digits/build.py as a module (it is a script, not a package):
    DigitsCNN, export and reexport."""
    spec = importlib.util.spec_from_file_location("digits_build", DIGITS_BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_bert(opset: int, *, hidden: int = 64, heads: int = 4, ffn: int = 128) -> torch.nn.Module:
    """A 2-layer BertForSequenceClassification (vocabulary 100, 32 positions, 3 labels)
    small enough for unit tests; torch's random weights, so seed first."""
    import transformers  # the tests that use it skip without it

    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=ffn,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=3,
    )
    # The sdpa kernel only exports from opset 14 on.
    config._attn_implementation = "eager" if opset < 14 else "sdpa"
    return transformers.BertForSequenceClassification(config)


def tiny_albert(opset: int) -> torch.nn.Module:
    """A 2-layer AlbertForSequenceClassification (one set of layer weights run at both
    depths, a 32-wide factorized embedding, width 64, 4 heads, vocabulary 100, 3
    labels); torch's random weights, so seed first."""
    import transformers

    config = transformers.AlbertConfig(
        embedding_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=3,
    )
    config._attn_implementation = "eager" if opset < 14 else "sdpa"
    return transformers.AlbertForSequenceClassification(config)


def tiny_deberta(**attention: object) -> torch.nn.Module:
    """A 2-layer DebertaV2ForSequenceClassification, width 64, 4 heads, vocabulary 100,
    3 labels, eager attention (so every opset exports it), with `attention` settings
    on top of the library's defaults. torch's random weights, so seed first."""
    import transformers

    config = transformers.DebertaV2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=3,
        **attention,
    )
    config._attn_implementation = "eager"
    return transformers.DebertaV2ForSequenceClassification(config)


def tiny_deberta_v3() -> torch.nn.Module:
    """DeBERTa configured as DeBERTa-v3 ships: relative attention with c2p and p2c,
    8 log buckets, the keys shared with the position projections, a LayerNorm'd
    relative embedding table."""
    return tiny_deberta(
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=8,
        max_relative_positions=16,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
    )


def tiny_deberta_v2() -> torch.nn.Module:
    """DeBERTa with the library's default attention: no relative positions, heads
    split as view(..., H, -1)."""
    return tiny_deberta()


def tiny_llama(*, kv_heads: int, attention: str) -> torch.nn.Module:
    """A 2-layer Llama decoder (RMSNorm, rotary embeddings, 4 query heads of 16 sharing
    `kv_heads` K/V heads, SwiGLU FFN of 128) called as (input_ids, attention_mask) and
    returning its last hidden state; torch's random weights, so seed first."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
        max_position_embeddings=64,
    )
    config._attn_implementation = attention

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.LlamaModel(config)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    return Decoder()


class PixelLogits(torch.nn.Module):
    """A transformers vision model (`self.m`) called on pixel_values, returning its
    logits tensor only; its nodes are named /m/..."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(pixel_values=x).logits


# Vision families made for phones and CPUs, small: (module, input size). Shared by
# tests/test_prune_groups.py and bench/coverage.py.
PHONE_VISION = ("swiftformer", "levit", "focalnet", "cvt", "segformer")


def phone_vision(arch: str) -> tuple[PixelLogits, int]:
    """A `transformers` classifier with random weights (5 labels; seed first):
    SwiftFormer (4 stages, width 16-48), LeViT (3 stages, 32-64, at 128x128),
    FocalNet (4 stages, 16-128), CvT (3 stages, 16-48) or SegFormer (2 stages,
    16-32, its all-MLP decoder 32 wide)."""
    import transformers as tf

    if arch == "swiftformer":
        config = tf.SwiftFormerConfig(depths=[1] * 4, embed_dims=[16, 24, 32, 48], num_labels=5)
        return PixelLogits(tf.SwiftFormerForImageClassification(config)), 64
    if arch == "levit":
        config = tf.LevitConfig(
            image_size=128,
            hidden_sizes=[32, 48, 64],
            num_attention_heads=[2, 3, 4],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
            num_labels=5,
        )
        return PixelLogits(tf.LevitForImageClassification(config)), 128
    if arch == "focalnet":
        config = tf.FocalNetConfig(image_size=64, embed_dim=16, depths=[1] * 4, num_labels=5)
        return PixelLogits(tf.FocalNetForImageClassification(config)), 64
    if arch == "cvt":
        config = tf.CvtConfig(
            embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=5
        )
        return PixelLogits(tf.CvtForImageClassification(config)), 64
    if arch == "segformer":  # a semantic segmenter (per-pixel logits at 1/4 scale)
        config = tf.SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            hidden_sizes=[16, 32],
            num_attention_heads=[1, 2],
            sr_ratios=[2, 1],
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=32,
            num_labels=5,
            attn_implementation="eager",  # sdpa exports from opset 14 only
        )
        return PixelLogits(tf.SegformerForSemanticSegmentation(config)), 64
    raise ValueError(f"unknown arch {arch!r}")


def export(
    module: torch.nn.Module, args: tuple, names: list[str], opset: int, *, static: bool = False
) -> onnx.ModelProto:
    """`module` exported with a dynamic batch (and sequence length for input_ids), or
    at the example's fixed shapes with `static`, as models often ship to devices."""
    buf = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in [*names, "output"]}
    if "input_ids" in names:  # sequence length too
        dynamic = {**{n: {0: "batch", 1: "seq"} for n in names}, "output": {0: "batch"}}
    torch.onnx.export(
        module.eval(),
        args,
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=names,
        output_names=["output"],
        dynamic_axes=None if static else dynamic,
    )
    return onnx.load_from_string(buf.getvalue())


def export_dynamo(module: torch.nn.Module, args: tuple, names: list[str]) -> onnx.ModelProto:
    """`module` as torch's dynamo exporter (torch.onnx.export's default from torch 2.9)
    writes it with a dynamic batch (and sequence length for input_ids) at its default
    opset: `allowzero` on every Reshape, sizes read by `Shape` at run time."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    axes = {0: batch, 1: seq} if "input_ids" in names else {0: batch}
    return torch.onnx.export(
        module.eval(),
        args,
        dynamo=True,
        input_names=names,
        output_names=["output"],
        dynamic_shapes=tuple(axes for _ in names),
    ).model_proto


class TorchAttention(torch.nn.Module):
    """torch's nn.MultiheadAttention (batch first, 4 heads of 8, one packed in-projection)
    with a ReLU FFN and a residual around it: its heads are split into the batch axis
    ([S, B, H*D] -> [S, B*H, D]), and merged back from it ([S, B*H, D] -> [S*B, H*D])
    before the out-projection. `need_weights` (the default) takes the bmm path; with
    `masked`, a key padding mask ([B, S] bool) is folded over the heads and added to
    the scores. With `batch_first=False` (torch's default) it reads [S, B, E]."""

    def __init__(self, need_weights: bool, masked: bool, batch_first: bool = True) -> None:
        super().__init__()
        self.need_weights, self.masked = need_weights, masked
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.ff = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)
        )
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        mask = pad if self.masked else None
        y, _ = self.attn(x, x, x, key_padding_mask=mask, need_weights=self.need_weights)
        return self.head(self.ff(y) + y)


# A YOLOv8n-style detector, written from the published architecture (nothing is
# downloaded): Conv-BN-SiLU, C2f (a channel split, bottlenecks, one concat of all),
# SPPF (chained max pools concatenated), an FPN/PAN neck of nearest upsampling and
# concats, and the decoupled Detect head whose box branch is decoded by DFL (a
# softmax over 16 bins and a fixed 1x1 conv). Anchor and stride decoding, which
# follow the DFL and carry no weights, are left out.


class ConvBnSilu(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.bn(self.conv(x)))


class C2f(nn.Module):
    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBnSilu(cin, 2 * self.c)
        self.cv2 = ConvBnSilu((2 + n) * self.c, cout)
        self.m = nn.ModuleList(
            nn.Sequential(ConvBnSilu(self.c, self.c, 3), ConvBnSilu(self.c, self.c, 3))
            for _ in range(n)
        )
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]) if self.shortcut else m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cv1 = ConvBnSilu(cin, cin // 2)
        self.cv2 = ConvBnSilu(cin // 2 * 4, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YoloDetect(nn.Module):
    def __init__(self, classes: int, widths: tuple[int, ...], bins: int = 16) -> None:
        super().__init__()
        self.classes, self.bins = classes, bins
        box, cls = max(16, widths[0] // 4, 4 * bins), max(widths[0], classes)

        def branch(cin: int, mid: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                ConvBnSilu(cin, mid, 3), ConvBnSilu(mid, mid, 3), nn.Conv2d(mid, cout, 1)
            )

        self.box = nn.ModuleList(branch(w, box, 4 * bins) for w in widths)
        self.cls = nn.ModuleList(branch(w, cls, classes) for w in widths)
        self.dfl = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        n, width = levels[0].shape[0], self.classes + 4 * self.bins
        out = torch.cat(
            [torch.cat((b(x), c(x)), 1).view(n, width, -1) for x, b, c in zip(
                levels, self.box, self.cls, strict=True
            )],
            2,
        )  # fmt: skip
        box, cls = out.split((4 * self.bins, self.classes), 1)
        bins = box.view(n, 4, self.bins, -1).transpose(2, 1).softmax(1)
        return torch.cat((self.dfl(bins).view(n, 4, -1), cls.sigmoid()), 1)


class YoloV8n(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = 16, 32, 64, 128, 256  # YOLOv8n: width multiple 0.25
        self.stem = nn.Sequential(ConvBnSilu(3, c1, 3, 2), ConvBnSilu(c1, c2, 3, 2))
        self.s2 = nn.Sequential(C2f(c2, c2, 1, True), ConvBnSilu(c2, c3, 3, 2))
        self.p3 = C2f(c3, c3, 2, True)
        self.p4 = nn.Sequential(ConvBnSilu(c3, c4, 3, 2), C2f(c4, c4, 2, True))
        self.p5 = nn.Sequential(ConvBnSilu(c4, c5, 3, 2), C2f(c5, c5, 1, True), SPPF(c5, c5))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4, self.top3 = C2f(c5 + c4, c4), C2f(c4 + c3, c3)
        self.down3, self.out4 = ConvBnSilu(c3, c3, 3, 2), C2f(c3 + c4, c4)
        self.down4, self.out5 = ConvBnSilu(c4, c4, 3, 2), C2f(c4 + c5, c5)
        self.detect = YoloDetect(classes, (c3, c4, c5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.s2(self.stem(x)))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top4(torch.cat((self.up(p5), p4), 1))
        o3 = self.top3(torch.cat((self.up(t4), p3), 1))
        o4 = self.out4(torch.cat((self.down3(o3), t4), 1))
        o5 = self.out5(torch.cat((self.down4(o4), p5), 1))
        return self.detect([o3, o4, o5])
