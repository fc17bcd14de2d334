"""Export losses to deployable artifacts, and verify artifacts against eager PyTorch.

* :func:`export_onnx` (:mod:`.onnx`): ONNX via ``torch.onnx.export(dynamo=True)``, checked in onnxruntime.
* :func:`export_torchscript` (:mod:`.torchscript`) and :func:`export_pt2` (:mod:`.pt2`): TorchScript and
  torch.export / AOTInductor packages.
* :func:`joint_module` (:mod:`.joint`): a loss + gradient graph for runtimes without autograd.
* :func:`verify` (:mod:`.verify`): reload an artifact and compare it with eager on fresh inputs.

Every exporter writes atomically and leaves a JSON manifest beside the artifact (:mod:`.artifacts`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .artifacts import (
    ArtifactError,
    MissingPluginError,
    atomic_output,
    manifest_path,
    read_manifest,
    write_manifest,
)
from .joint import JointLoss, dynamic_shapes, eager_joint, example_inputs, joint_module, select_inputs
from .onnx import export_onnx
from .verify import TOLERANCES, check_parity, verify

# Exporters that live in their own modules and are imported on first use, so this package imports (and ONNX
# export works) whatever else is installed. To add one: create ``export/<format>.py`` defining the exporter and
# ``load_runner(path, manifest)``, add ``"<exporter name>": "<format>"`` here, and add the format (with its
# tolerances) to ``verify.FORMATS`` / ``verify.TOLERANCES``.
_LAZY_EXPORTERS = {"export_torchscript": "torchscript", "export_pt2": "pt2", "export_pt2_bundle": "pt2"}


if TYPE_CHECKING:  # type checkers see the exporters' signatures; at run time they load on first use
    from .pt2 import export_pt2 as export_pt2
    from .pt2 import export_pt2_bundle as export_pt2_bundle
    from .torchscript import export_torchscript as export_torchscript
else:

    def __getattr__(name: str) -> Any:
        if name in _LAZY_EXPORTERS:
            module = importlib.import_module(f"{__name__}.{_LAZY_EXPORTERS[name]}")
            value = getattr(module, name)
            globals()[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_EXPORTERS})


__all__ = [
    "ArtifactError",
    "MissingPluginError",
    "JointLoss",
    "TOLERANCES",
    "atomic_output",
    "check_parity",
    "dynamic_shapes",
    "eager_joint",
    "example_inputs",
    "export_onnx",
    "joint_module",
    "manifest_path",
    "read_manifest",
    "select_inputs",
    "verify",
    "write_manifest",
]
__all__ += list(_LAZY_EXPORTERS)
