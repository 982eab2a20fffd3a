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


def export(module: torch.nn.Module, args: tuple, names: list[str], opset: int) -> onnx.ModelProto:
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
        dynamic_axes=dynamic,
    )
    return onnx.load_from_string(buf.getvalue())
