"""Property-based tests: hypothesis draws fresh hyper-parameters, sizes, seeds and call options on every run.

The parity table (test_parity) and the runtime matrix (test_matrix) pin one draw of inputs per case and the
hyper-parameters of the seed's recipes. Here every loss's hyper-parameters range over their whole valid domain
(focal gamma in [0, 5] and alpha in [0, 1] or -1, QFL beta, SmoothL1 / BalancedL1 breakpoints, IoU eps and mode,
DFL reg_max, cross-entropy class weights, class counts and ignore index...), and each example checks:

* eager float64 against the independent reference (tests/reference.py), values and gradients, for every way of
  calling the loss (weight or none, avg_factor as None / number / 0-d tensor, configured or overridden reduction);
* eager float32 (the closed forms and their ``exp2`` fast paths) against the same float64 reference, within
  2e-6 plus what one float32 rounding of the inputs explains;
* float16 / bfloat16 inputs against float32 on the same values;
* NaN / inf planted in the predictions of weight-0 samples change neither the value nor any gradient;
* drawn configurations compiled (aot_eager), scripted and exported to ONNX, against eager;
* every runtime of the matrix against eager at fresh sizes and seeds, on the session's cached runners.

A failure prints the falsifying example and a ``@reproduce_failure`` blob. ``HYPOTHESIS_PROFILE=thorough`` runs
ten times as many examples (the profiles are in conftest.py).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import pytest
import torch
from conftest import CONFIG_NAMES, compile_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import (
    clone_inputs,
    grad_of,
    reference_loss,
    spec_inputs,
    strided,
)
from torch import Tensor

from visdet_export import build_loss
from visdet_export.check import RunnerCache, check_cell, runner_options
from visdet_export.specs import spec_for

F64 = torch.float64
F32 = torch.float32
REDUCTIONS = ("none", "mean", "sum")
# the runtime matrix's columns
RUNTIMES = ("compile", "script", "onnx", "pt2")

#: examples of the tests that compile or export per example, or run many runtimes: a fifth of the profile's
SLOW_EXAMPLES = max(1, settings().max_examples // 5)

# --- configurations over the valid hyper-parameter domain ------------------------------------------------------

unit = st.floats(0.0, 1.0)
loss_weights = st.one_of(st.just(1.0), st.floats(0.0, 4.0))
box_eps = st.one_of(st.sampled_from([1e-6, 1e-3, 1e-2]), st.floats(1e-9, 0.1))
class_weights = st.lists(st.one_of(st.just(0.0), st.floats(0.0, 3.0)), min_size=1, max_size=12)
ignore_indices = st.sampled_from([-100, -1, 0, 3, 255])


#: a loss family: the strategy of its configurations and the strategy of its input variant
Family = tuple[st.SearchStrategy, st.SearchStrategy]


def _focal() -> Family:
    return st.fixed_dictionaries(
        dict(
            type=st.just("FocalLoss"),
            gamma=st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), st.floats(0.0, 5.0)),
            alpha=st.one_of(st.just(-1.0), unit),
            activated=st.booleans(),
        )
    ), st.sampled_from(["labels", "onehot"])


def _qfl() -> Family:
    return st.fixed_dictionaries(
        dict(
            type=st.just("QualityFocalLoss"),
            beta=st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.0, 5.0)),
            activated=st.booleans(),
        )
    ), st.sampled_from(["pair", "dense"])


def _dfl() -> Family:
    reg_max = st.one_of(st.none(), st.integers(1, 16))
    return st.fixed_dictionaries(dict(type=st.just("DistributionFocalLoss"), reg_max=reg_max)), st.just(None)


def _cross_entropy(use_sigmoid: bool) -> Family:
    """Softmax, or sigmoid on class labels (C = background)."""
    return st.fixed_dictionaries(
        dict(
            type=st.just("CrossEntropyLoss"),
            use_sigmoid=st.just(use_sigmoid),
            class_weight=st.one_of(st.none(), class_weights),
            ignore_index=ignore_indices,
            avg_non_ignore=st.booleans(),
        )
    ), st.just("labels" if use_sigmoid else None)


def _mask_ce() -> Family:
    return st.fixed_dictionaries(
        dict(type=st.just("CrossEntropyLoss"), use_mask=st.just(True), class_weight=st.one_of(st.none(), class_weights))
    ), st.just(None)


def _regression() -> Family:
    positive = st.floats(0.05, 3.0)
    return st.one_of(
        st.fixed_dictionaries(dict(type=st.sampled_from(["L1Loss", "MSELoss"]))),
        st.fixed_dictionaries(dict(type=st.just("SmoothL1Loss"), beta=st.one_of(st.floats(1e-4, 5.0), st.just(1.0)))),
        st.fixed_dictionaries(dict(type=st.just("BalancedL1Loss"), alpha=positive, gamma=positive, beta=positive)),
    ), st.just(None)


def _boxes() -> Family:
    return st.one_of(
        st.fixed_dictionaries(
            dict(type=st.just("IoULoss"), mode=st.sampled_from(["linear", "square", "log"]), eps=box_eps)
        ),
        st.fixed_dictionaries(dict(type=st.just("GIoULoss"), eps=box_eps)),
    ), st.just(None)


def _distillation() -> Family:
    temperatures = st.one_of(st.sampled_from([1.0, 10.0]), st.floats(0.2, 30.0))
    return st.one_of(
        st.fixed_dictionaries(dict(type=st.just("KnowledgeDistillationKLDivLoss"), T=temperatures)),
        st.fixed_dictionaries(
            dict(type=st.just("LocalizationDistillationLoss"), T=temperatures, reg_max=st.integers(1, 16))
        ),
    ), st.just(None)


FAMILIES: tuple[Family, ...] = (
    _focal(), _qfl(), _dfl(), _cross_entropy(False), _cross_entropy(True), _mask_ce(), _regression(), _boxes(),
    _distillation(),
)


@st.composite
def configured_losses(draw: Any) -> tuple[dict, Optional[str]]:
    """``(config, input variant)`` for any registered loss, hyper-parameters anywhere in their domain."""
    configs, variants = draw(st.sampled_from(FAMILIES))
    cfg = dict(draw(configs))
    cfg.update(reduction=draw(st.sampled_from(REDUCTIONS)), loss_weight=draw(loss_weights))
    return cfg, draw(variants)


@st.composite
def calls(draw: Any) -> dict[str, Any]:
    """How the loss is called: sample count, seed, weight, avg_factor, reduction_override, labels outside the
    classes, extreme logits, non-contiguous inputs."""
    return dict(
        n=draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 40))),
        seed=draw(st.integers(0, 2**31 - 1)),
        weighted=draw(st.booleans()),
        avg=draw(st.sampled_from(["none", "number", "tensor"])),
        override=draw(st.one_of(st.none(), st.sampled_from(REDUCTIONS))),
        odd_labels=draw(st.booleans()),
        logit_range=draw(st.one_of(st.none(), st.sampled_from([30.0, 120.0]))),
        strided=draw(st.booleans()),
    )


def _odd_labels(labels: Tensor, num_classes: int, seed: int) -> Tensor:
    """About a fifth of the labels moved outside [0, C): background, out-of-range or negative values."""
    g = torch.Generator().manual_seed(seed)
    odd = torch.tensor([-1, -100, num_classes, num_classes + 3, 255])
    pick = odd[torch.randint(0, odd.numel(), labels.shape, generator=g)]
    return torch.where(torch.rand(labels.shape, generator=g) < 0.2, pick, labels)


def _build(cfg: dict) -> torch.nn.Module:
    """The loss; a combination the build rightly refuses (tested in test_config_errors) is no example."""
    assume(not (cfg["type"] == "BalancedL1Loss" and cfg["gamma"] / cfg["alpha"] > 80))
    return build_loss(cfg)


def _inputs(cfg: dict, variant: Optional[str], call: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    inputs = spec_inputs(cfg, call["n"], call["seed"], variant=variant, dtype=dtype, logit_range=call["logit_range"])
    labelled = cfg["type"] in ("FocalLoss", "CrossEntropyLoss") and not cfg.get("use_mask", False)
    if call["odd_labels"] and labelled and variant != "onehot":
        inputs["target"] = _odd_labels(inputs["target"], inputs["pred"].size(1), call["seed"] + 1)
    return {key: _laid_out(value, call) for key, value in inputs.items()}


def _laid_out(value: Any, call: dict[str, Any]) -> Any:
    """``value`` in the call's memory layout (ATen may round 1 ulp differently on strided data: vector vs scalar
    loops, so inputs compared bit for bit share one layout)."""
    return strided(value) if call["strided"] else value


def _arguments(cfg: dict, inputs: dict[str, Any], call: dict[str, Any]) -> tuple:
    """``(weight, avg_factor)`` as ``forward`` takes them (in mask mode the third argument is the RoI labels)."""
    weight = inputs["weight"] if (call["weighted"] or cfg.get("use_mask", False)) else None
    factor = inputs["avg_factor"]
    avg_factor = {"none": None, "number": float(factor), "tensor": factor}[call["avg"]]
    return weight, avg_factor


def _rejects_sum_with_avg_factor(loss: torch.nn.Module, cfg: dict, inputs: dict, call: dict) -> bool:
    """visdet refuses ``avg_factor`` with reduction "sum"; True (after checking that) when the call is one."""
    weight, avg_factor = _arguments(cfg, inputs, call)
    if (call["override"] or cfg["reduction"]) != "sum" or avg_factor is None:
        return False
    with pytest.raises(ValueError, match="avg_factor"):
        loss(inputs["pred"], inputs["target"], weight, avg_factor, call["override"])
    return True


def _prepared(configured: tuple[dict, Optional[str]], call: dict, dtype: torch.dtype) -> Optional[tuple]:
    """``(cfg, loss, inputs)`` for an example, or None once it is a call visdet refuses (checked on the way)."""
    cfg, variant = configured
    loss = _build(cfg)
    inputs = _inputs(cfg, variant, call, dtype)
    if _rejects_sum_with_avg_factor(loss, cfg, inputs, call):
        return None
    return cfg, loss, inputs


def _value_and_grad(loss: Any, cfg: dict, inputs: dict, call: dict, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    weight, avg_factor = _arguments(cfg, inputs, call)
    pred = inputs["pred"].detach().to(dtype).requires_grad_()
    out = loss(pred, inputs["target"], weight, avg_factor, call["override"])
    upstream = torch.rand(out.shape, generator=torch.Generator().manual_seed(call["seed"]), dtype=F64) + 0.5
    return out, grad_of(out, pred, upstream.to(out.dtype))


def _reference(cfg: dict, inputs: dict, call: dict) -> tuple[Tensor, Tensor]:
    def reference(pred: Tensor, target: Any, weight: Any, avg_factor: Any, override: Optional[str]) -> Tensor:
        out = reference_loss(cfg, pred, target, weight, avg_factor, override)
        # where no sample counts (N = 0, all ignored) the reference's index writes leave its output outside the graph
        return out if out.requires_grad else out + 0.0 * pred.sum()

    return _value_and_grad(reference, cfg, inputs, call, F64)


def _assert_matches_reference(got: Tensor, want: Tensor, rtol: float, atol: Union[float, Tensor]) -> None:
    """``got`` is finite, and within ``atol + rtol |want|`` (``atol`` a number or per element) of ``want`` wherever
    that is finite. The reference differentiates by autograd, which makes 0 x inf = NaN at exactly saturated
    probabilities (the slope of ``p ** beta`` at p = 0 for beta < 1, where the loss is flat); those elements are
    checked as finite here and by value in test_edge_cases."""
    assert torch.isfinite(got).all(), got
    finite = torch.isfinite(want)
    error = (got.detach() - want.detach().to(got.dtype)).abs().where(finite, 0.0)
    allowed = atol + rtol * want.detach().abs().where(finite, 0.0)
    worst = int((error - allowed).flatten().argmax()) if error.numel() else 0
    within = bool((error <= allowed).all())
    assert within, (
        f"{int((error > allowed).sum())} of {error.numel()} elements differ; worst at flat index {worst}: "
        f"got {float(got.flatten()[worst])!r}, want {float(want.flatten()[worst])!r}, "
        f"allowed {float(allowed.flatten()[worst]):.3g}"
    )


#: (rtol, atol per unit of the result's magnitude) of eager in each dtype against the float64 reference
REFERENCE_TOLERANCE = {F64: (1e-9, 1e-12), F32: (2e-6, 1e-7)}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(configured=configured_losses(), call=calls())
def test_eager_matches_the_reference_for_any_hyperparameters(dtype, configured, call):
    """Values and gradients against the float64 reference: float64 to 1e-9; float32 (the closed forms, ``exp2``
    for ``exp``, the stable softplus) against float64 math on the same float32 inputs, within a few units of
    float32 rounding of the result's scale plus what one float32 rounding of the inputs moves the result by."""
    prepared = _prepared(configured, call, dtype)
    if prepared is None:
        return
    cfg, loss, inputs = prepared
    out, grad = _value_and_grad(loss, cfg, inputs, call, dtype)
    want, want_grad = _reference(cfg, inputs, call)
    assert out.dtype == dtype and out.shape == want.shape
    rtol, atol = REFERENCE_TOLERANCE[dtype]
    if dtype == F64:
        for got, expected in ((out, want), (grad, want_grad)):
            _assert_matches_reference(got, expected, rtol=rtol, atol=atol * _magnitude(expected))
        return
    moved = _moved_by_input_rounding(cfg, inputs, call, want, want_grad)
    amplification = _float32_amplification(cfg)
    for got, expected, sensitivity in ((out, want, moved[0]), (grad, want_grad, moved[1])):
        slack = 4.0 * sensitivity + atol * amplification * _magnitude(expected)
        _assert_matches_reference(got.double(), expected, rtol=rtol, atol=slack)


