"""Cross-entropy in its three visdet forms: softmax, sigmoid (binary) and mask (Mask R-CNN).

Semantics follow visdet / MMDetection 3.x ``cross_entropy_loss.py`` (``cross_entropy``,
``binary_cross_entropy``, ``mask_cross_entropy``), rewritten without ``nonzero``, ``.item()`` or
``F.cross_entropy`` (whose export onnxruntime rejects at N = 0).
"""


from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..numerics import (
    attach_gradient,
    bce_and_sigmoid,
    bce_with_logits,
    bce_with_saved_gradient,
    check_class_axis,
    check_weight_like,
    compiled_training,
    eager_closed_form,
    eager_fast_path,
    element_weight,
    exp_scaled_,
    float32_parts,
    from_float32_parts,
    gather_classes,
    keep_saved_gradient,
    label_column_terms,
    log1p_exp_neg_abs,
    logits_at_labels,
    logits_compute_dtype,
    masked_inputs,
    needs_grad,
    replace_at_labels,
    same_shape,
    same_size,
    select_kept_outputs_,
    softplus,
    weight_keep_mask,
    zero_where_unweighted,
)
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import ConfigError, check_bool, check_class_weight, check_int
from .base import WeightedLoss, refuse_misplaced_reduction, refuse_non_tensors


def _check_class_count(class_weight: Optional[Tensor], num_classes: int) -> None:
    if class_weight is not None and class_weight.size(0) != num_classes:
        raise ValueError(
            "class_weight has " + str(class_weight.size(0)) + " entries but pred has " + str(num_classes) + " classes"
        )


def _labels_to_int(label: Tensor) -> Tensor:
    if label.is_floating_point():
        raise ValueError("class labels must be an integer tensor, got a floating-point one")
    return label.long()


