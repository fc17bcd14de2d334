"""TorchScript: every configuration scripts, saves, and loads in a fresh Python process with identical results.

The child process imports only torch (not visdet_export): the archive alone carries the loss. It runs the
loaded module's full ``forward`` -- Optional weight / avg_factor (tensor and Python number), reduction_override,
QualityFocalLoss's (labels, scores) tuple target, mask CE's RoI labels -- and returns values and gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import CONFIG_NAMES

from visdet_export.export.torchscript import embedded_config, export_torchscript, load_runner, load_scripted
from visdet_export.export.verify import verify
from visdet_export.registry import loss_config

CHILD = textwrap.dedent(
    """
    import sys, warnings
    import torch
    warnings.simplefilter("ignore")
    cases = torch.load(sys.argv[1], weights_only=True)
    results = {}
    for key, (path, args, override) in cases.items():
        module = torch.jit.load(path)
        args = [a.detach().clone().requires_grad_(True) if i == 0 else a for i, a in enumerate(args)]
        value = module(*args, reduction_override=override) if override else module(*args)
        (grad,) = torch.autograd.grad(value.sum(), args[0], allow_unused=True)
        results[key] = (value.detach(), torch.zeros_like(args[0]) if grad is None else grad)
    torch.save(results, sys.argv[2])
    """
)


def _args(spec, inputs, avg_as_number=False):
    """Positional forward arguments: pred, target (a tuple for QFL pairs), then weight / label, avg_factor."""
    names = [t.name for t in spec.inputs]
    if "labels" in names:
        head = [inputs["pred"], (inputs["labels"], inputs["scores"])]
    else:
        head = [inputs["pred"], inputs[spec.inputs[1].name]]
    third = "label" if "label" in names else "weight"
    avg = inputs.get("avg_factor")
    if avg is not None and avg_as_number:
        avg = float(avg)
    return [*head, inputs.get(third), avg]


def _cases(loss, spec):
    """(args, reduction_override) per case: all inputs, none of the optional ones, overrides, a number avg_factor."""
    full = spec.sample(loss, 7, seed=3)
    bare = spec.sample(loss, 7, seed=4, include=[])
    empty = spec.sample(loss, 0, seed=5)
    no_avg = {k: v for k, v in full.items() if k != "avg_factor"}
    cases = {
        "full": (_args(spec, full), None),
        "bare": (_args(spec, bare), None),
        "empty": (_args(spec, empty), None),
        "override_none": (_args(spec, full), "none"),
        "override_sum": (_args(spec, no_avg), "sum"),
    }
    if getattr(loss, "reduction", "mean") != "sum":
        cases["avg_number"] = (_args(spec, full, avg_as_number=True), None)
    return cases


@pytest.fixture(scope="session")
def scripted_files(runner_cache, tmp_path_factory):
    directory = tmp_path_factory.mktemp("torchscript")
    files = {}
    for name in CONFIG_NAMES:
        loss, _ = runner_cache.loss(name)
        files[name] = export_torchscript(loss, directory / f"{name}.pt")
    return files


def _eager_value_grad(loss, args, override):
    pred = args[0].detach().clone().requires_grad_(True)
    value = loss(pred, *args[1:], reduction_override=override) if override else loss(pred, *args[1:])
    (grad,) = torch.autograd.grad(value.sum(), pred, allow_unused=True)
    return value.detach(), torch.zeros_like(pred) if grad is None else grad


def test_every_config_loads_in_a_fresh_process(runner_cache, scripted_files, tmp_path):
    cases, expected = {}, {}
    for name, path in scripted_files.items():
        loss, spec = runner_cache.loss(name)
        for case, (args, override) in _cases(loss, spec).items():
            key = f"{name}/{case}"
            cases[key] = (str(path), args, override)
            # A fresh load per case, as in the child: the profiling executor optimises a module's graph after its
            # first runs, so "identical" compares first runs with first runs.
            module = load_scripted(path)
            expected[key] = (_eager_value_grad(module, args, override), _eager_value_grad(loss, args, override))
    torch.save(cases, tmp_path / "cases.pt")
    subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")], check=True, timeout=600
    )
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(results) == set(expected)
    for key, (value, grad) in results.items():
        (script_value, script_grad), (eager_value, eager_grad) = expected[key]
        # Identical to the same archive run in this process ...
        torch.testing.assert_close(value, script_value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(grad, script_grad, rtol=0, atol=0, msg=key)
        # ... and equal to eager at assert_close's float32 tolerances.
        torch.testing.assert_close(value, eager_value, msg=key)
        torch.testing.assert_close(grad, eager_grad, msg=key)


@pytest.mark.parametrize("name", ["focal", "qfl", "ce_mask"])
def test_manifest_config_and_verify(runner_cache, scripted_files, name):
    path = scripted_files[name]
    loss, spec = runner_cache.loss(name)
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    assert manifest["format"] == "torchscript" and manifest["loss_type"] == spec.loss_type
    assert manifest["config"] == embedded_config(path) == json.loads(json.dumps(loss_config(loss)))
    assert [entry["name"] for entry in manifest["inputs"]] == spec.names
    # a scripted module's optional arguments may be left out
    assert [entry["optional"] for entry in manifest["inputs"]] == [t.optional for t in spec.inputs]
    assert manifest["parity"]["sizes"][0] == 0
    # the scripted forward as a C++ caller passes it: QFL's labels and scores are one tuple
    signature = {"focal": "forward(Tensor pred, Tensor target, Tensor? weight=None, ",
                 "qfl": "forward(Tensor pred, Union(Tensor, (Tensor, Tensor)) target, Tensor? weight=None, ",
                 # MMDetection's mask head passes the RoI labels in CrossEntropyLoss's weight position
                 "ce_mask": "forward(Tensor pred, Tensor label, Tensor? weight=None, "}
    assert manifest["forward"].startswith(signature[name]) and manifest["forward"].endswith(") -> Tensor")
    assert manifest["output_shapes"] == {"loss": []}
    report = verify(path, seed=1)
    assert report["passed"]
    runner = load_runner(path, manifest)
    out = runner(spec.sample(loss, 5, seed=2))
    assert len(out) == 1 and out[0].dim() == 0


def test_export_silences_jit_deprecation_only_inside(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_torchscript(dict(type="L1Loss"), tmp_path / "l1.pt")
        load_runner(tmp_path / "l1.pt")
    deprecations = (DeprecationWarning, FutureWarning)
    leaked = [w for w in caught if issubclass(w.category, deprecations) and "jit" in str(w.message)]
    assert leaked == []
    from visdet_export import build_loss

    with pytest.warns((DeprecationWarning, FutureWarning), match=r"torch\.jit\.script"):
        torch.jit.script(build_loss("L1Loss"))


def test_existing_file_is_not_overwritten(tmp_path):
    from visdet_export.export.artifacts import ArtifactError

    path = export_torchscript("L1Loss", tmp_path / "l1.pt")
    with pytest.raises(ArtifactError, match="exists"):
        export_torchscript("L1Loss", path)
    assert export_torchscript("L1Loss", path, overwrite=True) == path


@pytest.mark.parametrize("path", ["loss_cls", "loss_wh"])
def test_sum_reduction_losses_export_without_avg_factor(tmp_path, path):
    """YOLOv3's losses sum: visdet refuses avg_factor there, so the parity check feeds none (it fed one and every
    reduction="sum" export failed)."""
    from visdet_export.recipes import recipe_losses

    cfg = recipe_losses("yolov3")[path]
    assert cfg["reduction"] == "sum"
    target = export_torchscript(cfg, tmp_path / f"{path}.ts.pt")
    manifest = json.loads((tmp_path / f"{path}.ts.pt.json").read_text())
    assert [item["name"] for item in manifest["inputs"]] == ["pred", "target", "weight"]
    assert verify(target, seed=1)["passed"]


def test_reduction_none_exports_leave_out_the_avg_factor_it_ignores(tmp_path):
    """A fixed graph of reduction="none" took an avg_factor input that changed nothing."""
    from visdet_export.export.onnx import export_onnx

    cfg = {"type": "FocalLoss", "reduction": "none"}
    for exporter, suffix in ((export_torchscript, ".ts.pt"), (export_onnx, ".onnx")):
        target = exporter(cfg, tmp_path / f"focal_none{suffix}")
        manifest = json.loads(target.with_name(target.name + ".json").read_text())
        assert [item["name"] for item in manifest["inputs"]] == ["pred", "target", "weight"], suffix
        assert manifest["output_shapes"] == {"loss": ["N", "C"]}, suffix
    weight = manifest["inputs"][2]
    assert not weight["optional"] and weight["doc"].endswith("all ones for no weight")  # the ONNX graph needs it


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_torch_jit_trace_with_every_input(name: str) -> None:
    """``torch.jit.trace`` (not a runtime of ours, but how some deployments capture a model): a trace with every
    input, weights included, runs at another N as eager does, gradients too."""
    from visdet_export import build_loss
    from visdet_export.specs import representative_configs, spec_for

    loss = build_loss(representative_configs()[name])
    spec = spec_for(loss)
    example = spec.sample(loss, 16, seed=0)

    def call(*tensors: torch.Tensor) -> torch.Tensor:
        return spec.call(loss, dict(zip(example, tensors)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape checks, decided at the example
        warnings.filterwarnings("ignore", r".*torch\.jit\.trace.* is deprecated", DeprecationWarning)
        traced = torch.jit.trace(call, tuple(example.values()), check_trace=False)
    inputs = spec.sample(loss, 9, seed=1)
    for run in range(2):  # the profiling executor optimises the graph at the second run
        grads = []
        for fn in (call, traced):
            pred = inputs[spec.pred].clone().requires_grad_(True)
            value = fn(pred, *[inputs[key] for key in list(inputs)[1:]])
            grads.append((value, torch.autograd.grad(value, pred)[0]))
        torch.testing.assert_close(grads[1], grads[0], msg=f"run {run}")


def test_exporting_leaves_the_modules_training_flag(tmp_path):
    """A head's loss exported in the middle of training stays in training mode (the artifact is in eval mode)."""
    from visdet_export import build_loss
    from visdet_export.export import export_onnx

    loss = build_loss(dict(type="L1Loss")).train()
    export_onnx(loss, tmp_path / "l1.onnx", verify=False)
    assert loss.training
    path = export_torchscript(loss, tmp_path / "l1.ts.pt", verify=False)
    assert loss.training and not load_scripted(path).training


