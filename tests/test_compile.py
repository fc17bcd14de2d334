"""torch.compile(fullgraph=True, dynamic=True): no graph breaks, parity with eager, one graph per training run.

Backends (measured on the 2-core CI CPU): inductor for the configurations whose kernels it generates
(``conftest.INDUCTOR_CONFIGS``: focal, qfl, giou, dfl, softmax CE; ~20-30 s each, forward + backward), aot_eager
for every configuration's variants (optional inputs absent, reduction overrides; 1-5 s per graph).

Graph counts: every axis the spec calls N is marked unbacked with one shared shape id
(:func:`visdet_export.runtimes.mark_sample_dims`), so N = 0 and N = 1 reuse the graph compiled for large N. A
backed N would get 0/1 specialisation guards (``2 <= N``, ``N != 1``) and add one graph for N = 0 and one for
N = 1 (``test_backed_sizes_specialise_on_0_and_1`` documents that).
"""

from __future__ import annotations

import random
import re

import pytest
import torch
from conftest import CONFIG_NAMES, INDUCTOR_CONFIGS, compile_privately, graphs_kept_by, guard_variant_runner
from torch._dynamo.symbolic_convert import TensorifyState
from torch._dynamo.testing import CompileCounter

from visdet_export.runtimes import build_runner, default_names

SIZES = (0, 1, 7, 300)


def _value_grad(fn, inputs, pred, **kwargs):
    leaf = inputs[pred].detach().clone().requires_grad_(True)
    value = fn({**inputs, pred: leaf}, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    return value.detach(), torch.zeros_like(leaf) if grad is None else grad


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_no_graph_breaks(runner_cache, name):
    """One Dynamo graph (no code generation): under ``fullgraph=True`` a graph break raises, naming its reason."""
    loss, spec = runner_cache.loss(name)
    inputs = spec.sample(loss, 7, seed=1)
    counter = CompileCounter()
    compile_privately(lambda x: spec.call(loss, x), backend=counter, fullgraph=True, dynamic=True)(inputs)
    assert counter.frame_count == 1 and counter.op_count > 0


def _aot_eager(runner_cache, name):
    """aot_eager, called here without the optional inputs, with reduction overrides and without grad: the runner of
    such calls, not the matrix's (which keeps one graph; test_properties asserts it)."""
    key, options = guard_variant_runner(name, "compile")
    return runner_cache.runner(name, "compile", key=key, **options)


@pytest.mark.parametrize("name", [name for name in CONFIG_NAMES if name.startswith(("focal", "qfl", "ce_sigmoid"))])
def test_compiled_inference_matches_eager(runner_cache, name):
    """Without gradient (evaluation) torch.compile traces the forward-only formulation (focal / QFL / sigmoid CE on
    labels: the negatives' loss everywhere and the label's element scattered in), with NaN at the weight-0 rows."""
    loss, spec = runner_cache.loss(name)
    compiled = _aot_eager(runner_cache, name)
    eager = runner_cache.runner(name, "eager")
    for index, n in enumerate(SIZES):
        inputs = spec.sample(loss, spec.capped(n), seed=index, include=default_names(loss, spec))
        pred, unweighted = inputs[spec.pred], inputs["weight"] == 0
        unweighted = unweighted.reshape(unweighted.shape + (1,) * (pred.dim() - unweighted.dim()))
        inputs[spec.pred] = torch.where(unweighted, float("nan"), pred)
        with torch.no_grad():
            got, want = compiled(inputs), eager(inputs)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("optional", ["all", "none"])
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_compiled_matches_eager_with_and_without_optional_inputs(runner_cache, name, optional):
    loss, spec = runner_cache.loss(name)
    compiled = _aot_eager(runner_cache, name)
    eager = runner_cache.runner(name, "eager")
    include = default_names(loss, spec) if optional == "all" else []
    for index, n in enumerate(SIZES):
        inputs = spec.sample(loss, spec.capped(n), seed=index, include=include)
        want, want_grad = _value_grad(eager, inputs, spec.pred)
        got, got_grad = _value_grad(compiled, inputs, spec.pred)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)


