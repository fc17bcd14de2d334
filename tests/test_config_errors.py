"""Configuration and call-contract errors: RELIABILITY.md items 1-8.

Bad configuration fails when the loss is built (ConfigError, a ValueError, naming the problem and the valid
choices); shape / dtype / class-count problems that depend on the inputs fail at the call with a ValueError.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import CONFIG_NAMES
from hypothesis import given
from hypothesis import strategies as st
from reference import SEED_LOSS_NAMES, boxes, reference_loss

from visdet_export import ConfigError, build_loss
from visdet_export.export.torchscript import script_loss
from visdet_export.registry import MODELS, config_parameters, loss_config
from visdet_export.specs import representative_configs, spec_for

F64 = torch.float64

# --- 1: unknown reduction / mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEED_LOSS_NAMES)
@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, 1])
def test_unknown_reduction(name: str, reduction: object) -> None:
    with pytest.raises(ConfigError, match="reduction") as info:
        build_loss(dict(type=name, reduction=reduction))
    assert isinstance(info.value, ValueError)
    for valid in ("'none'", "'mean'", "'sum'"):
        assert valid in str(info.value)


@pytest.mark.parametrize("mode", ["exp", "Log", "", None])
def test_unknown_iou_mode(mode: object) -> None:
    with pytest.raises(ConfigError, match="mode") as info:
        build_loss(dict(type="IoULoss", mode=mode))
    for valid in ("'linear'", "'square'", "'log'"):
        assert valid in str(info.value)


# --- 2: out-of-range and non-finite values ---------------------------------------------------------------------------

BAD_VALUES = [
    pytest.param(dict(type="FocalLoss", gamma=-0.5), "gamma", id="focal_gamma_negative"),
    pytest.param(dict(type="FocalLoss", alpha=1.5), "alpha", id="focal_alpha_above_1"),
    pytest.param(dict(type="FocalLoss", alpha=-0.5), "alpha", id="focal_alpha_negative"),
    pytest.param(dict(type="FocalLoss", alpha=-2.0), "alpha", id="focal_alpha_minus2"),
    pytest.param(dict(type="QualityFocalLoss", beta=-1.0), "beta", id="qfl_beta_negative"),
    pytest.param(dict(type="SmoothL1Loss", beta=0.0), "beta", id="smooth_l1_beta_0"),
    pytest.param(dict(type="SmoothL1Loss", beta=-1.0), "beta", id="smooth_l1_beta_negative"),
    pytest.param(dict(type="BalancedL1Loss", beta=0.0), "beta", id="balanced_l1_beta_0"),
    pytest.param(dict(type="BalancedL1Loss", alpha=0.0), "alpha", id="balanced_l1_alpha_0"),
    pytest.param(dict(type="BalancedL1Loss", gamma=-1.0), "gamma", id="balanced_l1_gamma_negative"),
    pytest.param(dict(type="IoULoss", eps=0.0), "eps", id="iou_eps_0"),
    pytest.param(dict(type="IoULoss", eps=-1e-6), "eps", id="iou_eps_negative"),
    pytest.param(dict(type="GIoULoss", eps=0.0), "eps", id="giou_eps_0"),
    pytest.param(dict(type="GIoULoss", eps=1e-13), ">= 1e-12", id="giou_eps_below_smallest"),
    pytest.param(dict(type="IoULoss", eps=1e-13), ">= 1e-12", id="iou_eps_below_smallest"),
    pytest.param(dict(type="DistributionFocalLoss", reg_max=0), "reg_max", id="dfl_reg_max_0"),
    pytest.param(dict(type="CrossEntropyLoss", class_weight=[1.0, -1.0]), "class_weight", id="ce_cw_negative"),
    pytest.param(dict(type="CrossEntropyLoss", class_weight=[]), "class_weight", id="ce_cw_empty"),
    pytest.param(dict(type="CrossEntropyLoss", class_weight=[1.0, 1e39]), "within [+]-3.40", id="ce_cw_above_float32"),
    # beyond float32, where the losses compute: eager raised at the call, the other runtimes gave inf / NaN
    pytest.param(dict(type="FocalLoss", gamma=1e39), "gamma=1e[+]39 is out of float32's range", id="focal_gamma_1e39"),
    pytest.param(dict(type="QualityFocalLoss", beta=1e39), "float32's range", id="qfl_beta_1e39"),
    pytest.param(dict(type="L1Loss", loss_weight=-1e39), "loss_weight.*float32's range", id="loss_weight_minus_1e39"),
    pytest.param(dict(type="GIoULoss", eps=1e39), "eps.*float32's range", id="giou_eps_1e39"),
    pytest.param(dict(type="SmoothL1Loss", beta=1e39), "beta.*float32's range", id="smooth_l1_beta_1e39"),
    pytest.param(dict(type="SmoothL1Loss", beta=1e-39), ">= 1.17.*1 / beta must be finite", id="smooth_l1_beta_1e-39"),
    pytest.param(dict(type="BalancedL1Loss", beta=1e-39), ">= 1.17", id="balanced_l1_beta_1e-39"),
    pytest.param(dict(type="KnowledgeDistillationKLDivLoss", T=1e20), "<= 1.84.*T [*] T", id="kd_T_1e20"),
    pytest.param(dict(type="LocalizationDistillationLoss", T=1e-40), ">= 1.17", id="ld_T_1e-40"),
    pytest.param(
        dict(type="BalancedL1Loss", alpha=0.05, gamma=4.0, beta=1e-4), r"keep beta within \[0.0001628",
        id="balanced_l1_beta_below_b_range",
    ),
    pytest.param(dict(type="BalancedL1Loss", beta=1e37), "keep beta within", id="balanced_l1_beta_above_b_range"),
    pytest.param(dict(type="BalancedL1Loss", alpha=1.0, gamma=1e-17), "too small", id="balanced_l1_b_rounds_to_0"),
    pytest.param(dict(type="CrossEntropyLoss", use_sigmoid=True, use_mask=True), "use_sigmoid", id="ce_two_modes"),
    pytest.param(dict(type="FocalLoss", use_sigmoid=False), "use_sigmoid", id="focal_softmax"),
    pytest.param(dict(type="QualityFocalLoss", use_sigmoid=False), "use_sigmoid", id="qfl_softmax"),
    pytest.param(dict(type="CrossEntropyLoss", use_mask=True, ignore_index=0), "ignore_index", id="mask_ignore_index"),
]


@pytest.mark.parametrize(("cfg", "word"), BAD_VALUES)
def test_out_of_range_values(cfg: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        build_loss(cfg)


@pytest.mark.parametrize("cfg", [
    dict(type="IoULoss", mode="square", eps=1e-16, reduction="sum", loss_weight=5.0),  # MMDetection's YOLOX head
    dict(type="GIoULoss", eps=0.0),
], ids=["yolox_iou", "giou_eps_0"])
def test_box_eps_below_the_smallest_says_what_to_write(cfg: dict) -> None:
    """Stock configs carry eps below SMALLEST_EPS (YOLOX: 1e-16): the message says why and what to write."""
    with pytest.raises(ConfigError, match=r"must be >= 1e-12: .*overflows float32.*write eps=1e-12"):
        build_loss(cfg)


def test_the_ends_of_every_closed_range_build() -> None:
    """The bounds are inclusive where the range is closed: alpha 1 and 0, gamma and beta 0, a class weight of
    float32's largest value, BalancedL1's gamma / alpha of 80 (refused just past it)."""
    assert build_loss(dict(type="FocalLoss", alpha=1.0)).alpha == 1.0
    assert build_loss(dict(type="FocalLoss", alpha=0.0, gamma=0.0)).alpha == 0.0
    largest = float(torch.finfo(torch.float32).max)
    assert build_loss(dict(type="CrossEntropyLoss", class_weight=[largest, 0.0])).class_weight_for(
        torch.zeros(1)).tolist() == [largest, 0.0]
    assert build_loss(dict(type="BalancedL1Loss", alpha=0.5, gamma=40.0)).gamma == 40.0
    with pytest.raises(ConfigError, match="keep it <= 80"):
        build_loss(dict(type="BalancedL1Loss", alpha=0.5, gamma=40.5))


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("cfg", [
    dict(type="FocalLoss", gamma=FLOAT32_MAX),
    dict(type="L1Loss", loss_weight=-FLOAT32_MAX),
    dict(type="SmoothL1Loss", beta=FLOAT32_TINY),
    dict(type="KnowledgeDistillationKLDivLoss", T=FLOAT32_MAX ** 0.5),
    dict(type="LocalizationDistillationLoss", T=FLOAT32_TINY),
], ids=["focal_gamma_max", "loss_weight_min", "smooth_l1_beta_tiny", "kd_T_sqrt_max", "ld_T_tiny"])
def test_float32_range_ends_build(cfg: dict) -> None:
    """Hyper-parameters are refused only past float32's range (and divisors below its smallest normal)."""
    loss = build_loss(cfg)
    assert all(getattr(loss, key) == value for key, value in cfg.items() if key != "type")


