"""Every operator of the torch bridge against onnxruntime, one single-node graph at a time.

Each case builds one node with onnx.helper at one or more opsets (the forms that
changed between opsets: Split/Squeeze/Unsqueeze/Reduce* attributes vs inputs,
Clip attributes vs inputs, Softmax's 2-D coercion before opset 13, Resize-10 vs
Resize-11+ and Upsample-9), runs it in onnxruntime and in the bridge, and
requires the same outputs. A final check makes sure no entry of the op table
goes untested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeslim.compressor.torchgraph import OPS, OnnxModule

RNG = np.random.default_rng(0)
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
BOOL = TensorProto.BOOL


def f(*shape: int, positive: bool = False) -> np.ndarray:
    x = RNG.normal(size=shape).astype(np.float32)
    return np.abs(x) + 0.1 if positive else x


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


@dataclass
class Case:
    op: str
    inputs: list[Any]  # arrays are graph inputs; Init(...) are initializers; None is omitted
    attrs: dict[str, Any] = field(default_factory=dict)
    opsets: tuple[int, ...] = (13, 17)
    outs: tuple[int, ...] = (F32,)
    tol: float = 1e-5
    id: str = ""


@dataclass
class Init:
    value: np.ndarray


X = f(2, 3, 4, 5)
IMG = f(1, 2, 5, 6)
B = RNG.random((2, 3, 4, 5)) > 0.5
TYPES = {np.dtype(np.float32): F32, np.dtype(np.int64): I64, np.dtype(bool): BOOL}


def resize_cases() -> list[Case]:
    cases: list[Case] = []
    transforms = [
        "half_pixel",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
    ]  # tf_half_pixel_for_nearest: onnxruntime refuses it
    roi = Init(np.zeros(0, np.float32))
    for mode in ("nearest", "linear", "cubic"):
        for ct in transforms:
            for scales in ([1, 1, 2, 1.5], [1, 1, 0.5, 0.7], [1, 1, 3, 2]):
                cases.append(
                    Case(
                        "Resize",
                        [IMG, roi, Init(np.array(scales, np.float32))],
                        {"mode": mode, "coordinate_transformation_mode": ct},
                        (11, 13),
                        tol=1e-4,
                        id=f"{mode}-{ct}-scales{scales[2:]}",
                    )
                )
            cases.append(
                Case(
                    "Resize",
                    [IMG, roi, Init(np.zeros(0, np.float32)), Init(i64(1, 2, 9, 4))],
                    {"mode": mode, "coordinate_transformation_mode": ct},
                    (13, 19),
                    tol=1e-4,
                    id=f"{mode}-{ct}-sizes",
                )
            )
    for nearest in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        for scales in ([1, 1, 2, 2], [1, 1, 0.5, 0.5], [1, 1, 1.5, 2.5]):
            cases.append(
                Case(
                    "Resize",
                    [IMG, roi, Init(np.array(scales, np.float32))],
                    {"mode": "nearest", "nearest_mode": nearest},
                    (13,),
                    id=f"nearest-{nearest}-{scales[2:]}",
                )
            )
    cases += [
        Case(
            "Resize",
            [IMG, roi, Init(np.array([1, 1, 2, 2], np.float32))],
            {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5},
            (13,),
            tol=1e-4,
            id="cubic-exclude-outside",
        ),
        Case(
            "Resize",
            [IMG, roi, Init(np.array([1, 1, 2, 3], np.float32))],
            {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
            (19,),
            tol=1e-4,
            id="linear-half_pixel_symmetric",
        ),
        Case(
            "Resize",
            [IMG, None, None, Init(i64(10, 9))],
            {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
            (18,),
            tol=1e-4,
            id="linear-axes-not_larger",
        ),
        Case("Resize", [IMG, Init(np.array([1, 1, 2, 3], np.float32))], {}, (10,), id="resize10"),
        Case(
            "Resize",
            [IMG, Init(np.array([1, 1, 2, 2], np.float32))],
            {"mode": "linear"},
            (10,),
            id="resize10-linear",
        ),
        Case("Upsample", [IMG, Init(np.array([1, 1, 2, 3], np.float32))], {}, (9,), id="up9"),
        Case(
            "Upsample",
            [IMG, Init(np.array([1, 1, 2, 2], np.float32))],
            {"mode": "linear"},
            (9,),
            id="up9-linear",
        ),
    ]
    return cases


CASES: list[Case] = [
    # linear algebra
    Case("Conv", [IMG, Init(f(4, 2, 3, 3)), Init(f(4))], {"pads": [1, 1, 1, 1]}, (11, 13)),
    Case("Conv", [IMG, Init(f(4, 2, 3, 3))], {"pads": [0, 1, 2, 0], "strides": [2, 1]}, id="asym"),
    Case("Conv", [IMG, Init(f(2, 1, 3, 3))], {"group": 2, "dilations": [2, 1]}, id="dw-dil"),
    Case("Conv", [IMG, Init(f(4, 2, 3, 3))], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    Case("Conv", [IMG, Init(f(4, 2, 2, 2))], {"auto_pad": "SAME_LOWER"}, id="same-lower"),
    Case("Conv", [f(2, 3, 7), Init(f(4, 3, 3))], {}, id="1d"),
    Case("ConvTranspose", [IMG, Init(f(2, 3, 4, 4)), Init(f(3))], {"strides": [2, 2]}, (11, 17)),
    Case(
        "ConvTranspose",
        [IMG, Init(f(2, 2, 3, 3))],
        {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1], "group": 2},
        id="pads-outpad-group",
    ),
    Case("ConvTranspose", [IMG, Init(f(2, 3, 3, 3))], {"strides": [2, 2], "dilations": [2, 1]}),
    Case(
        "ConvTranspose",
        [IMG, Init(f(2, 3, 3, 3))],
        {"strides": [2, 2], "output_shape": [10, 12]},
        id="output-shape",
    ),
    Case("Gemm", [f(3, 4), Init(f(5, 4)), Init(f(5))], {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    Case("Gemm", [f(4, 3), Init(f(4, 5))], {"transA": 1}, (11,), id="transA"),
    Case("MatMul", [f(2, 3, 4), Init(f(4, 5))]),
    Case("MatMul", [f(2, 1, 3, 4), f(3, 4, 2)], id="batched"),
    Case("Einsum", [f(2, 3, 4), f(2, 4, 5)], {"equation": "bij,bjk->bik"}, (12, 17)),
    Case("Einsum", [f(2, 3, 4)], {"equation": "bij->bji"}, id="transpose"),
    # elementwise arithmetic and logic
    *[Case(op, [X, f(4, 5)], opsets=(11, 14)) for op in ("Add", "Sub", "Mul")],
    Case("Div", [X, f(5, positive=True)], opsets=(11, 14)),
    Case("Div", [i64(7, -7, 9), Init(i64(2, 2, -4))], outs=(I64,), id="int"),
    Case("Mod", [i64(7, -7, 9), Init(i64(3, 3, -4))], outs=(I64,), id="int"),
    Case("Mod", [f(6), Init(f(6, positive=True))], {"fmod": 1}, id="fmod"),
    Case("Pow", [f(3, 4, positive=True), f(4)], opsets=(11, 15)),
    Case("Pow", [f(3, 4), Init(np.array(2.0, np.float32))], id="square"),
    *[Case(op, [X, f(5), f(4, 1)], opsets=(11, 13)) for op in ("Max", "Min", "Sum", "Mean")],
    *[Case(op, [X, f(4, 5)], opsets=(11, 13), outs=(BOOL,)) for op in ("Less", "Greater")],
    *[
        Case(op, [X, f(4, 5)], opsets=(12, 16), outs=(BOOL,))
        for op in ("LessOrEqual", "GreaterOrEqual")
    ],
    Case("Equal", [i64(1, 2, 3), Init(i64(1, 5, 3))], opsets=(11, 13), outs=(BOOL,)),
    *[Case(op, [B, B[:, :1]], outs=(BOOL,)) for op in ("And", "Or", "Xor")],
    Case("Not", [B], outs=(BOOL,)),
    Case("Where", [B, X, f(5)], opsets=(11, 16)),
    Case("IsNaN", [np.array([1.0, np.nan, np.inf], np.float32)], outs=(BOOL,)),
    Case(
        "IsInf",
        [np.array([1.0, -np.inf, np.inf], np.float32)],
        {"detect_negative": 0},
        (11,),
        outs=(BOOL,),
    ),
    # unary math
    *[
        Case(op, [X], opsets=(11, 13))
        for op in (
            "Erf",
            "Exp",
            "Neg",
            "Abs",
            "Floor",
            "Ceil",
            "Round",
            "Sign",
            "Sin",
            "Cos",
            "Tan",
            "Atan",
            "Identity",
            "Relu",
            "Sigmoid",
            "Tanh",
            "Softsign",
        )
    ],
    *[Case(op, [f(3, 4, positive=True)]) for op in ("Sqrt", "Log", "Reciprocal")],
    # activations
    Case("LeakyRelu", [X], {"alpha": 0.1}, (11, 16)),
    Case("PRelu", [X, Init(f(4, 1, positive=True))], opsets=(11, 16)),
    Case("PRelu", [IMG, Init(f(2, 1, 1))], id="per-channel"),
    Case("Elu", [X], {"alpha": 0.7}),
    Case("Selu", [X]),
    Case("Celu", [X], {"alpha": 2.0}),
    Case("ThresholdedRelu", [X], {"alpha": 0.3}),
    Case("HardSigmoid", [X], {"alpha": 1 / 6, "beta": 0.5}, (11, 13)),
    Case("HardSwish", [X * 4], opsets=(14, 17)),
    Case("Softplus", [X * 10], opsets=(11, 13)),
    Case("Mish", [X], opsets=(18,)),
    Case("Gelu", [X], opsets=(20,)),
    Case("Gelu", [X], {"approximate": "tanh"}, (20,), id="tanh"),
    Case("Clip", [X], {"min": -0.5, "max": 0.5}, (6,), id="attrs"),
    Case(
        "Clip",
        [X, Init(np.array(-0.5, np.float32)), Init(np.array(0.5, np.float32))],
        opsets=(11, 13),
        id="inputs",
    ),
    Case("Clip", [X, None, Init(np.array(0.2, np.float32))], id="max-only"),
    Case("Dropout", [X], opsets=(11, 13)),
    Case("Dropout", [X], opsets=(13,), outs=(F32, BOOL), id="mask"),
    *[
        Case(op, [X], {"axis": axis}, (11, 13), id=f"axis{axis}")
        for op in ("Softmax", "LogSoftmax", "Hardmax")
        for axis in (1, -1)
    ],
    Case("Softmax", [X], opsets=(11, 13), id="default-axis"),
    # pooling and normalisation
    Case(
        "MaxPool",
        [IMG],
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        (11, 12),
    ),
    Case("MaxPool", [IMG], {"kernel_shape": [2, 2], "ceil_mode": 1, "strides": [2, 2]}, id="ceil"),
    Case("MaxPool", [IMG], {"kernel_shape": [3, 2], "pads": [1, 0, 0, 1]}, id="asym"),
    Case("AveragePool", [IMG], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (11, 19)),
    Case(
        "AveragePool",
        [IMG],
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        id="include-pad",
    ),
    Case("AveragePool", [IMG], {"kernel_shape": [2, 2], "strides": [2, 2]}, id="stride"),
    Case("GlobalAveragePool", [IMG], opsets=(11, 13)),
    Case("GlobalMaxPool", [IMG], opsets=(11, 13)),
    Case(
        "BatchNormalization",
        [IMG, Init(f(2)), Init(f(2)), Init(f(2)), Init(f(2, positive=True))],
        {"epsilon": 1e-3},
        (11, 15),
    ),
    Case("LayerNormalization", [X, Init(f(5)), Init(f(5))], opsets=(17,)),
    Case("LayerNormalization", [X, Init(f(4, 5))], {"axis": -2}, (17,), id="two-axes"),
    Case("InstanceNormalization", [IMG, Init(f(2)), Init(f(2))], opsets=(11, 13)),
    Case("GroupNormalization", [f(2, 4, 3, 3), Init(f(4)), Init(f(4))], {"num_groups": 2}, (21,)),
    # reductions
    *[
        Case(op, [X], {"axes": [1, -1], "keepdims": keep}, (11, 13), id=f"attr-keep{keep}")
        for op in (
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceSumSquare",
            "ReduceLogSumExp",
        )
        for keep in (0, 1)
    ],
    *[
        Case(op, [X, Init(i64(1, -1))], opsets=(18,), id="input")
        for op in (
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceSumSquare",
            "ReduceLogSumExp",
        )
    ],
    Case("ReduceLogSum", [f(3, 4, positive=True)], {"axes": [1]}, (11,)),
    Case("ReduceSum", [X], {"axes": [2]}, (11,), id="attr"),
    Case("ReduceSum", [X, Init(i64(0, 2))], {"keepdims": 0}, (13,), id="input"),
    Case("ReduceSum", [X], {}, (13,), id="all"),
    Case("ReduceMean", [X], {}, (11,), id="all"),
    Case("ArgMax", [X], {"axis": 2}, (11, 13), outs=(I64,)),
    Case("ArgMin", [X], {"axis": 1, "keepdims": 0}, outs=(I64,)),
    Case("CumSum", [X, Init(np.array(2, np.int64))], opsets=(11, 14)),
    Case("CumSum", [X, Init(np.array(1, np.int64))], {"exclusive": 1, "reverse": 1}, id="rev"),
    Case("TopK", [X, Init(i64(2))], {"axis": 2}, (11, 13), outs=(F32, I64)),
    # shape and layout
    Case("Flatten", [X], {"axis": 2}, (11, 13)),
    Case("Flatten", [X], {"axis": 0}, id="axis0"),
    Case("Reshape", [X, Init(i64(0, -1, 5))], opsets=(11, 14)),
    Case("Transpose", [X], {"perm": [0, 2, 3, 1]}, (11, 13)),
    Case("Transpose", [X], id="reverse"),
    Case("Concat", [X, f(2, 3, 1, 5)], {"axis": 2}, (11, 13)),
    Case("Split", [X], {"axis": 1, "split": [1, 2]}, (11,), outs=(F32, F32), id="attr"),
    Case("Split", [X], {"axis": 3}, (11, 13), outs=(F32,) * 5, id="equal"),
    Case("Split", [X, Init(i64(3, 2))], {"axis": -1}, (13,), outs=(F32, F32), id="input"),
    Case("Split", [X], {"axis": 3, "num_outputs": 2}, (18,), outs=(F32, F32), id="num_outputs"),
    Case("Unsqueeze", [X], {"axes": [0, -1]}, (11,), id="attr"),
    Case("Unsqueeze", [X, Init(i64(1, 5))], opsets=(13,), id="input"),
    Case("Squeeze", [f(2, 1, 3, 1)], {"axes": [1]}, (11,), id="attr"),
    Case("Squeeze", [f(2, 1, 3, 1), Init(i64(-1))], opsets=(13,), id="input"),
    Case("Squeeze", [f(2, 1, 3, 1)], opsets=(11, 13), id="all"),
    Case("Gather", [Init(f(10, 4)), i64(3, -1, 0)], opsets=(11, 13), id="embedding"),
    Case("Gather", [X, Init(np.array(1, np.int64))], {"axis": 2}, id="scalar"),
    Case("Gather", [X, Init(np.array([[0, 2], [1, 1]], np.int64))], {"axis": -1}, id="2d"),
    Case("GatherElements", [X, Init(RNG.integers(-3, 3, (2, 3, 4, 2)))], {"axis": 3}, (11, 13)),
    Case("GatherND", [X, Init(np.array([[0, 1], [1, 2]], np.int64))], opsets=(11, 13)),
    Case("ScatterND", [X, Init(np.array([[0, 1], [1, 2]], np.int64)), f(2, 4, 5)], opsets=(11, 13)),
    Case("Slice", [X], {"starts": [1], "ends": [3], "axes": [2]}, (9,), id="attrs"),
    Case("Slice", [X, Init(i64(1, 0)), Init(i64(100, -1)), Init(i64(2, 3))], opsets=(11, 13)),
    Case(
        "Slice",
        [X, Init(i64(-1, 4)), Init(i64(-100, 0)), Init(i64(1, 3)), Init(i64(-1, -2))],
        id="negative-steps",
    ),
    Case("Slice", [X, Init(i64(0)), Init(i64(4)), None, Init(i64(2))], id="step"),
    Case("Pad", [IMG], {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "value": 1.5}, (2,), id="attrs"),
    *[
        Case("Pad", [IMG, Init(i64(0, 0, 1, 2, 0, 0, 2, 1))], {"mode": mode}, (11, 13), id=mode)
        for mode in ("constant", "reflect", "edge")
    ],
    Case(
        "Pad",
        [IMG, Init(i64(0, 1, 1, -1, 0, 1, 0, 2)), Init(np.array(2.0, np.float32))],
        id="value-negative",
    ),
    Case(
        "Pad",
        [IMG, Init(i64(2, 1, 1, 2)), None, Init(i64(2, 3))],
        {"mode": "wrap"},
        (19,),
        id="axes-wrap",
    ),
    Case("Tile", [X, Init(i64(1, 2, 1, 3))], opsets=(11, 13)),
    Case("Expand", [f(3, 1), Init(i64(2, 1, 4))], opsets=(11, 13)),
    Case("Expand", [f(2, 3, 4), Init(i64(3, 1))], id="bidirectional"),
    Case("Shape", [X], opsets=(11, 13), outs=(I64,)),
    Case("Shape", [X], {"start": 1, "end": -1}, (15,), outs=(I64,), id="start-end"),
    Case("Size", [X], opsets=(11, 13), outs=(I64,)),
    Case("NonZero", [B], opsets=(11, 13), outs=(I64,)),
    Case("Trilu", [f(2, 4, 5), Init(np.array(1, np.int64))], opsets=(14,)),
    Case("Trilu", [f(4, 5)], {"upper": 0}, (14,), id="lower"),
    Case("DepthToSpace", [f(1, 8, 2, 3)], {"blocksize": 2}, (11, 13)),
    Case("DepthToSpace", [f(1, 8, 2, 3)], {"blocksize": 2, "mode": "CRD"}, id="crd"),
    Case("SpaceToDepth", [f(1, 2, 4, 6)], {"blocksize": 2}, (11, 13)),
    *resize_cases(),
    # constants and types
    Case("Constant", [], {"value": numpy_helper.from_array(f(2, 3))}, (11, 13)),
    Case("Constant", [], {"value_floats": [1.0, 2.5]}, (12,), id="floats"),
    Case("Constant", [], {"value_int": 7}, (12,), outs=(I64,), id="int"),
    Case("ConstantOfShape", [i64(2, 3)], opsets=(11, 13)),
    Case(
        "ConstantOfShape",
        [i64(2, 3)],
        {"value": numpy_helper.from_array(np.array([5], np.int64))},
        outs=(I64,),
        id="int",
    ),
    Case(
        "Range",
        [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)],
        opsets=(11, 13),
        outs=(I64,),
    ),
    Case(
        "Range",
        [np.array(0.5, np.float32), np.array(-2.0, np.float32), np.array(-0.7, np.float32)],
        id="float",
    ),
    Case("Cast", [X * 10], {"to": I64}, (11, 13), outs=(I64,), id="to-int"),
    Case("Cast", [i64(0, 3, -2)], {"to": BOOL}, (11, 13), outs=(BOOL,), id="to-bool"),
    Case("Cast", [B], {"to": F32}, (11, 13), id="bool-to-float"),
    Case("Cast", [X], {"to": TensorProto.DOUBLE}, (13,), outs=(TensorProto.DOUBLE,), id="f64"),
    Case("Cast", [X], {"to": TensorProto.FLOAT16}, (13,), outs=(TensorProto.FLOAT16,), id="f16"),
    Case("CastLike", [i64(1, 2), Init(f(1))], opsets=(15,)),
]


def _graph(case: Case, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    names, feeds, inits, vinfo = [], {}, [], []
    for i, value in enumerate(case.inputs):
        if value is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(value, Init):
            inits.append(numpy_helper.from_array(value.value, name))
        else:
            feeds[name] = value
            vinfo.append(helper.make_tensor_value_info(name, TYPES[value.dtype], value.shape))
    while names and names[-1] == "":
        names.pop()
    outs = [f"out{i}" for i in range(len(case.outs))]
    node = helper.make_node(case.op, names, outs, **case.attrs)
    graph = helper.make_graph(
        [node],
        "g",
        vinfo,
        [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, case.outs, strict=True)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feeds


PARAMS = [
    pytest.param(case, opset, id=f"{case.op}-{case.id or i}-op{opset}")
    for i, case in enumerate(CASES)
    for opset in case.opsets
]


@pytest.mark.parametrize(("case", "opset"), PARAMS)
def test_op_matches_onnxruntime(case: Case, opset: int) -> None:
    model, feeds = _graph(case, opset)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    module = OnnxModule(model)
    with torch.no_grad():
        got = module(*(torch.from_numpy(np.asarray(feeds[n])) for n in module.input_names))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        g = g.detach().numpy()
        assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, e.dtype, g.shape, e.shape)
        if e.dtype == np.float16:
            np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-3)
        else:
            np.testing.assert_allclose(g, e, rtol=case.tol, atol=case.tol)


def test_every_operator_of_the_table_is_swept() -> None:
    assert {case.op for case in CASES} == set(OPS)


def test_gradients_flow_through_resize_and_conv_transpose() -> None:
    case = Case("ConvTranspose", [IMG, Init(f(2, 3, 4, 4))], {"strides": [2, 2]})
    model, feeds = _graph(case, 17)
    module = OnnxModule(model)
    module(torch.from_numpy(feeds["in0"]))[0].sum().backward()
    (weight,) = module.weights().values()
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0
