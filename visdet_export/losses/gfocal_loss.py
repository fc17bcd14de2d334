"""Generalized Focal Loss: quality focal loss and distribution focal loss (GFL).

Reference: Li et al., "Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for Dense Object
Detection", https://arxiv.org/abs/2006.04388. Semantics follow visdet / MMDetection 3.x ``gfocal_loss.py``.
"""


from typing import Optional, Union

import torch
from torch import Tensor

from ..numerics import (
    attach_gradient,
    bce_with_logits,
    bce_with_probabilities,
    check_class_axis,
    check_index_dtype,
    check_weight_like,
    class_matches,
    compiled_training,
    compiling_graph,
    compute_dtype,
    eager_closed_form,
    eager_fast_path,
    exp_scaled_,
    keep_saved_gradient,
    label_column_terms,
    logits_at_labels,
    logits_compute_dtype,
    logits_off_labels,
    needs_grad,
    negative_focal_terms,
    pow_nonnegative,
    quality_focal_terms,
    quality_focal_with_saved_gradient,
    replace_at_labels,
    row_weighted_inputs,
    same_shape,
    same_size,
    scatter_class_values,
    select_kept_outputs_,
    sigmoid_minus_target,
    sigmoid_pair,
    static,
    unbalanced_focal_of_signed,
    weight_keep_mask,
    zero_where_unweighted,
)
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import ConfigError, check_bool, check_float, check_int
from .base import WeightedLoss, refuse_misplaced_reduction, refuse_non_tensors


def _check_quality_labels(pred: Tensor, labels: Tensor, scores: Tensor) -> None:
    if (
        labels.dim() != 1 or not same_shape(scores, labels, "the shapes of scores and labels") or pred.dim() != 2
        or not same_size(pred.size(0), labels.size(0), "the labels' and pred's rows")
    ):
        raise ValueError(
            "expected pred (N, C), labels (N,) and scores (N,), got "
            + str(pred.shape) + ", " + str(labels.shape) + " and " + str(scores.shape)
        )
    if labels.is_floating_point():
        raise ValueError("QualityFocalLoss labels must be integers, got a floating-point tensor")
    check_index_dtype(labels, "QualityFocalLoss labels")
    check_class_axis(pred, 1, "QualityFocalLoss on class labels")


def quality_targets(pred: Tensor, labels: Tensor, scores: Tensor) -> Tensor:
    """Dense (N, C) soft targets: ``score`` at each sample's label, 0 elsewhere (label C is background).

    Args:
        pred (Tensor[N, C]), labels (Tensor[N] int in [0, C]), scores (Tensor[N] in [0, 1]).
    """
    _check_quality_labels(pred, labels, scores)
    # in the compute dtype: integer or half-precision probabilities would round the scores (to 0, or to 3 digits)
    scores = scores.to(compute_dtype(pred))
    if eager_fast_path(pred):
        return scatter_class_values(pred, labels, scores)
    classes = torch.arange(pred.size(1), device=pred.device)
    return torch.where(labels.unsqueeze(1) == classes, scores.unsqueeze(1), 0.0)


def quality_focal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    beta: float = 2.0,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
    activated: bool = False,
) -> Tensor:
    r"""Quality focal loss on dense soft targets.

    .. math::
        \mathrm{QFL} = \sum_c \mathrm{BCE}(x_c, t_c)\,|t_c - \sigma(x_c)|^\beta

    where :math:`t` is the IoU score at the sample's class and 0 elsewhere. One formula covers visdet's positive
    and negative branches (for :math:`t = 0` it is :math:`\mathrm{BCE}(x, 0)\,\sigma(x)^\beta`), so no
    ``nonzero`` or index writes are needed.

    Args:
        pred (Tensor[N, C]): logits, or probabilities when ``activated``.
        target (Tensor[N, C]): soft targets in [0, 1] (see :func:`quality_targets`).
        weight (Tensor[N], optional): per-sample weight; weight 0 masks the sample (NaN/inf included).

    Returns:
        Tensor[N] for "none" (summed over classes), else Tensor[].
    """
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("quality_focal_loss", {"beta": beta})
    # closed-form gradient, in place (see numerics); a trained weight keeps autograd, whose gradient at masked rows
    # is the loss of the masked inputs, where the fast path zeroes the outputs
    fast = not activated and eager_closed_form(pred, target, weight)
    input_dtype = pred.dtype
    pred, target, weight, keep = row_weighted_inputs(pred, target, weight, mask=not fast)
    if fast:
        loss = _quality_focal_eager(pred, target, keep, beta).sum(dim=1)
    elif not activated and compiled_training(pred, target):  # closed-form derivative saved by the forward
        value, grad = quality_focal_with_saved_gradient(pred, target, beta, input_dtype)
        return keep_saved_gradient(weight_reduce_loss(value.sum(dim=1), weight, reduction, avg_factor), grad, reduction)
    else:
        loss = _quality_focal_elementwise(pred, target, beta, activated).sum(dim=1)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