def test_shared_module_across_threads_with_the_legacy_executor(tmp_path):
    """export_scripts/cpp/README.md ("Threads"): threads sharing one scripted FocalLoss and mixing calls with and
    without grad and avg_factor got gradients with elements zeroed under the default profiling executor (a race
    while it specialises the graph: 6 of 8 runs of this pattern from Python threads, 2-3 of 6 in C++); the README's
    remedy, the legacy executor (``torch::jit::getProfilingMode() = false``), gives eager's values here."""
    import threading

    from visdet_export import build_loss

    path = export_torchscript({"type": "FocalLoss"}, tmp_path / "focal.pt", verify=False)
    eager = build_loss({"type": "FocalLoss"})
    generator = torch.Generator().manual_seed(0)
    jobs = []
    for k in range(64):
        n, c = (0 if k % 5 == 0 else 1 if k % 7 == 1 else (k * 37) % 300), (80 if k % 2 else 20)
        pred = torch.randn(n, c, generator=generator) * 5
        labels = torch.randint(0, c + 1, (n,), generator=generator, dtype=torch.int64 if k % 2 else torch.int32)
        weight = None if k % 4 == 0 else torch.rand(n, generator=generator)
        avg_factor = [None, torch.tensor(3.0), 7.0][k % 3]
        jobs.append((pred, labels, weight, avg_factor, k % 3 != 0))

    def run(module, job):
        pred, labels, weight, avg_factor, grad = job
        pred = pred.clone().requires_grad_(grad)
        value = module(pred, labels, weight, avg_factor)
        if not grad:
            return value.detach(), None
        value.sum().backward()
        return value.detach(), pred.grad

    want = [run(eager, job) for job in jobs]
    previous = torch._C._jit_set_profiling_mode(False)
    try:
        for _ in range(2):
            module, failures = load_scripted(path), []
            barrier = threading.Barrier(8)

            def worker(t: int, module=module, failures=failures, barrier=barrier) -> None:
                barrier.wait()
                for r in range(30):
                    k = (t * 13 + r * 7) % len(jobs)
                    (value, grad), (want_value, want_grad) = run(module, jobs[k]), want[k]
                    try:
                        torch.testing.assert_close(value, want_value, rtol=1e-5, atol=1e-7)
                        if want_grad is not None:
                            torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
                    except AssertionError as error:
                        failures.append((k, str(error).splitlines()[0]))

            threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not failures, failures[:3]
    finally:
        torch._C._jit_set_profiling_mode(previous)


