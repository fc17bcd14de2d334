"""Loss normalisers synchronised across ranks, written to trace into ``torch.compile(fullgraph=True)`` graphs.

MMDetection-style dense heads (FCOS, ATSS, GFL, ...) normalise their losses by the number of positive samples
averaged over all ranks::

    num_pos = max(reduce_mean(torch.tensor(num_pos)).item(), 1.0)     # MMDetection
    avg_factor = reduce_avg_factor(pos_mask.sum())                     # here

MMDetection's ``reduce_mean`` calls the in-place ``dist.all_reduce`` and the heads then call ``.item()`` and a
Python ``max``: a device-to-host sync in every step, and a graph break wherever Dynamo cannot capture the scalar.
Here both helpers return tensors and use functional collectives, so the all-reduce and the clamp are nodes of
the compiled graph and the step never waits for the host.

Why the averaged count is the right normaliser under DDP: with ``W`` ranks, rank ``r`` computes
``loss_r = S_r / (A + eps)`` where ``S_r`` is its summed element loss and ``A = max(sum_r N_r / W, 1)`` is the
synchronised ``avg_factor``. DDP averages the gradients, i.e. it follows ``(1 / W) * sum_r loss_r``, and

    sum_r loss_r = (sum_r S_r) / (A + eps)

is exactly the loss of one process over the concatenated batch with ``avg_factor = A``; the averaged objective is
therefore the single-process loss normalised by ``W * A = max(N_total, W)`` (up to ``eps``), i.e. by the total
number of positives, as if one process had seen the whole batch. A rank without objects (``N_r = 0``) adds only
its negatives' classification loss and divides by the shared ``A >= 1``: no division by zero, no local normaliser
that disagrees with the other ranks'.

Without an initialised process group (single process, CPU-only builds without ``torch.distributed``) the helpers
are the identity (``reduce_mean``) and a clamp (``reduce_avg_factor``). A compiled caller recompiles when a
default process group is created or destroyed (:func:`is_distributed` reads the group itself, which Dynamo
guards on), so a warm-up compiled before ``init_process_group`` does not keep skipping the all-reduce.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor

from .numerics import static
from .validation import StaticFloat

if dist.is_available():
    # not loaded by ``import torch.distributed``: only DDP or Dynamo did, so a process using neither failed
    from torch.distributed import _functional_collectives as functional_collectives
    from torch.distributed import distributed_c10d

__all__ = ["is_distributed", "reduce_avg_factor", "reduce_mean"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is built in and a default process group is initialised.

    Read as the default group itself (what ``dist.is_initialized()`` compares with None): Dynamo folds
    ``is_initialized()`` to a constant without a guard, so a caller compiled before ``init_process_group`` kept
    skipping the all-reduce; a group read this way is guarded, and creating or destroying one recompiles. Read
    from ``_world.default_pg`` (what ``GroupMember.WORLD`` returns on torch 2.11-2.14) rather than through that
    metaclass property, which torch 2.11's Dynamo misreads as set when no group exists.
    """
    return dist.is_available() and distributed_c10d._world.default_pg is not None


def _as_float_tensor(value: Tensor | float) -> Tensor:
    """``value`` as a tensor without gradient; integer / bool counts become float32 (MMDetection's ``torch.float``)."""
    if not isinstance(value, Tensor):
        return torch.scalar_tensor(float(value), dtype=torch.float32)
    value = value.detach()
    if not value.is_floating_point():
        value = value.to(torch.float32)
    return value


