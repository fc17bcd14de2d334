"""The runtime matrix: every registered loss x {eager, compile, script, onnx, pt2} x N in {0, 1, 7, 1000}.

Rows come from the registry-driven representative configurations (every name in ``MODELS.module_dict`` has at
least one). Runners come from the session cache, so nothing is compiled or exported twice: the compile column
uses inductor for ``conftest.INDUCTOR_CONFIGS`` and aot_eager elsewhere; the pt2 column runs each
configuration's entry of one joint AOTInductor bundle of every configuration (see test_pt2 for why). Values are
compared for every runtime, and gradients with respect to ``pred`` for the differentiable ones (compile, script)
and the joint pt2 entries, at ``visdet_export.check.TOLERANCES``; the ONNX column runs twice, the loss alone and
as distillation exports it, with its gradient output (``check --onnx joint``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIG_NAMES, assert_all_close, compile_backend, guard_variant_runner
from reference import strided

from visdet_export.check import TOLERANCES, RunnerCache, check_cell, compare_with_eager, run_matrix, runner_options
from visdet_export.check import main as check_main
from visdet_export.registry import MODELS
from visdet_export.runtimes import LossRunner
from visdet_export.specs import LossSpec, SampleOptions, representative_configs

RUNTIMES = ("eager", "compile", "script", "onnx", "pt2")
CELLS = [(name, runtime) for name in CONFIG_NAMES for runtime in RUNTIMES]


@pytest.fixture(autouse=True)
def compiled_runners_keep_one_graph(runner_cache):
    """Whatever a test here feeds the matrix's compiled runners, each keeps its one graph: test_properties and
    test_compile assert it when they run after this file on its worker (inputs of other strides recompile)."""
    yield
    for name in CONFIG_NAMES:
        runner = runner_cache.runners.get((name, runner_options(name, "compile", backend=compile_backend(name))[0]))
        assert runner is None or runner.graph_count() == 1, f"{name}: {runner.graph_count()} graphs"


def test_every_registered_loss_has_a_row():
    covered = {cfg["type"] for cfg in representative_configs().values()}
    assert set(MODELS.module_dict) <= covered, sorted(set(MODELS.module_dict) - covered)


@pytest.mark.parametrize(("name", "runtime"), CELLS, ids=[f"{n}-{r}" for n, r in CELLS])
def test_cell(runner_cache, name, runtime):
    key, options = runner_options(name, runtime, backend=compile_backend(name))
    cell = check_cell(name, runtime, runner_cache, runner_key=key, runner_options=options)
    assert cell.status == "pass", cell.reason


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_onnx_joint_cell(runner_cache, name):
    """The ONNX column as distillation graphs export it (``check --onnx joint``): loss and gradient outputs."""
    key, options = runner_options(name, "onnx", onnx="joint")
    cell = check_cell(name, "onnx", runner_cache, runner_key=key, runner_options=options)
    assert cell.status == "pass", cell.reason


def _matrix_runner(runner_cache, name: str, runtime: str) -> tuple[LossRunner, torch.nn.Module, LossSpec]:
    """The matrix cell's runner of configuration ``name`` in ``runtime`` (built once a session), its loss and spec."""
    key, options = runner_options(name, runtime, backend=compile_backend(name))
    loss, spec = runner_cache.loss(name)
    return runner_cache.runner(name, runtime, key=key, **options), loss, spec


def _value_as_the_matrix_runs_it(runner: LossRunner, inputs: dict, pred: str) -> torch.Tensor:
    """The runner's value on ``inputs`` called as the matrix calls it, ``pred`` requiring grad where the runtime is
    differentiable: a compiled graph is guarded on grad mode and on which inputs require grad."""
    leaf = inputs[pred].detach().clone().requires_grad_(runner.differentiable)
    return runner({**inputs, pred: leaf}).detach()


def _assert_matches_eager(runner_cache, name: str, runtime: str, inputs: dict, least_scale: float) -> None:
    """The cell's value on ``inputs`` is finite and eager's, compared at the value's scale (at least
    ``least_scale``), so values of 1e-30 are compared as closely as values of 1."""
    runner, _, spec = _matrix_runner(runner_cache, name, runtime)
    out = _value_as_the_matrix_runs_it(runner, inputs, spec.pred)
    with torch.no_grad():
        want = runner_cache.runner(name, "eager")(inputs)
    assert torch.isfinite(out).all() and torch.isfinite(want).all(), (out, want)
    scale = want.abs().max().clamp(min=least_scale)
    torch.testing.assert_close(out / scale, want / scale, **TOLERANCES[runtime])


