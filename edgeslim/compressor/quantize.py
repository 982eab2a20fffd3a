"""Lower precision through onnxruntime.quantization: int8 dynamic, int8 static QDQ, fp16,
and weight-only int4/int8 MatMul weights (MatMulNBits).

Static quantization writes QDQ (QuantizeLinear/DequantizeLinear pairs around
standard ops), the format every current runtime understands, with uint8
activations and int8 weights: onnxruntime's recommended pairing on x86 CPUs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgeslim.api.spec import CalibrationMethod, QuantizeConfig, QuantizeMode
from edgeslim.compressor import evaluate, ort_tools, shape_inference
from edgeslim.compressor.datasets import Dataset
from edgeslim.compressor.graph import constants_to_initializers
from edgeslim.compressor.steps import StepContext, StepOutput
from edgeslim.errors import BadInput

# DequantizeLinear gained `axis` (per-channel scales) in opset 13.
PER_CHANNEL_QDQ_OPSET = 13
# weightOnly defaults: onnxruntime's int4 kernels are tuned for blocks of 32.
WEIGHT_ONLY_BITS, WEIGHT_ONLY_BLOCK = 4, 32
# Samples on which an opset conversion must reproduce the original outputs.
UPGRADE_CHECK_SAMPLES = 16


class Quantize:
    def __init__(self, config: QuantizeConfig) -> None:
        self.config = config

    def run(self, model: onnx.ModelProto, ctx: StepContext) -> StepOutput:
        model = _copy(model)
        notes = []
        if converted := constants_to_initializers(model):
            notes.append(f"{converted} Constant nodes turned into initializers first")
        names = {n.name for n in model.graph.node}
        unknown = [n for n in self.config.exclude_nodes if n not in names]
        if unknown:
            raise BadInput(
                f"quantize.excludeNodes: no node named {', '.join(map(repr, unknown))} in the model"
            )
        ops_present = {n.op_type for n in model.graph.node}
        if self.config.op_types and not set(self.config.op_types) & ops_present:
            raise BadInput(
                f"quantize.opTypes {self.config.op_types}: none of these operators is in the model "
                f"(it has {', '.join(sorted(ops_present))})"
            )
        mode = self.config.mode
        if mode is QuantizeMode.fp16:
            out = self._fp16(model, ops_present)
            halves = sum(
                1 for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16
            )
            notes.append(
                f"fp16: {halves} initializers stored as float16, inputs/outputs kept float32"
            )
            return StepOutput(model=out, notes=notes)
        if mode is QuantizeMode.weight_only:
            out, count = self._weight_only(model)
            bits = self.config.bits or WEIGHT_ONLY_BITS
            notes.append(
                f"weightOnly int{bits}: {count} MatMul weights stored in MatMulNBits "
                f"(blocks of {self.config.block_size or WEIGHT_ONLY_BLOCK}), activations float"
                if count
                else "weightOnly: no MatMul with a constant weight matrix, nothing quantized"
            )
            return StepOutput(model=out, notes=notes)

        data, per_channel = None, self.config.per_channel
        if mode is QuantizeMode.static:
            uri = (
                self.config.calibration_dataset
                or (ctx.train_datasets or [ctx.evaluation_dataset])[-1]
            )
            data = ctx.load_dataset(uri, None, model).head(self.config.calibration_samples)
            if per_channel and _opset(model) < PER_CHANNEL_QDQ_OPSET:
                upgraded, note = _upgrade_for_per_channel(model, data)
                notes.append(note)
                per_channel = upgraded is not None
                model = upgraded or model
            notes.append(
                f"calibrated on {len(data)} samples of {uri} "
                f"({self.config.calibration_method.value})"
            )
        # onnxruntime's int8 quantizers work on files.
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(model, src)
            notes += _pre_process(src)
            with _quantizer_warnings(notes):
                if data is None:
                    self._dynamic(src, dst)
                else:
                    self._static(src, dst, data, ctx, per_channel)
            out = onnx.load(dst)
        quantized = sum(
            1
            for n in out.graph.node
            if n.op_type
            in ("DequantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear")
        )
        notes.append(f"{mode.value} int8: {quantized} quantization nodes inserted")
        if self._reduce_range():
            why = "" if self.config.reduce_range else " (this CPU has no VNNI: u8s8 saturates)"
            notes.append(f"weights in 7 bits (reduceRange){why}")
        return StepOutput(model=out, notes=notes)

    def _common(self, per_channel: bool) -> dict:
        return {
            "op_types_to_quantize": self.config.op_types or None,
            "nodes_to_exclude": self.config.exclude_nodes or None,
            "per_channel": per_channel,
            "reduce_range": self._reduce_range(),
        }

    def _reduce_range(self) -> bool:
        if self.config.reduce_range is not None:
            return self.config.reduce_range
        return saturating_int8_cpu()

    def _dynamic(self, src: Path, dst: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            src, dst, weight_type=QuantType.QInt8, **self._common(self.config.per_channel)
        )

    def _static(
        self, src: Path, dst: Path, data: Dataset, ctx: StepContext, per_channel: bool
    ) -> None:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization import (
            CalibrationMethod as OrtMethod,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.index = 0

            def get_next(self) -> dict[str, np.ndarray] | None:
                if self.index >= len(data):
                    return None
                self.index += 1
                bar.advance()
                return data.batch(self.index - 1, self.index)

        method = {
            CalibrationMethod.minmax: OrtMethod.MinMax,
            CalibrationMethod.entropy: OrtMethod.Entropy,
            CalibrationMethod.percentile: OrtMethod.Percentile,
        }[self.config.calibration_method]
        cache = _calibration_cache(src, data, self.config, ctx)
        with ctx.progress.task("calibrate", total=len(data)) as bar:
            quantize_static(
                src,
                dst,
                Reader(),
                **({"calibration_cache_path": cache} if cache is not None else {}),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                **self._common(per_channel),
            )

    def _weight_only(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
        """MatMul weights in 4 or 8 bits with a float scale per block (com.microsoft
        MatMulNBits): most of a transformer's bytes, with activations left alone."""
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            model,
            bits=self.config.bits or WEIGHT_ONLY_BITS,
            block_size=self.config.block_size or WEIGHT_ONLY_BLOCK,
            is_symmetric=True,
            nodes_to_exclude=self.config.exclude_nodes or None,
        )
        quantizer.process()
        out = quantizer.model.model
        return out, sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")

    def _fp16(self, model: onnx.ModelProto, ops_present: set[str]) -> onnx.ModelProto:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        blocked = sorted(ops_present - set(self.config.op_types)) if self.config.op_types else None
        # keep_io_types: callers keep sending float32; casts happen inside the graph.
        return convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=blocked,
            node_block_list=self.config.exclude_nodes or None,
        )


