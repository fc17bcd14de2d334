"""The `visdet-export` command and the scripts in export_scripts/ (RELIABILITY 32-35).

Most tests swap the exporters for a fast fake (the CLI's job is planning, refusing, reporting and exit codes);
the end-to-end tests at the bottom run the real ONNX and TorchScript exporters on the GFL recipe, as the issue
asks, and re-check the artifacts with `verify`.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest

from visdet_export import cli
from visdet_export.export.artifacts import ArtifactError, atomic_output, write_manifest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "export_scripts"


# ------------------------------------------------------------------------------------------------- a fake exporter


class FakeExport:
    """Stands in for visdet_export.export: writes a small artifact + manifest through the real atomic writer."""

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.fail_on = fail_on
        self.verified: list[Path] = []

    def _write(self, kind: str, cfg, path, *, verify=True, overwrite=False, **options):
        self.calls.append((kind, Path(path).name, dict(options)))
        if self.fail_on and self.fail_on in Path(path).name:
            raise ArtifactError(f"{cfg['type']}: output 'loss' at N=7 differs from eager beyond rtol=0.0001")
        with atomic_output(path, overwrite) as tmp:
            tmp.write_bytes(json.dumps(cfg).encode())
        parity = {"sizes": [0, 1, 7], "max_abs_err": 1e-7, "max_rel_err": 2e-7, "rtol": 1e-4, "atol": 1e-5}
        write_manifest(path, {"format": kind, "config": cfg, "parity": parity if verify else None}, overwrite)
        return Path(path)

    def export_onnx(self, cfg, path, **kw):
        return self._write("onnx", cfg, path, **kw)

    def export_torchscript(self, cfg, path, **kw):
        return self._write("torchscript", cfg, path, **kw)

    def export_pt2(self, cfg, path, **kw):
        return self._write("pt2", cfg, path, **kw)

    def verify(self, path, *, seed=None):
        self.verified.append(Path(path))
        if Path(path).read_bytes() == b"tampered":
            raise ArtifactError(f"{path} does not match the checksum in its manifest")
        return {"passed": True, "max_abs_err": 0.0, "max_rel_err": 0.0, "sizes": [0, 1], "seed": seed or 5}


@pytest.fixture
def fake(monkeypatch):
    exporter = FakeExport()
    monkeypatch.setattr(cli, "_exporters", lambda: exporter)
    return exporter


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------------------ list


def test_list_shows_every_registered_loss_with_defaults(capsys):
    from visdet_export.registry import MODELS

    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in MODELS.module_dict:
        assert name in out
    assert "gamma=2.0" in out and "alpha=0.25" in out and "reduction='mean'" in out


def test_list_json_and_recipes(capsys):
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    assert json.loads(out)["FocalLoss"]["gamma"] == 2.0
    code, out, _ = run(capsys, "list", "--recipes")
    assert code == 0
    assert "gfl: GFL, Generalized Focal Loss" in out
    assert "roi_head.mask_head.loss_mask = CrossEntropyLoss(use_mask=True" in out
    code, out, _ = run(capsys, "list", "--recipes", "--json")
    assert json.loads(out)["retinanet"]["losses"]["loss_bbox"] == {
        "type": "SmoothL1Loss",
        "beta": 1.0,
        "loss_weight": 1.0,
    }


# ---------------------------------------------------------------------------------------------- export (fake API)


def test_export_recipe_writes_every_loss_and_format_with_a_summary(fake, capsys, tmp_path):
    out_dir = tmp_path / "out" / "gfl"  # created, parents included
    code, out, err = run(capsys, "export", "--recipe", "gfl", "--format", "onnx,torchscript", "--out", str(out_dir))
    assert code == 0, err
    expected = [f"loss_{n}.{s}" for n in ("bbox", "cls", "dfl") for s in ("onnx", "onnx.json", "ts.pt", "ts.pt.json")]
    assert files(out_dir) == sorted(expected)
    lines = out.splitlines()
    assert lines[0].split() == ["loss", "format", "file", "size", "parity"]
    assert len(lines) == 2 + 6
    assert "loss_dfl   torchscript" in out and "max abs err 1e-07" in out
    assert "[6/6] loss_dfl.ts.pt: ok" in err  # progress, one line per artifact when not on a terminal


def test_export_config_names_artifacts_by_dotted_path(fake, capsys, tmp_path):
    config = tmp_path / "mask_rcnn_custom.py"
    config.write_text(
        "model = dict(roi_head=dict(mask_head=dict(loss_mask=dict(type='CrossEntropyLoss', use_mask=True)),"
        " bbox_head=[dict(loss_bbox=dict(type='L1Loss'))]))\n"
    )
    code, _, err = run(
        capsys, "export", "--config", str(config), "--format", "onnx-joint,pt2-joint", "--out", str(tmp_path / "o")
    )
    assert code == 0, err
    assert files(tmp_path / "o") == sorted(
        f"model.roi_head.{p}.{s}{j}"
        for p in ("mask_head.loss_mask", "bbox_head.0.loss_bbox")
        for s in ("joint.onnx", "joint.pt2")
        for j in ("", ".json")
    )
    assert {c[2].get("joint") for c in fake.calls} == {True}


def test_export_loss_string_json_and_name(fake, capsys, tmp_path):
    code, _, err = run(
        capsys, "export", "--loss", 'dict(type="FocalLoss", gamma=1.5)', "--format", "onnx", "--out", str(tmp_path)
    )
    assert code == 0, err
    assert files(tmp_path) == ["FocalLoss.onnx", "FocalLoss.onnx.json"]
    assert json.loads((tmp_path / "FocalLoss.onnx").read_text()) == {"type": "FocalLoss", "gamma": 1.5}
    code, _, err = run(
        capsys,
        "export",
        "--loss",
        '{"type": "GIoULoss", "loss_weight": 2.0}',
        "--name",
        "giou",
        "--format",
        "ts",
        "--opset",
        "17",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    assert "giou.ts.pt" in files(tmp_path)


def test_export_only_selects_losses_and_opset_reaches_onnx(fake, capsys, tmp_path):
    code, _, err = run(
        capsys,
        "export",
        "--recipe",
        "faster_rcnn",
        "--only",
        "roi_head.bbox_head.loss_cls",
        "--format",
        "onnx",
        "--opset",
        "17",
        "--out",
        str(tmp_path),
        "--no-verify",
        "-q",
    )
    assert code == 0, err
    assert fake.calls == [("onnx", "roi_head.bbox_head.loss_cls.onnx", {"opset": 17})]
    assert err == ""  # --quiet
    code, _, err = run(capsys, "export", "--recipe", "faster_rcnn", "--only", "loss_cls", "--out", str(tmp_path / "x"))
    assert code == 2 and "no loss named loss_cls" in err and "rpn_head.loss_cls" in err


def test_existing_output_refused_before_anything_is_written(fake, capsys, tmp_path):
    (tmp_path / "loss_dfl.ts.pt").write_bytes(b"keep me")  # the last of six targets
    code, _, err = run(capsys, "export", "--recipe", "gfl", "--format", "onnx,torchscript", "--out", str(tmp_path))
    assert code == 2
    assert "nothing was written" in err and "loss_dfl.ts.pt exists" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert files(tmp_path) == ["loss_dfl.ts.pt"] and fake.calls == []
    assert (tmp_path / "loss_dfl.ts.pt").read_bytes() == b"keep me"
    # An existing manifest alone also blocks.
    (tmp_path / "loss_dfl.ts.pt").unlink()
    (tmp_path / "loss_cls.onnx.json").write_text("{}")
    code, _, err = run(capsys, "export", "--recipe", "gfl", "--out", str(tmp_path))
    assert code == 2 and "loss_cls.onnx.json exists" in err


def test_overwrite_replaces_and_reexport_without_it_fails(fake, capsys, tmp_path):
    args = ["export", "--recipe", "atss", "--format", "onnx", "--out", str(tmp_path)]
    assert run(capsys, *args)[0] == 0
    before = {p: (tmp_path / p).read_bytes() for p in files(tmp_path)}
    assert run(capsys, *args)[0] == 2
    assert {p: (tmp_path / p).read_bytes() for p in files(tmp_path)} == before
    code, _, err = run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert files(tmp_path) == sorted(before)  # no temporary files left


def test_symlinked_outputs_are_refused_even_with_overwrite(fake, capsys, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "loss_bbox.onnx").symlink_to(victim)
    code, _, err = run(
        capsys, "export", "--recipe", "retinanet", "--format", "onnx", "--out", str(out_dir), "--overwrite"
    )
    assert code == 2 and "loss_bbox.onnx is a symlink" in err
    assert victim.read_text() == "precious" and fake.calls == []
    (tmp_path / "linkdir").symlink_to(out_dir)
    code, _, err = run(capsys, "export", "--recipe", "retinanet", "--out", str(tmp_path / "linkdir"))
    assert code == 2 and "is a symlink" in err
    code, _, err = run(capsys, "export", "--recipe", "retinanet", "--out", str(victim))
    assert code == 2 and "not a directory" in err


def test_a_failing_artifact_is_reported_and_the_rest_still_export(monkeypatch, capsys, tmp_path):
    exporter = FakeExport(fail_on="loss_bbox.onnx")
    monkeypatch.setattr(cli, "_exporters", lambda: exporter)
    code, out, err = run(capsys, "export", "--recipe", "fcos", "--format", "onnx", "--out", str(tmp_path))
    assert code == 1
    assert "FAILED: ArtifactError: IoULoss: output 'loss' at N=7 differs" in out
    assert "1 of 3 artifact(s) failed" in err and "Traceback" not in err
    assert files(tmp_path) == sorted(f"loss_{n}.onnx{j}" for n in ("cls", "centerness") for j in ("", ".json"))


def test_interrupted_export_keeps_finished_artifacts_and_leaves_no_partial_file(monkeypatch, capsys, tmp_path):
    exporter = FakeExport()

    def interrupted(cfg, path, **kw):
        if "loss_bbox" in Path(path).name:
            with atomic_output(path) as tmp:
                tmp.write_bytes(b"half")
                raise KeyboardInterrupt
        return exporter.export_onnx(cfg, path, **kw)

    monkeypatch.setattr(cli, "_exporters", lambda: types.SimpleNamespace(export_onnx=interrupted))
    code, _, err = run(capsys, "export", "--recipe", "gfl", "--format", "onnx", "--out", str(tmp_path))
    assert code == 130 and "interrupted" in err
    assert files(tmp_path) == ["loss_cls.onnx", "loss_cls.onnx.json"]  # no temporary, no half-written file


def test_unavailable_format_fails_before_writing(monkeypatch, capsys, tmp_path):
    exporter = FakeExport()
    monkeypatch.setattr(cli, "_exporters", lambda: types.SimpleNamespace(export_onnx=exporter.export_onnx))
    code, _, err = run(capsys, "export", "--recipe", "gfl", "--format", "onnx,pt2", "--out", str(tmp_path / "o"))
    assert code == 1 and "the pt2 format is not available" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- export: user mistakes (E)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "retina"], "unknown recipe 'retina'. Did you mean retinanet?"),
        (["--recipe", "gfl", "--format", "onnx,tflite"], "unknown format 'tflite'; choose from onnx"),
        (["--loss", 'dict(type="FocalLos")'], "unknown loss type 'FocalLos'. Did you mean FocalLoss"),
        (["--loss", 'dict(type="FocalLoss", gamma=-1.0)'], "gamma=-1.0 is out of range"),
        (["--loss", 'dict(type="FocalLoss", gama=2.0)'], "unknown argument(s) gama"),
        (["--loss", 'dict(type="FocalLoss", gamma=float("inf"))'], "a call to float() is not allowed"),
        (["--loss", '{"type": "FocalLoss", "gamma": Infinity}'], "must be finite"),
        (["--loss", "dict(type="], "invalid syntax"),
        (["--recipe", "gfl", "--name", "x"], "--name applies to --loss only"),
        (["--config", "missing.py"], "config file missing.py does not exist"),
    ],
)
def test_user_mistakes_exit_2_with_one_clear_line(fake, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "export", *argv, "--out", str(tmp_path / "o"))
    assert code == 2
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("visdet-export: error: ")
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "o").exists() and fake.calls == []


def test_config_with_code_is_refused_by_the_cli_and_never_runs(fake, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "evil.py"
    config.write_text(
        "loss_cls = dict(type='FocalLoss')\nimport pathlib\npathlib.Path('PWNED').write_text('code ran')\n"
    )
    code, out, err = run(capsys, "export", "--config", str(config), "--out", str(tmp_path / "o"))
    assert code == 2 and out == ""
    assert f"{config}:2: an import is not allowed in a config" in err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o").exists()


def test_bad_config_values_name_the_loss_path(fake, capsys, tmp_path):
    config = tmp_path / "det.json"
    config.write_text(json.dumps({"model": {"bbox_head": {"loss_bbox": {"type": "SmoothL1Loss", "beta": 0}}}}))
    code, _, err = run(capsys, "export", "--config", str(config), "--out", str(tmp_path / "o"))
    assert code == 2 and "model.bbox_head.loss_bbox: beta=0 is out of range" in err


def test_config_keys_cannot_steer_the_output_path(fake, capsys, tmp_path):
    config = tmp_path / "det.json"
    config.write_text(json.dumps({"model": {"loss_../../escape": {"type": "L1Loss"}}}))
    code, _, err = run(capsys, "export", "--config", str(config), "--out", str(tmp_path / "o"))
    assert code == 2 and "cannot be used as a file name" in err
    assert files(tmp_path) == ["det.json"]


def test_argparse_mistakes_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--recipe", "gfl"])  # --out missing
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--recipe", "gfl", "--loss", "L1Loss", "--out", "x"])  # two sources
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- verify and check


def test_verify_checks_files_and_directories_and_warns_that_torchscript_is_code(fake, capsys, tmp_path):
    assert run(capsys, "export", "--recipe", "gfl", "--format", "onnx,torchscript", "--out", str(tmp_path))[0] == 0
    code, out, err = run(capsys, "verify", str(tmp_path))
    assert code == 0, err
    assert len(fake.verified) == 6
    assert "runs the code they contain" in err
    assert out.count(" ok ") == 6
    # Named files (a manifest names its artifact); ONNX alone: no code warning.
    fake.verified.clear()
    code, _, err = run(capsys, "verify", str(tmp_path / "loss_cls.onnx"), str(tmp_path / "loss_dfl.onnx.json"))
    assert code == 0 and [p.name for p in fake.verified] == ["loss_cls.onnx", "loss_dfl.onnx"]
    assert "runs the code" not in err


def test_verify_failures_and_missing_paths(fake, capsys, tmp_path):
    assert run(capsys, "export", "--recipe", "atss", "--format", "onnx", "--out", str(tmp_path))[0] == 0
    (tmp_path / "loss_bbox.onnx").write_bytes(b"tampered")
    code, out, err = run(capsys, "verify", str(tmp_path))
    assert code == 1
    assert "FAILED" in out and "does not match the checksum" in out
    assert "1 of 3 artifact(s) failed verification" in err
    code, _, err = run(capsys, "verify", str(tmp_path / "nope.onnx"))
    assert code == 2 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "verify", str(empty))
    assert code == 2 and "no artifacts found" in err


def test_check_delegates_its_arguments(monkeypatch, capsys):
    seen = []
    module = types.ModuleType("visdet_export.check")
    module.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "visdet_export.check", module)
    import visdet_export

    monkeypatch.setattr(visdet_export, "check", module, raising=False)
    assert cli.main(["check", "--format", "onnx", "--help"]) == 3
    assert seen == [["--format", "onnx", "--help"]]


# ---------------------------------------------------------------------------------------------- export_scripts


@pytest.mark.parametrize("script", ["export_all_recipes.py", "export_configs.py"])
def test_scripts_answer_help(script):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def run_script(monkeypatch, script: str, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    return info.value.code


def test_export_all_recipes_writes_a_tree_and_refuses_existing(fake, monkeypatch, capsys, tmp_path):
    from visdet_export.recipes import recipe_losses, recipe_names

    assert run_script(monkeypatch, "export_all_recipes.py", str(tmp_path), "--format", "onnx", "-q") == 0
    assert files(tmp_path) == recipe_names()
    for name in recipe_names():
        assert files(tmp_path / name) == sorted(f"{p}.onnx{j}" for p in recipe_losses(name) for j in ("", ".json"))
    out = capsys.readouterr().out
    assert "artifact(s) written to" in out
    # A second run stops before writing anything.
    calls = len(fake.calls)
    assert run_script(monkeypatch, "export_all_recipes.py", str(tmp_path), "--recipes", "gfl,rpn") == 2
    assert len(fake.calls) == calls and "exists" in capsys.readouterr().err
    assert run_script(monkeypatch, "export_all_recipes.py", str(tmp_path), "--recipes", "nope") == 2


def test_export_configs_batches_detector_configs(fake, monkeypatch, capsys, tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base.py").write_text("model = dict(bbox_head=dict(loss_cls=dict(type='FocalLoss')))\n")
    (tmp_path / "cfg" / "a.py").write_text(
        "_base_ = 'base.py'\nmodel = dict(bbox_head=dict(loss_bbox=dict(type='GIoULoss')))\n"
    )
    (tmp_path / "cfg" / "b.toml").write_text(
        "[model.rpn_head.loss_cls]\ntype = 'CrossEntropyLoss'\nuse_sigmoid = true\n"
    )
    (tmp_path / "cfg" / "evil.py").write_text("import os\n")
    out = tmp_path / "out"
    code = run_script(
        monkeypatch,
        "export_configs.py",
        str(tmp_path / "cfg" / "a.py"),
        str(tmp_path / "cfg" / "b.toml"),
        "--out",
        str(out),
        "--format",
        "torchscript",
        "-q",
    )
    assert code == 0
    assert files(out / "a") == sorted(
        f"model.bbox_head.loss_{n}.ts.pt{j}" for n in ("cls", "bbox") for j in ("", ".json")
    )
    assert files(out / "b") == ["model.rpn_head.loss_cls.ts.pt", "model.rpn_head.loss_cls.ts.pt.json"]
    code = run_script(
        monkeypatch, "export_configs.py", str(tmp_path / "cfg" / "evil.py"), "--out", str(tmp_path / "o2")
    )
    assert code == 2 and "an import is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------- end to end: the real exporters


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "visdet_export", "export", "--recipe", "nope", "--out", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "visdet-export: error: unknown recipe 'nope'. Bundled recipes: "
        + ", ".join(__import__("visdet_export.recipes", fromlist=["x"]).recipe_names())
    )


@pytest.fixture(scope="module")
def gfl_artifacts(tmp_path_factory):
    """`visdet-export export --recipe gfl --format onnx,torchscript --out DIR`, with the real exporters."""
    out_dir = tmp_path_factory.mktemp("gfl")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "visdet_export",
            "export",
            "--recipe",
            "gfl",
            "--format",
            "onnx,torchscript",
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return out_dir, result


def test_gfl_recipe_exports_verified_onnx_and_torchscript_with_manifests(gfl_artifacts):
    out_dir, result = gfl_artifacts
    assert result.returncode == 0, result.stdout + result.stderr
    for loss in ("loss_cls", "loss_bbox", "loss_dfl"):
        for suffix, fmt in ((".onnx", "onnx"), (".ts.pt", "torchscript")):
            manifest = json.loads((out_dir / f"{loss}{suffix}.json").read_text())
            assert manifest["format"] == fmt
            assert manifest["parity"]["max_abs_err"] <= manifest["parity"]["atol"] + 1e-3
            assert manifest["sha256"]
    assert "loss_cls   onnx" in result.stdout and "max abs err" in result.stdout
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary files


def test_verify_rechecks_the_exported_gfl_artifacts(gfl_artifacts, capsys):
    out_dir, result = gfl_artifacts
    assert result.returncode == 0, result.stdout + result.stderr
    code, out, err = run(capsys, "verify", str(out_dir), "--seed", "3")
    assert code == 0, out + err
    assert out.count(" ok ") == 6 and "seed 3" in out
    # A changed artifact no longer verifies.
    artifact = out_dir / "loss_dfl.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    code, out, _ = run(capsys, "verify", str(artifact))
    assert code == 1 and "checksum" in out
