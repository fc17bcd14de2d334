"""What every loss shares: the modules' ``reduction`` and ``loss_weight``, and the refusals of misplaced arguments."""


from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..numerics import static
from ..reduction import REDUCTIONS
from ..validation import check_choice, check_float


class WeightedLoss(nn.Module):
    """Holds and validates ``reduction`` ("none" | "mean" | "sum") and ``loss_weight`` (a finite number)."""

    reduction: str
    loss_weight: float

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.loss_weight = check_float("loss_weight", loss_weight)

    def weighted(self, loss: Tensor) -> Tensor:
        """``loss_weight * loss``; at the default weight 1 the loss itself (bit for bit the same values), one
        operation and one autograd node fewer per call."""
        loss_weight = static(self.loss_weight)
        if loss_weight == 1.0:
            return loss
        return loss_weight * loss

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight}"


@torch.jit.unused
def refuse_non_tensors(loss: nn.Module, pred: object, targets: Mapping[str, object], weight: object) -> None:
    """A ``TypeError`` naming the argument when ``pred``, a target (by name) or a given ``weight`` is not a
    tensor: a numpy array or a list of labels would otherwise fail deep inside the loss with an ``AttributeError``.
    Called outside TorchScript only, whose signatures refuse them already; under ``torch.compile`` the checks are
    decided by types and add nothing to the graph."""
    for name, value in [("pred", pred), *targets.items(), ("weight", weight)]:
        if isinstance(value, Tensor) or (value is None and name == "weight"):
            continue
        kind = type(value)
        got = kind.__qualname__ if kind.__module__ == "builtins" else kind.__module__ + "." + kind.__qualname__
        raise TypeError(
            f"{type(loss).__name__}: {name} must be a torch.Tensor, got {got}"
            + ("" if value is None else " (torch.as_tensor converts one)")
        )


@torch.jit.unused
def refuse_misplaced_reduction(function: str, hyperparameters: Mapping[str, object]) -> None:
    """A ``TypeError`` for a string among a functional loss's hyper-parameters: MMDetection's functions take
    ``(pred, target, weight, reduction, avg_factor, **hyper-parameters)`` and ours the hyper-parameters first, so
    a positional call ported as it is puts ``"mean"`` on the first of them, which failed deep inside the loss with a
    bare ``TypeError``. Called outside TorchScript only, whose signatures refuse a string there already."""
    for name, value in hyperparameters.items():
        if isinstance(value, str):
            raise TypeError(
                f"{function} got {name}={value!r}: its reduction and avg_factor come after the hyper-parameters "
                "(MMDetection's functions take them fourth and fifth); pass them by keyword"
            )