# (alpha, gamma, matches the reference): b = e^(gamma / alpha) - 1 at the largest gamma / alpha (80), MMDetection's
# default, and a tiny b, whose products of distances near its low end are float32 denormals (finite, not precise)
BALANCED_L1_SCALES = [(0.05, 4.0, True), (0.5, 1.5, True), (1.0, 1e-15, False)]


def _balanced_l1_beta_range(alpha: float, gamma: float) -> tuple[float, float]:
    """The range of beta the refusal of beta = float32's smallest normal or largest names (capped at the largest)."""
    for beta in (FLOAT32_TINY, FLOAT32_MAX):
        try:
            build_loss(dict(type="BalancedL1Loss", alpha=alpha, gamma=gamma, beta=beta))
        except ConfigError as refusal:
            low, high = str(refusal).split("keep beta within [")[1].rstrip("]").split(", ")
            return float(low), min(float(high), FLOAT32_MAX)
    raise AssertionError("neither end of float32 was refused")


@pytest.mark.parametrize(("alpha", "gamma", "precise"), BALANCED_L1_SCALES, ids=["b_1e34", "default", "b_1e-15"])
@pytest.mark.parametrize("end", ["low", "high"])
def test_balanced_l1_at_the_ends_of_its_beta_range_stays_finite(
    alpha: float, gamma: float, precise: bool, end: str
) -> None:
    """BalancedL1 scales the distances below beta by b = e^(gamma / alpha) - 1: at either end of the beta range its
    message names (just inside it), distances up to and past beta give a finite value and gradient in eager and
    TorchScript (its chain rule orders the products differently) and the reference's value; just outside the
    range the build is refused. Where b is tiny, only finiteness: the products are float32 denormals."""
    low, high = _balanced_l1_beta_range(alpha, gamma)
    beta = low * 1.001 if end == "low" else high * 0.999
    cfg = dict(type="BalancedL1Loss", alpha=alpha, gamma=gamma, beta=beta, reduction="none")
    distances = torch.tensor([[0.0, beta * 1e-3, beta * 0.5, beta * 0.999, beta, beta * 1.001]]).clamp(max=FLOAT32_MAX)
    for loss in (build_loss(cfg), script_loss(build_loss(cfg))):
        for _ in range(3):  # TorchScript's profiled and optimized plans
            pred = distances.clone().requires_grad_()
            out = loss(pred, torch.zeros_like(pred))
            (grad,) = torch.autograd.grad(out.sum(), pred)
            assert torch.isfinite(out).all() and torch.isfinite(grad).all(), (out, grad)
    if precise:
        want = reference_loss(cfg, distances.double(), torch.zeros_like(distances, dtype=F64))
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    with pytest.raises(ConfigError, match="keep beta within|float32's range"):
        build_loss({**cfg, "beta": low * 0.99 if end == "low" else high * 1.01})


