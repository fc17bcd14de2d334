"""Runtime numerics in eager mode: RELIABILITY.md items 10-29; for configurations that are no row of the runtime
matrix (focal gamma 0 / alpha -1, tiny breakpoints) in the other runtimes too.

F = finite value and gradient, P = equals the float64 reference (``tests/reference.py``).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_all_close, compile_privately
from reference import (
    FLOAT32_EPS,
    boxes,
    dfl_elementwise,
    grad_of,
    reference_loss,
    spec_inputs,
)
from torch import Tensor

from visdet_export import build_loss
from visdet_export.check import TOLERANCES, compare_with_eager
from visdet_export.export.torchscript import quiet_jit, script_loss
from visdet_export.numerics import bce_with_probabilities
from visdet_export.registry import loss_config, state_difference
from visdet_export.runtimes import LossRunner, build_runner
from visdet_export.specs import representative_configs, spec_for

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)

# (config, spec variant) for every loss and input layout.
CONFIGS: dict[str, tuple[dict, Optional[str]]] = {
    "focal_labels": (dict(type="FocalLoss"), "labels"),
    "focal_onehot": (dict(type="FocalLoss"), "onehot"),
    "focal_activated": (dict(type="FocalLoss", activated=True), "labels"),
    "qfl_pair": (dict(type="QualityFocalLoss"), "pair"),
    "qfl_dense": (dict(type="QualityFocalLoss"), "dense"),
    "qfl_activated": (dict(type="QualityFocalLoss", activated=True), "pair"),
    "dfl": (dict(type="DistributionFocalLoss", reg_max=16), None),
    "ce_softmax": (dict(type="CrossEntropyLoss"), None),
    "ce_softmax_cw_avg_non_ignore": (
        dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0] * 40, avg_non_ignore=True), None),
    "ce_softmax_probabilities": (
        dict(type="CrossEntropyLoss", class_weight=[0.5, 1.5] * 40, avg_non_ignore=True), "probabilities"),
    "ce_sigmoid_binary": (dict(type="CrossEntropyLoss", use_sigmoid=True), "binary"),
    "ce_sigmoid_labels": (dict(type="CrossEntropyLoss", use_sigmoid=True, avg_non_ignore=True), "labels"),
    "ce_sigmoid_pos_weight": (dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[0.5, 2.0] * 40), "labels"),
    "ce_mask": (dict(type="CrossEntropyLoss", use_mask=True), None),
    "l1": (dict(type="L1Loss"), None),
    "smooth_l1": (dict(type="SmoothL1Loss"), None),
    "mse": (dict(type="MSELoss"), None),
    "balanced_l1": (dict(type="BalancedL1Loss"), None),
    "iou_log": (dict(type="IoULoss", mode="log"), None),
    "iou_linear": (dict(type="IoULoss", mode="linear"), None),
    "iou_square": (dict(type="IoULoss", mode="square"), None),
    "giou": (dict(type="GIoULoss"), None),
}
WEIGHTED = [k for k in CONFIGS if k != "ce_mask"]  # mask mode's third argument is the RoI labels
LOGIT_CONFIGS = ["focal_labels", "focal_onehot", "qfl_pair", "qfl_dense", "dfl", "ce_softmax",
                 "ce_softmax_cw_avg_non_ignore", "ce_softmax_probabilities", "ce_sigmoid_binary", "ce_sigmoid_labels",
                 "ce_sigmoid_pos_weight", "ce_mask"]
BOX_CONFIGS = ["iou_log", "iou_linear", "iou_square", "giou"]
REDUCTIONS = ["none", "mean", "sum"]


_SCRIPTED: dict[str, torch.nn.Module] = {}


def build_in(runtime: str, cfg: dict) -> torch.nn.Module:
    """The loss of ``cfg`` eager, compiled (fullgraph, dynamic, aot_eager, with graphs of its own: a test's graphs
    per reduction stay under the recompile limit) or scripted (TorchScript runs its own formulation: fused ATen
    activations, see ``numerics.softplus``); scripted modules are shared across tests."""
    if runtime == "eager":
        return build_loss(cfg)
    if runtime == "compile":
        return compile_privately(build_loss(cfg), fullgraph=True, dynamic=True, backend="aot_eager")
    key = repr(sorted(cfg.items()))
    if key not in _SCRIPTED:
        _SCRIPTED[key] = script_loss(build_loss(cfg))
    return _SCRIPTED[key]


def draw(key: str, n: int, seed: int = 0, **kwargs) -> dict:
    cfg, variant = CONFIGS[key]
    return spec_inputs(cfg, n, seed, variant=variant, **kwargs)


def assert_finite(t: Tensor, what: str = "") -> None:
    assert torch.isfinite(t).all(), f"{what} not finite: {t}"


def run(loss: torch.nn.Module, inputs: dict, reduction: Optional[str] = None, avg_factor=None,
        weight: object = "default") -> tuple[Tensor, Tensor, Tensor]:
    """(output, d(output * 2)/d(pred), pred) for one call."""
    pred = inputs["pred"].clone().requires_grad_()
    w = inputs["weight"] if weight == "default" else weight
    out = loss(pred, inputs["target"], w, avg_factor, reduction)
    return out, grad_of(out, pred), pred


# --- 10: N = 0 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("key", list(CONFIGS))
def test_empty_inputs(key: str, reduction: str) -> None:
    inputs = draw(key, 0)
    loss = build_loss({**CONFIGS[key][0], "reduction": reduction})
    for avg in (None, inputs["avg_factor"]) if reduction != "sum" else (None,):
        pred = inputs["pred"].clone().requires_grad_()
        out = loss(pred, inputs["target"], inputs["weight"], avg)
        assert out.requires_grad
        if reduction == "none":
            assert out.numel() == 0 and out.shape[0] == 0
        else:
            assert out.shape == () and float(out.detach()) == 0.0
        # the graph reaches pred: backward populates .grad (empty, so trivially finite)
        (out * 2.0).sum().backward()
        assert pred.grad is not None and pred.grad.shape == pred.shape
        assert torch.isfinite(pred.grad).all()


# --- 11: no positives anywhere -----------------------------------------------------------------------------------


def test_no_positives_total_is_finite() -> None:
    """An image without objects: all labels background, no box or DFL samples (all box weights 0)."""
    n, c = 16, 80
    logits = torch.randn(n, c, dtype=F64, requires_grad=True)
    background = torch.full((n,), c)
    bbox_pred = torch.full((n, 4), float("nan"), dtype=F64, requires_grad=True)  # garbage at negatives
    dfl_pred = torch.randn(n * 4, 17, dtype=F64, requires_grad=True)
    zeros = torch.zeros(n, dtype=F64)
    total = (
        build_loss(dict(type="FocalLoss"))(logits, background, avg_factor=0)
        + build_loss(dict(type="QualityFocalLoss"))(logits, (background, torch.zeros(n, dtype=F64)), avg_factor=0)
        + build_loss(dict(type="CrossEntropyLoss", use_sigmoid=True))(logits, background)
        + build_loss(dict(type="GIoULoss", loss_weight=2.0))(bbox_pred, boxes(n), zeros, avg_factor=0)
        + build_loss(dict(type="DistributionFocalLoss", loss_weight=0.25))(
            dfl_pred, torch.rand(n * 4, dtype=F64) * 16, zeros.repeat(4), avg_factor=0)
    )
    total.backward()
    assert_finite(total, "total")
    for t in (logits, bbox_pred, dfl_pred):
        assert_finite(t.grad, "grad")
    assert (bbox_pred.grad == 0).all() and (dfl_pred.grad == 0).all()
    # the classification part is the reference's all-background loss
    expected = reference_loss(dict(type="FocalLoss"), logits.detach(), background, avg_factor=0)
    focal = build_loss(dict(type="FocalLoss"))(logits.detach(), background, avg_factor=0)
    torch.testing.assert_close(focal, expected, **TOL)


# --- 12/13: ignored labels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("class_weight", [None, [0.5, 2.0, 1.0, 3.0, 1.5]], ids=["no_cw", "cw"])
@pytest.mark.parametrize("avg_non_ignore", [False, True], ids=["avg_all", "avg_non_ignore"])
@pytest.mark.parametrize("use_sigmoid", [False, True], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_labels_ignored(use_sigmoid: bool, avg_non_ignore: bool, class_weight, reduction: str) -> None:
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=use_sigmoid, avg_non_ignore=avg_non_ignore,
               class_weight=class_weight, reduction=reduction)
    loss = build_loss(cfg)
    pred = torch.randn(6, 5, dtype=F64, requires_grad=True)
    labels = torch.full((6,), -100)
    out = loss(pred, labels)
    (grad,) = torch.autograd.grad(out.sum(), pred)
    assert_finite(out)
    assert (out == 0).all()
    assert out.shape == (() if reduction != "none" else ((6, 5) if use_sigmoid else (6,)))
    assert (grad == 0).all()


@pytest.mark.parametrize("ignore_index", [-1, -100, 0, 5, 7, 255])
@pytest.mark.parametrize("avg_non_ignore", [False, True], ids=["avg_all", "avg_non_ignore"])
@pytest.mark.parametrize("use_sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_ignore_index_values(use_sigmoid: bool, avg_non_ignore: bool, ignore_index: int) -> None:
    """ignore_index -1, -100, a class (0) and >= C (C = 5) against the reference, values and gradients."""
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=use_sigmoid, avg_non_ignore=avg_non_ignore,
               ignore_index=ignore_index, class_weight=[0.5, 2.0, 1.0, 3.0, 1.5])
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(12, 5, generator=g, dtype=F64)
    labels = torch.randint(0, 5, (12,), generator=g)
    labels[:6] = torch.tensor([ignore_index, ignore_index, -1, -100, 5, 7])
    weight = torch.rand(12, generator=g, dtype=F64)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    out = build_loss(cfg)(p1, labels, weight)
    expected = reference_loss(cfg, p2, labels, weight)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(grad_of(out, p1), grad_of(expected, p2), **TOL)


@pytest.mark.parametrize("with_grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("mode", ["softmax", "sigmoid_labels", "sigmoid_targets", "mask"])
def test_class_weight_follows_pred_device(mode: str, with_grad: bool) -> None:
    """A loss module left on the CPU (built outside a model that was moved) computes on pred's device, as visdet's
    ``pred.new_tensor(class_weight)`` does. The meta device stands in for a GPU: CI has none."""
    loss = build_loss(dict(type="CrossEntropyLoss", use_sigmoid=mode.startswith("sigmoid"), use_mask=mode == "mask",
                           class_weight=[0.5, 2.0, 1.0]))
    labels = torch.tensor([0, 2, 1, 3], device="meta")
    if mode == "mask":
        pred = torch.randn(4, 3, 7, 7, device="meta", requires_grad=with_grad)
        out = loss(pred, torch.rand(4, 7, 7, device="meta"), labels.clamp(max=2))
    else:
        pred = torch.randn(4, 3, device="meta", requires_grad=with_grad)
        out = loss(pred, torch.rand(4, 3, device="meta") if mode == "sigmoid_targets" else labels)
    assert loss.class_weight.device.type == "cpu"
    assert out.device.type == "meta" and out.shape == ()
    if with_grad:
        (grad,) = torch.autograd.grad(out, pred)
        assert grad.device.type == "meta" and grad.shape == pred.shape


@pytest.mark.parametrize("key", list(CONFIGS))
def test_every_loss_computes_on_pred_device(key: str) -> None:
    """Eager forward and backward on the meta device (a stand-in for a GPU) with the module on the CPU: no constant
    or buffer stays behind on the CPU."""
    def to_meta(value):
        return tuple(map(to_meta, value)) if isinstance(value, tuple) else value.to("meta")

    inputs = {name: to_meta(value) for name, value in draw(key, 8).items()}
    loss = build_loss(CONFIGS[key][0])
    out, grad, pred = run(loss, inputs, avg_factor=inputs["avg_factor"])
    assert out.device.type == "meta" and out.shape == ()
    assert grad.device.type == "meta" and grad.shape == pred.shape


# --- 14: avg_factor extremes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0, 0.0, 1e-30, 1e-7, 1e30], ids=["int0", "float0", "tiny", "eps", "huge"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
@pytest.mark.parametrize("key", ["focal_labels", "qfl_pair", "ce_softmax", "l1", "giou", "dfl", "ce_mask"])
def test_avg_factor_extremes(key: str, factor: float, as_tensor: bool) -> None:
    inputs = draw(key, 3 if key == "ce_mask" else 8)
    avg = torch.tensor(factor, dtype=F64) if as_tensor else factor
    out, grad, _ = run(build_loss(CONFIGS[key][0]), inputs, avg_factor=avg)
    assert_finite(out)
    assert_finite(grad)
    expected = reference_loss(CONFIGS[key][0], inputs["pred"], inputs["target"], inputs["weight"], avg)
    torch.testing.assert_close(out, expected, **TOL)
    total = reference_loss({**CONFIGS[key][0], "reduction": "sum"}, inputs["pred"], inputs["target"], inputs["weight"])
    torch.testing.assert_close(out, total / (float(factor) + FLOAT32_EPS), **TOL)  # visdet's eps rule


# --- 16: extreme logits --------------------------------------------------------------------------------------------


def _saturate(inputs: dict, value: float) -> dict:
    pred = inputs["pred"]
    signs = torch.where(torch.arange(pred.numel()).reshape(pred.shape) % 2 == 0, 1.0, -1.0).to(pred.dtype)
    return {**inputs, "pred": signs * value}


@pytest.mark.parametrize("runtime", ["eager", "script"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("logits", ["pm20", "pm120", "uniform200"])
@pytest.mark.parametrize("key", LOGIT_CONFIGS)
def test_extreme_logits(key: str, logits: str, dtype: torch.dtype, runtime: str) -> None:
    n = 2 if key == "ce_mask" else 16
    if logits == "uniform200":
        inputs = draw(key, n, seed=1, dtype=dtype, logit_range=200.0)
    else:
        inputs = _saturate(draw(key, n, seed=1, dtype=dtype), 20.0 if logits == "pm20" else 120.0)
    for reduction in ("none", "mean"):
        loss = build_in(runtime, {**CONFIGS[key][0], "reduction": reduction})
        out, grad, _ = run(loss, inputs)
        assert_finite(out, "loss")
        assert_finite(grad, "grad")
        assert out.dtype == dtype
        ref_pred = inputs["pred"].double().requires_grad_()
        expected = reference_loss(CONFIGS[key][0] | {"reduction": reduction}, ref_pred, inputs["target"],
                                  inputs["weight"])
        tol = TOL if dtype == F64 else dict(rtol=1e-5, atol=1e-5 * float(expected.detach().abs().max()) + 1e-6)
        torch.testing.assert_close(out.double(), expected, **tol)
        if dtype == F64:
            torch.testing.assert_close(grad, grad_of(expected, ref_pred), **TOL)


@pytest.mark.parametrize("key", ["focal_labels", "focal_onehot", "qfl_pair", "qfl_dense", "ce_sigmoid_binary",
                                 "ce_sigmoid_labels", "ce_sigmoid_pos_weight"])
def test_scripted_double_backward(key: str) -> None:
    """Scripted losses differentiate their formulation twice as eager autograd does (Hessian-vector products
    match): the fused activations TorchScript runs keep exact autodiff, no closed form attached by a surrogate."""
    inputs = draw(key, 12, seed=3)
    results = []
    for runtime in ("eager", "script"):
        loss = build_in(runtime, CONFIGS[key][0])
        for _ in range(3):  # TorchScript's profiling executor settles on its optimised graph after its first calls
            pred = inputs["pred"].clone().requires_grad_()
            out = loss(pred, inputs["target"], inputs["weight"], None, None)
            (grad,) = torch.autograd.grad(out, pred, create_graph=True)
            (hvp,) = torch.autograd.grad(grad.sum(), pred)
        results.append((out.detach(), grad.detach(), hvp))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)
    assert results[0][2].abs().max() > 0


# --- 17: half precision ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_half_precision_computes_in_float32(key: str, dtype: torch.dtype) -> None:
    n = 2 if key == "ce_mask" else 16
    inputs = draw(key, n, seed=2, dtype=dtype)
    if key in LOGIT_CONFIGS:
        inputs = _saturate(inputs, 14.0)  # |logit| >= 12: exp overflows float16 on the textbook path
    if key in BOX_CONFIGS:
        target = boxes(n, seed=2, scale=10000.0) + 300.0  # sides up to 5000 px: areas far above fp16's max
        inputs = {**inputs, "target": target.to(dtype), "pred": (target * 1.01).to(dtype)}
    out, grad, pred = run(build_loss(CONFIGS[key][0]), inputs, avg_factor=inputs["avg_factor"])
    assert out.dtype == torch.float32
    assert grad.dtype == dtype
    assert_finite(out, "loss")
    assert_finite(grad.float(), "grad")
    # the same (rounded) inputs in float64 through the reference
    expected = reference_loss(CONFIGS[key][0], inputs["pred"].double(), _upcast(inputs["target"]),
                              _upcast(inputs["weight"]), inputs["avg_factor"].double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=1e-6)


def _upcast(value):
    if isinstance(value, tuple):
        return tuple(_upcast(v) for v in value)
    return value.double() if value is not None and value.is_floating_point() else value


def test_float64_in_float64_out() -> None:
    for key in CONFIGS:
        inputs = draw(key, 2)
        for reduction in REDUCTIONS:
            out, grad, _ = run(build_loss({**CONFIGS[key][0], "reduction": reduction}), inputs)
            assert out.dtype == F64 and grad.dtype == F64, (key, reduction)


def test_no_loss_holds_float64_state() -> None:
    """Every module moves to a device without float64 (Apple's MPS): buffers and parameters are float32 at most."""
    for cfg in representative_configs().values():
        loss = build_loss(cfg)
        for name, tensor in [*loss.named_buffers(), *loss.named_parameters()]:
            assert tensor.dtype != F64, (cfg, name)


def test_class_weights_in_float32_buffers_restore_the_configured_values() -> None:
    """float64 losses and ``loss_config`` (the manifests' config) get back exactly the configured class weights."""
    weights = [0.1, 1 / 3, 0.7, 2.2, 1e-20, 123456.789, 3e38, 0.0]
    loss = build_loss(dict(type="CrossEntropyLoss", class_weight=weights))
    assert loss_config(loss)["class_weight"] == weights
    for module in (loss, script_loss(loss)):
        assert module.class_weight_for(torch.zeros(1, dtype=F64)).tolist() == weights
        assert torch.equal(module.class_weight_for(torch.zeros(1)), torch.tensor(weights, dtype=torch.float32))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "float"])
