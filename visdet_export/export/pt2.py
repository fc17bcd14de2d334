"""torch.export + AOTInductor export of a loss (optionally with its gradient) into a ``.pt2`` package.

:func:`export_pt2` traces the loss with ``torch.export`` under the calling convention of :mod:`.joint` (inputs
positional in spec order, one dynamic sample count ``N`` with min 0 shared by every N-sized input, every other
size fixed), compiles the program ahead of time with AOTInductor (``torch._inductor.aoti_compile_and_package``)
and writes the package atomically with a manifest beside it. The package loads with
``torch._inductor.aoti_load_package`` in Python or ``torch::inductor::AOTIModelPackageLoader`` in C++ and needs
neither this package nor Python source.

N = 0 and N = 1: a backed size symbol with ``min=0`` still gets 0/1 specialisation guards (``Ne(N, 1)`` from
stride computations of broadcasts), which either fail the export or bake ``N >= 2`` into the package's input
checks. Tracing under ``torch.fx.experimental._config.backed_size_oblivious = True`` gives ``N`` the range
[0, inf) with size-oblivious reasoning, so one package serves N = 0, 1 and any larger N.

With ``joint=True`` the package computes ``(loss, d loss.sum() / d pred)`` from the graph that
:func:`visdet_export.export.joint.joint_module` traces (forward and backward in one aten graph).

.. warning:: A ``.pt2`` package holds compiled native code: loading it runs that code. Load only trusted files.

Bundles: :func:`export_pt2_bundle` puts several losses (all the losses of a detector recipe, or every
configuration a test suite checks) into ONE package: one module whose ``forward`` takes every entry's inputs
(named ``"<entry>/<input>"`` in the manifest) and returns every entry's outputs (``"<entry>/loss"``, and
``"<entry>/grad_pred"`` for joint entries), each entry with its own dynamic sample count ``N_<entry>`` (min 0).
:func:`load_runner` runs the whole bundle, or one entry with ``entry=`` (the other entries get empty inputs).

Cost, measured on a 2-core CPU with a cold inductor cache (torch 2.13): a single package takes 7-10 s (about
20 s for the first one in a process: CPU ISA checks and precompiled headers); one joint package per
configuration for all 22 representative configurations 177 s; one joint bundle of the same 22 configurations
65-120 s depending on load (10 s of it torch.export, the rest inductor lowering and the C++ compile), forward
only about 60 s.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..registry import loss_config
from ..specs import SAMPLES, LossSpec, SampleOptions, spec_for
from .artifacts import (
    COMPILER_MODULES,
    ArtifactError,
    ExportPlan,
    LossOrConfig,
    as_loss,
    atomic_output,
    build_recorded_loss,
    check_output_path,
    describe_inputs,
    evaluation_mode,
    first_line,
    manifest_path,
    one_export_at_a_time,
    output_shapes,
    plugin_modules,
    raise_hidden_interrupt,
    shape_mismatch,
    usable_optional_inputs,
    write_manifest,
)
from .joint import DEFAULT_OPTIONAL_INPUTS, dynamic_dims, dynamic_shapes, example_inputs, joint_module, select_inputs
from .verify import TOLERANCES, check_parity

#: Sizes the export-time parity check runs at (capped for inputs with many elements per sample).
EXPORT_PARITY_SIZES = (0, 1, 64, 1000)

#: Imported before the first export with a Ctrl-C held back (``artifacts.import_uninterrupted``): the compiler stack
#: and inductor's compiler (0.4 s more).
PT2_EXPORTER_MODULES = (*COMPILER_MODULES, "torch._inductor.compile_fx")

Runner = Any  # Callable[[Mapping[str, Tensor]], list[Tensor]] with ``input_names`` / ``output_names`` attributes


def export_program(
    loss: nn.Module, spec: LossSpec, names: Sequence[str], *, joint: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` of the loss (or its joint loss + gradient graph) with a dynamic N in [0, inf) and dynamic
    free sizes (classes, bins, mask sides) from :meth:`LossSpec.smallest_size` (1; DFL's bins 2)."""
    names = list(names)
    example = example_inputs(loss, spec, names)
    module = joint_module(loss, spec, names, example=example) if joint else spec.bind(loss, names)
    return _export(module, example, dynamic_shapes(spec, names), f"{spec.loss_type} ({spec.variant})")


