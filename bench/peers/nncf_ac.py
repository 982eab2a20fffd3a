"""NNCF `quantize_with_accuracy_control` on the ONNX file (ONNX backend): INT8
post-training quantization, then reverting the most sensitive layers to float until
the absolute accuracy drop is within --max-drop."""

from __future__ import annotations

import time

import nncf
import onnx
from common import accuracy, args, arrays, report, samples


def main() -> None:
    a = args()
    started = time.perf_counter()
    model = onnx.load(a.model)
    calib, _ = arrays(a.calib)
    val, y = arrays(a.val)
    calibration = nncf.Dataset(samples(calib, 300))
    # One validation item is the whole split; validation_fn scores it as edgeslim does.
    validation = nncf.Dataset([(val, y)], lambda item: item[0])

    def validate(m: onnx.ModelProto, items) -> float:
        feeds, labels = next(iter(items))
        return accuracy(m, feeds, labels)

    quantized = nncf.quantize_with_accuracy_control(
        model,
        calibration_dataset=calibration,
        validation_dataset=validation,
        validation_fn=validate,
        max_drop=a.max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=300,
        model_type=nncf.ModelType.TRANSFORMER if a.transformer else None,
    )
    onnx.save(quantized, a.out)
    report(started)


if __name__ == "__main__":
    main()