def test_class_weights_survive_a_models_dtype_cast(cast: str) -> None:
    """``model.half()`` casts every buffer: the loss keeps its configured class weights (and computes in float32
    for half inputs), its repr shows them, and an export records them."""
    weights = [0.1, 1 / 3, 3.3]
    loss = build_loss(dict(type="CrossEntropyLoss", class_weight=weights))
    pred, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    cast_loss = getattr(copy.deepcopy(loss), cast)()
    assert torch.equal(cast_loss(pred, labels), loss(pred, labels))
    assert loss_config(cast_loss)["class_weight"] == weights
    assert "class_weight=[0.1, 0.333333, 3.3]" in repr(cast_loss)


@pytest.mark.parametrize("built_on_meta", [False, True], ids=["moved_to_meta", "built_on_meta"])
def test_class_weights_survive_meta_device_initialisation(built_on_meta: bool) -> None:
    """A model built on (or moved to) the meta device, then materialised with ``to_empty`` and ``load_state_dict``
    (large-model / FSDP initialisation): the class weights, non-persistent buffers in no state_dict, were left as
    uninitialised memory (a loss of 66.5 for 1.65)."""
    weights = [0.1, 1 / 3, 3.3]
    cfg = dict(type="CrossEntropyLoss", class_weight=weights)
    if built_on_meta:
        with torch.device("meta"):
            model = torch.nn.ModuleDict({"loss": build_loss(cfg), "head": torch.nn.Linear(4, 3)})
    else:
        model = torch.nn.ModuleDict({"loss": build_loss(cfg), "head": torch.nn.Linear(4, 3)}).to("meta")
    model.to_empty(device="cpu")
    model.load_state_dict(torch.nn.ModuleDict({"loss": build_loss(cfg), "head": torch.nn.Linear(4, 3)}).state_dict())
    pred, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(model["loss"](pred, labels), build_loss(cfg)(pred, labels))
    assert loss_config(model["loss"])["class_weight"] == weights


def test_class_weights_below_the_exact_range_record_what_the_loss_uses() -> None:
    """Class weights below ~1e-21 are not restored exactly from their float32 parts (1.2e-206 becomes 0): the loss
    records the restored values, so that its config rebuilds the same loss and the export's rebuild check passes
    (hypothesis found the mask CE export refused: "_class_weight_values is [0.0, 1.18e-206, ...], rebuilt [0.0, 0.0,
    ...]")."""
    weights = [0.0, 1.1762149870241404e-206, 1e-40, 0.1, 3.3]
    loss = build_loss(dict(type="CrossEntropyLoss", use_mask=True, class_weight=weights))
    recorded = loss_config(loss)["class_weight"]
    assert recorded[:2] == [0.0, 0.0] and recorded[3:] == [0.1, 3.3] and recorded[2] == pytest.approx(1e-40, rel=1e-4)
    rebuilt = build_loss(loss_config(loss))
    assert state_difference(loss, rebuilt) is None
    assert loss_config(rebuilt) == loss_config(loss)


@pytest.mark.parametrize("runtime", ["eager", "script"])
@pytest.mark.parametrize("mode", ["softmax", "sigmoid_labels", "mask"])
def test_float64_class_weights_are_exact(mode: str, runtime: str) -> None:
    """Class weights float32 cannot hold (0.1, 1/3) reach float64 losses unrounded, though the buffer is float32."""
    weights = [0.1, 1 / 3, 0.7, 2.2, 0.3]
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=mode == "sigmoid_labels", use_mask=mode == "mask",
               class_weight=weights)
    loss = build_loss(cfg) if runtime == "eager" else script_loss(build_loss(cfg))
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 5, (8,), generator=g)
    if mode == "mask":
        pred = torch.randn(8, 5, 3, 3, generator=g, dtype=F64)
        args = (torch.rand(8, 3, 3, generator=g, dtype=F64), labels)
    else:
        pred = torch.randn(8, 5, generator=g, dtype=F64)
        args = (labels, torch.rand(8, generator=g, dtype=F64))
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    out = loss(p1, *args)
    expected = reference_loss(cfg, p2, *args)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(grad_of(out, p1), grad_of(expected, p2), rtol=1e-14, atol=1e-16)


