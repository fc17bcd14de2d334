"""A compiled DDP training step with visdet losses and a synchronised ``avg_factor`` (CPU, gloo).

    python export_scripts/ddp_train_step.py --nproc 2                    # spawns 2 processes itself
    python export_scripts/ddp_train_step.py --nproc 2 --backend aot_eager  # no C++ compile: starts faster
    torchrun --nproc-per-node 2 export_scripts/ddp_train_step.py          # or let torchrun launch it

A tiny detection head (class logits + box regression per anchor) runs eagerly under DistributedDataParallel; the
loss computation (FocalLoss + GIoULoss, normalised by ``reduce_avg_factor(num_pos)``) runs as one
``torch.compile(fullgraph=True, dynamic=True)`` graph, the all-reduce of the positive count included: no
``.item()``, no host sync, no graph break. Anchor and positive counts change every step (one graph for all of
them), and rank 1 sees no objects on even steps: its loss stays finite because every rank divides by the
shared ``max(mean num_pos, 1)``. Why that normaliser reproduces single-process training on the whole batch under
DDP's gradient averaging: see :mod:`visdet_export.distributed`.

Compile-friendly choices worth copying: positives are selected by weight (dense ``(A, 4)`` boxes with a 0/1
weight), not by indexing, so shapes do not depend on data; no ``specialize_float`` is needed: the losses' float
hyper-parameters are constants of the graph (``validation.StaticFloat``), so torch 2.13 traces the step once under
``dynamic=True``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from visdet_export.distributed import reduce_avg_factor
from visdet_export.registry import build_loss

NUM_CLASSES = 4  # label NUM_CLASSES is background


def say(line: str) -> None:
    """One line in one write, flushed: the ranks share stdout, and a separate write of the newline (unbuffered
    output) lets another rank's line in between."""
    print(line + "\n", end="", flush=True)
FEATURES = 16


class TinyHead(nn.Module):
    """Per-anchor features (A, F) -> class logits (A, C) and boxes (A, 4) as anchor + scaled offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU())
        self.cls = nn.Linear(32, NUM_CLASSES)
        self.reg = nn.Linear(32, 4)

    def forward(self, feats: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.trunk(feats)
        size = (anchors[:, 2:] - anchors[:, :2]).repeat(1, 2)
        return self.cls(hidden), anchors + self.reg(hidden) * size


class DetectionLoss(nn.Module):
    """The compiled part: losses over all anchors, positives weighted 1, normalised by the ranks' mean positives."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_cls = build_loss(dict(type="FocalLoss", gamma=2.0, alpha=0.25, loss_weight=1.0))
        self.loss_bbox = build_loss(dict(type="GIoULoss", loss_weight=2.0))

    def forward(self, cls_score: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> dict[str, Tensor]:
        pos_weight = (labels < NUM_CLASSES).to(boxes.dtype)
        avg_factor = reduce_avg_factor(pos_weight.sum())  # all-reduce inside the graph; >= 1 on every rank
        return dict(
            loss_cls=self.loss_cls(cls_score, labels, avg_factor=avg_factor),
            loss_bbox=self.loss_bbox(boxes, target_boxes, pos_weight, avg_factor=avg_factor),
            avg_factor=avg_factor,
        )


def synthetic_batch(step: int, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Features, anchors, labels and target boxes for ``64 + 16 * step`` anchors; rank 1 has no objects on even
    steps."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    num = 64 + 16 * step
    xy = torch.rand(num, 2, generator=gen) * 50
    anchors = torch.cat([xy, xy + 4 + torch.rand(num, 2, generator=gen) * 12], dim=1)
    targets = anchors + torch.randn(num, 4, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (num,), generator=gen)
    no_objects = rank == 1 and step % 2 == 0
    labels = torch.where((torch.rand(num, generator=gen) < 0.8) | no_objects, NUM_CLASSES, labels)
    return torch.randn(num, FEATURES, generator=gen), anchors, labels, targets


def train(rank: int, world_size: int, init_method: str, steps: int, backend: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyHead())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.compile(DetectionLoss(), backend=backend, fullgraph=True, dynamic=True)
    for step in range(steps):
        feats, anchors, labels, targets = synthetic_batch(step, rank)
        cls_score, boxes = model(feats, anchors)
        losses = loss_fn(cls_score, boxes, labels, targets)
        optimizer.zero_grad()
        (losses["loss_cls"] + losses["loss_bbox"]).backward()  # DDP averages the gradients over ranks
        optimizer.step()
        say(  # logging reads the values after the step; the step itself never syncs with the host
            f"step {step} rank {rank}: anchors {len(labels):3d} num_pos {int((labels < NUM_CLASSES).sum()):2d} "
            f"avg_factor {losses['avg_factor'].item():5.1f} loss_cls {losses['loss_cls'].item():.4f} "
            f"loss_bbox {losses['loss_bbox'].item():.4f}"
        )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    say(f"rank {rank}: compiled graphs {graphs}, graph breaks {breaks}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per rank (default 4)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend: inductor | aot_eager | eager")
    args = parser.parse_args()
    if "RANK" in os.environ:  # launched by torchrun: one process per rank, rendezvous from the environment
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args.steps, args.backend)
        return
    with tempfile.TemporaryDirectory() as tmp:  # file:// rendezvous: no free port to find
        mp.spawn(train, args=(args.nproc, f"file://{tmp}/rendezvous", args.steps, args.backend), nprocs=args.nproc)


if __name__ == "__main__":
    main()
