"""Importing this module registers the package's losses in MMDetection's registry, or visdet's, as
``Export<ClassName>`` (``type="ExportFocalLoss"``), beside the framework's own. For a detector config::

    custom_imports = dict(imports=["visdet_export.mmdet"], allow_failed_imports=False)
    model = dict(bbox_head=dict(loss_cls=dict(type="ExportFocalLoss", gamma=2.0, alpha=0.25, loss_weight=1.0)))

To replace the framework's losses under their own names instead, call
``visdet_export.integration.register_losses(MODELS, force=True)`` from your code.
"""

from __future__ import annotations

import importlib
from typing import Any

from .integration import PLUGIN_PREFIX, register_losses

#: Where the detector frameworks keep their model registry, in the order they are tried.
FRAMEWORK_REGISTRIES = ("mmdet.registry", "visdet.registry")


def framework_registry() -> Any:
    """The ``MODELS`` registry of the first installed framework of :data:`FRAMEWORK_REGISTRIES`."""
    for module_name in FRAMEWORK_REGISTRIES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
                continue  # that framework is not installed (not a module it imports in turn)
            raise
        return module.MODELS
    raise ImportError(
        "visdet_export.mmdet registers the losses in MMDetection's or visdet's registry, but neither "
        f"{' nor '.join(FRAMEWORK_REGISTRIES)} can be imported"
    )


REGISTERED = register_losses(framework_registry(), prefix=PLUGIN_PREFIX)

__all__ = ["FRAMEWORK_REGISTRIES", "REGISTERED", "framework_registry"]
