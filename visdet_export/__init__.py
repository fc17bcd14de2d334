"""visdet detection losses that run unchanged in eager PyTorch, torch.compile, TorchScript and ONNX."""

import importlib
from typing import TYPE_CHECKING, Any

from .validation import ConfigError

__version__ = "0.1.0"

# Nothing here imports torch: ``visdet-export --help`` and ``--version`` answer without it (a second or more).
# The registry (with the built-in losses) loads on first use, the export API (onnx, onnxscript) likewise.
_LAZY_API = {
    "MODELS": ".registry",
    "Registry": ".registry",
    "build_loss": ".registry",
    "export_onnx": ".export",
    "export_torchscript": ".export",
    "export_pt2": ".export",
    "verify": ".export",
}

# Submodules ``import visdet_export`` loaded before it became lazy: ``visdet_export.losses.FocalLoss`` still works.
_EAGER_BEFORE = ("losses", "registry", "numerics", "reduction")


if TYPE_CHECKING:  # type checkers see the signatures; at run time they load on first use
    from .export.onnx import export_onnx as export_onnx
    from .export.pt2 import export_pt2 as export_pt2
    from .export.torchscript import export_torchscript as export_torchscript
    from .export.verify import verify as verify
    from .registry import MODELS as MODELS
    from .registry import Registry as Registry
    from .registry import build_loss as build_loss
else:

    def __getattr__(name: str) -> Any:
        if name in _LAZY_API:
            return getattr(importlib.import_module(_LAZY_API[name], __name__), name)
        if name in _EAGER_BEFORE:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_API, *_EAGER_BEFORE})


__all__ = ["ConfigError", "__version__", *_LAZY_API]