@contextlib.contextmanager
def _size_oblivious() -> Iterator[None]:
    """Sizes 0 and 1 treated like any other (``backed_size_oblivious``), and no guard from the example's sizes.

    Around AOTInductor's compile too: its code generation otherwise guards on the example (``C <= 4096`` from
    a choice of summation helper, ``N >= 2`` from broadcast strides), which the package's optional input checks
    (``AOTI_RUNTIME_CHECK_INPUTS=1``) then enforce, refusing N = 0, N = 1, C = 1 and sizes past 4096."""
    from torch.fx.experimental import _config as fx_config

    # ``patch`` is installed at import by torch's config-module machinery, which type checkers do not see
    with fx_config.patch(backed_size_oblivious=True), warnings.catch_warnings():  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        yield


def _export(module: nn.Module, example: Sequence[Tensor], shapes: Any, what: str) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) under :func:`_size_oblivious`, its float32 totals accumulated in float64."""
    with _size_oblivious():
        try:
            with evaluation_mode(module):
                program = torch.export.export(module, tuple(example), dynamic_shapes=shapes, strict=False)
            return program.run_decompositions({torch.ops.aten.sum.default: _sum_accumulated_in_float64})
        except Exception as exc:  # torch.export raises many types; say which loss and why
            raise_hidden_interrupt(exc)
            raise ArtifactError(f"torch.export of {what} failed: {first_line(exc)}") from exc


def _sum_accumulated_in_float64(values: Tensor, dtype: Optional[torch.dtype] = None) -> Any:
    """A float32 total as ``values.sum(dtype=torch.float64)``, rounded back.

    AOTInductor accumulates a float32 sum of a symbolic size in one float32 accumulator per vector lane: it picks
    its cascade summation only for sizes known to exceed 4096, which the size-oblivious compile never knows, so a
    mean over 2M boxes was 2.3e-4 off (eager and ``torch.compile``: ~3e-8). The float64 accumulator keeps it at
    ~2e-8 at no measurable cost (the reduction is fused into the loss's kernel; GIoU at 2M boxes, focal at
    100k x 80). Other sums keep ATen's own lowering (``NotImplemented``)."""
    if dtype is not None or values.dtype != torch.float32:
        return NotImplemented
    return torch.ops.aten.sum.default(values, dtype=torch.float64).to(torch.float32)


def write_package(
    program: torch.export.ExportedProgram,
    target: Path,
    *,
    overwrite: bool,
    what: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    check: Optional[Callable[[Runner], dict[str, Any]]],
) -> Optional[dict[str, Any]]:
    """AOTInductor-compile ``program`` and put the package at ``target`` only once ``check`` passed on it.

    The package is built and loaded under a ``.pt2`` name in a scratch directory (the loader insists on the
    suffix), handed to ``check`` as a runner, then copied into place atomically. Returns ``check``'s parity record
    (None without ``check``).
    """
    with tempfile.TemporaryDirectory(prefix="visdet_pt2_") as scratch:
        # Lowering guards N >= 2 even so (a view's strides in `unbind`); verification covers N = 0 and 1, and
        # the manifest states the least sizes, which load_runner checks.
        with _size_oblivious(), torch._inductor.config.patch({"aot_inductor.check_lowerbound": False}):
            try:
                built = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(scratch, "p.pt2"))
            except Exception as exc:
                raise_hidden_interrupt(exc)
                raise ArtifactError(f"AOTInductor compilation of {what} failed: {first_line(exc)}") from exc
        parity = None
        if check is not None:
            package = torch._inductor.aoti_load_package(str(built))
            parity = check(_runner(package, input_names, output_names, target.name))
        with atomic_output(target, overwrite) as tmp:
            shutil.copyfile(built, tmp)
    return parity