def reduce_mean(tensor: Tensor | float, group: dist.ProcessGroup | None = None) -> Tensor:
    """The element-wise mean of ``tensor`` over the ranks of ``group`` (default: the world), as a tensor.

    Args:
        tensor (Tensor[*] of any shape, typically Tensor[] such as a count of positives): the same shape, dtype
            and device on every rank (with NCCL: a CUDA tensor). A Python number becomes a CPU tensor, so it
            suits gloo and the no-process-group case only.
        group: the process group to average over; ``None`` is the default (world) group.

    Returns:
        Tensor[*]: the mean over ranks, ``tensor``'s shape on every rank. Integer / bool inputs are averaged in
        float32; floating inputs keep their dtype. Without an initialised process group: ``tensor`` itself
        (detached; as a float32 0-d tensor for a Python number).

    Differences from MMDetection's ``reduce_mean``:

    * returns a new tensor (MMDetection clones and reduces in place) and never syncs with the host;
    * traces into ``torch.compile(fullgraph=True)`` graphs (no graph break);
    * the result carries no gradient: it is a normaliser (MMDetection drops it anyway with ``.item()``), and the
      functional all-reduce has no autograd formula;
    * integer counts are accepted (MMDetection's in-place ``div_`` fails on them);
    * on a rank outside ``group`` it returns ``tensor`` itself, as ``dist.all_reduce`` does nothing there.

    Each rank divides by the world size before the sum, as MMDetection does: a float16 count sums without
    overflowing where the world's total would (65504).
    """
    value = _as_float_tensor(tensor)
    if not is_distributed():
        return value
    if group is None:
        group = cast(dist.ProcessGroup, dist.group.WORLD)  # set whenever a process group is initialised
    # Why functional collectives: ``dist.all_reduce`` mutates its argument in place and returns a work handle; only
    # some Dynamo versions rewrite it into a graph op (2.13 does), the others break the graph. The functional
    # ``all_reduce`` is a pure op (``_c10d_functional.all_reduce`` + ``wait_tensor``) that Dynamo and AOTAutograd
    # trace like any other op on every supported torch, and in eager mode it runs the same collective (returning a
    # tensor that waits on first use). Gloo has no AVG reduce op, so we sum and divide by the world size (a
    # constant of the process group, folded into the graph).
    world_size = dist.get_world_size(group)
    if world_size < 1:  # this rank is not in ``group`` (-1)
        return value
    total = functional_collectives.all_reduce(value / world_size, "sum", group)
    # a plain tensor, not the AsyncCollectiveTensor eager returns (what torch.save and weights_only loads refuse);
    # the wait follows device semantics (a stream wait on CUDA, not a host sync), as its first use would
    return functional_collectives.wait_tensor(total)


#: ``reduce_avg_factor``'s default lower clamp, a constant of compiled graphs (a plain float default is a symbolic
#: input under ``dynamic=True``, and torch 2.13 compiled the step twice to specialise it).
LEAST_AVG_FACTOR = StaticFloat(1.0)


def reduce_avg_factor(
    num_pos: Tensor | float, min_value: float = LEAST_AVG_FACTOR, group: dist.ProcessGroup | None = None
) -> Tensor:
    """The ``avg_factor`` of a dense head: the number of positives averaged over ranks, at least ``min_value``.

    ``reduce_avg_factor(n)`` is MMDetection's ``max(reduce_mean(n).item(), 1.0)`` as a 0-d tensor: no host sync, no
    graph break, and the same value on every rank, so a rank with no objects (``n = 0``) divides by the shared,
    positive normaliser rather than by 0. Pass it straight to a loss: ``loss(pred, target, weight,
    avg_factor=reduce_avg_factor(n))`` (0-d tensors never cause a recompile).

    Args:
        num_pos (Tensor[] int or float, or a Python number): this rank's count (or sum of weights, e.g. FCOS's
            centerness targets) of positives.
        min_value: the lower clamp; > 0 so the normaliser is never zero.
        group: as in :func:`reduce_mean`.

    Returns:
        Tensor[]: ``max(mean over ranks of num_pos, min_value)``, float32 for integer counts; without an
        initialised process group ``max(num_pos, min_value)``.
    """
    least = static(min_value)
    if not least > 0.0:
        raise ValueError("min_value must be > 0 (it keeps the normaliser away from zero), got " + str(least))
    return reduce_mean(num_pos, group).clamp(min=least)
