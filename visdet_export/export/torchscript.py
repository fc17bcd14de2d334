"""TorchScript export of a loss module, and a runner for the written files.

:func:`export_torchscript` scripts the loss module itself (``torch.jit.script``), so the file keeps the module's
full ``forward``: ``Optional`` ``weight`` / ``avg_factor`` (a number or a 0-d tensor), ``reduction_override``
and QualityFocalLoss's ``(labels, scores)`` tuple target. The loss config (JSON) is stored inside the archive as
the extra file ``visdet_export/config.json`` and the manifest (``<path>.json``) is written beside it. Loading the
file needs no Python source of this package: ``torch.jit.load`` in Python or ``torch::jit::load`` in C++.

.. warning::
    A TorchScript file is a program: loading it (:func:`load_runner`, ``torch.jit.load``) runs the code it
    contains. Load only files you trust. :func:`embedded_config` reads the stored config without loading code.

torch 2.13 deprecates ``torch.jit.script`` / ``save`` / ``load`` with a warning; that warning is silenced only
inside the functions of this module (``warnings.catch_warnings``), never globally.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..registry import build_loss
from ..specs import LossSpec, spec_for
from .artifacts import (
    ArtifactError,
    ExportPlan,
    LossOrConfig,
    atomic_output,
    build_recorded_loss,
    evaluation_mode,
    one_export_at_a_time,
    raise_hidden_interrupt,
    write_manifest,
)
from .verify import DEFAULT_SIZES, TOLERANCES, check_parity

#: Name of the config inside the archive (``torch.jit.save`` stores extra files under ``<archive>/extra/``).
CONFIG_FILE = "visdet_export/config.json"

Runner = Any  # Callable[[Mapping[str, Tensor]], list[Tensor]] with ``input_names`` / ``output_names`` attributes


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch's "``torch.jit.*`` is deprecated" warnings (Deprecation- or FutureWarning) inside the block.

    Only those messages are filtered, and only while the block runs; every other warning reaches the caller.
    """
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated.*", category=category)
        yield


