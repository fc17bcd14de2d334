"""Sigmoid focal loss (RetinaNet, FCOS, ATSS).

Reference: Lin et al., "Focal Loss for Dense Object Detection", https://arxiv.org/abs/1708.02002.
Semantics follow visdet / MMDetection 3.x ``FocalLoss`` (``py_sigmoid_focal_loss`` and
``py_focal_loss_with_prob``).
"""


from typing import Optional

import torch
from torch import Tensor

from ..numerics import (
    attach_gradient,
    bce_with_logits,
    bce_with_probabilities,
    check_class_axis,
    check_index_dtype,
    compiled_training,
    eager_closed_form,
    eager_fast_path,
    equal_where_decidable,
    focal_terms,
    focal_with_saved_gradient,
    keep_saved_gradient,
    known_to_be_one,
    label_column_terms,
    logits_at_labels,
    logits_compute_dtype,
    logits_off_labels,
    masked_inputs,
    needs_grad,
    negative_focal_terms,
    pow_nonnegative,
    replace_at_labels,
    same_shape,
    same_size,
    scatter_class_values,
    select_kept_outputs_,
    sigmoid_pair,
    static,
    unbalanced_focal_of_signed,
    weight_keep_mask,
    zero_where_unweighted,
)
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import ConfigError, check_bool, check_float
from .base import WeightedLoss, refuse_misplaced_reduction, refuse_non_tensors


def check_class_labels(pred: Tensor, target: Tensor) -> None:
    """Raise unless ``pred`` is (N, C) and ``target`` (N,) integer class labels."""
    if (
        pred.dim() != 2 or target.dim() != 1
        or not same_size(target.size(0), pred.size(0), "the labels' and pred's rows")
    ):
        raise ValueError(
            "expected pred (N, C) with labels (N,) or one-hot targets (N, C), got "
            + str(pred.shape) + " and " + str(target.shape)
        )
    if target.is_floating_point():
        raise ValueError("integer class labels are expected, got a floating-point tensor of shape (N,)")
    check_index_dtype(target, "class labels")
    check_class_axis(pred, 1, "FocalLoss on class labels")


def class_targets(pred: Tensor, target: Tensor) -> Tensor:
    """Dense (N, C) targets in ``pred``'s dtype from integer labels or from targets of ``pred``'s shape.

    Labels are in [0, C]; C (and any label outside [0, C)) is background: an all-zero row. Built by comparing
    with ``arange(C)``, a static shape, where visdet calls ``one_hot`` (which fails on negative labels).

    Args:
        pred (Tensor[N, C]), target (Tensor[N] int or Tensor[N, C]).
    """
    if target.dim() == pred.dim():
        if not same_shape(target, pred):
            raise ValueError(
                "one-hot target must have pred's shape, got " + str(target.shape) + " and " + str(pred.shape)
                + "; class labels are (N,), without the class axis (squeeze a (N, 1) label tensor)"
            )
        if target.is_floating_point():
            return target.to(pred.dtype)
        # Integer targets of pred's shape are one-hot, as visdet reads them (labels (N,) beside a 1-d pred too):
        # any other value is NaN, where the formulations gave different garbage.
        one_hot = (target == 0) | (target == 1)
        return torch.where(one_hot, target.to(pred.dtype), torch.full_like(pred, float("nan")))
    check_class_labels(pred, target)
    if eager_fast_path(pred):
        return scatter_class_values(pred, target, torch.ones_like(target, dtype=pred.dtype))
    classes = torch.arange(pred.size(1), device=pred.device)
    return (target.unsqueeze(1) == classes).to(pred.dtype)


def per_class_weight(weight: Tensor, pred: Tensor) -> Tensor:
    """A weight of shape (N,), (N, 1), (N, C) or flattened (N * C,) as a tensor broadcastable to ``pred`` (N, C)."""
    if weight.dim() == pred.dim():
        if same_size(weight.size(0), pred.size(0), "the weight's and pred's rows") and (
            known_to_be_one(weight.size(-1))
            or same_size(weight.size(-1), pred.size(-1), "the weight's and pred's columns")
        ):
            return weight
        raise ValueError(
            "weight must have shape (N,), (N, 1), (N, C) or (N * C,) for pred " + str(pred.shape) + ", got "
            + str(weight.shape)
        )
    # the flattened layout first: where it cannot be told from (N,) (C = 1, N = 0) both mean the same weights, and
    # a compiled graph asserts the (N,) layout's size only once it is chosen
    if weight.dim() == 1 and equal_where_decidable(weight.size(0), pred.numel()):
        return weight.reshape(pred.shape)
    if weight.dim() == 1 and same_size(weight.size(0), pred.size(0), "the weight's and pred's rows"):
        return weight.unsqueeze(1)
    if weight.numel() != pred.numel():
        raise ValueError(
            "weight must have shape (N,), (N, 1), (N, C) or (N * C,) for pred " + str(pred.shape) + ", got "
            + str(weight.shape)
        )
    return weight.reshape(pred.shape)


