"""``weight_reduce_loss``: a per-sample weight of (N, C) losses multiplies the row sums, with the same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compile_privately, graphs_kept_by
from torch._dynamo.exc import TorchDynamoException

from visdet_export.reduction import FLOAT32_EPS, weight_reduce_loss

F64 = torch.float64


@pytest.mark.parametrize("n", [0, 1, 37])
@pytest.mark.parametrize(("reduction", "with_avg"), [("mean", False), ("mean", True), ("sum", False)])
def test_row_weight_reduces_like_the_expanded_weight(n: int, reduction: str, with_avg: bool) -> None:
    generator = torch.Generator().manual_seed(n)
    loss = torch.rand(n, 5, generator=generator, dtype=F64, requires_grad=True)
    weight = torch.rand(n, 1, generator=generator, dtype=F64) * (torch.rand(n, 1, generator=generator) > 0.3)
    avg = torch.tensor(3.5, dtype=F64) if with_avg else None
    rows = weight_reduce_loss(loss, weight, reduction, avg)
    expanded = weight_reduce_loss(loss, weight.expand(n, 5).contiguous(), reduction, avg)
    direct = (loss * weight).sum() / (avg + 1.1920928955078125e-07 if with_avg else max(loss.numel(), 1))
    torch.testing.assert_close(rows, expanded)
    torch.testing.assert_close(rows, direct if reduction == "mean" else (loss * weight).sum())
    (grad_rows,) = torch.autograd.grad(rows, loss)
    (grad_expanded,) = torch.autograd.grad(expanded, loss)
    torch.testing.assert_close(grad_rows, grad_expanded)


def test_row_weight_keeps_the_contract() -> None:
    loss, weight = torch.rand(4, 3, dtype=F64), torch.rand(4, 1, dtype=F64)
    with pytest.raises(ValueError, match="avg_factor"):
        weight_reduce_loss(loss, weight, "sum", torch.tensor(2.0, dtype=F64))
    assert weight_reduce_loss(loss, weight, "none").shape == (4, 3)
    # a weight that broadcasts the loss to more rows counts the elements of the product, as visdet does
    broadcast = weight_reduce_loss(torch.ones(1, 3, dtype=F64), torch.ones(4, 1, dtype=F64), "mean")
    assert float(broadcast) == 1.0


def test_avg_factor_is_one_number() -> None:
    """A per-sample avg_factor (a count per image left unsummed) failed in reshape with "shape '[]' is invalid"."""
    from visdet_export import build_loss

    loss = build_loss({"type": "FocalLoss"})
    pred, labels = torch.randn(6, 80), torch.randint(0, 81, (6,))
    with pytest.raises(ValueError, match=r"avg_factor must be a number or a one-element tensor, got shape \[6\]"):
        loss(pred, labels, None, torch.ones(6))
    torch.testing.assert_close(loss(pred, labels, None, torch.tensor([4.0])), loss(pred, labels, None, 4.0))


# (label, avg_factor factory, accepted): every kind of avg_factor a head may pass. numpy values are taken as
# tensors (torch.compile sees numpy scalars and 0-d arrays alike, as arrays); bools of every kind are refused
AVG_FACTOR_KINDS = [
    ("none", lambda: None, True),
    ("int", lambda: 3, True),
    ("float", lambda: 3.5, True),
    ("bool_true", lambda: True, False),
    ("bool_false", lambda: False, False),
    ("tensor_f32", lambda: torch.tensor(3.5), True),
    ("tensor_f64", lambda: torch.tensor(3.5, dtype=F64), True),
    ("tensor_f16", lambda: torch.tensor(3.5, dtype=torch.float16), True),
    ("tensor_i64", lambda: torch.tensor(3), True),
    ("tensor_1", lambda: torch.tensor([3.5]), True),
    ("tensor_bool", lambda: torch.tensor(True), False),
    ("tensor_3", lambda: torch.ones(3), False),
    ("np_float64", lambda: np.float64(3.5), True),
    ("np_float32", lambda: np.float32(3.5), True),
    ("np_int64", lambda: np.int64(3), True),
    ("np_0d_float", lambda: np.array(3.5), True),
    ("np_0d_int", lambda: np.array(3), True),
    ("np_1", lambda: np.array([3.5]), True),
    ("np_bool", lambda: np.bool_(True), False),
    ("np_3", lambda: np.ones(3), False),
]


def _outcome(loss: torch.nn.Module, pred: torch.Tensor, target: torch.Tensor, avg_factor: object) -> object:
    """The loss, or the refusal: a ValueError naming avg_factor (under fullgraph, Dynamo's error wrapping it)."""
    try:
        return loss(pred, target, None, avg_factor)
    except (ValueError, TorchDynamoException) as error:
        chain, cause = [], error
        while cause is not None:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__ or cause.__context__
        assert any("avg_factor" in link for link in chain), chain
        return "refused"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("make", "accepted"), [pytest.param(m, a, id=k) for k, m, a in AVG_FACTOR_KINDS])
