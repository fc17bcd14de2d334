"""Registering the losses in a detector framework's registry (visdet_export.integration, visdet_export.mmdet).

MMDetection and visdet are not dependencies, so the framework registry here is this package's own ``Registry``,
which keeps MMEngine's contract for what is used: ``register_module(name=..., force=..., module=...)`` refusing a
held name unless ``force``, ``module_dict``, and ``build(cfg)``.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from torch import nn

from visdet_export.integration import PLUGIN_PREFIX, register_losses
from visdet_export.losses.focal_loss import FocalLoss
from visdet_export.registry import MODELS, Registry, build_loss, loss_config


class FrameworkFocalLoss(nn.Module):
    """Stands in for the framework's own loss of the same name."""


def framework_models() -> Registry:
    registry = Registry("model")
    registry.register_module(FrameworkFocalLoss, name="FocalLoss")
    return registry


def test_losses_register_beside_the_framework_and_build_from_configs():
    registry = framework_models()
    registered = register_losses(registry, prefix="Export")
    assert set(registered) == {"Export" + name for name in MODELS.module_dict}
    assert registry.get("FocalLoss") is FrameworkFocalLoss
    loss = registry.build(dict(type="ExportFocalLoss", gamma=1.5, alpha=0.5, loss_weight=2.0))
    assert type(loss) is FocalLoss and (loss.gamma, loss.alpha, loss.loss_weight) == (1.5, 0.5, 2.0)
    logits, labels = torch.randn(6, 80), torch.randint(0, 81, (6,))
    torch.testing.assert_close(loss(logits, labels), FocalLoss(gamma=1.5, alpha=0.5, loss_weight=2.0)(logits, labels))


def test_a_clash_registers_nothing_unless_forced():
    registry = framework_models()
    with pytest.raises(KeyError, match="FocalLoss already registered"):
        register_losses(registry)
    assert list(registry.module_dict) == ["FocalLoss"]
    register_losses(registry, force=True, names=["FocalLoss", "GIoULoss"])
    assert registry.get("FocalLoss") is FocalLoss and list(registry.module_dict) == ["FocalLoss", "GIoULoss"]


def test_every_bundled_recipe_builds_through_the_framework_registry():
    """The detector recipes' loss configs, with the plugin's type names, build the losses build_loss builds."""
    from visdet_export.recipes import recipe_losses, recipe_names

    registry = Registry("model")
    register_losses(registry, prefix=PLUGIN_PREFIX)
    built = 0
    for recipe in recipe_names():
        for cfg in recipe_losses(recipe).values():
            loss = registry.build({**cfg, "type": PLUGIN_PREFIX + str(cfg["type"])})
            assert loss_config(loss) == loss_config(build_loss(cfg)), (recipe, cfg)
            built += 1
    assert built >= len(recipe_names())


@pytest.mark.parametrize("prefix", ["visdet_export.", "Export-", "a b"])
def test_prefixes_mmengine_would_read_as_a_scope_are_refused(prefix):
    with pytest.raises(ValueError, match="prefix"):
        register_losses(Registry("model"), prefix=prefix)


def _import_plugin(monkeypatch, **registries: Registry | None):
    """Import visdet_export.mmdet afresh with the given frameworks' ``<name>.registry`` modules (None: absent)."""
    for framework, registry in registries.items():
        if registry is None:
            monkeypatch.setitem(sys.modules, framework, None)  # import fails as when it is not installed
            continue
        package, module = types.ModuleType(framework), types.ModuleType(f"{framework}.registry")
        package.__path__ = []
        module.MODELS = registry
        monkeypatch.setitem(sys.modules, framework, package)
        monkeypatch.setitem(sys.modules, f"{framework}.registry", module)
    monkeypatch.delitem(sys.modules, "visdet_export.mmdet", raising=False)
    return importlib.import_module("visdet_export.mmdet")


@pytest.mark.parametrize("installed", ["mmdet", "visdet", "both"])
def test_custom_imports_plugin_registers_in_the_installed_framework(monkeypatch, installed):
    mmdet = framework_models() if installed in ("mmdet", "both") else None
    visdet = framework_models() if installed in ("visdet", "both") else None
    plugin = _import_plugin(monkeypatch, mmdet=mmdet, visdet=visdet)
    target = mmdet if mmdet is not None else visdet
    assert target is not None and plugin.framework_registry() is target
    assert type(target.build(dict(type=PLUGIN_PREFIX + "FocalLoss"))) is FocalLoss
    assert target.get("FocalLoss") is FrameworkFocalLoss
    if installed == "both":
        assert visdet is not None and list(visdet.module_dict) == ["FocalLoss"]


def test_plugin_reraises_a_missing_dependency_of_an_installed_framework(monkeypatch):
    """An installed framework whose registry fails to import a module it needs (here one named "mm", a prefix of
    "mmdet" as a string) is an error to show, not a framework to skip."""
    plugin = _import_plugin(monkeypatch, mmdet=framework_models())

    visdet = types.ModuleType("visdet.registry")
    visdet.MODELS = framework_models()

    def registry_needing_mm(name: str):
        if name == "visdet.registry":
            return visdet  # installed too: skipping mmdet would silently register there
        raise ModuleNotFoundError("No module named 'mm'", name="mm")

    monkeypatch.setattr(plugin.importlib, "import_module", registry_needing_mm)
    with pytest.raises(ModuleNotFoundError, match="'mm'"):
        plugin.framework_registry()


def test_plugin_without_a_framework_says_so(monkeypatch):
    with pytest.raises(ImportError, match="neither mmdet.registry nor visdet.registry"):
        _import_plugin(monkeypatch, mmdet=None, visdet=None)