@pytest.mark.parametrize(("name", "runtime"), CELLS, ids=[f"{n}-{r}" for n, r in CELLS])
def test_a_nan_prediction_with_weight_makes_the_loss_nan(runner_cache, name, runtime):
    """RELIABILITY 26 in every runtime: a NaN in one sample's prediction that carries weight is not masked, the
    loss is NaN (the matrix's runners; which entries of the gradient are NaN differs by runtime, README)."""
    runner, loss, spec = _matrix_runner(runner_cache, name, runtime)
    inputs = spec.sample(loss, 8, seed=3)
    inputs[spec.pred] = inputs[spec.pred].clone().index_fill_(0, torch.tensor([1]), float("nan"))
    if "weight" in inputs:  # mask mode's third input is the RoI labels
        inputs["weight"] = torch.ones_like(inputs["weight"])
    out = _value_as_the_matrix_runs_it(runner, inputs, spec.pred)
    assert out.isnan().any(), out


#: RELIABILITY 14 (avg_factor 0, tiny, huge) and all-zero weights, checked in eager by test_edge_cases
EDGE_INPUTS = {"avg_factor_0": 0.0, "avg_factor_1e-6": 1e-6, "avg_factor_1e30": 1e30, "weights_0": None}
EDGE_CELLS = [(name, runtime, edge) for name, runtime in CELLS if runtime != "eager" for edge in EDGE_INPUTS]


@pytest.mark.parametrize(("name", "runtime", "edge"), EDGE_CELLS, ids=["-".join(cell) for cell in EDGE_CELLS])
def test_edge_inputs_match_eager(runner_cache, name, runtime, edge):
    """avg_factor of 0 (the mean is the sum / float32's eps), 1e-6 and 1e30, and every weight 0, in each runtime:
    finite and eager's value, compared at the value's own scale (1e-30 at avg_factor 1e30)."""
    runner, loss, spec = _matrix_runner(runner_cache, name, runtime)
    inputs = spec.sample(loss, 8, seed=11)
    if edge == "weights_0":
        if "weight" not in runner.names or getattr(loss, "use_mask", False):  # mask mode: the RoI labels
            pytest.skip("no per-sample weight input")
        inputs["weight"] = torch.zeros_like(inputs["weight"])
    else:
        if "avg_factor" not in runner.names or loss.reduction == "sum":  # visdet refuses "sum" with avg_factor
            pytest.skip("no avg_factor to take")
        inputs["avg_factor"] = torch.tensor(EDGE_INPUTS[edge], dtype=inputs["avg_factor"].dtype)
    _assert_matches_eager(runner_cache, name, runtime, inputs, least_scale=torch.finfo(torch.float32).tiny)


def _class_label_inputs(name: str) -> list[str]:
    """The inputs of configuration ``name`` that hold class labels (integer, one per sample)."""
    loss, spec = RunnerCache().loss(name)
    return [key for key, value in spec.sample(loss, 1, seed=0).items() if key in ("target", "labels", "label")
            and not value.is_floating_point()]


LABELLED_CELLS = [(name, runtime) for name, runtime in CELLS if runtime != "eager" and _class_label_inputs(name)]


@pytest.mark.parametrize(("name", "runtime"), LABELLED_CELLS, ids=[f"{n}-{r}" for n, r in LABELLED_CELLS])
def test_no_sample_labelled_matches_eager(runner_cache, name, runtime):
    """RELIABILITY 11-13 in every runtime: every label the ignore_index (cross-entropy) or the background class C
    (focal, QFL: no positives anywhere), finite and eager's value (test_edge_cases checks eager's own)."""
    _, loss, spec = _matrix_runner(runner_cache, name, runtime)
    inputs = spec.sample(loss, 8, seed=13)
    ignore_index = getattr(loss, "ignore_index", None)
    unlabelled = inputs[spec.pred].size(1) if ignore_index is None else ignore_index
    for label in _class_label_inputs(name):
        inputs[label] = torch.full_like(inputs[label], unlabelled)
    _assert_matches_eager(runner_cache, name, runtime, inputs, least_scale=1.0)


