"""Use the package's losses inside MMDetection / visdet detectors: register them in the framework's registry.

Detector configs build their losses from ``dict(type=..., ...)`` through an MMEngine-style registry
(``mmdet.registry.MODELS``, ``visdet.registry.MODELS``). :func:`register_losses` adds every loss of this package
to such a registry, so that a config builds ours:

* ``register_losses(MODELS, force=True)`` replaces the framework's losses of the same names: existing configs
  (``loss_cls=dict(type="FocalLoss", ...)``) build ours unchanged;
* ``register_losses(MODELS, prefix="Export")`` adds them beside the framework's (``type="ExportFocalLoss"``).

Without code, a config's ``custom_imports = dict(imports=["visdet_export.mmdet"])`` does the second
(:mod:`visdet_export.mmdet`). The heads call the losses as they call MMDetection's (``forward(pred, target,
weight, avg_factor=..., reduction_override=...)``, QFL's ``(labels, scores)`` target, mask CE's RoI labels), with
one difference: our ``forward`` takes no ``**kwargs``, so a call with an argument the loss does not define fails
instead of being ignored.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .registry import MODELS, PLUGIN_PREFIX
from .validation import check_names


def register_losses(
    registry: Any, *, prefix: str = "", force: bool = False, names: Optional[list[str]] = None
) -> dict[str, type[nn.Module]]:
    """Register this package's losses in ``registry`` under ``prefix`` + class name.

    Args:
        registry: an MMEngine-style registry: ``register_module(name=..., force=..., module=...)``, refusing a
            name it already holds unless ``force`` (``mmdet.registry.MODELS``, ``visdet.registry.MODELS``).
        prefix: prepended to each class name; letters, digits and underscores only (MMEngine reads the part of a
            type before a ``.`` as a registry scope).
        force: replace what ``registry`` holds under the same names (the framework's own losses, without prefix).
        names: the class names to register (default: every loss of :data:`visdet_export.registry.MODELS`).

    Returns:
        The registered classes by the name they were registered under.
    """
    if not (prefix == "" or prefix.replace("_", "a").isalnum()):
        raise ValueError(f"prefix must be letters, digits and underscores, got {prefix!r}")
    chosen = list(MODELS.module_dict) if names is None else check_names("names", names)
    registered = {prefix + name: MODELS.get(name) for name in chosen}
    held = [name for name in registered if name in getattr(registry, "module_dict", {})]
    if held and not force:  # checked first, so that a clash leaves the registry as it was
        raise KeyError(
            f"{', '.join(held)} already registered in {registry!r:.80}; pass a prefix to add ours beside them, or "
            "force=True to replace them"
        )
    for name, cls in registered.items():
        registry.register_module(name=name, force=force, module=cls)
    return registered


__all__ = ["PLUGIN_PREFIX", "register_losses"]
