"""Losses of one's own (a plugin module registering losses and their input specs): build, export, verify and
check them with the package's tools, from Python and from the CLI (``--plugin``)."""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Optional

import numpy as np
import pytest
import torch
from conftest import onnx_model
from torch import Tensor

from visdet_export import build_loss, cli
from visdet_export.check import UNBACKED_HINT, RunnerCache, check_cell
from visdet_export.export import (
    ArtifactError,
    MissingPluginError,
    export_onnx,
    export_torchscript,
    manifest_path,
    read_manifest,
    verify,
)
from visdet_export.export.artifacts import build_recorded_loss, first_line
from visdet_export.export.torchscript import script_loss
from visdet_export.export.verify import check_parity
from visdet_export.losses import FocalLoss, L1Loss
from visdet_export.registry import MODELS, check_rebuilds, loss_config, state_difference
from visdet_export.specs import INT64, SPEC_BUILDERS, LossSpec, TensorSpec, spec_for

PLUGIN_SOURCE = '''
"""Losses of a user's own, as README "Losses of your own" writes them."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visdet_export.losses import FocalLoss, GIoULoss, L1Loss
from visdet_export.losses.base import WeightedLoss
from visdet_export.reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from visdet_export.registry import MODELS, build_loss
from visdet_export.specs import (
    AVG_FACTOR, LossSpec, SampleOptions, TensorSpec, register_spec, sample_avg_factor, sample_logits,
    sample_weights, standard_caller,
)
from visdet_export.validation import check_float


def varifocal(pred: Tensor, target: Tensor, stable: bool) -> Tensor:
    focal_weight = torch.where(target > 0, target, 0.75 * (pred.sigmoid() - target).abs().pow(2.0)).detach()
    if stable:
        bce = F.softplus(pred) - pred * target
    else:  # exported as Log(Sigmoid): inf / NaN in onnxruntime past |x| ~ 18
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    return bce * focal_weight


class {prefix}Varifocal(WeightedLoss):
    stable: bool

    def __init__(self, stable: bool = True, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.stable = stable

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None, avg_factor: AvgFactor = None,
                reduction_override: Optional[str] = None) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        row_weight = None if weight is None else weight.unsqueeze(1)
        loss = varifocal(pred, target, self.stable)
        return self.weighted(weight_reduce_loss(loss, row_weight, reduction, as_avg_factor(avg_factor, pred)))


MODELS.register_module({prefix}Varifocal, name="{prefix}VarifocalLoss")


@register_spec("{prefix}VarifocalLoss")
def _varifocal_spec(loss: nn.Module, variant: Optional[str]) -> LossSpec:
    def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict:
        c = options.sizes["C"]
        positive = torch.rand(n, c, generator=generator) < 0.05
        scores = torch.rand(n, c, generator=generator, dtype=torch.float64)
        return {{
            "pred": sample_logits((n, c), generator, options),
            "target": torch.where(positive, scores, 0.0).to(options.dtype),
            "weight": sample_weights((n,), generator, options),
            "avg_factor": sample_avg_factor(n, generator, options),
        }}

    inputs = (TensorSpec("pred", ("N", "C")), TensorSpec("target", ("N", "C")),
              TensorSpec("weight", ("N",), optional=True), AVG_FACTOR)
    return LossSpec("{prefix}VarifocalLoss", variant or "dense", inputs, sample, standard_caller, {{"C": 80}})


@MODELS.register_module()
class {prefix}SoftFocalLoss(FocalLoss):
    """A preset default, the rest passed through."""

    def __init__(self, alpha: float = 0.5, **kwargs) -> None:
        super().__init__(alpha=alpha, **kwargs)


class {prefix}UnregisteredFocalLoss(FocalLoss):
    pass


@MODELS.register_module()
class {prefix}RenamedAlphaFocalLoss(FocalLoss):
    """Keeps its argument under another name (``alpha``): the config it writes cannot give it back."""

    def __init__(self, positive_weight: float = 0.25) -> None:
        super().__init__(alpha=positive_weight)


@MODELS.register_module()
class {prefix}PrivateScaleL1Loss(L1Loss):
    """Keeps its argument in a private attribute."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self._scale = scale


class L1Loss(WeightedLoss):
    """Shares a built-in's class name, registered under another and without a spec of its own."""


MODELS.register_module(L1Loss, name="{prefix}OddL1Loss")


@MODELS.register_module()
class {prefix}ScaledGIoULoss(WeightedLoss):
    """A module holding a loss built from a config argument, as MMDetection heads hold theirs."""

    def __init__(self, loss_bbox: dict = dict(type="GIoULoss"), scale: float = 2.0) -> None:
        super().__init__()
        self.loss_bbox = build_loss(loss_bbox)
        self.scale = check_float("scale", scale)

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None, avg_factor: AvgFactor = None,
                reduction_override: Optional[str] = None) -> Tensor:
        return self.scale * self.loss_bbox(pred, target, weight, avg_factor, reduction_override)


@register_spec("{prefix}ScaledGIoULoss")
def _scaled_giou_spec(loss: nn.Module, variant: Optional[str]) -> LossSpec:
    from visdet_export.specs import spec_for

    return spec_for(loss.loss_bbox, variant)
'''