#: Logits of the domain-edge inputs, uniform in [-r, r] (RELIABILITY 16: onnxruntime's Log(Sigmoid) overflows at ~18)
EDGE_LOGIT_RANGE = 200.0
#: DFL targets on a bin, between two, and at both ends (RELIABILITY 21: just below reg_max, and exactly reg_max)
DFL_TARGETS = (0.0, 7.3, -1e-6, 0.0, 1.0, 8.0, 0.5, -0.5)  # negative entries count back from reg_max
#: (pred, target) boxes: known GIoU values (identical 0, quarter inside 0.75, side by side 1.0, diagonal 1.5), then
#: degenerate boxes (a line, a point, two identical points), disjoint, inverted and large ones (RELIABILITY 22-25)
BOX_PAIRS = (
    ((0, 0, 10, 10), (0, 0, 10, 10)),
    ((0, 0, 5, 5), (0, 0, 10, 10)),
    ((0, 0, 10, 10), (10, 0, 20, 10)),
    ((0, 0, 10, 10), (10, 10, 20, 20)),
    ((0, 0, 0, 10), (0, 0, 10, 10)),
    ((5, 5, 5, 5), (0, 0, 10, 10)),
    ((3, 3, 3, 3), (3, 3, 3, 3)),
    ((0, 0, 1, 1), (1000, 1000, 1010, 1010)),
    ((10, 10, 0, 0), (0, 0, 10, 10)),
    ((10, 0, 0, 10), (0, 0, 10, 10)),
    ((0, 0, 1e4, 1e4), (1, 1, 9000, 9999)),
)
#: Regression errors pred - target in units of the loss's beta: 0 (L1's kink), +-beta (SmoothL1's and BalancedL1's
#: breakpoints), either side of them, and large (RELIABILITY 27)
REGRESSION_ERRORS = (0.0, 1.0, -1.0, 0.5, -1.5, 1e4, -1e4, 1.0 + 2**-20)


