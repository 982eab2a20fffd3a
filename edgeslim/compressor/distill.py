"""Knowledge distillation: fine-tune the current model on the source model's soft targets.

The teacher (the source model) runs once in onnxruntime over the training set,
so its logits cost one inference pass instead of one per epoch. The student
is the current model (typically just pruned) or a model the spec names, run
through the torch bridge in `torchgraph` and written back into its own graph.
Weights that an earlier magnitude-prune step zeroed stay zero: their masks
are re-applied after every optimiser step, or training would undo the pruning.

Distilling an already-trained model must not make it worse, so training is
steered by data it does not see: a share of the training set is held out,
the student is scored on it before training and after every epoch, the best
epoch's weights are kept, training stops once the score has not improved for
`patience` epochs, and if no epoch beats the input model, the input weights
are returned with a note saying so. The learning rate follows a cosine decay
(with a short warm-up), so late epochs polish instead of jumping around.

The bridge runs the graph's BatchNormalization nodes with their running
statistics and Dropout as identity. Exporters fold BatchNorm into the Conv
before it, though, and a pruned student with no normalisation left recovered
far worse than the same network pruned as an nn.Module (mobilenet_v3_small at
0.7: 89% against Torch-Pruning's 96%): with `batch_norm`, `distill_norm` puts
a BatchNorm back after each such Conv for the training and folds it back in
at the end, and the held-out score is always that of the model to be written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from edgeslim.api.spec import DistillConfig, LearningRateSchedule
from edgeslim.compressor.steps import StepContext, StepOutput, batches
from edgeslim.cpus import compute_threads
from edgeslim.errors import BadInput

# Below this share of zeros a weight counts as dense: a few exact zeros are chance.
MASK_MIN_SPARSITY = 0.05
# Fewer held-out samples than this say nothing: train on everything, without the guard.
MIN_HELD_OUT = 8
# Share of the optimiser steps spent warming the learning rate up from zero.
WARMUP_SHARE = 0.05
# Teacher activations for feature matching are held in memory for the whole dataset.
MAX_FEATURE_BYTES = 2 * 2**30
# Training samples the inserted BatchNorms' statistics are estimated on.
BN_SAMPLES = 2048
KEPT_INPUT_NOTE = "distillation did not improve the held-out metric; kept the input weights"


@dataclass(frozen=True, order=True)
class Score:
    """A held-out result; higher is better. The metric decides, the loss breaks ties
    (accuracy on a few hundred samples is coarse and often ties)."""

    metric: float
    neg_loss: float

    def describe(self, name: str) -> str:
        return f"{name} {self.metric:.4f} (loss {-self.neg_loss:.4f})"


class Distill:
    def __init__(self, config: DistillConfig) -> None:
        self.config = config

    def run(self, model: onnx.ModelProto, ctx: StepContext) -> StepOutput:
        import torch
        import torch.nn.functional as F

        from edgeslim.compressor.distill_norm import RenormStudent
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
            session(ctx.source, threads=compute_threads()), data, cfg.batch_size
        )

        feature_names = list(dict.fromkeys(cfg.features))
        teacher_feats: list = []
        if feature_names:
            teacher_feats = _teacher_features(ctx.source, student_model, data, feature_names, cfg)
            notes.append(f"matching {len(feature_names)} intermediate tensors as well")

        torch.manual_seed(cfg.seed)
        torch.set_num_threads(compute_threads())
        student = RenormStudent(student_model) if cfg.batch_norm else OnnxModule(student_model)
        student.extra_outputs = feature_names
        feat_targets = [torch.from_numpy(f) for f in teacher_feats]
        # Scale each feature's error by the teacher's variance so that wide, large-valued
        # activations do not drown the others (or the output loss).
        feat_scales = [1.0 / (float(f.var()) + 1e-8) for f in feat_targets]
        # (parameter, mask) pairs: the parameters are the module's own tensors. Only
        # kernels (magnitude pruning zeroes those): a bias that starts at zero learns.
        masks = [
            (w, (w != 0).to(w.dtype))
            for w in student.weights().values()
            if w.dim() >= 2 and float((w == 0).float().mean()) >= MASK_MIN_SPARSITY
        ]
        if masks:
            notes.append(f"kept {len(masks)} pruned weight masks fixed while training")
        inputs = [torch.from_numpy(data.inputs[name]) for name in student.input_names]
        targets = torch.from_numpy(teacher_out)
        labels = None if data.labels is None else torch.from_numpy(data.labels.astype(np.int64))
        classification = targets.dim() == 2 and targets.shape[1] > 1
        if not classification:
            notes.append("teacher output is not class logits: matching it with mean squared error")
        elif labels is None:
            notes.append("dataset has no labels y: soft targets only")

        train_idx, held_idx = _split(len(data), cfg.validation_split, cfg.seed)
        guarded = len(held_idx) > 0
        if cfg.validation_split > 0 and not guarded:
            notes.append(
                f"only {len(data)} samples: nothing held out, every epoch trained and the last kept"
            )
        metric_name = (
            "mse" if not classification else "accuracy" if labels is not None else "agreement"
        )

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            logits, *feats = student(*(t[idx] for t in inputs))
            loss = _loss(
                logits,
                targets[idx],
                None if labels is None else labels[idx],
                cfg.temperature,
                cfg.alpha,
                classification,
            )
            for name, got, want, scale in zip(
                feature_names, feats, feat_targets, feat_scales, strict=True
            ):
                want = want[idx]
                if got.shape != want.shape:
                    raise BadInput(
                        f"distill.features: tensor {name!r} has shape {list(got.shape)} in the "
                        f"student and {list(want.shape)} in the source model"
                    )
                loss = loss + cfg.feature_weight * scale * F.mse_loss(got, want) / len(feats)
            return loss

        def held_out_score() -> Score:
            if isinstance(student, RenormStudent):
                student.recalibrate(calib, cfg.batch_size)
            student.eval()
            with torch.no_grad():
                outs, loss_sum = [], 0.0
                for start, stop in batches(len(held_idx), cfg.batch_size):
                    idx = held_idx[start:stop]
                    outs.append(student(*(t[idx] for t in inputs))[0])
                    loss_sum += float(loss_of(idx)) * len(idx)
                out = torch.cat(outs)
                teacher = targets[held_idx]
                if not classification:
                    metric = -float(torch.mean((out - teacher) ** 2))
                elif labels is not None:
                    metric = float((out.argmax(1) == labels[held_idx]).float().mean())
                else:
                    metric = float((out.argmax(1) == teacher.argmax(1)).float().mean())
            return Score(metric, -loss_sum / len(held_idx))

        def show(score: Score) -> str:
            if metric_name == "mse":
                return f"mse {-score.metric:.6f} (loss {-score.neg_loss:.4f})"
            return score.describe(metric_name)

        # BatchNorm statistics come from a fixed subset of the training split: measured
        # once to insert the norms, re-estimated before every held-out score.
        shuffle = torch.Generator().manual_seed(cfg.seed)
        pick = train_idx[torch.randperm(len(train_idx), generator=shuffle)[:BN_SAMPLES]]
        calib = [t[pick] for t in inputs]
        # The input's score, before any norm is put in.
        best = held_out_score() if guarded else None
        if isinstance(student, RenormStudent):
            added, matched = student.attach(calib, cfg.batch_size, ctx.source)
            if added:
                notes.append(
                    f"trained with BatchNorm after {added} convolutions ({matched} set to the "
                    "source's channel statistics), folded back after"
                )

        params = [p for p in student.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": cfg.learning_rate}]
        if isinstance(student, RenormStudent):
            groups = student.param_groups(params, cfg.learning_rate)
        optimiser = torch.optim.Adam(groups, lr=cfg.learning_rate)
        # An epoch is as many samples as the dataset holds, drawn from the training
        # split: holding a share out costs data, not optimiser steps. (With one pass
        # over the split per epoch, the 20% hold-out also cut a fifth of the steps,
        # and students stopped short: the detector of bench/pruning.py distilled to
        # IoU 91.35 / 91.6 at sparsity 0.3 / 0.5 in 10 epochs, 91.9 / 92.2 in 13: means
        # of 3 seeds, as in the README.)
        steps_per_epoch = -(-len(data) // cfg.batch_size)
        stream = _shuffled_batches(train_idx, cfg.batch_size)
        schedule = _schedule(cfg.schedule, cfg.epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)

        def snapshot() -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() for k, v in student.state_dict().items()}

        best_state = snapshot()
        input_score, best_epoch, stale, epochs_run, loss_value = best, 0, 0, 0, 0.0
        best_loss = best.neg_loss if best is not None else -math.inf
        with ctx.progress.task(
            f"distill ({cfg.epochs} epochs)", total=cfg.epochs * steps_per_epoch
        ) as bar:
            for epoch in range(1, cfg.epochs + 1):
                student.train()  # batch statistics in the inserted norms only
                total, seen = 0.0, 0
                for _ in range(steps_per_epoch):
                    idx = next(stream)
                    loss = loss_of(idx)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    scheduler.step()
                    if masks:
                        with torch.no_grad():
                            for weight, mask in masks:
                                weight.mul_(mask)
                    total += loss.item() * len(idx)
                    seen += len(idx)
                    bar.advance()
                loss_value = total / seen
                epochs_run = epoch
                if not guarded:
                    bar.note(f"epoch {epoch} loss {loss_value:.4f}")
                    continue
                score = held_out_score()
                bar.note(f"epoch {epoch} loss {loss_value:.4f} held-out {show(score)}")
                # Progress is a better score or a lower held-out loss: a badly damaged
                # student's loss falls for epochs before its accuracy moves.
                progress = score > best or score.neg_loss > best_loss
                best_loss = max(best_loss, score.neg_loss)
                if score > best:
                    best, best_epoch = score, epoch
                    best_state = snapshot()
                if progress:
                    stale = 0
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        bar.advance((cfg.epochs - epoch) * steps_per_epoch)
                        break

        summary = (
            f"{epochs_run} of {cfg.epochs} epochs on {len(train_idx)} samples, "
            f"final training loss {loss_value:.4f}"
        )
        if not guarded:
            notes.append(summary)
            return StepOutput(model=_written(student, student_model, calib, cfg), notes=notes)
        assert input_score is not None and best is not None
        if epochs_run < cfg.epochs:
            summary += f" (stopped early: no held-out progress for {cfg.patience} epochs)"
        notes.append(summary)
        notes.append(
            f"held out {len(held_idx)} samples: input {show(input_score)}, "
            f"best epoch {best_epoch} {show(best)}"
        )
        if best_epoch == 0:
            notes.append(KEPT_INPUT_NOTE)
            return StepOutput(model=student_model, notes=notes)
        student.load_state_dict(best_state)
        notes.append(f"kept the weights of epoch {best_epoch}")
        return StepOutput(model=_written(student, student_model, None, cfg), notes=notes)


def _written(student, model: onnx.ModelProto, calib, cfg: DistillConfig) -> onnx.ModelProto:
    """The student's weights in `model`'s graph, inserted norms folded into their convs
    (statistics re-estimated on `calib` first, unless they are the scored ones)."""
    from edgeslim.compressor.distill_norm import RenormStudent

    if isinstance(student, RenormStudent):
        if calib is not None:
            student.recalibrate(calib, cfg.batch_size)
        student.fold()
    return student.write_back(model)


def _teacher_features(
    source: onnx.ModelProto,
    student: onnx.ModelProto,
    data,
    names: list[str],
    cfg: DistillConfig,
) -> list[np.ndarray]:
    """The source model's values of the named intermediate tensors over the dataset."""
    from onnx import helper

    from edgeslim.compressor.evaluate import run, session

    for where, model in (("the source model", source), ("the student", student)):
        produced = {o for n in model.graph.node for o in n.output}
        missing = [name for name in names if name not in produced]
        if missing:
            raise BadInput(
                f"distill.features: {', '.join(map(repr, missing[:5]))} is not a tensor "
                f"computed in {where}"
            )
    probe = onnx.ModelProto()
    probe.CopyFrom(source)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
        for n in names
        if n not in present
    )
    order = [o.name for o in probe.graph.output]
    sess = session(probe, threads=compute_threads(), where="distill teacher")
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    for start, stop in batches(len(data), cfg.batch_size):
        outs = dict(zip(order, run(sess, data.batch(start, stop), "distill teacher"), strict=True))
        for i, name in enumerate(names):
            chunks[i].append(np.asarray(outs[name], dtype=np.float32))
        if start == 0:
            per_sample = sum(c[0].nbytes for c in chunks) / max(1, stop - start)
            if per_sample * len(data) > MAX_FEATURE_BYTES:
                raise BadInput(
                    f"distill.features: the named tensors take {per_sample * len(data) / 2**30:.1f}"
                    f" GiB over the dataset (at most {MAX_FEATURE_BYTES / 2**30:.0f} GiB): name "
                    "fewer or smaller tensors"
                )
    return [np.concatenate(c) for c in chunks]


def _split(n: int, share: float, seed: int):
    """(train indices, held-out indices) as tensors: a seeded random share held out."""
    import torch

    held = round(n * share)
    if held < MIN_HELD_OUT or n - held < 1:
        return torch.arange(n), torch.arange(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


def _shuffled_batches(idx, batch: int):
    """Batches of `idx` forever, reshuffled at every pass, so that over any run of
    steps each sample is drawn as often as the others (to within one)."""
    import torch

    while True:
        order = idx[torch.randperm(len(idx))]
        for start, stop in batches(len(order), batch):
            yield order[start:stop]


def _schedule(kind: LearningRateSchedule, total_steps: int):
    """Learning-rate multiplier per optimiser step: linear warm-up, then cosine to zero."""
    warmup = max(1, int(total_steps * WARMUP_SHARE))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    if kind == LearningRateSchedule.cosine:
        return cosine
    return lambda step: 1.0


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