def sigmoid_focal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    gamma: float = 2.0,
    alpha: float = 0.25,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
    activated: bool = False,
) -> Tensor:
    r"""Focal loss of sigmoid classifiers.

    .. math::
        \mathrm{FL} = -\alpha_t (1 - p_t)^\gamma \log p_t

    with :math:`p_t = p` for positives and :math:`1 - p` for negatives, :math:`\alpha_t = \alpha` for positives and
    :math:`1 - \alpha` for negatives (``alpha = -1`` disables the balancing, as in torchvision).

    Args:
        pred (Tensor[N, C]): logits, or probabilities when ``activated``.
        target (Tensor[N] int in [0, C], C = background, or Tensor[N, C] one-hot: float, or integer in {0, 1}, any
            other integer giving NaN).
        weight (Tensor[N], Tensor[N, C] or Tensor[N * C], optional): elements with weight 0 are masked out,
            NaN/inf inputs there included.
        avg_factor (Tensor[], optional): denominator of the mean.

    Returns:
        Tensor[N, C] for "none", else Tensor[].
    """
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("sigmoid_focal_loss", {"gamma": gamma, "alpha": alpha})
    input_dtype = pred.dtype
    dtype = logits_compute_dtype(pred)
    pred = pred.to(dtype)
    weights: Optional[Tensor] = None
    keep: Optional[Tensor] = None
    if weight is not None:
        weights = per_class_weight(weight.to(dtype), pred)
        keep = weight_keep_mask(weights)
    # closed-form gradient, in place (see numerics); a trained weight keeps autograd, whose gradient at masked
    # elements is the loss of the masked inputs, where the fast path zeroes the outputs
    if not activated and eager_closed_form(pred, target, weights):
        if target.dim() != pred.dim():
            check_class_labels(pred, target)
            loss = _focal_labels_eager(pred, target, weights, keep, gamma, alpha)
        else:
            loss = _focal_eager(pred, class_targets(pred, target), weights, keep, True, gamma, alpha)
        return weight_reduce_loss(loss, None, reduction, avg_factor)
    labels_given = target.dim() != pred.dim()
    if labels_given and not activated and not compiled_training(pred, target):
        check_class_labels(pred, target)
        loss = _focal_on_labels(zero_where_unweighted(pred, keep), target, gamma, alpha)
        return weight_reduce_loss(loss, weights, reduction, avg_factor)
    targets = class_targets(pred, target)
    pred, targets = masked_inputs(pred, targets, keep, not labels_given)
    if not activated and compiled_training(pred, targets):  # closed-form derivative saved by the forward
        loss, grad = focal_with_saved_gradient(pred, targets, gamma, alpha, input_dtype)
        return keep_saved_gradient(weight_reduce_loss(loss, weights, reduction, avg_factor), grad, reduction)
    if activated or target.is_floating_point():
        loss = _focal_elementwise(pred, targets, gamma, alpha, activated)
    else:
        loss = _focal_elementwise_binary(pred, targets, gamma, alpha)
    return weight_reduce_loss(loss, weights, reduction, avg_factor)


@torch.jit.unused
def _focal_eager(
    pred: Tensor, targets: Tensor, weights: Optional[Tensor], keep: Optional[Tensor], mask_targets: bool,
    gamma: float, alpha: float,
) -> Tensor:
    """Elements of weight 0 are zeroed in the outputs (value and gradient, NaN/inf inputs there included) rather
    than in the inputs: two in-place passes where masking ``pred`` took two (N, C) temporaries."""
    value, grad = select_kept_outputs_(*focal_terms(pred, targets, gamma, alpha, needs_grad(pred)), keep)
    return attach_gradient(
        value, grad, pred, weights,
        lambda logits: _focal_elementwise(*masked_inputs(logits, targets, keep, mask_targets), gamma, alpha, False),
    )


@torch.jit.unused
def _focal_labels_eager(
    pred: Tensor, label: Tensor, weights: Optional[Tensor], keep: Optional[Tensor], gamma: float, alpha: float
) -> Tensor:
    """:func:`_focal_eager` for one-hot targets given as labels (N,), without (N, C) targets: every element takes
    the negatives' terms (:func:`~visdet_export.numerics.negative_focal_terms`), and the label's element the
    positives', computed on N values and written there by a scatter."""
    with_grad = needs_grad(pred)
    value, grad = label_column_terms(
        pred, label, keep,
        lambda logits: negative_focal_terms(logits, gamma, alpha, with_grad),
        lambda logit, index: focal_terms(logit, torch.ones_like(logit), gamma, alpha, with_grad),
    )
    return attach_gradient(
        value, grad, pred, weights,
        lambda logits: _focal_elementwise(
            *masked_inputs(logits, class_targets(logits, label), keep, False), gamma, alpha, False
        ),
    )


