"""verify(): reload an artifact, compare with eager on fresh inputs; refuse tampered files and mismatched manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import TensorProto, helper, numpy_helper

from visdet_export.export import ArtifactError, export_onnx, read_manifest, verify
from visdet_export.export import onnx as onnx_export
from visdet_export.export.artifacts import manifest_path
from visdet_export.export.verify import TOLERANCES, compare


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    return {
        "focal": export_onnx(dict(type="FocalLoss", gamma=2.0, alpha=0.25), root / "focal.onnx", verify=False),
        "giou_joint": export_onnx(dict(type="GIoULoss", loss_weight=2.0), root / "giou.onnx", joint=True, verify=False),
    }


def copy_artifact(source: Path, directory: Path) -> Path:
    target = directory / source.name
    shutil.copyfile(source, target)
    shutil.copyfile(manifest_path(source), manifest_path(target))
    return target


def edit_manifest(path: Path, **changes: object) -> None:
    record = json.loads(manifest_path(path).read_text())
    record.update(changes)
    manifest_path(path).write_text(json.dumps(record))


@pytest.mark.parametrize("name", ["focal", "giou_joint"])
def test_verify_passes_on_good_artifacts(artifacts: dict[str, Path], name: str) -> None:
    report = verify(artifacts[name], seed=11)
    assert report["passed"] is True and report["format"] == "onnx"
    assert report["sizes"] == [0, 1, 7, 257] and report["seed"] == 11
    assert report["rtol"] == TOLERANCES["onnx"]["rtol"] and report["atol"] == TOLERANCES["onnx"]["atol"]
    assert report["joint"] is (name == "giou_joint")
    assert 0.0 <= report["max_abs_err"] <= 1e-3
    outputs = {key for entry in report["per_size"] for key in entry if key not in ("n", "free_sizes", "logit_range")}
    assert outputs == ({"loss", "grad_pred"} if name == "giou_joint" else {"loss"})
    # focal's class count is free: checked once more at another than the exported one; GIoU's shapes are fixed
    free = [entry["free_sizes"] for entry in report["per_size"] if "free_sizes" in entry]
    assert free == ([{"C": 20}] if name == "focal" else []) and report.get("free_sizes") == (free or [None])[0]
    # A fresh seed each time when none is given, reported back.
    assert isinstance(verify(artifacts[name], sizes=(3,))["seed"], int)


def test_an_artifact_whose_manifest_fixes_the_classes_is_checked_at_its_own_sizes(artifacts, tmp_path) -> None:
    """Artifacts of earlier versions fixed the class count (their manifests write 80): verify keeps to it."""
    path = copy_artifact(artifacts["focal"], tmp_path)
    inputs = json.loads(manifest_path(path).read_text())["inputs"]
    edit_manifest(path, inputs=[{**item, "shape": [80 if d == "C" else d for d in item["shape"]]} for item in inputs])
    report = verify(path, seed=3)
    assert report["passed"] and "free_sizes" not in report
    assert all("free_sizes" not in entry for entry in report["per_size"])


def test_tampered_artifact_fails_its_checksum(artifacts: dict[str, Path], tmp_path: Path) -> None:
    path = copy_artifact(artifacts["focal"], tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        verify(path)


def test_manifest_config_that_differs_from_the_numbers_fails(artifacts: dict[str, Path], tmp_path: Path) -> None:
    path = copy_artifact(artifacts["focal"], tmp_path)
    config = read_manifest(path)["config"]
    edit_manifest(path, config={**config, "gamma": 1.0})  # the checksum (of the model) still matches
    with pytest.raises(ArtifactError, match="differs from eager"):
        verify(path, seed=0)


def test_manifest_config_that_differs_from_the_embedded_one_fails(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """A change below the numeric tolerance is still caught by the config recorded in the model."""
    path = copy_artifact(artifacts["focal"], tmp_path)
    config = read_manifest(path)["config"]
    edit_manifest(path, config={**config, "loss_weight": 1.0 + 1e-7})
    with pytest.raises(ArtifactError, match="embedded"):
        verify(path, seed=0)


def test_joint_manifest_on_a_loss_only_model_fails(artifacts: dict[str, Path], tmp_path: Path) -> None:
    path = copy_artifact(artifacts["focal"], tmp_path)
    edit_manifest(path, joint=True)
    with pytest.raises(ArtifactError, match="output"):
        verify(path, seed=0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "pickle"}, "unknown artifact format"),
        ({"config": {"type": "NoSuchLoss"}}, "does not build"),
        ({"inputs": [{"name": "pred"}]}, "do not fit"),
    ],
)
def test_bad_manifests_are_refused(artifacts: dict[str, Path], tmp_path: Path, changes: dict, message: str) -> None:
    path = copy_artifact(artifacts["focal"], tmp_path)
    edit_manifest(path, **changes)
    with pytest.raises(ArtifactError, match=message):
        verify(path)


def test_missing_manifest_or_file(artifacts: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "lonely.onnx"
    shutil.copyfile(artifacts["focal"], path)
    with pytest.raises(ArtifactError, match="no manifest"):
        verify(path)
    with pytest.raises(ArtifactError, match="not a file"):
        verify(tmp_path / "absent.onnx")


def _model_with_external_data(directory: Path, location: str) -> Path:
    """y = x + c, with c stored as external data at ``location`` (relative to the model's directory)."""
    constant = numpy_helper.from_array(np.ones(4, dtype=np.float32), "c")
    constant.ClearField("raw_data")
    constant.data_location = TensorProto.EXTERNAL
    entry = constant.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[constant],
    )
    path = directory / "model.onnx"
    path.write_bytes(onnx_model(graph).SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin", "link.bin"])
def test_external_data_outside_the_model_directory_is_refused(tmp_path: Path, location: str) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "outside.bin").write_bytes(np.ones(4, dtype=np.float32).tobytes())
    (model_dir / "link.bin").symlink_to(tmp_path / "outside.bin")
    path = _model_with_external_data(model_dir, location)
    with pytest.raises(ArtifactError, match="outside its directory"):
        onnx_export.load_runner(path, None)