def _one_per_loss_type():
    from visdet_export.specs import representative_configs

    seen = {}
    for name, cfg in representative_configs().items():
        seen.setdefault(cfg["type"], name)
    return tuple(seen.values())


# "mean" is every configuration's own reduction, covered above; the overrides run once per loss type.
@pytest.mark.parametrize("override", ["none", "sum"])
@pytest.mark.parametrize("name", _one_per_loss_type())
def test_compiled_reduction_override(runner_cache, name, override):
    loss, spec = runner_cache.loss(name)
    compiled = _aot_eager(runner_cache, name)
    eager = runner_cache.runner(name, "eager")
    # avg_factor is rejected with "sum" (visdet's rule), so "sum" runs without it.
    include = [n for n in default_names(loss, spec) if not (override == "sum" and n == "avg_factor")]
    for index, n in enumerate((0, 7)):
        inputs = spec.sample(loss, spec.capped(n), seed=10 + index, include=include)
        want, want_grad = _value_grad(eager, inputs, spec.pred, reduction_override=override)
        got, got_grad = _value_grad(compiled, inputs, spec.pred, reduction_override=override)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)


def _inductor(runner_cache, name):
    return runner_cache.runner(name, "compile", key="compile:inductor", backend="inductor")


@pytest.mark.parametrize("name", INDUCTOR_CONFIGS)
def test_inductor_matches_eager(runner_cache, name):
    loss, spec = runner_cache.loss(name)
    compiled = _inductor(runner_cache, name)
    eager = runner_cache.runner(name, "eager")
    for index, n in enumerate(SIZES):
        inputs = spec.sample(loss, n, seed=20 + index, include=default_names(loss, spec))
        want, want_grad = _value_grad(eager, inputs, spec.pred)
        got, got_grad = _value_grad(compiled, inputs, spec.pred)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)


def _step_sizes(spec, steps: int, rng: random.Random) -> list[int]:
    """N per step, drawn from [4096, 200000]; for (N, 80) class scores the top is 20000 (1.6M logits a step) to
    keep 20 eager + compiled steps quick on 2 cores: guards and graph counts do not depend on how large N is."""
    high = 200_000 if spec.per_sample_elements() <= 17 else 20_000
    return [rng.randint(4096, high) for _ in range(steps)]