# --- 18/19: focal ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["eager", "script"])
@pytest.mark.parametrize("activated", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_saturated_gradients_finite(gamma: float, activated: bool, runtime: str) -> None:
    """RELIABILITY 18: fractional powers of 0 have an infinite slope (scripted code has its own formulation)."""
    values = [0.0, 1.0, 1e-30, 1 - 1e-16] if activated else [-120.0, 120.0, -20.0, 20.0, -800.0, 800.0]
    pred = torch.tensor(values, dtype=F64).repeat(4, 1).T.contiguous()  # (k, 4)
    k = pred.size(0)
    loss = build_in(runtime, dict(type="FocalLoss", gamma=gamma, activated=activated))
    for labels in (torch.zeros(k, dtype=torch.long), torch.full((k,), 4), torch.arange(k) % 5):
        for dtype in (F64, torch.float32):
            p = pred.to(dtype).requires_grad_()
            out = loss(p, labels)
            (grad,) = torch.autograd.grad(out, p)
            assert_finite(out)
            assert_finite(grad)


with quiet_jit():
    _SCRIPTED_BCE = torch.jit.script(bce_with_probabilities)


@pytest.mark.parametrize("runtime", ["eager", "script"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_bce_with_probabilities_is_atens(dtype: torch.dtype, runtime: str) -> None:
    """The activated losses' BCE (written without ``aten::binary_cross_entropy``, which autocast refuses) has
    ATen's values and slopes, at 0 and 1 and just inside; NaN propagates (ATen's kernel raises); the target's slope
    is finite. Scripted, the third call runs TorchScript's optimised graph and its own derivatives."""
    ends = [0.0, 1.0, 1e-30, 1e-13, 9.99e-13, 1.01e-12, 1e-6, 0.5, 1 - 1e-6, 1 - 1e-13 if dtype == F64 else 1 - 6e-8]
    probs = torch.cat([torch.tensor(ends, dtype=dtype), torch.rand(200, dtype=dtype)])
    probs, targets = (t.reshape(-1) for t in torch.meshgrid(probs, torch.tensor([0.0, 1.0, 0.3, 1e-7], dtype=dtype),
                                                            indexing="ij"))
    fn = _SCRIPTED_BCE if runtime == "script" else bce_with_probabilities
    for _ in range(3):
        p, t = probs.clone().requires_grad_(), targets.clone().requires_grad_()
        out = fn(p, t)
        grad, target_grad = torch.autograd.grad(out.sum(), (p, t))
    p = probs.clone().requires_grad_()
    expected = F.binary_cross_entropy(p, targets, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), p)
    torch.testing.assert_close(out, expected, rtol=2 * torch.finfo(dtype).eps, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=2 * torch.finfo(dtype).eps, atol=0.0)
    assert ((probs * (1 - probs) < 1e-12) & torch.isfinite(expected_grad)).sum() >= 16  # the ends are covered
    assert_finite(target_grad)
    nan = torch.tensor([float("nan"), 0.5], dtype=dtype, requires_grad=True)
    out = fn(nan, torch.ones(2, dtype=dtype))
    assert out[0].isnan() and torch.autograd.grad(out.sum(), nan)[0][0].isnan() and out[1].isfinite()


def test_bce_with_probabilities_second_derivatives() -> None:
    """Eager double backward differentiates ATen's slope (scripted, the second derivative is 0: see
    ``numerics._bce_differentiated``)."""
    probs = torch.rand(30, dtype=F64).clamp(0.02, 0.98).requires_grad_()
    targets = torch.rand(30, dtype=F64)
    assert torch.autograd.gradgradcheck(lambda p: bce_with_probabilities(p, targets), (probs,))


def test_focal_gamma0_alpha_minus1_is_bce() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(20, 7, generator=g, dtype=F64) * 5
    pred[0] = 0.0
    labels = torch.randint(0, 8, (20,), generator=g)
    onehot = F.one_hot(labels, 8)[:, :7].double()
    for reduction in REDUCTIONS:
        p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        out = build_loss(dict(type="FocalLoss", gamma=0.0, alpha=-1.0, reduction=reduction))(p1, labels)
        bce = F.binary_cross_entropy_with_logits(p2, onehot, reduction=reduction)
        torch.testing.assert_close(out, bce, **TOL)
        torch.testing.assert_close(grad_of(out, p1), grad_of(bce, p2), **TOL)


OTHER_RUNTIMES = ["compile", "script", "onnx"]


def _runner_of(runtime: str, cfg: dict, names: list[str]) -> LossRunner:
    """A runner of ``cfg`` in ``runtime`` taking the inputs ``names`` (compiled with aot_eager)."""
    loss = build_loss(cfg)
    options = {"backend": "aot_eager"} if runtime == "compile" else {}
    return build_runner(runtime, loss, spec_for(loss), names, **options)


@pytest.mark.parametrize("runtime", OTHER_RUNTIMES)
def test_focal_gamma0_alpha_minus1_is_bce_in_every_runtime(runtime: str) -> None:
    """RELIABILITY 19 compiled, scripted and in onnxruntime: against ATen's BCE with logits on one-hot targets, at
    logits in [-30, 30] and 0, background included (values; gradients where the runtime has them)."""
    cfg = dict(type="FocalLoss", gamma=0.0, alpha=-1.0, reduction="sum")
    runner = _runner_of(runtime, cfg, ["pred", "target"])
    g = torch.Generator().manual_seed(5)
    pred = torch.rand(40, 9, generator=g) * 60 - 30
    pred[0] = 0.0
    labels = torch.randint(0, 10, (40,), generator=g)
    onehot = F.one_hot(labels, 10)[:, :9].float()
    bce = lambda inputs: F.binary_cross_entropy_with_logits(inputs["pred"], onehot, reduction="sum")  # noqa: E731
    results = compare_with_eager(runner, bce, {"pred": pred, "target": labels}, "pred", TOLERANCES[runtime])
    assert [label for label, *_ in results] == (["loss", "grad"] if runner.differentiable else ["loss"])
    assert_all_close(results)


def test_focal_over_bce_ratio() -> None:
    """focal / BCE = (1 - p_t)^gamma * alpha_t element-wise."""
    pred = torch.linspace(-6, 6, 13, dtype=F64).unsqueeze(1)
    target = (torch.arange(13) % 2).double().unsqueeze(1)
    focal = build_loss(dict(type="FocalLoss", gamma=2.0, alpha=0.25, reduction="none"))(pred, target)
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    p = torch.sigmoid(pred)
    pt = torch.where(target == 1, p, 1 - p)
    alpha_t = torch.where(target == 1, 0.25, 0.75)
    torch.testing.assert_close(focal / bce, (1 - pt) ** 2 * alpha_t, **TOL)


# --- 20/21: QFL and DFL ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activated", [False, True], ids=["logits", "probs"])
def test_qfl_scores_and_background(activated: bool) -> None:
    c = 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, c, generator=g, dtype=F64) * 3
    pred = torch.sigmoid(logits) if activated else logits
    cfg = dict(type="QualityFocalLoss", activated=activated)
    cases = {
        "scores_0_and_1": (torch.tensor([0, 1, 2, 3, 4, 5, c, c]),
                           torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0.3, 1.0], dtype=F64)),
        "all_background": (torch.full((8,), c), torch.rand(8, generator=g, dtype=F64)),
    }
    for name, target in cases.items():
        for reduction in ("none", "mean"):
            p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
            out = build_loss({**cfg, "reduction": reduction})(p1, target)
            expected = reference_loss({**cfg, "reduction": reduction}, p2, target)
            assert_finite(out, name)
            torch.testing.assert_close(out, expected, **TOL)
            torch.testing.assert_close(grad_of(out, p1), grad_of(expected, p2), **TOL)
    # all background: the score is irrelevant
    bg = torch.full((8,), c)
    loss = build_loss(cfg)
    torch.testing.assert_close(loss(pred, (bg, torch.zeros(8, dtype=F64))), loss(pred, (bg, torch.ones(8, dtype=F64))))


def test_dfl_targets_exact() -> None:
    reg_max = 16
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, reg_max + 1, generator=g, dtype=F64, requires_grad=True)
    target = torch.tensor([0.0, 7.3, reg_max - 1e-6, float(reg_max)], dtype=F64, requires_grad=True)
    out = build_loss(dict(type="DistributionFocalLoss", reg_max=reg_max, reduction="none"))(pred, target)
    grad, target_grad = torch.autograd.grad(out.sum(), (pred, target))
    assert_finite(out)
    assert_finite(grad)
    logp = torch.log_softmax(pred.detach(), dim=1)
    expected = torch.stack([
        -logp[0, 0],
        -(0.7 * logp[1, 7] + 0.3 * logp[1, 8]),
        -((1e-6) * logp[2, reg_max - 1] + (1 - 1e-6) * logp[2, reg_max]),
        -logp[3, reg_max],  # exactly reg_max: all the mass on the last bin
    ])
    torch.testing.assert_close(out.detach(), expected, rtol=1e-9, atol=1e-9)
    # at reg_max the gradient is the one of CE towards the last bin
    onehot = F.one_hot(torch.tensor(reg_max), reg_max + 1).double()
    torch.testing.assert_close(grad[3], torch.softmax(pred.detach()[3], 0) - onehot, **TOL)
    # a trained target's derivative, log S_l - log S_(l+1) of its two bins: at 0 and at reg_max the one from inside
    left = [0, 7, reg_max - 1, reg_max - 1]
    want = torch.stack([logp[row, bin_] - logp[row, bin_ + 1] for row, bin_ in enumerate(left)])
    torch.testing.assert_close(target_grad, want, **TOL)


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_dfl_targets_outside_the_bins_give_nan_not_a_negative_loss(runtime: str) -> None:
    """visdet indexes past the bins and fails; a loss from weights outside [0, 1] would be negative and train."""
    cfg = dict(type="DistributionFocalLoss", reduction="none")
    loss = build_in(runtime, cfg)
    pred = torch.randn(6, 17, generator=torch.Generator().manual_seed(3), requires_grad=True)
    target = torch.tensor([30.0, 16.5, -1.0, float("nan"), 0.0, 16.0])
    out = loss(pred, target)
    assert out[:4].isnan().all() and out[4:].isfinite().all() and (out[4:] > 0).all()
    # in (-1, 0) visdet truncates to bin 0 and weighs bins 0 and 1 by 1 - y and y: a target rounded below 0 counts
    below = torch.tensor([-1e-7, -0.3, -0.999])
    torch.testing.assert_close(loss(pred[:3], below).double(), dfl_elementwise(pred[:3].detach(), below))
    # weight 0 masks them, value and gradient
    weight = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    masked = loss(pred, target, weight)
    (grad,) = torch.autograd.grad(masked.sum(), pred)
    assert masked.isfinite().all() and grad.isfinite().all() and (grad[:4] == 0).all()


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_focal_integer_targets_of_preds_shape_are_one_hot_or_nan(runtime: str) -> None:
    """Integer targets of pred's shape are one-hot (labels (N,) beside a 1-d pred read so, as in visdet); a class
    index there gave large negative losses, and eager and TorchScript disagreed even on the sign."""
    cfg = dict(type="FocalLoss", reduction="none")
    loss = build_in(runtime, cfg)
    pred = torch.randn(6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    target = torch.tensor([2, 80, 0, 1, 0, 1])
    out = loss(pred, target)
    assert out[:2].isnan().all() and (out[2:] > 0).all()
    torch.testing.assert_close(out[2:], loss(pred, target.float())[2:])  # {0, 1} integers are float one-hot
    weight = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    masked = loss(pred, target, weight)
    (grad,) = torch.autograd.grad(masked.sum(), pred)
    assert masked.isfinite().all() and grad.isfinite().all() and (grad[:2] == 0).all()


_NO_CLASSES = {
    "ce_softmax": (dict(type="CrossEntropyLoss"), (torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))),
    "ce_softmax_probabilities": (dict(type="CrossEntropyLoss"), (torch.zeros(3, 0), torch.zeros(3, 0))),
    "ce_sigmoid_labels": (
        dict(type="CrossEntropyLoss", use_sigmoid=True), (torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    ),
    "ce_mask": (
        dict(type="CrossEntropyLoss", use_mask=True),
        (torch.zeros(3, 0, 2, 2), torch.zeros(3, 2, 2), torch.zeros(3, dtype=torch.long)),
    ),
    "focal_labels": (dict(type="FocalLoss"), (torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))),
    "qfl_pair": (
        dict(type="QualityFocalLoss"), (torch.zeros(3, 0), (torch.zeros(3, dtype=torch.long), torch.zeros(3)))
    ),
    "kd": (dict(type="KnowledgeDistillationKLDivLoss"), (torch.zeros(3, 0), torch.zeros(3, 0))),
    "dfl_one_bin": (dict(type="DistributionFocalLoss"), (torch.zeros(3, 1), torch.zeros(3))),
}