def _load_plugin(directory: Path, module_name: str, prefix: str) -> ModuleType:
    (directory / f"{module_name}.py").write_text(PLUGIN_SOURCE.format(prefix=prefix))
    sys.path.insert(0, str(directory))
    return importlib.import_module(module_name)


def _unload_plugin(module_name: str, prefix: str, directory: Path) -> None:
    """Leave the registry as the package has it: other tests cover every registered loss."""
    sys.modules.pop(module_name, None)
    sys.path.remove(str(directory))
    for name in [name for name in MODELS.module_dict if name.startswith(prefix)]:
        MODELS._modules.pop(name)
    for name in [name for name in SPEC_BUILDERS if name.startswith(prefix)]:
        SPEC_BUILDERS.pop(name)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    directory = tmp_path_factory.mktemp("plugin")
    yield _load_plugin(directory, "visdet_test_plugin", "Plugin")
    _unload_plugin("visdet_test_plugin", "Plugin", directory)


def test_a_registered_loss_of_ones_own_exports_verifies_and_checks(plugin: ModuleType, tmp_path: Path) -> None:
    loss = build_loss(dict(type="PluginVarifocalLoss", loss_weight=2.0))
    for path in (export_onnx(loss, tmp_path / "vfl.onnx"), export_torchscript(loss, tmp_path / "vfl.ts.pt")):
        assert read_manifest(path)["config"] == {"type": "PluginVarifocalLoss", "stable": True,
                                                 "reduction": "mean", "loss_weight": 2.0}
        assert verify(path)["passed"]
    cache = RunnerCache()
    cache.loss("vfl", dict(type="PluginVarifocalLoss"))
    for runtime in ("eager", "compile", "script", "onnx"):
        cell = check_cell("vfl", runtime, cache, sizes=(0, 1, 7))
        assert cell.status == "pass", (runtime, cell.reason)


def test_verification_draws_extreme_logits(plugin: ModuleType, tmp_path: Path) -> None:
    """BCE written with ATen's function exports as Log(Sigmoid), which onnxruntime turns to inf past |x| ~ 18:
    logits drawn around 0 never show it."""
    with pytest.raises(ArtifactError, match=r"logits in \[-100, 100\].*NaN or inf where eager's is not"):
        export_onnx(dict(type="PluginVarifocalLoss", stable=False), tmp_path / "naive.onnx")
    export_onnx(dict(type="PluginVarifocalLoss", stable=False), tmp_path / "unverified.onnx", verify=False)
    with pytest.raises(ArtifactError, match="NaN or inf"):
        verify(tmp_path / "unverified.onnx")


def test_a_subclass_passing_kwargs_records_every_argument(plugin: ModuleType, tmp_path: Path) -> None:
    loss = build_loss(dict(type="PluginSoftFocalLoss", gamma=0.0, loss_weight=3.0))
    config = loss_config(loss)
    assert config["type"] == "PluginSoftFocalLoss"
    assert (config["alpha"], config["gamma"], config["loss_weight"]) == (0.5, 0.0, 3.0)
    assert spec_for(loss).loss_type == "FocalLoss"  # the base class's spec
    assert verify(export_onnx(loss, tmp_path / "soft.onnx"))["passed"]