def test_focal_alpha_minus1_is_the_only_sentinel() -> None:
    assert build_loss(dict(type="FocalLoss", alpha=-1)).alpha == -1.0
    assert build_loss(dict(type="FocalLoss", alpha=0.0, gamma=0.0)).gamma == 0.0
    assert build_loss(dict(type="QualityFocalLoss", beta=0.0)).beta == 0.0


NUMBER_FIELDS = [
    ("FocalLoss", "gamma"), ("FocalLoss", "alpha"), ("FocalLoss", "loss_weight"), ("QualityFocalLoss", "beta"),
    ("SmoothL1Loss", "beta"), ("BalancedL1Loss", "alpha"), ("BalancedL1Loss", "gamma"), ("BalancedL1Loss", "beta"),
    ("IoULoss", "eps"), ("GIoULoss", "eps"), ("L1Loss", "loss_weight"), ("MSELoss", "loss_weight"),
    ("DistributionFocalLoss", "loss_weight"), ("CrossEntropyLoss", "loss_weight"), ("GIoULoss", "loss_weight"),
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("name", "field"), NUMBER_FIELDS, ids=[f"{n}.{f}" for n, f in NUMBER_FIELDS])
def test_non_finite_numbers(name: str, field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        build_loss({"type": name, field: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_class_weight(value: float) -> None:
    with pytest.raises(ConfigError, match="class_weight"):
        build_loss(dict(type="CrossEntropyLoss", class_weight=[1.0, value]))


@pytest.mark.parametrize("value", [True, "2.0", None, [2.0], torch.tensor(2.0)],
                         ids=["bool", "str", "None", "list", "tensor"])
@pytest.mark.parametrize(("name", "field"), NUMBER_FIELDS[:10], ids=[f"{n}.{f}" for n, f in NUMBER_FIELDS[:10]])
def test_wrong_number_types(name: str, field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        build_loss({"type": name, field: value})


@pytest.mark.parametrize(("cfg", "word"), [
    (dict(type="FocalLoss", activated="yes"), "activated"),
    (dict(type="FocalLoss", use_sigmoid=1), "use_sigmoid"),
    (dict(type="CrossEntropyLoss", avg_non_ignore=1), "avg_non_ignore"),
    (dict(type="CrossEntropyLoss", ignore_index=1.5), "ignore_index"),
    (dict(type="CrossEntropyLoss", ignore_index=True), "ignore_index"),
    (dict(type="CrossEntropyLoss", class_weight="1,2"), "class_weight"),
    (dict(type="CrossEntropyLoss", class_weight=[1.0, "2"]), "class_weight"),
    (dict(type="CrossEntropyLoss", class_weight=[1.0, True]), "class_weight"),
    (dict(type="CrossEntropyLoss", class_weight=np.ones((2, 2))), "class_weight"),
    (dict(type="CrossEntropyLoss", class_weight=torch.tensor([True, False])), "class_weight"),
    (dict(type="DistributionFocalLoss", reg_max=16.0), "reg_max"),
    (dict(type="IoULoss", linear="True"), "linear"),
], ids=["activated_str", "use_sigmoid_int", "avg_non_ignore_int", "ignore_index_float", "ignore_index_bool",
        "class_weight_str", "class_weight_item_str", "class_weight_item_bool", "class_weight_2d_array",
        "class_weight_bool_tensor", "reg_max_float", "linear_str"])
def test_wrong_option_types(cfg: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        build_loss(cfg)


# --- 3: registry ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [(1.0, 2.5), np.array([1.0, 2.5]), torch.tensor([1.0, 2.5], dtype=F64)],
                         ids=["tuple", "numpy", "tensor"])
def test_class_weight_takes_the_sequences_mmdetection_takes(given: object) -> None:
    """MMDetection reads class_weight with torch.tensor: a tuple, a numpy array or a tensor build as the list does."""
    loss = build_loss(dict(type="CrossEntropyLoss", class_weight=given))
    assert loss_config(loss)["class_weight"] == [1.0, 2.5]


@pytest.mark.parametrize(("typo", "suggestion"), [
    ("FocalLos", "FocalLoss"), ("GIOULoss", "GIoULoss"), ("SmoothL1loss", "SmoothL1Loss"),
    ("CrossEntropy", "CrossEntropyLoss"), ("QualityFocalLoss2", "QualityFocalLoss"),
])
def test_unknown_type_suggests_close_matches(typo: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_loss(dict(type=typo))
    message = str(info.value)
    assert typo in message and "Did you mean" in message and suggestion in message


def test_scoped_and_plugin_names_build_our_losses() -> None:
    """MMEngine configs write type="mmdet.FocalLoss"; the plugin's own config form is type="ExportFocalLoss"."""
    for name in ("mmdet.FocalLoss", "visdet.FocalLoss", "ExportFocalLoss", "mmdet.ExportFocalLoss"):
        assert loss_config(build_loss(dict(type=name, gamma=1.5)))["gamma"] == 1.5, name
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) gama \(did you mean 'gamma' for 'gama'\?\)"):
        build_loss(dict(type="FocalLoss", gama=2.0))


def test_a_class_as_type_builds_as_mmengine_builds_it() -> None:
    """MMEngine's registries take ``type`` as a class too (its pure-Python configs write ``type=FocalLoss``): a
    registered class builds itself, OpenMMLab's own class of a loss reads as its name, and any other class is
    refused with the registered names, never instantiated."""
    from visdet_export.losses import FocalLoss
    from visdet_export.losses.base import WeightedLoss

    loss = build_loss(dict(type=FocalLoss, gamma=1.5))
    assert type(loss) is FocalLoss and loss_config(loss)["gamma"] == 1.5
    mmdet_class = type("FocalLoss", (torch.nn.Module,), {"__module__": "mmdet.models.losses.focal_loss"})
    assert type(build_loss(dict(type=mmdet_class, alpha=0.5))) is FocalLoss
    mmdet_other = type("VarifocalLoss", (torch.nn.Module,), {"__module__": "mmdet.models.losses.varifocal_loss"})
    with pytest.raises(ConfigError, match="VarifocalLoss is an MMDetection loss"):
        build_loss(dict(type=mmdet_other))
    for cls in (torch.nn.L1Loss, WeightedLoss):
        with pytest.raises(ConfigError, match=r"not registered.*FocalLoss"):
            build_loss(dict(type=cls))


@pytest.mark.parametrize("cfg", [
    dict(type="os.system"), dict(type="torch.L1Loss"), dict(type="mm.det.L1Loss"), dict(type="torch.nn.L1Loss"),
    dict(type="__import__('os')"), dict(type=""),
    dict(type=None), dict(type=42), dict(gamma=2.0), "NoSuchLoss",
], ids=["dotted", "torch_scope", "nested_scope", "torch_path", "code", "empty", "None", "int", "missing_type",
        "string"])
def test_unregistered_types_are_never_imported(cfg: object) -> None:
    with pytest.raises(ConfigError):
        build_loss(cfg)  # type: ignore[arg-type]


def test_config_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        MODELS.build([("type", "FocalLoss")])  # type: ignore[arg-type]


@pytest.mark.parametrize(("cfg", "unknown", "valid"), [
    (dict(type="FocalLoss", gama=2.0), "gama", "gamma"),
    (dict(type="GIoULoss", mode="log"), "mode", "eps"),
    (dict(type="L1Loss", beta=1.0), "beta", "loss_weight"),
    (dict(type="CrossEntropyLoss", ignore_idx=255), "ignore_idx", "ignore_index"),
    (dict(type="DistributionFocalLoss", num_bins=17), "num_bins", "reg_max"),
])
def test_unknown_keys_list_valid_ones(cfg: dict, unknown: str, valid: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_loss(cfg)
    message = str(info.value)
    assert unknown in message and valid in message and "reduction" in message


def test_errors_are_value_errors() -> None:
    assert issubclass(ConfigError, ValueError)


# --- 4/5: class counts known only at the call --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["softmax", "sigmoid", "mask"])
def test_class_weight_wrong_length(mode: str) -> None:
    loss = build_loss(dict(type="CrossEntropyLoss", use_sigmoid=mode == "sigmoid", use_mask=mode == "mask",
                           class_weight=[1.0, 2.0, 3.0]))
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="class_weight"):
        if mode == "mask":
            loss(torch.randn(2, 5, 4, 4), torch.zeros(2, 4, 4), labels)
        else:
            loss(torch.randn(2, 5), labels)


def test_dfl_reg_max_mismatch() -> None:
    loss = build_loss(dict(type="DistributionFocalLoss", reg_max=16))
    with pytest.raises(ValueError, match="reg_max"):
        loss(torch.randn(4, 8), torch.rand(4) * 7)
    loss(torch.randn(4, 17), torch.rand(4) * 16)  # the right bin count works


# --- 6/7: shapes and dtypes ------------------------------------------------------------------------------------------

SHAPE_ERRORS = [
    pytest.param("L1Loss", torch.randn(4, 1), torch.randn(4), id="l1_N1_vs_N"),
    pytest.param("MSELoss", torch.randn(4), torch.randn(4, 1), id="mse_N_vs_N1"),
    pytest.param("SmoothL1Loss", torch.randn(4, 4), torch.randn(4, 3), id="smooth_l1_columns"),
    pytest.param("BalancedL1Loss", torch.randn(4, 4), torch.randn(1, 4), id="balanced_l1_broadcast_rows"),
    pytest.param("IoULoss", boxes(4, dtype=torch.float32), boxes(3, dtype=torch.float32), id="iou_rows"),
    pytest.param("GIoULoss", boxes(4, dtype=torch.float32)[:, :3], boxes(4, dtype=torch.float32)[:, :3],
                 id="giou_three_coords"),
    pytest.param("GIoULoss", boxes(4, dtype=torch.float32), boxes(1, dtype=torch.float32), id="giou_broadcast"),
    pytest.param("FocalLoss", torch.randn(4, 3), torch.zeros(4, 1), id="focal_onehot_N1"),
    pytest.param("FocalLoss", torch.randn(4, 3), torch.zeros(5, dtype=torch.long), id="focal_label_count"),
    pytest.param("QualityFocalLoss", torch.randn(4, 3), torch.zeros(4, 1), id="qfl_dense_N1"),
    pytest.param("QualityFocalLoss", torch.randn(4, 3), (torch.zeros(4, dtype=torch.long), torch.zeros(3)),
                 id="qfl_scores_count"),
    pytest.param("DistributionFocalLoss", torch.randn(4, 17), torch.rand(4, 1), id="dfl_N1"),
    pytest.param("CrossEntropyLoss", torch.randn(4, 3), torch.zeros(5, dtype=torch.long), id="ce_label_count"),
    pytest.param("CrossEntropyLoss", torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), id="ce_label_N1"),
]


@pytest.mark.parametrize(("name", "pred", "target"), SHAPE_ERRORS)
def test_shape_mismatch(name: str, pred: torch.Tensor, target: object) -> None:
    with pytest.raises(ValueError):
        build_loss(dict(type=name))(pred, target)


@pytest.mark.parametrize(("cfg", "pred", "target"), [
    (dict(type="CrossEntropyLoss", use_sigmoid=True), torch.randn(4, 3), torch.randn(4, 1)),
    (dict(type="CrossEntropyLoss", use_mask=True), torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 5)),
], ids=["ce_sigmoid_N1", "ce_mask_target_shape"])
def test_shape_mismatch_ce_modes(cfg: dict, pred: torch.Tensor, target: torch.Tensor) -> None:
    loss = build_loss(cfg)
    with pytest.raises(ValueError):
        if cfg.get("use_mask"):
            loss(pred, target, torch.tensor([0, 1]))
        else:
            loss(pred, target)


# weights that broadcast into a larger loss: (N, 1) against (N,) gives (N, N), (2, N, ...) doubles the mean; a 0-d
# weight is no weight of the loss's rank
SIGMOID_CE = dict(type="CrossEntropyLoss", use_sigmoid=True)
WEIGHT_SHAPE_ERRORS = [
    pytest.param(SIGMOID_CE, torch.randn(4), torch.rand(4), (4, 1), id="centerness_N1"),
    pytest.param(SIGMOID_CE, torch.randn(4), torch.rand(4), (), id="centerness_0d"),
    pytest.param(SIGMOID_CE, torch.randn(4, 3), torch.rand(4, 3), (3,), id="ce_dense_one_per_column"),
    pytest.param(dict(type="CrossEntropyLoss"), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), (4, 1), id="softmax_N1"),
    pytest.param(dict(type="CrossEntropyLoss"), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), (2, 4), id="softmax_2N"),
    pytest.param(dict(type="CrossEntropyLoss"), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), (), id="softmax_0d"),
    pytest.param(dict(type="L1Loss"), torch.randn(4, 4), torch.randn(4, 4), (2, 4, 4), id="l1_expanded"),
    pytest.param(dict(type="SmoothL1Loss"), torch.randn(4, 4), torch.randn(4, 4), (4, 4, 1), id="smooth_l1_rank"),
    pytest.param(dict(type="MSELoss"), torch.randn(4, 4), torch.randn(4, 4), (), id="mse_0d"),
    pytest.param(dict(type="DistributionFocalLoss"), torch.randn(4, 17), torch.rand(4), (4, 1), id="dfl_N1"),
    pytest.param(dict(type="GIoULoss"), boxes(4, dtype=torch.float32), boxes(4, seed=1, dtype=torch.float32), (4, 1),
                 id="giou_N1"),
]


