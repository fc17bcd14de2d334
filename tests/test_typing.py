"""The package ships ``py.typed``, so its annotations are part of its interface: mypy (configured in pyproject.toml)
must accept them, as it does for a user's code that calls the losses."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_type_checks(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


USER_CODE = '''
from pathlib import Path

import torch
from torch import Tensor

from visdet_export import build_loss, export_onnx, verify
from visdet_export.export import export_pt2, export_torchscript
from visdet_export.losses import FocalLoss, quality_focal_loss_on_labels, sigmoid_focal_loss
from visdet_export.losses.base import WeightedLoss
from visdet_export.registry import MODELS


@MODELS.register_module()
class MyLoss(WeightedLoss):
    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.weighted((pred - target).abs().mean())


@MODELS.register_module("MyNamedLoss")
class MyOtherLoss(MyLoss):
    pass


focal: FocalLoss = FocalLoss(gamma=2.0)
value: Tensor = sigmoid_focal_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
written: Path = export_onnx(dict(type="FocalLoss"), "focal.onnx")
scripted: Path = export_torchscript(build_loss(dict(type="MyLoss")), "mine.ts.pt")
'''


def _strict(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "user.py").write_text(code)
    # mypy_path: an editable install's import hook is invisible to mypy; the package's own modules are read as an
    # installed typed package's are (their types used, their own errors the other test's), the user's strictly
    (tmp_path / "mypy.ini").write_text(
        f"[mypy]\nstrict = True\nmypy_path = {ROOT}\n\n[mypy-visdet_export.*]\nignore_errors = True\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
    )


def test_a_users_code_type_checks_strictly(tmp_path: Path) -> None:
    """README's "Losses of your own" (a registered subclass) and the documented imports, under mypy --strict:
    the exporters keep their signatures although they load on first use."""
    result = _strict(tmp_path, USER_CODE)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _strict(tmp_path, USER_CODE + 'export_onnx(dict(type="FocalLoss"), "x.onnx", opset="18")\n')
    assert 'Argument "opset" to "export_onnx" has incompatible type "str"' in result.stdout, result.stdout