@pytest.mark.parametrize("key", list(_NO_CLASSES))
@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_no_classes_is_a_value_error_naming_the_axis(key: str, runtime: str) -> None:
    """pred without classes (C = 0; DFL with one bin) gave index errors naming neither input (or a NaN for KD)."""
    cfg, args = _NO_CLASSES[key]
    loss = build_loss(cfg) if runtime == "compile" else build_in(runtime, cfg)
    if runtime == "compile":
        loss = torch.compile(loss, fullgraph=True, dynamic=True, backend="eager")
    # fullgraph compile reports the ValueError inside its own error ("Observed exception"), shape left out
    error = {"eager": ValueError, "script": torch.jit.Error, "compile": Exception}[runtime]
    with pytest.raises(error, match=r"needs (classes|bins) along pred's axis 1 \(at least [12]"):
        loss(*args)


_INTEGER_PRED_KEYS = [*LOGIT_CONFIGS, "focal_activated", "qfl_activated"]


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_integer_predictions_are_refused(runtime: str) -> None:
    """A classification loss's pred (logits, probabilities, distributions) of an integer or bool dtype is labels
    passed by mistake: refused with a message saying so, as the regression and box losses refuse theirs and ATen's
    losses refuse them (these losses upcast them to float before, and returned a number)."""
    keys = _INTEGER_PRED_KEYS if runtime != "compile" else ["focal_labels", "ce_softmax", "dfl"]  # compiles: slow
    cases = [(CONFIGS[key][0], list(draw(key, 4).values())) for key in keys]  # pred, target, weight, avg_factor
    cases += [(dict(type="KnowledgeDistillationKLDivLoss"), [torch.rand(4, 3), torch.rand(4, 3)]),
              (dict(type="LocalizationDistillationLoss", reg_max=4), [torch.rand(4, 20), torch.rand(4, 20)])]
    error = {"eager": ValueError, "script": torch.jit.Error, "compile": Exception}[runtime]
    for cfg, (pred, *rest) in cases:
        loss = build_in(runtime, cfg) if runtime == "script" else build_loss(cfg)
        if runtime == "compile":
            loss = torch.compile(loss, fullgraph=True, dynamic=True, backend="eager")
        for dtype in (torch.int64, torch.bool):
            with pytest.raises(error, match="pred must be floating point"):
                loss(pred.round().to(dtype), *rest)


def test_integer_predictions_refusal_says_labels_go_in_target() -> None:
    """The refusal of an integer pred says what was likely meant: labels are the target."""
    with pytest.raises(ValueError, match=r"got an integer or bool tensor; labels go in target$"):
        build_loss(dict(type="FocalLoss"))(torch.tensor([[0, 1], [1, 0]]), torch.tensor([0, 1]))


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
@pytest.mark.parametrize(
    "activated, dtype",
    [(True, torch.float16), (True, torch.bfloat16), (False, torch.float16), (False, torch.bfloat16)],
)
def test_qfl_scores_keep_their_precision_whatever_preds_dtype(runtime: str, activated: bool, dtype) -> None:
    """The dense targets of QFL on (labels, scores) were built in pred's dtype: half precision rounded them (6e-5
    off), and integer probabilities (0 / 1) turned every score into 0 when scripted (such a pred is now refused,
    see test_integer_predictions_are_refused)."""
    cfg = dict(type="QualityFocalLoss", activated=activated, reduction="none")
    loss = build_in(runtime, cfg)
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(6, 4, generator=g).to(dtype)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    scores = torch.tensor([0.1234567, 0.7654321, 0.3333333, 0.9876543, 0.0, 0.5000001])
    float_pred = pred.float().requires_grad_(runtime == "compile")
    trained = pred.requires_grad_(runtime == "compile")
    out = loss(trained, (labels, scores))
    torch.testing.assert_close(out, loss(float_pred, (labels, scores)), rtol=1e-6, atol=0)
    assert out.dtype == torch.float32 and bool((out > 0).all())


def test_confident_focal_values_keep_their_relative_precision_compiled_without_gradient() -> None:
    """A compiled focal loss evaluated without gradient (validation) runs the autograd formulation, not compiled
    training's closed form: its log1p(exp(-|x|)) keeps the relative precision of confident predictions (as
    log(1 + e) it is 0 in float32 from x ~ 17, and the value with it)."""
    cfg = dict(type="FocalLoss", reduction="none")
    loss = build_in("compile", cfg)
    pred = torch.tensor([[8.0, 10.0, 12.0, 14.0, 16.0, 20.0]])
    target = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]])
    with torch.no_grad():
        out = loss(pred, target)
    exact = build_loss(cfg)(pred.double(), target.double())
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=0)


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_confident_focal_values_keep_their_relative_precision(runtime: str) -> None:
    """1 - p of confident correct predictions (logits 8-20, target 1) is 3e-4 to 2e-9: written 1 - sigmoid(x), it
    loses its digits (1.8% off at 14, all of them past 17), values so small that every atol hides them. The
    gradient (3e-11 at 8 .. 7e-27 at 20) keeps its relative precision in eager too: its sigmoid(x) - t is written
    s (1 - t) - t (1 - s) (as s - t it rounded where p is near 1: 1.5e-4 relative at 8, 0.3 at 20, for float one-hot
    targets and integer labels alike), and so in compiled training's saved closed form (the same 0.3 at 20 before)
    and in TorchScript's BCE on float targets, whose ATen slope sigmoid(x) - t rounded the same way (its integer
    labels take the signed form)."""
    cfg = dict(type="FocalLoss", reduction="none")
    loss = build_in(runtime, cfg)
    pred = torch.tensor([[8.0, 10.0, 12.0, 14.0, 16.0, 20.0]], requires_grad=True)
    target = torch.ones_like(pred)
    out = loss(pred, target)
    (grad,) = torch.autograd.grad(out.sum(), pred)
    reference = pred.detach().double().requires_grad_()
    exact = build_loss(cfg)(reference, target.double())  # float64 math
    (exact_grad,) = torch.autograd.grad(exact.sum(), reference)
    torch.testing.assert_close(out.double(), exact.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-5, atol=0)
    labels_out = loss(pred, torch.zeros(1, dtype=torch.long))  # class 0 at 8, the rest confident negatives
    (labels_grad,) = torch.autograd.grad(labels_out.sum(), pred)
    labels_exact = build_loss(cfg)(reference, torch.zeros(1, dtype=torch.long))
    (labels_exact_grad,) = torch.autograd.grad(labels_exact.sum(), reference)
    torch.testing.assert_close(labels_grad.double(), labels_exact_grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("runtime", "trained_target"),
    [("eager", False), ("eager", True), ("compile", False), ("compile", True), ("script", False)],
    ids=["eager", "eager-trained_target", "compile", "compile-trained_target", "script"],
)
@pytest.mark.parametrize("layout", ["dense", "pair"])
def test_confident_qfl_keeps_its_relative_precision(runtime: str, trained_target: bool, layout: str) -> None:
    """QFL of confident correct predictions (logits 8-20 at score 1): |t - sigmoid(x)| is 3e-4 .. 2e-9. Written
    t - s (s - t in the closed forms), it cancelled where s rounds near 1: the loss (e^-3x) came out 0 or 100% off
    and its gradient too, in every runtime. Written t (1 - s) - (1 - t) s, values and gradients are within 1e-5 of
    float64 math."""
    cfg = dict(type="QualityFocalLoss", reduction="none")
    loss = build_in(runtime, cfg)
    logits = torch.tensor([8.0, 10.0, 12.0, 14.0, 16.0, 20.0])
    pred = torch.stack([logits, -logits], dim=1)  # the label's column and a confident negative
    labels, scores = torch.zeros(6, dtype=torch.long), torch.ones(6)
    target = torch.stack([scores, torch.zeros(6)], dim=1)

    def value_and_grads(module, x, dtype):
        leaf = x.to(dtype).requires_grad_()
        trained = (scores if layout == "pair" else target).to(dtype).requires_grad_(trained_target)
        out = module(leaf, (labels, trained) if layout == "pair" else trained)
        inputs = [leaf, trained] if trained_target else [leaf]
        return [out, *torch.autograd.grad(out.sum(), inputs)]

    results = value_and_grads(loss, pred, torch.float32)
    exact = value_and_grads(build_loss(cfg), pred, torch.float64)  # float64 math
    assert bool((exact[0] > 0).all())
    for name, got, want in zip(["value", "pred grad", "target grad"], results, exact):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
