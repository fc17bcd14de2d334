"""A closed registry of loss classes, built from visdet-style configs: ``dict(type="FocalLoss", gamma=2.0)``.

Only classes registered here can be built; a config's ``type`` is looked up, never imported or evaluated.
The seed's listing snippet works unchanged::

    from visdet_export.registry import MODELS
    losses = [name for name in sorted(MODELS.module_dict.keys()) if "Loss" in name]
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Callable, Optional, TypeVar, overload

import torch
from torch import nn

from .losses import LOSS_CLASSES
from .numerics import from_float32_parts
from .validation import PLUGINS_VARIABLE, ConfigError, plugin_names

# The prefix of the names the MMDetection / visdet plugin registers our losses under ("ExportFocalLoss").
PLUGIN_PREFIX = "Export"
# MMDetection 3.x losses outside the seed's catalogue: named as such rather than with a close match of ours
# ("VarifocalLoss: did you mean FocalLoss?").
MMDET_LOSSES_NOT_IMPLEMENTED = frozenset({
    "AssociativeEmbeddingLoss", "BoundedIoULoss", "CIoULoss", "CrossEntropyCustomLoss", "DDQAuxLoss", "DIoULoss",
    "DiceLoss", "EIoULoss", "EQLV2Loss", "FocalCustomLoss", "GHMC", "GHMR", "GaussianFocalLoss", "L2Loss",
    "MarginL2Loss", "MultiPosCrossEntropyLoss", "SIoULoss", "SeesawLoss", "TripletLoss", "VarifocalLoss",
})

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])


class Registry:
    """Name -> ``nn.Module`` class, with config building and helpful errors."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._modules: dict[str, type[nn.Module]] = {}

    @property
    def module_dict(self) -> Mapping[str, type[nn.Module]]:
        """A read-only view of the registered classes by name."""
        return MappingProxyType(self._modules)

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __getitem__(self, name: str) -> type[nn.Module]:
        return self.get(name)

    def __len__(self) -> int:
        return len(self._modules)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {sorted(self._modules)})"

    @overload
    def register_module(self, module: ModuleT, name: Optional[str] = None, force: bool = False) -> ModuleT: ...

    @overload
    def register_module(
        self, module: Optional[str] = None, name: Optional[str] = None, force: bool = False
    ) -> Callable[[ModuleT], ModuleT]: ...

    def register_module(
        self, module: Optional[ModuleT | str] = None, name: Optional[str] = None, force: bool = False
    ) -> ModuleT | Callable[[ModuleT], ModuleT]:
        """Register ``module`` (or, used as ``@register_module()``, the decorated class) under its class name, or
        ``name``. ``@register_module("Name")`` names it as MMEngine's registry takes its first argument."""
        if isinstance(module, str):
            module, name = None, module

        def register(cls: ModuleT) -> ModuleT:
            if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
                raise TypeError(f"only nn.Module subclasses can be registered, got {cls!r}")
            key = name or cls.__name__
            if key in self._modules and not force:
                raise KeyError(f"{key} is already registered in {self.name}; pass force=True to replace it")
            self._modules[key] = cls
            return cls

        return register if module is None else register(module)

    def get(self, name: str) -> type[nn.Module]:
        """The class registered as ``name``; unknown names raise :class:`ConfigError` with close matches."""
        if not isinstance(name, str):
            raise ConfigError(f"type must be a registered name (a string), got {name!r}")
        # An MMEngine scope of OpenMMLab's or visdet's ("mmdet.FocalLoss") and the plugin's names
        # ("ExportFocalLoss") read as ours; other dotted names ("torch.nn.L1Loss") do not.
        scope, _, bare = name.rpartition(".")
        if scope and not (scope.isidentifier() and scope.startswith(("mm", "visdet"))):
            bare = name
        for candidate in (name, bare, bare.removeprefix(PLUGIN_PREFIX)):
            if candidate in self._modules:
                return self._modules[candidate]
        if bare in MMDET_LOSSES_NOT_IMPLEMENTED:
            raise ConfigError(
                f"{name} is an MMDetection loss that visdet-export does not implement; it has "
                f"{', '.join(sorted(self._modules))} (`visdet-export export --skip-unknown` leaves such losses out; "
                "a loss of your own of that name: name the module registering it with --plugin or "
                "$VISDET_EXPORT_PLUGINS)"
            )
        close = difflib.get_close_matches(name, list(self._modules), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown {self.name} type {name!r}.{hint} Registered: {', '.join(sorted(self._modules))}")

    def _class_of(self, loss_type: object) -> type[nn.Module]:
        """A config's ``type``: a registered name, or, as MMEngine's registries take it (its pure-Python configs
        write ``type=FocalLoss``), a class: one registered here, or OpenMMLab's / visdet's own class of a loss, read
        as its name (as ``"mmdet.FocalLoss"`` is). Any other class is refused, never instantiated."""
        if not inspect.isclass(loss_type):
            return self.get(loss_type)  # type: ignore[arg-type]
        registered = next((cls for cls in self._modules.values() if cls is loss_type), None)
        if registered is not None:
            return registered
        package = str(getattr(loss_type, "__module__", "")).partition(".")[0]
        if package.startswith(("mm", "visdet")) and package != "visdet_export":
            return self.get(loss_type.__name__)
        raise ConfigError(
            f"type={loss_type.__module__}.{loss_type.__qualname__} is a class that is not registered in "
            f"{self.name}; register it (visdet_export.registry.MODELS.register_module) or write a registered name: "
            f"{', '.join(sorted(self._modules))}"
        )

    def build(self, cfg: Mapping[str, object]) -> nn.Module:
        """Build ``cfg["type"]`` (a registered name or class) with the remaining keys as constructor arguments.

        Raises:
            ConfigError: missing or unknown ``type``, unknown keys (the valid ones are listed), or invalid values.
        """
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"a loss config must be a mapping with a 'type' key, got {type(cfg).__name__}")
        if "type" not in cfg:
            raise ConfigError(f"loss config {dict(cfg)!r} has no 'type'")
        kwargs = dict(cfg)
        cls = self._class_of(kwargs.pop("type"))
        accepted = config_parameters(cls)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            close = {key: difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6) for key in unknown}
            hints = "".join(f" (did you mean {close[key][0]!r} for {key!r}?)" for key in unknown if close[key])
            raise ConfigError(
                f"{cls.__name__} got unknown argument(s) {', '.join(unknown)}{hints}; valid arguments: "
                f"{', '.join(accepted)}"
            )
        return cls(**kwargs)


