"""distill: train the graph's weights against the model as it was before the pipeline cut it.

Pruning, low-rank and quantization start from weights chosen for the full model; a few
hundred steps of knowledge distillation, with the uncut graph as the teacher, win most of
the loss back without labels. The teacher is `am.run.original`: the graph before the
pipeline's first lossy pass, which the pass manager keeps for a pass that asks
(`needs_original`). The batches are the `data=` given to `fxopt.compile`.

    fxopt.compile(model, (x,), data=batches,
                  pipeline="prune-channels{ratio=0.5},distill{steps=300 lr=1e-3},fake-quant")

The loop is `fxopt.finetune` (Adam, cosine decay; data parallel under torchrun), given the
loss of each output (losses.py) and, with `features`, a view of both graphs that also
returns matched intermediate nodes (features.py). After fake-quant it is
quantization-aware training: quantizers not yet calibrated are calibrated first (on the
calibration batches, else on the data's inputs) and every quantizer is frozen, so the
weights learn the grid they will run on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.fx as fx

from ...analyses import Shapes
from ...analyses.fidelity import output_kinds, output_nodes
from ...errors import PassOptionError
from ...ir.inputs import inputs_and_target, positional, split_batch
from ...ir.meta import CALIBRATION_SAMPLE, CALIBRATION_SAMPLE_SIZE
from ...ir.shape_prop import propagate_shapes
from ...pm import Pass, PassResult, format_pipeline, register_pass
from ...pm.analysis import AnalysisManager
from ...pm.options import Range
from ...quant import quantizers_in
from ...train.finetune import finetune
from .features import match_features, returning_features
from .losses import AUTO, OutputLoss, eval_mode, first_output_task_loss, measure_fidelity, on_device
from .report import DistillReport

__all__ = ["Distill", "DistillReport"]

MEASURED_BATCHES = 8   # data batches the fidelity before and after is measured on


@register_pass("distill")
@dataclass(frozen=True)
class Distill(Pass):
    """Train the weights against the graph before the first lossy pass (knowledge distillation).

    steps: optimiser steps (one data batch each; the data are re-read as often as needed).
    lr: Adam's initial learning rate, decayed along a half cosine to 0.
    temperature: T of the softened softmaxes of logits outputs; their KL is scaled by T².
    alpha: the weight of the distillation loss when batches have labels (the task loss,
        cross-entropy, gets 1 - alpha); unlabelled batches train on distillation alone.
    loss: auto (kl for logits outputs: 2-D, made by a linear; mse for the others) | kl | mse |
        cosine (1 - cosine similarity along the last dim), for every output.
    features: fnmatch patterns of node names (e.g. `relu_1`) or module paths (e.g. `layer1.*`,
        a module's output) whose values are matched too, by MSE, where teacher and student
        have the node with one shape.
    feature_weight: the weight of the features' MSE beside the outputs' loss.
    progress: show a progress bar of the training steps.
    seed: seeds torch's generator while training (the user's generator state is kept).
    """

    steps: Annotated[int, Range(1)] = 300
    lr: Annotated[float, Range(0, low_open=True)] = 1e-3
    temperature: Annotated[float, Range(0, low_open=True)] = 4.0
    alpha: Annotated[float, Range(0, 1)] = 0.5
    loss: Literal["auto", "kl", "mse", "cosine"] = "auto"
    features: tuple[str, ...] = ()
    feature_weight: Annotated[float, Range(0)] = 1.0
    progress: bool = False
    seed: Annotated[int, Range(0)] = 0

    tolerance: ClassVar[float | None] = None   # training changes what the model computes
    needs_original: ClassVar[bool] = True      # the teacher: the graph before the first lossy pass

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        teacher, data = self._teacher(am), self._data(am)
        measures = output_kinds(gm)   # how fidelity is measured per output; `kinds`: the losses trained by
        kinds = [AUTO[k] if self.loss == "auto" else self.loss for k in measures]
        labelled = any(inputs_and_target(b, "a distill batch")[1] is not None for b in data)
        if labelled and len(kinds) > 1:
            raise PassOptionError(f"distill: labelled batches, and the model has {len(kinds)} outputs: "
                                  "the task loss (cross-entropy) needs one",
                                  hint="give unlabelled batches (x, or (x, None)) to train by distillation alone")
        report = DistillReport(teacher=_teacher_text(am), steps=self.steps, lr=self.lr, temperature=self.temperature,
                               alpha=self.alpha if labelled else None, feature_weight=self.feature_weight,
                               losses=dict(zip(_output_names(teacher), kinds)),
                               measured_on=min(len(data), MEASURED_BATCHES))
        notes = [f"teacher: {report.teacher}"]
        report.quantizers = _prepare_quantizers(gm, am, data)
        if report.quantizers:
            notes.append(f"quantizers: {report.quantizers}")
        if self.features:   # shapes as they are now: the student's after the cuts, the teacher's before
            am.get(Shapes)
            propagate_shapes(teacher)
        pairs, feature_notes = match_features(teacher, gm, self.features)
        report.features, measured = pairs, data[:MEASURED_BATCHES]
        notes += feature_notes
        report.fidelity_before = measure_fidelity(gm, teacher, measured, measures)
        start = time.perf_counter()
        history = self._train(gm, teacher, data, kinds, pairs)
        report.seconds = time.perf_counter() - start
        report.loss, report.distill, report.task = history.loss, history.distill, history.task
        report.fidelity_after = measure_fidelity(gm, teacher, measured, measures)
        notes.insert(0, f"trained {self.steps} steps; fidelity {report.fidelity_before:.4g} -> "
                        f"{report.fidelity_after:.4g}")
        return PassResult.changed(preserves=(Shapes,), notes=tuple(notes), sections={"distill": report})

    def _teacher(self, am: AnalysisManager) -> fx.GraphModule:
        if am.run is None or am.run.original is None:
            raise PassOptionError("distill: there is no teacher: the pass runs against the graph as it was "
                                  "before the pipeline's first lossy pass, which the pass manager keeps",
                                  hint="run it in a pipeline: fxopt.compile(model, inputs, data=batches, "
                                       "pipeline='prune-channels{ratio=0.5},distill'); to train against a model "
                                       "of your own, call fxopt.finetune(compiled, teacher=model, data=batches)")
        return am.run.original

    def _data(self, am: AnalysisManager) -> list:
        if not am.data:
            raise PassOptionError("distill: no data to train on",
                                  hint="pass batches to compile: fxopt.compile(model, inputs, pipeline=..., "
                                       "data=[x1, x2, ...]) (each x, or (x, labels))")
        return am.data

    def _train(self, gm, teacher, data, kinds: list[str], pairs: list[str]):
        """fxopt.finetune on the graph (or on views returning the matched features too); the
        history it made, which is not left on the graph."""
        student, teacher_net = gm, teacher
        if pairs:
            student, teacher_net = returning_features(gm, pairs), returning_features(teacher, pairs)
        # finetune's own cross-entropy (it checks the labels) takes a bare tensor output
        task_loss = None if not pairs and isinstance(_output_value(gm), fx.Node) else first_output_task_loss
        loss = OutputLoss(kinds, self.temperature, self.feature_weight if pairs else None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            finetune(student, teacher_net, data, self.steps, self.lr, alpha=self.alpha, temperature=self.temperature,
                     loss=task_loss, distill_loss=loss, progress=self.progress)
        history = student.finetune_history
        del student.finetune_history
        return history


def _output_value(gm: fx.GraphModule):
    """What the graph returns: a node (a bare tensor) or a structure of them."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    if spec is not None:
        return output.args[0][0] if spec.is_leaf() and len(output.args[0]) == 1 else output.args[0]
    return output.args[0]


