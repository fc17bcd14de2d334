"""Mixed precision: every loss called inside ``torch.autocast``, as MMDetection's ``AmpOptimWrapper`` and
``torch.amp`` training loops call it, computes exactly as outside it, in eager, compiled and scripted runtimes
(scripted float32 gradients within two ulps: see WARM_UP_CALLS).

The losses compute in float32 (float64 for float64 inputs) whatever autocast says: no operator of theirs is one
autocast lowers, and none is one it refuses. Each runtime is compared with itself outside autocast, so the test is
exact where runtimes legitimately differ from one another. CPU autocast (bfloat16) runs the same dispatcher keys
and the same TorchScript autocast pass as CUDA's; the pass refused ``aten::binary_cross_entropy`` under either,
even on float32 inputs in a branch not taken, so scripted focal and QFL losses failed at their first call. CUDA
autocast also refuses that operator in eager and compiled code, where CPU autocast lets it through: these tests
refuse it on the CPU too.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Optional

import pytest
import torch
from conftest import CONFIG_NAMES, guard_variant_runner
from torch import Tensor

RUNTIMES = ("eager", "compile", "script")
CELLS = [(name, runtime) for name in CONFIG_NAMES for runtime in RUNTIMES]
N = 37
#: Calls in each mode before the compared ones: the plans a training loop runs. TorchScript's profiling executor
#: runs a graph op by op for its first calls, then an optimized plan, one per autocast state, whose differentiable
#: graphs group the ops differently where autocast's pass inserted its (here no-op) casts: scripted QFL's float32
#: gradient then differs in the last bit in 1 of 2960 elements (the first calls agree bit for bit, which a module
#: test_matrix had already called made this test depend on the order of the files).
WARM_UP_CALLS = 3
#: Two float32 ulps, relative.
SCRIPT_PLANS_RTOL = 2.0 * 2.0**-23


@pytest.fixture(autouse=True, scope="module")
def cuda_autocast_bans():
    """CUDA autocast's refusal of ``aten::binary_cross_entropy`` (``binary_cross_entropy_banned``), on the CPU."""

    def banned(*args: object) -> Tensor:
        raise RuntimeError("binary_cross_entropy is unsafe to autocast (CUDA's refusal, on the CPU)")

    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # overriding CPU autocast's kernel is the point
        library.impl("binary_cross_entropy", banned, "AutocastCPU")
    yield
    library._destroy()


def test_the_refusal_is_in_place():
    probs = torch.rand(3)
    with pytest.raises(RuntimeError, match="unsafe to autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.binary_cross_entropy(probs, probs)


def _value_and_grad(
    run: Callable[[Mapping[str, Tensor]], Tensor], inputs: Mapping[str, Tensor], pred: str, autocast: bool
) -> tuple[Tensor, Optional[Tensor]]:
    leaf = inputs[pred].detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = run({**inputs, pred: leaf})
    (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    return value.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "runtime"), CELLS, ids=[f"{n}-{r}" for n, r in CELLS])
def test_autocast_changes_nothing(runner_cache, name, runtime, dtype):
    loss, spec = runner_cache.loss(name)
    # aot_eager: autocast acts while dynamo and AOT autograd trace, before any code generation
    key, options = guard_variant_runner(name, runtime)
    runner = runner_cache.runner(name, runtime, key=key, **options)
    drawn = spec.sample(loss, N, seed=3, include=list(runner.names))
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in drawn.items()}
    for autocast in (False, True) * WARM_UP_CALLS:
        _value_and_grad(runner, inputs, spec.pred, autocast)
    expected, expected_grad = _value_and_grad(runner, inputs, spec.pred, autocast=False)
    value, grad = _value_and_grad(runner, inputs, spec.pred, autocast=True)
    assert value.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=0.0, atol=0.0)
    assert grad is not None and expected_grad is not None and grad.dtype == dtype
    # a bfloat16 op inside would be ~1e-3 off; TorchScript's two plans round a float32 gradient apart by one ulp
    rtol = SCRIPT_PLANS_RTOL if runtime == "script" and grad.dtype == torch.float32 else 0.0
    torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=0.0)