@pytest.mark.parametrize("name", INDUCTOR_CONFIGS)
def test_training_loop_compiles_once(runner_cache, name):
    """20 steps with a new N, a new avg_factor tensor and new weights each, then N = 0 and N = 1: one graph."""
    from torch._dynamo.utils import counters

    loss, spec = runner_cache.loss(name)
    compiled = _inductor(runner_cache, name)
    names = default_names(loss, spec)
    rng = random.Random(0)
    unique_before = counters["stats"]["unique_graphs"]
    already = compiled.graph_count()  # 1 if another test compiled it first, else 0
    sizes = _step_sizes(spec, 20, rng) + [0, 1]
    for step, n in enumerate(sizes):
        inputs = spec.sample(loss, n, seed=100 + step, include=names)
        assert torch.is_tensor(inputs["avg_factor"])
        pred = inputs[spec.pred].detach().requires_grad_(True)
        value = compiled({**inputs, spec.pred: pred})
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(pred.grad).all()
        if step in (0, len(sizes) - 3, len(sizes) - 2, len(sizes) - 1):
            want, want_grad = _value_grad(runner_cache.runner(name, "eager"), inputs, spec.pred)
            # Large N: a float32 sum of up to 1.6M terms in another order than eager's (measured 1.4e-5 relative
            # at N = 20000 x 80), so the value gets rtol 1e-4; gradients are element-wise.
            torch.testing.assert_close(value.detach(), want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(pred.grad, want_grad, rtol=1e-5, atol=1e-6)
    assert compiled.graph_count() == 1
    assert counters["stats"]["unique_graphs"] - unique_before == (0 if already else 1)


def test_backed_sizes_specialise_on_0_and_1(runner_cache):
    """Without unbacked marking a dynamic N gets 0/1 specialisation: N = 0 and N = 1 each add a graph. This is
    why the compile runtime marks N unbacked (documented bound: 3 graphs for N >= 2, 0 and 1)."""
    loss, spec = runner_cache.loss("l1")
    plain = build_runner("compile", loss, spec, backend="eager", mark_unbacked=False)
    marked = build_runner("compile", loss, spec, backend="eager")
    counts = []
    for n in (64, 65, 0, 1):
        inputs = spec.sample(loss, n, seed=n, include=default_names(loss, spec))
        torch.testing.assert_close(plain(inputs), marked(inputs))
        counts.append((plain.graph_count(), marked.graph_count()))
    assert counts == [(1, 1), (1, 1), (2, 1), (3, 1)]


def test_compiled_softmax_cross_entropy_on_maps():
    """Softmax CE over (N, C, H, W) logits (semantic maps): under compile the label's log-probability is a select
    summed over classes rather than a gather; values and gradients match eager, ignored and out-of-range labels and
    weight-0 pixels with NaN logits included."""
    from visdet_export.losses import CrossEntropyLoss

    module = CrossEntropyLoss(class_weight=[1.0, 2.0, 0.5, 1.5], avg_non_ignore=True)
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(6, 4, 3, 5, generator=g, dtype=torch.float64)
    label = torch.randint(-1, 6, (6, 3, 5), generator=g)
    label[0, 0, :3] = -100
    weight = torch.where(torch.rand(6, 3, 5, generator=g, dtype=torch.float64) < 0.2, 0.0, 1.0)
    pred = torch.where((weight == 0).unsqueeze(1), float("nan"), pred)
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    results = []
    for fn in (module, compiled):
        leaf = pred.clone().requires_grad_(True)
        value = fn(leaf, label, weight)
        results.append((value.detach(), *torch.autograd.grad(value, leaf)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
    assert torch.isfinite(results[1][1]).all() and (results[1][1] != 0).any()


def test_compiled_distribution_focal_bins_and_masked_rows():
    """Compiled DFL trains on the row's log-sum-exp less its two weighted bins (the bins selected against a float
    class index): values and gradients match eager at targets on and between bins, 0 and exactly reg_max, with
    logits near 1000 and a -inf logit away from the bins, and weight-0 rows with NaN / inf logits and targets reach
    neither."""
    from visdet_export.losses import DistributionFocalLoss

    reg_max = 16
    module = DistributionFocalLoss(reduction="none")
    g = torch.Generator().manual_seed(11)
    pred = torch.randn(9, reg_max + 1, generator=g, dtype=torch.float64) * 4
    target = torch.tensor([0.0, 7.3, 8.0, reg_max - 1e-6, float(reg_max), 3.5, 0.25, float("nan"), 2.0],
                          dtype=torch.float64)
    weight = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    pred[2] += 1000.0  # exp overflows unless shifted by the row's maximum
    pred[1, 0] = float("-inf")  # away from the target's bins: a finite loss, as log_softmax gives
    pred[5] = float("nan")
    pred[8] = float("inf")
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    results = []
    for fn in (module, compiled):
        leaf = pred.clone().requires_grad_(True)
        value = fn(leaf, target, weight)
        results.append((value.detach(), *torch.autograd.grad(value.sum(), leaf)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    value, grad = results[1]
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (grad[[5, 7, 8]] == 0).all() and (value[[5, 7, 8]] == 0).all()
    logp = torch.log_softmax(pred[4], 0)
    torch.testing.assert_close(value[4], -logp[reg_max], rtol=1e-12, atol=1e-12)


# Losses whose compiled training path is an autograd.Function (the closed forms saved by the forward), twice in one
# graph: a head's focal + QFL (TOOD), Cascade R-CNN's three SmoothL1 stages, student and teacher terms.
FUNCTION_PAIRS = [
    (dict(type="FocalLoss"), dict(type="FocalLoss")),
    (dict(type="FocalLoss"), dict(type="QualityFocalLoss")),
    (dict(type="QualityFocalLoss", beta=1.5), dict(type="CrossEntropyLoss", use_sigmoid=True)),
    (dict(type="L1Loss"), dict(type="L1Loss")),
    (dict(type="SmoothL1Loss", beta=0.5), dict(type="SmoothL1Loss", beta=0.5)),
    (dict(type="BalancedL1Loss"), dict(type="BalancedL1Loss")),
    (dict(type="MSELoss"), dict(type="IoULoss")),
]


@pytest.mark.parametrize(("first", "second"), FUNCTION_PAIRS, ids=lambda c: c["type"])
def test_two_closed_form_losses_in_one_compiled_graph(first, second):
    """With dynamic=True, a float that reaches an autograd.Function's forward from outside it is symbolic, and
    Dynamo failed to lift it when the second loss traced the same Function (an AssertionError, no graph)."""
    from visdet_export import build_loss

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 21, (8,), generator=g)
    boxes = torch.rand(8, 2, generator=g) * 50
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(8, 2, generator=g) * 20], 1)

    def arguments(cfg, pred):
        if cfg["type"] == "QualityFocalLoss":
            return pred, (labels, torch.rand(8, generator=torch.Generator().manual_seed(1))), torch.rand(8)
        if cfg["type"] in ("FocalLoss", "CrossEntropyLoss"):
            return pred, labels, torch.rand(8)
        return pred, boxes, torch.rand(8) if cfg["type"] == "IoULoss" else torch.rand(8, 4)

    def draw(cfg):
        classes = cfg["type"] in ("FocalLoss", "QualityFocalLoss", "CrossEntropyLoss")
        return (torch.randn(8, 20, generator=g) if classes else boxes + torch.randn(8, 4, generator=g)).requires_grad_()

    losses = [build_loss(cfg) for cfg in (first, second)]
    preds = [draw(cfg) for cfg in (first, second)]
    calls = [arguments(cfg, pred) for cfg, pred in zip((first, second), preds)]

    def step():
        return losses[0](*calls[0]) + losses[1](*calls[1])

    compiled = compile_privately(step, fullgraph=True, dynamic=True, backend="aot_eager")()
    got = torch.autograd.grad(compiled, preds)
    want = torch.autograd.grad(step(), preds)
    torch.testing.assert_close(compiled, step())
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want)


def test_dfl_bins_reshaped_from_an_unbacked_head_output():
    """A GFL head's DFL bins are ``reg.reshape(-1, reg_max + 1)`` of an N-row output: with N unbacked, 4 N rows
    against a target of its own unbacked length. The input checks assert equal sizes when the graph runs instead
    of guarding while tracing ("Could not guard on data-dependent expression Ne(40, 4*u0)" before)."""
    from visdet_export import build_loss

    dfl = build_loss(dict(type="DistributionFocalLoss"))
    compiled = torch.compile(lambda r, t: dfl(r.reshape(-1, 8), t), fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (10, 3):
        reg = torch.randn(n, 32, requires_grad=True)
        target = torch.rand(4 * n) * 6.9
        torch._dynamo.decorators.mark_unbacked(reg, 0)
        torch._dynamo.decorators.mark_unbacked(target, 0)
        got = compiled(reg, target)
        (grad,) = torch.autograd.grad(got, reg)
        want = dfl(reg.reshape(-1, 8), target)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, torch.autograd.grad(want, reg)[0])


@pytest.mark.parametrize(
    ("cfg", "weight_last"), [({"type": "CrossEntropyLoss", "use_sigmoid": True}, "N"), ({"type": "SmoothL1Loss"}, 1)],
    ids=["yolov3_conf", "yolov3_wh"],
)
def test_unbacked_samples_on_an_inner_axis(cfg, weight_last) -> None:
    """YOLOv3's (B, K) objectness and (B, K, 2) offsets with (B, K) / (B, K, 1) weights, K unbacked: the weight
    shape checks decide on an axis of size 1 without a guard ("Could not guard on ... Eq(u0, 1)" before)."""
    from visdet_export import build_loss

    loss = build_loss(cfg)
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for k in (5, 9):
        inner = () if weight_last == "N" else (2,)
        pred, target = torch.randn(2, k, *inner, requires_grad=True), torch.rand(2, k, *inner)
        weight = torch.rand(2, k, *((1,) if inner else ()))
        for tensor in (pred, target, weight):
            torch._dynamo.decorators.mark_unbacked(tensor, 1)
        got, want = compiled(pred, target, weight), loss(pred, target, weight)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, pred)[0], torch.autograd.grad(want, pred)[0])


