"""Open Inference Protocol v2 (KServe / Triton / MLServer) over JSON: parse and encode.

Only the REST JSON form is spoken: tensors travel as ``{"name", "shape",
"datatype", "data"}`` with ``data`` flat in row-major order or nested to
match ``shape``. The binary-data extension and gRPC are not implemented.

Everything a client can get wrong raises :class:`RequestError` with a message
that names the tensor and what was expected; the app turns it into a 4xx with
``{"error": message}``. Checks against the *model* (names, datatypes, shapes)
live in :mod:`edgeslim.serving.model`; this module only knows the protocol.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # orjson parses and writes JSON ~5-10x faster and serializes numpy arrays directly.
    import orjson
except ImportError:  # pragma: no cover - the serving extra installs it; stay usable without
    orjson = None  # type: ignore[assignment]

__all__ = [
    "DATATYPES",
    "ORT_TYPES",
    "InferRequest",
    "RequestError",
    "RequestTensor",
    "dumps",
    "encode_infer_response",
    "loads",
    "parse_infer_request",
    "to_array",
]

#: v2 datatype name -> numpy dtype. BYTES carries strings (ONNX ``tensor(string)``).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

#: onnxruntime's type strings (``NodeArg.type``) -> v2 datatype name.
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Which kinds of JSON-derived numpy arrays each target kind accepts. Integers are
# fine where floats are expected (JSON writes 0.0 as 0 in many encoders), but a
# fraction where an integer is expected would be silently truncated, so it is refused.
_ACCEPTS: dict[str, str] = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "O": "U"}
_EXPECTS = {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans", "O": "strings"}
_GOT = {
    "f": "fractional numbers",
    "i": "integers",
    "u": "integers",
    "b": "booleans",
    "U": "strings",
    "O": "nulls, objects or mixed values",
}


class RequestError(Exception):
    """A client mistake; becomes HTTP ``status`` with ``{"error": str(self)}``."""

    def __init__(
        self, message: str, status: int = 400, allow: str = "", close: bool | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.allow = allow  # for 405: the method that would have worked
        # Whether to close the connection after answering; None: when a body was
        # declared, since it was left unread and would be parsed as the next request.
        self.close = close


@dataclass(frozen=True, slots=True)
class RequestTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any  # the JSON value as parsed; converted by to_array once the model's type is known


@dataclass(frozen=True, slots=True)
class InferRequest:
    inputs: list[RequestTensor]
    outputs: list[str] | None  # None: every output of the model
    id: str | None


# ------------------------------------------------------------------------- JSON


def loads(body: bytes) -> Any:
    """Parses a request body; malformed JSON is the client's error."""
    try:
        if orjson is not None:
            return orjson.loads(body)
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise RequestError(f"malformed JSON: {exc}") from None


def dumps(obj: Any) -> bytes:
    """Compact JSON; numpy arrays are written directly (flat) with orjson, via tolist otherwise."""
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# ---------------------------------------------------------------------- request


