"""Writing artifacts safely, and the JSON manifest that describes each one.

Every exporter writes through :func:`atomic_output`: the artifact goes to a temporary file in the target
directory and is renamed into place only when the writer (and its verification) succeeded, so an interrupted
export leaves the old file intact and no temporary files. An existing target is replaced only when asked to;
symlinks and directories are refused.

The manifest (``<artifact>.json``) records what the artifact computes and how it was checked: the loss config,
input names / dtypes / symbolic shapes, format details (opset, ...), library versions, the artifact's SHA-256
and the parity reached when it was verified.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, ParamSpec, TypeVar, Union

import torch
from torch import nn

from ..registry import MODELS, PLUGINS_VARIABLE, build_loss, check_rebuilds, loss_config, registered_name
from ..specs import SAMPLES, LossSpec, SampleOptions, spec_for
from ..validation import ConfigError, check_names

MANIFEST_SUFFIX = ".json"
MANIFEST_VERSION = 1
P = ParamSpec("P")
R = TypeVar("R")


class ArtifactError(RuntimeError):
    """An artifact could not be written, read or verified (the message says which and why)."""


def raise_hidden_interrupt(error: BaseException) -> None:
    """Raise the KeyboardInterrupt in ``error``'s causes and contexts, if there is one, so that a Ctrl-C is not
    reported as a failed artifact. torch's exporters catch ``Exception`` around the imports of their first call: an
    interrupt that lands there leaves a half-imported module whose ``except`` clause then fails (torch.onnx.export:
    "module 'torch._dynamo' has no attribute 'exc'"), and the interrupt survives only as that error's context."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        if isinstance(link, KeyboardInterrupt):
            raise link from None
        seen.add(id(link))
        pending += [link.__cause__, link.__context__]


class MissingPluginError(ArtifactError):
    """An artifact's loss is registered by a plugin module this process has not imported: a usage mistake (the
    CLI exits 2, as for its other usage errors), not a broken artifact."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (exporters raise pages of context), or its type's name.

    torch.onnx's exporter opens with boilerplate ("Failed to export the model with torch.export. This is step 1/3
    ...") and gives the cause under "## Exception summary" with its source line ("Caused by: (file.py:33 in
    forward)"): those are returned instead, without the terminal colour codes."""
    text = _ANSI.sub("", str(exc)).strip()
    if not text:
        return type(exc).__name__
    lines = [line.strip() for line in text.splitlines()]
    if "## Exception summary" in lines:
        after = [line for line in lines[lines.index("## Exception summary") + 1 :] if line]
        summary = after[0] if after else lines[0]
        where = next((line for line in after if line.startswith("Caused by:")), "")
        return f"{summary} {where}".strip()
    return lines[0]


