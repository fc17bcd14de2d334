"""The configuration every loss module shares: ``reduction`` and ``loss_weight``."""


from torch import Tensor, nn

from ..reduction import REDUCTIONS
from ..validation import check_choice, check_float, static


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
