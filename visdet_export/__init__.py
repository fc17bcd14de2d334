"""visdet detection losses that run unchanged in eager PyTorch, torch.compile, TorchScript and ONNX."""

from .losses import LOSS_CLASSES
from .registry import MODELS, Registry, build_loss
from .validation import ConfigError

for _loss_class in LOSS_CLASSES:
    MODELS.register_module(_loss_class)

__version__ = "0.1.0"

__all__ = ["MODELS", "ConfigError", "Registry", "build_loss", "__version__"]