def check_output_path(path: Path, overwrite: bool) -> Path:
    """Refuse a directory, a symlink, or an existing file unless ``overwrite``; the parent must exist."""
    if path.is_symlink():
        raise ArtifactError(f"refusing to write through the symlink {path}")
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise ArtifactError(f"the directory {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed."""
    target = check_output_path(Path(path), overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file 0600; give the artifact the permissions of any newly created file.
    os.chmod(tmp, 0o666 & ~_current_umask())
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        check_output_path(target, overwrite)  # nothing appeared there meanwhile
        written = sha256(tmp)
        os.replace(tmp, target)
        _WRITTEN[target.resolve()] = written
    finally:
        tmp.unlink(missing_ok=True)


#: The checksum of the file this process last put at each path: :func:`write_manifest` describes that file, not
#: one another process put there in between (two exports to one path at once).
_WRITTEN: dict[Path, str] = {}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("onnx", "onnxruntime", "onnxscript"):
        version = installed_version(module)
        if version is not None:
            versions[module] = version
    from .. import __version__

    versions["visdet_export"] = __version__
    return versions


def installed_version(module: str) -> Optional[str]:
    """The version of the installed distribution that provides ``module``, read from its metadata rather than by
    importing it: importing onnxscript to read its version cost a process's first TorchScript export 1.5 s (~950
    modules, sympy's among them, which a Ctrl-C can leave half imported). The distribution's name can differ from
    the module's (onnxruntime-gpu)."""
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        for distribution in importlib.metadata.packages_distributions().get(module, []):
            return importlib.metadata.version(distribution)
    return None


# What a fixed graph (every input required) takes for an input the loss could do without.
WITHOUT_ONE = {
    "weight": "all ones for no weight",
    "avg_factor": "for a plain mean, the number of elements reduction='none' returns (CrossEntropyLoss with "
    "avg_non_ignore on class labels: the labels other than ignore_index)",
}


def describe_inputs(
    spec: LossSpec, names: list[str], float_dtype: torch.dtype, fixed_graph: bool
) -> list[dict[str, Any]]:
    """The manifest's inputs. ``optional``: the artifact runs without it (a scripted module's optional argument);
    a fixed graph (ONNX, ``.pt2``) needs every input it lists."""
    by_name = {t.name: t for t in spec.inputs}
    return [
        {
            "name": name,
            "dtype": str(by_name[name].dtype(float_dtype)).replace("torch.", ""),
            "shape": list(by_name[name].shape),
            "optional": by_name[name].optional and not fixed_graph,
            "doc": by_name[name].doc + (f"; {WITHOUT_ONE[name]}" if fixed_graph and name in WITHOUT_ONE else ""),
        }
        for name in names
    ]


def shape_mismatch(
    name: str, declared: Sequence[object], shape: Sequence[object], symbols: dict[str, tuple[int, str]]
) -> Optional[str]:
    """Why the input ``name`` of ``shape`` does not fit ``declared`` (ints: fixed sizes; strings: symbols such as N
    or C, each one size across the inputs checked with the same ``symbols``, which records them), or None.
    In ``shape``, a string (a model's own symbol) or None is a size not known yet."""
    if len(shape) != len(declared) or any(
        isinstance(dim, int) and isinstance(size, int) and dim != size for dim, size in zip(declared, shape)
    ):
        shown = tuple("?" if size is None else size for size in shape)
        return f"{name!r} has shape {shown}; it takes {list(declared)}"
    for dim, size in zip(declared, shape):
        if isinstance(dim, str) and isinstance(size, int):
            first_size, first_name = symbols.setdefault(dim, (size, name))
            if first_size != size:
                return f"{name!r} has {dim} = {size} but {first_name!r} has {dim} = {first_size}"
    return None


def output_shapes(
    loss: nn.Module, spec: LossSpec, names: Sequence[str], outputs: Sequence[str]
) -> dict[str, list[object]]:
    """Each output's shape in the inputs' symbols: ``loss`` ``[]`` for a mean or a sum, per element for "none"
    (``["N", "C"]`` for focal, ``["N"]`` for QFL), ``grad_<pred>`` ``pred``'s. The loss's is read from two eager
    calls at sizes that tell every symbol apart; an axis no symbol gives is a number, or None where it varies."""
    runs = []
    for step, n in enumerate((7, 57)):  # the other sizes grow by 1, 2, ...: no two symbols change alike
        sizes = {symbol: size + step * index for index, (symbol, size) in enumerate(sorted(spec.sizes.items()), 1)}
        inputs = spec.sample(loss, n, seed=step, options=SampleOptions(sizes=sizes), include=list(names))
        with torch.no_grad():
            runs.append(({SAMPLES: n, **sizes}, tuple(spec.call(loss, inputs).shape)))
    (first_sizes, first_shape), (second_sizes, second_shape) = runs
    shapes: dict[str, list[object]] = {
        "loss": [
            next(
                (symbol for symbol, size in first_sizes.items() if size == a and second_sizes[symbol] == b),
                a if a == b else None,
            )
            for a, b in zip(first_shape, second_shape)
        ]
    }
    for name in outputs:
        if name == f"grad_{spec.pred}":
            shapes[name] = list(spec.inputs[0].shape)
    return shapes


def plugin_modules(loss: nn.Module) -> list[str]:
    """The modules outside this package defining the registered classes of ``loss`` and of the losses it holds (a
    loss of one's own, registered by a plugin): a manifest records them (``plugins``) so that verification can say
    which plugin to load. A class defined in ``__main__`` is left out: no plugin option imports it again."""
    modules = {type(module).__module__ for module in loss.modules() if registered_name(type(module)) is not None}
    return sorted(name for name in modules if name != "__main__" and name.split(".")[0] != "visdet_export")


def _config_types(config: object) -> list[str]:
    """The ``type`` names of ``config`` and of the loss configs nested in it."""
    if isinstance(config, Mapping):
        found = [config["type"]] if isinstance(config.get("type"), str) else []
        return found + [name for value in config.values() for name in _config_types(value)]
    if isinstance(config, (list, tuple)):
        return [name for value in config for name in _config_types(value)]
    return []


def _unregistered(name: str) -> bool:
    try:
        MODELS.get(name)
    except ValueError:  # ConfigError
        return True
    return False


def build_recorded_loss(
    config: Mapping[str, Any],
    plugins: object = None,
    source: str = "the manifest's config",
    location: str = "",
) -> nn.Module:
    """The loss a manifest's ``config`` builds; ``plugins``: the manifest's ``plugins`` field (the modules that
    registered its loss classes at export, :func:`plugin_modules`; absent in manifests before it). ``source`` names
    the config in the messages (``--config '...'`` where a user typed it); ``location``, where given, begins them
    (the artifact, and the entry or attached loss within it).

    Raises:
        MissingPluginError: a type the config names is not registered here and the manifest names the plugin
            modules that registered it.
        ArtifactError: the config does not build a loss otherwise.
    """
    where = f"{location}: " if location else ""
    try:
        return build_loss(config)
    except (ValueError, KeyError, TypeError) as exc:  # ConfigError is a ValueError
        missing = list(dict.fromkeys(name for name in _config_types(config) if _unregistered(name)))
        if not missing:
            raise ArtifactError(f"{where}{source} does not build a loss: {exc}") from exc
        types = f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'}"
        modules = [str(name) for name in plugins] if isinstance(plugins, list) and plugins else []
        if modules:
            some = "s" if len(modules) > 1 else ""
            raise MissingPluginError(
                f"{where}{types} registered by the plugin module{some} "
                f"{', '.join(repr(name) for name in modules)}: pass {' '.join('--plugin ' + n for n in modules)} "
                f"(or {PLUGINS_VARIABLE}={','.join(modules)})"
            ) from exc
        registered = sorted(MODELS.module_dict)
        close = [match for name in missing for match in difflib.get_close_matches(name, registered, n=1, cutoff=0.6)]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ArtifactError(
            f"{where}{source} does not build a loss: {types} not registered here.{hint} Registered: "
            f"{', '.join(registered)}. A loss of your own: name the module that registers it with --plugin MODULE "
            f"(or {PLUGINS_VARIABLE}=MODULE)"
        ) from exc


def manifest_path(artifact: str | os.PathLike[str]) -> Path:
    """Where the manifest of ``artifact`` lies: beside it, ``<artifact>.json``."""
    return Path(f"{artifact}{MANIFEST_SUFFIX}")


def write_manifest(artifact: str | os.PathLike[str], fields: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``<artifact>.json`` atomically with ``fields`` plus the checksum, versions and format version.

    Raises :class:`ArtifactError` if the artifact is no longer the file this process wrote there (another export
    to the same path replaced it meanwhile): the other export's manifest describes it."""
    checksum = sha256(artifact)
    written = _WRITTEN.pop(Path(artifact).resolve(), checksum)
    if checksum != written:
        raise ArtifactError(f"{artifact} was replaced while it was exported (another export to the same path?)")
    record = {
        "manifest_version": MANIFEST_VERSION,
        "artifact": Path(artifact).name,
        "sha256": checksum,
        "versions": library_versions(),
        **fields,
    }
    target = manifest_path(artifact)
    with atomic_output(target, overwrite) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _WRITTEN.pop(target.resolve(), None)
    return target


#: Held while a graph is captured: torch.export and the TorchScript compiler are not thread-safe (exports from
#: several threads failed, and left the process unable to export or compile).
EXPORT_LOCK = threading.RLock()


#: torch's compiler stack, which every exporter but TorchScript's imports on its first call: Dynamo and
#: torch.export (1.1 s here, ~800 modules, sympy and torch's operator library registrations among them).
COMPILER_MODULES = ("torch._dynamo", "torch.export")


def one_export_at_a_time(*modules: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """An exporter that holds :data:`EXPORT_LOCK` (exporters called from several threads run one after another) and
    first imports ``modules`` with a Ctrl-C held back (:func:`import_uninterrupted`)."""

    def decorate(export: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(export)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            with EXPORT_LOCK:
                import_uninterrupted(modules)
                return export(*args, **kwargs)

        return locked

    return decorate


def import_uninterrupted(modules: Sequence[str]) -> None:
    """Import ``modules`` with a Ctrl-C (SIGINT) held back until they are in, then raised as KeyboardInterrupt.

    An interrupt inside an import leaves the module half done, and torch's compiler stack does not recover from
    that: after a Ctrl-C in the first export of a process (a notebook's interrupt button), torch.compile,
    torch.export and torch.onnx.export all failed until the process restarted ("module 'sympy' has no attribute
    'core'", "Only a single TORCH_LIBRARY can be used to register the namespace c10d_functional", "module
    'torch._dynamo' has no attribute 'exc'"). Held back only in the main thread under Python's own SIGINT handler;
    a program's own handler (the CLI's among them) stays in charge.
    """
    missing = [name for name in modules if name not in sys.modules]
    if not missing:
        return
    held_back = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    received: list[int] = []
    if held_back:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        for name in missing:
            _import_if_present(name)
    finally:
        if held_back:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _import_if_present(name: str) -> None:
    """Import ``name`` if it imports. Some of the modules are torch's private ones, which a later version may move,
    and a missing dependency is the exporter's to report: it imports what it needs on its first call anyway."""
    with contextlib.suppress(ImportError):
        importlib.import_module(name)


LossOrConfig = Union[nn.Module, Mapping[str, Any], str]

#: The parity fields a manifest keeps (the full record, per size, stays with the caller).
PARITY_FIELDS = ("sizes", "free_sizes", "extreme_logits", "max_abs_err", "max_rel_err", "rtol", "atol")


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, every submodule's training flag restored after: exporting a head's
    loss in the middle of training leaves it as it was."""
    flags = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in flags:
            submodule.training = training


def as_loss(loss_or_cfg: LossOrConfig) -> nn.Module:
    """A built loss module as is (the module a ``torch.compile`` wrapper holds), or the loss a config mapping (or a
    bare type name) builds."""
    if isinstance(loss_or_cfg, nn.Module):
        return getattr(loss_or_cfg, "_orig_mod", loss_or_cfg)
    if isinstance(loss_or_cfg, (Mapping, str)):
        return build_loss(loss_or_cfg)
    raise TypeError(f"expected a loss module or a config mapping, got {type(loss_or_cfg).__name__}")


def usable_optional_inputs(loss: nn.Module, requested: Sequence[str]) -> list[str]:
    """``requested`` less ``avg_factor`` under ``reduction="sum"``, which rejects it, and ``"none"``, which
    ignores it."""
    no_mean = getattr(loss, "reduction", None) in ("sum", "none")
    return [name for name in requested if not (name == "avg_factor" and no_mean)]


@dataclass(frozen=True)
class ExportPlan:
    """What one single-loss export writes: the loss, its config and input spec, the artifact's input and output
    names, and the checked target path (its manifest path is checked too, before any work is done)."""

    loss: nn.Module
    config: dict[str, object]
    spec: LossSpec
    names: list[str]
    outputs: list[str]
    joint: bool
    target: Path

    @classmethod
    def prepare(
        cls,
        loss_or_cfg: LossOrConfig,
        path: Union[str, os.PathLike[str]],
        *,
        variant: Optional[str],
        optional_inputs: Optional[Sequence[str]],
        joint: bool,
        overwrite: bool,
    ) -> "ExportPlan":
        """The inputs: the required ones and the requested optional ones (``None``: every optional input of the
        spec, as a scripted module takes them all) that the loss uses (:func:`usable_optional_inputs`)."""
        from .joint import select_inputs

        loss = as_loss(loss_or_cfg)
        config = loss_config(loss)
        try:
            check_rebuilds(loss, config)
        except ConfigError as exc:
            raise ArtifactError(f"cannot export {type(loss).__name__}: {exc}") from exc
        spec = spec_for(loss, variant)
        requested = (
            [t.name for t in spec.inputs if t.optional] if optional_inputs is None
            else check_names("optional_inputs", optional_inputs)
        )
        names = select_inputs(spec, usable_optional_inputs(loss, requested))
        target = check_output_path(Path(path), overwrite)
        check_output_path(manifest_path(target), overwrite)
        outputs = ["loss", f"grad_{spec.pred}"] if joint else ["loss"]
        return cls(loss, config, spec, names, outputs, joint, target)

    def manifest_fields(self, fmt: str, parity: Optional[Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
        """The manifest of the artifact in format ``fmt``, with the parity it reached (None: not verified), and the
        plugin modules registering its loss (``plugins``, where there are any)."""
        plugins = plugin_modules(self.loss)
        return {
            "format": fmt,
            "config": self.config,
            **({"plugins": plugins} if plugins else {}),
            "loss_type": self.spec.loss_type,
            "variant": self.spec.variant,
            "inputs": describe_inputs(self.spec, self.names, torch.float32, fixed_graph=fmt != "torchscript"),
            "outputs": self.outputs,
            "output_shapes": output_shapes(self.loss, self.spec, self.names, self.outputs),
            "joint": self.joint,
            "dtype": "float32",
            "parity": None if parity is None else {key: parity[key] for key in PARITY_FIELDS if key in parity},
            **extra,
        }


def read_manifest(artifact: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of ``artifact``; raises :class:`ArtifactError` if it is missing or its checksum differs."""
    path = manifest_path(artifact)
    if not path.is_file():
        raise ArtifactError(f"{artifact} has no manifest ({path.name} is missing)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"the manifest {path.name} is not valid JSON ({exc}); export {artifact} again") from exc
    if not isinstance(record, dict) or record.get("sha256") != sha256(artifact):
        raise ArtifactError(f"{artifact} does not match the checksum in {path.name}; it changed after export")
    return record