@torch.jit.unused
def _quality_focal_eager(pred: Tensor, target: Tensor, keep: Optional[Tensor], beta: float) -> Tensor:
    """Rows of weight 0 are zeroed in the outputs (value and gradient, NaN/inf inputs there included) rather than in
    the inputs: two in-place passes where masking ``pred`` and ``target`` took three (N, C) temporaries."""
    value, grad = quality_focal_terms(pred, target, beta)
    value, kept_grad = select_kept_outputs_(value, grad if needs_grad(pred) else None, keep)
    return attach_gradient(
        value, kept_grad, pred, None,
        lambda logits: _quality_focal_elementwise(
            zero_where_unweighted(logits, keep), zero_where_unweighted(target, keep), beta, False
        ),
    )


def quality_focal_loss_on_labels(
    pred: Tensor,
    labels: Tensor,
    scores: Tensor,
    weight: Optional[Tensor] = None,
    beta: float = 2.0,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
    activated: bool = False,
) -> Tensor:
    """:func:`quality_focal_loss` with the targets given as labels (N,) and IoU scores (N,) (see
    :func:`quality_targets`). Eager training builds no (N, C) targets: every element takes the negatives' closed
    form (target 0: :func:`~visdet_export.numerics.negative_focal_terms` with ``gamma = beta``, no balance) and the
    label's element the positives', computed on N values and written there by a scatter. TorchScript, export and
    compile without gradient take the same layout in the autograd formulation (:func:`_quality_focal_on_labels`);
    compiled training (the derivative saved by the forward) and probabilities (``activated``) take dense targets."""
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("quality_focal_loss_on_labels", {"beta": beta})
    if activated or compiled_training(pred, scores):
        dense = quality_targets(pred, labels, scores)
        return quality_focal_loss(pred, dense, weight, beta, reduction, avg_factor, activated)
    _check_quality_labels(pred, labels, scores)
    fast = eager_closed_form(pred, scores, weight)
    pred, scores, weight, keep = row_weighted_inputs(pred, scores, weight, mask=not fast)
    if fast:
        loss = _quality_focal_labels_eager(pred, labels, scores, keep, beta).sum(dim=1)
    else:
        loss = _quality_focal_on_labels(pred, labels, scores, beta)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def _quality_focal_on_labels(pred: Tensor, labels: Tensor, scores: Tensor, beta: float) -> Tensor:
    """Per-sample QFL (N,) on labels and scores without (N, C) targets (autograd formulation): every element takes
    the negatives' loss (target 0: ``softplus(x) sigmoid(x)^beta``), and the label's element the positives',
    computed on the gathered logit (N values) and scattered in. Exported graphs make 4 fewer passes over (N, C)
    (no comparison with the classes, select of the scores, product with the targets or difference from them); with
    a gradient, a scatter takes the label's logit out of the negatives (``logits_off_labels``)."""
    labelled, index, at_label, at_column_0 = logits_at_labels(pred, labels)
    negatives = unbalanced_focal_of_signed(logits_off_labels(pred, index, at_column_0), beta)
    negative = unbalanced_focal_of_signed(at_column_0, beta)
    positive = _quality_focal_elementwise(at_label, scores, beta, False)
    return replace_at_labels(negatives, labelled, index, positive, negative).sum(dim=1)