def _output_names(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in output_nodes(gm)]


def _teacher_text(am: AnalysisManager) -> str:
    lossy = next((p for p in am.run.passes if p.tolerance is None), None)
    return f"the graph before {format_pipeline([lossy])}" if lossy is not None else "the traced graph"


def _prepare_quantizers(gm: fx.GraphModule, am: AnalysisManager, data: list) -> str:
    """Quantization-aware training trains against fixed grids: calibrate the quantizers that
    have seen no data (on the calibration batches, else the data's inputs), freeze every one
    still observing. Returns what was done ('' when the graph holds no quantizer)."""
    quantizers = quantizers_in(gm)
    observing = [q for q in quantizers if q.observing]
    if not observing:
        return f"{len(quantizers)} already frozen; trained through them" if quantizers else ""
    done = ""
    if any(not q.calibrated for q in observing):
        if am.calibration:
            batches, source = [split_batch(b) for b in am.calibration], "calibration batches"
        else:
            batches, source = [(inputs_and_target(b)[0], {}) for b in data], "data batches' inputs"
        _calibrate(gm, batches)
        gm.meta[CALIBRATION_SAMPLE] = [args for args, _ in batches[:CALIBRATION_SAMPLE_SIZE]]   # int8 checks them
        done = f"calibrated on {len(batches)} {source}, then "
    for q in observing:
        q.freeze()
    return f"{done}froze {len(observing)} of {len(quantizers)} (QAT through fixed grids)"


@torch.no_grad()
def _calibrate(gm: fx.GraphModule, batches: list[tuple[tuple, dict]]) -> None:
    device = next(iter(gm.parameters()), torch.zeros(())).device
    with eval_mode(gm):
        for args, kwargs in batches:
            gm(*on_device(positional(gm, args, kwargs), device))
