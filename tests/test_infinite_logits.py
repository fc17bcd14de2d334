"""Infinite logits in the sigmoid family (focal, QFL, sigmoid cross-entropy, mask mode included), softmax
cross-entropy, DFL's bins and KD / LD's teacher and student, in every differentiable runtime, in onnxruntime and in a
``.pt2`` package (loss and gradient graphs).

A logit of -inf where the target is 0 (a class masked out, as multi-dataset heads mask the classes a dataset does
not label) or of +inf where it is 1 is a prediction that is exactly right: the loss there is its limit, 0, and so is
its gradient, as for a logit of -60 / +60. A logit of +-inf on the wrong side of its target (or at any soft target
in (0, 1)) makes the loss +inf (RELIABILITY 26: infinite inputs are not silently masked). Softmax losses: -inf on
a class (bin) with target 0 adds nothing; a class the teacher masks adds nothing to KD / LD, whatever the student.
"""

from __future__ import annotations

import pytest
import torch
from reference import grad_of, one_hot_background, reference_loss
from torch import Tensor

from visdet_export import build_loss
from visdet_export.check import TOLERANCES
from visdet_export.runtimes import LossRunner, build_runner
from visdet_export.specs import spec_for

# (config, spec variant); "sum" keeps every element's contribution in the value
CASES: dict[str, tuple[dict, str]] = {
    "focal_labels": (dict(type="FocalLoss", reduction="sum"), "labels"),
    "focal_onehot_gamma_1_5": (dict(type="FocalLoss", gamma=1.5, reduction="sum"), "onehot"),
    "qfl_pair": (dict(type="QualityFocalLoss", reduction="sum"), "pair"),
    "qfl_dense_beta_1_5": (dict(type="QualityFocalLoss", beta=1.5, reduction="sum"), "dense"),
    "ce_sigmoid_labels": (dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="sum"), "labels"),
    "ce_sigmoid_pos_weight": (
        dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[0.5, 2.0] * 40, reduction="sum"), "labels"),
    "ce_sigmoid_dense": (dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="sum"), "dense"),
    "ce_sigmoid_binary": (dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="sum"), "binary"),
    "ce_mask": (dict(type="CrossEntropyLoss", use_mask=True, reduction="sum"), "mask"),
    "ce_softmax": (dict(type="CrossEntropyLoss", reduction="sum"), "labels"),
}
# softmax: -inf on the classes other than the label (+inf has no limit there: inf - inf in the normaliser)
SOFTMAX = ["ce_softmax"]
# distillation: teacher and student logits (soft_label, pred), softmax over the classes / each side's bins
DISTILLATION: dict[str, tuple[dict, None]] = {
    "kd": (dict(type="KnowledgeDistillationKLDivLoss", reduction="sum"), None),
    "ld": (dict(type="LocalizationDistillationLoss", reduction="sum"), None),
}
# DFL: a softmax over each box side's bins, its target between two of them
BINS: dict[str, tuple[dict, None]] = {"dfl": (dict(type="DistributionFocalLoss", reduction="sum"), None)}
EVERY_CASE = {**CASES, **DISTILLATION, **BINS}
# compiled training takes the closed forms of numerics (aot_eager traces them as inductor does); inductor's own
# kernels for two of them
RUNTIMES = ["eager", "compile", "script", "onnx"]
INDUCTOR = ["focal_labels", "qfl_pair"]
# an AOTInductor package (loss and gradient) of one: it takes the autograd formulation, as onnxruntime's graphs do
PT2 = ["focal_labels"]
CELLS = [(case, runtime) for case in CASES for runtime in RUNTIMES] + [(case, "inductor") for case in INDUCTOR]
CELLS += [(case, "pt2") for case in PT2]
SIGMOID_CELLS = [(case, runtime) for case, runtime in CELLS if case not in SOFTMAX]
N = 24
FINITE_STAND_IN = 60.0  # the loss and its gradient there are below 1e-24: the limit, within any tolerance

_RUNNERS: dict[tuple[str, str], LossRunner] = {}


@pytest.fixture(scope="module", autouse=True)
def runners_dropped_after_the_module():
    """Destroy the runners with the module's tests, not at interpreter exit (conftest's teardown check): the
    ``.pt2`` runner left in this dict left its extracted package in /tmp in most CI runs."""
    yield
    _RUNNERS.clear()