def test_a_first_export_imports_no_onnx_and_records_the_installed_versions(tmp_path):
    """The manifest's library versions come from the installed distributions' metadata: importing onnxscript to
    read its version cost a process's first TorchScript export 1.5 s and ~950 modules (onnx and sympy among them,
    whose imports a Ctrl-C can leave half done)."""
    import onnx
    import onnxruntime
    import onnxscript

    path = tmp_path / "l1.ts.pt"
    script = (
        "import sys\n"
        "from visdet_export import export_torchscript\n"
        "export_torchscript(dict(type='L1Loss'), sys.argv[1], verify=False)\n"
        "print(sorted(name for name in ('onnx', 'onnxruntime', 'onnxscript', 'sympy') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    versions = json.loads(path.with_name(path.name + ".json").read_text())["versions"]
    expected = {module.__name__: module.__version__ for module in (onnx, onnxruntime, onnxscript)}
    assert {name: versions[name] for name in expected} == expected


def test_a_distribution_named_unlike_its_module_gives_the_version():
    """onnxruntime-gpu installs the module onnxruntime, as pytest installs _pytest."""
    import importlib.metadata

    from visdet_export.export.artifacts import installed_version

    assert installed_version("_pytest") == importlib.metadata.version("pytest")
    assert installed_version("no_such_module_anywhere") is None
