"""A real C++ consumer: the libtorch program in export_scripts/cpp loads every registered loss (TorchScript, and
.pt2 packages once the exporter exists) and matches eager PyTorch in loss and d loss / d pred.

.pt2: the session's joint bundle of every representative configuration (``runner_cache``, shared with test_pt2
and test_matrix: no AOTInductor compile of its own) runs in C++ with each entry at its own N per call, and the
single dfl joint package test_pt2 builds covers the single-package path.

The program is built once per session (cached across sessions in ``visdet_export.cpp.default_build_dir()``, or
``$VISDET_EXPORT_CPP_BUILD_DIR``). Without cmake or a C++ compiler the tests skip with the reason; set
``VISDET_EXPORT_REQUIRE_CPP=1`` (CI) to make that a failure instead.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from visdet_export import build_loss, cpp
from visdet_export.check import runner_options
from visdet_export.registry import MODELS
from visdet_export.specs import CONFIG_VARIANTS, representative_configs, spec_for

CONFIGS = representative_configs()
# Input layouts beyond each configuration's default variant.
EXTRA_CASES = {
    "focal_onehot": ("focal", "onehot"),
    "qfl_dense": ("qfl", "dense"),
}
MATRIX = [(name, cfg, CONFIG_VARIANTS.get(name)) for name, cfg in CONFIGS.items()] + [
    (name, CONFIGS[base], variant) for name, (base, variant) in EXTRA_CASES.items()
]
CONFIG_NAMES = tuple(CONFIGS)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def cpp_program() -> cpp.BuiltRunner:
    problem = cpp.toolchain_problem()
    if problem:
        if os.environ.get("VISDET_EXPORT_REQUIRE_CPP") == "1":
            pytest.fail(f"VISDET_EXPORT_REQUIRE_CPP=1 but the C++ program cannot be built: {problem}")
        pytest.skip(f"C++ consumer not built: {problem}")
    return cpp.build_runner()


def test_program_is_built_against_this_torch(cpp_program: cpp.BuiltRunner) -> None:
    info = cpp.program_info(cpp_program.path)
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cxx11_abi"] == int(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert info["cplusplus"] >= 202002  # libtorch's headers need C++20


def test_build_is_cached(cpp_program: cpp.BuiltRunner) -> None:
    again = cpp.build_runner(cpp_program.build_dir)
    assert not again.rebuilt and again.path == cpp_program.path and again.seconds == 0.0


def test_default_build_dir_is_one_per_torch_installation_and_source_folder(tmp_path, monkeypatch) -> None:
    """Virtual environments (or checkouts) sharing ~/.cache rebuilt over each other's program, even while the other
    was running it."""
    monkeypatch.delenv("VISDET_EXPORT_CPP_BUILD_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = cpp.default_build_dir()
    assert here.parent == tmp_path / "visdet-export" / "cpp" and here == cpp.default_build_dir(cpp.source_dir())
    assert cpp.default_build_dir(tmp_path) != here
    monkeypatch.setattr(cpp, "torch_cmake_prefix", lambda: tmp_path / "other-venv")
    assert cpp.default_build_dir() != here
    monkeypatch.setenv("VISDET_EXPORT_CPP_BUILD_DIR", str(tmp_path / "mine"))
    assert cpp.default_build_dir() == tmp_path / "mine"


def test_every_registered_loss_is_in_the_matrix() -> None:
    tested = {type(build_loss(cfg)).__name__ for _, cfg, _ in MATRIX}
    assert set(MODELS.module_dict) <= tested


@pytest.mark.parametrize(("name", "cfg", "variant"), MATRIX, ids=[row[0] for row in MATRIX])
def test_torchscript_in_cpp_matches_eager(cpp_program: cpp.BuiltRunner, name: str, cfg: dict, variant: str) -> None:
    report = cpp.check_torchscript(cfg, cpp_program.path, variant=variant)
    assert report.ok, f"{name}: " + "\n".join(report.failures())
    names = {case.name.split("/", 1)[1] for case in report.cases}
    assert {"required_only", "all_inputs", "override_none", "override_sum", "override_mean"} <= names
    spec = spec_for(build_loss(cfg), variant)
    if "avg_factor" in spec.names:
        assert {"avg_factor_float", "avg_factor_mean"} <= names
    if "weight" in spec.names:
        assert "weight" in names


@pytest.mark.parametrize("name", ["focal", "giou", "dfl", "ce_mask"])
def test_torchscript_in_cpp_float64(cpp_program: cpp.BuiltRunner, name: str) -> None:
    report = cpp.check_torchscript(CONFIGS[name], cpp_program.path, dtype=torch.float64)
    assert report.ok, "\n".join(report.failures())


def test_cross_entropy_ignore_index_argument(cpp_program: cpp.BuiltRunner, tmp_path) -> None:
    """CrossEntropyLoss's extra ``ignore_index: Optional[int]`` crosses into libtorch as a plain int."""
    loss = build_loss(CONFIGS["ce_softmax"])
    spec = spec_for(loss)
    inputs = spec.sample(loss, 16, seed=3)
    inputs["target"] = torch.where(torch.arange(16) % 4 == 0, 7, inputs["target"].clamp(min=0))
    args = cpp.forward_args(spec, inputs)
    cases = [cpp.Case("ignore_7", [*args, 7]), cpp.Case("ignore_default", list(args))]
    expected = [cpp.eager_outputs(loss, case) for case in cases]
    assert not torch.equal(expected[0][0], expected[1][0])
    torch.jit.script(loss).save(str(tmp_path / "ce.pt"))
    run = cpp.run_program(
        cpp_program.path, "torchscript", tmp_path / "ce.pt", cpp.write_cases(tmp_path / "c.pt", cases)
    )
    for want, got in zip(expected, run["cases"]):
        assert got["error"] is None
        for w, g in zip(want, got["outputs"]):
            assert cpp.compare(w, g).ok


