"""Losses inside compiled DDP training steps: 2 processes, gloo, CPU.

One ``torch.multiprocessing.spawn`` (module fixture ``ddp_run``) trains a tiny detection head for three steps:

* step 0: both ranks have objects;
* step 1: rank 1 has none (N = 0 positives; its anchors are all background);
* step 2: neither rank has objects (the clamp ``avg_factor >= 1`` is what keeps the loss finite).

Each rank runs the head eagerly under DDP and the loss computation (FocalLoss + GIoULoss, ``avg_factor =
reduce_avg_factor(num_pos)``) through ``torch.compile(fullgraph=True, dynamic=True)``; anchor counts and positive
counts change every step. The workers ``torch.save`` what they saw to ``tmp_path`` and this process, which never
initialises a process group, replays the same training on the concatenated batch in one process and compares.

Identity checked (W ranks, S_r = rank r's summed element loss, N_r its positives):
    A = max(sum_r N_r / W, 1)                                   (what reduce_avg_factor returns on every rank)
    sum_r loss_r = sum_r S_r / (A + eps) = L_single(concat batch, avg_factor=A)                  (exact)
    DDP-averaged parameter gradient = grad L_single(concat, avg_factor=A) / W                    (exact)
    per-rank gradient w.r.t. the rank's own predictions = the rows of grad L_single(concat, A)   (exact)
and, as a consequence, (1/W) sum_r loss_r = L_single(concat, avg_factor=N_total) up to eps when N_total >= W:
DDP with the synchronised avg_factor trains exactly like one process on the whole batch normalised by all
its positives.

Backend in the workers: ``aot_eager``: Dynamo + AOTAutograd (functionalisation of the collective, the joint
forward/backward graph), i.e. everything Inductor would receive, without Inductor's C++ compile, which takes tens of
seconds per rank on 2 shared cores. ``export_scripts/ddp_train_step.py`` runs the same step with Inductor.
No ``specialize_float``: the losses' float hyper-parameters and ``reduce_avg_factor``'s default clamp are
constants of the graph (``validation.StaticFloat``); as plain floats, torch 2.13 traced them symbolically under
``dynamic=True``, then specialised them and restarted the analysis, compiling the step twice.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from visdet_export.distributed import reduce_avg_factor, reduce_mean
from visdet_export.registry import build_loss

WORLD_SIZE = 2
NUM_CLASSES = 3
FEATURES = 8
LR = 0.1
# Ranks without objects at each step.
EMPTY_RANKS: tuple[tuple[int, ...], ...] = ((), (1,), (0, 1))
DTYPE = torch.float64  # float64 so the identities hold to rounding (1e-12), not to float32 noise


class TinyHead(nn.Module):
    """A detection-style head over A anchors: class logits (A, C) and boxes (A, 4) as anchor + predicted offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Linear(FEATURES, NUM_CLASSES)
        self.reg = nn.Linear(FEATURES, 4)

    def forward(self, feats: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls(feats), anchors + self.reg(feats)


def make_head() -> TinyHead:
    torch.manual_seed(0)
    return TinyHead().to(DTYPE)


def make_batch(step: int, rank: int) -> dict[str, Tensor]:
    """Rank ``rank``'s anchors at ``step``; the anchor count differs per rank and step (dynamic shapes)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    num_anchors = 12 + 8 * step + 3 * rank
    xy = torch.rand(num_anchors, 2, generator=gen, dtype=DTYPE) * 20
    wh = 2 + torch.rand(num_anchors, 2, generator=gen, dtype=DTYPE) * 6
    anchors = torch.cat([xy, xy + wh], dim=1)
    targets = anchors + torch.randn(num_anchors, 4, generator=gen, dtype=DTYPE)
    labels = torch.randint(0, NUM_CLASSES, (num_anchors,), generator=gen)
    background = torch.rand(num_anchors, generator=gen) > 0.4
    if rank in EMPTY_RANKS[step]:
        background[:] = True
    labels = torch.where(background, NUM_CLASSES, labels)  # C = background
    feats = torch.randn(num_anchors, FEATURES, generator=gen, dtype=DTYPE)
    return dict(feats=feats, anchors=anchors, labels=labels, targets=targets, pos_weight=(~background).to(DTYPE))


class HeadLoss(nn.Module):
    """The compiled part of the step: dense (all-anchor) losses, positives selected by weight, not by indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_cls = build_loss(dict(type="FocalLoss", gamma=2.0, alpha=0.25, loss_weight=1.0))
        self.loss_bbox = build_loss(dict(type="GIoULoss", loss_weight=2.0))

    def forward(
        self, cls_score: Tensor, labels: Tensor, boxes: Tensor, targets: Tensor, pos_weight: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        avg_factor = reduce_avg_factor(pos_weight.sum())
        loss_cls = self.loss_cls(cls_score, labels, avg_factor=avg_factor)
        loss_bbox = self.loss_bbox(boxes, targets, pos_weight, avg_factor=avg_factor)
        return loss_cls, loss_bbox, avg_factor


def _worker(rank: int, out_dir: str) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        model = DistributedDataParallel(make_head())
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        counter = CompileCounterWithBackend("aot_eager")
        loss_step = torch.compile(HeadLoss(), backend=counter, fullgraph=True, dynamic=True)
        steps = []
        for step in range(len(EMPTY_RANKS)):
            batch = make_batch(step, rank)
            params = [p.detach().clone() for p in model.module.parameters()]
            cls_score, boxes = model(batch["feats"], batch["anchors"])
            cls_score.retain_grad()
            boxes.retain_grad()
            loss_cls, loss_bbox, avg_factor = loss_step(
                cls_score, batch["labels"], boxes, batch["targets"], batch["pos_weight"]
            )
            optimizer.zero_grad()
            (loss_cls + loss_bbox).backward()
            steps.append(dict(
                params=params,
                loss_cls=loss_cls.detach(), loss_bbox=loss_bbox.detach(), avg_factor=avg_factor.detach(),
                grads=[p.grad.detach().clone() for p in model.module.parameters()],
                cls_grad=cls_score.grad, box_grad=boxes.grad,
            ))
            optimizer.step()
        torch.save(dict(
            steps=steps,
            frames=counter.frame_count,
            graph_breaks=sum(counters["graph_break"].values()),
            unique_graphs=counters["stats"]["unique_graphs"],
        ), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Results are on disk and the group is gone: skip interpreter teardown, which in a process that ran Dynamo
    # spends ~8 s in C++ destructors on a loaded 2-core machine. Exit code 0 is what spawn checks; failures
    # above still raise and reach the test through spawn.
    os._exit(0)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_compiled_loss_step_is_one_graph_without_breaks(ddp_run: list[dict]) -> None:
    for result in ddp_run:
        assert result["graph_breaks"] == 0
        # three steps with different anchor counts, positive counts (0 included) and avg_factors: one graph
        assert result["frames"] == 1
        assert result["unique_graphs"] == 1


def test_sum_over_ranks_equals_single_process_over_concatenated_batch(ddp_run: list[dict]) -> None:
    head = make_head()
    loss = HeadLoss()  # eager, no process group here: used only for its two losses with an explicit avg_factor
    exact = dict(rtol=1e-12, atol=1e-14)
    for step in range(len(EMPTY_RANKS)):
        ranks = [result["steps"][step] for result in ddp_run]
        batches = [make_batch(step, rank) for rank in range(WORLD_SIZE)]
        batch = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        num_total = float(batch["pos_weight"].sum())
        avg_factor = max(num_total / WORLD_SIZE, 1.0)

        # the same parameters on both ranks as in the replay (checks the whole DDP + SGD trajectory)
        for rank in ranks:
            for saved, param in zip(rank["params"], head.parameters()):
                torch.testing.assert_close(saved, param.detach(), **exact)
            torch.testing.assert_close(rank["avg_factor"], torch.tensor(avg_factor, dtype=DTYPE), **exact)

        cls_score, boxes = head(batch["feats"], batch["anchors"])
        cls_score.retain_grad()
        boxes.retain_grad()
        single_cls = loss.loss_cls(cls_score, batch["labels"], avg_factor=avg_factor)
        single_bbox = loss.loss_bbox(boxes, batch["targets"], batch["pos_weight"], avg_factor=avg_factor)
        head.zero_grad()
        (single_cls + single_bbox).backward()

        # sum_r loss_r == L_single(concat, avg_factor = A)
        torch.testing.assert_close(sum(r["loss_cls"] for r in ranks), single_cls.detach(), **exact)
        torch.testing.assert_close(sum(r["loss_bbox"] for r in ranks), single_bbox.detach(), **exact)
        # DDP's averaged gradient == grad L_single(concat, A) / W, on every rank
        for rank in ranks:
            for grad, param in zip(rank["grads"], head.parameters()):
                torch.testing.assert_close(grad, param.grad / WORLD_SIZE, **exact)
        # each rank's gradient w.r.t. its own predictions == its rows of the single-process gradient
        torch.testing.assert_close(torch.cat([r["cls_grad"] for r in ranks]), cls_score.grad, **exact)
        torch.testing.assert_close(torch.cat([r["box_grad"] for r in ranks]), boxes.grad, **exact)

        if num_total >= WORLD_SIZE:  # then W * A == N_total: DDP trains as one process normalised by N_total
            mean_loss = sum(r["loss_cls"] + r["loss_bbox"] for r in ranks) / WORLD_SIZE
            by_total = loss.loss_cls(cls_score, batch["labels"], avg_factor=num_total) + loss.loss_bbox(
                boxes, batch["targets"], batch["pos_weight"], avg_factor=num_total
            )
            torch.testing.assert_close(mean_loss, by_total.detach(), rtol=1e-6, atol=0.0)

        with torch.no_grad():  # the SGD step DDP took
            for param in head.parameters():
                param -= LR * param.grad / WORLD_SIZE


def test_rank_without_objects_gives_finite_loss_and_gradients(ddp_run: list[dict]) -> None:
    for step, empty_ranks in enumerate(EMPTY_RANKS):
        for rank in empty_ranks:
            record = ddp_run[rank]["steps"][step]
            assert torch.isfinite(record["loss_cls"]) and record["loss_cls"] > 0  # negatives still count
            assert record["loss_bbox"] == 0  # no positive box
            assert all(torch.isfinite(g).all() for g in [*record["grads"], record["cls_grad"], record["box_grad"]])
            assert torch.count_nonzero(record["box_grad"]) == 0
    # neither rank has objects at the last step: avg_factor is the clamp, 1
    assert all(result["steps"][-1]["avg_factor"] == 1.0 for result in ddp_run)


def test_identity_without_process_group() -> None:
    assert not dist.is_initialized()
    value = torch.tensor([3.0, 5.0], requires_grad=True)
    reduced = reduce_mean(value)
    torch.testing.assert_close(reduced, value.detach())
    assert not reduced.requires_grad  # a normaliser: no gradient, in every configuration
    assert reduce_mean(torch.tensor(4)).dtype == torch.float32  # counts are averaged as float32
    torch.testing.assert_close(reduce_mean(7), torch.tensor(7.0))

    assert reduce_avg_factor(torch.tensor(0)).item() == 1.0
    assert reduce_avg_factor(torch.tensor(6.5, dtype=torch.float64)).item() == 6.5
    assert reduce_avg_factor(torch.tensor(0.0), min_value=0.25).item() == 0.25
    with pytest.raises(ValueError, match="min_value"):
        reduce_avg_factor(torch.tensor(3.0), min_value=0.0)

    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(lambda n: reduce_avg_factor(n) * 2, backend=counter, fullgraph=True, dynamic=True)
    for n in (0.0, 3.0, 8.0):
        assert compiled(torch.tensor(n)).item() == 2 * max(n, 1.0)
    assert counter.frame_count == 1
    assert math.isfinite(reduce_avg_factor(torch.tensor(0.0)).reciprocal().item())


def test_helpers_work_in_a_process_that_loaded_neither_ddp_nor_dynamo(tmp_path: Path) -> None:
    """torch.distributed._functional_collectives is loaded by DDP or Dynamo, not by ``import torch.distributed``:
    a head unit-tested (or gradients all-reduced by hand) in a plain process got an AttributeError."""
    import subprocess
    import sys

    script = (
        "import sys, torch, torch.distributed as dist\n"
        "from visdet_export.distributed import reduce_avg_factor\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/rendezvous', rank=0, world_size=1)\n"
        "print(float(reduce_avg_factor(torch.tensor(3))))\n"
        "dist.destroy_process_group()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "3.0", result.stderr[-2000:]


def _helper_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # compiled before the group exists (a warm-up, a smoke test): it must not keep skipping the all-reduce after
    compiled = torch.compile(lambda n: reduce_avg_factor(n), fullgraph=True, dynamic=True, backend="aot_eager")
    local = compiled(torch.tensor([6.0, 2.0][rank]))
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        solo = dist.new_group([0])
        results = dict(
            local=local,
            after_init=compiled(torch.tensor([6.0, 2.0][rank])),
            # 33000 float16 positives per rank: the world's sum (66000) is past float16's 65504
            float16=reduce_avg_factor(torch.tensor(33000.0, dtype=torch.float16)),
            outside_group=reduce_mean(torch.tensor(4.0 + rank), group=solo),
        )
        dist.barrier()
        torch.save(results, Path(out_dir) / f"helper{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_helpers_across_ranks_recompile_after_init_keep_float16_finite_and_skip_non_members(tmp_path: Path) -> None:
    """A caller compiled before ``init_process_group`` returned each rank's own count forever after (Dynamo folded
    ``is_initialized()`` without a guard); float16 counts summed before the division overflowed to inf (the loss
    then 0); a rank outside ``group`` got an unrelated error (it gets its own value, as ``dist.all_reduce`` is a
    no-op there)."""
    mp.spawn(_helper_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"helper{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    assert [float(r["local"]) for r in results] == [6.0, 2.0]
    assert [float(r["after_init"]) for r in results] == [4.0, 4.0]
    assert all(r["float16"].dtype == torch.float16 and float(r["float16"]) == 32992.0 for r in results)  # 33000
    assert float(results[0]["outside_group"]) == 4.0 and float(results[1]["outside_group"]) == 5.0
