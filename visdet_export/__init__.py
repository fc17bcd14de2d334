"""visdet detection losses that run unchanged in eager PyTorch, torch.compile, TorchScript and ONNX."""

import importlib
from typing import TYPE_CHECKING, Any

from .losses import LOSS_CLASSES
from .registry import MODELS, Registry, build_loss
from .validation import ConfigError

for _loss_class in LOSS_CLASSES:
    MODELS.register_module(_loss_class)

__version__ = "0.1.0"

# The export API lives in visdet_export.export and pulls in onnx/onnxscript; it is imported on first use so that
# ``import visdet_export`` stays as light as the losses themselves.
_EXPORT_API = ("export_onnx", "export_torchscript", "export_pt2", "verify")


if TYPE_CHECKING:  # type checkers see the exporters' signatures; at run time they load on first use
    from .export.onnx import export_onnx as export_onnx
    from .export.pt2 import export_pt2 as export_pt2
    from .export.torchscript import export_torchscript as export_torchscript
    from .export.verify import verify as verify
else:

    def __getattr__(name: str) -> Any:
        if name in _EXPORT_API:
            return getattr(importlib.import_module(".export", __name__), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORT_API})


__all__ = ["MODELS", "ConfigError", "Registry", "build_loss", "__version__", *_EXPORT_API]