def _moved_by_input_rounding(
    cfg: dict, inputs: dict, call: dict, want: Tensor, want_grad: Tensor
) -> tuple[Tensor, Tensor]:
    """How far the reference's value ``want`` and gradient ``want_grad`` move, element by element (the larger of
    two tries), when the floating inputs move by one float32 rounding (relative 2^-24, a random half of the
    elements): the error a float32 result owes to its inputs' precision alone. Large where the loss is
    ill-conditioned, e.g. QFL's gradient ``|sigmoid(x) - score| ** (beta - 1)`` for beta < 1 next to the score."""
    generator = torch.Generator().manual_seed(call["seed"] + 2)

    def nudged(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(nudged(item) for item in value)
        if not (isinstance(value, Tensor) and value.is_floating_point()):
            return value
        # towards 0 only, so probabilities, scores and DFL distances stay in their ranges
        moved = torch.randint(0, 2, value.shape, generator=generator, dtype=F64)
        return value.double() * (1.0 - moved * 2.0**-24)

    moved_value, moved_grad = torch.zeros_like(want), torch.zeros_like(want_grad)
    for _ in range(2):
        value, grad = _reference(cfg, {key: nudged(item) for key, item in inputs.items()}, call)
        moved_value = torch.maximum(moved_value, (value - want).abs().nan_to_num(0.0))
        moved_grad = torch.maximum(moved_grad, (grad - want_grad).abs().nan_to_num(0.0))
    return moved_value.detach(), moved_grad.detach()


def _float32_amplification(cfg: dict) -> float:
    """How much a loss's formula magnifies float32 rounding beyond its result's scale.

    ``loss_weight`` and the class weights multiply per-element terms after they are rounded at their own scale,
    ~1 however small the term: softmax CE's loss of a confident correct row is ``log(S)`` with S = 1 + e rounded
    to float32, so it keeps an absolute error of ~6e-8 times the label's class weight (``F.cross_entropy``,
    which MMDetection calls, gives the same value bit for bit). The distillation losses' KL divergence subtracts
    two log-softmaxes of magnitude ~log C and scales the difference by T^2 (MMDetection's ``kl_div`` expression
    alike): T = 10 turns 1e-7 rounding into ~1e-5."""
    amplification = max(float(cfg.get("loss_weight", 1.0)) * max(cfg.get("class_weight") or [1.0]), 1.0)
    if cfg["type"] in ("KnowledgeDistillationKLDivLoss", "LocalizationDistillationLoss"):
        amplification *= 5.0 * max(float(cfg["T"]) ** 2, 1.0)
    return amplification


def _magnitude(values: Tensor) -> float:
    """The largest finite |value|, at least 1: the scale of float rounding in sums of these values."""
    finite = values.detach()[torch.isfinite(values)]
    return max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(configured_losses(), calls(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_inputs_compute_in_float32(configured, call, dtype):
    """float16 / bfloat16 inputs give the float32 loss of the same (rounded) values, and its gradient rounded to
    the input's dtype: the losses compute in float32, so nothing overflows (box areas, exp of large logits)."""
    prepared = _prepared(configured, call, dtype)
    if prepared is None:
        return
    cfg, loss, inputs = prepared
    upcast = clone_inputs(inputs, F32)
    out, grad = _value_and_grad(loss, cfg, inputs, call, dtype)
    want, want_grad = _value_and_grad(loss, cfg, upcast, call, F32)
    assert out.dtype == F32 and grad.dtype == dtype
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7 * _magnitude(want))
    torch.testing.assert_close(grad, want_grad.to(dtype), rtol=1e-2, atol=1e-5)


def _weight_zero_elements(weight: Tensor, pred: Tensor) -> Tensor:
    """Where ``pred`` carries weight 0: a per-sample weight (N,) masks whole rows, one of pred's shape elements."""
    zero = weight == 0
    return zero if zero.shape == pred.shape else zero.view(-1, *([1] * (pred.dim() - 1))).expand_as(pred)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(configured_losses(), calls(), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nan_and_inf_where_the_weight_is_zero_change_nothing(configured, call, poison):
    assume(not configured[0].get("use_mask", False))  # mask mode takes no weight
    call = {**call, "weighted": True}
    prepared = _prepared(configured, call, F64)
    if prepared is None:
        return
    cfg, loss, inputs = prepared
    masked = _weight_zero_elements(inputs["weight"], inputs["pred"])
    poisoned = {**inputs, "pred": _laid_out(inputs["pred"].masked_fill(masked, poison), call)}
    out, grad = _value_and_grad(loss, cfg, poisoned, call, F64)
    clean, clean_grad = _value_and_grad(loss, cfg, inputs, call, F64)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)
    assert (grad[masked] == 0).all()


#: The range each free size is drawn from: classes, DFL bins (reg_max >= 1), mask sides, regression values.
FREE_SIZE_RANGES = {"C": (1, 100), "B": (2, 24), "H": (1, 32), "W": (1, 32), "D": (1, 8)}


@settings(max_examples=SLOW_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(CONFIG_NAMES),
    st.sampled_from(RUNTIMES),
    st.lists(st.integers(0, 300), min_size=1, max_size=3),
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_runtimes_match_eager_at_fresh_sizes_and_seeds(runner_cache, name, runtime, sizes, seed, data):
    """The runtime matrix's cells (the same cached runners, compiled or exported once per session) at sample
    counts and seeds drawn anew: dynamic shapes and every input draw, not only N in {0, 1, 7, 1000} at seed 0.
    A compiled loss keeps its one graph through every N drawn, 0 and 1 included. Scripted code and the exported
    graphs also get class / bin / mask sizes drawn anew (a compiled graph recompiles for those, by design)."""
    key, options = runner_options(name, runtime, backend=compile_backend(name))
    free = None
    if runtime != "compile":
        symbols = sorted(runner_cache.loss(name)[1].sizes)
        free = {symbol: data.draw(st.integers(*FREE_SIZE_RANGES[symbol]), label=symbol) for symbol in symbols}
    cell = check_cell(
        name, runtime, runner_cache, sizes, seed=seed, runner_key=key, runner_options=options, free_sizes=free
    )
    assert cell.status == "pass", cell.reason
    if runtime == "compile":
        assert runner_cache.runner(name, runtime, key=key, **options).graph_count() == 1


@settings(max_examples=SLOW_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(
    configured_losses(),
    st.sampled_from(["compile", "script", "onnx", "onnx joint"]),
    st.lists(st.integers(0, 300), min_size=1, max_size=3),
    st.integers(0, 2**31 - 1),
)
def test_any_configuration_runs_in_every_runtime(configured, runtime, sizes, seed):
    """A drawn configuration (not one of the matrix's rows) compiled (aot_eager: the dynamo graph and the joint
    forward-backward, without code generation), scripted, or exported to ONNX with or without its gradient output,
    against eager: the branches that configuration takes in ``__init__`` (integer exponents, alpha -1, class
    counts, modes) in each runtime."""
    cfg, variant = configured
    if runtime == "compile":
        assume(not _tiny_exponent(cfg))
    loss = _build(cfg)
    name = "drawn"
    cache = RunnerCache()
    cache.losses[name] = (loss, spec_for(loss, variant))
    runtime, _, joint = runtime.partition(" ")
    # "onnx joint": the loss-and-gradient graph of distillation, its gradient output against eager's
    key, options = runner_options(name, runtime, backend="aot_eager", onnx="joint" if joint else "loss")
    cell = check_cell(name, runtime, cache, sizes, seed=seed, runner_key=key, runner_options=options)
    assert cell.status == "pass", f"{cfg} ({variant}, {runtime} {joint}): {cell.reason}"


def _tiny_exponent(cfg: dict) -> bool:
    """A focal ``gamma`` or QFL ``beta`` in (0, 1e-15): torch 2.13's compiler turns ``gamma - 1`` into the
    constant -1 (exact in float64) and then fails its own check that gamma is 0 (README, Compiled training steps)."""
    exponent = cfg.get("gamma") if cfg["type"] == "FocalLoss" else cfg.get("beta")
    return cfg["type"] in ("FocalLoss", "QualityFocalLoss") and 0.0 < float(exponent) < 1e-15