@functools.cache  # the CPU does not change; read once, not on every quantize call
def saturating_int8_cpu() -> bool:
    """Whether this is an x86 CPU without VNNI, where onnxruntime's kernels for uint8
    activations times int8 weights can overflow their 16-bit intermediate sums (see
    onnxruntime's quantization docs, "reduce_range"). Read from /proc/cpuinfo; False
    where that cannot be read (not Linux) or the CPU is not x86."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bool(flags) and not {"avx512_vnni", "avx_vnni"} & set(flags)


def _calibration_cache(
    src: Path, data: Dataset, config: QuantizeConfig, ctx: StepContext
) -> Path | None:
    """Where onnxruntime keeps the activation ranges of this exact model, data and method,
    when the caller asked for a cache (the optimize search quantizes one model many ways).

    Keyed by the bytes calibrated on, so a pruned model or other data never reuses
    another's ranges. None without a cache folder or on onnxruntime without the option.
    """
    import inspect

    from onnxruntime.quantization import quantize_static

    if ctx.calibration_cache is None:
        return None
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        return None
    digest = hashlib.sha256(src.read_bytes())
    # The calibrator collects the tensors of these op types (not per node: exclusions
    # only choose among the ranges later).
    digest.update(f"{config.calibration_method.value}:{sorted(config.op_types)}".encode())
    for name in sorted(data.inputs):
        digest.update(name.encode() + np.ascontiguousarray(data.inputs[name]).tobytes())
    ctx.calibration_cache.mkdir(parents=True, exist_ok=True)
    return ctx.calibration_cache / f"{digest.hexdigest()[:32]}.json"


@contextlib.contextmanager
def _quantizer_warnings(notes: list[str]):
    """onnxruntime's quantizer warns through the root logger, which prints each line to
    the user's stderr (a BERT's LayerNorm weights give one line each under per-channel
    static int8). Its records are kept out of the log and summed up in one note."""
    seen: dict[str, int] = {}

    def collect(record: logging.LogRecord) -> bool:
        if f"onnxruntime{os.sep}quantization" not in record.pathname:
            return True
        message = record.getMessage()
        seen[message] = seen.get(message, 0) + 1
        return False

    root = logging.getLogger()
    root.addFilter(collect)
    try:
        yield
    finally:
        root.removeFilter(collect)
        if seen:
            first = next(iter(seen))
            more = f" (+{len(seen) - 1} other messages)" if len(seen) > 1 else ""
            notes.append(
                f"onnxruntime's quantizer warned {sum(seen.values())} times, e.g. {first!r}{more}"
            )


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _upgrade_for_per_channel(
    model: onnx.ModelProto, data: Dataset
) -> tuple[onnx.ModelProto | None, str]:
    """The model at opset 13 if converting it is provably harmless, and a note on what happened.

    Per-channel QDQ needs DequantizeLinear's `axis`, which exists from opset 13
    on; onnxruntime writes it whatever the model's opset, and the result then
    fails to load. Older exporters (PaddleOCR, many opset 11/12 files) are
    common, so the converted graph is accepted only when onnx's checker passes
    and it gives the same outputs as the original on real samples; otherwise
    the caller quantizes per tensor, which every opset from 10 on supports.
    """
    from onnx import version_converter

    old = _opset(model)
    fallback = f"opset {old} < {PER_CHANNEL_QDQ_OPSET}: per-tensor int8 instead of per-channel"
    sample = data.head(UPGRADE_CHECK_SAMPLES)
    try:
        upgraded = version_converter.convert_version(model, PER_CHANNEL_QDQ_OPSET)
        onnx.checker.check_model(upgraded)
        before, after = evaluate.session(model), evaluate.session(upgraded)
        worst = 0.0
        # One sample per run: a file exported with a fixed batch of 1 accepts nothing else.
        for i in range(len(sample)):
            feed = sample.batch(i, i + 1)
            for a, b in zip(before.run(None, feed), after.run(None, feed), strict=True):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5):
                    return None, f"{fallback} (the converted graph's outputs differ)"
                worst = max(worst, float(np.abs(a - b).max(initial=0.0)))
    except Exception as exc:  # the converter and checker raise many types on graphs they reject
        return None, f"{fallback} (conversion failed: {type(exc).__name__}: {str(exc)[:160]})"
    return upgraded, (
        f"opset {old} upgraded to {PER_CHANNEL_QDQ_OPSET} for per-channel int8 "
        f"(checked: onnx checker; outputs on {len(sample)} samples within 1e-4, "
        f"max diff {worst:.2g})"
    )


def _pre_process(path: Path) -> list[str]:
    """onnxruntime's recommended preparation (shape inference, basic fusions), in place.

    Quantization picks better ranges and fuses more with full shape information;
    a graph the symbolic shape inferencer cannot handle is quantized as it is.
    """
    ort_tools.import_without_torch()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    # Its symbolic shape inference runs apart, with a deadline (see shape_inference).
    shaped = path.with_suffix(".shapes.onnx")
    if shape_inference.infer_file(path, shaped):
        shaped.replace(path)
    else:
        notes.append(
            "symbolic shape inference failed or ran past "
            f"{shape_inference.DEADLINE_SECONDS:.0f} s; pre-processed without it"
        )
    staged = path.with_suffix(".pre.onnx")
    try:
        with contextlib.chdir(path.parent):  # keep its scratch files in the scratch folder
            quant_pre_process(path, staged, skip_symbolic_shape=True)
    except Exception as exc:  # it raises bare Exceptions on unusual graphs
        return [*notes, f"pre-processing skipped: {type(exc).__name__}: {str(exc)[:200]}"]
    staged.replace(path)
    return notes


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