def test_avg_factor_kinds_agree_eager_and_compiled(make, accepted: bool, dtype: torch.dtype) -> None:
    """Compiled, True was taken as 1 (False as 0: sum / eps), numpy 0-d arrays were accepted where eager refused
    them, and numpy float64 values (scalars included) turned a float32 loss into float64."""
    from visdet_export import build_loss

    generator = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(5, 4, generator=generator, dtype=dtype) for _ in range(2))
    eager = _outcome(build_loss({"type": "L1Loss"}), pred, target, make())
    compiled_loss = compile_privately(build_loss({"type": "L1Loss"}), backend="aot_eager", fullgraph=True, dynamic=True)
    compiled = _outcome(compiled_loss, pred, target, make())
    if not accepted:
        assert (eager, compiled) == ("refused", "refused")
        return
    assert isinstance(eager, torch.Tensor) and isinstance(compiled, torch.Tensor), (eager, compiled)
    assert eager.dtype == compiled.dtype == dtype and eager.shape == compiled.shape == ()
    factor = make()
    count = torch.tensor(20.0, dtype=F64) if factor is None else torch.as_tensor(factor).to(dtype).double().reshape(())
    expected = (pred - target).abs().double().sum() / (count + (0.0 if factor is None else FLOAT32_EPS))
    torch.testing.assert_close(eager, compiled, rtol=0, atol=0)
    torch.testing.assert_close(eager, expected.to(dtype))


def test_avg_factor_values_never_recompile() -> None:
    """A training loop's avg_factor changing every step compiles once per kind (Python int, Python float, 0-d
    tensor, numpy scalar: Dynamo guards on the type, and on a tensor's dtype and rank), never per value."""
    from visdet_export import build_loss

    loss = build_loss({"type": "L1Loss"})
    compiled = compile_privately(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    pred, target = torch.randn(5, 4), torch.randn(5, 4)
    kinds = [int, float, torch.tensor, np.float64]
    for step in range(2, 8):
        for kind in kinds:
            torch.testing.assert_close(compiled(pred, target, None, kind(step)), loss(pred, target, None, kind(step)))
    assert graphs_kept_by(compiled) == len(kinds)


@pytest.mark.parametrize(("avg_factor", "kind"), [(torch.tensor(True), "bool"), (torch.tensor(3.0 + 0j), "complex")])
def test_scripted_avg_factor_refusal_names_the_dtype(avg_factor: torch.Tensor, kind: str) -> None:
    """A C++ caller passing a bool tensor as avg_factor read "got a tensor of 11": scripted code prints a dtype as
    its enum number. Eager and scripted now both name it."""
    from visdet_export import build_loss
    from visdet_export.export.torchscript import script_loss

    loss = build_loss({"type": "FocalLoss"})
    pred, labels = torch.randn(6, 80), torch.randint(0, 81, (6,))
    with pytest.raises(ValueError, match=f"avg_factor must be a real number, got a tensor of (torch.)?{kind}"):
        loss(pred, labels, None, avg_factor)
    with pytest.raises(torch.jit.Error, match=f"avg_factor must be a real number, got a tensor of {kind}$"):
        script_loss(loss)(pred, labels, None, avg_factor)


@pytest.mark.parametrize("weight_shape", [(4, 1), (4, 3)])
def test_avg_factor_of_zero_is_offset_by_eps_with_a_weight_per_row_or_element(weight_shape) -> None:
    """An image batch without positives gives avg_factor 0: the mean divides by avg_factor + eps (visdet's float32
    machine epsilon), per-row weights (the row-sum path) as per-element ones, so weight-0 rows give 0, not NaN, and
    a non-zero total is divided by eps exactly."""
    loss = torch.rand(4, 3, dtype=F64) + 0.5
    zero = torch.tensor(0.0, dtype=F64)
    assert float(weight_reduce_loss(loss, torch.zeros(weight_shape, dtype=F64), "mean", zero)) == 0.0
    weight = torch.ones(weight_shape, dtype=F64)
    torch.testing.assert_close(weight_reduce_loss(loss, weight, "mean", zero), loss.sum() / FLOAT32_EPS,
                               rtol=1e-15, atol=0)