@pytest.mark.parametrize("cfg", [{"type": "FocalLoss"}, {"type": "GIoULoss"}])
def test_a_python_float_avg_factor_is_traced_not_specialised(cfg) -> None:
    """MMDetection heads pass `.item()` counts: each new float recompiled, and fullgraph=True failed after 8."""
    from visdet_export import build_loss
    from visdet_export.specs import spec_for

    loss = build_loss(cfg)
    inputs = spec_for(loss).sample(loss, 6, seed=0)
    pred, target = inputs["pred"], inputs["target"]
    for dynamic in (True, None):
        TensorifyState.clear()  # the first loop's compile as the second's earlier test: see conftest
        # aot_eager: the float is specialised below dynamo (tensorify)
        step = compile_privately(
            lambda p, t, a: loss(p, t, avg_factor=a), fullgraph=True, dynamic=dynamic, backend="aot_eager"
        )
        for count in range(1, 13):
            torch.testing.assert_close(step(pred, target, count + 0.5), loss(pred, target, avg_factor=count + 0.5))
        # dynamic=None: one recompile makes the float symbolic (12 before the 8th failed); dynamic=True: symbolic at
        # once
        assert graphs_kept_by(step) == (1 if dynamic else 2), dynamic


def test_dfl_bins_that_do_not_match_reg_max_are_named_under_compile() -> None:
    """The eager message formatted the symbolic bin count, which dynamo cannot trace ("builtin operator str")."""
    from visdet_export import build_loss

    loss = torch.compile(build_loss({"type": "DistributionFocalLoss", "reg_max": 7}), fullgraph=True, dynamic=True,
                         backend="aot_eager")
    target = torch.rand(6) * 7
    assert torch.isfinite(loss(torch.randn(6, 8), target))
    with pytest.raises(Exception, match=r"pred's bins and reg_max \+ 1 differ"):
        loss(torch.randn(6, 17), target)