@pytest.mark.parametrize("runtime", ["eager", "script"])
@pytest.mark.parametrize(("cfg", "pred", "target", "weight_shape"), WEIGHT_SHAPE_ERRORS)
def test_weight_shape_mismatch(cfg: dict, pred: torch.Tensor, target: torch.Tensor, weight_shape: tuple,
                               runtime: str) -> None:
    loss = build_loss(cfg)
    module = loss if runtime == "eager" else script_loss(loss)
    with pytest.raises((ValueError, torch.jit.Error), match="weight must have"):
        module(pred, target, torch.rand(weight_shape))


@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss", "CrossEntropyLoss"])
@pytest.mark.parametrize(("pred_shape", "weight_shape"), [((2, 2, 5, 5), (2, 1, 5, 5)), ((6, 4), (1, 4))],
                         ids=["cornernet_offsets", "per_column"])
def test_a_weight_of_ones_on_some_axes_broadcasts_as_mmdetection_does(
    name: str, pred_shape: tuple, weight_shape: tuple
) -> None:
    """CornerNet / CentripetalNet weigh their (B, 2, H, W) corner offsets by a (B, 1, H, W) mask: the loss keeps
    pred's shape, values and gradients as the reference's (float64, and the float32 closed forms)."""
    cfg = dict(type=name, **({"use_sigmoid": True} if name == "CrossEntropyLoss" else {}))
    loss = build_loss(cfg)
    pred, target = torch.randn(pred_shape, dtype=torch.float64), torch.rand(pred_shape, dtype=torch.float64)
    weight = torch.rand(weight_shape, dtype=torch.float64)
    weight.view(-1)[0] = 0.0
    for reduction in ("mean", "none"):
        leaf = pred.clone().requires_grad_()
        expected = reference_loss(cfg, leaf, target, weight, None, reduction)
        expected_grad = torch.autograd.grad(expected.sum(), leaf)[0]
        for dtype in (torch.float64, torch.float32):
            leaf = pred.to(dtype).requires_grad_()
            got = loss(leaf, target.to(dtype), weight.to(dtype), None, reduction)
            got_grad = torch.autograd.grad(got.sum(), leaf)[0]
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss", "CrossEntropyLoss"])
def test_a_weight_per_row_broadcasts_over_the_last_axis(name: str) -> None:
    """(N, D), (N,) and YOLOv3's (N, 1) masks: one value per row of the last axis, as MMDetection broadcasts them."""
    cfg = dict(type=name, **({"use_sigmoid": True} if name == "CrossEntropyLoss" else {}))
    loss, pred, target, weight = build_loss(cfg), torch.randn(3, 5, 4), torch.rand(3, 5, 4), torch.rand(3, 5)
    expected = loss(pred, target, weight.unsqueeze(-1).expand(3, 5, 4).contiguous())
    torch.testing.assert_close(loss(pred, target, weight), expected)
    torch.testing.assert_close(loss(pred, target, weight.unsqueeze(-1)), expected)