@pytest.mark.parametrize("loss_type", ["FocalLoss", "QualityFocalLoss"])
def test_soft_target_focal_losses_of_confident_logits_keep_relative_precision(runtime: str, loss_type: str) -> None:
    """Focal / QFL on soft targets just below 1 and confident logits, in training (compiled training saves a closed
    form): the BCE factor is (1 - t) x, small against x. Compiled training wrote it relu(x) - x t, which cancelled
    (2e-3 relative at x = 1000, t = 0.9999); written x ([x >= 0] - t), within 1e-5 of float64 math."""
    cfg = dict(type=loss_type, reduction="none")
    loss = build_in(runtime, cfg)
    pred = torch.tensor([[20.0, 100.0, 1000.0]] * 3)
    target = torch.tensor([[0.9999], [0.999], [0.99]]).expand(3, 3).contiguous()
    leaf, reference = pred.clone().requires_grad_(), pred.double().requires_grad_()
    out = loss(leaf, target)
    exact = build_loss(cfg)(reference, target.double())  # float64 math
    torch.testing.assert_close(out.double(), exact.detach(), rtol=1e-5, atol=0)
    (grad,), (exact_grad,) = torch.autograd.grad(out.sum(), leaf), torch.autograd.grad(exact.sum(), reference)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_giou_gradient_of_distant_boxes_keeps_its_relative_precision(runtime: str) -> None:
    """Boxes 1e2 .. 1e5 apart: the GIoU gradient (1e-4 .. 1e-10) comes from the enclosing-area term. Written
    iou - (E - U) / E, autograd's d/dE is 1/E - (E - U) / E**2, which cancels: scripted and compiled gradients were
    1e-5 relative off at 1e2 and 0.7% at 1e5 (eager's closed form was exact). Written iou - 1 + U / E, element by
    element within 1e-6 of float64 math."""
    cfg = dict(type="GIoULoss", reduction="sum")
    loss = build_in(runtime, cfg)
    for offset in (1e2, 1e3, 1e4, 1e5):
        pred, target = boxes(200, 0, 10.0, torch.float32), boxes(200, 1, 10.0, torch.float32) + offset
        reference = pred.double().requires_grad_()
        (exact,) = torch.autograd.grad(build_loss(cfg)(reference, target.double()), reference)  # float64 math
        leaf = pred.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss(leaf, target), leaf)
        assert bool((exact.abs() > 0).all())
        torch.testing.assert_close(grad.double(), exact, rtol=1e-6, atol=0, msg=lambda m: f"{offset:g} apart: {m}")


@pytest.mark.parametrize(
    ("runtime", "trained_target"),
    [("eager", False), ("eager", True), ("compile", False), ("compile", True), ("script", False)],
    ids=["eager", "eager-trained_target", "compile", "compile-trained_target", "script"],
)
def test_soft_target_bce_of_confident_logits_keeps_its_relative_precision(runtime: str, trained_target: bool) -> None:
    """Sigmoid CE on soft targets just below 1 (or above 0) and confident logits: the loss is (1 - t) x, small
    against x. Written relu(x) - x t, it cancelled to eps / (2 (1 - t)) relative (2e-4 at t = 0.9999) in the
    autograd formulation that compile, ONNX and trained targets run; written x ([x >= 0] - t), each element is
    within 1e-6 of float64 math, as eager's closed form and TorchScript's lerp already were."""
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="none")
    loss = build_in(runtime, cfg)
    logits = torch.tensor([1000.0, 500.0, 100.0, 20.0, 3.0, -3.0, -20.0, -100.0, -1000.0])
    for soft in (0.9999, 0.999, 0.99):
        target = torch.where(logits > 0, torch.tensor(soft), torch.tensor(1.0 - soft))
        pred = logits.clone().requires_grad_()
        value = loss(pred, target.clone().requires_grad_(trained_target))
        x, t = logits.double(), target.double()
        exact = (1 - t) * F.softplus(x) + t * F.softplus(-x)
        torch.testing.assert_close(value.double(), exact, rtol=1e-6, atol=0, msg=lambda m: f"t = {soft}: {m}")


def _nearly_identical_boxes(n: int, jitter: float) -> tuple[Tensor, Tensor]:
    """Targets at coordinates ~10 with sides 0.5 .. 1.5, and predictions ``jitter`` off them, both float32."""
    generator = torch.Generator().manual_seed(0)
    centre = 10.0 + torch.rand(n, 2, generator=generator, dtype=F64)
    half = 0.25 + 0.5 * torch.rand(n, 2, generator=generator, dtype=F64)
    target = torch.cat([centre - half, centre + half], dim=1).float()
    pred = (target.double() + jitter * torch.randn(n, 4, generator=generator, dtype=F64)).float()
    return pred, target


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_giou_of_nearly_identical_boxes_is_float32_accurate_but_where_coordinates_tie(runtime: str) -> None:
    """Boxes 1e-5 apart at coordinates ~10 (README, Mixed precision): the loss (~3.5e-5) is off by an absolute
    ~1.4e-7, as far as float64 math on float32-rounded areas, and a 1-ulp nudge of one coordinate moves the exact
    loss by up to 21%: conditioning, not a cancellation of the formulation. The gradient is within 1e-6 of each
    box's largest component, element by element too, except at coordinates equal in pred and target (ulp(10) is
    ~1e-6): there the max / min halve the slope and four O(1 / side) terms cancel to O(jitter), which float32 leaves
    at ~eps / side (10^3 .. 10^5 relative); a one-ulp nudge of such a coordinate moves that component to ~1 / side."""
    cfg = dict(type="GIoULoss", reduction="none")
    loss = build_in(runtime, cfg)
    pred, target = _nearly_identical_boxes(500, 1e-5)
    reference = pred.double().requires_grad_()
    exact = build_loss(cfg)(reference, target.double())  # float64 math
    (exact_grad,) = torch.autograd.grad(exact.sum(), reference)
    leaf = pred.clone().requires_grad_()
    value = loss(leaf, target)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    torch.testing.assert_close(value.double(), exact.detach(), rtol=0, atol=2.0**-22)
    error = (grad.double() - exact_grad).abs()
    assert float((error / exact_grad.abs().amax(1, keepdim=True)).max()) < 1e-6
    ties = pred == target
    assert bool(ties.any())  # the case the element-wise check leaves out
    assert float((error / exact_grad.abs())[~ties].max()) < 1e-6
    assert float(exact_grad.abs()[ties].max()) < 1e-3 * float(exact_grad.abs().max())


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_dfl_gradient_at_its_optimum_is_off_by_the_rounding_of_the_probabilities(runtime: str) -> None:
    """DFL with both bins around the target confident (the rest 30 below) and at its optimum, p = w (README, Mixed
    precision): the bins' gradient p - w is ~1e-10 .. 1e-8, a difference of two O(1) numbers, and float32 leaves
    it an absolute error of ~7e-8 (1.2 ulps of 0.5), relative errors of 1e2 .. 1e4. Not a cancellation of the
    formulation: float64 math on the float32-rounded probability is off by up to half an ulp, 3e-8 (relative
    errors up to 2e2 here), ours 2.4x that; for targets below 0.5 the weight 1 - y itself rounds by as much."""
    cfg = dict(type="DistributionFocalLoss", reduction="none")
    loss = build_in(runtime, cfg)
    generator = torch.Generator().manual_seed(0)
    n, bins = 256, 17
    target = torch.cat([0.02 + 0.46 * torch.rand(n // 2, generator=generator, dtype=F64),
                        1.0 + 15.0 * torch.rand(n // 2, generator=generator, dtype=F64)]).float().double()
    left = target.floor().clamp(0, bins - 2).long()
    logits = -30.0 - torch.rand(n, bins, generator=generator, dtype=F64)
    rows = torch.arange(n)
    logits[rows, left], logits[rows, left + 1] = torch.log(left + 1 - target), torch.log(target - left)
    pred = logits.float()
    reference = pred.double().requires_grad_()
    (exact_grad,) = torch.autograd.grad(build_loss(cfg)(reference, target).sum(), reference)  # float64 math
    leaf = pred.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(leaf, target.float()).sum(), leaf)
    assert float(exact_grad.abs().max()) < 1e-6  # at the optimum
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=2.0**-22)
    rounded = torch.softmax(reference.detach(), dim=1).float().double()  # the float32 probabilities, exactly
    weights = torch.zeros_like(rounded)
    weights[rows, left], weights[rows, left + 1] = left + 1 - target, target - left
    floor = float(((rounded - weights) - exact_grad).abs().max())  # of any formulation that rounds p to float32
    assert float((grad.double() - exact_grad).abs().max()) < 4.0 * floor


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_mask_ce_of_confident_logits_on_soft_targets_keeps_its_relative_precision(runtime: str) -> None:
    """Mask cross-entropy of confident maps (|x| 8 .. 80, a quarter of them wrong; e^-|x| stays a normal float32)
    on hard targets and on soft ones 1e-3 and 1e-4 away from 0 and 1 (PointRend's point targets are interpolated):
    values and gradients element by element within 1e-6 relative of float64 math."""
    cfg = dict(type="CrossEntropyLoss", use_mask=True, reduction="none")
    loss = build_in(runtime, cfg)
    generator = torch.Generator().manual_seed(0)
    rois, classes, points = 8, 3, 30
    label = torch.randint(0, classes, (rois,), generator=generator)
    magnitude = 8.0 * torch.exp(math.log(10.0) * torch.rand(rois, classes, points, generator=generator, dtype=F64))
    mask = torch.rand(rois, points, generator=generator) < 0.5
    sign = torch.where(mask.unsqueeze(1), 1.0, -1.0).double()
    sign = torch.where(torch.rand(rois, classes, points, generator=generator) < 0.25, -sign, sign)
    pred = (sign * magnitude).float()
    for away in (0.0, 1e-3, 1e-4):
        target = torch.where(mask, 1.0 - away, away).float()
        reference = pred.double().requires_grad_()
        exact = build_loss(cfg)(reference, target.double(), label)  # float64 math
        (exact_grad,) = torch.autograd.grad(exact.sum(), reference)
        leaf = pred.clone().requires_grad_()
        value = loss(leaf, target, label)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
        torch.testing.assert_close(value.double(), exact.detach(), rtol=1e-6, atol=0, msg=lambda m: f"{away}: {m}")
        torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-6, atol=0, msg=lambda m: f"{away}: {m}")


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_negative_weights_weigh_like_any_other(runtime: str) -> None:
    """Only weight 0 masks: a negative weight (a penalty some samplers give) multiplies, in every runtime (the
    compiled mask is ``weight != 0``, eager's a cast to bool)."""
    cfg = dict(type="L1Loss", reduction="none")
    loss = build_in(runtime, cfg)
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = loss(pred, torch.zeros(2, 2), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, -2.0], [3.0, 4.0]]))


@pytest.mark.parametrize("mode", ["linear", "square", "log"])
def test_iou_union_clamp_is_bbox_overlaps_default_not_the_losss_eps(mode: str) -> None:
    """MMDetection's IoULoss calls ``bbox_overlaps`` with its default eps (1e-6) for the union and clamps the IoU at
    the loss's ``eps``; GIoU passes its eps to both. Identical boxes smaller than eps are a perfect match (loss 0),
    not IoU area / eps."""
    loss = build_loss(dict(type="IoULoss", mode=mode, eps=0.05, reduction="none"))
    boxes = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.4, 0.3]])  # areas 0.01 and 0.02 < eps
    for pred in (boxes, boxes.clone().requires_grad_()):
        torch.testing.assert_close(loss(pred, boxes), torch.zeros(2), rtol=0, atol=1e-6)
    giou = build_loss(dict(type="GIoULoss", eps=0.05, reduction="none"))(boxes, boxes).double()
    torch.testing.assert_close(giou, 1 - torch.tensor([0.01, 0.02], dtype=F64) / 0.05, rtol=1e-6, atol=1e-7)