def _external_tensor(name: str, location: str) -> TensorProto:
    tensor = numpy_helper.from_array(np.ones(4, dtype=np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _constant_in_a_function_subgraph(location: str) -> onnx.ModelProto:
    """A model function whose If branch holds a Constant stored at ``location``."""
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=_external_tensor("c", location))],
        "branch", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])],
    )
    function = helper.make_function(
        "local", "f", ["flag"], ["y"],
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch)],
        [helper.make_opsetid("", 18)],
    )
    graph = helper.make_graph(
        [helper.make_node("f", ["flag"], ["y"], domain="local")], "g",
        [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    return onnx_model(graph, functions=[function], opset_imports=opsets)


def _sparse_constant(location: str) -> onnx.ModelProto:
    """A Constant whose sparse value's values are stored at ``location``."""
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "i")
    sparse = helper.make_sparse_tensor(_external_tensor("v", location), indices, [8])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], sparse_value=sparse)], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])],
    )
    return onnx_model(graph)


@pytest.mark.parametrize("build", [_constant_in_a_function_subgraph, _sparse_constant], ids=["function", "sparse"])
def test_external_data_outside_the_directory_is_found_in_functions_and_sparse_tensors(tmp_path: Path, build) -> None:
    """The check reads every tensor of the model, not only those onnxruntime's own loader refuses first."""
    path = tmp_path / "model.onnx"
    path.write_bytes(build("../outside.bin").SerializeToString())
    with pytest.raises(ArtifactError, match="outside its directory"):
        onnx_export.check_external_data(path)
    path.write_bytes(build("inside.bin").SerializeToString())
    assert set(onnx_export.check_external_data(path)) == {"inside.bin"}  # the If has it in both branches


def test_external_data_inside_the_model_directory_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(np.full(4, 2.0, dtype=np.float32).tobytes())
    path = _model_with_external_data(tmp_path, "weights.bin")
    assert onnx_export.check_external_data(path) == ["weights.bin"]
    onnx.checker.check_model(str(path))


def test_compare_semantics() -> None:
    import torch

    ok = compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0001]), rtol=1e-4, atol=1e-5)
    assert ok["ok"] and ok["max_abs_err"] > 0
    assert not compare(torch.tensor([1.0]), torch.tensor([1.01]), rtol=1e-4, atol=1e-5)["ok"]
    assert not compare(torch.zeros(2), torch.zeros(3), rtol=1e-4, atol=1e-5)["shape_ok"]
    assert not compare(torch.tensor([float("nan")]), torch.tensor([1.0]), rtol=1e-4, atol=1e-5)["ok"]
    assert compare(torch.tensor([float("inf")]), torch.tensor([float("inf")]), rtol=1e-4, atol=1e-5)["ok"]
    assert compare(torch.zeros(0, 4), torch.zeros(0, 4), rtol=1e-4, atol=1e-5)["ok"]