def test_an_unregistered_subclass_is_refused_before_writing(plugin: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not rebuild it.*register the class"):
        export_onnx(plugin.PluginUnregisteredFocalLoss(), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_an_argument_kept_under_another_name_is_refused(plugin: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"differs: alpha is 0.5, rebuilt 0.25.*same name"):
        export_onnx(dict(type="PluginRenamedAlphaFocalLoss", positive_weight=0.5), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())
    assert verify(export_onnx(dict(type="PluginRenamedAlphaFocalLoss"), tmp_path / "x.onnx"))["passed"]
    with pytest.raises(ArtifactError, match=r"differs: _scale is 3.0, rebuilt 1.0"):
        export_onnx(dict(type="PluginPrivateScaleL1Loss", scale=3.0), tmp_path / "y.onnx")


def test_a_class_sharing_a_built_in_name_does_not_take_its_spec(plugin: ModuleType) -> None:
    with pytest.raises(KeyError, match="no input spec is registered for L1Loss"):
        spec_for(build_loss(dict(type="PluginOddL1Loss")))


def test_a_subclass_whose_forward_drops_standard_arguments_is_told_which(plugin: ModuleType, tmp_path: Path) -> None:
    """A subclass takes its base's spec, which calls forward with visdet's five arguments: a forward without
    ``avg_factor`` / ``reduction_override`` is refused by spec_for with the signature and what to do (the export
    said "forward() takes from 3 to 4 positional arguments but 6 were given")."""

    class PluginShortForwardL1Loss(L1Loss):
        def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
            return super().forward(pred, target, weight)

    MODELS.register_module(PluginShortForwardL1Loss)

    class PassThroughL1Loss(L1Loss):
        def forward(self, pred: Tensor, target: Tensor, *args: Optional[Tensor]) -> Tensor:  # type: ignore[override]
            return super().forward(pred, target, *args)

    message = (
        r"PluginShortForwardL1Loss.forward\(pred: .*\) -> \S+ cannot take the arguments the L1Loss input spec "
        r"passes, \(pred, target, weight, avg_factor, reduction_override\): add the missing parameters"
    )
    with pytest.raises(TypeError, match=message):
        spec_for(PluginShortForwardL1Loss())
    with pytest.raises(TypeError, match=message):
        export_onnx(PluginShortForwardL1Loss(), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())
    assert spec_for(PassThroughL1Loss()).loss_type == "L1Loss"


def test_a_spec_may_name_the_class_registered_under_an_alias(plugin: ModuleType) -> None:
    class PluginAliasedL1(L1Loss):
        pass

    MODELS.register_module(PluginAliasedL1, name="PluginAliasL1")
    SPEC_BUILDERS["PluginAliasedL1"] = lambda loss, variant: replace(spec_for(L1Loss(), variant), loss_type="alias")
    assert spec_for(build_loss(dict(type="PluginAliasL1"))).loss_type == "alias"


def test_rebuilding_compares_values_not_dtypes_or_identities(plugin: ModuleType) -> None:
    """model.double() / .half() move a loss's class weights; arrays, callables and lists of tensors have no plain
    ==: none of that is a difference of configuration."""
    loss = build_loss(dict(type="CrossEntropyLoss", class_weight=[0.1, 0.2, 0.3]))
    for moved in (loss.double(), loss.half()):
        check_rebuilds(moved, loss_config(moved))
    one, other = FocalLoss(), FocalLoss()
    for module in (one, other):
        module._array, module._call, module._tensors = np.ones(2), functools.partial(abs), [torch.ones(2)]
        module._nan, module._nan_tensor = float("nan"), torch.tensor([float("nan"), 1.0])
    assert state_difference(one, other) is None
    other._tensors = [torch.zeros(2)]
    assert state_difference(one, other) == "_tensors is [tensor([1., 1.])], rebuilt [tensor([0., 0.])]"


def _spec_drawing(draw: Callable[[int], dict[str, Tensor]], doc: str = "") -> LossSpec:
    inputs = (TensorSpec("pred", ("N", "C"), doc=doc), TensorSpec("target", ("N",), INT64))
    return LossSpec("X", "v", inputs, lambda n, g, o: draw(n), lambda m, i, r: m(i), {"C": 3})


@pytest.mark.parametrize(
    "draw, message",
    [
        (lambda n: {"pred": torch.zeros(n, 3, dtype=torch.float64), "target": torch.zeros(n, dtype=torch.long)},
         r"drew 'pred' as torch.float64 \(5, 3\); its spec says torch.float32 \(5, 3\)"),
        (lambda n: {"pred": torch.zeros(n, 4), "target": torch.zeros(n, dtype=torch.long)},
         r"drew 'pred' as torch.float32 \(5, 4\); its spec says torch.float32 \(5, 3\)"),
        (lambda n: {"pred": torch.zeros(n, 3), "target": torch.zeros(n, 1, dtype=torch.long)}, r"'target'.*\(5, 1\)"),
        (lambda n: {"pred": torch.zeros(n, 3)}, r"missing \['target'\], unknown \[\]"),
        (lambda n: {"pred": torch.zeros(n, 3), "target": torch.zeros(n, dtype=torch.long), "wieght": torch.ones(n)},
         r"unknown \['wieght'\]"),
    ],
)
def test_a_sampler_must_draw_what_its_spec_says(draw: Callable[[int], dict[str, Tensor]], message: str) -> None:
    """A manifest describes the spec: an artifact traced from other inputs would be fed what it never saw."""
    with pytest.raises(ValueError, match=message):
        _spec_drawing(draw).sample(torch.nn.Identity(), 5)


def test_a_spec_documenting_logits_it_does_not_draw_warns() -> None:
    spec = replace(
        _spec_drawing(lambda n: {"pred": torch.zeros(n, 3), "target": torch.zeros(n, dtype=torch.long)}, "logits"),
        caller=lambda module, inputs, reduction: inputs["pred"].sum(),
    )
    with pytest.warns(UserWarning, match="documents logits but its sampler ignores SampleOptions.logit_range"):
        record = check_parity(lambda inputs: [inputs["pred"].sum()], torch.nn.Identity(), spec, ["pred", "target"],
                              rtol=0.0, atol=0.0, free_sizes={})
    assert "extreme_logits" not in record


class _LogSumExpLoss(torch.nn.Module):
    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return (torch.logsumexp(pred, dim=1) - (pred * target).sum(1)).mean()


def test_the_compile_runtime_says_why_a_size_decision_fails(plugin: ModuleType) -> None:
    MODELS.register_module(_LogSumExpLoss, name="PluginLogSumExpLoss")
    SPEC_BUILDERS["PluginLogSumExpLoss"] = lambda loss, variant: LossSpec(
        "PluginLogSumExpLoss", "v", (TensorSpec("pred", ("N", "C")), TensorSpec("target", ("N", "C"))),
        lambda n, g, o: {"pred": torch.randn(n, o.sizes["C"], generator=g), "target": torch.rand(n, o.sizes["C"])},
        lambda module, inputs, reduction: module(inputs["pred"], inputs["target"]), {"C": 3},
    )
    cache = RunnerCache()
    cache.loss("lse", dict(type="PluginLogSumExpLoss"))
    cell = check_cell("lse", "compile", cache, sizes=(0, 7))
    assert cell.status == "fail" and "data-dependent" in cell.reason and UNBACKED_HINT in cell.reason


def test_a_module_holding_a_built_loss_records_its_config(plugin: ModuleType, tmp_path: Path) -> None:
    loss = build_loss(dict(type="PluginScaledGIoULoss", loss_bbox=dict(type="GIoULoss", eps=1e-5)))
    assert loss_config(loss)["loss_bbox"] == {"type": "GIoULoss", "eps": 1e-5, "reduction": "mean", "loss_weight": 1.0}
    assert verify(export_torchscript(loss, tmp_path / "giou.ts.pt"))["passed"]


def test_a_spec_naming_a_size_without_default_is_refused() -> None:
    inputs = (TensorSpec("pred", ("N", "C")), TensorSpec("pred", ("N",)))
    with pytest.raises(ValueError, match="repeats an input name"):
        LossSpec("X", "v", inputs, lambda n, g, o: {}, lambda m, i, r: m(i), {"C": 3})
    with pytest.raises(ValueError, match=r"free size\(s\) \['C'\].*sizes="):
        LossSpec("X", "v", inputs[:1], lambda n, g, o: {}, lambda m, i, r: m(i))


def test_script_errors_say_what_to_do() -> None:
    class SuperFocalLoss(FocalLoss):
        def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
            return 2.0 * super().forward(pred, target, weight)

    with pytest.raises(ArtifactError, match=r"TorchScript has no super\(\).*submodule.*: \S"):
        script_loss(SuperFocalLoss())


def test_onnx_exporter_messages_keep_their_cause() -> None:
    message = (
        "\x1b[96mFailed to export the model with torch.export. This is step 1/3 of exporting the model to ONNX.\n"
        "## Exception summary\n\n<class 'torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode'>: "
        "Could not guard on data-dependent expression Eq(u0, 0)\n\nCaused by: (my_losses.py:33 in forward)\n(Refer...)"
    )
    assert first_line(RuntimeError(message)) == (
        "<class 'torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode'>: Could not guard on "
        "data-dependent expression Eq(u0, 0) Caused by: (my_losses.py:33 in forward)"
    )
    assert first_line(RuntimeError("\n  one\ntwo")) == "one"


def test_the_cli_loads_plugins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "plugin"
    directory.mkdir()
    (directory / "visdet_cli_plugin.py").write_text(PLUGIN_SOURCE.format(prefix="Cli"))
    (directory / "visdet_clashing_plugin.py").write_text(
        "from visdet_export.losses import FocalLoss\nfrom visdet_export.registry import MODELS\n"
        "MODELS.register_module(FocalLoss)\n"
    )
    monkeypatch.chdir(directory)  # found in the working directory, as `python -m` finds modules
    try:
        out = tmp_path / "out"
        config = json.dumps({"type": "CliVarifocalLoss"})
        assert cli.main(["--plugin", "visdet_cli_plugin", "export", "--loss", config, "--out", str(out), "-q"]) == 0
        artifacts = sorted(str(path) for path in out.iterdir() if path.suffix != ".json")
        assert len(artifacts) == 2
        assert cli.main(["verify", *artifacts]) == 0  # imported once: registered for the process
        assert cli.main(["check", "--configs", "CliVarifocalLoss", "--runtimes", "eager,script", "--sizes", "0,7"]) == 0
        capsys.readouterr()
        assert cli.main(["--plugin", "visdet_no_such_plugin", "list"]) == cli.EXIT_USAGE
        assert "visdet_no_such_plugin" in capsys.readouterr().err
        # a plugin's own error is a usage mistake: one line, no traceback
        monkeypatch.setenv("VISDET_EXPORT_PLUGINS", "visdet_clashing_plugin")
        assert cli.main(["list"]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert "plugin 'visdet_clashing_plugin' failed to import: KeyError" in err and "Traceback" not in err
    finally:
        _unload_plugin("visdet_cli_plugin", "Cli", directory)


def test_verifying_without_the_plugin_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin's artifact verified without its plugin is a usage mistake (exit 2) naming the module to pass, not a
    broken artifact, nor an MMDetection loss this package lacks (`--skip-unknown` is an export option)."""
    directory = tmp_path / "plugin"
    directory.mkdir()
    (directory / "visdet_absent_plugin.py").write_text(PLUGIN_SOURCE.format(prefix="Absent"))
    monkeypatch.chdir(directory)
    out = tmp_path / "out"
    try:
        assert cli.main(["--plugin", "visdet_absent_plugin", "export", "--loss", "AbsentVarifocalLoss", "--out",
                         str(out), "--format", "onnx,torchscript", "-q"]) == 0
    finally:
        _unload_plugin("visdet_absent_plugin", "Absent", directory)
    artifacts = sorted(path for path in out.iterdir() if path.suffix != ".json")
    assert [path.name for path in artifacts] == ["AbsentVarifocalLoss.onnx", "AbsentVarifocalLoss.ts.pt"]
    hint = ("AbsentVarifocalLoss is registered by the plugin module 'visdet_absent_plugin': pass --plugin "
            "visdet_absent_plugin (or VISDET_EXPORT_PLUGINS=visdet_absent_plugin)")
    for path in artifacts:
        assert read_manifest(path)["plugins"] == ["visdet_absent_plugin"]
        with pytest.raises(MissingPluginError) as raised:
            verify(path)
        assert str(raised.value) == f"{path.name}: {hint}"
    capsys.readouterr()
    assert cli.main(["verify", str(out), "-q"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert hint in err and "skip-unknown" not in err and "does not implement" not in err
    # a manifest written before the field: still a failed artifact, with a hint that fits a loss of one's own
    manifest = manifest_path(artifacts[0])
    record = json.loads(manifest.read_text())
    del record["plugins"]
    manifest.write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match=r"AbsentVarifocalLoss is not registered here.*--plugin MODULE") as old:
        verify(artifacts[0])
    assert not isinstance(old.value, MissingPluginError) and "skip-unknown" not in str(old.value)
    try:  # with the plugin, both verify
        assert cli.main(["--plugin", "visdet_absent_plugin", "verify", str(out), "-q"]) == 0
    finally:
        _unload_plugin("visdet_absent_plugin", "Absent", directory)


def _box_model(path: Path) -> Path:
    """A model with one output, ``box`` (P, 4): what a box loss is attached to."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["box"])], "boxes",
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["P", 4])],
        [helper.make_tensor_value_info("box", TensorProto.FLOAT, ["P", 4])],
    )
    save(onnx_model(graph), str(path))
    return path


