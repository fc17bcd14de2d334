"""Named runtime adapters: one loss, one input spec, one way of running it.

Every adapter turns ``(loss, spec, names)`` into a :class:`LossRunner`, a callable
``runner(inputs, reduction_override=None) -> Tensor`` over named inputs (a mapping as drawn by
``spec.sample``). The tests and ``python -m visdet_export check`` share them:

* ``eager``: the module as is.
* ``compile``: ``torch.compile(fullgraph=True, dynamic=True)`` (inductor by default). Every axis the spec calls
  ``N`` is marked unbacked with one shared ``shape_id`` before each call, so one graph serves every N, 0 and 1
  included (a backed size would get 0/1 specialisation guards and recompile for N = 0 and N = 1).
* ``script``: ``torch.jit.script`` of the module, saved and loaded back (the round trip a deployment makes).
* ``onnx``: :func:`visdet_export.export.onnx.export_onnx` + onnxruntime (imported on first use).
* ``pt2``: :func:`visdet_export.export.pt2.export_pt2` (torch.export + AOTInductor) + ``aoti_load_package``,
  or one entry of a bundle of many losses in one package (:func:`visdet_export.export.pt2.export_pt2_bundle`).

``eager``, ``compile`` and ``script`` are differentiable (autograd through ``pred``) and accept
``reduction_override``; ``onnx`` and ``pt2`` run a fixed graph of the inputs in ``names`` (forward only).
"""

from __future__ import annotations

import io
import itertools
import tempfile
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .specs import LossSpec

#: The graph-input convention of exported artifacts: required inputs plus these optional ones.
DEFAULT_OPTIONAL_INPUTS = ("weight", "avg_factor")


class LossRunner:
    """``runner(inputs, reduction_override=None) -> loss``: one loss in one runtime, over named inputs."""

    def __init__(
        self,
        runtime: str,
        fn: Callable[[Mapping[str, Tensor], Optional[str]], Tensor],
        names: Sequence[str],
        *,
        differentiable: bool,
        fixed_graph: bool,
        keep_alive: Any = None,
        graph_count: Optional[Callable[[], int]] = None,
    ) -> None:
        self.runtime = runtime
        self.names = tuple(names)
        self.differentiable = differentiable
        self.fixed_graph = fixed_graph
        self._fn = fn
        self._keep_alive = keep_alive  # temporary directories of exported artifacts
        self._graph_count = graph_count

    def __call__(self, inputs: Mapping[str, Tensor], reduction_override: Optional[str] = None) -> Tensor:
        if self.fixed_graph and reduction_override is not None:
            raise ValueError(f"the {self.runtime} runtime runs a fixed graph; reduction_override is not an input")
        missing = [name for name in self.names if name not in inputs]
        if self.fixed_graph and missing:
            raise ValueError(f"the {self.runtime} graph needs the input(s) {missing}")
        return self._fn({name: inputs[name] for name in self.names if name in inputs}, reduction_override)

    def graph_count(self) -> int:
        """Compiled graphs so far (``compile`` only; 1 for the other runtimes once built)."""
        return 1 if self._graph_count is None else self._graph_count()

    def __repr__(self) -> str:
        return f"LossRunner({self.runtime!r}, inputs={list(self.names)})"


AdapterBuilder = Callable[..., LossRunner]


@dataclass(frozen=True)
class Runtime:
    """A named adapter: ``build(loss, spec, names, **options) -> LossRunner``."""

    name: str
    description: str
    build: AdapterBuilder
    differentiable: bool
    fixed_graph: bool


def default_names(
    loss: nn.Module, spec: LossSpec, optional_inputs: Sequence[str] = DEFAULT_OPTIONAL_INPUTS
) -> list[str]:
    """Required inputs plus the optional ones requested, in spec order, as exports take them (no ``avg_factor``
    for reduction "sum", which refuses it, or "none", which ignores it)."""
    from .export.artifacts import usable_optional_inputs

    wanted = set(usable_optional_inputs(loss, optional_inputs))
    return [t.name for t in spec.inputs if not t.optional or t.name in wanted]


# --- eager -----------------------------------------------------------------------------------------------------


def eager_runner(loss: nn.Module, spec: LossSpec, names: Sequence[str]) -> LossRunner:
    """The loss itself as a runner: the reference every other runtime is compared with."""
    return LossRunner(
        "eager",
        lambda inputs, override: spec.call(loss, inputs, override),
        names,
        differentiable=True,
        fixed_graph=False,
    )