def _cycled(rows, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``rows`` repeated to ``n`` entries along the first axis."""
    table = torch.tensor(rows, dtype=torch.float64)
    return table.repeat(-(-n // len(rows)), *([1] * (table.dim() - 1)))[:n].to(dtype)


def _inputs_at_the_domain_edges(loss: torch.nn.Module, spec: LossSpec, n: int) -> dict:
    """Inputs at the edges of each loss's domain: logits in [-200, 200]; probabilities (activated losses) and QFL
    quality scores of exactly 0 and 1; DFL targets at the bins and both ends; the boxes of :data:`BOX_PAIRS`;
    regression errors of :data:`REGRESSION_ERRORS` on integer targets, half of them 0 (so that 1e-30 stays one).
    Every weight is positive."""
    options = SampleOptions(logit_range=EDGE_LOGIT_RANGE, zero_weight_fraction=0.0)  # no edge masked out
    inputs = spec.sample(loss, n, seed=17, options=options)
    pred = inputs[spec.pred]
    every_other = torch.arange(n) % 2 == 0
    if getattr(loss, "activated", False):
        inputs[spec.pred] = torch.where(every_other[:, None], pred.round(), pred)
    if "scores" in inputs:
        inputs["scores"] = every_other.to(pred.dtype)
    if spec.loss_type == "DistributionFocalLoss":
        reg_max = pred.size(1) - 1
        inputs["target"] = _cycled([t if t >= 0 else reg_max + t for t in DFL_TARGETS], n, pred.dtype)
        inputs["target"][1] = reg_max  # exactly reg_max, once
    if spec.variant == "boxes":
        pairs = _cycled(BOX_PAIRS, n, pred.dtype)
        inputs[spec.pred], inputs["target"] = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    if spec.variant == "deltas":
        beta = float(getattr(loss, "beta", 1.0))
        target = torch.where(every_other[:, None], 0.0, inputs["target"].round())
        errors = _cycled([e * beta for e in REGRESSION_ERRORS] + [1e-30], pred.numel(), pred.dtype)
        inputs[spec.pred], inputs["target"] = target + errors.view_as(pred), target
    return inputs


@pytest.mark.parametrize(("name", "runtime"), CELLS, ids=[f"{n}-{r}" for n, r in CELLS])
def test_inputs_at_the_domain_edges_match_eager(runner_cache, name, runtime):
    """RELIABILITY 16 and 20-27 in every runtime (test_edge_cases holds eager's values to the formulas): the loss
    at the edges of its domain is finite and eager's, and so is its gradient where the runtime gives one."""
    runner, loss, spec = _matrix_runner(runner_cache, name, runtime)
    inputs = _inputs_at_the_domain_edges(loss, spec, 20)
    assert all(value.is_contiguous() for value in inputs.values())  # another layout would recompile the runner
    eager = runner_cache.runner(name, "eager")
    assert_all_close(compare_with_eager(runner, eager, inputs, spec.pred, TOLERANCES[runtime]))
    with torch.no_grad():
        assert torch.isfinite(eager(inputs)).all()


FLOAT32_CLOSE = {"rtol": 1.3e-6, "atol": 1e-5}


def _in_other_layouts(inputs: dict, pred: str) -> dict:
    """The same values in other memory layouts: ``pred`` transposed in memory (channels last for masks: a layout
    autograd's leaf keeps), every other input of one or more dimensions a strided view, expanded from one row where
    it is a weight (RELIABILITY 28)."""
    placed = {}
    for key, value in inputs.items():
        if key == pred and value.dim() == 2:
            placed[key] = value.t().contiguous().t()
        elif key == pred and value.dim() == 4:
            placed[key] = value.contiguous(memory_format=torch.channels_last)
        elif key == "weight":
            placed[key] = value[:1].expand_as(value)
        else:
            placed[key] = strided(value)
    return placed


@pytest.mark.parametrize(("name", "runtime"), CELLS, ids=[f"{n}-{r}" for n, r in CELLS])
def test_non_contiguous_and_expanded_inputs_match_contiguous_eager(runner_cache, name, runtime):
    """RELIABILITY 28 in every runtime: inputs in other memory layouts give eager's values on contiguous copies,
    and its gradient. Compiled: a runner of its own, as Dynamo guards on strides (the matrix's keep one graph)."""
    key, options = guard_variant_runner(name, runtime)
    runner = runner_cache.runner(name, runtime, key=key, **options)
    loss, spec = runner_cache.loss(name)
    placed = _in_other_layouts(spec.sample(loss, 9, seed=19), spec.pred)
    assert spec.pred not in placed or placed[spec.pred].dim() == 1 or not placed[spec.pred].is_contiguous()
    eager = runner_cache.runner(name, "eager")

    def contiguous_eager(inputs):
        return eager({key: value.contiguous() for key, value in inputs.items()})

    # float32's default assert_close tolerance at least: ATen sums strided and contiguous data in other orders
    tolerance = {bound: max(value, FLOAT32_CLOSE[bound]) for bound, value in TOLERANCES[runtime].items()}
    assert_all_close(compare_with_eager(runner, contiguous_eager, placed, spec.pred, tolerance))


HALF_CELLS = [(name, runtime, dtype) for name in CONFIG_NAMES for runtime in ("compile", "script")
              for dtype in ("float16", "bfloat16")]


@pytest.mark.parametrize(("name", "runtime", "dtype"), HALF_CELLS, ids=["-".join(cell) for cell in HALF_CELLS])
def test_half_precision_inputs_match_eager(runner_cache, name, runtime, dtype):
    """RELIABILITY 17 in the runtimes that take half-precision inputs (the exported graphs take float32): logits
    in [-20, 20] and boxes of 100-5000 px, whose areas pass float16's largest value, give eager's float32 value
    and its gradient in the input dtype, within one rounding of it. Compiled: a runner of its own, as Dynamo
    compiles a graph per dtype (the matrix's keep one)."""
    dtype = getattr(torch, dtype)
    key, options = guard_variant_runner(name, runtime)
    runner = runner_cache.runner(name, runtime, key=key, **options)
    loss, spec = runner_cache.loss(name)
    inputs = spec.sample(loss, 9, seed=23, options=SampleOptions(dtype=dtype, logit_range=20.0))
    if spec.variant == "boxes":
        inputs[spec.pred], inputs["target"] = inputs[spec.pred] * 100, inputs["target"] * 100
    eager = runner_cache.runner(name, "eager")
    with torch.no_grad():
        value = eager(inputs)
    assert value.dtype == torch.float32 and torch.isfinite(value).all(), value
    one_rounding = {"rtol": torch.finfo(dtype).eps, "atol": 1e-6}
    assert_all_close(
        compare_with_eager(runner, eager, inputs, spec.pred, TOLERANCES[runtime], grad_tolerance=one_rounding)
    )


def test_pt2_modes():
    (cell,) = run_matrix(["l1"], ["pt2"], pt2="subset")
    assert cell.status == "skip" and "subset" in cell.reason
    with pytest.raises(ValueError, match="pt2 mode"):
        run_matrix(["l1"], ["pt2"], pt2="everything")
    assert runner_options("l1", "pt2") == ("pt2:bundle", {"bundle": True})
    assert runner_options("dfl", "pt2", pt2="separate") == ("pt2:joint", {"joint": True})


def test_onnx_joint_mode_checks_the_gradient_output():
    """``check --onnx joint``: the ONNX column exports the loss with its gradient output and checks both; a wrong
    gradient output fails the cell."""
    assert runner_options("giou", "onnx", onnx="joint") == ("onnx:joint", {"joint": True})
    with pytest.raises(ValueError, match="onnx mode"):
        run_matrix(["giou"], ["onnx"], onnx="gradient")
    cache = RunnerCache()
    (cell,) = run_matrix(["giou"], ["onnx"], (0, 7, 300), cache=cache, onnx="joint")
    assert cell.status == "pass", cell.reason
    runner = cache.runners[("giou", "onnx:joint")]
    assert runner.joint
    exact = runner.run_all

    def perturbed(inputs):
        value, grad = exact(inputs)[:2]
        return value, grad * 1.001

    runner.run_all = perturbed
    cell = check_cell("giou", "onnx", cache, (7,), runner_key="onnx:joint", runner_options={"joint": True})
    assert cell.status == "fail" and cell.reason.startswith("grad at N=7"), cell.reason


DEVICE_CELLS = [("focal", "compile"), ("focal", "script"), ("ce_class_weight", "script"), ("ce_class_weight", "eager")]


@pytest.mark.parametrize(("name", "runtime"), DEVICE_CELLS, ids=[f"{n}-{r}" for n, r in DEVICE_CELLS])
def test_device_cells_run_a_copy_of_the_loss_against_eager_on_the_cpu(runner_cache, name, runtime):
    """``check --device``: the runtime runs on its own copy of the loss (buffers such as class weights moved with
    it), keyed apart from the CPU runners; here the device is the CPU, on which the plumbing runs the same."""
    device = torch.device("cpu")
    key, options = runner_options(name, runtime, backend="aot_eager")
    cell = check_cell(name, runtime, runner_cache, runner_key=key, runner_options=options, device=device)
    assert cell.status == "pass", cell.reason
    placed = runner_cache.loss_on(name, device)
    assert placed is not runner_cache.loss(name)[0]
    assert [b.device for b in placed.buffers()] == [device] * len(list(placed.buffers()))
    assert any(k == (name, f"{key or runtime}@cpu") for k in runner_cache.runners)


def test_exported_columns_are_skipped_on_another_device(runner_cache):
    for runtime in ("onnx", "pt2"):
        cell = check_cell("l1", runtime, runner_cache, device=torch.device("cuda"))
        assert cell.status == "skip" and "runs on the CPU" in cell.reason
    assert not any(key.endswith("@cuda") for _, key in runner_cache.runners)


def test_check_cli_onnx_joint(capsys):
    assert check_main(["--runtimes", "onnx", "--onnx", "joint", "--configs", "l1", "--sizes", "0,7", "-q"]) == 0
    out = capsys.readouterr().out
    assert "joint graphs (loss and grad_pred outputs)" in out and "1 passed, 0 failed" in out


@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "no CUDA device"), ("meta", "only cpu and cuda"), ("gpu0", "device")],
)
def test_check_refuses_devices_it_cannot_run_on(device, message, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this torch has a CUDA device")
    assert check_main(["--device", device, "--configs", "l1", "-q"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sizes", "message"),
    [("abc", "argument --sizes: takes sample counts separated by commas, got 'abc'"),
     ("3,-1", "argument --sizes: sample counts must be >= 0, got '3,-1'")],
)
def test_check_refuses_sizes_that_are_not_counts(sizes, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        check_main(["--sizes", sizes, "--configs", "l1", "-q"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_autocast_cells_run_inside_autocast_and_skip_the_artifacts():
    """``check --autocast``: the runtime runs inside ``torch.autocast`` (a runner that lets autocast lower its
    arithmetic, a matmul, fails there and passes outside it); the exported artifacts' columns are skipped."""
    cache = RunnerCache()
    cells = run_matrix(["l1"], ["eager", "script", "onnx"], (0, 7), cache=cache, autocast=torch.bfloat16)
    assert [(c.runtime, c.status) for c in cells] == [("eager", "pass"), ("script", "pass"), ("onnx", "skip")]
    assert "autocast does not reach" in cells[2].reason
    loss, spec = cache.loss("l1")
    eager = cache.runner("l1", "eager")
    lowered = LossRunner(
        "script",
        lambda inputs, _: eager({**inputs, "pred": inputs["pred"] @ torch.eye(4)}),
        eager.names,
        differentiable=True,
        fixed_graph=False,
    )
    cache.runners[("l1", "script")] = lowered
    assert check_cell("l1", "script", cache, (7,)).status == "pass"
    cell = check_cell("l1", "script", cache, (7,), autocast=torch.bfloat16)
    assert cell.status == "fail" and cell.reason.startswith("loss at N=7"), cell.reason


def test_cells_at_other_free_sizes(runner_cache):
    """``check_cell(free_sizes=)``: the session's exported focal graph fed 3 and 120 classes, against eager."""
    graph = runner_cache.runner("focal", "onnx")
    classes_seen = []

    def recording(inputs, reduction_override):
        classes_seen.append(inputs["pred"].size(1))
        return graph(inputs, reduction_override)

    cache = RunnerCache()
    cache.runners[("focal", "onnx")] = LossRunner(
        "onnx", recording, graph.names, differentiable=False, fixed_graph=True
    )
    for classes in (3, 120):
        cell = check_cell("focal", "onnx", cache, (0, 7), free_sizes={"C": classes})
        assert cell.status == "pass", cell.reason
    assert classes_seen == [3, 3, 120, 120]


def test_check_cli_autocast(capsys):
    argv = ["--runtimes", "eager,pt2", "--configs", "focal_activated", "--sizes", "0,7", "-q"]
    assert check_main([*argv, "--autocast", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "torch.autocast('cpu', bfloat16)" in out and "1 passed, 0 failed, 1 skipped" in out
    with pytest.raises(SystemExit):
        check_main([*argv, "--autocast", "float64"])


TRAINED_CELLS = [(name, runtime) for name in CONFIG_NAMES for runtime in ("compile", "script")]


@pytest.mark.parametrize(("name", "runtime"), TRAINED_CELLS, ids=[f"{n}-{r}" for n, r in TRAINED_CELLS])
def test_trained_inputs_get_eager_gradients(runner_cache, name, runtime):
    """Targets, scores, soft labels and weights that require grad (distillation, learned weights) get eager's
    gradients, weight-0 elements included (eager's against the reference: test_parity)."""
    loss, spec = runner_cache.loss(name)
    key, options = guard_variant_runner(name, runtime)
    runners = {
        "eager": runner_cache.runner(name, "eager"),
        runtime: runner_cache.runner(name, runtime, key=key, **options),
    }
    drawn = spec.sample(loss, 29, seed=8, include=list(runners[runtime].names))
    trained = [k for k in runners[runtime].names if k in drawn and drawn[k].is_floating_point() and drawn[k].dim() > 0]
    assert len(trained) > 1 or name == "ce_mask"  # mask mode: the third argument is the RoI labels
    results = {}
    for label, runner in runners.items():
        leaves = {k: drawn[k].clone().requires_grad_(k in trained) for k in runners[runtime].names if k in drawn}
        value = runner(leaves)
        grads = torch.autograd.grad(value.sum(), [leaves[k] for k in trained], allow_unused=True)  # KD: detach_target
        results[label] = (value, *(torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(trained, grads)))
    assert name == "ce_mask" or any(g.abs().sum() > 0 for k, g in zip(trained, results["eager"][1:]) if k != spec.pred)
    tolerance = TOLERANCES[runtime]
    for got, want, what in zip(results[runtime], results["eager"], ["value", *trained]):
        torch.testing.assert_close(got, want, **tolerance, msg=lambda m: f"{what}: {m}")
