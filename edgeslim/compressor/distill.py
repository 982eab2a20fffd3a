"""Knowledge distillation: fine-tune the current model on the source model's soft targets.

The teacher (the source model) runs once in onnxruntime over the training set,
so its logits cost one inference pass instead of one per epoch. The student
is the current model (typically just pruned) or a model the spec names, run
through the torch bridge in `torchgraph` and written back into its own graph.
Weights that an earlier magnitude-prune step zeroed stay zero: their masks
are re-applied after every optimiser step, or training would undo the pruning.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from edgeslim.api.spec import DistillConfig
from edgeslim.compressor.steps import StepContext, StepOutput, batches
from edgeslim.errors import BadInput

# Below this share of zeros a weight counts as dense: a few exact zeros are chance.
MASK_MIN_SPARSITY = 0.05


class Distill:
    def __init__(self, config: DistillConfig) -> None:
        self.config = config

    def run(self, model: onnx.ModelProto, ctx: StepContext) -> StepOutput:
        import torch

        from edgeslim.compressor.evaluate import run_batched, session
        from edgeslim.compressor.torchgraph import OnnxModule

        cfg = self.config
        student_model = model
        notes: list[str] = []
        if cfg.student is not None:
            student_model = ctx.load_model(cfg.student.uri, cfg.student.sha256)
            _check_same_interface(ctx.source, student_model, cfg.student.uri)
            notes.append(f"student from {cfg.student.uri} replaces the current model")

        data = ctx.load_dataset(cfg.dataset, cfg.dataset_sha256, student_model)
        teacher_out = run_batched(
            session(ctx.source, threads=os.cpu_count() or 1), data, cfg.batch_size
        )

        torch.manual_seed(cfg.seed)
        torch.set_num_threads(os.cpu_count() or 1)
        student = OnnxModule(student_model)
        # (parameter, mask) pairs: the parameters are the module's own tensors.
        masks = [
            (w, (w != 0).to(w.dtype))
            for w in student.weights().values()
            if float((w == 0).float().mean()) >= MASK_MIN_SPARSITY
        ]
        if masks:
            notes.append(f"kept {len(masks)} pruned weight masks fixed while training")
        optimiser = torch.optim.Adam(student.parameters(), lr=cfg.learning_rate)
        inputs = [torch.from_numpy(data.inputs[name]) for name in student.input_names]
        targets = torch.from_numpy(teacher_out)
        labels = None if data.labels is None else torch.from_numpy(data.labels.astype(np.int64))
        classification = targets.dim() == 2 and targets.shape[1] > 1
        if not classification:
            notes.append("teacher output is not class logits: matching it with mean squared error")
        elif labels is None:
            notes.append("dataset has no labels y: soft targets only")

        n = len(data)
        loss_value = 0.0
        with ctx.progress.task(
            f"distill ({cfg.epochs} epochs)", total=cfg.epochs * -(-n // cfg.batch_size)
        ) as bar:
            for epoch in range(cfg.epochs):
                order = torch.randperm(n)
                total, count = 0.0, 0
                for start, stop in batches(n, cfg.batch_size):
                    idx = order[start:stop]
                    logits = student(*(t[idx] for t in inputs))[0]
                    loss = _loss(
                        logits,
                        targets[idx],
                        None if labels is None else labels[idx],
                        cfg.temperature,
                        cfg.alpha,
                        classification,
                    )
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    if masks:
                        with torch.no_grad():
                            for weight, mask in masks:
                                weight.mul_(mask)
                    total += loss.item() * len(idx)
                    count += len(idx)
                    bar.advance()
                loss_value = total / count
                bar.note(f"epoch {epoch + 1} loss {loss_value:.4f}")
        notes.append(f"{cfg.epochs} epochs on {n} samples, final loss {loss_value:.4f}")
        return StepOutput(model=student.write_back(student_model), notes=notes)


def _loss(logits, teacher, labels, temperature: float, alpha: float, classification: bool):
    import torch.nn.functional as F

    if not classification:
        return F.mse_loss(logits, teacher)
    t = temperature
    # Hinton et al.: scale the soft loss by T^2 so its gradients keep their size as T grows.
    soft = F.kl_div(
        F.log_softmax(logits / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean"
    ) * (t * t)
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(logits, labels)


def _check_same_interface(teacher: onnx.ModelProto, student: onnx.ModelProto, where: str) -> None:
    from edgeslim.compressor.datasets import model_inputs

    t_in = [i.name for i in model_inputs(teacher)]
    s_in = [i.name for i in model_inputs(student)]
    if t_in != s_in or len(teacher.graph.output) != len(student.graph.output):
        raise BadInput(
            f"distill.student {where}: inputs {s_in} and {len(student.graph.output)} outputs "
            "do not match "
            f"the source model's inputs {t_in} and {len(teacher.graph.output)} outputs"
        )