def test_verifying_attached_losses_without_the_plugin_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model with a plugin's loss attached records the plugin with the loss (in the model and its manifest), and
    verify without it is the usage mistake a plugin's artifact is (exit 2, naming the module), not a bare unknown
    type; a model attached before the record says to name the module with --plugin."""
    import onnx

    from visdet_export.export.artifacts import sha256
    from visdet_export.export.attach import attach_losses, attached_losses
    from visdet_export.export.onnx import ATTACHED_METADATA_KEY

    directory = tmp_path / "plugin"
    directory.mkdir()
    monkeypatch.chdir(directory)
    out = tmp_path / "merged.onnx"
    _load_plugin(directory, "visdet_attached_plugin", "Attached")
    try:
        attach_losses(_box_model(tmp_path / "m.onnx"),
                      [("loss_bbox", dict(type="AttachedScaledGIoULoss"), {"pred": "box", "target": "gt"})], out)
    finally:
        _unload_plugin("visdet_attached_plugin", "Attached", directory)
    assert attached_losses(out)["loss_bbox"]["plugins"] == ["visdet_attached_plugin"]
    assert read_manifest(out)["losses"]["loss_bbox"]["plugins"] == ["visdet_attached_plugin"]
    hint = ("AttachedScaledGIoULoss is registered by the plugin module 'visdet_attached_plugin': pass --plugin "
            "visdet_attached_plugin (or VISDET_EXPORT_PLUGINS=visdet_attached_plugin)")
    with pytest.raises(MissingPluginError) as raised:
        verify(out)
    assert str(raised.value) == f"merged.onnx, attached loss loss_bbox: {hint}"
    capsys.readouterr()
    assert cli.main(["verify", str(out), "-q"]) == cli.EXIT_USAGE
    assert hint in capsys.readouterr().err
    try:  # with the plugin, it verifies
        assert cli.main(["--plugin", "visdet_attached_plugin", "verify", str(out), "-q"]) == 0
    finally:
        _unload_plugin("visdet_attached_plugin", "Attached", directory)
    # a model attached before the record: still readable, a failed artifact with a hint for a loss of one's own
    model = onnx.load(str(out))
    described = attached_losses(out)
    del described["loss_bbox"]["plugins"]
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, ATTACHED_METADATA_KEY: json.dumps(described)}
    )
    onnx.save(model, str(out))
    record = json.loads(manifest_path(out).read_text())
    record.update(losses=described, sha256=sha256(out))
    manifest_path(out).write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match=r"AttachedScaledGIoULoss is not registered here.*--plugin MODULE") as old:
        verify(out)
    assert not isinstance(old.value, MissingPluginError)


def _bundle_needing_a_missing_plugin(tmp_path: Path) -> Path:
    """A stand-in bundle (its manifest alone is read: the losses are rebuilt before the package) whose second entry
    is registered by a plugin that is not loaded."""
    from visdet_export.export.artifacts import write_manifest

    package = tmp_path / "bundle.pt2"
    package.write_bytes(b"not read")
    write_manifest(package, {"format": "pt2", "bundle": True, "inputs": [], "outputs": [], "entries": [
        {"name": "loss_cls", "config": {"type": "FocalLoss"}, "inputs": [], "outputs": []},
        {"name": "loss_vfl", "config": {"type": "GoneVarifocalLoss"}, "plugins": ["visdet_gone_plugin"],
         "inputs": [], "outputs": []},
    ]})
    return package


def test_cpp_bundle_check_without_the_plugin_names_it(tmp_path: Path) -> None:
    """check_pt2_bundle rebuilds each entry from the bundle's manifest, as verify does: an entry registered by a
    plugin that is not loaded names the plugin (the manifest's entries record it, see pt2's manifest), before any C++
    runs. The package is a stand-in: the losses are rebuilt before it is read."""
    from visdet_export import cpp

    package = _bundle_needing_a_missing_plugin(tmp_path)
    with pytest.raises(MissingPluginError) as raised:
        cpp.check_pt2_bundle(package, tmp_path / "no_program")
    assert str(raised.value) == (
        "bundle.pt2, entry loss_vfl: GoneVarifocalLoss is registered by the plugin module 'visdet_gone_plugin': "
        "pass --plugin visdet_gone_plugin (or VISDET_EXPORT_PLUGINS=visdet_gone_plugin)"
    )


def test_cpp_config_of_an_unloaded_plugin_says_to_pass_it(capsys: pytest.CaptureFixture[str]) -> None:
    """``visdet-export cpp --config`` of a loss of one's own without its plugin: a usage mistake (exit 2) naming
    --plugin, before anything is built."""
    assert cli.main(["cpp", "--config", json.dumps({"type": "GoneVarifocalLoss"})]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--config '{\"type\": \"GoneVarifocalLoss\"}' does not build a loss: " in err
    assert "GoneVarifocalLoss is not registered here" in err
    assert "name the module that registers it with --plugin MODULE (or VISDET_EXPORT_PLUGINS=MODULE)" in err
    # a typo of a registered loss: the closest name, as build_loss suggests it
    assert cli.main(["cpp", "--config", json.dumps({"type": "FocalLos"})]) == cli.EXIT_USAGE
    assert "FocalLos is not registered here. Did you mean FocalLoss?" in capsys.readouterr().err
    # two unknown types (a config of nested losses): both named, in the plural
    with pytest.raises(ArtifactError, match=r"^x.pt2, entry e: the manifest's config does not build a loss: "
                       r"GoneA, GoneB are not registered here\. Registered: "):
        build_recorded_loss(dict(type="GoneA", inner=dict(type="GoneB")), location="x.pt2, entry e")


def test_a_config_that_names_registered_types_is_refused_for_what_it_is_not_as_unregistered() -> None:
    """A recorded config of a registered loss that does not build (a misspelt argument) says why, after the
    location that begins the message, and does not claim the type is unregistered; without a location the message
    begins with the config. A type named twice (nested losses) is named once, in the singular."""
    with pytest.raises(ArtifactError) as raised:
        build_recorded_loss(dict(type="FocalLoss", gama=2.0), location="x.pt2")
    message = str(raised.value)
    assert message.startswith("x.pt2: the manifest's config does not build a loss: FocalLoss got unknown argument")
    assert "gama" in message and "not registered" not in message and "--plugin" not in message
    with pytest.raises(ArtifactError) as raised:
        build_recorded_loss(dict(type="FocalLoss", gama=2.0))
    assert str(raised.value).startswith("the manifest's config does not build a loss: FocalLoss got unknown argument")
    with pytest.raises(ArtifactError, match=r"^the manifest's config does not build a loss: GoneA is not registered "
                       r"here\. Registered: "):
        build_recorded_loss(dict(type="GoneA", inner=dict(type="GoneA")))


def test_a_loss_registered_by_several_plugin_modules_names_each_to_pass() -> None:
    """A manifest recording two plugin modules (a loss of one's own holding another's): both named, in the plural,
    each with its own --plugin, and the variable's comma-separated value."""
    with pytest.raises(MissingPluginError) as raised:
        build_recorded_loss(dict(type="GoneOuter", inner=dict(type="GoneInner")), ["outer_plugin", "inner_plugin"],
                            location="x.pt2")
    assert str(raised.value) == (
        "x.pt2: GoneOuter, GoneInner are registered by the plugin modules 'outer_plugin', 'inner_plugin': pass "
        "--plugin outer_plugin --plugin inner_plugin (or VISDET_EXPORT_PLUGINS=outer_plugin,inner_plugin)"
    )


