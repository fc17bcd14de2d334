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

Cost: one AOTInductor package takes roughly 30-70 s on a 2-core CPU (the C++ compile of the kernels and the
wrapper dominates); the export itself 3-12 s.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..registry import build_loss, loss_config
from ..specs import LossSpec, spec_for
from .artifacts import ArtifactError, atomic_output, check_output_path, describe_inputs, manifest_path, write_manifest
from .joint import DEFAULT_OPTIONAL_INPUTS, dynamic_shapes, example_inputs, joint_module, select_inputs
from .verify import TOLERANCES, check_parity

#: Sizes the export-time parity check runs at (capped for inputs with many elements per sample).
EXPORT_PARITY_SIZES = (0, 1, 64, 1000)
#: Cap on the ``pred`` elements drawn for one parity size (mask logits are 62720 per sample).
PARITY_MAX_ELEMENTS = 1 << 22

LossOrConfig = Union[nn.Module, Mapping[str, Any], str]
Runner = Any  # Callable[[Mapping[str, Tensor]], list[Tensor]] with ``input_names`` / ``output_names`` attributes


def _as_loss(loss_or_cfg: LossOrConfig) -> nn.Module:
    if isinstance(loss_or_cfg, nn.Module):
        return loss_or_cfg
    if isinstance(loss_or_cfg, (Mapping, str)):
        return build_loss(loss_or_cfg)
    raise TypeError(f"expected a loss module or a config mapping, got {type(loss_or_cfg).__name__}")


def export_program(
    loss: nn.Module, spec: LossSpec, names: Sequence[str], *, joint: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` of the loss (or its joint loss + gradient graph) with a dynamic N in [0, inf)."""
    from torch.fx.experimental import _config as fx_config

    names = list(names)
    example = example_inputs(loss, spec, names)
    module = joint_module(loss, spec, names, example=example) if joint else spec.bind(loss, names)
    with fx_config.patch(backed_size_oblivious=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        try:
            return torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes(spec, names), strict=False)
        except Exception as exc:  # torch.export raises many types; say which loss and why
            summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"torch.export of {spec.loss_type} ({spec.variant}) failed: {summary}") from exc


def compile_package(program: torch.export.ExportedProgram, target: Path) -> None:
    """AOTInductor-compile ``program`` into the package file ``target`` (any name; built in a scratch dir)."""
    with tempfile.TemporaryDirectory(prefix="visdet_pt2_") as scratch:
        built = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(scratch, "loss.pt2"))
        shutil.copyfile(built, target)


def _runner(package: Any, names: Sequence[str], outputs: Sequence[str], label: str) -> Runner:
    names = list(names)

    def run(inputs: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [name for name in names if name not in inputs]
        if missing:
            raise ArtifactError(f"missing input(s) {missing} for {label} (inputs: {names})")
        result = package(*[inputs[name].contiguous() for name in names])
        return list(result) if isinstance(result, (list, tuple)) else [result]

    run.input_names = names  # type: ignore[attr-defined]
    run.output_names = list(outputs)  # type: ignore[attr-defined]
    return run


def load_runner(path: str | os.PathLike[str], manifest: Optional[Mapping[str, Any]] = None) -> Runner:
    """A runner for the ``.pt2`` package at ``path``: named tensors in, the package's outputs as a list out.

    Input order and output names come from ``manifest`` (read from ``<path>.json`` if not given).

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
    return _runner(package, names, outputs, path.name)


def parity_sizes(spec: LossSpec, sizes: Sequence[int], max_elements: int = PARITY_MAX_ELEMENTS) -> list[int]:
    """``sizes`` with each N capped so that ``pred`` holds at most ``max_elements`` elements (at least 7)."""
    per_sample = 1
    for dim in spec.inputs[0].shape:
        if dim != "N":
            per_sample *= int(dim)
    cap = max(7, max_elements // max(per_sample, 1))
    return sorted({min(int(n), cap) for n in sizes})


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
    loss = _as_loss(loss_or_cfg)
    config = loss_config(loss)
    spec = spec_for(loss, variant)
    optional = [n for n in optional_inputs if not (n == "avg_factor" and getattr(loss, "reduction", None) == "sum")]
    names = select_inputs(spec, optional)
    outputs = ["loss", f"grad_{spec.pred}"] if joint else ["loss"]
    target = Path(path)
    check_output_path(target, overwrite)
    check_output_path(manifest_path(target), overwrite)

    program = export_program(loss, spec, names, joint=joint)
    parity: Optional[dict[str, Any]] = None
    with tempfile.TemporaryDirectory(prefix="visdet_pt2_") as scratch:
        # Built and verified under a ``.pt2`` name (the loader insists on the suffix), then moved into place.
        built = Path(scratch) / "loss.pt2"
        try:
            compile_package(program, built)
        except Exception as exc:
            summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"AOTInductor compilation of {spec.loss_type} failed: {summary}") from exc
        if verify:
            package = torch._inductor.aoti_load_package(str(built))
            runner = _runner(package, names, outputs, target.name)
            sizes = parity_sizes(spec, EXPORT_PARITY_SIZES)
            parity = check_parity(runner, loss, spec, names, joint=joint, sizes=sizes, seed=0, **TOLERANCES["pt2"])
        with atomic_output(target, overwrite) as tmp:
            shutil.copyfile(built, tmp)
    fields = {
        "format": "pt2",
        "config": config,
        "loss_type": spec.loss_type,
        "variant": spec.variant,
        "inputs": describe_inputs(spec, names, torch.float32),
        "outputs": outputs,
        "joint": joint,
        "dtype": "float32",
        "dynamic_dims": {"N": {"min": 0}},
        "runs_code": True,
        "parity": (
            {key: parity[key] for key in ("sizes", "max_abs_err", "max_rel_err", "rtol", "atol")}
            if parity is not None
            else None
        ),
    }
    write_manifest(target, fields, overwrite=True)
    return target


__all__ = ["EXPORT_PARITY_SIZES", "export_program", "export_pt2", "load_runner", "parity_sizes"]