@pytest.mark.parametrize("cfg", [
    dict(type="CrossEntropyLoss"), dict(type="CrossEntropyLoss", use_sigmoid=True),
    dict(type="FocalLoss"), dict(type="QualityFocalLoss"),
], ids=["softmax", "sigmoid", "focal", "qfl"])
def test_float_labels_rejected(cfg: dict) -> None:
    loss = build_loss(cfg)
    labels = torch.tensor([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="integer|floating"):
        if cfg["type"] == "QualityFocalLoss":
            loss(torch.randn(3, 4), (labels, torch.rand(3)))
        else:
            loss(torch.randn(3, 4), labels)


@pytest.mark.parametrize("convert", [np.asarray, torch.Tensor.tolist], ids=["numpy", "list"])
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_inputs_that_are_no_tensors_are_type_errors_naming_the_argument(name: str, convert: object) -> None:
    """A numpy array or a list in place of any tensor input, not an AttributeError from deep inside the loss."""
    cfg = representative_configs()[name]
    loss = build_loss(cfg)
    spec = spec_for(loss)
    inputs = spec.sample(loss, 3, seed=1, include=spec.names)
    # the forward argument each spec input is passed as, where the two names differ
    renamed = {"target": "label", "label": "weight"} if cfg["type"] == "CrossEntropyLoss" else {}
    kind = "numpy.ndarray" if convert is np.asarray else "list"
    for input_name in inputs:
        if input_name == "avg_factor":  # numbers and numpy values are avg_factors (test_reduction)
            continue
        changed = {**inputs, input_name: convert(inputs[input_name])}
        argument = renamed.get(input_name, input_name)
        with pytest.raises(TypeError, match=f"^{cfg['type']}: {argument} must be a torch.Tensor, got {kind} "):
            spec.call(loss, changed)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_inputs_that_are_no_tensors_are_refused_by_name_under_compile(fullgraph: bool) -> None:
    """Without fullgraph Dynamo runs the check eagerly and the TypeError comes out as it is; with fullgraph Dynamo
    reports it as the exception that ended the graph, our message included, or raises it as it is where an earlier
    call already left the forward to eager (before the check both failed with an AttributeError from fake tensors)."""
    compiled = torch.compile(build_loss(dict(type="L1Loss")), fullgraph=fullgraph, backend="eager")
    expected = "L1Loss: target must be a torch.Tensor, got numpy.ndarray"
    with pytest.raises((torch._dynamo.exc.Unsupported, TypeError) if fullgraph else TypeError, match=expected):
        compiled(torch.zeros(2, 4), np.zeros((2, 4), np.float32))


def _mmdetection_order_calls() -> list:
    """Functional losses called in MMDetection's positional order, ``(inputs, weight, reduction, avg_factor)``."""
    from visdet_export import losses as L

    box, logits, labels = boxes(3, dtype=torch.float32), torch.randn(3, 4), torch.tensor([0, 1, 4])
    bins = torch.randn(3, 68)  # LD: 4 sides x (reg_max + 1) bins
    return [
        pytest.param(L.sigmoid_focal_loss, (logits, labels), "gamma", id="focal"),
        pytest.param(L.quality_focal_loss, (logits, torch.rand(3, 4)), "beta", id="qfl"),
        pytest.param(L.quality_focal_loss_on_labels, (logits, labels, torch.rand(3)), "beta", id="qfl_labels"),
        pytest.param(L.smooth_l1_loss, (box, box), "beta", id="smooth_l1"),
        pytest.param(L.balanced_l1_loss, (box, box), "alpha", id="balanced_l1"),
        pytest.param(L.giou_loss, (box, box), "eps", id="giou"),
        pytest.param(L.knowledge_distillation_kl_div_loss, (logits, logits), "T", id="kd"),
        pytest.param(L.localization_distillation_loss, (bins, bins), "T", id="ld"),
        pytest.param(L.softmax_cross_entropy, (logits, labels.clamp(max=3)), "class_weight", id="ce"),
        pytest.param(L.binary_cross_entropy, (logits, labels), "class_weight", id="bce"),
    ]


@pytest.mark.parametrize(("function", "inputs", "first"), _mmdetection_order_calls())
def test_functional_losses_called_in_mmdetection_order_say_so(function, inputs: tuple, first: str) -> None:
    """MMDetection's functions take reduction and avg_factor fourth and fifth, ours after the hyper-parameters: a
    ported positional call names the hyper-parameter the reduction landed on instead of a bare TypeError."""
    with pytest.raises(TypeError, match=f"^{function.__name__} got {first}='mean': .* pass them by keyword$"):
        function(*inputs, None, "mean", torch.tensor(2.0))
    function(*inputs, None, reduction="mean", avg_factor=torch.tensor(2.0))  # the keyword form of the same call


def test_mask_cross_entropy_called_in_mmdetection_order_says_so() -> None:
    from visdet_export.losses import mask_cross_entropy

    pred, target, labels = torch.randn(2, 3, 4, 4), torch.rand(2, 4, 4), torch.tensor([0, 2])
    with pytest.raises(TypeError, match="^mask_cross_entropy got class_weight='sum'"):
        mask_cross_entropy(pred, target, labels, "sum")


def test_a_missing_pred_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="^L1Loss: pred must be a torch.Tensor, got NoneType$"):
        build_loss(dict(type="L1Loss"))(None, torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.bool])