def test_cpp_command_names_the_bundle_entry_without_its_plugin_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m visdet_export.cpp --package BUNDLE``: each entry's loss is rebuilt before the C++ program is
    built, and an entry whose plugin is not loaded is a usage mistake (exit 2) naming the bundle, the entry and the
    plugin to pass. No toolchain needed: the build is never reached."""
    from visdet_export import cpp

    package = _bundle_needing_a_missing_plugin(tmp_path)
    monkeypatch.setattr(cpp, "build_runner", lambda *a, **k: pytest.fail("built before the packages were checked"))
    with pytest.raises(SystemExit) as exit_:
        cpp.main(["--package", str(package)])
    assert exit_.value.code == 2
    assert ("bundle.pt2, entry loss_vfl: GoneVarifocalLoss is registered by the plugin module 'visdet_gone_plugin': "
            "pass --plugin visdet_gone_plugin") in capsys.readouterr().err


def test_cpp_module_refuses_a_plugin_that_does_not_import_before_building(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m visdet_export.cpp --plugin MODULE`` of a module that does not import: a usage mistake (exit 2)
    naming it, before the program is built (so without a C++ toolchain too)."""
    from visdet_export import cpp

    monkeypatch.setattr(cpp, "build_runner", lambda *a, **k: pytest.fail("built before the plugins were loaded"))
    with pytest.raises(SystemExit) as exit_:
        cpp.main(["--plugin", "visdet_no_such_plugin"])
    assert exit_.value.code == 2 and "visdet_no_such_plugin" in capsys.readouterr().err


def test_cpp_module_takes_plugin_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m visdet_export.cpp --plugin MODULE`` imports the module before reading --config, as the CLI's
    global --plugin does: a loss of one's own runs in C++ against eager. A module that fails to import is a usage
    mistake (exit 2) naming it."""
    from visdet_export import cpp

    problem = cpp.toolchain_problem()
    if problem and os.environ.get("VISDET_EXPORT_REQUIRE_CPP") != "1":
        pytest.skip(f"C++ consumer not built: {problem}")
    with pytest.raises(SystemExit) as exit_:
        cpp.main(["--plugin", "visdet_no_such_plugin"])
    assert exit_.value.code == 2 and "visdet_no_such_plugin" in capsys.readouterr().err
    directory = tmp_path / "plugin"
    directory.mkdir()
    (directory / "visdet_cpp_plugin.py").write_text(PLUGIN_SOURCE.format(prefix="Cpp"))
    monkeypatch.chdir(directory)
    try:
        code = cpp.main(["--plugin", "visdet_cpp_plugin", "--config", json.dumps({"type": "CppScaledGIoULoss"})])
    finally:
        _unload_plugin("visdet_cpp_plugin", "Cpp", directory)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "CppScaledGIoULoss" in out and " ok " in out