@torch.jit.unused
def _quality_focal_labels_eager(
    pred: Tensor, labels: Tensor, scores: Tensor, keep: Optional[Tensor], beta: float
) -> Tensor:
    """:func:`_quality_focal_eager` on labels and scores (see :func:`quality_focal_loss_on_labels`)."""
    with_grad = needs_grad(pred)
    value, grad = label_column_terms(
        pred, labels, keep,
        lambda logits: negative_focal_terms(logits, beta, -1.0, with_grad),
        lambda logit, index: quality_focal_terms(logit, scores.unsqueeze(1), beta),
    )
    return attach_gradient(
        value, grad, pred, None,
        lambda logits: _quality_focal_elementwise(
            zero_where_unweighted(logits, keep), zero_where_unweighted(quality_targets(logits, labels, scores), keep),
            beta, False,
        ),
    )


def _quality_focal_elementwise(pred: Tensor, target: Tensor, beta: float, activated: bool) -> Tensor:
    """The element-wise QFL (autograd formulation: compiled, scripted, exported, double backward)."""
    if activated:
        prob = pred
        cross_entropy = bce_with_probabilities(pred, target)
        difference = prob - target
    else:
        prob, neg_prob, log1p_decay = sigmoid_pair(pred)
        cross_entropy = bce_with_logits(pred, target, log1p_decay)
        # s - t without s - 1 cancelling for a confident positive (t = 1 at x = 10: the loss 0 where it is e^-30)
        difference = sigmoid_minus_target(prob, neg_prob, target)
    # difference enters only as its square or |.|: s - t and t - s give the same value and gradient, bit for bit
    if beta == 2.0:
        # The square needs no |.| (same value bit for bit, same zero slope at 0); dropping it takes the abs and
        # its sign select out of the compiled kernels (QFL fwd+bwd at 100k x 80, 1 thread: 43.8 -> 42.5 ms).
        return cross_entropy * (difference * difference)
    return cross_entropy * pow_nonnegative(difference.abs(), beta)