def config_parameters(cls: type[nn.Module]) -> dict[str, object]:
    """The constructor arguments of ``cls`` with their defaults (``inspect.Parameter.empty`` if required).

    A constructor that forwards ``**kwargs`` (a subclass presetting one default) also takes its bases' arguments:
    they are collected along the MRO until a constructor without ``**kwargs``."""
    parameters: dict[str, object] = {}
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        signature = inspect.signature(klass.__init__)  # type: ignore[misc]
        for name, parameter in signature.parameters.items():
            if name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                parameters.setdefault(name, parameter.default)
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return parameters


def registered_name(cls: type[nn.Module]) -> Optional[str]:
    """The name ``cls`` is registered under in :data:`MODELS` (its class name first), or None."""
    if MODELS.module_dict.get(cls.__name__) is cls:
        return cls.__name__
    return next((name for name, klass in MODELS.module_dict.items() if klass is cls), None)


def loss_config(loss: nn.Module) -> dict[str, object]:
    """The config that rebuilds ``loss``: its type and every constructor argument it stores under the same name.

    Arguments a loss folds into another (``IoULoss(linear=True)`` into ``mode``) are left to their defaults. A
    tensor stored with a ``<name>_residual`` beside it (:func:`visdet_export.numerics.float32_parts`) gives back the
    configured float64 values.
    """
    cfg: dict[str, object] = {"type": registered_name(type(loss)) or type(loss).__name__}
    for name in config_parameters(type(loss)):
        if hasattr(loss, name):
            value = getattr(loss, name)
            if isinstance(value, torch.Tensor):
                residual = getattr(loss, name + "_residual", None)
                value = (value if residual is None else from_float32_parts(value, residual)).tolist()
            elif isinstance(value, nn.Module):  # a sub-loss built from a config argument (MMDetection's heads)
                value = loss_config(value)
            cfg[name] = value
    return cfg


def check_rebuilds(loss: nn.Module, cfg: Mapping[str, object]) -> None:
    """Raise :class:`ConfigError` unless ``build_loss(cfg)`` rebuilds ``loss``: same class, same config. An
    artifact's manifest records ``cfg``; verification and ``load_runner`` rebuild the loss from it."""
    cls = type(loss)
    hint = (
        "; register the class (visdet_export.registry.MODELS.register_module) and keep every constructor argument "
        "as an attribute of the same name"
    )
    try:
        json.dumps(cfg)
    except TypeError as exc:
        raise ConfigError(f"the config of {cls.__name__} is not JSON: {exc}{hint}") from None
    try:
        rebuilt = build_loss(cfg)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{cls.__name__}'s config {dict(cfg)} does not rebuild it: {exc}{hint}") from None
    if type(rebuilt) is not cls:
        raise ConfigError(
            f"{cls.__module__}.{cls.__qualname__}'s config {dict(cfg)} builds "
            f"{type(rebuilt).__module__}.{type(rebuilt).__qualname__}, another class{hint}"
        )
    if loss_config(rebuilt) != dict(cfg):
        raise ConfigError(f"{cls.__name__}'s config {dict(cfg)} rebuilds {loss_config(rebuilt)}{hint}")
    difference = state_difference(loss, rebuilt)
    if difference is not None:
        # a hyper-parameter kept under another name (self.focal_alpha = alpha) is missing from the config
        raise ConfigError(f"{cls.__name__} rebuilt from its config {dict(cfg)} differs: {difference}{hint}")