@pytest.mark.parametrize("loss_type", ["FocalLoss", "QualityFocalLoss"])
def test_labels_of_an_index_dtype_only(loss_type: str, dtype: torch.dtype) -> None:
    """int64 and int32 labels index the classes; narrower integers get a message rather than gather's error."""
    loss = build_loss(dict(type=loss_type))
    pred, labels, scores = torch.randn(3, 4), torch.tensor([0, 1, 4]), torch.rand(3)

    def call(module: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
        return module(pred, (labels, scores)) if loss_type == "QualityFocalLoss" else module(pred, labels)

    with pytest.raises(ValueError, match=f"must be int64 \\(or int32\\), got {dtype}"):
        call(loss, labels.to(dtype))
    assert torch.equal(call(loss, labels.int()), call(loss, labels))


def test_float_mask_labels_rejected() -> None:
    with pytest.raises(ValueError, match="integer|floating"):
        build_loss(dict(type="CrossEntropyLoss", use_mask=True))(
            torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("name", ["IoULoss", "GIoULoss", "L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss"])
@pytest.mark.parametrize("which", ["target", "pred", "both"])
def test_int_boxes_rejected(name: str, which: str) -> None:
    pred, target = boxes(4, dtype=torch.float32), boxes(4, seed=1, dtype=torch.float32)
    if which in ("target", "both"):
        target = target.long()
    if which in ("pred", "both"):
        pred = pred.long()
    with pytest.raises(ValueError, match="floating"):
        build_loss(dict(type=name))(pred, target)



def _integer_valued(seed: int) -> dict[str, tuple[dict, torch.Tensor, object, object]]:
    """(config, pred, integer target, the same target as float32) of the losses that take real-valued targets."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (6,), generator=g)
    scores = torch.randint(0, 2, (6,), generator=g)
    distances = torch.randint(0, 16, (6,), generator=g)
    teacher = torch.randint(-3, 4, (6, 5), generator=g)
    return {
        "dfl": (dict(type="DistributionFocalLoss"), torch.randn(6, 17, generator=g), distances, distances.float()),
        "qfl": (dict(type="QualityFocalLoss"), torch.randn(6, 5, generator=g), (labels, scores),
                (labels, scores.float())),
        "kd": (dict(type="KnowledgeDistillationKLDivLoss", T=2.0), torch.randn(6, 5, generator=g), teacher,
               teacher.float()),
    }


@pytest.mark.parametrize("key", ["dfl", "qfl", "kd"])
def test_integer_real_valued_targets_are_cast(key: str) -> None:
    """README: integer DFL distances, QFL scores and KD teacher logits are cast to pred's dtype, eager and scripted
    alike (MMDetection's KD fails on them: softmax of an integer tensor)."""
    cfg, pred, integer, real = _integer_valued(7)[key]
    want = build_loss(cfg)(pred, real)
    for loss in (build_loss(cfg), script_loss(build_loss(cfg))):
        torch.testing.assert_close(loss(pred, integer), want, rtol=1e-6, atol=0.0)

# --- 8: reduction contract at the call -------------------------------------------------------------------------


@pytest.mark.parametrize("avg_factor", [4, 4.0, torch.tensor(4.0)], ids=["int", "float", "tensor"])
@pytest.mark.parametrize("how", ["configured", "override"])
def test_avg_factor_with_sum(how: str, avg_factor: object) -> None:
    loss = build_loss(dict(type="L1Loss", reduction="sum" if how == "configured" else "mean"))
    with pytest.raises(ValueError, match="avg_factor"):
        loss(torch.randn(4, 4), torch.randn(4, 4), None, avg_factor, None if how == "configured" else "sum")


@pytest.mark.parametrize("avg_factor", [True, "3", [3.0]], ids=["bool", "str", "list"])
def test_avg_factor_that_is_no_number(avg_factor: object) -> None:
    """``float()`` takes True and "3"; TorchScript refuses them by type, eager says so too."""
    with pytest.raises(ValueError, match="avg_factor must be a number or a one-element tensor"):
        build_loss(dict(type="L1Loss"))(torch.randn(4, 4), torch.randn(4, 4), None, avg_factor)


@pytest.mark.parametrize("override", [1, False], ids=["int", "bool"])
def test_reduction_override_that_is_no_string(override: object) -> None:
    with pytest.raises(ValueError, match=f"reduction_override={override} is not valid"):
        build_loss(dict(type="L1Loss"))(torch.randn(4, 4), torch.randn(4, 4), reduction_override=override)


@pytest.mark.parametrize("name", SEED_LOSS_NAMES)
@pytest.mark.parametrize("override", ["avg", "MEAN", "batchmean"])
def test_invalid_reduction_override(name: str, override: str) -> None:
    loss = build_loss(dict(type=name))
    with pytest.raises(ValueError, match="reduction_override") as info:
        if name in ("IoULoss", "GIoULoss"):
            loss(boxes(2), boxes(2), reduction_override=override)
        elif name == "DistributionFocalLoss":
            loss(torch.randn(2, 5), torch.rand(2), reduction_override=override)
        elif name in ("FocalLoss", "CrossEntropyLoss"):
            loss(torch.randn(2, 5), torch.tensor([0, 1]), reduction_override=override)
        elif name == "QualityFocalLoss":
            loss(torch.randn(2, 5), (torch.tensor([0, 1]), torch.rand(2)), reduction_override=override)
        else:
            loss(torch.randn(2, 4), torch.randn(2, 4), reduction_override=override)
    assert f"reduction_override='{override}' is not valid" in str(info.value)
    assert "'none'" in str(info.value) and "'sum'" in str(info.value)


# --- deprecated IoULoss(linear=True) and config round trips ------------------------------------------------------


def test_iou_linear_true_is_deprecated_and_linear() -> None:
    with pytest.warns(DeprecationWarning, match="linear") as record:
        legacy = build_loss(dict(type="IoULoss", linear=True))
    assert legacy.mode == "linear"
    assert [w.filename for w in record] == [__file__]  # the caller's line, through the registry
    pred, target = boxes(6, seed=1), boxes(6, seed=2)
    linear = build_loss(dict(type="IoULoss", mode="linear"))
    torch.testing.assert_close(legacy(pred, target), linear(pred, target), rtol=0, atol=0)
    assert not torch.allclose(legacy(pred, target), build_loss(dict(type="IoULoss"))(pred, target))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_loss(dict(type="IoULoss", linear=False))  # no warning when not asked for


EXTRA_CONFIGS = {
    "focal_full": dict(type="FocalLoss", gamma=1.5, alpha=-1, reduction="sum", loss_weight=0.5, activated=True),
    "ce_full": dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[1.0, 2.5], ignore_index=255,
                    avg_non_ignore=True, reduction="none", loss_weight=3.0),
    "ce_ignore_none": dict(type="CrossEntropyLoss", ignore_index=None),
    "dfl_reg_max": dict(type="DistributionFocalLoss", reg_max=7, loss_weight=0.25),
    "iou_linear_legacy": dict(type="IoULoss", linear=True, eps=1e-3),
    "balanced_full": dict(type="BalancedL1Loss", alpha=0.3, gamma=1.0, beta=0.8, reduction="sum"),
}


@pytest.mark.parametrize("cfg", [*representative_configs().values(), *EXTRA_CONFIGS.values()],
                         ids=[*representative_configs(), *EXTRA_CONFIGS])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_loss_config_round_trips(cfg: dict) -> None:
    loss = build_loss(cfg)
    rebuilt_cfg = loss_config(loss)
    rebuilt = build_loss(rebuilt_cfg)
    assert type(rebuilt) is type(loss)
    assert loss_config(rebuilt) == rebuilt_cfg
    for key, value in cfg.items():
        if key in ("type", "linear") or value is None:
            continue
        assert rebuilt_cfg[key] == value, key
    assert str(rebuilt) == str(loss)  # every hyper-parameter in extra_repr survives


# --- any configuration: a loss or a ConfigError, never another exception --------------------------------------------

_ANY_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-300, 300),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.sampled_from(["mean", "sum", "none", "log", "linear", "square"]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=90), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=100,
)
_PARAMETERS = sorted({name for cls in MODELS.module_dict.values() for name in config_parameters(cls)})