def _runner(
    package: Any,
    names: Sequence[str],
    outputs: Sequence[str],
    label: str,
    described: Optional[Sequence[Mapping[str, Any]]] = None,
    dynamic_dims: Optional[Mapping[str, Mapping[str, int]]] = None,
) -> Runner:
    """A runner over ``package``; with the manifest's ``described`` inputs (and ``dynamic_dims``), each call checks
    its inputs first (:func:`check_inputs`)."""
    names = list(names)
    loaded = [package]

    def run(inputs: Mapping[str, Tensor]) -> list[Tensor]:
        if not loaded:
            raise ArtifactError(f"{label} was released at interpreter exit")
        missing = [name for name in names if name not in inputs]
        if missing:
            raise ArtifactError(f"missing input(s) {missing} for {label} (inputs: {names})")
        if described is not None:
            check_inputs(described, [inputs[name] for name in names], label, dynamic_dims)
        result = loaded[0](*[inputs[name].contiguous() for name in names])
        return list(result) if isinstance(result, (list, tuple)) else [result]

    run.input_names = names  # type: ignore[attr-defined]
    run.output_names = list(outputs)  # type: ignore[attr-defined]
    # The loader deletes its extracted copy of the package (/tmp/aotinductor_*) when it is destroyed, which a runner
    # still held at exit may never be: what a module's globals hold is not always destroyed then (never, once
    # Dynamo compiled a function of that module, as a training script's step). So the runner lets go of it at exit.
    weakref.finalize(run, loaded.clear)
    return run


def check_inputs(
    described: Sequence[Mapping[str, Any]],
    tensors: Sequence[Tensor],
    label: str,
    dynamic_dims: Optional[Mapping[str, Mapping[str, int]]] = None,
) -> None:
    """Raise :class:`ArtifactError` unless ``tensors`` have the dtypes and sizes ``described`` (manifest inputs)
    give, each symbol (N, C, ...) one size across them and none below its ``dynamic_dims`` minimum (the range
    the package was compiled for: at least one class, two DFL bins). An AOTInductor package reads its inputs'
    memory as what it was compiled for and checks nothing unless ``AOTI_RUNTIME_CHECK_INPUTS=1`` is set (which
    checks no minimum either): int32 labels, float64 logits, a weight one row short or a DFL of one bin give wrong
    numbers or index errors (or reads past an input's end), not an error naming the input."""
    symbols: dict[str, tuple[int, str]] = {}
    for item, tensor in zip(described, tensors, strict=True):
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != item["dtype"]:
            raise ArtifactError(f"{label}: input {item['name']!r} is {dtype}; the package takes {item['dtype']}")
        mismatch = shape_mismatch(item["name"], item["shape"], tensor.shape, symbols)
        if mismatch:
            raise ArtifactError(f"{label}: input {mismatch}")
    for symbol, (size, name) in symbols.items():
        least = int((dynamic_dims or {}).get(symbol, {}).get("min", 0))
        if size < least:
            raise ArtifactError(f"{label}: input {name!r} has {symbol} = {size}; the package takes {symbol} >= {least}")


def load_runner(
    path: str | os.PathLike[str], manifest: Optional[Mapping[str, Any]] = None, *, entry: Optional[str] = None
) -> Runner:
    """A runner for the ``.pt2`` package at ``path``: named tensors in, the package's outputs as a list out.

    Input order and output names come from ``manifest`` (read from ``<path>.json`` if not given). For a bundle
    (:func:`export_pt2_bundle`) the runner takes ``"<entry>/<input>"`` names and returns every entry's outputs;
    with ``entry`` it runs that one entry with its plain input names (the others get empty inputs).

    .. warning:: a package is compiled native code; loading it runs that code. Use it only on trusted files.
    """
    from .artifacts import read_manifest

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is not a file")
    manifest = read_manifest(path) if manifest is None else manifest
    names = [str(entry["name"]) for entry in manifest["inputs"]]
    outputs = [str(name) for name in manifest.get("outputs", ["loss"])]
    try:
        # The loader takes a path ending in ".pt2" or a buffer.
        source: Any = str(path) if path.suffix == ".pt2" else io.BytesIO(path.read_bytes())
        package = torch._inductor.aoti_load_package(source)
    except Exception as exc:
        raise ArtifactError(f"{path.name} does not load as an AOTInductor package: {exc}") from exc
    runner = _runner(package, names, outputs, path.name, manifest["inputs"], manifest.get("dynamic_dims"))
    runner.manifest = dict(manifest)
    runner.path = path
    return runner if entry is None else entry_runner(runner, entry)