def test_float64_softplus_is_exact_where_float32_would_round() -> None:
    """float64 sigmoid CE keeps log1p(exp(-x)) past x = 20 (~1e-9 .. 4e-18 of x): exact to the last digit."""
    x = torch.tensor([20.0, 25.0, 30.0, 39.9], dtype=F64)
    out = build_loss(dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="none"))(x, torch.zeros_like(x))
    torch.testing.assert_close(out, x + torch.log1p(torch.exp(-x)), rtol=1e-15, atol=0)


def test_qfl_labels_without_their_scores_say_how_to_pass_both() -> None:
    loss = build_loss(dict(type="QualityFocalLoss"))
    with pytest.raises(ValueError, match=r"go together as one tuple: loss\(pred, \(labels, scores\)\)"):
        loss(torch.randn(5, 80), torch.randint(0, 81, (5,)))


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
@pytest.mark.parametrize("n", [0, 1, 9])
def test_mask_ce_takes_pointrends_point_logits(runtime: str, n: int) -> None:
    """PointRend's loss_point: a mask CrossEntropyLoss on (R, C, P) point logits and (R, P) targets."""
    cfg = dict(type="CrossEntropyLoss", use_mask=True, class_weight=[1.0, 2.0, 0.5, 3.0, 1.5])
    loss = build_in(runtime, cfg)
    generator = torch.Generator().manual_seed(n)
    pred = torch.randn(n, 5, 37, generator=generator, dtype=F64, requires_grad=True)
    target = (torch.rand(n, 37, generator=generator) > 0.5).double()
    label = torch.randint(0, 5, (n,), generator=generator)
    for reduction in ("mean", "none"):
        value = loss(pred, target, label, None, reduction)
        torch.testing.assert_close(value, reference_loss(cfg, pred, target, label, None, reduction), **TOL)
    (grad,) = torch.autograd.grad(loss(pred, target, label), pred)
    # the reference at n = 0 is a constant (its empty mean), whose gradient is zero
    want = grad_of(reference_loss(cfg, pred, target, label), pred, torch.tensor(1.0, dtype=F64)) if n else 0 * pred
    torch.testing.assert_close(grad, want, **TOL)


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_sigmoid_ce_on_labels_takes_a_weight_per_row_as_n_by_1(runtime: str) -> None:
    """MMDetection's ``label_weights.view(-1, 1)`` reads an (N, 1) weight as the (N,) one; it was refused."""
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=True)
    loss = build_in(runtime, cfg)
    generator = torch.Generator().manual_seed(3)
    pred = torch.randn(9, 5, generator=generator, dtype=F64, requires_grad=True)
    label = torch.randint(0, 6, (9,), generator=generator)
    weight = torch.rand(9, generator=generator, dtype=F64)
    weight[2] = 0.0
    for reduction in ("mean", "sum", "none"):
        want = reference_loss(cfg, pred, label, weight, None, reduction)
        torch.testing.assert_close(loss(pred, label, weight.unsqueeze(1), None, reduction), want, **TOL)
    (grad,) = torch.autograd.grad(loss(pred, label, weight.unsqueeze(1)), pred)
    torch.testing.assert_close(grad, grad_of(reference_loss(cfg, pred, label, weight), pred,
                                             torch.tensor(1.0, dtype=F64)), **TOL)
    with pytest.raises(Exception, match=r"shape \(N,\) or \(N, 1\) with index labels"):
        loss(pred, label, weight.view(9, 1).expand(9, 2))


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_focal_takes_a_flattened_weight_in_every_runtime(runtime: str) -> None:
    """A (N * C,) weight failed to compile ("the weight's and pred's rows differ"): the (N,) layout was asserted
    before the flattened one was considered."""
    cfg = dict(type="FocalLoss")
    loss = build_in(runtime, cfg)
    generator = torch.Generator().manual_seed(4)
    pred = torch.randn(7, 5, generator=generator, dtype=F64, requires_grad=True)
    label = torch.randint(0, 6, (7,), generator=generator)
    weight = torch.rand(7, 5, generator=generator, dtype=F64)
    value = loss(pred, label, weight.flatten())
    torch.testing.assert_close(value, reference_loss(cfg, pred, label, weight), **TOL)
    torch.testing.assert_close(loss(pred, label, weight[:, 0]), reference_loss(cfg, pred, label, weight[:, 0]), **TOL)


@pytest.mark.parametrize("runtime", ["eager", "script"])
def test_mask_ce_refuses_an_ignore_index_per_call(runtime: str) -> None:
    """MMDetection asserts 'BCE loss does not support ignore_index'; the argument was dropped without a word."""
    loss = build_in(runtime, dict(type="CrossEntropyLoss", use_mask=True))
    pred, target, label = torch.randn(2, 3, 4, 4), (torch.rand(2, 4, 4) > 0.5).float(), torch.tensor([0, 2])
    with pytest.raises(Exception, match="mask cross-entropy takes no ignore_index"):
        loss(pred, target, label, None, None, 1)
    assert torch.isfinite(loss(pred, target, label, None, None, None))


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_mask_ce_rois_labelled_outside_the_classes_contribute_zero(runtime: str) -> None:
    """They were clamped into [0, C): -1 took class 0's map and C (or 2^40) the last one, silently; now they count 0,
    as softmax CE's samples do, and NaN in their maps reaches neither the value nor the gradient."""
    cfg = dict(type="CrossEntropyLoss", use_mask=True, class_weight=[1.0, 2.0, 0.5])
    loss = build_in(runtime, cfg)
    generator = torch.Generator().manual_seed(5)
    pred = torch.randn(6, 3, 4, 4, generator=generator, dtype=F64)
    target = (torch.rand(6, 4, 4, generator=generator) > 0.5).double()
    label = torch.tensor([0, -1, 2, 3, 2**40, 1])
    pred[[1, 3, 4]] = float("nan")
    target[3] = float("nan")
    pred.requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        clean = pred.detach().nan_to_num(0.0)
        want = reference_loss(cfg, clean, target.nan_to_num(0.0), label, None, reduction)
        torch.testing.assert_close(loss(pred, target, label, None, reduction), want, **TOL)
    (grad,) = torch.autograd.grad(loss(pred, target, label), pred)
    assert torch.isfinite(grad).all() and not grad[[1, 3, 4]].any() and grad[[0, 2, 5]].abs().sum() > 0


# --- 22-25: boxes ----------------------------------------------------------------------------------------------------


def _box(*xyxy: float) -> Tensor:
    return torch.tensor([xyxy], dtype=F64)


# fvcore / torchvision's hand-drawn boxes
BOX2 = _box(0, 0, 1, 1)
GIOU_KNOWN = {
    "identical": (BOX2, BOX2, 0.0),
    "quarter_inside": (_box(-1, -1, 1, 1), BOX2, 0.75),
    "side_by_side": (_box(0, 1, 1, 2), BOX2, 1.0),
    "diagonal": (_box(1, 1, 2, 2), BOX2, 1.5),
}


