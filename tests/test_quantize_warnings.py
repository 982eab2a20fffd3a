"""onnxruntime's quantizer logs warnings through the root logger; the quantize step
keeps them out of the user's stderr and sums them up in one note."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from edgeslim.api.spec import QuantizeConfig
from edgeslim.compressor import datasets
from edgeslim.compressor.quantize import Quantize
from edgeslim.compressor.steps import StepContext
from tests.archs import export, tiny_bert


def test_static_int8_of_a_bert_sums_the_quantizers_warnings_up_in_a_note(tmp_path: Path, caplog):
    """Per-channel static int8 makes onnxruntime warn once per LayerNorm weight (its
    per-channel axis does not exist on a 1-d weight), each a line on stderr before.
    No such record reaches the root logger's handlers now; other warnings still do."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 16))
    model = export(tiny_bert(17), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], 17)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "calib.npz",
        input_ids=rng.integers(0, 100, (8, 16)),
        attention_mask=np.ones((8, 16), np.int64),
    )
    ctx = StepContext(
        source=model,
        workdir=tmp_path,
        load_dataset=lambda uri, sha, m: datasets.load(Path(uri), m, uri),
        load_model=lambda uri, sha: model,
        evaluation_dataset=str(tmp_path / "calib.npz"),
    )
    caplog.set_level(logging.WARNING)
    out = Quantize(QuantizeConfig(mode="static")).run(model, ctx)
    onnx.checker.check_model(out.model)
    warned = [n for n in out.notes if n.startswith("onnxruntime's quantizer warned ")]
    assert len(warned) == 1 and "out-of-range for weight" in warned[0], out.notes
    assert not any("out-of-range" in r.getMessage() for r in caplog.records)
    logging.getLogger("edgeslim.test").warning("still heard")
    assert [r.getMessage() for r in caplog.records] == ["still heard"]