def _focal_elementwise(pred: Tensor, targets: Tensor, gamma: float, alpha: float, activated: bool) -> Tensor:
    """The element-wise focal loss (autograd formulation: compiled, scripted, exported, double backward)."""
    if activated:
        positive_prob = pred
        negative_prob = 1.0 - pred
        cross_entropy = bce_with_probabilities(pred, targets)
    else:
        positive_prob, negative_prob, log1p_decay = sigmoid_pair(pred)
        cross_entropy = bce_with_logits(pred, targets, log1p_decay)
    # 1 - p_t, from whichever of sigmoid(x) / sigmoid(-x) keeps its precision.
    one_minus_pt = negative_prob * targets + positive_prob * (1.0 - targets)
    loss = cross_entropy * pow_nonnegative(one_minus_pt, gamma)
    return _alpha_balanced(loss, targets, alpha)


def _focal_elementwise_binary(pred: Tensor, targets: Tensor, gamma: float, alpha: float) -> Tensor:
    """:func:`_focal_elementwise` on logits for targets in {0, 1} (one-hot), value for value: with
    ``s = x (1 - 2t)``, an exact sign flip, ``1 - p_t = sigmoid(s)`` and the BCE is ``softplus(s)``, so the loss
    is a function of ``s`` alone (exported graphs: one sigmoid and no mixing of both, ~6 fewer (N, C) nodes)."""
    return _alpha_balanced(unbalanced_focal_of_signed(pred * (1.0 - 2.0 * targets), gamma), targets, alpha)


def _focal_on_labels(pred: Tensor, labels: Tensor, gamma: float, alpha: float) -> Tensor:
    """:func:`_focal_elementwise_binary` for one-hot targets given as labels (N,), without (N, C) targets: every
    element takes the negatives' loss, and the label's element the positives', computed on the gathered logits
    (N values) and scattered in. Exported graphs make 6 fewer passes over (N, C) (no comparison with the classes,
    cast, sign or alpha_t); with a gradient, a scatter takes the label's logit out of the negatives
    (``logits_off_labels``)."""
    labelled, index, at_label, at_column_0 = logits_at_labels(pred, labels)
    # the negatives' loss at column 0 again from its logit (N values): cheaper than gathering it
    off_labels = logits_off_labels(pred, index, at_column_0)
    negatives, negative, positive = (
        unbalanced_focal_of_signed(x, gamma) for x in (off_labels, at_column_0, -at_label)
    )
    if alpha >= 0:
        negatives, negative, positive = negatives * (1.0 - alpha), negative * (1.0 - alpha), positive * alpha
    return replace_at_labels(negatives, labelled, index, positive, negative)


def _alpha_balanced(loss: Tensor, targets: Tensor, alpha: float) -> Tensor:
    """``loss * alpha_t``: ``alpha`` for positives, ``1 - alpha`` for negatives; ``alpha < 0`` disables it."""
    if alpha < 0:
        return loss
    # one product and one sum, which exported graphs run as two passes over (N, C) instead of five
    return loss * (targets * (2.0 * alpha - 1.0) + (1.0 - alpha))


class FocalLoss(WeightedLoss):
    """Sigmoid focal loss module; see :func:`sigmoid_focal_loss`.

    Args:
        use_sigmoid: must be True (visdet supports only the sigmoid form).
        gamma: focusing parameter, >= 0.
        alpha: positive/negative balance in [0, 1], or -1 to disable it.
        reduction, loss_weight: see :mod:`visdet_export.reduction`.
        activated: ``pred`` holds probabilities instead of logits (MMDetection 3.x behaviour).
    """

    gamma: float
    alpha: float
    activated: bool

    def __init__(
        self,
        use_sigmoid: bool = True,
        gamma: float = 2.0,
        alpha: float = 0.25,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
    ) -> None:
        super().__init__(reduction, loss_weight)
        if check_bool("use_sigmoid", use_sigmoid) is not True:
            raise ConfigError("FocalLoss supports only use_sigmoid=True")
        self.use_sigmoid = True
        self.gamma = check_float("gamma", gamma, minimum=0.0)
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=1.0, allowed=(-1.0,))
        self.activated = check_bool("activated", activated)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` (N, C) logits (probabilities with ``activated=True``); ``target`` (N,) labels in [0, C] (C =
        background) or (N, C) one-hot; ``weight`` (N,), (N, 1), (N, C) or (N * C,). Returns the loss times
        ``loss_weight``: 0-d, or (N, C) under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"target": target}, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = sigmoid_focal_loss(
            pred,
            target,
            weight,
            static(self.gamma),
            static(self.alpha),
            reduction,
            as_avg_factor(avg_factor, pred),
            self.activated,
        )
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, activated={self.activated}, " + super().extra_repr()