def state_difference(loss: nn.Module, other: nn.Module, prefix: str = "") -> Optional[str]:
    """The first attribute (a private one where both modules have it: ``self._scale = scale`` is a hyper-parameter
    too), parameter or buffer (sub-losses' included) whose value differs between the two
    modules, described, or None where they hold the same state."""
    mine, theirs = _state(loss), _state(other)
    for name in sorted(set(mine) | set(theirs)):
        where = prefix + name
        if name not in mine or name not in theirs:
            if name.startswith("_"):  # torch's marks on a module it compiled or scripted (__overloads__, ...)
                continue
            return f"{where} is set on {'the loss' if name in mine else 'the rebuilt loss'} only"
        value, rebuilt = mine[name], theirs[name]
        if isinstance(value, nn.Module) and isinstance(rebuilt, nn.Module):
            inner = state_difference(value, rebuilt, where + ".")
            if inner is not None:
                return inner
        elif _same_value(value, rebuilt) is False:
            return f"{where} is {_shown(value)}, rebuilt {_shown(rebuilt)}"
    return None


#: What every nn.Module keeps in its ``__dict__`` (hooks, the parameter / buffer / child tables, ``training``).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _state(module: nn.Module) -> dict[str, object]:
    held = {name: value for name, value in vars(module).items() if name not in _MODULE_INTERNALS}
    return {**held, **dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False)),
            **dict(module.named_children())}


def _same_value(value: object, other: object) -> Optional[bool]:
    """Whether two attribute values are the same configuration; None where that cannot be told (a callable, an
    object whose ``==`` is no truth value): the check refuses only a difference it can show."""
    if isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor):
        if not (isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor)) or value.shape != other.shape:
            return False
        # by value: model.double() / .half() moves a loss's buffers too, and its config rebuilds float32 ones
        mine, theirs = value.detach().double().cpu(), other.detach().double().cpu()
        return bool(((mine == theirs) | (mine.isnan() & theirs.isnan())).all())
    if isinstance(value, (list, tuple)) and isinstance(other, (list, tuple)):
        if len(value) != len(other):
            return False
        same = [_same_value(a, b) for a, b in zip(value, other)]
        return False if False in same else None if None in same else True
    if isinstance(value, dict) and isinstance(other, dict):
        if value.keys() != other.keys():
            return False
        return _same_value(list(value.values()), [other[key] for key in value])
    if isinstance(value, float) and isinstance(other, float) and math.isnan(value) and math.isnan(other):
        return True
    if callable(value) and callable(other):
        return None
    try:
        return bool(value == other)
    except Exception:  # an array's elementwise ==, or no == at all
        return None


def _shown(value: object) -> str:
    return f"tensor {value.detach().flatten()[:4].tolist()}" if isinstance(value, torch.Tensor) else repr(value)


MODELS = Registry("loss")
for _loss_class in LOSS_CLASSES:
    MODELS.register_module(_loss_class)


def load_plugins(names: Sequence[str] = ()) -> None:
    """Import the modules ``names`` and those of ``$VISDET_EXPORT_PLUGINS``, found on ``sys.path`` and, as
    ``python -m`` finds them, in the working directory. Any failure is a :class:`ConfigError` naming the module.
    Plugins are code: name only modules you trust."""
    wanted = plugin_names(names)
    if wanted and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in wanted:
        if not name:
            raise ConfigError("--plugin needs a module name")
        try:
            importlib.import_module(name)
        except Exception as exc:  # a plugin's own error (a clash, a typo) is the user's input mistake
            raise ConfigError(f"plugin {name!r} failed to import: {type(exc).__name__}: {exc}") from exc


def build_loss(cfg: Mapping[str, object] | str) -> nn.Module:
    """Build a registered loss from a config mapping (``dict(type="FocalLoss", gamma=2.0)``), or from a bare type
    name with default arguments.

    Returns:
        The loss module.

    Raises:
        ConfigError (a ValueError): an unknown type (close matches named), unknown arguments (the valid ones
            listed) or invalid values.
    """
    if isinstance(cfg, str):
        cfg = {"type": cfg}
    return MODELS.build(cfg)


__all__ = [
    "MODELS",
    "PLUGINS_VARIABLE",
    "PLUGIN_PREFIX",
    "Registry",
    "build_loss",
    "check_rebuilds",
    "config_parameters",
    "load_plugins",
    "loss_config",
    "registered_name",
    "state_difference",
]
