"""The weight / reduction / avg_factor contract shared by every loss (visdet / MMDetection semantics).

``weight_reduce_loss`` multiplies the element-wise loss by ``weight`` and then

* without ``avg_factor``: ``"none"`` keeps the shape, ``"sum"`` sums, ``"mean"`` divides the sum by the element
  count (0 elements give 0, not NaN);
* with ``avg_factor``: ``"mean"`` gives ``sum / (avg_factor + eps)`` with ``eps`` the float32 machine epsilon,
  ``"none"`` keeps the shape and ``"sum"`` raises, as in visdet.

Counts are tensors (``scalar_tensor(numel)``) rather than Python numbers, so an exported graph divides by the
count of the inputs it is given rather than by the one it was traced with.
"""


import numbers
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .numerics import compute_dtype, known_to_be_one, static
from .validation import StaticFloat

REDUCTIONS = ("none", "mean", "sum")
# torch.finfo(torch.float32).eps, written out because TorchScript has no torch.finfo. A StaticFloat: as
# weight_reduce_loss's default (TorchScript takes defaults by value) a plain float would be a tensor input of every
# compiled graph with an avg_factor, read back with ``.item()``.
FLOAT32_EPS = StaticFloat(1.1920928955078125e-07)

AvgFactor = Optional[Union[float, int, Tensor]]


def resolve_reduction(reduction: str, reduction_override: Optional[str]) -> str:
    """The reduction for one call: the override if given (validated), else the configured one."""
    if reduction_override is None:
        return reduction
    if reduction_override not in ("none", "mean", "sum"):
        raise ValueError(
            "reduction_override=" + quoted(reduction_override) + " is not valid; choose one of 'none', 'mean', 'sum'"
        )
    return reduction_override


def as_avg_factor(avg_factor: Optional[Union[float, int, Tensor]], like: Tensor) -> Optional[Tensor]:
    """A Python number or tensor ``avg_factor`` as a 0-d tensor in the dtype ``like`` is computed in.

    numpy values (scalars and one-element arrays) are taken as tensors, and bools of every kind are refused, in
    eager and compiled code alike: the checks look at types, dtypes and sizes only, so they add nothing to a graph.
    """
    if avg_factor is None:
        return None
    if not torch.jit.is_scripting():
        avg_factor = _check_python(avg_factor)
    dtype = compute_dtype(like)
    if isinstance(avg_factor, Tensor):
        if avg_factor.dtype == dtype and avg_factor.device == like.device and avg_factor.dim() == 0:
            return avg_factor  # the usual case: two dispatches less per call, which small batches notice
        if avg_factor.numel() != 1:
            raise ValueError(f"avg_factor must be a number or a one-element tensor, got shape {list(avg_factor.shape)}")
        if avg_factor.dtype == torch.bool or avg_factor.is_complex():
            # scripted dtypes print as numbers ("a tensor of 11"): name the kind there
            got = str(avg_factor.dtype)
            if torch.jit.is_scripting():
                got = "bool" if avg_factor.dtype == torch.bool else "complex"
            raise ValueError("avg_factor must be a real number, got a tensor of " + got)
        return avg_factor.to(dtype=dtype, device=like.device).reshape(())
    if torch.compiler.is_compiling():
        # a symbolic float (MMDetection heads pass `.item()` counts): scalar_tensor would specialise on its value
        # and recompile at every new one, which fullgraph=True turns into a failure after 8 steps
        return like.new_ones((), dtype=dtype) * avg_factor
    return torch.scalar_tensor(float(avg_factor), dtype=dtype, device=like.device)


@torch.jit.unused
def _check_python(avg_factor: object) -> Union[float, int, Tensor]:
    """Outside TorchScript (whose signature refuses the rest): a numpy value as a tensor, since torch.compile sees
    numpy scalars and 0-d arrays alike, as arrays (a float64 scalar made a float32 loss float64 there); a tensor
    or a Python number as it is; anything else refused, ``True`` included (``float()`` takes it, and ``"3"``). This
    runs under torch.compile too, where it is decided by types alone (a compiled True was taken as 1)."""
    if isinstance(avg_factor, Tensor):
        return avg_factor
    if isinstance(avg_factor, (np.ndarray, np.number, np.bool_)):
        return torch.as_tensor(avg_factor)
    if isinstance(avg_factor, bool) or not isinstance(avg_factor, numbers.Real):
        raise ValueError(f"avg_factor must be a number or a one-element tensor, got {avg_factor!r}")
    return avg_factor if isinstance(avg_factor, (float, int)) else float(avg_factor)  # a Fraction, say


def element_count(loss: Tensor) -> Tensor:
    """The number of elements of ``loss`` as a tensor, at least 1 (the mean of nothing is 0)."""
    return torch.scalar_tensor(loss.numel(), dtype=loss.dtype, device=loss.device).clamp(min=1.0)


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.sum() / element_count(loss)
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError("reduction=" + quoted(reduction) + " is not valid; choose one of 'none', 'mean', 'sum'")


def quoted(value: str) -> str:
    """``value`` as messages show it: a string in quotes, as ``repr`` gives it (which TorchScript lacks); anything
    else a caller outside TorchScript passed, as ``str`` gives it."""
    if isinstance(value, str):
        return "'" + value + "'"
    return str(value)


def _per_row(loss: Tensor, weight: Tensor) -> bool:
    """True for a weight constant along ``loss``'s last dimension (a per-sample weight (N, 1) of (N, C) losses),
    whatever C is (C = 1 included: the row sums are the elements). A weight of a symbolic width (the free class
    count of an exported graph) is not known to be 1: it takes the general path rather than a guard on C."""
    return (
        loss.dim() >= 2 and weight.dim() == loss.dim() and known_to_be_one(weight.size(-1))
        and weight.shape[:-1] == loss.shape[:-1]
    )


def weight_reduce_loss(
    loss: Tensor,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
    eps: float = FLOAT32_EPS,
) -> Tensor:
    """Apply ``weight`` (broadcast to ``loss``) and reduce as visdet does.

    A weight constant along ``loss``'s last dimension (per sample, of (N, C) losses) multiplies the row sums when
    the loss is reduced: N products instead of N x C, and exported graphs then select the weight-0 rows on N
    values (:func:`visdet_export.export.onnx.late_weight_masks`).

    Args:
        loss (Tensor[*]): element-wise loss.
        weight (Tensor broadcastable to ``loss``, optional): element weights.
        reduction: "none" | "mean" | "sum".
        avg_factor (Tensor[], optional): the mean's denominator instead of the element count.
        eps: added to ``avg_factor`` (visdet's float32 machine epsilon, :data:`FLOAT32_EPS`).

    Returns:
        Tensor: ``loss``'s shape for "none", else a 0-d tensor.
    """
    row_totals = reduction == "mean" or (reduction == "sum" and avg_factor is None)
    if weight is not None and row_totals and _per_row(loss, weight):
        # (N,) rather than (N, 1): onnxruntime broadcasts into an inner axis of size 1 element by element
        total = (loss.sum(-1) * weight.squeeze(-1)).sum()
        if avg_factor is not None:
            return total / (avg_factor + static(eps))
        return total / element_count(loss) if reduction == "mean" else total
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "mean":
        return loss.sum() / (avg_factor + static(eps))
    if reduction == "none":
        return loss
    raise ValueError('avg_factor can not be used with reduction="sum"; use "mean" or "none"')


__all__ = [
    "FLOAT32_EPS",
    "REDUCTIONS",
    "AvgFactor",
    "as_avg_factor",
    "element_count",
    "reduce_loss",
    "resolve_reduction",
    "weight_reduce_loss",
]
