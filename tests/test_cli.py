"""The `visdet-export` command and the scripts in export_scripts/ (RELIABILITY 32-35).

Most tests swap the exporters for a fast fake (the CLI's job is planning, refusing, reporting and exit codes);
the end-to-end tests at the bottom run the real ONNX and TorchScript exporters on the GFL recipe, as the issue
asks, and re-check the artifacts with `verify`.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from conftest import onnx_model

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
        "19",
        "--out",
        str(tmp_path),
        "--no-verify",
        "-q",
    )
    assert code == 0, err
    assert fake.calls == [("onnx", "roi_head.bbox_head.loss_cls.onnx", {"opset": 19})]
    assert err == ""  # --quiet
    code, _, err = run(capsys, "export", "--recipe", "faster_rcnn", "--only", "loss_cls", "--out", str(tmp_path / "x"))
    assert code == 2 and "--only: loss_cls names rpn_head.loss_cls, roi_head.bbox_head.loss_cls; give one" in err
    code, _, err = run(capsys, "export", "--recipe", "faster_rcnn", "--only", "loss_clss", "--out", str(tmp_path / "x"))
    assert code == 2 and "no loss named loss_clss" in err
    argv = ["export", "--recipe", "faster_rcnn", "--only", "bbox_head.loss_cls", "--format", "onnx", "-q"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "y"))  # the unique end of a path
    assert code == 0, err
    assert fake.calls[-1][:2] == ("onnx", "roi_head.bbox_head.loss_cls.onnx")


def test_warnings_are_one_line_of_ours_each_once(fake, capsys, tmp_path):
    config = tmp_path / "iou.py"
    entry = "dict(loss_bbox=dict(type='IoULoss', linear=True))"
    config.write_text(f"a = {entry}\nb = {entry}\n")
    code, _, err = run(
        capsys, "export", "--config", str(config), "--format", "onnx", "-q", "--out", str(tmp_path / "o")
    )
    assert code == 0, err
    message = 'visdet-export: warning: IoULoss(linear=True) is deprecated; use mode="linear"'
    assert err.count(message) == 1 and "sys.exit" not in err


def test_export_skip_unknown_leaves_out_losses_this_package_lacks(fake, capsys, tmp_path):
    config = tmp_path / "vfnet.py"
    config.write_text(
        "model = dict(bbox_head=dict(loss_cls=dict(type='VarifocalLoss', use_sigmoid=True),\n"
        "                            loss_bbox=dict(type='GIoULoss', loss_weight=1.5)))\n"
    )
    argv = ["export", "--config", str(config), "--format", "onnx", "-q"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "a"))
    assert code == 2 and "VarifocalLoss is an MMDetection loss that visdet-export does not implement" in err
    code, _, err = run(capsys, *argv, "--skip-unknown", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert "skipped model.bbox_head.loss_cls: 'VarifocalLoss' is not a loss of this package" in err
    assert [call[:2] for call in fake.calls] == [("onnx", "model.bbox_head.loss_bbox.onnx")]


def test_export_gives_each_loss_the_input_layout_of_its_head(fake, capsys, tmp_path):
    code, _, err = run(capsys, "export", "--recipe", "fcos", "--format", "onnx", "--out", str(tmp_path), "-q")
    assert code == 0, err
    options = {target: opts for _, target, opts in fake.calls}
    assert options["loss_centerness.onnx"] == {} and options["loss_cls.onnx"] == {}  # FocalLoss: its default
    code, _, err = run(capsys, "export", "--recipe", "rpn", "--format", "onnx", "--out", str(tmp_path / "rpn"), "-q")
    assert code == 0, err
    assert fake.calls[-2:] == [
        ("onnx", "rpn_head.loss_cls.onnx", {"variant": "labels"}),  # (N, 1) logits and labels, as the RPN has them
        ("onnx", "rpn_head.loss_bbox.onnx", {}),
    ]
    code, _, err = run(capsys, "export", "--recipe", "yolov3", "--format", "onnx", "--out", str(tmp_path / "y"), "-q")
    assert code == 0, err
    options = {target: opts for _, target, opts in fake.calls[-4:]}
    assert options["loss_cls.onnx"] == {"variant": "dense"}  # (N, C) logits, one-hot (smoothed) float targets
    assert options["loss_xy.onnx"] == {"variant": "dense"}  # (N, 2) centre offsets and their soft targets
    assert options["loss_conf.onnx"] == options["loss_wh.onnx"] == {}


def test_export_loss_variant_reaches_the_exporter_and_is_checked_first(fake, capsys, tmp_path):
    argv = ["export", "--loss", "QualityFocalLoss", "--variant", "dense", "--format", "onnx,ts", "--out", str(tmp_path)]
    code, _, err = run(capsys, *argv, "-q")
    assert code == 0, err
    assert fake.calls == [
        ("onnx", "QualityFocalLoss.onnx", {"variant": "dense"}),
        ("torchscript", "QualityFocalLoss.ts.pt", {"variant": "dense"}),
    ]
    code, _, err = run(capsys, "export", "--loss", "GIoULoss", "--variant", "dense", "--out", str(tmp_path / "x"))
    assert code == 2 and "GIoULoss has no input variant 'dense'" in err and not (tmp_path / "x").exists()
    code, _, err = run(capsys, "export", "--recipe", "gfl", "--variant", "dense", "--out", str(tmp_path / "y"))
    assert code == 2 and "--variant applies to --loss only" in err


def test_export_optional_inputs_reach_the_graph_exporters_and_are_checked_first(fake, capsys, tmp_path):
    argv = ["export", "--loss", "FocalLoss", "--format", "onnx,ts,pt2", "--optional", "", "--out", str(tmp_path)]
    code, _, err = run(capsys, *argv, "-q")
    assert code == 0, err
    assert fake.calls == [  # a scripted module takes every optional input as an optional argument
        ("onnx", "FocalLoss.onnx", {"optional_inputs": ()}),
        ("torchscript", "FocalLoss.ts.pt", {}),
        ("pt2", "FocalLoss.pt2", {"optional_inputs": ()}),
    ]
    code, _, err = run(capsys, "export", "--recipe", "gfl", "--optional", "weight", "--out", str(tmp_path / "w"), "-q")
    assert code == 0, err
    assert {opts.get("optional_inputs") for fmt, _, opts in fake.calls[3:] if fmt == "onnx"} == {("weight",)}
    code, _, err = run(capsys, "export", "--loss", "FocalLoss", "--optional", "wieght", "--out", str(tmp_path / "x"))
    assert code == 2 and "wieght is not an optional input of these losses; they have avg_factor, weight" in err
    assert not (tmp_path / "x").exists()


def test_an_opset_below_the_exporters_is_refused_before_anything_is_written(fake, capsys, tmp_path):
    argv = ["export", "--recipe", "gfl", "--format", "torchscript,onnx", "--opset", "12", "--out", str(tmp_path)]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--opset 12 is not supported" in err and "opset >= 18" in err
    assert files(tmp_path) == [] and fake.calls == []


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


@pytest.fixture
def terminal_signal_handlers():
    """SIGINT and SIGTERM as an interactive shell leaves them, whatever started this test run (a shell's background
    job ignores SIGINT, and the CLI keeps it ignored)."""
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL),
    }
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


def swallowing_a_signal(number: int, after_swallowing: str, then, on: str):
    """``then(*args)``, except that for the artifact named ``on`` (the last argument) it first raises the signal
    ``number`` and swallows the interrupt as torch's ONNX exporter does when the interrupt lands in its import of
    torch._dynamo: the AttributeError of the half-imported module replaces it, or (``finishes``) the import completed
    and the call goes on."""
    assert threading.current_thread() is threading.main_thread(), "the signal would end this test process"

    def call(*args, **kwargs):
        if on in Path(args[-1]).name:
            assert signal.getsignal(number) is cli._interrupt, "without the handler, SIGTERM would end this process"
            try:
                signal.raise_signal(number)
            except KeyboardInterrupt:
                if after_swallowing == "fails":
                    raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from None
        return then(*args, **kwargs)

    return call


@pytest.mark.usefixtures("terminal_signal_handlers")
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
@pytest.mark.parametrize("after_swallowing", ["fails", "finishes"])
def test_a_stop_signal_stops_the_export_even_where_the_exporter_swallowed_it(
    monkeypatch, capsys, tmp_path, number, after_swallowing
):
    """The CLI stops at that artifact and exits 130; before, it reported a failed artifact and exited 1, or went on
    and exited 0."""
    exporter = FakeExport()
    export = swallowing_a_signal(number, after_swallowing, exporter.export_onnx, on="loss_bbox")
    monkeypatch.setattr(cli, "_exporters", lambda: types.SimpleNamespace(export_onnx=export))
    code, out, err = run(capsys, "export", "--recipe", "gfl", "--format", "onnx", "--out", str(tmp_path))
    assert code == 130 and "interrupted" in err and "FAILED" not in out + err
    finished = ["loss_cls"] + (["loss_bbox"] if after_swallowing == "finishes" else [])
    assert files(tmp_path) == sorted(f"{name}.onnx{suffix}" for name in finished for suffix in ("", ".json"))
    assert [name for _, name, _ in exporter.calls] == [f"{name}.onnx" for name in finished]  # loss_dfl never ran
    assert signal.getsignal(number) is not cli._interrupt  # main() gave the handler back


def test_an_ignored_sigint_stays_ignored(monkeypatch, capsys, tmp_path):
    """A shell starts background jobs (`visdet-export ... &`) with SIGINT ignored; Python keeps it so, and so does
    the CLI, which handles only the stop signals the process takes."""
    exporter = FakeExport()
    seen = []

    def export(cfg, path, **kw):
        seen.append(signal.getsignal(signal.SIGINT))
        return exporter.export_onnx(cfg, path, **kw)

    monkeypatch.setattr(cli, "_exporters", lambda: types.SimpleNamespace(export_onnx=export))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code, _, err = run(capsys, "export", "--recipe", "gfl", "--format", "onnx", "--out", str(tmp_path))
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 0, err
    assert seen == [signal.SIG_IGN] * 3 and after is signal.SIG_IGN


def test_python_m_exits_130_when_the_interrupt_left_an_exec(tmp_path):
    """CPython ends `python -m` by SIGINT (returncode -2) once a plain KeyboardInterrupt has left an `exec` of a
    string, even when it was caught; torch's imports run such code. A plugin that receives SIGTERM inside one is
    the deterministic case of the first export's import being interrupted."""
    (tmp_path / "stops_inside_exec.py").write_text('import signal\n\nexec("signal.raise_signal(signal.SIGTERM)")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-m", "visdet_export", "--plugin", "stops_inside_exec", "list"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == f"{cli.PROG}: {cli.INTERRUPTED}"


@pytest.mark.usefixtures("terminal_signal_handlers")
@pytest.mark.parametrize("after_swallowing", ["fails", "finishes"])
def test_a_stop_signal_stops_verify_even_where_the_check_swallowed_it(
    fake, monkeypatch, capsys, tmp_path, after_swallowing
):
    assert run(capsys, "export", "--recipe", "gfl", "--format", "onnx", "--out", str(tmp_path))[0] == 0
    monkeypatch.setattr(fake, "verify", swallowing_a_signal(signal.SIGTERM, after_swallowing, fake.verify, on="cls"))
    code, out, err = run(capsys, "verify", str(tmp_path))
    assert code == 130 and "interrupted" in err and "FAILED" not in out + err
    verified = ["loss_bbox.onnx"] + (["loss_cls.onnx"] if after_swallowing == "finishes" else [])
    assert [path.name for path in fake.verified] == verified  # loss_dfl never ran


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
    assert 'flatten a config that computes its values with MMEngine: Config.fromfile(path).dump("flat.py")' in err
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
    assert cli.main(["check", "--configs", "focal", "--pt2", "subset", "-q"]) == 3
    assert seen == [["--configs", "focal", "--pt2", "subset", "-q"]]
    # --help and usage errors are answered by its torch-free parser, before the module runs
    assert cli.main(["check", "--format", "onnx", "--help"]) == 0
    assert cli.main(["check", "--format", "onnx"]) == 2
    assert len(seen) == 1
    out, err = capsys.readouterr()
    assert out.startswith("usage: visdet-export check") and "unrecognized arguments: --format onnx" in err


def test_torch_free_parsers_agree_with_the_modules_they_serve(monkeypatch, tmp_path):
    """visdet_export.parsers repeats what check and cpp would compute with torch: the runtimes' names and the
    default C++ build folder (its torch found without importing torch)."""
    import torch

    from visdet_export import cpp, parsers
    from visdet_export.runtimes import RUNTIMES

    assert parsers.RUNTIME_NAMES == tuple(RUNTIMES)
    assert parsers.torch_cmake_prefix() == Path(torch.utils.cmake_prefix_path)
    monkeypatch.delenv("VISDET_EXPORT_CPP_BUILD_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert parsers.default_build_dir() == cpp.default_build_dir()


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


@pytest.mark.usefixtures("terminal_signal_handlers")
@pytest.mark.parametrize("script", ["export_all_recipes.py", "export_configs.py"])
def test_scripts_stop_on_a_signal_even_where_the_exporter_swallowed_it(monkeypatch, capsys, tmp_path, script):
    """Before, SIGTERM ended them at once (temporary files left), and Ctrl-C that torch swallowed failed artifacts."""
    exporter = FakeExport()
    export = swallowing_a_signal(signal.SIGTERM, "fails", exporter.export_onnx, on="loss_bbox")
    monkeypatch.setattr(cli, "_exporters", lambda: types.SimpleNamespace(export_onnx=export))
    if script == "export_all_recipes.py":
        argv = [str(tmp_path), "--recipes", "gfl"]
    else:
        argv = [str(REPO / "losses" / "gfl.py"), "--out", str(tmp_path)]
    assert run_script(monkeypatch, script, *argv, "--format", "onnx") == 130
    assert "interrupted" in capsys.readouterr().err
    (group,) = tmp_path.iterdir()
    assert files(group) == ["loss_cls.onnx", "loss_cls.onnx.json"]
    assert signal.getsignal(signal.SIGTERM) is not cli._interrupt


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


# ---------------------------------------------------------------------------------------------- --help everywhere


@pytest.mark.parametrize("command", ["list", "export", "verify", "attach", "evaluate", "check", "bench", "cpp"])
def test_every_subcommand_answers_help(command, capsys):
    try:
        code = cli.main([command, "--help"])
    except SystemExit as exit_:  # argparse's own --help
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "usage:" in out and "--help" in out


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("list", "export", "verify", "attach", "evaluate", "check", "bench", "cpp"):
        assert f"    {command} " in out


# ---------------------------------------------------------------------------------------------------- list --inputs


def test_list_inputs_shows_names_dtypes_and_symbolic_shapes(capsys):
    from visdet_export.registry import MODELS, build_loss
    from visdet_export.specs import spec_for

    code, out, _ = run(capsys, "list", "--inputs")
    assert code == 0
    assert "FocalLoss(use_sigmoid=True, gamma=2.0" in out
    assert "pred        float[N, C]   required  logits" in out
    assert "labels      int64[N]      required" in out  # QualityFocalLoss
    assert "avg_factor  float[]       optional" in out
    assert "input variants (export --variant): labels (default), onehot" in out  # FocalLoss
    code, out, _ = run(capsys, "list", "--inputs", "--json")
    records = json.loads(out)
    assert set(records) == set(MODELS.module_dict)
    for name, record in records.items():
        spec = spec_for(build_loss(name))
        assert record["variants"][0] == spec.variant
        assert [t["name"] for t in record["inputs"]] == spec.names
        assert [tuple(t["shape"]) for t in record["inputs"]] == [t.shape for t in spec.inputs]
    assert records["FocalLoss"]["parameters"]["gamma"] == 2.0
    assert records["FocalLoss"]["inputs"][1] == {
        "name": "target",
        "dtype": "int64",
        "shape": ["N"],
        "optional": False,
        "doc": records["FocalLoss"]["inputs"][1]["doc"],
    }


# ---------------------------------------------------------------------------------------------- bench and cpp


def test_bench_hands_its_arguments_to_the_runner_and_runs_a_smoke(capsys, tmp_path):
    argv = ["--quick", "--losses", "focal", "--sizes", "64", "--providers", "baseline,eager"]
    argv += ["--no-memory", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    code, out, err = run(capsys, "bench", *argv)
    assert code == 0, err
    assert "| focal | 64 |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["argv"] == argv
    assert [row["config"] for row in results["runs"][0]["rows"]] == ["focal"]


def test_bench_outside_a_source_checkout_says_so(monkeypatch, capsys, tmp_path):
    from visdet_export import bench

    monkeypatch.setattr(bench, "runner_path", lambda: tmp_path / "benchmarks" / "run.py")
    code, _, err = run(capsys, "bench", "--quick")
    assert code == 2
    assert "visdet-export bench needs a source checkout" in err and "from the root of a clone" in err
    code, out, _ = run(capsys, "bench", "--help")  # help is an answer, not a failure (the top-level help names it)
    assert code == 0 and "usage: visdet-export bench" in out and "needs a source checkout" in out


def test_bench_finds_the_runner_of_the_clone_it_runs_in(monkeypatch, tmp_path):
    """An installed wheel has no benchmarks/ beside the package; run from a clone's root, it takes the clone's, and
    no other folder's benchmarks/run.py (someone else's code)."""
    from visdet_export import bench

    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages" / "visdet_export" / "bench.py"))
    for folder, project in (("clone", "visdet-export"), ("other", "other-project")):
        (tmp_path / folder / "benchmarks").mkdir(parents=True)
        (tmp_path / folder / "benchmarks" / "run.py").write_text("def main(argv):\n    return 0\n")
        (tmp_path / folder / "pyproject.toml").write_text(f'[project]\nname = "{project}"\n')
    monkeypatch.chdir(tmp_path / "clone")
    assert bench.runner_path() == tmp_path / "clone" / "benchmarks" / "run.py"
    monkeypatch.chdir(tmp_path / "other")
    assert bench.runner_path() is None
    # another distribution's top-level benchmarks/ beside the installed package
    (tmp_path / "site-packages" / "benchmarks").mkdir(parents=True)
    (tmp_path / "site-packages" / "benchmarks" / "run.py").write_text("raise SystemExit('not ours')\n")
    assert bench.runner_path() is None


def test_no_command_prints_the_commands(capsys):
    """argparse said only "the following arguments are required: COMMAND"."""
    code, out, err = run(capsys)
    assert code == 2 and "usage: visdet-export" in err and "    export " in err and "    check " in err


def test_bench_usage_mistakes_exit_2(capsys):
    code, _, err = run(capsys, "bench", "--no-such-flag")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err


def test_cpp_hands_its_arguments_over(monkeypatch, capsys):
    from visdet_export import cpp

    seen = []
    monkeypatch.setattr(cpp, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["cpp", "--config", "focal", "--pt2"]) == 0
    assert seen == [["--config", "focal", "--pt2"]]


def test_cpp_sources_are_found_in_the_package_and_can_be_overridden(monkeypatch, tmp_path):
    from visdet_export import cpp

    # visdet_export/cpp_project: a symlink to export_scripts/cpp here, package data in a wheel.
    assert (REPO / "visdet_export" / "cpp_project").is_symlink()
    assert cpp.source_dir() == (REPO / "export_scripts" / "cpp").resolve()
    assert cpp.toolchain_problem() is None or "sources" not in cpp.toolchain_problem()
    monkeypatch.setenv("VISDET_EXPORT_CPP_SOURCE", str(tmp_path))
    assert cpp.source_dir() == tmp_path
    if cpp.shutil.which("cmake") and cpp._compiler():
        assert "the C++ sources are missing" in cpp.toolchain_problem()
        # a checkout without symlinks holds cpp_project as a text file: the message says so
        link_as_text = tmp_path / "cpp_project"
        link_as_text.write_text("../export_scripts/cpp")
        assert "core.symlinks" in cpp.toolchain_problem(link_as_text)
        assert "core.symlinks" not in cpp.toolchain_problem()


# ------------------------------------------------------------------------------------------- attach and evaluate


def tiny_model(path: Path) -> Path:
    """A 1-layer 'detector' written with onnx.helper: feats (N, 8) -> cls_score (N, 80), bbox_pred (N, 4)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((8, 80)) * 0.5).astype(np.float32), "w_cls"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w_box"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["feats", "w_cls"], ["cls_score"]),
            helper.make_node("MatMul", ["feats", "w_box"], ["bbox_pred"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["N", 8])],
        [
            helper.make_tensor_value_info("cls_score", TensorProto.FLOAT, ["N", 80]),
            helper.make_tensor_value_info("bbox_pred", TensorProto.FLOAT, ["N", 4]),
        ],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


FOCAL = {"type": "FocalLoss", "gamma": 1.5, "alpha": 0.25}
ATTACH_SPEC = [
    {
        "name": "loss_cls",
        "loss": FOCAL,
        "inputs": {"pred": {"output": "cls_score"}, "target": {"input": "labels"}, "avg_factor": "num_pos"},
    }
]


def write_spec(folder: Path, spec, name: str = "attach.json") -> Path:
    path = folder / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def tiny_samples(sizes=(0, 1, 6)):
    import numpy as np

    rng = np.random.default_rng(1)
    return [
        {
            "feats": rng.standard_normal((n, 8)).astype(np.float32),
            "labels": rng.integers(0, 81, n),
            "num_pos": np.float32(max(n, 1)),
        }
        for n in sizes
    ]


@pytest.fixture(scope="module")
def attached(tmp_path_factory):
    """`visdet-export attach model.onnx merged.onnx --spec attach.json` once (one real, verified loss export)."""
    folder = tmp_path_factory.mktemp("attach")
    model = tiny_model(folder / "model.onnx")
    spec = write_spec(folder, ATTACH_SPEC)
    merged = folder / "merged.onnx"
    code = cli.main(["attach", str(model), str(merged), "--spec", str(spec)])
    return folder, model, spec, merged, code


def test_attach_passes_declared_new_inputs_to_attach_losses(capsys, tmp_path):
    """{"input": "cls_scores"} declares a new graph input the library would otherwise refuse as a typo."""
    import onnx

    model = tiny_model(tmp_path / "model.onnx")
    spec = [{"name": "l", "loss": "KnowledgeDistillationKLDivLoss",
             "inputs": {"pred": "cls_score", "soft_label": {"input": "cls_scores"}}}]
    code, _, err = run(
        capsys, "attach", str(model), str(tmp_path / "out.onnx"), "--spec", str(write_spec(tmp_path, spec))
    )
    assert code == 0, err
    assert [value.name for value in onnx.load(str(tmp_path / "out.onnx")).graph.input] == ["feats", "cls_scores"]


def test_attach_writes_a_merged_model_with_a_manifest(attached, capsys):
    folder, _, _, _, code = attached
    assert code == 0
    manifest = json.loads((folder / "merged.onnx.json").read_text())
    assert manifest["kind"] == "attached_losses"
    assert manifest["inputs"] == ["feats", "labels", "num_pos"]
    assert manifest["outputs"] == ["cls_score", "bbox_pred", "loss_cls"]
    assert manifest["losses"]["loss_cls"]["inputs"] == {
        "pred": "cls_score",
        "target": "labels",
        "avg_factor": "num_pos",
    }
    assert sorted(p.name for p in folder.iterdir()) == [
        "attach.json",
        "merged.onnx",
        "merged.onnx.json",
        "model.onnx",
    ]  # no temporary files


def test_verify_checks_a_merged_model_without_its_inputs(attached, capsys, tmp_path):
    """verify reported FAILED ("no loss config") on what attach wrote; it checks what it can without inputs."""
    import shutil

    folder, _, _, merged, _ = attached
    code, out, err = run(capsys, "verify", str(merged), "-q")
    assert code == 0, err
    assert "1 attached loss(es), checked when attached; the graph and checksum are intact" in out
    copy = tmp_path / "merged.onnx"
    shutil.copy(merged, copy)
    manifest = json.loads((folder / "merged.onnx.json").read_text())
    manifest["losses"]["loss_cls"]["config"]["gamma"] = 3.0
    (tmp_path / "merged.onnx.json").write_text(json.dumps(manifest))
    code, out, _ = run(capsys, "verify", str(copy), "-q")
    assert code == 1 and "differ from its manifest's" in out


def test_evaluate_matches_the_model_and_loss_in_pytorch(attached, capsys, tmp_path):
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from visdet_export.export.attach import save_samples
    from visdet_export.registry import build_loss
    from visdet_export.specs import spec_for

    _, model, _, merged, code = attached
    assert code == 0
    samples = tiny_samples()
    save_samples(tmp_path / "samples.npz", samples)
    code, out, err = run(capsys, "evaluate", str(merged), str(tmp_path / "samples.npz"), "--json")
    assert code == 0, err
    assert "evaluate merged.onnx: 3/3 samples" in err  # progress on stderr, JSON alone on stdout
    summary = json.loads(out)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    loss = build_loss(FOCAL)
    expected = []
    for sample in samples:
        inputs = {
            "pred": torch.from_numpy(sample["feats"] @ weights["w_cls"]),
            "target": torch.from_numpy(sample["labels"]),
            "avg_factor": torch.tensor(float(sample["num_pos"])),
        }
        expected.append(float(spec_for(loss).call(loss, inputs)))
    assert summary["count"] == 3 and summary["nonfinite"] == {"loss_cls": 0}
    np.testing.assert_allclose(summary["per_sample"]["loss_cls"], expected, rtol=1e-4, atol=1e-6)
    assert summary["per_sample"]["loss_cls"][0] == 0.0  # N = 0
    np.testing.assert_allclose(summary["mean"]["loss_cls"], np.mean(expected), rtol=1e-4)
    # The text summary.
    code, out, err = run(capsys, "evaluate", str(merged), str(tmp_path / "samples.npz"), "-q")
    assert code == 0 and err == ""
    assert out.startswith("3 samples in ") and "loss_cls" in out


def test_attach_refuses_an_existing_output_and_keeps_it(attached, capsys):
    folder, model, spec, merged, code = attached
    assert code == 0
    before = merged.read_bytes()
    code, out, err = run(capsys, "attach", str(model), str(merged), "--spec", str(spec))
    assert code == 2 and out == ""
    assert (
        err.strip() == f"visdet-export: error: nothing was written: {merged} exists; pass overwrite=True "
        "(--overwrite) to replace it"
    )
    assert merged.read_bytes() == before
    (folder / "other.onnx.json").write_text("{}")  # an existing manifest blocks too
    code, _, err = run(capsys, "attach", str(model), str(folder / "other.onnx"), "--spec", str(spec))
    assert code == 2 and "other.onnx.json exists" in err
    assert not (folder / "other.onnx").exists()
    (folder / "other.onnx.json").unlink()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("[", "invalid JSON"),
        ("[]", "expected a non-empty list"),
        ('[{"name": "l", "loss": {"type": "FocalLoss", "gamma": NaN}}]', "NaN is not allowed"),
        ('[{"name": "l", "loss": {"type": "FocalLoss", "gamma": 1e999}}]', "must be finite"),
        ([{"name": "l", "loss": "FocalLoss", "input": {}}], "unknown key(s) input"),
        ([{"loss": "FocalLoss"}], "entry 0: no name"),
        ([{"name": "l", "loss": "FocalLos"}], "unknown loss type 'FocalLos'. Did you mean FocalLoss"),
        ([{"name": "l", "loss": {"type": "FocalLoss", "gamma": -1.0}}], "l: gamma=-1.0 is out of range"),
        ([{"name": "l", "loss": 'dict(type="L1Loss", x=__import__("os"))'}], "is not allowed in a config"),
        ([{"name": "l", "loss": "missing.onnx"}], "the loss graph"),
        ([{"name": "l", "loss": "L1Loss", "inputs": {"pred": 3}}], "input 'pred' must map to a name"),
        ([{"name": "l", "loss": "FocalLoss", "variant": 2}], "'variant' must be an input layout's name, got 2"),
        ([{"name": "l", "loss": "FocalLoss", "inputs": {"pred": "cls_score"}, "variant": "dens"}],
         "loss 'l': FocalLoss has no input variant 'dens'; choose one of labels, onehot"),
        (
            [{"name": "l", "loss": "FocalLoss", "inputs": {"pred": {"output": "scores"}}}],
            "loss 'l' input 'pred': 'scores' is not an output of model.onnx; its outputs are cls_score, bbox_pred",
        ),
        (
            [{"name": "l", "loss": "FocalLoss", "inputs": {"pred": "cls_scores"}}],
            "'cls_scores' is not an output of model.onnx (did you mean 'cls_score'?",
        ),
        (
            [{"name": "l", "loss": "FocalLoss", "inputs": {"target": {"input": "bbox_pred"}}}],
            "'bbox_pred' is an output of model.onnx, so it cannot be a new graph input",
        ),
        (
            [{"name": "l", "loss": "FocalLoss", "inputs": {"logits": "cls_score"}}],
            "loss 'l' (FocalLoss) has no input(s) logits; its inputs are pred, target, weight, avg_factor",
        ),
        ([{"name": "cls_score", "loss": "FocalLoss"}], "loss name 'cls_score' is already used by the model"),
        ([{"name": "a", "loss": "L1Loss"}, {"name": "a", "loss": "L1Loss"}], "loss name 'a' is already used"),
    ],
)
def test_attach_spec_mistakes_exit_2_in_one_line_before_any_export(spec, message, capsys, tmp_path, monkeypatch):
    import visdet_export.export.attach as attach_api

    monkeypatch.setattr(attach_api, "attach_losses", lambda *a, **k: pytest.fail("attach_losses was called"))
    model = tiny_model(tmp_path / "model.onnx")
    spec_path = write_spec(tmp_path, spec)
    code, out, err = run(capsys, "attach", str(model), str(tmp_path / "out.onnx"), "--spec", str(spec_path))
    assert code == 2 and out == ""
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("visdet-export: error: ") and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_attach_input_mistakes_exit_2(capsys, tmp_path):
    model = tiny_model(tmp_path / "model.onnx")
    spec = write_spec(tmp_path, ATTACH_SPEC)
    out = str(tmp_path / "out.onnx")
    cases = [
        (["attach", str(tmp_path / "nope.onnx"), out, "--spec", str(spec)], "the model"),
        (["attach", str(model), out, "--spec", str(tmp_path / "nope.json")], "does not exist"),
        (["attach", str(model), out, "--spec", str(write_spec(tmp_path, "x", "spec.yaml"))], "is a .json file"),
        (["attach", str(spec), out, "--spec", str(spec)], "is not an ONNX model"),
        (["attach", str(model), str(model), "--spec", str(spec), "--overwrite"], "is the model itself"),
        (["attach", str(model), str(tmp_path / "no" / "out.onnx"), "--spec", str(spec)], "does not exist"),
        (["attach", str(model), out, "--spec", str(spec), "--opset", "17"], "--opset 17 is not supported"),
    ]
    (tmp_path / "link.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    cases.append((["attach", str(model), str(tmp_path / "link.onnx"), "--spec", str(spec), "--overwrite"], "symlink"))
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "elsewhere.onnx").exists() and not (tmp_path / "out.onnx").exists()


def test_attach_failures_of_the_artifact_exit_1(capsys, tmp_path, monkeypatch):
    import visdet_export.export.attach as attach_api

    model = tiny_model(tmp_path / "model.onnx")
    spec = write_spec(tmp_path, ATTACH_SPEC)

    def parity_failure(*args, **kwargs):
        raise ArtifactError("FocalLoss: output 'loss' at N=7 differs from eager beyond rtol=0.0001")

    def merge_failure(*args, **kwargs):
        raise attach_api.AttachError("could not merge loss 'loss_cls': bad graph") from ValueError("bad graph")

    for fake_attach, message in ((parity_failure, "differs from eager"), (merge_failure, "could not merge")):
        monkeypatch.setattr(attach_api, "attach_losses", fake_attach)
        code, _, err = run(capsys, "attach", str(model), str(tmp_path / "out.onnx"), "--spec", str(spec))
        assert code == 1 and message in err and "Traceback" not in err


def test_attach_error_from_the_library_is_a_user_mistake(capsys, tmp_path, monkeypatch):
    import visdet_export.export.attach as attach_api

    def mismatch(*args, **kwargs):
        raise attach_api.AttachError("loss 'loss_cls' input 'pred': 'cls_score' has shape ['?', 80] but ...")

    monkeypatch.setattr(attach_api, "attach_losses", mismatch)
    model = tiny_model(tmp_path / "model.onnx")
    code, _, err = run(
        capsys, "attach", str(model), str(tmp_path / "o.onnx"), "--spec", str(write_spec(tmp_path, ATTACH_SPEC))
    )
    assert code == 2 and "has shape" in err


def test_evaluate_mistakes_exit_2(attached, capsys, tmp_path):
    import numpy as np

    from visdet_export.export.attach import save_samples

    _, _, _, merged, code = attached
    assert code == 0
    samples = tmp_path / "s.npz"
    save_samples(samples, [{"feats": np.zeros((2, 8), np.float32), "labels": np.zeros(2, np.int64)}])
    good = save_samples(tmp_path / "good.npz", tiny_samples((3,)))
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "objects.npz", feats=np.array([object()], dtype=object))
    np.savez(tmp_path / "empty.npz")
    cases = [
        ([str(merged), str(tmp_path / "empty.npz")], "empty.npz holds no samples"),
        ([str(merged), str(samples)], "sample 0: missing input(s) num_pos"),
        ([str(merged), str(tmp_path / "nope.npz")], "does not exist"),
        ([str(tmp_path / "nope.onnx"), str(samples)], "does not exist"),
        ([str(merged), str(tmp_path / "text.npz")], "is not a readable .npz"),
        ([str(merged), str(tmp_path / "objects.npz")], "is not a readable .npz"),
        ([str(merged), str(samples), "--output", "loss_box"], "has no output(s) loss_box"),
        ([str(merged), str(good), "--output", "cls_score"], "output 'cls_score' is not a scalar"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, "evaluate", *argv, "-q")
        assert code == 2 and message in err and len(err.splitlines()) == 1 and out == "", (argv, err)


def test_evaluate_refuses_a_truncated_npz_in_one_line(capsys, tmp_path):
    """A samples file that begins as a zip archive but is not one (an interrupted copy) is a usage mistake (exit 2)
    in one line, like a file that is no archive at all, not a traceback."""
    graph = _loss_graph_of_two_inputs(tmp_path / "loss.onnx")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    code, out, err = run(capsys, "evaluate", str(graph), str(tmp_path / "cut.npz"), "-q")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "cut.npz is not a readable .npz of samples" in err


def test_evaluate_json_writes_non_finite_values_as_null(capsys, tmp_path):
    """JSON has no NaN: a sample whose loss is NaN is null in per_sample, the mean over it null, and nonfinite
    counts it; the output is strict JSON (exit 0)."""
    import numpy as np

    from visdet_export.export.attach import save_samples

    graph = _loss_graph_of_two_inputs(tmp_path / "loss.onnx")
    pred, soft = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    poisoned = pred.copy()
    poisoned[0, 0] = np.nan
    save_samples(tmp_path / "s.npz", [{"pred": pred, "soft_label": soft}, {"pred": poisoned, "soft_label": soft}])
    code, out, _ = run(capsys, "evaluate", str(graph), str(tmp_path / "s.npz"), "--json", "-q")
    assert code == 0
    summary = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert summary["count"] == 2 and summary["per_sample"] == {"loss": [6.0, None]}
    assert summary["mean"] == {"loss": None} and summary["nonfinite"] == {"loss": 1}


def _loss_graph_of_two_inputs(path: Path) -> Path:
    """A stand-in loss graph: pred and soft_label (N, C) in, their summed difference out (0-d)."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", "C"]) for name in ("pred", "soft_label")]
    nodes = [helper.make_node("Sub", ["pred", "soft_label"], ["d"]), helper.make_node("ReduceSum", ["d"], ["loss"],
                                                                                      keepdims=0)]
    graph = helper.make_graph(nodes, "loss", inputs, [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])])
    onnx.save(onnx_model(graph), str(path))
    return path


