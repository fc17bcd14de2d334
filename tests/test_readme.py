"""The README is part of the product: its commands are the ones CI runs, its tables match the registry."""

import os
import re
from pathlib import Path

from visdet_export.registry import MODELS, config_parameters
from visdet_export.validation import PLUGINS_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_commands = [line for block in _bash_blocks() for line in block.splitlines() if "pytest" in line]
    assert len(test_commands) == 1, test_commands
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in ci_lines


def test_loss_table_lists_every_registered_loss_with_its_parameters() -> None:
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+Loss)` \| (.*?) \|", README, flags=re.M)}
    assert set(rows) == set(MODELS.module_dict)
    for name, cls in MODELS.module_dict.items():
        own = [p for p in config_parameters(cls) if p not in ("reduction", "loss_weight")]
        for parameter in own:
            assert f"`{parameter}=" in rows[name], f"README row of {name} does not document {parameter}"


def test_export_api_is_reachable_from_the_package_and_imported_on_first_use() -> None:
    import subprocess
    import sys

    code = (
        "import sys, visdet_export; assert 'visdet_export.export' not in sys.modules;"
        "from visdet_export import export_onnx, export_torchscript, export_pt2, verify;"
        "assert export_onnx.__module__ == 'visdet_export.export.onnx'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_help_and_version_answer_without_importing_torch() -> None:
    """``import visdet_export`` and ``visdet-export --help`` / ``--version`` / ``export --help`` took a second to
    import torch; the registry, the losses and the export API load on first use, and old attribute paths resolve.
    ``check``, ``bench`` and ``cpp`` (modules of their own that import torch) answer ``--help`` and usage errors
    from parsers without torch (``visdet_export.parsers``, ``benchmarks/run_options.py``)."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io, visdet_export; from visdet_export.cli import main\n"
        "for argv in (['--version'], ['--help'], ['export', '--help'], ['attach', '--help'], ['check', '--help'],\n"
        "             ['bench', '--help'], ['cpp', '--help'], ['check', '--pt2', 'nope'],\n"
        "             ['check', '--sizes', '3,x'], ['cpp', '--jobs', 'x']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        with contextlib.suppress(SystemExit): main(argv)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert {'losses', 'registry', 'build_loss'} <= set(dir(visdet_export))\n"
        "assert visdet_export.losses.FocalLoss is visdet_export.MODELS.get('FocalLoss')\n"
        "assert type(visdet_export.build_loss('GIoULoss')).__name__ == 'GIoULoss'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != PLUGINS_VARIABLE}  # a plugin would import the registry
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_relative_links_name_files_the_sdist_ships() -> None:
    """README is the package index's long description, where relative links do not resolve (and no public
    repository URL is known to make them absolute): each must name a file of the source tree that MANIFEST.in puts
    in the sdist, and the README must say that they are such files."""
    links = [target for target in re.findall(r"\]\(([^)#]+)\)", README) if "://" not in target]
    assert links, "no relative links: drop this test"
    manifest = (ROOT / "MANIFEST.in").read_text().splitlines()
    grafted = [line.split()[1] for line in manifest if line.startswith("graft ")]
    included = [line.split()[1] for line in manifest if line.startswith("include ")]
    pruned = [line.split()[1] for line in manifest if line.startswith("prune ")]
    for target in links:
        assert (ROOT / target).is_file(), target
        parts = Path(target).parts
        shipped = target in included or any(Path(*parts[: len(Path(g).parts)]) == Path(g) for g in grafted)
        assert shipped and not any(target.startswith(f"{p}/") for p in pruned), f"{target} is not in the sdist"
    assert "files of the source tree: a clone and the source distribution" in " ".join(README.split())


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_python_examples_run(tmp_path: Path, monkeypatch) -> None:
    import sys
    import types

    from visdet_export import export_onnx, specs, verify
    from visdet_export.losses.focal_loss import FocalLoss
    from visdet_export.registry import Registry

    monkeypatch.chdir(tmp_path)
    # MMDetection is not a dependency: its registry module is a stand-in with MMEngine's contract (test_integration)
    framework, registry_module = types.ModuleType("mmdet"), types.ModuleType("mmdet.registry")
    framework.__path__ = []
    registry_module.MODELS = Registry("model")
    monkeypatch.setitem(sys.modules, "mmdet", framework)
    monkeypatch.setitem(sys.modules, "mmdet.registry", registry_module)
    # the example of a loss of one's own registers it: for this test only (others cover every registered loss)
    monkeypatch.setattr(MODELS, "_modules", dict(MODELS.module_dict))
    monkeypatch.setattr(specs, "SPEC_BUILDERS", dict(specs.SPEC_BUILDERS))
    blocks = _python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "qfl.onnx.json").is_file() and (tmp_path / "dfl.pt2.json").is_file()
    assert registry_module.MODELS.get("FocalLoss") is FocalLoss
    assert verify(export_onnx(dict(type="VarifocalLoss"), tmp_path / "varifocal.onnx"))["passed"]


def test_readme_main_job_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    (main_job,) = [line for block in _bash_blocks() for line in block.splitlines() if "visdet-export export" in line]
    steps = [step.strip() for step in main_job.split("&&")]
    job = [step for step in steps if step.startswith("visdet-export")]
    assert len(job) == 2 and steps[: len(steps) - len(job)] == [step for step in steps if "visdet-export" not in step]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for step in job:
        subprocess.run(step, shell=True, cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    written = sorted(p.name for p in (tmp_path / "artifacts" / "gfl").iterdir())
    assert written == sorted(
        f"{loss}.{ext}{manifest}" for loss in ("loss_cls", "loss_bbox", "loss_dfl") for ext in ("onnx", "ts.pt")
        for manifest in ("", ".json")
    )
