"""Intel Neural Compressor 2.x auto-tuning on the ONNX file (ONNX Runtime adaptor):
static post-training quantization with an absolute accuracy criterion; INC's
tuning walks its strategy (basic: op-type-wise then op-wise fallback to fp32)
until the drop is within --max-drop or its trial/time budget runs out."""

from __future__ import annotations

import time

import onnx
from common import accuracy, args, arrays, report, samples
from neural_compressor import PostTrainingQuantConfig, quantization
from neural_compressor.config import AccuracyCriterion, TuningCriterion


class Loader:
    """INC's calibration dataloader protocol: batch_size and (inputs, label) pairs."""

    batch_size = 1

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = feeds

    def __iter__(self):
        for feed in self.feeds:
            yield feed, None


def main() -> None:
    a = args()
    started = time.perf_counter()
    model = onnx.load(a.model)
    calib, _ = arrays(a.calib)
    val, y = arrays(a.val)

    def evaluate(m) -> float:
        m = getattr(m, "model", m)  # INC hands either its wrapper or the ModelProto
        return accuracy(m, val, y)

    conf = PostTrainingQuantConfig(
        approach="static",
        quant_format="QDQ",
        calibration_sampling_size=[min(300, len(next(iter(calib.values()))))],
        accuracy_criterion=AccuracyCriterion(criterion="absolute", tolerable_loss=a.max_drop),
        tuning_criterion=TuningCriterion(strategy="basic", timeout=900, max_trials=100),
    )
    q = quantization.fit(
        model, conf, calib_dataloader=Loader(samples(calib, 300)), eval_func=evaluate
    )
    if q is None:
        report(started, failed="no quantized model met the accuracy criterion within budget")
        return
    q.save(str(a.out))
    report(started)


if __name__ == "__main__":
    main()