class QualityFocalLoss(WeightedLoss):
    """Quality focal loss module; see :func:`quality_focal_loss`.

    ``forward(pred, target, ...)`` takes ``target`` as a ``(labels, scores)`` pair (labels (N,) in [0, C] with C
    the background, IoU scores (N,)) or as dense (N, C) soft targets.

    Args:
        use_sigmoid: must be True.
        beta: modulating exponent, >= 0.
        activated: ``pred`` holds probabilities instead of logits.
    """

    beta: float
    activated: bool

    def __init__(
        self,
        use_sigmoid: bool = True,
        beta: float = 2.0,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        activated: bool = False,
    ) -> None:
        super().__init__(reduction, loss_weight)
        if check_bool("use_sigmoid", use_sigmoid) is not True:
            raise ConfigError("QualityFocalLoss supports only use_sigmoid=True")
        self.use_sigmoid = True
        self.beta = check_float("beta", beta, minimum=0.0)
        self.activated = check_bool("activated", activated)

    def forward(
        self,
        pred: Tensor,
        target: Union[tuple[Tensor, Tensor], Tensor],
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` (N, C) logits (probabilities with ``activated=True``); ``target`` a tuple (labels (N,) in [0, C],
        C = background; IoU scores (N,)) or dense (N, C) soft targets; ``weight`` (N,). Returns the loss times
        ``loss_weight``: 0-d, or (N,) under "none"."""
        if not torch.jit.is_scripting():
            pair = isinstance(target, (tuple, list))
            targets = dict(zip(("labels", "scores"), target)) if pair else {"target": target}
            refuse_non_tensors(self, pred, targets, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        if isinstance(target, Tensor):
            if not same_shape(target, pred):
                raise ValueError(
                    "dense targets must have pred's shape, got " + str(target.shape) + " and " + str(pred.shape)
                    + "; labels (N,) and scores (N,) go together as one tuple: loss(pred, (labels, scores))"
                )
            loss = quality_focal_loss(
                pred, target, weight, static(self.beta), reduction, as_avg_factor(avg_factor, pred), self.activated
            )
        else:
            if len(target) != 2:
                raise ValueError("QualityFocalLoss takes dense targets or one tuple (labels, scores)")
            loss = quality_focal_loss_on_labels(
                pred, target[0], target[1], weight, static(self.beta), reduction, as_avg_factor(avg_factor, pred),
                self.activated,
            )
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, activated={self.activated}, " + super().extra_repr()


def distribution_focal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    r"""Distribution focal loss: cross-entropy towards the two bins around a continuous target.

    .. math::
        \mathrm{DFL} = -\big((y_{i+1} - y)\log S_i + (y - y_i)\log S_{i+1}\big), \quad y_i = \lfloor y \rfloor

    A target exactly at ``reg_max`` puts all its mass on the last bin (visdet indexes bin ``reg_max + 1`` there
    and fails); a target outside (-1, reg_max] gives a NaN loss (visdet fails, and a negative loss would train);
    one in (-1, 0) weighs bins 0 and 1 by ``1 - y`` and ``y``, as visdet's truncation does. Written with
    ``log_softmax`` + ``gather``: ``F.cross_entropy`` exports to a SoftmaxCrossEntropyLoss node that onnxruntime
    rejects at N = 0.

    Args:
        pred (Tensor[N, reg_max + 1]): bin logits.
        target (Tensor[N]): distances in [0, reg_max].
        weight (Tensor[N], optional): weight 0 masks the sample (NaN/inf included).

    Returns:
        Tensor[N] for "none", else Tensor[].
    """
    if (
        pred.dim() != 2 or target.dim() != 1
        or not same_size(target.size(0), pred.size(0), "the target's and pred's rows")
    ):
        raise ValueError(
            "expected pred (N, reg_max + 1) and target (N,), got " + str(pred.shape) + " and " + str(target.shape)
        )
    check_class_axis(pred, 2, "DistributionFocalLoss", "bins")
    dtype = logits_compute_dtype(pred)
    pred = pred.to(dtype)
    target = target.to(dtype)
    keep_rows: Optional[Tensor] = None
    if weight is not None:
        check_weight_like(weight, target, "target")
        weight = weight.to(dtype)
        keep = weight_keep_mask(weight)
        target = zero_where_unweighted(target, keep)
        keep_rows = None if keep is None else keep.unsqueeze(1)
    reg_max = pred.size(1) - 1
    # A target outside (-1, reg_max] (or NaN) has no two bins around it (visdet indexes past the bins and fails):
    # its bins are read at 0 and its weights are NaN, so that its loss is NaN rather than a negative number. In
    # (-1, 0) visdet truncates towards 0 and weighs bins 0 and 1 by 1 - y and y, as the floor clamped to 0 does
    # here: a target that rounding took just below 0 keeps its loss.
    in_range = (target > -1) & (target <= reg_max)
    binned = torch.where(in_range, target, 0.0)
    # a target at reg_max takes the last two bins, all its mass on the last: its derivative is the one from inside
    # [0, reg_max] (with the last bin twice it was 0)
    left_bin = binned.floor().clamp(0, max(reg_max - 1, 0))
    # (N, 1) columns: the two bins around the target and their weights, which sum to 1
    left_weight = torch.where(in_range, left_bin + 1.0 - target, float("nan")).unsqueeze(1)
    right_weight = torch.where(in_range, target - left_bin, float("nan")).unsqueeze(1)
    # the right bin computed on (N,): onnxruntime broadcasts a scalar into (N, 1) element by element (see
    # numerics.label_positions)
    left = left_bin.long()
    left_index, right_index = left.unsqueeze(1), (left + 1).clamp(max=reg_max).unsqueeze(1)
    bins = (left_index, right_index, left_weight, right_weight)
    # closed-form gradient, in place (see numerics); a weight that is trained keeps autograd, whose gradient at
    # masked rows is the loss of the masked inputs, where the fast path zeroes the outputs
    if eager_closed_form(pred, target, weight):
        loss = _distribution_focal_loss_eager(pred, bins, keep_rows, weight)
        return weight_reduce_loss(loss, None, reduction, avg_factor)
    loss = _distribution_focal_loss(zero_where_unweighted(pred, keep_rows), bins).squeeze(1)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def _distribution_focal_loss(pred: Tensor, bins: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """Per-sample DFL (N, 1) of logits ``pred`` (N, C), with ``bins`` = (left index, right index, left weight,
    right weight), each (N, 1) (autograd formulation)."""
    left_index, right_index, left_weight, right_weight = bins
    if compiling_graph():
        # the log-sum-exp of the row less the bins' weighted logits (the weights sum to 1), both shifted by the
        # row's maximum: inductor sums the bins' terms in the loop of the exponentials (two passes over the row where
        # log_softmax and its selects took three) and the backward is one pass, softmax - bin weights (it took two).
        # Selected, not multiplied by 0 elsewhere: a -inf logit away from the bins stays a finite loss.
        shifted = pred - pred.detach().amax(dim=1, keepdim=True)
        bins_terms = torch.where(class_matches(left_index, pred), shifted * left_weight, 0.0) + torch.where(
            class_matches(right_index, pred), shifted * right_weight, 0.0
        )
        return shifted.exp().sum(dim=1, keepdim=True).log() - bins_terms.sum(dim=1, keepdim=True)
    log_probs = torch.log_softmax(pred, dim=1)
    return -(log_probs.gather(1, left_index) * left_weight + log_probs.gather(1, right_index) * right_weight)


@torch.jit.unused
def _distribution_focal_loss_eager(
    pred: Tensor, bins: tuple[Tensor, Tensor, Tensor, Tensor], keep_rows: Optional[Tensor], weight: Optional[Tensor]
) -> Tensor:
    """:func:`_distribution_focal_loss` times ``weight`` with the gradient in closed form, ``softmax - w_l
    one_hot(l) - w_r one_hot(r)`` (w_l + w_r = 1), written over the log-probabilities in place as softmax
    cross-entropy's; rows of weight 0 are zeroed in the outputs (NaN / inf logits there included)."""
    left_index, right_index, left_weight, right_weight = bins
    with_grad = needs_grad(pred)
    with torch.no_grad():
        log_prob = torch.log_softmax(pred, dim=1)
        value = log_prob.gather(1, left_index).mul_(left_weight)
        value = value.add_(log_prob.gather(1, right_index).mul_(right_weight)).neg_()
        grad: Optional[Tensor] = None
        if with_grad:
            grad = exp_scaled_(log_prob, 1.0).scatter_add_(1, left_index, left_weight.neg())
            grad = grad.scatter_add_(1, right_index, right_weight.neg())
        value, grad = select_kept_outputs_(value, grad, keep_rows)
    return attach_gradient(
        value, grad, pred, None if weight is None else weight.unsqueeze(1),
        lambda logits: _distribution_focal_loss(zero_where_unweighted(logits, keep_rows), bins),
    ).squeeze(1)


class DistributionFocalLoss(WeightedLoss):
    """Distribution focal loss module; see :func:`distribution_focal_loss`.

    Args:
        reg_max: if given, ``pred`` must have ``reg_max + 1`` bins (checked on every call); visdet infers it.
    """

    reg_max: Optional[int]

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0, reg_max: Optional[int] = None) -> None:
        super().__init__(reduction, loss_weight)
        self.reg_max = None if reg_max is None else check_int("reg_max", reg_max, minimum=1)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` (N, reg_max + 1) bin logits; ``target`` (N,) distances in [0, reg_max]; ``weight`` (N,). Returns
        the loss times ``loss_weight``: 0-d, or (N,) under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"target": target}, weight)
        reg_max = self.reg_max
        if reg_max is not None and not same_size(pred.size(-1), reg_max + 1, "pred's bins and reg_max + 1"):
            raise ValueError(
                "pred has " + str(pred.size(-1)) + " bins but reg_max=" + str(reg_max) + " needs " + str(reg_max + 1)
            )
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = distribution_focal_loss(pred, target, weight, reduction, as_avg_factor(avg_factor, pred))
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"reg_max={self.reg_max}, " + super().extra_repr()