@one_export_at_a_time(*PT2_EXPORTER_MODULES)
def export_pt2(
    loss_or_cfg: LossOrConfig,
    path: str | os.PathLike[str],
    *,
    variant: Optional[str] = None,
    optional_inputs: Sequence[str] = DEFAULT_OPTIONAL_INPUTS,
    joint: bool = False,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a loss with torch.export + AOTInductor to the package ``path`` and write ``<path>.json``.

    Args:
        loss_or_cfg: a built loss module, or a config (``dict(type="FocalLoss", gamma=2.0)``).
        path: the ``.pt2`` file to write; its directory must exist.
        variant: the input layout where a loss has several (``spec_for``).
        optional_inputs: optional inputs that become package inputs (default ``weight`` and ``avg_factor``;
            those a loss does not take are skipped, and ``avg_factor`` is dropped for ``reduction="sum"``).
        joint: also return ``grad_pred``, the gradient of ``loss.sum()`` with respect to ``pred``.
        verify: load the written package and compare it with eager (autograd for ``joint``) at N = 0, 1, 64 and
            1000 before it is put in place; the parity reached goes into the manifest.
        overwrite: replace an existing file (and manifest).

    Returns:
        The path written.

    Raises:
        ArtifactError: the path exists (without ``overwrite``), is a directory or a symlink; the export, the
            compilation or the parity check failed. Nothing is left behind on failure.
    """
    plan = ExportPlan.prepare(
        loss_or_cfg, path, variant=variant, optional_inputs=optional_inputs, joint=joint, overwrite=overwrite
    )
    loss, spec, names, outputs, target = plan.loss, plan.spec, plan.names, plan.outputs, plan.target
    sizes = spec.capped_sizes(EXPORT_PARITY_SIZES)

    def check(runner: Runner) -> dict[str, Any]:
        return check_parity(runner, loss, spec, names, joint=joint, sizes=sizes, seed=0, **TOLERANCES["pt2"])

    parity = write_package(
        export_program(loss, spec, names, joint=joint),
        target,
        overwrite=overwrite,
        what=spec.loss_type,
        input_names=names,
        output_names=outputs,
        check=check if verify else None,
    )
    fields = plan.manifest_fields("pt2", parity, dynamic_dims=dynamic_dims(spec, names), runs_code=True)
    write_manifest(target, fields, overwrite=True)
    return target


# --- bundles: several losses in one package -----------------------------------------------------------------------

#: Separator between an entry's name and its input / output name in a bundle (``"focal/pred"``).
BUNDLE_SEP = "/"


@dataclass(frozen=True)
class BundleEntry:
    """One loss of a bundle: its name, built module, spec, graph inputs (un-namespaced) and whether it is joint."""

    name: str
    loss: nn.Module
    spec: LossSpec
    names: tuple[str, ...]
    joint: bool

    @property
    def outputs(self) -> list[str]:
        return ["loss", f"grad_{self.spec.pred}"] if self.joint else ["loss"]

    @property
    def dims(self) -> dict[str, str]:
        """The bundle's name of each symbol of the entry's shapes: ``N_<entry>``, ``C_<entry>``, ..."""
        return {symbol: f"{symbol}_" + re.sub(r"\W", "_", self.name) for symbol in self.spec.symbols(self.names)}


class BundleModule(nn.Module):
    """``forward(*tensors)``: every entry's inputs back to back, every entry's outputs back to back (a flat tuple)."""

    def __init__(self, parts: Sequence[nn.Module], counts: Sequence[int]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.counts = tuple(int(c) for c in counts)

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        outputs: list[Tensor] = []
        start = 0
        for part, count in zip(self.parts, self.counts, strict=True):
            result = part(*tensors[start : start + count])
            start += count
            outputs.extend(result if isinstance(result, (tuple, list)) else (result,))
        return tuple(outputs)


BundleSource = Union[LossOrConfig, tuple[LossOrConfig, Optional[str]]]


def bundle_entries(
    losses: Mapping[str, BundleSource],
    *,
    joint: Union[bool, Sequence[str]] = False,
    optional_inputs: Sequence[str] = DEFAULT_OPTIONAL_INPUTS,
) -> list[BundleEntry]:
    """Build the entries of a bundle: ``losses`` maps an entry name to a loss / config, or ``(loss, variant)``."""
    if not losses:
        raise ValueError("a bundle needs at least one loss")
    if isinstance(joint, str):
        joint = [joint]
    joint_names = set(losses) if joint is True else set() if joint is False else set(joint)
    unknown = sorted(joint_names - set(losses))
    if unknown:
        raise ValueError(f"joint names {unknown} are not entries of the bundle ({', '.join(losses)})")
    entries = []
    for name, source in losses.items():
        if not name or BUNDLE_SEP in name:
            raise ValueError(f"bundle entry names must be non-empty and contain no {BUNDLE_SEP!r}: {name!r}")
        variant = None
        if isinstance(source, tuple):
            source, variant = source
        loss = as_loss(source)
        spec = spec_for(loss, variant)
        names = tuple(select_inputs(spec, usable_optional_inputs(loss, optional_inputs)))
        entries.append(BundleEntry(name, loss, spec, names, name in joint_names))
    dims = [entry.dims[SAMPLES] for entry in entries]
    if len(set(dims)) != len(dims):
        raise ValueError(f"bundle entry names collide once made identifiers: {dims}")
    return entries


def export_bundle_program(entries: Sequence[BundleEntry]) -> torch.export.ExportedProgram:
    """``torch.export`` of every entry in one graph, each with its own dynamic sample count (``N_<name>``, min 0)."""
    parts: list[nn.Module] = []
    example: list[Tensor] = []
    shapes: list[dict[int, Any]] = []
    for entry in entries:
        names = list(entry.names)
        inputs = example_inputs(entry.loss, entry.spec, names)
        parts.append(
            joint_module(entry.loss, entry.spec, names, example=inputs)
            if entry.joint
            else entry.spec.bind(entry.loss, names)
        )
        example.extend(inputs)
        shapes.extend(dynamic_shapes(entry.spec, names, entry.dims)[0])
    module = BundleModule(parts, [len(entry.names) for entry in entries])
    return _export(module, example, (tuple(shapes),), f"the bundle ({', '.join(e.name for e in entries)})")


def _bundle_manifest_entries(entries: Sequence[BundleEntry]) -> list[dict[str, Any]]:
    return [
        {
            "name": entry.name,
            "config": loss_config(entry.loss),
            **({"plugins": plugins} if (plugins := plugin_modules(entry.loss)) else {}),
            "loss_type": entry.spec.loss_type,
            "variant": entry.spec.variant,
            "joint": entry.joint,
            "dim": entry.dims[SAMPLES],
            "dims": entry.dims,
            "inputs": describe_inputs(entry.spec, list(entry.names), torch.float32, fixed_graph=True),
            "outputs": entry.outputs,
            "output_shapes": output_shapes(entry.loss, entry.spec, entry.names, entry.outputs),
        }
        for entry in entries
    ]


def _entry_dims(entry: Mapping[str, Any]) -> dict[str, str]:
    """A bundle manifest entry's names of its symbols (manifests before the free sizes name N alone)."""
    return dict(entry.get("dims", {SAMPLES: entry["dim"]}))


def _namespaced(entry_name: str, name: str) -> str:
    return f"{entry_name}{BUNDLE_SEP}{name}"


def _flat_io(manifest_entries: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    inputs = [
        {
            **item,
            "name": _namespaced(entry["name"], item["name"]),
            "shape": [_entry_dims(entry).get(d, d) if isinstance(d, str) else d for d in item["shape"]],
        }
        for entry in manifest_entries
        for item in entry["inputs"]
    ]
    outputs = [_namespaced(entry["name"], out) for entry in manifest_entries for out in entry["outputs"]]
    return inputs, outputs


def bundle_parity(
    runner: Runner,
    entries: Sequence[BundleEntry],
    sizes: Sequence[int],
    *,
    seed: int = 0,
    rtol: float,
    atol: float,
    free_sizes: Optional[Mapping[str, Mapping[str, int]]] = None,
) -> dict[str, Any]:
    """Run the bundle at each size (every entry at that size, capped per entry as :meth:`LossSpec.capped`) and
    compare every output with eager (autograd for joint entries), and once more at N = 7 with every entry's
    ``free_sizes[entry]`` (by default :meth:`LossSpec.smaller_sizes`) where an entry has some. Returns the parity
    record per entry; raises :class:`ArtifactError` naming the entry, size and output that differ."""
    from .joint import eager_joint
    from .verify import SMALLER_SIZES_N, compare

    other = {
        entry.name: dict(entry.spec.smaller_sizes() if free_sizes is None else free_sizes.get(entry.name, {}))
        for entry in entries
    }
    record: dict[str, Any] = {entry.name: {"sizes": [], "max_abs_err": 0.0, "max_rel_err": 0.0} for entry in entries}
    checks = [(int(n), False) for n in sizes]
    if any(other.values()):
        checks.append((SMALLER_SIZES_N, True))
    for index, (n, smaller) in enumerate(checks):
        feed: dict[str, Tensor] = {}
        expected: dict[str, Tensor] = {}
        for entry in entries:
            count = min(n, entry.spec.capped(1 << 62))
            options = SampleOptions(sizes=other[entry.name] if smaller else {})
            if not smaller:
                record[entry.name]["sizes"].append(count)
            elif options.sizes:
                record[entry.name]["free_sizes"] = options.sizes
            drawn = entry.spec.sample(
                entry.loss, count, seed=seed + index, options=options, include=list(entry.names)
            )
            inputs = {name: drawn[name] for name in entry.names}
            if entry.joint:
                values = list(eager_joint(entry.loss, entry.spec, inputs))
            else:
                with torch.no_grad():
                    values = [entry.spec.call(entry.loss, inputs)]
            feed.update({_namespaced(entry.name, k): v for k, v in inputs.items()})
            expected.update({_namespaced(entry.name, k): v for k, v in zip(entry.outputs, values, strict=True)})
        actual = _outputs(runner, feed)
        for entry in entries:
            for out in entry.outputs:
                key = _namespaced(entry.name, out)
                result = compare(actual[key], expected[key], rtol=rtol, atol=atol)
                if not result["ok"]:
                    shape = (
                        ""
                        if result["shape_ok"]
                        else f" (shape {tuple(actual[key].shape)} vs {tuple(expected[key].shape)})"
                    )
                    raise ArtifactError(
                        f"bundle output {key!r} at N={n}{' (smaller free sizes)' if smaller else ''} differs from "
                        f"eager beyond rtol={rtol}, atol={atol}{shape}: "
                        f"max abs error {result['max_abs_err']:.3g}, max rel error {result['max_rel_err']:.3g}"
                    )
                entry_record = record[entry.name]
                entry_record["max_abs_err"] = max(entry_record["max_abs_err"], result["max_abs_err"])
                entry_record["max_rel_err"] = max(entry_record["max_rel_err"], result["max_rel_err"])
    return {"sizes": [int(n) for n in sizes], "rtol": rtol, "atol": atol, "seed": seed, "entries": record}


def _outputs(runner: Runner, feed: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Run a bundle and name its outputs (the count must match the manifest's)."""
    values = runner(feed)
    if len(values) != len(runner.output_names):
        raise ArtifactError(f"the bundle returned {len(values)} outputs, its manifest names {len(runner.output_names)}")
    return dict(zip(runner.output_names, values, strict=True))


@one_export_at_a_time(*PT2_EXPORTER_MODULES)
def export_pt2_bundle(
    losses: Mapping[str, BundleSource],
    path: str | os.PathLike[str],
    *,
    joint: Union[bool, Sequence[str]] = False,
    optional_inputs: Sequence[str] = DEFAULT_OPTIONAL_INPUTS,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export several losses into ONE AOTInductor package (one C++ compile for all) and write ``<path>.json``.

    Useful for all the losses of a detector recipe in one file (``{"loss_cls": focal_cfg, "loss_bbox":
    giou_cfg}``), and much cheaper to build than one package per loss: the package's wrapper and runtime are
    compiled once.

    The package's ``forward`` takes every entry's inputs positionally (entry order, each entry's inputs in spec
    order; the manifest names them ``"<entry>/<input>"``) and returns every entry's outputs (``"<entry>/loss"``,
    and ``"<entry>/grad_pred"`` for joint entries). Each entry has its own dynamic sample count ``N_<entry>``
    (min 0): entries run at independent sizes, and an entry fed empty (N = 0) inputs costs next to nothing.

    Args:
        losses: entry name -> loss module, config, or ``(loss or config, variant)``. Names must not contain "/".
        path: the ``.pt2`` file to write; its directory must exist.
        joint: True (every entry), False, or the names of the entries that also return their gradient.
        optional_inputs: as :func:`export_pt2`, for every entry.
        verify: load the package and compare every output with eager at N = 0, 1, 64 and 1000 (capped per
            entry for large per-sample inputs) before it is put in place; the parity goes into the manifest.
        overwrite: replace an existing file (and manifest).

    Returns:
        The path written. Load it with :func:`load_runner` (all entries) or ``load_runner(path, entry=name)``.
    """
    entries = bundle_entries(losses, joint=joint, optional_inputs=optional_inputs)
    target = Path(path)
    check_output_path(target, overwrite)
    check_output_path(manifest_path(target), overwrite)
    manifest_entries = _bundle_manifest_entries(entries)
    inputs, outputs = _flat_io(manifest_entries)

    def check(runner: Runner) -> dict[str, Any]:
        return bundle_parity(runner, entries, EXPORT_PARITY_SIZES, seed=0, **TOLERANCES["pt2"])

    parity = write_package(
        export_bundle_program(entries),
        target,
        overwrite=overwrite,
        what="the bundle",
        input_names=[item["name"] for item in inputs],
        output_names=outputs,
        check=check if verify else None,
    )
    if parity is not None:
        for item in manifest_entries:
            item["parity"] = {**parity["entries"][item["name"]], "rtol": parity["rtol"], "atol": parity["atol"]}
    fields = {
        "format": "pt2",
        "bundle": True,
        "entries": manifest_entries,
        "inputs": inputs,
        "outputs": outputs,
        "dtype": "float32",
        "dynamic_dims": {
            name: {"min": entry.spec.smallest_size(symbol)}
            for entry, item in zip(entries, manifest_entries)
            for symbol, name in _entry_dims(item).items()
        },
        "runs_code": True,
    }
    write_manifest(target, fields, overwrite=True)
    return target


def _empty_input(item: Mapping[str, Any], samples: str, dynamic_dims: Mapping[str, Mapping[str, int]]) -> Tensor:
    """An input of no samples (the sample count ``samples`` 0, every free size its least, 1 or DFL's 2 bins)."""
    shape = [
        0 if d == samples else max(1, int(dynamic_dims.get(d, {}).get("min", 1))) if isinstance(d, str) else d
        for d in item["shape"]
    ]
    if not shape:  # avg_factor: any positive value
        return torch.ones((), dtype=getattr(torch, item["dtype"]))
    return torch.zeros(shape, dtype=getattr(torch, item["dtype"]))


def entry_runner(bundle: Runner, entry: str) -> Runner:
    """A runner for one entry of a loaded bundle (:func:`load_runner` without ``entry``; the package is shared):
    the entry's own input names in, its outputs out; every other entry is fed empty (N = 0) inputs."""
    manifest = getattr(bundle, "manifest", None) or {}
    label = str(manifest.get("artifact", "the package"))
    if not manifest.get("bundle"):
        raise ArtifactError(f"{label} is not a bundle (export_pt2_bundle); load it without entry=")
    by_name = {item["name"]: item for item in manifest["entries"]}
    if entry not in by_name:
        raise ArtifactError(f"{label} has no entry {entry!r} (entries: {', '.join(by_name)})")
    own = by_name[entry]
    names = [str(item["name"]) for item in own["inputs"]]
    fillers = {
        item["name"]: _empty_input(item, _entry_dims(other)[SAMPLES], manifest.get("dynamic_dims", {}))
        for other in manifest["entries"]
        if other["name"] != entry
        for item in _flat_io([other])[0]
    }
    wanted = [_namespaced(entry, out) for out in own["outputs"]]

    def run(inputs: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [name for name in names if name not in inputs]
        if missing:
            raise ArtifactError(f"missing input(s) {missing} for {entry} in {label} (inputs: {names})")
        feed = {**fillers, **{_namespaced(entry, name): inputs[name] for name in names}}
        outputs = _outputs(bundle, feed)
        return [outputs[key] for key in wanted]

    run.input_names = names  # type: ignore[attr-defined]
    run.output_names = list(own["outputs"])  # type: ignore[attr-defined]
    run.entry = dict(own)  # type: ignore[attr-defined]
    return run


def verify_bundle(
    path: str | os.PathLike[str], *, sizes: Sequence[int] = (0, 1, 7, 257), seed: Optional[int] = None
) -> dict[str, Any]:
    """Reload the bundle at ``path`` and compare every entry with eager on fresh random inputs (the bundle
    counterpart of :func:`visdet_export.export.verify.verify`). Returns the parity record with ``passed``."""
    import secrets

    from .artifacts import read_manifest
    from .verify import declared_free_sizes

    manifest = read_manifest(path)
    if not manifest.get("bundle"):
        raise ArtifactError(f"{Path(path).name} is not a bundle; use visdet_export.verify")
    for item in manifest["entries"]:  # a plugin's loss not loaded: say which plugin
        where = f"{Path(path).name}, entry {item['name']}"
        build_recorded_loss(dict(item["config"]), item.get("plugins"), location=where)
    losses = {item["name"]: (dict(item["config"]), item.get("variant")) for item in manifest["entries"]}
    joint = [item["name"] for item in manifest["entries"] if item.get("joint")]
    entries = bundle_entries(losses, joint=joint)
    for entry, item in zip(entries, manifest["entries"], strict=True):
        if list(entry.names) != [str(i["name"]) for i in item["inputs"]]:
            raise ArtifactError(
                f"entry {entry.name}: the manifest's inputs differ from the config's {list(entry.names)}"
            )
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    runner = load_runner(path, manifest)
    try:
        declared = {
            entry.name: declared_free_sizes(item, entry.spec)
            for entry, item in zip(entries, manifest["entries"], strict=True)
        }
        report = bundle_parity(runner, entries, sizes, seed=seed, free_sizes=declared, **TOLERANCES["pt2"])
    except ArtifactError as exc:
        raise ArtifactError(f"{Path(path).name} does not match its manifest's losses (seed {seed}): {exc}") from exc
    return {"path": str(path), "format": "pt2", "bundle": True, **report, "passed": True}


__all__ = [
    "BUNDLE_SEP",
    "EXPORT_PARITY_SIZES",
    "BundleEntry",
    "BundleModule",
    "bundle_entries",
    "bundle_parity",
    "entry_runner",
    "export_bundle_program",
    "export_program",
    "export_pt2",
    "export_pt2_bundle",
    "load_runner",
    "verify_bundle",
]