@pytest.mark.parametrize("name", list(GIOU_KNOWN))
def test_giou_known_values(name: str) -> None:
    pred, target, value = GIOU_KNOWN[name]
    out = build_loss(dict(type="GIoULoss", reduction="none"))(pred, target)
    torch.testing.assert_close(out, torch.tensor([value], dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        build_loss(dict(type="GIoULoss", reduction="none"))(target, pred), out, rtol=0, atol=1e-12)  # symmetric


@pytest.mark.parametrize("name", list(GIOU_KNOWN))
@pytest.mark.parametrize("mode", ["linear", "square", "log"])
def test_iou_known_values(name: str, mode: str) -> None:
    pred, target, _ = GIOU_KNOWN[name]
    iou = {"identical": 1.0, "quarter_inside": 0.25, "side_by_side": 1e-6, "diagonal": 1e-6}[name]  # clamped at eps
    value = {"linear": 1 - iou, "square": 1 - iou**2, "log": -math.log(iou)}[mode]
    out = build_loss(dict(type="IoULoss", mode=mode, reduction="none"))(pred, target)
    torch.testing.assert_close(out, torch.tensor([value], dtype=F64), rtol=1e-9, atol=1e-12)


DEGENERATE = {
    # name: (pred, target)
    "zero_area_pred": (_box(2, 2, 2, 6), _box(1, 1, 5, 5)),
    "point_pred": (_box(3, 3, 3, 3), _box(1, 1, 5, 5)),
    "line_both": (_box(0, 1, 4, 1), _box(0, 1, 4, 1)),
    "identical_points": (_box(3, 3, 3, 3), _box(3, 3, 3, 3)),
    "disjoint": (_box(0, 0, 1, 1), _box(10, 10, 12, 12)),
    "touching_edge": (_box(0, 0, 1, 1), _box(1, 0, 2, 1)),
    "touching_corner": (_box(0, 0, 1, 1), _box(1, 1, 2, 2)),
    "inverted_x": (_box(5, 1, 1, 5), _box(1, 1, 5, 5)),
    "inverted_both": (_box(5, 5, 1, 1), _box(1, 1, 5, 5)),
    "inverted_inside": (_box(4, 4, 2, 2), _box(1, 1, 5, 5)),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("key", BOX_CONFIGS)
def test_degenerate_boxes(key: str, name: str) -> None:
    pred, target = DEGENERATE[name]
    cfg = {**CONFIGS[key][0], "reduction": "none"}
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    out = build_loss(cfg)(p1, target)
    grad = grad_of(out, p1)
    assert_finite(out)
    assert_finite(grad)
    expected = reference_loss(cfg, p2, target)
    torch.testing.assert_close(out, expected, **TOL)
    # nothing but overlapping boxes scores: a degenerate or inverted box has IoU 0, the documented worst case
    eps = 1e-6
    worst = {"iou_log": -math.log(eps), "iou_linear": 1 - eps, "iou_square": 1 - eps**2}
    if key in worst:
        torch.testing.assert_close(out, torch.tensor([worst[key]], dtype=F64), rtol=1e-12, atol=1e-12)
    else:
        assert float(out.detach()) >= 1.0 - 1e-12  # GIoU <= 0 without overlap
    assert float(out.detach()) > 0.5  # never a perfect score for a nonsense box


@pytest.mark.parametrize("key", BOX_CONFIGS)
def test_degenerate_and_tiny_boxes_score_in_torchscript_as_eagerly(key: str) -> None:
    """TorchScript runs the autograd formulation (numerics.aligned_box_iou), eager its closed form: an inverted side
    is an empty side there too (one inverted side of the prediction made its area negative, the union smaller and
    the GIoU higher), and the union is clamped at eps, not offset by it (boxes of ~1e-4, whose union eps decides)."""
    cases = [*DEGENERATE.values(), (_box(0, 0, -1, 2), _box(0, 0, 1, 1)), (_box(2, 0, 3, -4), _box(0, 0, 4, 4))]
    cases.append((boxes(6, seed=1, scale=1.0) * 1e-4, boxes(6, seed=2, scale=1.0) * 1e-4))
    cfg = {**CONFIGS[key][0], "reduction": "none"}
    eager, scripted = build_loss(cfg), build_in("script", cfg)
    for pred, target in cases:
        p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        want, got = eager(p1, target), scripted(p2, target)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(grad_of(got, p2), grad_of(want, p1), **TOL)


def test_the_giou_loss_functions_eps_defaults_to_mmdetections() -> None:
    """MMDetection's giou_loss function defaults to eps 1e-7 (its GIoULoss passes 1e-6): boxes of ~1e-4 tell them
    apart."""
    from visdet_export.losses import giou_loss

    pred, target = boxes(6, seed=1, scale=1.0) * 1e-4, boxes(6, seed=2, scale=1.0) * 1e-4
    want = reference_loss(dict(type="GIoULoss", eps=1e-7), pred, target)
    torch.testing.assert_close(giou_loss(pred, target), want, **TOL)
    assert not torch.allclose(giou_loss(pred, target, eps=1e-6), want, rtol=1e-3)


@pytest.mark.parametrize("runtime", ["eager", "script"])
def test_giou_gradients_of_point_boxes_stay_finite_at_the_smallest_eps(runtime: str) -> None:
    """eps down to 1e-20 was accepted, and the squared enclosing area it clamps overflowed float32: NaN gradients for
    identical or disjoint point boxes (RELIABILITY 23). 1e-12 is the smallest eps taken."""
    from visdet_export.losses.iou_loss import SMALLEST_EPS

    loss = build_in(runtime, dict(type="GIoULoss", eps=SMALLEST_EPS))
    pred = torch.tensor([[5.0, 5, 5, 5], [0, 0, 10, 10], [3, 3, 3, 3]], requires_grad=True)
    target = torch.tensor([[5.0, 5, 5, 5], [0, 0, 10, 10], [7, 7, 7, 7]])
    (grad,) = torch.autograd.grad(loss(pred, target), pred)
    assert torch.isfinite(grad).all()


def test_inverted_box_is_never_a_perfect_score() -> None:
    """visdet multiplies two negative sides into a positive area; an inverted copy of the target then scores."""
    target = boxes(32, seed=4)
    inverted = target[:, [2, 3, 0, 1]]
    for key in BOX_CONFIGS:
        out = build_loss({**CONFIGS[key][0], "reduction": "none"})(inverted, target)
        assert_finite(out)
        assert (out >= 1.0 - 1e-6).all(), key


# --- 26: NaN / inf propagate unless masked -------------------------------------------------------------------------


def _poison(x: Tensor, rows: Tensor, value: float) -> Tensor:
    x = x.clone()
    x[rows] = value
    return x


@pytest.mark.parametrize("runtime", ["eager", "script"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("key", WEIGHTED)
def test_masked_elements_ignore_nan_inf(key: str, value: float, runtime: str) -> None:
    inputs = draw(key, 8, seed=5)
    weight = inputs["weight"].clone()
    weight[:3] = 0.0
    rows = torch.arange(3)
    clean = {**inputs, "weight": weight}
    poisoned = {**clean, "pred": _poison(inputs["pred"], rows, value)}
    if isinstance(inputs["target"], Tensor) and inputs["target"].is_floating_point():
        poisoned["target"] = _poison(inputs["target"], rows, value)
    loss = build_in(runtime, CONFIGS[key][0])
    out, grad, _ = run(loss, poisoned)
    out_clean, grad_clean, _ = run(loss, clean)
    assert_finite(out)
    assert_finite(grad)
    # bit for bit in eager; TorchScript's profiling executor optimises the graph between its first calls, which
    # may round differently
    exact = dict(rtol=0, atol=0) if runtime == "eager" else dict(rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out, out_clean, **exact)
    torch.testing.assert_close(grad, grad_clean, **exact)
    assert (grad[:3] == 0).all()


@pytest.mark.parametrize("runtime", ["eager", "script"])
@pytest.mark.parametrize("key", BOX_CONFIGS)
def test_trained_box_targets_of_weight_0_ignore_nan(key: str, runtime: str) -> None:
    """A box target that takes a gradient sends eager to the autograd formulation (aligned_box_iou with its eager
    selects of whole boxes): NaN in the target boxes of weight 0 reaches neither the loss nor either gradient."""
    pred, target = boxes(8, seed=3), boxes(8, seed=3) + 0.5  # overlapping pairs
    weight = torch.ones(8, dtype=F64)
    weight[:3] = 0.0
    poisoned = _poison(target, torch.arange(3), float("nan"))
    loss = build_in(runtime, CONFIGS[key][0])
    results = []
    for t in (target, poisoned):
        p, t = pred.clone().requires_grad_(), t.clone().requires_grad_()
        out = loss(p, t, weight)
        results.append((out, *torch.autograd.grad(out, (p, t))))
    for got, clean in zip(*reversed(results)):
        assert_finite(got)
        torch.testing.assert_close(got, clean, rtol=1e-12, atol=1e-15)
    assert (results[1][2][:3] == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("key", WEIGHTED)
def test_all_weights_zero(key: str, reduction: str) -> None:
    inputs = draw(key, 6, seed=6)
    zero = torch.zeros_like(inputs["weight"])
    rows = torch.arange(6)
    poisoned = {**inputs, "weight": zero, "pred": _poison(inputs["pred"], rows[:2], float("nan"))}
    poisoned["pred"][2:4] = float("inf")
    if isinstance(inputs["target"], Tensor) and inputs["target"].is_floating_point():
        poisoned["target"] = _poison(inputs["target"], rows[4:], float("-inf"))
    loss = build_loss({**CONFIGS[key][0], "reduction": reduction})
    for avg in (None, 0.0) if reduction != "sum" else (None,):
        out, grad, pred = run(loss, poisoned, avg_factor=avg)
        expected_none = reference_loss({**CONFIGS[key][0], "reduction": "none"}, inputs["pred"],
                                       inputs["target"], inputs["weight"])
        if reduction == "none":
            assert out.shape == expected_none.shape  # element-wise zeros, not a scalar
        else:
            assert out.shape == ()
        assert (out == 0).all()
        assert not out.isnan().any()
        assert (grad == 0).all()


@pytest.mark.parametrize("key", [k for k in CONFIGS])
def test_nan_with_weight_propagates(key: str) -> None:
    inputs = draw(key, 4, seed=7)
    pred = inputs["pred"].clone()
    pred[1] = float("nan")
    weight = inputs["weight"]
    if key != "ce_mask":
        weight = torch.ones_like(weight)
    out = build_loss(CONFIGS[key][0])(pred, inputs["target"], weight)
    assert out.isnan().all(), "a NaN input with a nonzero weight must not be hidden"


# --- 27: smooth L1 / balanced L1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1e-5, 1e-12, 1e-30, 1.1754943508222875e-38])  # float32's smallest normal
def test_smooth_l1_tiny_beta(beta: float) -> None:
    cfg = dict(type="SmoothL1Loss", beta=beta, reduction="none")
    pred = torch.tensor([[0.0, 1e-20, 1e-3, -2.0]], dtype=F64, requires_grad=True)
    target = torch.zeros(1, 4, dtype=F64)
    for dtype in (F64, torch.float32):
        p = pred.detach().to(dtype).requires_grad_()
        out = build_loss(cfg)(p, target.to(dtype))
        grad = grad_of(out, p)
        assert_finite(out)
        assert_finite(grad)
    out = build_loss(cfg)(pred, target)
    torch.testing.assert_close(out, reference_loss(cfg, pred, target), **TOL)
    torch.testing.assert_close(out[0, 2:], (pred[0, 2:].abs() - 0.5 * beta).detach(), **TOL)  # L1 - beta/2


@pytest.mark.parametrize("runtime", OTHER_RUNTIMES)
@pytest.mark.parametrize("cfg", [dict(type="SmoothL1Loss", beta=1e-30), dict(type="BalancedL1Loss", beta=1e-3),
                                 dict(type="BalancedL1Loss", alpha=0.3, gamma=1.0, beta=0.8)],
                         ids=["smooth_l1_beta_1e-30", "balanced_l1_beta_1e-3", "balanced_l1_custom"])
def test_tiny_and_custom_breakpoints_match_eager_in_every_runtime(cfg: dict, runtime: str) -> None:
    """RELIABILITY 27 compiled, scripted and in onnxruntime: errors of 0, at and either side of the breakpoint, and
    far beyond it, finite and eager's (values; gradients where the runtime has them)."""
    beta = cfg["beta"]
    runner = _runner_of(runtime, {**cfg, "reduction": "none"}, ["pred", "target"])
    errors = torch.tensor([0.0, beta * (1 - 2**-20), beta, -beta, beta * (1 + 2**-20), 1e-3, -2.0, 10.0])
    inputs = {"pred": errors.view(2, 4), "target": torch.zeros(2, 4)}
    eager = build_loss({**cfg, "reduction": "none"})
    assert_all_close(compare_with_eager(runner, lambda x: eager(x["pred"], x["target"]), inputs, "pred",
                                        TOLERANCES[runtime]))
    assert_finite(runner(inputs))


@pytest.mark.parametrize("params", [dict(), dict(alpha=0.3, gamma=1.0, beta=0.8), dict(beta=1e-3)],
                         ids=["default", "custom", "tiny_beta"])
def test_balanced_l1_breakpoints(params: dict) -> None:
    cfg = dict(type="BalancedL1Loss", reduction="none", **params)
    beta = params.get("beta", 1.0)
    diffs = torch.tensor([0.0, beta * (1 - 1e-9), beta, beta * (1 + 1e-9), -beta, 10 * beta], dtype=F64)
    pred = diffs.unsqueeze(0).requires_grad_()
    target = torch.zeros_like(pred)
    out = build_loss(cfg)(pred, target)
    grad = grad_of(out, pred)
    assert_finite(out)
    assert_finite(grad)
    torch.testing.assert_close(out, reference_loss(cfg, pred, target), **TOL)
    # continuous at the breakpoint
    torch.testing.assert_close(out[0, 1], out[0, 3], rtol=1e-7, atol=1e-9)
    assert float(out[0, 0].detach()) == 0.0


def test_balanced_l1_gradient_with_a_small_beta_is_float32_accurate() -> None:
    """The closed form's b m + beta was (b m + 1) + (beta - 1), which cancels: 7.5e-4 of the largest gradient at
    beta = 1e-4 (float32's own rounding allows ~1e-7)."""
    cfg = dict(type="BalancedL1Loss", beta=1e-4)
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(20000, 4, generator=generator, dtype=F64) * 1.2e-4
    target = torch.zeros_like(pred)
    leaf = pred.clone().requires_grad_()
    expected = grad_of(reference_loss(cfg, leaf, target, None, None, "mean"), leaf)
    leaf32 = pred.float().requires_grad_()
    got = grad_of(build_loss(cfg)(leaf32, target.float()), leaf32)
    assert float((got.double() - expected).abs().max() / expected.abs().max()) < 1e-5


CONFIDENT_BCE_CASES = {
    "ce_sigmoid_binary": dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="none"),
    "ce_mask": dict(type="CrossEntropyLoss", use_mask=True, reduction="none"),
    "focal_onehot": dict(type="FocalLoss", reduction="none"),
    "qfl_dense": dict(type="QualityFocalLoss", reduction="none"),
}


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
@pytest.mark.parametrize("key", list(CONFIDENT_BCE_CASES))
def test_bce_on_float_targets_keeps_its_relative_precision_when_confident(key: str, runtime: str) -> None:
    """Confident negatives (x in [-20, -8], t = 0) and positives (x in [8, 20], t = 1) on float targets, element
    by element: the BCE there is 3e-4 .. 2e-9. TorchScript wrote it as ATen's fused (1 - t) x - log_sigmoid(x),
    which cancels for the negatives (0.8% off at -10, 15% at -14, 0 for 4e-8 at -17), and so did every loss built
    on it (focal and QFL on float targets: values and gradients 10-70% off at -14 .. -17); eager sigmoid CE on
    float targets wrote softplus(x) - x t and sigmoid(x) - t, which cancel for the positives (7% off at 12, 0 at
    17). QFL's positives are left out: its |t - sigmoid(x)| rounds at t = 1 by definition (a soft score)."""
    cfg = CONFIDENT_BCE_CASES[key]
    loss = build_in(runtime, cfg)
    generator = torch.Generator().manual_seed(4)
    magnitude = 8.0 + 12.0 * torch.rand(40, 3, generator=generator, dtype=F64)
    target = (torch.rand(40, 3, generator=generator) < 0.5).to(F64)
    if key == "qfl_dense":
        target = torch.zeros_like(target)
    pred = torch.where(target > 0, magnitude, -magnitude)
    extra: tuple = ()
    if key == "ce_sigmoid_binary":
        pred, target = pred.flatten(), target.flatten()
    elif key == "ce_mask":  # one class: the RoIs' maps are the rows
        pred, target, extra = pred.unsqueeze(1), target, (torch.zeros(40, dtype=torch.long),)
    leaf = pred.clone().requires_grad_()
    exact = build_loss(cfg)(leaf, target, *extra)  # float64 math
    (exact_grad,) = torch.autograd.grad(exact.sum(), leaf)
    leaf32 = pred.float().requires_grad_()
    got = loss(leaf32, target.float(), *extra)
    (grad,) = torch.autograd.grad(got.sum(), leaf32)
    torch.testing.assert_close(got.double(), exact.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("runtime", ["eager", "script"])
def test_sigmoid_cross_entropy_with_class_weights_on_confident_negatives(runtime: str) -> None:
    """pos_weight's (1 - t) x + (1 + (p - 1) t) softplus(-x) cancels at x << 0 (7e-3 relative at x in [-20, -10]):
    the loss is written as (1 - t) softplus(x) + p t softplus(-x)."""
    generator = torch.Generator().manual_seed(0)
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[0.5, 2.0, 3.0])
    pred = -10.0 - 10.0 * torch.rand(500, 3, generator=generator, dtype=F64)
    target = torch.zeros_like(pred)  # all negatives: the loss is the sum of the tiny softplus(x)
    leaf = pred.clone().requires_grad_()
    expected = reference_loss(cfg, leaf, target, None, None, "mean")
    expected_grad = grad_of(expected, leaf)
    loss = build_loss(cfg)
    module = loss if runtime == "eager" else script_loss(loss)
    leaf32 = pred.float().requires_grad_()
    got = module(leaf32, target.float())
    value, expected_value = float(got.detach()), float(expected.detach())
    assert abs(value - expected_value) < 1e-6 * abs(expected_value)
    assert float((grad_of(got, leaf32).double() - expected_grad).abs().max() / expected_grad.abs().max()) < 1e-6


@pytest.mark.parametrize("runtime", ["eager", "script"])
def test_one_logit_per_sample_takes_one_class_weight(runtime: str) -> None:
    """FCOS-style centerness (N,) with ``class_weight=[w]``: the weight of the positives, as pos_weight in
    MMDetection (it raised 'class_weight has 1 entries but pred has N classes')."""
    loss = build_loss(dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[2.0]))
    module = loss if runtime == "eager" else script_loss(loss)
    pred, target = torch.randn(7, dtype=F64), torch.rand(7, dtype=F64)
    expected = F.binary_cross_entropy_with_logits(pred, target, pos_weight=torch.tensor([2.0], dtype=F64))
    torch.testing.assert_close(module(pred, target), expected)
    with pytest.raises((ValueError, torch.jit.Error), match="class_weight has 2 entries but pred has 1 classes"):
        build_loss(dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[1.0, 2.0]))(pred, target)


# --- softmax CE with class-probability targets ------------------------------------------------------------------


@pytest.mark.parametrize("class_weight", [None, [0.5, 2.0, 1.0, 0.0, 3.0]], ids=["plain", "class_weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4, 6)], ids=["NC", "NCHW"])
def test_softmax_probabilities_match_atens_cross_entropy(shape, reduction: str, class_weight) -> None:
    """Targets of pred's shape are F.cross_entropy's class probabilities, used as given (rows need not sum to 1);
    per sample ``-sum_c w_c t_c log softmax(x)_c``, then MMDetection's weighted reduction."""
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(shape, generator=g, dtype=F64) * 3
    target = torch.rand(shape, generator=g, dtype=F64)
    loss = build_loss(dict(type="CrossEntropyLoss", reduction=reduction, class_weight=class_weight))
    cw = None if class_weight is None else torch.tensor(class_weight, dtype=F64)
    expected = F.cross_entropy(pred, target, weight=cw, reduction="none")
    expected = {"none": expected, "sum": expected.sum(), "mean": expected.mean()}[reduction]
    torch.testing.assert_close(loss(pred, target), expected, **TOL)


@pytest.mark.parametrize("runtime", ["eager", "script", "compile"])
def test_softmax_probabilities_refuse_integer_targets(runtime: str) -> None:
    """Integer targets of pred's shape are neither class indices nor probabilities (F.cross_entropy refuses them)."""
    loss = build_in(runtime, dict(type="CrossEntropyLoss"))
    error = {"eager": ValueError, "script": torch.jit.Error, "compile": Exception}[runtime]
    with pytest.raises(error, match="class probabilities of pred's shape, which must be floating point"):
        loss(torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(error, match="class probabilities of pred's shape, which must be floating point"):
        loss(torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.bool))


@pytest.mark.parametrize("runtime", ["eager", "script"])
def test_labels_with_a_trailing_axis_are_told_to_drop_it(runtime: str) -> None:
    """Labels (N, 1) (a common leftover of a cat / unsqueeze) have pred's rank: softmax CE reads them as probability
    targets and focal as one-hot ones; both messages say that labels are (N,)."""
    error = ValueError if runtime == "eager" else torch.jit.Error
    labels = torch.zeros(4, 1, dtype=torch.long)
    ce = build_in(runtime, dict(type="CrossEntropyLoss"))
    with pytest.raises(error, match=r"got an integer or bool tensor.*squeeze a \(N, 1\) label"):
        ce(torch.randn(4, 3), labels)
    focal = build_in(runtime, dict(type="FocalLoss"))
    with pytest.raises(error, match=r"class labels are \(N,\).*squeeze a \(N, 1\) label"):
        focal(torch.randn(4, 3), labels)


@pytest.mark.parametrize("runtime", ["eager", "script"])
def test_softmax_probabilities_refuse_an_ignore_index(runtime: str) -> None:
    """An ignore_index >= 0 (configured or per call) has no labels to ignore in probability targets: refused, as
    F.cross_entropy refuses it; a negative one (the default -100, or -1) ignores nothing."""
    pred, target = torch.randn(6, 4, dtype=F64), torch.rand(6, 4, dtype=F64)
    error = ValueError if runtime == "eager" else torch.jit.Error
    with pytest.raises(error, match="ignore_index 255 applies to class indices"):
        build_in(runtime, dict(type="CrossEntropyLoss", ignore_index=255))(pred, target)
    default = build_in(runtime, dict(type="CrossEntropyLoss"))
    with pytest.raises(error, match="ignore_index 0 applies to class indices"):
        default(pred, target, None, None, None, 0)
    minus_one = build_in(runtime, dict(type="CrossEntropyLoss", ignore_index=-1))
    torch.testing.assert_close(minus_one(pred, target), default(pred, target), rtol=0, atol=0)
    torch.testing.assert_close(default(pred, target, None, None, None, -1), default(pred, target), rtol=0, atol=0)


@pytest.mark.parametrize("runtime", ["eager", "script"])
def test_softmax_probabilities_avg_non_ignore_is_the_mean_over_samples(runtime: str) -> None:
    """Nothing is ignored, so avg_non_ignore divides by the N samples, as "mean" does (MMDetection's count,
    ``label.numel() - (label == ignore_index).sum()``, would be the N x C target elements); an explicit avg_factor
    still wins."""
    g = torch.Generator().manual_seed(9)
    pred, target = torch.randn(10, 6, generator=g, dtype=F64), torch.rand(10, 6, generator=g, dtype=F64)
    weight = torch.rand(10, generator=g, dtype=F64)
    weight[:3] = 0.0
    plain = build_in(runtime, dict(type="CrossEntropyLoss"))
    avg = build_in(runtime, dict(type="CrossEntropyLoss", avg_non_ignore=True))
    per_sample = (-(target * torch.log_softmax(pred, 1)).sum(1)) * weight
    torch.testing.assert_close(avg(pred, target, weight), per_sample.sum() / 10, **TOL)
    torch.testing.assert_close(avg(pred, target, weight), plain(pred, target, weight), rtol=0, atol=0)
    factor = torch.tensor(4.0, dtype=F64)
    torch.testing.assert_close(avg(pred, target, weight, factor), per_sample.sum() / (4.0 + FLOAT32_EPS), **TOL)


def test_softmax_probabilities_compiled_mask_nan_rows_and_take_no_samples() -> None:
    """Compiled (fullgraph, dynamic): weight-0 samples with NaN/inf logits and targets change neither value nor
    gradient, and N = 0 gives 0 with a gradient."""
    cfg = dict(type="CrossEntropyLoss", class_weight=[0.5, 1.5] * 40)
    compiled, eager = build_in("compile", cfg), build_loss(cfg)
    inputs = draw("ce_softmax_probabilities", 9, seed=2)
    weight = inputs["weight"].clone()
    weight[:3] = 0.0
    clean = {**inputs, "weight": weight}
    rows = torch.arange(3)
    poisoned = {**clean, "pred": _poison(inputs["pred"], rows, float("nan")),
                "target": _poison(inputs["target"], rows, float("inf"))}
    out, grad, _ = run(compiled, poisoned)
    out_eager, grad_eager, _ = run(eager, clean)
    assert_finite(out)
    assert_finite(grad)
    assert (grad[:3] == 0).all()
    torch.testing.assert_close(out, out_eager, **TOL)
    torch.testing.assert_close(grad, grad_eager, **TOL)
    empty = draw("ce_softmax_probabilities", 0)
    out, grad, _ = run(compiled, empty)
    assert out.shape == () and float(out.detach()) == 0.0 and grad.shape == (0, 80)