def _float_hyperparameters(loss: torch.nn.Module) -> dict[str, float]:
    return {key: value for key, value in vars(loss).items() if isinstance(value, float)}


def _graph_input_names(loss: torch.nn.Module, spec, inputs) -> list[str]:
    """The placeholders of the loss's Dynamo graph; ``compile_privately``'s frame holds the loss as ``fn``, so its
    attributes that are graph inputs are named ``l_fn_<name>``."""
    names: list[str] = []

    def backend(gm, example_inputs):
        names.extend(node.name for node in gm.graph.nodes if node.op == "placeholder")
        return gm.forward

    spec.call(compile_privately(loss, backend=backend, fullgraph=True, dynamic=True), inputs)
    return names


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_float_hyperparameters_are_constants_of_the_graph(name) -> None:
    """Under ``dynamic=True`` Dynamo makes a plain float attribute a graph input, and torch 2.13's inductor caches
    then serve one value's kernel to another (``test_inductor_caches_serve_no_stale_hyperparameter``): every float
    hyper-parameter is a :class:`~visdet_export.validation.StaticFloat`, compiled as a constant. Defaults too: the
    ``eps`` added to ``avg_factor`` was a tensor input read back with ``.item()``. Inputs left: the call's tensors,
    buffers and sizes."""
    from visdet_export import build_loss
    from visdet_export.specs import CONFIG_VARIANTS, representative_configs, spec_for
    from visdet_export.validation import StaticFloat

    loss = build_loss(representative_configs()[name])
    spec = spec_for(loss, CONFIG_VARIANTS.get(name))
    floats = _float_hyperparameters(loss)
    assert "loss_weight" in floats
    assert all(isinstance(value, StaticFloat) for value in floats.values()), floats
    inputs = spec.sample(loss, 5, seed=3)
    assert "avg_factor" in inputs
    names = _graph_input_names(loss, spec, inputs)
    assert not [f"l_fn_{key}" for key in floats if f"l_fn_{key}" in names]
    assert not [name for name in names if not re.fullmatch(r"s\d+|l_fn_buffers_\w+|l_(?!fn_)\w+", name)], names