def runner(case: str, runtime: str) -> LossRunner:
    if (case, runtime) not in _RUNNERS:
        cfg, variant = EVERY_CASE[case]
        loss = build_loss(cfg)
        spec = spec_for(loss, variant)
        names = [name for name in spec.names if name != "avg_factor"]  # no avg_factor with "sum"
        if runtime in ("onnx", "pt2"):
            built = build_runner(runtime, loss, spec, names, joint=True)
        elif runtime in ("compile", "inductor"):
            backend = "aot_eager" if runtime == "compile" else "inductor"
            built = build_runner("compile", loss, spec, names, backend=backend)
        else:
            built = build_runner(runtime, loss, spec, names)
        _RUNNERS[case, runtime] = built
    return _RUNNERS[case, runtime]


def draw(case: str, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """Inputs of ``case`` with hardened targets where they are soft (a target, or QFL score, of exactly 0 or 1 for
    half of them), and the dense (N, C) or (N,) targets they stand for."""
    cfg, variant = CASES[case]
    loss = build_loss(cfg)
    spec = spec_for(loss, variant)
    inputs = {k: v for k, v in spec.sample(loss, N, seed=seed).items() if k != "avg_factor"}
    if "weight" in inputs:
        inputs["weight"] = inputs["weight"].clamp(min=0.25)  # weight 0 would mask the row, infinities included
    generator = torch.Generator().manual_seed(seed + 1)
    pred = inputs["pred"]
    if "labels" in inputs:  # QFL pair: half the scores are 1
        inputs["scores"] = torch.where(torch.rand(N, generator=generator) < 0.5, 1.0, inputs["scores"])
        dense = one_hot_background(inputs["labels"], pred.size(1)) * inputs["scores"].double().unsqueeze(1)
    elif variant == "mask":  # the RoI's channel of its class holds its mask targets; -1 marks the others unused
        dense = torch.full(pred.shape, -1.0, dtype=torch.float64)
        for row, label in enumerate(inputs["label"].tolist()):
            if 0 <= label < pred.size(1):
                dense[row, label] = inputs["target"][row].double()
    elif inputs["target"].dim() != pred.dim():  # class labels (N,); ignored ones leave the row out anyway
        dense = one_hot_background(inputs["target"], pred.size(1))
    else:
        target = inputs["target"]
        if variant in ("dense", "binary"):  # soft targets: half of them hardened to 0 or 1
            hard = torch.rand(target.shape, generator=generator) < 0.5
            target = torch.where(hard, target.round(), target)
            inputs["target"] = target
        dense = target.double()
    return inputs, dense


def with_infinities(
    pred: Tensor, dense: Tensor, seed: int, wrong_side: bool, negatives_only: bool = False
) -> tuple[Tensor, Tensor]:
    """``pred`` with about a third of the elements whose target is exactly 0 or 1 (0 with ``negatives_only``) set
    to -inf / +inf, on the side of their target (a right prediction) or, with ``wrong_side``, on the other side;
    and where they are."""
    generator = torch.Generator().manual_seed(seed + 2)
    hard = (dense == 0) if negatives_only else (dense == 0) | (dense == 1)
    chosen = hard & (torch.rand(dense.shape, generator=generator) < 0.35)
    positive = (dense == 1) != wrong_side
    infinity = torch.where(positive, float("inf"), float("-inf")).to(pred.dtype)
    return torch.where(chosen, infinity, pred), chosen


def run(case: str, runtime: str, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(value, d value / d pred) in ``runtime``."""
    built = runner(case, runtime)
    if runtime in ("onnx", "pt2"):
        value, grad = built.run_all(inputs)[:2]
        return torch.as_tensor(value), torch.as_tensor(grad)
    pred = inputs["pred"].clone().requires_grad_()
    value = built({**inputs, "pred": pred})
    return value.detach(), grad_of(value, pred, torch.ones_like(value))


def reference(case: str, inputs: dict[str, Tensor], pred: Tensor) -> tuple[Tensor, Tensor]:
    cfg, _ = EVERY_CASE[case]
    pred = pred.double().requires_grad_()
    if case in DISTILLATION:
        target = inputs["soft_label"]
    else:
        target = (inputs["labels"], inputs["scores"]) if "labels" in inputs else inputs["target"]
    value = reference_loss(cfg, pred, target, inputs.get("weight", inputs.get("label")))  # mask mode: RoI labels
    return value.detach(), grad_of(value, pred, torch.ones_like(value))


def tolerances(runtime: str) -> dict[str, float]:
    """Against the float64 reference: the compiled tolerance for the float32 runtimes, onnxruntime's own."""
    return TOLERANCES["onnx" if runtime == "onnx" else "compile"]


@pytest.mark.parametrize(("case", "runtime"), CELLS, ids=[f"{c}-{r}" for c, r in CELLS])
def test_an_exactly_right_infinite_logit_adds_nothing(case: str, runtime: str) -> None:
    """-inf at target 0 and +inf at target 1 (softmax: -inf off the label): the loss of a logit of -60 / +60
    there (0 within 1e-24), value and gradient, with an exactly 0 gradient at the infinite logits."""
    for seed in (0, 1):
        inputs, dense = draw(case, seed)
        softmax = case in SOFTMAX
        pred, infinite = with_infinities(inputs["pred"], dense, seed, wrong_side=False, negatives_only=softmax)
        assert infinite.sum() >= 3 and (softmax or (infinite & (dense == 1)).any())  # both sides are covered
        value, grad = run(case, runtime, {**inputs, "pred": pred})
        stand_in = torch.where(infinite, pred.clamp(-FINITE_STAND_IN, FINITE_STAND_IN), pred)
        expected_value, expected_grad = reference(case, inputs, stand_in)
        torch.testing.assert_close(value.double(), expected_value, **tolerances(runtime))
        torch.testing.assert_close(grad.double(), expected_grad, **tolerances(runtime))
        assert (grad[infinite] == 0).all(), grad[infinite]


@pytest.mark.parametrize(("case", "runtime"), SIGMOID_CELLS, ids=[f"{c}-{r}" for c, r in SIGMOID_CELLS])
def test_a_wrong_infinite_logit_makes_the_loss_infinite(case: str, runtime: str) -> None:
    """+inf at target 0 or -inf at target 1 (and an infinite logit at a soft target): the value is +inf in every
    runtime. The gradient there is sigmoid CE's limit, sigmoid(x) - t (the reference's at +-60), and NaN for
    focal and QFL (their slope multiplies the infinite BCE by a vanishing sigmoid product), in every runtime;
    every other element's gradient is the reference's."""
    inputs, dense = draw(case, 0)
    pred, infinite = with_infinities(inputs["pred"], dense, 0, wrong_side=True)
    soft = (dense > 0) & (dense < 1)
    if soft.any():  # a soft target is on no side: either infinity is wrong
        first_soft = soft.flatten().nonzero()[0]
        pred.view(-1)[first_soft] = float("-inf")
        infinite.view(-1)[first_soft] = True
    value, grad = run(case, runtime, {**inputs, "pred": pred})
    assert value == float("inf"), value
    stand_in = torch.where(infinite, pred.clamp(-FINITE_STAND_IN, FINITE_STAND_IN), pred)
    _, expected_grad = reference(case, inputs, stand_in)
    if CASES[case][0]["type"] == "CrossEntropyLoss":
        torch.testing.assert_close(grad.double(), expected_grad, **tolerances(runtime))
    else:
        assert grad[infinite].isnan().all(), grad[infinite]
        torch.testing.assert_close(grad[~infinite].double(), expected_grad[~infinite], **tolerances(runtime))


DISTILLATION_CELLS = [(case, runtime) for case in DISTILLATION for runtime in RUNTIMES]
# a teacher probability of exp(-1e4 / T) = 0 in float64, a student's of exp(-1e3 / T) ~ 1e-44 (its log finite, as
# the reference needs): the masked class's limits
TEACHER_STAND_IN, STUDENT_STAND_IN = -1e4, -1e3


def masked_classes(case: str, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """Teacher / student inputs of ``case`` and a random third of the classes (bins) to mask, never a whole row."""
    cfg, _ = DISTILLATION[case]
    loss = build_loss(cfg)
    spec = spec_for(loss)
    inputs = {k: v for k, v in spec.sample(loss, N, seed=seed).items() if k != "avg_factor"}
    inputs["weight"] = inputs["weight"].clamp(min=0.25)
    generator = torch.Generator().manual_seed(seed + 3)
    masked = torch.rand(inputs["pred"].shape, generator=generator) < 0.3
    masked[..., 0] = False  # LD's first bin of each box side, and a class of each KD row, stay
    if case == "ld":
        masked = masked.view(masked.size(0), 4, -1)
        masked[..., 0] = False
        masked = masked.view(inputs["pred"].shape)
    return inputs, masked


@pytest.mark.parametrize(("case", "runtime"), DISTILLATION_CELLS, ids=[f"{c}-{r}" for c, r in DISTILLATION_CELLS])
@pytest.mark.parametrize("student_masked", [True, False], ids=["both", "teacher"])
def test_a_masked_teacher_class_adds_nothing(case: str, runtime: str, student_masked: bool) -> None:
    """A class (bin) the teacher masks with -inf has probability 0 and contributes 0, as in MMDetection's
    ``F.kl_div`` (NaN before: ``0 * (-inf - log q)``), whether the student masks it too or not; the gradient is the
    reference's, 0 where both mask it."""
    inputs, masked = masked_classes(case, 0)
    infinity = torch.tensor(float("-inf"))
    teacher = torch.where(masked, infinity, inputs["soft_label"])
    pred = torch.where(masked, infinity, inputs["pred"]) if student_masked else inputs["pred"]
    value, grad = run(case, runtime, {**inputs, "pred": pred, "soft_label": teacher})
    stand_in = {**inputs, "soft_label": torch.where(masked, TEACHER_STAND_IN, inputs["soft_label"])}
    expected_value, expected_grad = reference(case, stand_in, torch.where(pred.isinf(), STUDENT_STAND_IN, pred))
    torch.testing.assert_close(value.double(), expected_value, **tolerances(runtime))
    torch.testing.assert_close(grad.double(), expected_grad, **tolerances(runtime))
    if student_masked:
        assert (grad[masked] == 0).all(), grad[masked]


@pytest.mark.parametrize(("case", "runtime"), DISTILLATION_CELLS, ids=[f"{c}-{r}" for c, r in DISTILLATION_CELLS])
def test_a_student_masking_a_teacher_class_makes_the_loss_infinite(case: str, runtime: str) -> None:
    """-inf in the student where the teacher's probability is not 0: KL = +inf."""
    inputs, masked = masked_classes(case, 1)
    value, _ = run(case, runtime, {**inputs, "pred": torch.where(masked, float("-inf"), inputs["pred"])})
    assert value == float("inf"), value


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_dfl_bins_masked_away_from_the_target_add_nothing(runtime: str) -> None:
    """DFL's softmax over the bins with -inf on every bin but the two around each target: the loss of -60 there."""
    cfg, _ = BINS["dfl"]
    loss = build_loss(cfg)
    inputs = {k: v for k, v in spec_for(loss).sample(loss, N, seed=0).items() if k != "avg_factor"}
    bins = torch.arange(inputs["pred"].size(1))
    left = inputs["target"].floor().long().unsqueeze(1)
    masked = (bins < left) | (bins > left + 1)
    assert masked.any()
    pred = torch.where(masked, float("-inf"), inputs["pred"])
    value, grad = run("dfl", runtime, {**inputs, "pred": pred})
    expected_value, expected_grad = reference("dfl", inputs, torch.where(masked, -FINITE_STAND_IN, pred))
    torch.testing.assert_close(value.double(), expected_value, **tolerances(runtime))
    torch.testing.assert_close(grad.double(), expected_grad, **tolerances(runtime))
    assert (grad[masked] == 0).all(), grad[masked]


# float32's largest finite value is 3.4e38: a product of the BCE (~|x| there) with a factor above 1 overflows before
# the vanishing sigmoid factor zeroes it, and inf * 0 is NaN
LARGEST_FINITE = 3e38
TRAINING_CELLS = [(case, runtime) for case, runtime in SIGMOID_CELLS if runtime in ("eager", "compile", "inductor")]


@pytest.mark.parametrize(("case", "runtime"), TRAINING_CELLS, ids=[f"{c}-{r}" for c, r in TRAINING_CELLS])
@pytest.mark.parametrize("wrong_side", [False, True], ids=["right", "wrong"])
def test_the_largest_finite_logits_keep_the_reference_gradient(case: str, runtime: str, wrong_side: bool) -> None:
    """Logits of +-3e38 on either side of their targets: eager and compiled training give the float64 reference's
    gradient, finite (compiled QFL gave NaN: ``2 bce slope`` overflowed before ``slope`` = 0 zeroed it), and its
    value rounded to float32. TorchScript and onnxruntime's gradient graphs differentiate the autograd formulation,
    whose chain rule overflows the same way past ~1.7e38 (README)."""
    inputs, dense = draw(case, 0)
    pred, chosen = with_infinities(inputs["pred"], dense, 0, wrong_side=wrong_side)
    pred = torch.where(chosen, pred.sign() * LARGEST_FINITE, pred)
    value, grad = run(case, runtime, {**inputs, "pred": pred})
    expected_value, expected_grad = reference(case, inputs, pred)
    assert grad.isfinite().all()
    torch.testing.assert_close(value.double(), expected_value.float().double(), **tolerances(runtime))
    torch.testing.assert_close(grad.double(), expected_grad, **tolerances(runtime))