def softmax_cross_entropy(
    pred: Tensor,
    label: Tensor,
    weight: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    avg_non_ignore: bool = False,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    r"""Softmax cross-entropy :math:`-w_{y} \log \mathrm{softmax}(x)_y` per sample, or with class-probability
    targets ``t`` of ``pred``'s shape :math:`-\sum_c w_c t_c \log \mathrm{softmax}(x)_c` (``F.cross_entropy``'s
    probability targets, taken as given: they need not sum to 1).

    Samples labelled ``ignore_index``, and labels outside [0, C) (visdet fails on those), contribute 0. The mean
    divides by all samples, or with ``avg_non_ignore`` by the samples not labelled ``ignore_index``. Probability
    targets have no labels to ignore: an ``ignore_index`` >= 0 is refused (as ``F.cross_entropy`` refuses it), and
    ``avg_non_ignore`` divides by all samples (MMDetection would count the N x C target elements).

    Args:
        pred (Tensor[N, C, *]): logits.
        label (Tensor[N, *] int): class indices; or (Tensor[N, C, *] float): class probabilities.
        weight (Tensor[N, *], optional): sample weights; weight 0 masks the sample (NaN/inf included).
        class_weight (Tensor[C], optional): per-class weights.

    Returns:
        Tensor[N, *] for "none", else Tensor[].
    """
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction(
            "softmax_cross_entropy",
            {"class_weight": class_weight, "ignore_index": ignore_index, "avg_non_ignore": avg_non_ignore},
        )
    if label.dim() == pred.dim() and pred.dim() >= 2:
        return _probability_cross_entropy(pred, label, weight, class_weight, ignore_index, reduction, avg_factor)
    if (
        pred.dim() < 2 or label.dim() != pred.dim() - 1
        or not same_size(label.size(0), pred.size(0), "the labels' and pred's rows")
    ):
        raise ValueError(
            "expected pred (N, C, ...) and label (N, ...), got " + str(pred.shape) + " and " + str(label.shape)
        )
    label = _labels_to_int(label)
    check_class_axis(pred, 1, "softmax cross-entropy")
    _check_class_count(class_weight, pred.size(1))
    dtype = logits_compute_dtype(pred)
    pred = pred.to(dtype)
    # labels outside [0, C) are the ones clamping changes (two integer passes where three comparisons took five)
    safe_label = label.clamp(0, pred.size(1) - 1)
    valid = safe_label == label
    if ignore_index >= 0:
        valid = valid & (label != ignore_index)
    if weight is not None:
        check_weight_like(weight, label, "label")
        weight = weight.to(dtype)
        keep_weighted = weight_keep_mask(weight)
        if keep_weighted is not None:
            valid = valid & keep_weighted
    safe_label = safe_label.unsqueeze(1)
    label_weight = None if class_weight is None else class_weight.to(pred.device, dtype)[safe_label.squeeze(1)]
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = (label != ignore_index).sum().to(dtype)
    trained_class_weight = class_weight is not None and needs_grad(class_weight)  # learned class weights: autograd
    if eager_fast_path(pred) and not trained_class_weight:  # closed-form gradient, in place (see numerics)
        loss = _softmax_cross_entropy_eager(pred, safe_label, valid, label_weight, weight)
        return weight_reduce_loss(loss, None, reduction, avg_factor)
    loss = _softmax_cross_entropy(zero_where_unweighted(pred, valid.unsqueeze(1)), safe_label, valid, label_weight)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def _probability_cross_entropy(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    class_weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    avg_factor: Optional[Tensor],
) -> Tensor:
    """:func:`softmax_cross_entropy` with class-probability targets of ``pred``'s shape (N, C, *) (autograd
    formulation in every runtime: ``-(t * w * log_softmax(x)).sum(1)``)."""
    if not target.is_floating_point():
        raise ValueError(
            "targets of pred's rank are read as class probabilities of pred's shape, which must be floating point, "
            "got an integer or bool tensor; class indices have pred's shape without the class axis, (N, ...): "
            "squeeze a (N, 1) label tensor"
        )
    if not same_shape(pred, target, "the shapes of pred and the probability targets"):
        raise ValueError(
            "class-probability targets must have pred's shape, got " + str(pred.shape) + " and " + str(target.shape)
        )
    if ignore_index >= 0:
        raise ValueError(
            "ignore_index " + str(ignore_index) + " applies to class indices: class-probability targets have none "
            "to ignore (F.cross_entropy refuses it too); leave ignore_index negative (default -100)"
        )
    check_class_axis(pred, 1, "softmax cross-entropy")
    _check_class_count(class_weight, pred.size(1))
    dtype = logits_compute_dtype(pred)
    pred, target = pred.to(dtype), target.to(dtype)
    keep: Optional[Tensor] = None
    if weight is not None:
        check_weight_like(weight, pred.select(1, 0), "pred without its class axis")
        weight = weight.to(dtype)
        keep = weight_keep_mask(weight)
    # weight-0 samples: logits and targets zeroed before the loss, so NaN/inf there reach neither value nor gradient
    # (their loss is then exactly 0: zero targets)
    pred, target = masked_inputs(pred, target, None if keep is None else keep.unsqueeze(1), True)
    terms = target * torch.log_softmax(pred, dim=1)
    if class_weight is not None:
        terms = terms * class_weight.to(pred.device, dtype).reshape([1, -1] + [1] * (pred.dim() - 2))
    return weight_reduce_loss(-terms.sum(1), weight, reduction, avg_factor)


def _softmax_cross_entropy(
    pred: Tensor, safe_label: Tensor, valid: Tensor, label_weight: Optional[Tensor]
) -> Tensor:
    """Per-sample ``-log softmax(pred)[label] * label_weight``, 0 where not ``valid`` (autograd formulation)."""
    loss = -gather_classes(torch.log_softmax(pred, dim=1), safe_label).squeeze(1)
    if label_weight is not None:
        loss = loss * label_weight
    return torch.where(valid, loss, 0.0)


@torch.jit.unused
def _softmax_cross_entropy_eager(
    pred: Tensor, safe_label: Tensor, valid: Tensor, label_weight: Optional[Tensor], weight: Optional[Tensor]
) -> Tensor:
    """:func:`_softmax_cross_entropy` times ``weight`` with the gradient ``(softmax - one_hot) * weights`` in closed
    form: one (N, C) temporary (the log-probabilities, turned into the gradient in place) where autograd keeps the
    masked logits, the log-probabilities, the zeros of gather's backward and log_softmax's backward."""
    keep_rows = valid.unsqueeze(1)
    with_grad = needs_grad(pred)
    with torch.no_grad():
        log_prob = torch.log_softmax(pred, dim=1)
        value = -log_prob.gather(1, safe_label)
        if label_weight is not None:
            value = value.mul_(label_weight.unsqueeze(1))
        grad: Optional[Tensor] = None
        if with_grad:
            grad = exp_scaled_(log_prob, 1.0).scatter_add_(
                1, safe_label, torch.full(safe_label.shape, -1.0, dtype=pred.dtype, device=pred.device)
            )
            if label_weight is not None:
                grad = grad.mul_(label_weight.unsqueeze(1))
        # rows not valid, and rows of NaN/inf logits that carry no weight
        value, grad = select_kept_outputs_(value, grad, keep_rows)
    return attach_gradient(
        value, grad, pred, None if weight is None else weight.unsqueeze(1),
        lambda logits: _softmax_cross_entropy(
            zero_where_unweighted(logits, keep_rows), safe_label, valid, label_weight
        ).unsqueeze(1),
    ).squeeze(1)


def binary_cross_entropy(
    pred: Tensor,
    label: Tensor,
    weight: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    avg_non_ignore: bool = False,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    r"""Sigmoid (binary) cross-entropy, ``class_weight`` acting as ``pos_weight``.

    ``label`` is either integer class indices (N,) for ``pred`` (N, C), expanded to one-hot targets with label C
    (or any index outside [0, C)) as background, or targets of ``pred``'s shape (binary or soft, as FCOS
    centerness). Elements whose label is negative or ``ignore_index`` are masked out; with ``avg_non_ignore``
    the mean divides by the number of elements that are not.

    Args:
        pred (Tensor[N, C] or Tensor[*]): logits.
        label (Tensor[N] int, or Tensor of ``pred``'s shape).
        weight (Tensor[N] for index labels; for targets of ``pred``'s shape, a weight per row (``pred.shape[:-1]``)
            or a tensor broadcastable to ``pred``, optional).
        class_weight (Tensor[C], optional): positive weights.

    Returns:
        Tensor of ``pred``'s shape for "none", else Tensor[].
    """
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction(
            "binary_cross_entropy",
            {"class_weight": class_weight, "ignore_index": ignore_index, "avg_non_ignore": avg_non_ignore},
        )
    input_dtype = pred.dtype
    dtype = logits_compute_dtype(pred)
    pred = pred.to(dtype)
    index_labels = pred.dim() != label.dim()
    if index_labels:
        if (
            pred.dim() != 2 or label.dim() != 1
            or not same_size(label.size(0), pred.size(0), "the labels' and pred's rows")
        ):
            raise ValueError(
                "expected pred (N, C) with labels (N,) or targets of pred's shape, got "
                + str(pred.shape) + " and " + str(label.shape)
            )
        label = _labels_to_int(label)
        check_class_axis(pred, 1, "sigmoid cross-entropy on class labels")
        # one row of the (N, C) problem per label: masks and weights stay (N, 1) and broadcast
        valid = _not_ignored(label, ignore_index).unsqueeze(1)
        if weight is not None:
            # (N,) or, as MMDetection's view(-1, 1) reads it, (N, 1)
            per_row = weight.dim() == 1 or (weight.dim() == 2 and weight.size(1) == 1)
            if not per_row or not same_size(weight.size(0), pred.size(0), "the weight's and pred's rows"):
                raise ValueError("weight must have shape (N,) or (N, 1) with index labels, got " + str(weight.shape))
            weight = weight.reshape(-1, 1)
    else:
        if not same_shape(pred, label):
            raise ValueError(
                "pred and label must have the same shape, got " + str(pred.shape) + " and " + str(label.shape)
            )
        # masked once below by ``keep``, which implies ``valid`` (where it does not, the element weight is NaN)
        valid = _not_ignored(label, ignore_index)
        if weight is not None:
            weight = element_weight(weight, pred)
    if class_weight is not None:
        # one logit per sample (FCOS centerness) has no class axis: one weight for the positives, as pos_weight
        _check_class_count(class_weight, pred.size(-1) if pred.dim() > 1 else 1)
    if weight is not None:
        weight = weight.to(dtype)
    pos_weight = None if class_weight is None else class_weight.to(pred.device, dtype)
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = valid.sum().to(dtype)
        if index_labels:
            avg_factor = avg_factor * pred.size(1)
    # closed-form gradient, in place (see numerics); a weight that is trained keeps autograd, whose gradient at
    # masked elements is the loss of the masked inputs (log 2), where the fast path zeroes the outputs
    if eager_closed_form(pred, label, weight) and not (pos_weight is not None and needs_grad(pos_weight)):
        # the outputs are zeroed outside ``keep``, so the weight applies as given, with no (valid * weight) tensor
        keep_weighted = weight_keep_mask(weight)
        keep_eager = valid if keep_weighted is None else valid & keep_weighted
        if index_labels:
            loss = _binary_cross_entropy_labels_eager(pred, label, weight, keep_eager, pos_weight)
        else:
            loss = _binary_cross_entropy_eager(pred, label.to(dtype), weight, keep_eager, pos_weight)
        return weight_reduce_loss(loss, None, reduction, avg_factor)
    weights: Optional[Tensor] = None
    if weight is not None:
        weights = valid.to(dtype) * weight
    keep = valid if weights is None else weight_keep_mask(weights)
    weights = valid.to(dtype) if weights is None else weights
    if index_labels and pos_weight is None:
        # closed-form derivative saved by the forward, for class logits (N, C); with targets of pred's shape such as
        # FCOS centerness (N,), inductor computes the forced save in extra kernels (1M: 9.7 against 3.9 ms fwd+bwd)
        if compiled_training(pred, label):
            # one-hot targets built from integer labels are finite: only the logits are masked
            loss, grad = bce_with_saved_gradient(*masked_inputs(pred, _one_hot(pred, label), keep, False), input_dtype)
            return keep_saved_gradient(weight_reduce_loss(loss, weights, reduction, avg_factor), grad, reduction)
        loss = _binary_cross_entropy_on_labels(zero_where_unweighted(pred, keep), label)
    else:
        targets = _one_hot(pred, label) if index_labels else label.to(dtype)
        loss = _masked_bce_with_logits(pred, targets, keep, pos_weight, not index_labels)
    return weight_reduce_loss(loss, weights, reduction, avg_factor)


def _binary_cross_entropy_on_labels(pred: Tensor, label: Tensor) -> Tensor:
    """:func:`~visdet_export.numerics.bce_with_logits` of one-hot targets given as labels (N,), without (N, C)
    targets (autograd formulation): ``softplus(x)`` everywhere, and at the label ``relu(-x) + log1p(exp(-|x|))``
    from the gathered logit (N values), scattered in; value for value and slope for slope the one-hot formulation.
    Exported graphs make 4 fewer passes over (N, C) (no comparison with the classes, cast, product or difference)."""
    labelled, index, at_label, at_column_0 = logits_at_labels(pred, label)
    # relu(-x), not relu(x) - x (inf - inf at x = +inf): the same value, and relu's slope 0 at 0 keeps the slope -1/2
    positive = torch.relu(-at_label) + log1p_exp_neg_abs(at_label)
    return replace_at_labels(softplus(pred), labelled, index, positive, softplus(at_column_0))


def _not_ignored(label: Tensor, ignore_index: int) -> Tensor:
    """``label >= 0`` and ``label != ignore_index``; one comparison when the ignored label is negative anyway."""
    if ignore_index < 0:
        return label >= 0
    return (label >= 0) & (label != ignore_index)


def _one_hot(pred: Tensor, label: Tensor) -> Tensor:
    """(N, C) targets in ``pred``'s dtype from labels (N,); labels outside [0, C) give an all-zero row."""
    classes = torch.arange(pred.size(1), device=pred.device)
    return (label.unsqueeze(1) == classes).to(pred.dtype)


# log1p(exp(-x)) is below half an ulp of x from here on, in float32 and float64 alike, and exp(x) is finite
_SOFTPLUS_LINEAR_FROM = 40.0


@torch.jit.unused
def _binary_cross_entropy_eager(
    pred: Tensor, targets: Tensor, weights: Optional[Tensor], keep: Optional[Tensor], pos_weight: Optional[Tensor]
) -> Tensor:
    """BCE on logits times a frozen weight with the gradient in closed form, ``(1 - t) sigmoid(x) - p t sigmoid(-x)``
    (``p`` = ``pos_weight``, 1 without; slope ``(1 - t - p t) / 2`` at 0). The value is a sum of terms that are not
    negative: ``x ([x >= 0] - t) + log1p(exp(-|x|))`` (see bce_with_logits), or with ``pos_weight``
    ``(1 - t) softplus(x) + p t softplus(-x)``, where ``softplus(x) - x t`` and ``sigmoid(x) - t`` cancelled for a
    confident positive (t = 1: the value 7% off at x = 12, 0 for 4e-8 at 17; the gradient likewise). A logit of
    -inf at t = 0 or +inf at t = 1 gives 0 (see weighted_side). The built-ins' ONNX lowering (Log(Sigmoid))
    overflows, hence eager only. Elements of weight 0 are zeroed in the outputs rather than in the inputs: two
    in-place passes where masking logits and targets took three full-size temporaries."""
    with_grad = needs_grad(pred)
    with torch.no_grad():
        grad: Optional[Tensor] = None
        if pos_weight is None:
            # one exp and one log1p per element, where the two softplus sides took two each
            value, prob = bce_and_sigmoid(pred, targets)
            if with_grad:
                grad = prob.lerp_(torch.neg(pred).sigmoid_().neg_(), targets)
        else:
            negated = torch.neg(pred)
            negative, positive = torch.sub(1.0, targets), targets * pos_weight
            value = _weighted_side_(F.softplus(pred, threshold=_SOFTPLUS_LINEAR_FROM), negative)
            value.add_(_weighted_side_(F.softplus(negated, threshold=_SOFTPLUS_LINEAR_FROM), positive))
            if with_grad:
                grad = torch.sigmoid(pred).mul_(negative).sub_(negated.sigmoid_().mul_(positive))
        value, grad = select_kept_outputs_(value, grad, keep)
    return attach_gradient(
        value, grad, pred, weights,
        lambda logits: _masked_bce_with_logits(logits, targets, keep, pos_weight, True),
    )


def _weighted_side_(side: Tensor, side_weight: Tensor) -> Tensor:
    """:func:`~visdet_export.numerics.weighted_side` in ``side``'s buffer (eager closed forms)."""
    return side.mul_(side_weight).masked_fill_(side_weight == 0, 0.0)


@torch.jit.unused
def _binary_cross_entropy_labels_eager(
    pred: Tensor, label: Tensor, weights: Optional[Tensor], keep: Optional[Tensor], pos_weight: Optional[Tensor]
) -> Tensor:
    """:func:`_binary_cross_entropy_eager` for one-hot targets given as labels (N,), without (N, C) targets: every
    element is ``softplus(x)`` with slope ``sigmoid(x)``, except at the label, ``p softplus(-x)`` with slope
    ``-p sigmoid(-x)`` (p = ``pos_weight`` of the class, or 1), written there by a scatter of N values, exactly
    (``softplus(x) - x`` cancels for confident positives)."""
    with_grad = needs_grad(pred)

    def everywhere(logits: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        value = F.softplus(logits, threshold=_SOFTPLUS_LINEAR_FROM)
        return value, torch.sigmoid(logits) if with_grad else None

    def at_label(logit: Tensor, index: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        scale = torch.ones_like(logit) if pos_weight is None else pos_weight[index]
        negated = logit.neg()
        value = F.softplus(negated, threshold=_SOFTPLUS_LINEAR_FROM).mul_(scale)
        return value, negated.sigmoid_().mul_(scale).neg_() if with_grad else None

    value, grad = label_column_terms(pred, label, keep, everywhere, at_label)
    return attach_gradient(
        value, grad, pred, weights,
        lambda logits: _masked_bce_with_logits(logits, _one_hot(logits, label), keep, pos_weight, False),
    )


def _masked_bce_with_logits(
    pred: Tensor, targets: Tensor, keep: Optional[Tensor], pos_weight: Optional[Tensor], mask_targets: bool
) -> Tensor:
    """BCE on logits with the elements outside ``keep`` replaced by 0 in the inputs (autograd formulation)."""
    pred, targets = masked_inputs(pred, targets, keep, mask_targets)
    return bce_with_logits(pred, targets, log1p_exp_neg_abs(pred), pos_weight)


def mask_cross_entropy(
    pred: Tensor,
    target: Tensor,
    label: Tensor,
    class_weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    """Binary cross-entropy of each RoI's mask logits at its class (Mask R-CNN; PointRend's point logits too).

    Args:
        pred (Tensor[R, C, *S]): mask logits, one map per class: S = (H, W) for masks, (P,) for PointRend's points.
        target (Tensor[R, *S]): binary mask targets.
        label (Tensor[R] int): the RoIs' classes, which select the map of ``pred``; a RoI labelled outside
            [0, C) contributes 0, as softmax CE's samples do (visdet reads -1 as the last class and fails on C).
        class_weight (Tensor[C], optional): weight of each RoI by its class (visdet passes it to
            ``F.binary_cross_entropy_with_logits`` as an element weight, which only broadcasts when C == W).

    Returns:
        Tensor[R, *S] for "none", else Tensor[] (visdet returns shape (1,), mean only).
    """
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("mask_cross_entropy", {"class_weight": class_weight})
    matching = pred.dim() >= 3 and target.dim() == pred.dim() - 1 and label.dim() == 1
    if matching:
        matching = same_size(target.size(0), pred.size(0)) and same_size(label.size(0), pred.size(0))
        for dim in range(1, target.dim()):
            matching = matching and same_size(target.size(dim), pred.size(dim + 1))
    if not matching:
        raise ValueError(
            "expected pred (R, C, H, W) or (R, C, P), target (R, H, W) or (R, P) and label (R,), got "
            + str(pred.shape) + ", " + str(target.shape) + " and " + str(label.shape)
        )
    label = _labels_to_int(label)
    check_class_axis(pred, 1, "mask cross-entropy")
    _check_class_count(class_weight, pred.size(1))
    dtype = logits_compute_dtype(pred)
    safe_label = label.clamp(0, pred.size(1) - 1)
    one_per_roi = [-1] + [1] * (pred.dim() - 1)
    map_shape = list(pred.shape)
    map_shape[1] = 1
    logits = pred.gather(1, safe_label.reshape(one_per_roi).expand(map_shape)).squeeze(1).to(dtype)
    target = target.to(dtype)
    outside = (safe_label != label).reshape([-1] + [1] * (target.dim() - 1))
    # inputs zeroed before the loss and the loss after it: a NaN map of an unlabelled RoI reaches neither
    logits, target = logits.masked_fill(outside, 0.0), target.masked_fill(outside, 0.0)
    loss = bce_with_logits(logits, target, log1p_exp_neg_abs(logits)).masked_fill(outside, 0.0)
    weight: Optional[Tensor] = None
    if class_weight is not None:
        weight = class_weight.to(pred.device, dtype)[safe_label].reshape([-1] + [1] * (target.dim() - 1))
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


class CrossEntropyLoss(WeightedLoss):
    """Cross-entropy module: softmax (default), sigmoid (``use_sigmoid``) or mask (``use_mask``).

    ``forward(pred, label, weight, avg_factor, reduction_override, ignore_index)``; in mask mode the third
    positional argument is the RoIs' class labels, as visdet's mask heads call it.

    Args:
        use_sigmoid: binary cross-entropy on logits; see :func:`binary_cross_entropy`.
        use_mask: Mask R-CNN mask loss; see :func:`mask_cross_entropy`.
        class_weight: per-class weights (list of C non-negative numbers).
        ignore_index: label to ignore (default -100); ``None`` means -100, as in visdet.
        avg_non_ignore: average over non-ignored elements only.
    """

    use_sigmoid: bool
    use_mask: bool
    ignore_index: int
    avg_non_ignore: bool
    class_weight: Optional[Tensor]
    class_weight_residual: Optional[Tensor]

    def __init__(
        self,
        use_sigmoid: bool = False,
        use_mask: bool = False,
        reduction: str = "mean",
        class_weight: Optional[list[float]] = None,
        ignore_index: Optional[int] = -100,
        loss_weight: float = 1.0,
        avg_non_ignore: bool = False,
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.use_sigmoid = check_bool("use_sigmoid", use_sigmoid)
        self.use_mask = check_bool("use_mask", use_mask)
        if self.use_sigmoid and self.use_mask:
            raise ConfigError("use_sigmoid and use_mask can not both be True; choose at most one")
        self.ignore_index = -100 if ignore_index is None else check_int("ignore_index", ignore_index)
        if self.use_mask and self.ignore_index != -100:  # MMDetection asserts it too
            raise ConfigError(f"use_mask=True takes no ignore_index (got {ignore_index}): every mask pixel counts")
        self.avg_non_ignore = check_bool("avg_non_ignore", avg_non_ignore)
        weights = check_class_weight(class_weight)
        if weights is not None:
            # the values the float32 buffers restore: the configured ones from ~1e-21 up, 0 for 1e-206 (so that the
            # recorded config rebuilds the same loss); on the CPU, as a model built on the meta device has no values
            with torch.device("cpu"):
                weights = from_float32_parts(*float32_parts(weights)).tolist()
        self._class_weight_values = weights  # what meta-device buffers are rebuilt from (see _apply)
        # float32 buffers, which float64 losses and loss_config turn back into the configured values
        rounded, residual = (None, None) if weights is None else float32_parts(weights)
        self.register_buffer("class_weight", rounded, persistent=False)
        self.register_buffer("class_weight_residual", residual, persistent=False)

    def forward(
        self,
        pred: Tensor,
        label: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
        ignore_index: Optional[int] = None,
    ) -> Tensor:
        """Softmax: ``pred`` (N, C) logits, ``label`` (N,) classes or (N, C) float class probabilities. Sigmoid:
        (N, C) logits with (N,) labels in [0, C] (C = background), or targets of ``pred``'s shape. Mask: (R, C, H, W)
        logits, (R, H, W) targets, and the RoIs' class labels as the third argument. ``ignore_index`` overrides the
        configured one for this call. Returns the loss times ``loss_weight``: 0-d, or per element under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"label": label}, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        factor = as_avg_factor(avg_factor, pred)
        class_weight = self.class_weight_for(pred)
        if self.use_mask:
            if weight is None:
                raise ValueError("mask cross-entropy needs the RoI class labels as the third argument")
            if ignore_index is not None:  # MMDetection asserts it; ignoring it silently would count the pixels
                raise ValueError("mask cross-entropy takes no ignore_index: every mask pixel counts")
            loss = mask_cross_entropy(pred, label, weight, class_weight, reduction, factor)
        else:
            index = self.ignore_index if ignore_index is None else ignore_index
            if self.use_sigmoid:
                loss = binary_cross_entropy(
                    pred, label, weight, class_weight, index, self.avg_non_ignore, reduction, factor
                )
            else:
                loss = softmax_cross_entropy(
                    pred, label, weight, class_weight, index, self.avg_non_ignore, reduction, factor
                )
        return self.weighted(loss)

    def class_weight_for(self, pred: Tensor) -> Optional[Tensor]:
        """The class weights (C,) for ``pred``: float32, or for float64 ``pred`` the configured values."""
        rounded, residual = self.class_weight, self.class_weight_residual
        if rounded is None or residual is None or pred.dtype != torch.float64:
            return rounded
        return from_float32_parts(rounded, residual)

    @torch.jit.unused
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "CrossEntropyLoss":
        # model.half() / .double() cast every buffer: the class weights stay the configured values' float32 parts,
        # on the device the buffers moved to (half-precision weights would round 0.1 to 0.09998)
        configured = self._configured_class_weight()
        super()._apply(fn, recurse)
        moved = self.class_weight
        if configured is not None and moved is not None and moved.device.type != "meta":
            rounded, residual = float32_parts(configured)
            self.class_weight, self.class_weight_residual = rounded.to(moved.device), residual.to(moved.device)
        return self

    @torch.jit.unused
    def _configured_class_weight(self) -> Optional[list[float]]:
        rounded, residual = self.class_weight, self.class_weight_residual
        if rounded is None or residual is None:
            return None
        if rounded.device.type == "meta":
            # a model built on the meta device and materialised with to_empty(): non-persistent buffers are in no
            # state_dict, so the configured values would otherwise stay uninitialised memory
            return self._class_weight_values
        return from_float32_parts(rounded, residual).tolist()

    def extra_repr(self) -> str:
        configured = self._configured_class_weight()
        weights = "" if configured is None else f"class_weight={[round(w, 6) for w in configured]}, "
        return (
            f"use_sigmoid={self.use_sigmoid}, use_mask={self.use_mask}, ignore_index={self.ignore_index}, "
            f"avg_non_ignore={self.avg_non_ignore}, {weights}" + super().extra_repr()
        )