def test_a_static_float_keeps_its_literal_through_copies_and_pickles() -> None:
    """Losses are deep-copied (the device cells, DDP's replicas) and pickled (``torch.save`` of a module):
    :func:`~visdet_export.numerics.static` reads the copy's value, not a stale or missing string."""
    import copy
    import pickle

    from visdet_export.numerics import static
    from visdet_export.validation import StaticFloat

    for value in (0.1, 1e-38, -2.5e30, 1.0):
        original = StaticFloat(value)
        for copied in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
            assert type(copied) is StaticFloat and copied.literal == repr(value)
            assert static(copied) == value and type(static(copied)) is float
    assert static(0.25) == 0.25  # a plain float set on a built module


@pytest.mark.skipif(
    torch.__version__ < "2.12", reason="torch 2.11's Dynamo traces a StaticFloat only through static() (README)"
)
def test_a_static_float_read_without_static_is_a_guarded_constant() -> None:
    """Subclasses and plugins that read ``self.eps`` directly: arithmetic, clamps and comparisons with tensors trace
    (a comparison failed before ``StaticFloat`` defined its own), and a second value compiles a second graph."""
    from visdet_export.validation import StaticFloat

    class Direct(torch.nn.Module):
        def __init__(self, eps: float) -> None:
            super().__init__()
            self.eps = StaticFloat(eps)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kept = (x > self.eps) & (self.eps <= x) & (x != self.eps)
            return torch.where(kept, x.clamp(min=self.eps), self.eps * x).sum() + (1.0 if self.eps > 1e-3 else 0.0)

    compiled = compile_privately(lambda module, x: module(x), backend="aot_eager", fullgraph=True, dynamic=True)
    x = torch.rand(64) * 0.02
    for eps in (1e-6, 1e-2, 1e-6):
        module = Direct(eps)
        torch.testing.assert_close(compiled(module, x), module(x))
    assert graphs_kept_by(compiled) == 2


def test_a_plain_float_hyperparameter_is_a_graph_input() -> None:
    """What the test above looks for: a float set after the build (a plain one) becomes the input ``l_fn_<name>``."""
    from visdet_export import build_loss
    from visdet_export.specs import spec_for

    loss = build_loss(dict(type="GIoULoss"))
    spec = spec_for(loss)
    inputs = spec.sample(loss, 5, seed=3)
    loss.eps, loss.loss_weight = 1e-6, 0.75
    assert {"l_fn_eps", "l_fn_loss_weight"} <= set(_graph_input_names(loss, spec, inputs))


def test_inductor_caches_serve_no_stale_hyperparameter(tmp_path, monkeypatch) -> None:
    """Two IoU losses with different ``eps``, compiled (inductor, ``dynamic=True``, ``pred`` requiring grad) one
    after the other with a fresh cache: a symbolic eps made torch 2.13 serve the first module's kernel to the
    second (eps=1e-2 returned the eps=1e-6 numbers). Across processes it is the same on-disk cache."""
    from visdet_export import build_loss
    from visdet_export.specs import sample_boxes

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    generator = torch.Generator().manual_seed(5)
    target = sample_boxes(64, generator, torch.float32)
    # half the boxes far off their targets: IoU 0, clamped at eps
    offset = torch.where(torch.arange(64) % 2 == 0, 300.0, 0.3).unsqueeze(1)
    pred = target + offset * torch.rand(64, 4, generator=generator)
    results = []
    for eps in (1e-6, 1e-2):
        loss = build_loss(dict(type="IoULoss", eps=eps))
        got = compile_privately(loss, fullgraph=True, dynamic=True)(pred.clone().requires_grad_(True), target)
        want = loss(pred, target)
        torch.testing.assert_close(got, want)
        results.append(want)
    assert not torch.allclose(results[0], results[1])  # the change shows in the numbers