# --- what interrupted, concurrent and threaded exports leave -----------------------------------------------------


def test_a_manifest_describes_the_file_its_export_wrote(tmp_path: Path) -> None:
    """Two exports to one path at once: the one whose file was replaced before its manifest was written fails
    rather than describing the other's file."""
    from visdet_export.export.artifacts import atomic_output, write_manifest

    target = tmp_path / "a.onnx"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"mine")
    target.write_bytes(b"theirs")
    with pytest.raises(ArtifactError, match="was replaced while it was exported"):
        write_manifest(target, {})
    assert not manifest_path(target).exists()
    manifest_path(target).write_text("{not json")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        read_manifest(target)


def test_verify_of_a_directory_reports_what_an_interrupted_export_left(tmp_path: Path, capsys) -> None:
    from visdet_export import cli

    good = export_onnx(dict(type="L1Loss"), tmp_path / "good.onnx", verify=False)
    shutil.copyfile(good, tmp_path / "orphan.onnx")  # renamed into place, interrupted before its manifest
    shutil.copyfile(manifest_path(good), tmp_path / "gone.onnx.json")  # a manifest whose artifact is gone
    (tmp_path / ".next.onnx.abc123.tmp").write_bytes(b"")  # a temporary file (SIGKILL)
    assert cli.main(["verify", str(tmp_path), "-q"]) == cli.EXIT_FAILED
    out = capsys.readouterr().out
    assert "orphan.onnx has no manifest" in out and "gone.onnx is not a file" in out and ".next.onnx" in out
    assert "good.onnx" in out