@given(
    st.one_of(st.sampled_from(sorted(MODELS.module_dict)), st.text(max_size=10), st.integers()),
    st.dictionaries(st.one_of(st.sampled_from(_PARAMETERS), st.text(max_size=5)), _ANY_VALUE, max_size=4),
)
def test_any_config_builds_or_raises_config_error(loss_type: object, options: dict) -> None:
    """Every parameter of every loss with any value (wrong types, NaN, nested containers, class-weight lists):
    build_loss returns a loss or raises ConfigError, never a TypeError or AttributeError from deep inside."""
    try:
        build_loss({"type": loss_type, **options})
    except ConfigError:
        pass


def test_the_registry_takes_mmengines_calling_conventions() -> None:
    """``@register_module("Name")`` names the class as MMEngine's registry does; ``MODELS[name]`` looks one up."""
    from visdet_export.registry import Registry

    registry = Registry("loss")

    @registry.register_module("Renamed")
    class Mine(torch.nn.Module):
        pass

    assert registry["Renamed"] is Mine and "Mine" not in registry
    with pytest.raises(ConfigError, match="unknown loss type 'Mine'"):
        registry["Mine"]


def test_api_misuse_says_what_to_write(tmp_path) -> None:
    """A first-time user's mistakes with the Python API: a string where a list of names goes, a compiled module,
    a QFL target tuple of the wrong length, a loss type where attach reads a graph path, no verification sizes."""
    from visdet_export.check import RunnerCache, check_cell, run_matrix
    from visdet_export.export import export_onnx, verify
    from visdet_export.export.attach import AttachError, attach_losses
    from visdet_export.integration import register_losses
    from visdet_export.registry import Registry
    from visdet_export.specs import spec_for

    with pytest.raises(ConfigError, match=r"optional_inputs takes a list of names, got the string 'weight'"):
        export_onnx("FocalLoss", tmp_path / "x.onnx", optional_inputs="weight")
    with pytest.raises(ConfigError, match="runtimes takes a list of names"):
        run_matrix(configs=["focal"], runtimes="eager")
    with pytest.raises(ConfigError, match="names takes a list of names"):
        register_losses(Registry("x"), names="FocalLoss")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        check_cell("giou", "tensorrt", RunnerCache())
    compiled = torch.compile(build_loss(dict(type="L1Loss")))
    assert spec_for(compiled).loss_type == "L1Loss"
    path = export_onnx(compiled, tmp_path / "l1.onnx", verify=False)
    with pytest.raises(ValueError, match="sizes must be sample counts >= 0"):
        verify(path, sizes=[-1])
    with pytest.raises(ValueError, match="dense targets or one tuple"):
        build_loss(dict(type="QualityFocalLoss"))(torch.randn(3, 4), (torch.tensor([0, 1, 4]),))
    with pytest.raises(AttachError, match=r"is a loss type, read here as a graph path; pass dict\(type='L1Loss'\)"):
        attach_losses(path, [("loss_l1", "L1Loss", {})], tmp_path / "out.onnx")