_JSON_KINDS = {str: "a string", list: "an array", dict: "an object"}


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``obj[key]``, which must be present and of ``kind`` (str, list or dict)."""
    if key not in obj:
        raise RequestError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise RequestError(f"{where}: field {key!r} must be {_JSON_KINDS[kind]}")
    return value


def _parse_tensor(obj: Any, index: int) -> RequestTensor:
    where = f"inputs[{index}]"
    if not isinstance(obj, dict):
        raise RequestError(f"{where}: expected an object with name, shape, datatype and data")
    name = _field(obj, "name", str, where)
    where = f"input {name!r}"
    shape = _field(obj, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"{where}: shape {shape} must be a list of non-negative integers")
    datatype = _field(obj, "datatype", str, where)
    if datatype not in DATATYPES:
        raise RequestError(
            f"{where}: unknown datatype {datatype!r} (expected one of {', '.join(DATATYPES)})"
        )
    if "data" not in obj:
        raise RequestError(f"{where}: missing field 'data'")
    return RequestTensor(name, datatype, tuple(shape), obj["data"])


def parse_infer_request(body: bytes) -> InferRequest:
    """Parses and structurally checks an inference request (not yet against a model)."""
    doc = loads(body)
    if not isinstance(doc, dict):
        raise RequestError("request body must be a JSON object with an 'inputs' array")
    raw_inputs = _field(doc, "inputs", list, "request")
    if not raw_inputs:
        raise RequestError("request: 'inputs' is empty")
    inputs = [_parse_tensor(t, i) for i, t in enumerate(raw_inputs)]
    seen: set[str] = set()
    for t in inputs:
        if t.name in seen:
            raise RequestError(f"input {t.name!r} is given more than once")
        seen.add(t.name)
    outputs: list[str] | None = None
    if doc.get("outputs") is not None:
        raw_outputs = _field(doc, "outputs", list, "request")
        outputs = []
        for i, o in enumerate(raw_outputs):
            if not isinstance(o, dict):
                raise RequestError(f"outputs[{i}]: expected an object with a 'name'")
            outputs.append(_field(o, "name", str, f"outputs[{i}]"))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("request: field 'id' must be a string")
    return InferRequest(inputs, outputs, request_id)


def to_array(tensor: RequestTensor) -> np.ndarray:
    """The tensor's data as a numpy array of its datatype and shape.

    Strict where JSON is loose: strings where numbers are expected, fractions
    for integer types, out-of-range integers, ragged nesting and a value count
    that does not match ``shape`` are all refused, never coerced.
    """
    where = f"input {tensor.name!r}"
    dtype = DATATYPES[tensor.datatype]
    try:
        # Let numpy infer first so the kind check below sees what the client sent.
        raw = np.asarray(tensor.data)
    except (ValueError, OverflowError) as exc:
        if "inhomogeneous" in str(exc):
            raise RequestError(
                f"{where}: data is ragged (nested lists of unequal length)"
            ) from None
        raise RequestError(f"{where}: data cannot be read as {tensor.datatype}: {exc}") from None
    if raw.dtype.kind == "O" and dtype.kind in "iuf" and _all_ints(raw):
        # numpy keeps integers beyond 64 bits as Python objects.
        if dtype.kind != "f":
            raise RequestError(f"{where}: integers beyond 64 bits do not fit {tensor.datatype}")
        try:
            raw = raw.astype(np.float64)
        except OverflowError:
            raise RequestError(f"{where}: integers too large for {tensor.datatype}") from None
    if dtype.kind in "iu" and raw.dtype.kind == "f" and _whole_beyond(raw, dtype):
        # orjson reads integers beyond 64 bits as floats: say what they are.
        raise RequestError(
            f"{where}: values from {raw.min():.17g} to {raw.max():.17g} do not fit "
            f"{tensor.datatype} [{np.iinfo(dtype).min}, {np.iinfo(dtype).max}]"
        )
    if raw.dtype.kind not in _ACCEPTS[dtype.kind]:
        got = _GOT.get(raw.dtype.kind, f"values of numpy kind {raw.dtype.kind!r}")
        raise RequestError(
            f"{where}: datatype {tensor.datatype} expects {_EXPECTS[dtype.kind]} in 'data', "
            f"got {got}"
        )
    expected = math.prod(tensor.shape)
    if raw.size != expected:
        raise RequestError(
            f"{where}: shape {list(tensor.shape)} needs {expected} values, data has {raw.size}"
        )
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        low, high = raw.min(), raw.max()
        if low < info.min or high > info.max:
            raise RequestError(
                f"{where}: values from {low} to {high} do not fit {tensor.datatype} "
                f"[{info.min}, {info.max}]"
            )
    if dtype.kind == "O":
        return raw.reshape(tensor.shape)  # onnxruntime takes numpy str arrays for tensor(string)
    # numpy warns (once per process) when the cast overflows; np.errstate to
    # silence it would cost more than the rest of this function.
    array = raw.astype(dtype, copy=False)
    # JSON has no inf or NaN, so a non-finite value here is a number beyond the
    # type's range (1e39 for FP32, 7e4 for FP16) that the cast turned into inf:
    # refuse it rather than run the model on inf. (orjson refuses NaN and
    # Infinity literals and numbers beyond FP64 as malformed JSON; the json
    # module's fallback accepts the literals, and this catches them too.) A
    # finite sum proves every value finite in one cheap reduction; only a
    # non-finite one (which finite values can also overflow to) looks closer.
    if dtype.kind == "f" and not math.isfinite(array.sum()) and not np.isfinite(array).all():
        info = np.finfo(dtype)
        bad = raw.ravel()[~np.isfinite(array.ravel())][0]
        raise RequestError(
            f"{where}: value {bad} is not a finite {tensor.datatype} "
            f"(the range is +-{info.max:.7g}; JSON has no inf or NaN)"
        )
    return array.reshape(tensor.shape)


def _whole_beyond(raw: np.ndarray, dtype: np.dtype) -> bool:
    """Whole numbers, some outside ``dtype``'s range (only called on a request being refused)."""
    info = np.iinfo(dtype)
    whole = bool(np.isfinite(raw).all() and (raw == np.trunc(raw)).all())
    return whole and bool(raw.size) and (raw.min() < info.min or raw.max() > info.max)


def _all_ints(raw: np.ndarray) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in raw.ravel())


# --------------------------------------------------------------------- response


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: list[tuple[str, str, np.ndarray]],
) -> bytes:
    """``{"model_name", "model_version", "id"?, "outputs": [...]}`` as JSON bytes.

    ``outputs`` holds ``(name, v2 datatype, array)``; data is written flat, row-major.
    """
    tensors = []
    for name, datatype, array in outputs:
        if array.dtype.kind in "biuf":
            data: Any = np.ascontiguousarray(array).ravel()
        else:  # strings and objects: orjson's numpy support covers numbers only
            data = array.ravel().tolist()
        tensors.append(
            {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}
        )
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = tensors
    return dumps(doc)