def test_attach_spec_forms_reach_the_library(capsys, tmp_path, monkeypatch):
    """Loss strings, pre-exported loss graphs (relative to the spec) and {"losses": [...]} are handed over."""
    import visdet_export.export.attach as attach_api

    seen = {}

    def fake_attach(model, losses, out, **kwargs):
        seen.update(model=Path(model), losses=losses, out=Path(out), **kwargs)
        Path(out).write_bytes(b"merged")
        write_manifest(out, {"format": "onnx", "opset": 18, "inputs": ["feats"], "outputs": ["loss_a"]}, False)
        return Path(out)

    monkeypatch.setattr(attach_api, "attach_losses", fake_attach)
    model = tiny_model(tmp_path / "model.onnx")
    (tmp_path / "specs").mkdir()
    _loss_graph_of_two_inputs(tmp_path / "specs" / "kd.onnx")  # read before the (faked) attach: a real graph
    spec = {
        "losses": [
            {"name": "loss_a", "loss": "FocalLoss", "inputs": {"pred": "cls_score"}, "variant": "onehot"},
            {"name": "loss_b", "loss": 'dict(type="L1Loss", loss_weight=2.0)', "inputs": {"pred": "bbox_pred"}},
            {"name": "loss_c", "loss": "kd.onnx", "inputs": {"pred": "cls_score", "soft_label": "teacher"}},
        ]
    }
    out = tmp_path / "out.onnx"
    code, stdout, err = run(
        capsys, "attach", str(model), str(out), "--spec", str(write_spec(tmp_path / "specs", spec)), "--opset", "19"
    )
    assert code == 0, err
    assert seen["losses"] == [
        ("loss_a", {"type": "FocalLoss"}, {"pred": "cls_score"}, "onehot"),
        ("loss_b", {"type": "L1Loss", "loss_weight": 2.0}, {"pred": "bbox_pred"}, None),
        ("loss_c", tmp_path / "specs" / "kd.onnx", {"pred": "cls_score", "soft_label": "teacher"}, None),
    ]
    assert seen["opset"] == 19 and seen["overwrite"] is False
    assert "loss_c       " in stdout and "pred<-cls_score, soft_label<-teacher" in stdout
    assert "attaching 3 loss(es)" in err


def test_export_softmax_cross_entropy_on_class_probabilities(capsys, tmp_path):
    """``--variant probabilities``: softmax CE exported for float targets of the logits' shape, verified in
    onnxruntime; ``list --inputs`` names the variant."""
    argv = ["export", "--loss", "CrossEntropyLoss", "--variant", "probabilities", "--format", "onnx"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path), "-q")
    assert code == 0, err
    manifest = json.loads((tmp_path / "CrossEntropyLoss.onnx.json").read_text())
    target = next(entry for entry in manifest["inputs"] if entry["name"] == "target")
    assert target["shape"] == ["N", "C"] and target["dtype"] == "float32"
    code, out, _ = run(capsys, "list", "--inputs")
    assert code == 0
    assert "input variants (export --variant): labels (default), probabilities" in out