def test_errors_are_reported_per_case(cpp_program: cpp.BuiltRunner, tmp_path) -> None:
    loss = build_loss(CONFIGS["l1"])
    spec = spec_for(loss)
    good = cpp.forward_args(spec, spec.sample(loss, 4, seed=0))
    cases = [cpp.Case("bad_override", [*good[:4], "average"]), cpp.Case("good", good)]
    torch.jit.script(loss).save(str(tmp_path / "l1.pt"))
    run = cpp.run_program(
        cpp_program.path, "torchscript", tmp_path / "l1.pt", cpp.write_cases(tmp_path / "c.pt", cases)
    )
    assert run["returncode"] == 1
    assert "average" in run["cases"][0]["error"]
    assert run["cases"][1]["error"] is None
    with pytest.raises(cpp.CppRunError, match="could not run"):
        cpp.run_program(cpp_program.path, "torchscript", tmp_path / "missing.pt", tmp_path / "c.pt")


def test_toolchain_problem_names_what_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(cpp.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "cmake" in cpp.toolchain_problem()
    with pytest.raises(cpp.ToolchainUnavailable, match="cmake"):
        cpp.build_runner()


PT2_MISSING = importlib.util.find_spec("visdet_export.export.pt2") is None
needs_pt2 = pytest.mark.skipif(PT2_MISSING, reason="the .pt2 exporter (visdet_export.export.pt2) is not in this tree")


@pytest.fixture(scope="session")
def pt2_bundle_check(cpp_program: cpp.BuiltRunner, runner_cache) -> cpp.BundleCheck:
    """The session's joint bundle of every representative configuration (``runner_cache.pt2_bundle``: the one
    test_pt2 and test_matrix use, so no extra AOTInductor compile) run in C++, every entry at its own N per call."""
    bundle = runner_cache.pt2_bundle(CONFIG_NAMES[0])
    checked = cpp.check_pt2_package(bundle.path, cpp_program.path)  # a bundle: check_pt2_bundle
    assert isinstance(checked, cpp.BundleCheck)
    return checked


@needs_pt2
def test_pt2_bundle_in_cpp_covers_every_config_at_mixed_sizes(pt2_bundle_check: cpp.BundleCheck) -> None:
    assert set(pt2_bundle_check.entries) == set(CONFIG_NAMES)
    calls = pt2_bundle_check.calls
    rotation, empty, smaller = calls[:-2], calls[-2], calls[-1]
    assert all(len(set(call.values())) > 1 for call in rotation)  # entries at different N in one call
    assert all(0 in call.values() and any(call.values()) for call in rotation)  # some entries at N = 0
    assert not any(empty.values())  # one call with every entry empty
    assert set(smaller.values()) == {7}  # and one at other class / bin / mask sizes than the exported ones
    for name in CONFIG_NAMES:
        assert {0, 1, 2, 7} <= {call[name] for call in calls}
        assert max(call[name] for call in calls) >= 2


@needs_pt2
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_pt2_bundle_in_cpp_matches_eager(pt2_bundle_check: cpp.BundleCheck, runner_cache, name: str) -> None:
    """Loss and d loss / d pred of every entry, C++ (AOTIModelPackageLoader) vs eager autograd, rtol 1e-6."""
    report = pt2_bundle_check.entries[name]
    assert report.ok, f"{name}: " + "\n".join(report.failures())
    assert len(report.cases) == len(pt2_bundle_check.calls)
    assert all(case.forward is not None and case.backward is not None for case in report.cases)
    free = ",".join(f"{symbol}={size}" for symbol, size in runner_cache.loss(name)[1].smaller_sizes().items())
    assert report.cases[-1].name == f"call{len(report.cases) - 1}/N=7" + (f",{free}" if free else "")


@needs_pt2
def test_pt2_single_package_in_cpp_matches_eager(cpp_program: cpp.BuiltRunner, runner_cache) -> None:
    """check_pt2 on a single (non-bundle) joint package: the dfl one test_pt2 builds through runner_cache."""
    key, options = runner_options("dfl", "pt2", pt2="separate")
    package = runner_cache.runner("dfl", "pt2", key=key, **options)
    report = cpp.check_pt2(CONFIGS["dfl"], cpp_program.path, artifact=package.path, joint=True)
    assert report.ok, "\n".join(report.failures())
    assert [case.name for case in report.cases][-1] == "N=0"
    with pytest.raises(ValueError, match="not a bundle"):
        cpp.check_pt2_bundle(package.path, cpp_program.path)
    assert all(case.backward is not None for case in report.cases)


@needs_pt2
def test_pt2_package_in_cpp_refuses_one_symbol_fed_two_sizes(cpp_program: cpp.BuiltRunner, runner_cache,
                                                              tmp_path) -> None:
    """The C++ README's promise: with ``AOTI_RUNTIME_CHECK_INPUTS=1`` (which run_program sets) a package refuses
    inputs whose sizes of one symbol disagree (a target one row short is otherwise read past its end)."""
    from visdet_export.export.artifacts import read_manifest

    key, options = runner_options("dfl", "pt2", pt2="separate")
    package = runner_cache.runner("dfl", "pt2", key=key, **options)
    loss = build_loss(CONFIGS["dfl"])
    names = [entry["name"] for entry in read_manifest(package.path)["inputs"]]
    (case,) = cpp.pt2_cases(loss, spec_for(loss), names, sizes=[7])
    assert cpp.run_program(cpp_program.path, "pt2", package.path, cpp.write_cases(tmp_path / "ok.pt", [case]))[
        "returncode"] == 0
    short = [arg[:6] if name == "target" else arg for name, arg in zip(names, case.args)]
    run = cpp.run_program(cpp_program.path, "pt2", package.path,
                          cpp.write_cases(tmp_path / "short.pt", [cpp.Case("short", short)]))
    assert "expected size 6==7" in str(run["cases"][0]["error"]), run


@needs_pt2
def test_cpp_command_checks_exported_packages(cpp_program: cpp.BuiltRunner, runner_cache, pt2_bundle_check,
                                              monkeypatch, capsys) -> None:
    """``visdet-export cpp --package PATH``: a package a user exported, run in C++ against eager with the loss its
    manifest records; only the packages when no --config is given. A single package runs for real (the dfl one
    test_pt2 builds); a bundle's report is the session's (its C++ run above), printed per entry."""
    key, options = runner_options("dfl", "pt2", pt2="separate")
    single = runner_cache.runner("dfl", "pt2", key=key, **options).path
    assert cpp.main(["--package", str(single)]) == 0
    out, err = capsys.readouterr()
    assert "note: .pt2 packages are programs" in err and "(1 here)" in err  # as verify says of code it loads
    assert f"{single.name} DistributionFocalLoss" in out and " ok " in out
    assert "torchscript" not in out  # no representative configuration ran
    bundle = runner_cache.pt2_bundle(CONFIG_NAMES[0]).path
    monkeypatch.setattr(cpp, "check_pt2_package", lambda path, program: pt2_bundle_check)
    assert cpp.main(["--package", str(bundle)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"bundle {bundle.name}: {len(CONFIG_NAMES)} entries" in "\n".join(lines)
    assert sum(line.startswith(f"  {name} ") for line in lines for name in CONFIG_NAMES) == len(CONFIG_NAMES)


def test_cpp_command_refuses_what_is_not_a_package_before_building(tmp_path, monkeypatch, capsys) -> None:
    """A file without a manifest, or an ONNX artifact, is a usage mistake (exit 2) reported before the build."""
    from visdet_export.export import export_onnx

    monkeypatch.setattr(cpp, "build_runner", lambda *a, **k: pytest.fail("built before the packages were checked"))
    (tmp_path / "loose.pt2").write_bytes(b"no manifest")
    onnx_path = export_onnx(dict(type="L1Loss"), tmp_path / "l1.onnx", verify=False)
    for path, message in ((tmp_path / "loose.pt2", "loose.pt2"), (onnx_path, "l1.onnx is not a .pt2 package")):
        with pytest.raises(SystemExit) as exit_:
            cpp.main(["--package", str(path)])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_cpp_command_tells_how_to_pass_a_loss_type(monkeypatch, capsys) -> None:
    """``check --configs FocalLoss`` takes a loss type by name, ``cpp --config`` a configuration name or JSON: a
    loss type named bare is a usage mistake (exit 2, before the build) whose message gives the JSON to pass."""
    monkeypatch.setattr(cpp, "build_runner", lambda *a, **k: pytest.fail("built before the configs were checked"))
    with pytest.raises(SystemExit) as exit_:
        cpp.main(["--config", "FocalLoss"])
    assert exit_.value.code == 2
    assert """for the loss type FocalLoss pass JSON: --config '{"type": "FocalLoss"}'""" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cpp.main(["--config", "focall"])
    assert "for the loss type" not in capsys.readouterr().err


def test_cpp_command_with_packages_alone_checks_them_and_exits_with_their_status(tmp_path, monkeypatch,
                                                                                  capsys) -> None:
    """``cpp --package PATH`` without --config runs no representative configuration, hands the package to
    check_pt2_package with the built program, prints its report under the package's name with the failures, and
    exits 1 when it fails, 0 when it passes. The build and the C++ run are stand-ins: no toolchain needed."""
    from visdet_export.export.artifacts import write_manifest

    package = tmp_path / "l1.pt2"
    package.write_bytes(b"not read")
    write_manifest(package, {"format": "pt2", "config": {"type": "L1Loss"}, "inputs": [], "outputs": []})
    program = tmp_path / "visdet_loss_runner"

    class Report:
        def __init__(self, ok: bool) -> None:
            self.ok = ok

        def summary(self) -> str:
            return "stand-in " + ("ok" if self.ok else "FAILED")

        def failures(self) -> list[str]:
            return [] if self.ok else ["case 0: loss differs"]

    checked = []
    monkeypatch.setattr(cpp, "build_runner", lambda *a, **k: cpp.BuiltRunner(program, tmp_path, False, 0.0))
    monkeypatch.setattr(cpp, "program_info", lambda path: {})
    monkeypatch.setattr(cpp, "check_torchscript", lambda *a, **k: pytest.fail("a representative configuration ran"))
    monkeypatch.setattr(cpp, "check_pt2", lambda *a, **k: pytest.fail("a representative configuration ran"))
    for ok, code in ((True, 0), (False, 1)):
        def check(path, prog, ok=ok):
            checked.append((path, prog))
            return Report(ok)

        monkeypatch.setattr(cpp, "check_pt2_package", check)
        assert cpp.main(["--package", str(package)]) == code
        out = capsys.readouterr().out
        assert f"l1.pt2 stand-in {'ok' if ok else 'FAILED'}" in out
        assert ("    case 0: loss differs" in out) is not ok
    assert [(recorded.path, prog) for recorded, prog in checked] == [(package, program)] * 2  # as read before
    assert all(type(recorded.losses[0]).__name__ == "L1Loss" for recorded, _ in checked)


def test_cpp_command_reads_each_package_once(tmp_path, monkeypatch, capsys) -> None:
    """``cpp --package``: each package's manifest is read (a checksum over the whole package) and its losses
    rebuilt once, before the build, and checked as read; the check read them again (a bundle's, twice more). The
    build and the C++ program are stand-ins: no toolchain needed."""
    from visdet_export.export import artifacts

    single = tmp_path / "l1.pt2"
    single.write_bytes(b"not read")
    artifacts.write_manifest(single, {"format": "pt2", "config": {"type": "L1Loss"}, "inputs": [], "outputs": []})
    bundle = tmp_path / "bundle.pt2"
    bundle.write_bytes(b"not read either")
    artifacts.write_manifest(bundle, {"format": "pt2", "bundle": True, "inputs": [], "outputs": [], "entries": [
        {"name": name, "config": {"type": loss}, "inputs": [], "outputs": []}
        for name, loss in (("loss_cls", "FocalLoss"), ("loss_bbox", "GIoULoss"))]})
    reads: list[str] = []
    builds: list[str] = []
    read_manifest, build_recorded_loss = artifacts.read_manifest, artifacts.build_recorded_loss
    monkeypatch.setattr(artifacts, "read_manifest", lambda path: reads.append(Path(path).name) or read_manifest(path))
    monkeypatch.setattr(artifacts, "build_recorded_loss",
                        lambda config, *a, **k: builds.append(config["type"]) or build_recorded_loss(config, *a, **k))
    program = tmp_path / "visdet_loss_runner"
    monkeypatch.setattr(cpp, "build_runner", lambda *a, **k: cpp.BuiltRunner(program, tmp_path, False, 0.0))
    monkeypatch.setattr(cpp, "program_info", lambda path: {})
    single_checks = []
    report = cpp.CheckReport("stand-in", "pt2", [], 0.0)
    monkeypatch.setattr(cpp, "check_pt2", lambda loss, prog, **kw: single_checks.append((loss, kw)) or report)
    runs = []
    monkeypatch.setattr(cpp, "run_program", lambda *args, **kw: runs.append(args) or {"cases": []})
    cpp.main(["--package", str(single), "--package", str(bundle)])
    capsys.readouterr()
    assert reads == ["l1.pt2", "bundle.pt2"]
    assert builds == ["L1Loss", "FocalLoss", "GIoULoss"]
    ((loss, options),) = single_checks
    assert type(loss).__name__ == "L1Loss" and options["artifact"] == single
    ((_, mode, package, _),) = runs
    assert mode == "pt2" and Path(package) == bundle


@pytest.mark.parametrize("joint", [True, False])
def test_check_pt2_package_runs_the_recorded_loss_in_its_layout_and_mode(tmp_path, monkeypatch, joint) -> None:
    """A single package is checked with the loss, input layout and joint (loss + gradient) mode its manifest
    records, against that package; a bundle goes to check_pt2_bundle. Stand-ins for the C++ checks."""
    from visdet_export.export.artifacts import write_manifest

    package = tmp_path / "focal.pt2"
    package.write_bytes(b"not read")
    write_manifest(package, {"format": "pt2", "config": {"type": "FocalLoss", "gamma": 1.5}, "variant": "onehot",
                             "joint": joint, "inputs": [], "outputs": []})
    calls = []
    monkeypatch.setattr(cpp, "check_pt2", lambda loss, program, **kw: calls.append((loss, program, kw)) or "single")
    monkeypatch.setattr(cpp, "check_pt2_bundle", lambda path, program: pytest.fail("checked as a bundle"))
    assert cpp.check_pt2_package(package, "prog") == "single"
    ((loss, program, options),) = calls
    assert type(loss).__name__ == "FocalLoss" and loss.gamma == 1.5 and program == "prog"
    assert options == {"variant": "onehot", "joint": joint, "artifact": package}
    bundle = tmp_path / "bundle.pt2"
    bundle.write_bytes(b"not read")
    write_manifest(bundle, {"format": "pt2", "bundle": True, "inputs": [], "outputs": [], "entries": [
        {"name": "loss_cls", "config": {"type": "FocalLoss"}, "inputs": [], "outputs": []}]})
    monkeypatch.setattr(cpp, "check_pt2_bundle", lambda path, program: ("bundle", path, program))
    kind, recorded, program = cpp.check_pt2_package(bundle, "prog")
    assert (kind, recorded.path, program) == ("bundle", bundle, "prog")  # the manifest read once, its losses built
    assert [type(loss).__name__ for loss in recorded.losses] == ["FocalLoss"]