# --- torch.compile ---------------------------------------------------------------------------------------------


def mark_sample_dims(spec: LossSpec, inputs: Mapping[str, Any]) -> None:
    """Mark every axis the spec calls "N" unbacked, all sharing one symbol (``shape_id="N"``).

    Unbacked sizes get no 0/1 specialisation, so N = 0 and N = 1 reuse the graph compiled for large N; the shared
    shape id tells the compiler all those axes are equal (checked at run time), so shape checks in the losses
    (``pred.shape != target.shape``) need no guard.
    """
    by_name = {t.name: t for t in spec.inputs}
    for name, value in inputs.items():
        if isinstance(value, Tensor) and name in by_name:
            for axis, size in enumerate(by_name[name].shape):
                if size == "N":
                    torch._dynamo.decorators.mark_unbacked(value, axis, shape_id="N")


#: Numbers the copies of :func:`fresh_function`.
_FRESH_COPIES = itertools.count()


def fresh_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with a code object and a name of its own: Dynamo keeps compiled graphs per code object (and
    counts its recompile limit there), and its automatic-dynamic state (which inputs changed between calls) by the
    code's file, first line and name, so every compiled copy has its own instead of sharing them across losses."""
    code = fn.__code__
    name = f"{code.co_name}_{next(_FRESH_COPIES)}"
    copy = types.FunctionType(code.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def graphs_kept(function: Callable[..., Any]) -> int:
    """The graphs Dynamo keeps for ``function``'s code: one per guard set that failed the others."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(function.__code__))


def compile_runner(
    loss: nn.Module,
    spec: LossSpec,
    names: Sequence[str],
    *,
    backend: Any = "inductor",
    mark_unbacked: bool = True,
) -> LossRunner:
    """``torch.compile(fullgraph=True, dynamic=True)`` of ``spec.call(loss, ...)``.

    Args:
        backend: a dynamo backend name or callable (``"inductor"``, ``"aot_eager"``, a CompileCounter, ...).
        mark_unbacked: mark the sample axes unbacked before each call (see :func:`mark_sample_dims`); without it,
            N = 0 and N = 1 each add a graph.
    """

    def call_loss(inputs: Mapping[str, Tensor], reduction_override: Optional[str]) -> Tensor:
        return spec.call(loss, inputs, reduction_override)

    function = fresh_function(call_loss)
    compiled = torch.compile(function, backend=backend, fullgraph=True, dynamic=True)

    def run(inputs: Mapping[str, Tensor], reduction_override: Optional[str]) -> Tensor:
        if mark_unbacked:
            mark_sample_dims(spec, inputs)
        return compiled(inputs, reduction_override)

    return LossRunner(
        "compile", run, names, differentiable=True, fixed_graph=False, graph_count=lambda: graphs_kept(function)
    )


# --- TorchScript -----------------------------------------------------------------------------------------------


def script_runner(
    loss: nn.Module, spec: LossSpec, names: Sequence[str], *, device: Optional[torch.device] = None
) -> LossRunner:
    """``torch.jit.script`` of the module, saved to memory and loaded back (onto ``device``, default the CPU)."""
    from .export.torchscript import load_scripted, save_scripted, script_loss
    from .registry import loss_config

    buffer = io.BytesIO()
    save_scripted(script_loss(loss), buffer, loss_config(loss))
    buffer.seek(0)
    loaded = load_scripted(buffer)
    if device is not None:
        loaded = loaded.to(device)
    return LossRunner(
        "script",
        lambda inputs, override: spec.call(loaded, inputs, override),
        names,
        differentiable=True,
        fixed_graph=False,
        keep_alive=loaded,
    )


# --- exported artifacts ----------------------------------------------------------------------------------------


def _optional_of(spec: LossSpec, names: Sequence[str]) -> list[str]:
    return [t.name for t in spec.inputs if t.optional and t.name in names]


def onnx_runner(
    loss: nn.Module, spec: LossSpec, names: Sequence[str], *, joint: bool = False, verify: bool = False
) -> LossRunner:
    """Export to ONNX in a temporary directory and run it in onnxruntime (``names`` are the graph inputs); a
    ``joint`` graph (loss and gradient, for distillation) runs too, the runner returning its loss output."""
    from .export.onnx import export_onnx, load_runner

    scratch = tempfile.TemporaryDirectory(prefix="visdet_onnx_")
    path = export_onnx(
        loss, Path(scratch.name) / "loss.onnx", variant=spec.variant, optional_inputs=_optional_of(spec, names),
        joint=joint, verify=verify,
    )
    run = load_runner(path)
    graph_names = list(getattr(run, "input_names", names))
    runner = LossRunner(
        "onnx", lambda inputs, override: run(inputs)[0], graph_names, differentiable=False, fixed_graph=True,
        keep_alive=scratch,
    )
    runner.run_all = run  # type: ignore[attr-defined]  # every output (loss, grad_pred for joint graphs)
    runner.joint = joint  # type: ignore[attr-defined]
    return runner


def pt2_runner(
    loss: nn.Module,
    spec: LossSpec,
    names: Sequence[str],
    *,
    joint: bool = False,
    verify: bool = False,
    path: Optional[Path] = None,
    bundle: Any = None,
    entry: Optional[str] = None,
) -> LossRunner:
    """Export a ``.pt2`` AOTInductor package (to ``path`` or a temporary directory) and run it; a ``joint``
    package (loss and gradient) runs too, the runner returning its loss output.

    With ``bundle`` (a bundle loaded by :func:`visdet_export.export.pt2.load_runner`) nothing is exported: the
    runner runs the bundle's entry ``entry``, which must be a package of this loss.
    """
    from .export.artifacts import read_manifest
    from .export.pt2 import entry_runner, export_pt2, load_runner

    if bundle is not None:
        if entry is None:
            raise ValueError("a bundle runner needs the entry name")
        run = entry_runner(bundle, entry)
        recorded = run.entry
        if recorded["loss_type"] != spec.loss_type or recorded["variant"] != spec.variant:
            raise ValueError(
                f"bundle entry {entry!r} is {recorded['loss_type']} ({recorded['variant']}), not "
                f"{spec.loss_type} ({spec.variant})"
            )
        runner = LossRunner(
            "pt2", lambda inputs, override: run(inputs)[0], run.input_names, differentiable=False, fixed_graph=True,
            keep_alive=bundle,
        )
        runner.path = bundle.path  # type: ignore[attr-defined]
        runner.run_all = run  # type: ignore[attr-defined]
        runner.joint = bool(recorded["joint"])  # type: ignore[attr-defined]
        return runner

    scratch = None
    if path is None:
        scratch = tempfile.TemporaryDirectory(prefix="visdet_pt2_")
        path = Path(scratch.name) / "loss.pt2"
    written = export_pt2(
        loss, path, variant=spec.variant,
        optional_inputs=_optional_of(spec, names),
        joint=joint,
        verify=verify,
        overwrite=True,
    )
    manifest = read_manifest(written)
    run = load_runner(written, manifest)
    runner = LossRunner(
        "pt2",
        lambda inputs, override: run(inputs)[0],
        run.input_names,
        differentiable=False,
        fixed_graph=True,
        keep_alive=scratch,
    )
    runner.path = written  # type: ignore[attr-defined]
    runner.run_all = run  # type: ignore[attr-defined]  # every output (loss, grad_pred for joint packages)
    runner.joint = joint  # type: ignore[attr-defined]
    return runner


RUNTIMES: dict[str, Runtime] = {
    runtime.name: runtime
    for runtime in (
        Runtime("eager", "eager PyTorch", eager_runner, True, False),
        Runtime("compile", "torch.compile(fullgraph=True, dynamic=True)", compile_runner, True, False),
        Runtime("script", "torch.jit.script + save/load", script_runner, True, False),
        Runtime("onnx", "torch.onnx.export(dynamo=True) + onnxruntime", onnx_runner, False, True),
        Runtime("pt2", "torch.export + AOTInductor .pt2", pt2_runner, False, True),
    )
}


def get_runtime(name: str) -> Runtime:
    """The :class:`Runtime` named ``name`` (:data:`RUNTIMES`); ValueError naming the choices otherwise."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}") from None


def build_runner(
    runtime: str, loss: nn.Module, spec: LossSpec, names: Optional[Sequence[str]] = None, **options: Any
) -> LossRunner:
    """The :class:`LossRunner` of ``loss`` in ``runtime`` (``names`` default: :func:`default_names`)."""
    names = default_names(loss, spec) if names is None else list(names)
    return get_runtime(runtime).build(loss, spec, names, **options)


__all__ = [
    "DEFAULT_OPTIONAL_INPUTS",
    "LossRunner",
    "RUNTIMES",
    "Runtime",
    "build_runner",
    "compile_runner",
    "default_names",
    "eager_runner",
    "get_runtime",
    "mark_sample_dims",
    "onnx_runner",
    "pt2_runner",
    "script_runner",
]
