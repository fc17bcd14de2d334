"""A student + teacher GFL head in ONNX with its training and distillation losses attached, run in onnxruntime.

1. A tiny GFL-style head (a conv tower, a class-logit conv and a DFL-distribution conv on an 8 x 8 feature map)
   decodes the positive anchors it is given (``pos_inds``) into boxes; a second, differently initialised copy is
   the teacher. Both run in one exported model.
2. :func:`visdet_export.export.attach.attach_losses` attaches GFL's losses (QualityFocalLoss on every anchor,
   GIoULoss and DistributionFocalLoss on the positives) and two distillation losses against the teacher
   (KnowledgeDistillationKLDivLoss on the class logits, LocalizationDistillationLoss on the box distributions).
3. The merged graph runs in onnxruntime on generated samples, N = 0 positives included, next to the PyTorch model
   and the eager losses.

Run: ``python export_scripts/distill_gfl_example.py [--out DIR] [--positives N ...]``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visdet_export import build_loss
from visdet_export.export.attach import attach_losses, evaluate
from visdet_export.export.onnx import quiet_exporter
from visdet_export.specs import spec_for

NUM_CLASSES = 20  # a VOC-sized head: the exported loss graphs take any class count
REG_MAX = 16
IN_CHANNELS = 16
HEIGHT = WIDTH = 8
BATCH = 2
STRIDE = 8.0
NUM_ANCHORS = BATCH * HEIGHT * WIDTH

MODEL_OUTPUTS = ("cls_score", "bbox_dist", "dfl_pred", "bbox_pred", "teacher_cls_score", "teacher_bbox_dist")

# (name, loss config, loss input -> model output or new graph input), as GFLHead / LDHead use them.
LOSSES: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    (
        "loss_cls",
        dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        {"pred": "cls_score", "labels": "labels", "scores": "label_scores", "avg_factor": "num_pos"},
    ),
    (
        "loss_bbox",
        dict(type="GIoULoss", loss_weight=2.0),
        {"pred": "bbox_pred", "target": "bbox_targets", "weight": "bbox_weight", "avg_factor": "bbox_avg_factor"},
    ),
    (
        "loss_dfl",
        dict(type="DistributionFocalLoss", loss_weight=0.25, reg_max=REG_MAX),
        {"pred": "dfl_pred", "target": "dfl_targets", "weight": "dfl_weight", "avg_factor": "dfl_avg_factor"},
    ),
    (
        "loss_kd",
        dict(type="KnowledgeDistillationKLDivLoss", loss_weight=1.0, T=2),
        {"pred": "cls_score", "soft_label": "teacher_cls_score"},
    ),
    (
        "loss_ld",
        dict(type="LocalizationDistillationLoss", loss_weight=0.25, T=10, reg_max=REG_MAX),
        {
            "pred": "bbox_dist",
            "soft_label": "teacher_bbox_dist",
            "weight": "bbox_weight",
            "avg_factor": "ld_avg_factor",
        },
    ),
]


class TinyGFLHead(nn.Module):
    """Class logits and DFL box distributions per anchor; the positive anchors' boxes decoded from them."""

    def __init__(self, feat_channels: int = 32, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.tower = nn.Sequential(
            nn.Conv2d(IN_CHANNELS, feat_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(feat_channels, feat_channels, 3, padding=1),
            nn.ReLU(),
        )
        self.gfl_cls = nn.Conv2d(feat_channels, NUM_CLASSES, 3, padding=1)
        self.gfl_reg = nn.Conv2d(feat_channels, 4 * (REG_MAX + 1), 3, padding=1)
        for parameter in self.parameters():
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        with torch.no_grad():
            self.gfl_cls.bias.fill_(-4.595)  # GFL's prior: sigmoid = 0.01
        ys, xs = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
        points = (torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() + 0.5) * STRIDE
        self.register_buffer("points", points.repeat(BATCH, 1))  # (B * H * W, 2), image-major like the flattening
        self.register_buffer("project", torch.arange(REG_MAX + 1, dtype=torch.float32))

    def forward(self, feats: Tensor, pos_inds: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """feats (B, IN_CHANNELS, H, W), pos_inds (N,) into the B * H * W anchors ->
        cls_score (B*H*W, C), bbox_dist (N, 4 * (REG_MAX + 1)), dfl_pred (N * 4, REG_MAX + 1), bbox_pred (N, 4)."""
        x = self.tower(feats)
        cls_score = self.gfl_cls(x).permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES)
        reg = self.gfl_reg(x).permute(0, 2, 3, 1).reshape(-1, 4 * (REG_MAX + 1))
        bbox_dist = reg.index_select(0, pos_inds)
        n = bbox_dist.size(0)
        dfl_pred = bbox_dist.reshape(n * 4, REG_MAX + 1)  # not -1: N may be 0
        distances = (F.softmax(dfl_pred, dim=1) * self.project).sum(dim=1).reshape(n, 4) * STRIDE
        points = self.points.index_select(0, pos_inds)
        bbox_pred = torch.cat([points - distances[:, :2], points + distances[:, 2:]], dim=1)
        return cls_score, bbox_dist, dfl_pred, bbox_pred


class StudentTeacher(nn.Module):
    """The student's four outputs and the teacher's class logits and box distributions (teacher frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.student = TinyGFLHead(feat_channels=32, seed=0)
        self.teacher = TinyGFLHead(feat_channels=48, seed=1).requires_grad_(False)

    def forward(self, feats: Tensor, pos_inds: Tensor) -> tuple[Tensor, ...]:
        cls_score, bbox_dist, dfl_pred, bbox_pred = self.student(feats, pos_inds)
        teacher_cls_score, teacher_bbox_dist, _, _ = self.teacher(feats, pos_inds)
        return cls_score, bbox_dist, dfl_pred, bbox_pred, teacher_cls_score, teacher_bbox_dist


def make_sample(num_pos: int, seed: int = 0) -> dict[str, Tensor]:
    """Model inputs and GFL targets for ``num_pos`` positive anchors (0 allowed)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(BATCH, IN_CHANNELS, HEIGHT, WIDTH, generator=g)
    pos_inds = torch.randperm(NUM_ANCHORS, generator=g)[:num_pos].sort().values
    labels = torch.full((NUM_ANCHORS,), NUM_CLASSES, dtype=torch.int64)
    labels[pos_inds] = torch.randint(0, NUM_CLASSES, (num_pos,), generator=g)
    label_scores = torch.zeros(NUM_ANCHORS)
    label_scores[pos_inds] = torch.rand(num_pos, generator=g)
    # target sides (left, top, right, bottom) in units of the stride, inside the DFL range
    sides = torch.rand(num_pos, 4, generator=g) * (REG_MAX - 1.0) + 0.5
    points = TinyGFLHead().points.index_select(0, pos_inds)
    bbox_targets = torch.cat([points - sides[:, :2] * STRIDE, points + sides[:, 2:] * STRIDE], dim=1)
    bbox_weight = torch.rand(num_pos, generator=g) + 0.05
    return {
        "feats": feats,
        "pos_inds": pos_inds,
        "labels": labels,
        "label_scores": label_scores,
        "num_pos": torch.tensor(float(max(num_pos, 1))),
        "bbox_targets": bbox_targets,
        "bbox_weight": bbox_weight,
        "bbox_avg_factor": bbox_weight.sum().clamp(min=1.0),
        "dfl_targets": sides.reshape(-1),
        "dfl_weight": bbox_weight[:, None].expand(-1, 4).reshape(-1),
        "dfl_avg_factor": torch.tensor(4.0),
        "ld_avg_factor": torch.tensor(4.0),
    }


MODEL_INPUTS = ("feats", "pos_inds")


def export_model(model: nn.Module, path: Path) -> Path:
    """The student + teacher model as ONNX (opset 18) with a dynamic number of positives."""
    sample = make_sample(5)
    positives = torch.export.Dim("num_pos", min=0)
    with quiet_exporter():
        program = torch.onnx.export(
            model.eval(),
            (sample["feats"], sample["pos_inds"]),
            dynamo=True,
            dynamic_shapes=({}, {0: positives}),
            input_names=list(MODEL_INPUTS),
            output_names=list(MODEL_OUTPUTS),
            opset_version=18,
            verbose=False,  # the exporter prints "[torch.onnx] ..." progress lines otherwise (verbose=None)
        )
        program.save(str(path))
    return path


def build_merged(model: nn.Module, directory: Path, overwrite: bool = False) -> Path:
    """Export the model and attach :data:`LOSSES`; returns the merged model's path."""
    model_path = export_model(model, directory / "student_teacher.onnx")
    return attach_losses(model_path, LOSSES, directory / "student_teacher_losses.onnx", overwrite=overwrite)


def torch_losses(model: nn.Module, sample: Mapping[str, Tensor]) -> dict[str, float]:
    """The model in PyTorch and every loss in eager, fed as the merged graph feeds them."""
    with torch.no_grad():
        outputs = dict(zip(MODEL_OUTPUTS, model(sample["feats"], sample["pos_inds"])))
        values = {}
        for name, cfg, mapping in LOSSES:
            loss = build_loss(cfg)
            inputs = {key: outputs[src] if src in outputs else sample[src] for key, src in mapping.items()}
            values[name] = float(spec_for(loss).call(loss, inputs))
    return values


def onnx_losses(
    merged: Path, samples: Sequence[Mapping[str, Tensor]], progress: bool = False
) -> dict[str, list[float]]:
    """The merged graph in onnxruntime over ``samples``: loss name -> one value per sample."""
    summary = evaluate(merged, samples, outputs=[name for name, _, _ in LOSSES], progress=progress)
    return summary.values


def compare(
    model: nn.Module, merged: Path, samples: Sequence[Mapping[str, Tensor]]
) -> list[dict[str, tuple[float, float]]]:
    """Per sample: loss name -> (onnxruntime, PyTorch)."""
    ort_values = onnx_losses(merged, samples)
    rows = []
    for i, sample in enumerate(samples):
        reference = torch_losses(model, sample)
        rows.append({name: (ort_values[name][i], reference[name]) for name in reference})
    return rows


#: How close onnxruntime's values must be to PyTorch's (the ONNX artifacts' tolerance, with a floor for tiny values).
RTOL, ATOL = 1e-4, 1e-6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for the ONNX files (default: a temporary one)")
    parser.add_argument("--positives", type=int, nargs="+", default=[0, 1, 9, 40], help="positives per sample")
    args = parser.parse_args(argv)
    model = StudentTeacher().eval()
    samples = [make_sample(n, seed=i) for i, n in enumerate(args.positives)]
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.out or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        merged = build_merged(model, directory, overwrite=True)
        kept = "" if args.out else " (temporary: deleted at exit; --out DIR keeps it)"
        print(f"merged model: {merged}{kept}")
        outside = 0
        for n, row in zip(args.positives, compare(model, merged, samples)):
            print(f"N = {n} positives")
            for name, (ort_value, torch_value) in row.items():
                rel = abs(ort_value - torch_value) / max(abs(torch_value), 1e-12)
                # float32 sums of a few hundred terms: an absolute floor for values near 0 (LD at ~2e-4)
                close = math.isfinite(ort_value) and abs(ort_value - torch_value) <= ATOL + RTOL * abs(torch_value)
                outside += not close
                mark = "" if close else f"   outside rtol={RTOL:g}, atol={ATOL:g}"
                print(f"  {name:<10} onnxruntime {ort_value:>14.8f}   pytorch {torch_value:>14.8f}   rel.err {rel:.1e}"
                      + mark)
        print(f"{outside} value(s) outside rtol={RTOL:g}, atol={ATOL:g}")
    return 0 if outside == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