def test_an_interrupted_export_leaves_only_complete_artifacts(tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C (or SIGTERM) between an artifact's rename and its manifest: the CLI removes the unfinished one."""
    from visdet_export import cli
    from visdet_export.export import artifacts

    real = artifacts.write_manifest
    calls = []

    def interrupted(artifact, fields, overwrite=False):  # the second artifact is interrupted
        calls.append(artifact)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(artifact, fields, overwrite)

    for module in ("visdet_export.export.onnx", "visdet_export.export.torchscript"):
        monkeypatch.setattr(f"{module}.write_manifest", interrupted)
    out = tmp_path / "out"
    config = json.dumps({"type": "L1Loss"})
    argv = ["export", "--loss", config, "--format", "onnx,torchscript", "--out", str(out), "--no-verify", "-q"]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    left = sorted(path.name for path in out.iterdir())
    assert left == ["L1Loss.onnx", "L1Loss.onnx.json"], left
    assert "no partial files were left" in capsys.readouterr().err


def failing_as_torch_does_on_an_interrupted_import(*args, **kwargs):
    """torch.onnx.export when a Ctrl-C lands in its import of torch._dynamo: the half-imported module makes its
    `except torch._dynamo.exc.UserError` clause fail, and the exporter reports that error (the interrupt is only
    in its context)."""
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from None
    except Exception as error:  # torch's capture strategies catch it and raise their own error
        raise RuntimeError("Failed to export the model with torch.export") from error


@pytest.mark.parametrize(
    "exporter, suffix, patched",
    [
        ("export_onnx", ".onnx", "torch.onnx.export"),
        ("export_pt2", ".pt2", "torch.export.export"),
        ("export_pt2", ".pt2", "torch._inductor.aoti_compile_and_package"),
        ("export_torchscript", ".ts.pt", "torch.jit.script"),
    ],
)
def test_an_interrupt_that_torch_turned_into_an_error_is_raised_as_the_interrupt(
    tmp_path: Path, monkeypatch, exporter: str, suffix: str, patched: str
) -> None:
    """A Ctrl-C in a Python program (a notebook) is a KeyboardInterrupt, not a failed artifact."""
    from visdet_export import export

    monkeypatch.setattr(patched, failing_as_torch_does_on_an_interrupted_import)
    with pytest.raises(KeyboardInterrupt) as info:
        getattr(export, exporter)(dict(type="L1Loss"), tmp_path / f"l1{suffix}", verify=False)
    assert type(info.value) is KeyboardInterrupt and info.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []


# A Ctrl-C that arrives while torch's compiler stack is being imported, sent by the import system itself as the
# module named on the command line is about to load, so that it lands there every time.
CTRL_C_IN_AN_IMPORT = """
import os, signal, sys
import torch
from visdet_export import export_onnx

class CtrlCDuring:
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCDuring())
try:
    export_onnx(dict(type="L1Loss"), "first.onnx", verify=False)
    print("first export finished")
except KeyboardInterrupt:
    print("first export interrupted")
export_onnx(dict(type="L1Loss"), "again.onnx", verify=False)
torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))
print("exported and compiled again")
"""


@pytest.mark.parametrize("module", ["torch._dynamo.eval_frame", "onnx.helper"])  # Dynamo's import; the ONNX exporter's
def test_a_ctrl_c_in_the_first_exports_imports_leaves_the_process_able_to_export(tmp_path: Path, module: str) -> None:
    """A notebook's interrupt button in a process's first export: torch's half-imported compiler stack made every
    later torch.compile, torch.export and ONNX export of the process fail ("module 'torch._dynamo' has no attribute
    'exc'", "module 'onnx' has no attribute 'external_data_helper'")."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CTRL_C_IN_AN_IMPORT, module], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["first export interrupted", "exported and compiled again"], done.stdout
    assert sorted(path.name for path in tmp_path.iterdir() if path.suffix == ".onnx") == ["again.onnx"]


def test_a_ctrl_c_held_back_in_an_import_is_raised_once_the_module_is_in(tmp_path: Path, monkeypatch) -> None:
    """The held-back interrupt is not lost, the module it arrived in is whole, Python's handler is back, and a
    module this torch does not have (the list names private ones a later torch may move) is no error."""
    import signal
    import sys

    from visdet_export.export.artifacts import import_uninterrupted

    (tmp_path / "interrupted_module.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nWHOLE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "interrupted_module", raising=False)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive session
    try:
        with pytest.raises(KeyboardInterrupt):
            import_uninterrupted(["torch._no_such_module", "interrupted_module"])
        assert sys.modules["interrupted_module"].WHOLE
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
        sys.modules.pop("interrupted_module", None)


def test_the_runtime_check_stops_on_an_interrupt_that_torch_turned_into_an_error(monkeypatch) -> None:
    """`visdet-export check` (and check_cell) otherwise listed the interrupted runtime as a failing row."""
    from visdet_export import check

    monkeypatch.setattr(check, "build_runner", failing_as_torch_does_on_an_interrupted_import)
    with pytest.raises(KeyboardInterrupt):
        check.check_cell("l1", "onnx", check.RunnerCache())


def test_exports_from_several_threads(tmp_path: Path) -> None:
    """torch.export is not thread-safe: the exporters take turns (they failed, and broke later exports, before)."""
    import threading

    errors: list[BaseException] = []

    def export(cfg: dict, name: str) -> None:
        try:
            export_onnx(cfg, tmp_path / name)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [
        threading.Thread(target=export, args=(cfg, f"{index}.onnx"))
        for index, cfg in enumerate([dict(type="FocalLoss"), dict(type="GIoULoss"), dict(type="L1Loss")])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(verify(tmp_path / f"{index}.onnx")["passed"] for index in range(3))


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path: Path) -> None:
    """timeout, CI cancellation and docker stop send SIGTERM: exit 130, no temporary files, every artifact left
    has its manifest."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "visdet_export", "export", "--recipe", "gfl", "--format", "onnx", "--out", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not out.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the output directory appears once every export is planned, well after main() started
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    left = sorted(path.name for path in out.iterdir())
    assert not [name for name in left if name.endswith(".tmp")], left
    artifacts = [name for name in left if name.endswith(".onnx")]
    assert sorted(f"{name}.json" for name in artifacts) == [name for name in left if name.endswith(".json")]


def test_an_onnx_runner_can_keep_to_one_thread(tmp_path: Path) -> None:
    """A service holding many runners: each session otherwise starts about one thread per core."""
    import os

    path = export_onnx(dict(type="L1Loss"), tmp_path / "l1.onnx", verify=False)
    before = len(os.listdir("/proc/self/task"))
    runners = [onnx_export.load_runner(path, threads=1) for _ in range(5)]
    assert len(os.listdir("/proc/self/task")) == before
    assert len(runners) == 5