def script_loss(loss: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(loss)`` without the deprecation warning (the loss module itself, every argument kept)."""
    with quiet_jit():
        try:
            return torch.jit.script(loss)
        except Exception as exc:  # torch.jit raises several types; say which loss
            raise_hidden_interrupt(exc)
            # torch's message opens with a newline (the CLI shows first lines) and names no cause for super()
            text = str(exc).strip()
            hint = (
                " (TorchScript has no super(): hold the base loss as a submodule and call it, or call its function)"
                if "super()" in text else ""
            )
            raise ArtifactError(f"torch.jit.script failed for {type(loss).__name__}{hint}: {text}") from exc


def save_scripted(
    module: torch.jit.ScriptModule, target: Union[str, os.PathLike[str], io.BytesIO], config: Mapping[str, Any]
) -> None:
    """Save ``module`` with ``config`` as the extra file :data:`CONFIG_FILE`."""
    extra = {CONFIG_FILE: json.dumps(dict(config), sort_keys=True)}
    with quiet_jit():
        torch.jit.save(module, target if isinstance(target, io.BytesIO) else str(target), _extra_files=extra)


def load_scripted(source: Union[str, os.PathLike[str], io.BytesIO]) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU (runs the code in the file: load only trusted files)."""
    with quiet_jit():
        return torch.jit.load(source if isinstance(source, io.BytesIO) else str(source), map_location="cpu")


def embedded_config(path: str | os.PathLike[str]) -> Optional[dict[str, Any]]:
    """The loss config stored in the archive, read as a zip member (no TorchScript code is loaded or run)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith("/extra/" + CONFIG_FILE):
                    return json.loads(archive.read(member))
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"{path} is not a TorchScript archive: {exc}") from exc
    return None


def _runner(module: torch.jit.ScriptModule, spec: LossSpec, names: Sequence[str], label: str) -> Runner:
    names = list(names)

    def run(inputs: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [name for name in names if name not in inputs and not _is_optional(spec, name)]
        if missing:
            raise ArtifactError(f"missing input(s) {missing} for {label} (inputs: {names})")
        return [spec.call(module, {name: inputs[name] for name in names if name in inputs})]

    run.input_names = names  # type: ignore[attr-defined]
    run.output_names = ["loss"]  # type: ignore[attr-defined]
    run.module = module  # type: ignore[attr-defined]
    return run


def _is_optional(spec: LossSpec, name: str) -> bool:
    return any(t.name == name and t.optional for t in spec.inputs)


def load_runner(path: str | os.PathLike[str], manifest: Optional[Mapping[str, Any]] = None) -> Runner:
    """A runner for the TorchScript file at ``path``: named tensors in, ``[loss]`` out.

    The call convention (which named input goes to which ``forward`` argument, QFL's tuple target) comes from
    the input spec of the loss in ``manifest`` (default: the config embedded in the file).

    .. warning:: this loads the file with ``torch.jit.load``, which runs the code it contains (TorchScript is
       code). Use it only on files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is not a file")
    config = dict(manifest["config"]) if manifest is not None and "config" in manifest else embedded_config(path)
    if config is None:
        raise ArtifactError(f"{path.name} has no loss config (neither a manifest nor {CONFIG_FILE} inside)")
    if manifest is not None and "config" in manifest:
        loss = build_recorded_loss(config, manifest.get("plugins"))
    else:
        loss = build_loss(config)
    spec = spec_for(loss, None if manifest is None else manifest.get("variant"))
    names = [str(entry["name"]) for entry in manifest["inputs"]] if manifest and manifest.get("inputs") else spec.names
    return _runner(load_scripted(path), spec, names, path.name)


def forward_signature(scripted: torch.jit.ScriptModule) -> str:
    """The scripted ``forward``'s schema without ``self``: what a C++ caller passes, in order, with defaults
    (``Union(Tensor, (Tensor, Tensor)) target``: QFL's labels and scores as one tuple)."""
    schema = scripted.forward.schema  # type: ignore[attr-defined]  # a ScriptMethod's, which stubs do not declare
    return re.sub(r"^forward\([^,)]* self(, )?", "forward(", str(schema))


@one_export_at_a_time()
def export_torchscript(
    loss_or_cfg: LossOrConfig,
    path: str | os.PathLike[str],
    *,
    variant: Optional[str] = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Script a loss module, save it to ``path`` (config inside) and write its manifest ``<path>.json``.

    Args:
        loss_or_cfg: a built loss module, or a config (``dict(type="FocalLoss", gamma=2.0)``).
        path: the file to write (``.pt`` by convention); its directory must exist.
        variant: the input layout the manifest and the parity check describe (``spec_for``); the scripted module
            itself accepts every layout its ``forward`` accepts.
        verify: reload the written file and compare it with eager at N = 0, 1, 7 and 257 (default ``assert_close``
            float32 tolerances) before it is put in place; the parity reached goes into the manifest.
        overwrite: replace an existing file (and manifest).

    Returns:
        The path written.

    Raises:
        ArtifactError: the path exists (without ``overwrite``), is a directory or a symlink; scripting or the
            parity check failed. Nothing is left behind on failure.

    Note:
        The file is code: whoever loads it (``torch.jit.load``) runs it.
    """
    plan = ExportPlan.prepare(
        loss_or_cfg, path, variant=variant, optional_inputs=None, joint=False, overwrite=overwrite
    )
    loss, config, spec, names, target = plan.loss, plan.config, plan.spec, plan.names, plan.target

    with evaluation_mode(loss):
        scripted = script_loss(loss)
    parity: Optional[dict[str, Any]] = None
    with atomic_output(target, overwrite) as tmp:
        save_scripted(scripted, tmp, config)
        if verify:
            runner = _runner(load_scripted(tmp), spec, names, target.name)
            sizes = spec.capped_sizes(DEFAULT_SIZES)
            parity = check_parity(runner, loss, spec, names, sizes=sizes, seed=0, **TOLERANCES["torchscript"])
    fields = plan.manifest_fields(
        "torchscript", parity, extra_files=[CONFIG_FILE], runs_code=True, forward=forward_signature(scripted)
    )
    write_manifest(target, fields, overwrite=True)
    return target



__all__ = [
    "CONFIG_FILE",
    "embedded_config",
    "export_torchscript",
    "load_runner",
    "load_scripted",
    "quiet_jit",
    "save_scripted",
    "script_loss",
]
