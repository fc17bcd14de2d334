"""Loss evaluation graphs: attach exported losses to a model's ONNX outputs, and evaluate graphs over many samples.

:func:`attach_losses` merges a model ``.onnx`` with one exported graph per loss using :mod:`onnx.compose`, so one
onnxruntime session runs the detector (or a student and a teacher) and computes the losses on its outputs::

    attach_losses(
        "head.onnx",
        [
            ("loss_cls", dict(type="QualityFocalLoss", beta=2.0), {"pred": "cls_score", "labels": "labels",
                                                                   "scores": "label_scores"}),
            ("loss_kd", dict(type="KnowledgeDistillationKLDivLoss", T=2), {"pred": "cls_score",
                                                                          "soft_label": "teacher_cls_score"}),
        ],
        "head_with_losses.onnx",
    )

Each loss input (the names of its input spec, :mod:`visdet_export.specs`) is mapped to a model output, which feeds
it, or to any other name, which becomes a graph input of the merged model (losses mapping the same name share the
input). Unmapped required inputs become graph inputs named ``<loss name>/<input>``; unmapped optional inputs
(``weight``, ``avg_factor``) are left out of the loss graph. The merged model keeps the model's inputs and outputs
and adds one 0-d output per loss, named as the loss. All names inside a loss graph are prefixed with
``<loss name>/`` so they stay unique.

:func:`evaluate` runs any ONNX graph (a merged model or a standalone loss) over samples from an ``.npz`` file or an
iterable of dicts and returns per-sample values and means of its scalar outputs.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO, Union

import numpy as np
import onnx
import onnx.compose
import onnx.version_converter
import torch
from onnx import external_data_helper
from torch import nn

from ..registry import MODELS, loss_config
from ..specs import INT64, spec_for
from .artifacts import (
    ArtifactError,
    as_loss,
    atomic_output,
    build_recorded_loss,
    first_line,
    one_export_at_a_time,
    plugin_modules,
    shape_mismatch,
    write_manifest,
)
from .onnx import (
    ATTACHED_METADATA_KEY,
    DEFAULT_DOMAINS,
    METADATA_PREFIX,
    MIN_OPSET,
    ONNX_EXPORTER_MODULES,
    check_external_data,
    export_onnx,
)

PathLike = Union[str, "os.PathLike[str]"]
LossLike = Union[nn.Module, Mapping[str, object], PathLike]
#: ``(name, loss, mapping)``, or ``(name, loss, mapping, variant)`` to attach a config in another input layout of its
#: loss (``spec_for(loss, variant)``: a sigmoid CE on (N, C) logits with labels is ``"labels"``).
Attachment = Union[tuple[str, LossLike, Mapping[str, str]], tuple[str, LossLike, Mapping[str, str], Optional[str]]]
#: An attachment checked by :func:`check_plan`: configs built into modules (graph paths stay paths).
PlannedLoss = tuple[str, Union[nn.Module, str, "os.PathLike[str]"], Mapping[str, str], Optional[str]]

# protobuf's hard limit: a larger merged model is written with its initializers in ``<out>.data``.
PROTOBUF_LIMIT = 2**31 - 1
SEPARATOR = "/"


class AttachError(ArtifactError):
    """A loss could not be attached (bad mapping, incompatible graphs, unsafe external data, ...)."""


# --- loading and checking -----------------------------------------------------------------------------------------


def load_model(path: PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, which must lie inside the model's directory."""
    path = Path(path)
    if not path.is_file():
        raise AttachError(f"{path} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise AttachError(f"{path} is not an ONNX model ({type(error).__name__}: {first_line(error)})") from None
    try:
        check_external_data(path)
    except ArtifactError as error:
        raise AttachError(str(error)) from None
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    raise AttachError("the model imports no default ('ai.onnx') opset")


def _to_opset(model: onnx.ModelProto, opset: int, what: str) -> onnx.ModelProto:
    if _default_opset(model) == opset:
        return model
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise AttachError(f"opset {opset} is newer than this onnx {onnx.__version__} knows (at most {newest})")
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as error:  # the converter raises bare RuntimeErrors per unsupported op
        raise AttachError(
            f"could not convert {what} from opset {_default_opset(model)} to {opset}: {error}; "
            f"export it at opset {opset} instead"
        ) from error


# --- naming helpers -----------------------------------------------------------------------------------------------


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename one value (graph input/output, node edge, value_info) throughout ``graph`` (not its subgraphs)."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for values in (graph.input, graph.output, graph.value_info):
        for value in values:
            if value.name == old:
                value.name = new


def _prefix_dim_params(graph: onnx.GraphProto, prefix: str) -> None:
    """Symbolic dims are per graph (the model's ``N`` anchors are not a loss's ``N`` positives)."""
    for values in (graph.input, graph.output, graph.value_info):
        for value in values:
            if value.type.HasField("tensor_type"):
                for dim in value.type.tensor_type.shape.dim:
                    if dim.HasField("dim_param"):
                        dim.dim_param = prefix + dim.dim_param


def _dims(value: onnx.ValueInfoProto) -> Optional[list[object]]:
    """A value's shape: ints (fixed), strings (symbols) and None (unknown); None when it has no shape."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [
        dim.dim_value if dim.HasField("dim_value") else dim.dim_param if dim.HasField("dim_param") else None
        for dim in tensor.shape.dim
    ]


#: Floating-point model outputs a float32 loss input reads through a Cast, as eager losses compute half precision
#: in float32 (float64 is rounded: the loss graphs are float32).
CAST_TO_FLOAT32 = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def _dtype_name(elem_type: int) -> str:
    """numpy's name of an ONNX element type (bfloat16, which numpy lacks, too)."""
    name = onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def _read_as_float32(graph: onnx.GraphProto, name: str, source_type: int) -> None:
    """Loss graph input ``name`` takes ``source_type`` (one of :data:`CAST_TO_FLOAT32`) and casts it to float32
    before anything reads it."""
    cast = name + "__float32"
    for node in graph.node:
        node.input[:] = [cast if value == name else value for value in node.input]
    graph.node.insert(
        0, onnx.helper.make_node("Cast", [name], [cast], to=onnx.TensorProto.FLOAT, name=f"{name} to float32")
    )
    next(value for value in graph.input if value.name == name).type.tensor_type.elem_type = source_type


def _check_readable(
    what: str,
    source: onnx.ValueInfoProto,
    target_type: int,
    target_shape: Optional[Sequence[object]],
    symbols: dict[str, tuple[int, str]],
    cast: bool = True,
) -> None:
    """``source`` can feed a loss input of ``target_type`` (with ``cast``, floats of any precision a float32 one,
    through :func:`_read_as_float32`) and ``target_shape``: static sizes that fit, one size per symbol of the loss
    (N, C, ...) across the inputs checked with ``symbols`` (student logits of 68 classes and teacher logits of 80
    are refused here rather than when run)."""
    source_type = source.type.tensor_type.elem_type
    casts = cast and target_type == onnx.TensorProto.FLOAT
    readable = (onnx.TensorProto.FLOAT, *CAST_TO_FLOAT32) if casts else (target_type,)
    if source_type not in readable:
        expected = "a floating-point tensor" if casts else _dtype_name(target_type)
        raise AttachError(f"{what}: {source.name!r} is {_dtype_name(source_type)} but the loss expects {expected}")
    source_dims = _dims(source)
    mismatch = None if source_dims is None or target_shape is None else shape_mismatch(
        source.name, target_shape, source_dims, symbols
    )
    if mismatch:
        raise AttachError(f"{what}: {mismatch}")


def _record_model_symbols(
    source: onnx.ValueInfoProto, target: onnx.ValueInfoProto, model_symbols: dict[str, tuple[str, str]], loss: str
) -> None:
    """Record which symbol of the model (its N) each symbolic axis of loss input ``target`` (the loss's N) has, and
    which value gave it. One loss symbol fed two model symbols is warned about: the loss graph's input checks
    refuse every run where the two differ (a weight given per anchor to a loss on positive boxes)."""
    for source_dim, target_dim in zip(_dims(source) or (), _dims(target) or ()):
        if not (isinstance(source_dim, str) and isinstance(target_dim, str)):
            continue
        known, given_by = model_symbols.setdefault(target_dim, (source_dim, source.name))
        if known != source_dim:
            warnings.warn(
                f"loss {loss!r}: its {target_dim} is {known!r} of {given_by!r} and {source_dim!r} of {source.name!r}; "
                "the merged model runs only where they are equal",
                stacklevel=5,  # the caller of attach_losses (through _merge_one and the export lock's wrapper)
            )


def _name_new_input_axes(
    value: onnx.ValueInfoProto,
    prefix: str,
    symbols: dict[str, tuple[int, str]],
    model_symbols: Mapping[str, tuple[str, str]],
) -> None:
    """A new graph input's axes take what the model's outputs give the same symbols of the loss: a static size
    (soft labels of 80 classes) or the model's symbol (labels of the model's N); else the loss's own symbol
    (``<loss>/N``), one for all its inputs."""
    for dim in value.type.tensor_type.shape.dim:
        if not dim.HasField("dim_param"):
            continue
        symbol = dim.dim_param.removeprefix(prefix)
        if symbol in symbols:
            dim.dim_value = symbols[symbol][0]
        elif symbol in model_symbols:
            dim.dim_param = model_symbols[symbol][0]


# --- loss graphs --------------------------------------------------------------------------------------------------


def _export_loss_graph(
    loss: nn.Module, variant: Optional[str], optional_inputs: tuple[str, ...], opset: int, directory: Path
) -> Path:
    """Export ``loss`` with the package's ONNX exporter (verified in onnxruntime) into ``directory``."""
    path = directory / f"{type(loss).__name__}.{len(list(directory.iterdir()))}.onnx"
    return Path(export_onnx(loss, path, variant=variant, optional_inputs=optional_inputs, opset=opset, verify=True))


def _loss_graph(
    name: str, loss: LossLike, mapping: Mapping[str, str], variant: Optional[str], opset: int, directory: Path
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The loss's ONNX graph at ``opset`` and a description of it for the merged model's metadata: its config, its
    input layout where not the default (``variant``) and, for a loss registered by a plugin, the plugin modules
    (``plugins``, as an artifact's manifest records them, so that verifying it without them names them)."""
    if isinstance(loss, (str, os.PathLike)):
        return _to_opset(load_model(loss), opset, f"loss graph {name!r}"), {"graph": str(loss)}
    module = as_loss(loss)
    spec = spec_for(module, variant)
    optional = tuple(t.name for t in spec.inputs if t.optional and t.name in mapping)
    path = _export_loss_graph(module, variant, optional, opset, directory)
    plugins = plugin_modules(module)
    description = {
        "config": loss_config(module),
        **({"variant": variant} if variant is not None else {}),
        **({"plugins": plugins} if plugins else {}),
    }
    return _to_opset(load_model(path), opset, f"loss graph {name!r}"), description


# --- attach -------------------------------------------------------------------------------------------------------


def _check_name(name: object, taken: set[str]) -> str:
    if not isinstance(name, str) or not name or SEPARATOR in name:
        raise AttachError(f"a loss name must be a non-empty string without {SEPARATOR!r}, got {name!r}")
    if name in taken:
        raise AttachError(f"loss name {name!r} is already used by the model or another loss; choose another")
    return name


def check_sources(
    name: str,
    mapping: Mapping[str, str],
    model_inputs: Collection[str],
    model_outputs: Sequence[str],
    new_inputs: Collection[str],
    model_label: str,
) -> None:
    """Refuse the names of ``mapping`` that more likely misspell a model output than name a new graph input.

    A name that is neither a model input nor output becomes a new graph input; undeclared (not in
    ``new_inputs``), one that is close to a model output is refused, as is a declared one that is a model output.
    """
    shown = ", ".join(model_outputs)
    for key, source in mapping.items():
        what = f"loss {name!r} input {key!r}"
        if source in new_inputs and source in model_outputs:
            raise AttachError(
                f"{what}: {source!r} is an output of {model_label}, so it cannot be a new graph input; "
                "give the input another name"
            )
        if source in model_outputs or source in model_inputs or source in new_inputs:
            continue
        close = difflib.get_close_matches(source, model_outputs, n=1, cutoff=0.8)
        if close:
            raise AttachError(
                f"{what}: {source!r} is not an output of {model_label} (did you mean {close[0]!r}? its outputs "
                f'are {shown}); to make it a new graph input, declare it: new_inputs=["{source}"] in Python, '
                f'{{"input": "{source}"}} in an attach spec'
            )


def check_plan(
    model: onnx.ModelProto, losses: Sequence[Attachment], new_inputs: Collection[str], model_label: str
) -> list[PlannedLoss]:
    """Every mistake of an attach request that needs no export, found before the first one: malformed entries,
    duplicate names, names that look like misspelled model outputs (:func:`check_sources`) or are the model's
    internal values, configs that do not build, loss graphs that do not load, inputs a loss does not have, a loss
    that reduces nothing (``reduction="none"``: no 0-d output) or takes no ``avg_factor`` ("sum"), model
    outputs or inputs of a dtype the loss input cannot read (floating values of any precision go to float inputs,
    through a Cast), and a new graph input that two loss inputs would read with different dtypes, ranks or static
    sizes.

    Returns:
        The entries as ``(name, loss, mapping, variant)``, each config built into its loss module (graph paths stay
        paths).
    """
    graph = model.graph
    model_outputs = {value.name: value for value in graph.output}
    model_inputs = {value.name for value in graph.input}
    model_values = {value.name: value for value in [*graph.input, *graph.output]}
    internal = {name for node in graph.node for name in node.output} | {value.name for value in graph.initializer}
    internal -= set(model_outputs) | model_inputs
    taken = set(model_outputs) | model_inputs | internal
    planned: list[PlannedLoss] = []
    new_input_users: dict[str, tuple[str, int, Optional[list[object]]]] = {}
    for entry in losses:
        if not (isinstance(entry, (tuple, list)) and len(entry) in (3, 4)):
            raise AttachError(
                f"each loss is a (name, loss_or_config, input_mapping[, variant]) tuple, got {entry!r}"
            )
        name, loss, mapping = entry[:3]
        variant = entry[3] if len(entry) == 4 else None
        taken.add(_check_name(name, taken))
        if not isinstance(mapping, Mapping) or not all(isinstance(v, str) for v in mapping.values()):
            raise AttachError(f"loss {name!r}: the input mapping must map input names to names, got {mapping!r}")
        check_sources(name, mapping, model_inputs, list(model_outputs), new_inputs, model_label)
        for key, source in mapping.items():
            if source in internal:
                raise AttachError(
                    f"loss {name!r} input {key!r}: {source!r} is an internal value of {model_label}, not one of its "
                    "outputs; make it an output of the model, or name the new input otherwise"
                )
        if isinstance(loss, str) and loss in MODELS and not Path(loss).exists():
            raise AttachError(
                f"loss {name!r}: {loss!r} is a loss type, read here as a graph path; pass dict(type={loss!r})"
            )
        if isinstance(loss, (str, os.PathLike)):
            if variant is not None:
                raise AttachError(
                    f"loss {name!r}: a loss graph has the input layout it was exported in; variant={variant!r} "
                    "applies to a config"
                )
            loss_inputs = _loss_graph_inputs(name, loss, mapping)
        else:
            loss = as_loss(loss)
            try:
                loss_inputs = _loss_module_inputs(name, loss, mapping, variant)
            except AttachError as error:
                raise AttachError(f"{error}{_variant_hint(loss, variant, mapping, model_values)}") from None
        symbols: dict[str, tuple[int, str]] = {}
        for key, source in mapping.items():
            what = f"loss {name!r} input {key!r}"
            target_type, target_shape = loss_inputs[key]
            if source in model_values:
                try:
                    _check_readable(what, model_values[source], target_type, target_shape, symbols)
                except AttachError as error:
                    hint = _variant_hint(loss, variant, mapping, model_values) if isinstance(loss, nn.Module) else ""
                    raise AttachError(f"{error}{hint}") from None
            else:
                _check_same_new_input(what, source, (target_type, target_shape), new_input_users)
        planned.append((name, loss, mapping, variant))
    return planned


def _variant_hint(
    loss: nn.Module, chosen: Optional[str], mapping: Mapping[str, str], model_values: Mapping[str, onnx.ValueInfoProto]
) -> str:
    """Where a loss given as a config is refused in the input layout ``chosen`` (None: its default), the other
    layouts of the loss (``spec_for(loss, variant)``) that take this mapping (a sigmoid CrossEntropyLoss on (N, C)
    logits with labels, an RPN's or YOLOX's, is the ``labels`` or ``dense`` layout), and how to choose one. "" where
    none fits."""
    try:
        variants = spec_for(loss).variants
    except (KeyError, ValueError):
        return ""
    current = variants[0] if chosen is None else chosen
    if current not in variants:
        return ""
    fitting = []
    for variant in variants:
        if variant == current:
            continue
        symbols: dict[str, tuple[int, str]] = {}
        try:  # the checks check_plan makes, in this layout
            inputs = _loss_module_inputs("", loss, mapping, variant)
            for key, source in mapping.items():
                if source in model_values:
                    _check_readable("", model_values[source], *inputs[key], symbols)
        except AttachError:
            continue
        fitting.append(variant)
    if not fitting:
        return ""
    shown = " or ".join(repr(variant) for variant in fitting)
    return (
        f". That is {type(loss).__name__}'s {current!r} input layout; the {shown} layout takes this mapping: attach "
        f"it with (name, config, mapping, {fitting[0]!r}) in Python, \"variant\": \"{fitting[0]}\" in an attach spec"
    )


def _check_same_new_input(
    what: str,
    source: str,
    target: tuple[int, Optional[list[object]]],
    users: dict[str, tuple[str, int, Optional[list[object]]]],
) -> None:
    """Every loss input that new graph input ``source`` feeds takes one dtype, rank and static sizes (integer labels
    for one loss and soft float labels for another cannot share a name), checked before any export."""
    first, first_type, first_shape = users.setdefault(source, (what, *target))
    target_type, target_shape = target
    if first_type != target_type:
        raise AttachError(
            f"{what}: the new input {source!r} would be {_dtype_name(target_type)} here but {first} takes "
            f"{_dtype_name(first_type)}; give one of them another name"
        )
    if first_shape is None or target_shape is None:
        return
    clash = len(first_shape) != len(target_shape) or any(
        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(first_shape, target_shape)
    )
    if clash:
        raise AttachError(
            f"{what}: the new input {source!r} would have shape {_shown(target_shape)} here but {first} takes "
            f"{_shown(first_shape)}; give one of them another name"
        )


def _shown(shape: Sequence[object]) -> str:
    return "(" + ", ".join(str(dim) for dim in shape) + ("," if len(shape) == 1 else "") + ")"


def _loss_graph_inputs(
    name: str, path: Union[str, os.PathLike[str]], mapping: Mapping[str, str]
) -> dict[str, tuple[int, Optional[list[object]]]]:
    """The element type and dims of each input of the loss graph at ``path`` that ``mapping`` names, once the graph
    is known to load, to have those inputs and to give one 0-d output ``loss``."""
    graph = load_model(path).graph
    inputs = {value.name: value for value in graph.input}
    unknown = sorted(set(mapping) - set(inputs))
    if unknown:
        raise AttachError(f"loss {name!r} ({path}) has no input(s) {', '.join(unknown)}; it has {sorted(inputs)}")
    if [value.name for value in graph.output] != ["loss"]:
        raise AttachError(f"loss graph {name!r} ({path}) must have the single output 'loss' (export_onnx writes it)")
    output_dims = [_dims(value) for value in graph.output]
    if output_dims != [[]]:
        why = "its output's shape is not recorded" if None in output_dims else f"its outputs have shapes {output_dims}"
        raise AttachError(f"loss graph {name!r} ({path}) must have one 0-d output, the reduced loss; {why}")
    return {key: (inputs[key].type.tensor_type.elem_type, _dims(inputs[key])) for key in mapping}


def _loss_module_inputs(
    name: str, module: nn.Module, mapping: Mapping[str, str], variant: Optional[str]
) -> dict[str, tuple[int, Optional[list[object]]]]:
    """The ONNX element type and shape (its ``variant`` spec's) of each input of ``module`` that ``mapping`` names,
    once the configuration is known to give a 0-d loss that takes those inputs."""
    try:
        spec = spec_for(module, variant)
    except (KeyError, ValueError) as error:  # an unknown variant names the loss's layouts
        raise AttachError(f"loss {name!r}: {error}") from None
    inputs = {t.name: t for t in spec.inputs}
    unknown = sorted(set(mapping) - set(inputs))
    if unknown:
        raise AttachError(
            f"loss {name!r} ({type(module).__name__}) has no input(s) {', '.join(unknown)}; "
            f"its inputs are {', '.join(spec.names)}"
        )
    reduction = getattr(module, "reduction", None)
    if reduction == "none":
        raise AttachError(
            f"loss {name!r}: reduction='none' gives no 0-d output to attach; use 'mean' or 'sum' (or export the "
            "loss with export_onnx and run it beside the model)"
        )
    if reduction == "sum" and "avg_factor" in mapping:
        raise AttachError(f"loss {name!r}: reduction='sum' takes no avg_factor (as in MMDetection); leave it out")
    return {
        key: (onnx.TensorProto.INT64 if inputs[key].kind == INT64 else onnx.TensorProto.FLOAT, list(inputs[key].shape))
        for key in mapping
    }


@one_export_at_a_time(*ONNX_EXPORTER_MODULES)
def attach_losses(
    model_onnx_path: PathLike,
    losses: Sequence[Attachment],
    out_path: PathLike,
    *,
    overwrite: bool = False,
    opset: Optional[int] = None,
    manifest: bool = True,
    new_inputs: Collection[str] = (),
) -> Path:
    """Write ``model_onnx_path`` merged with one loss graph per entry of ``losses`` to ``out_path``.

    Args:
        model_onnx_path: the model. External data must lie inside its directory.
        losses: ``(name, loss, mapping)`` triples. ``loss`` is a built loss, a loss config
            (``dict(type=..., ...)``) or the path of an exported loss graph; ``mapping`` takes the loss's input
            names (see :func:`visdet_export.specs.spec_for`) to a model output name (connected) or to any other
            name (a new graph input, shared by every loss that names it, and by the inputs of one loss that
            name it). The loss's 0-d value becomes the output ``name``.
        out_path: the merged model; written atomically, never over an existing file unless ``overwrite``.
        opset: the default-domain opset of the result; by default the model's (at least 18). The model is
            converted with ``onnx.version_converter`` when it differs, loss graphs are exported at it.
        manifest: also write ``<out_path>.json`` (losses, mappings, versions, checksum).
        new_inputs: names that are meant as new graph inputs. Only needed for a name close to a model output
            (``"cls_scores"`` beside ``"cls_score"``), which is otherwise refused as a likely typo.

    Returns:
        ``out_path``.

    Raises:
        AttachError: unsafe external data, unknown or duplicate names, a mapping to an input the loss does not
            have, a name that looks like a misspelled model output, an element type or static shape mismatch
            between a model output (or a shared new input) and a loss input, or a model that cannot be converted
            to the opset.
    """
    out = Path(out_path)
    if out.exists() and not overwrite:  # fail before spending time on exports
        raise AttachError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not losses:
        raise AttachError("give at least one (name, loss, mapping) to attach")
    model = load_model(model_onnx_path)
    target_opset = max(_default_opset(model), MIN_OPSET) if opset is None else int(opset)
    if target_opset < MIN_OPSET:
        raise AttachError(f"opset={target_opset} is too old; loss graphs need opset >= {MIN_OPSET}")
    model = _to_opset(model, target_opset, f"model {model_onnx_path}")
    _own_metadata_under_its_output(model)

    model_outputs = {value.name: value for value in model.graph.output}
    keep_outputs = list(model_outputs)
    planned = check_plan(model, losses, new_inputs, f"model {model_onnx_path}")
    # a model with losses attached before keeps them on record (verify checks every one)
    described: dict[str, Any] = attached_losses_of(model)
    merged = model
    with tempfile.TemporaryDirectory(prefix="visdet-attach-") as scratch:
        for name, loss, mapping, variant in planned:
            graph, description = _loss_graph(name, loss, mapping, variant, target_opset, Path(scratch))
            merged = _merge_one(merged, graph, name, mapping, model_outputs, keep_outputs)
            keep_outputs.append(name)
            described[name] = {**description, "inputs": dict(mapping)}

    onnx.helper.set_model_props(
        merged, {**{p.key: p.value for p in merged.metadata_props}, ATTACHED_METADATA_KEY: json.dumps(described)}
    )
    _save_checked(merged, out, overwrite)
    if manifest:
        write_manifest(
            out,
            {
                "format": "onnx",
                "kind": "attached_losses",
                "model": str(Path(model_onnx_path).name),
                "losses": described,
                "opset": target_opset,
                "inputs": [value.name for value in merged.graph.input],
                "outputs": [value.name for value in merged.graph.output],
            },
            overwrite,
        )
    return out


def _own_metadata_under_its_output(model: onnx.ModelProto) -> None:
    """A model that is itself an exported loss graph: its own ``visdet_export.*`` keys (one loss's config, inputs
    and outputs) would describe the merged model, which has more inputs and outputs. They go under the name of its
    loss output (``loss/visdet_export.config``), as the attached losses' keys go under theirs."""
    props = {p.key: p.value for p in model.metadata_props}
    own = {
        key: value for key, value in props.items() if key.startswith(METADATA_PREFIX) and key != ATTACHED_METADATA_KEY
    }
    if not own:
        return
    outputs = [value.name for value in model.graph.output]
    try:
        recorded = json.loads(own.get(METADATA_PREFIX + "outputs", "[]"))
    except json.JSONDecodeError:
        recorded = []
    output = recorded[0] if isinstance(recorded, list) and recorded and recorded[0] in outputs else outputs[0]
    del model.metadata_props[:]
    onnx.helper.set_model_props(
        model,
        {**{key: value for key, value in props.items() if key not in own},
         **{output + SEPARATOR + key: value for key, value in own.items()}},
    )


def _merge_one(
    merged: onnx.ModelProto,
    loss_graph: onnx.ModelProto,
    name: str,
    mapping: Mapping[str, str],
    model_outputs: Mapping[str, onnx.ValueInfoProto],
    keep_outputs: list[str],
) -> onnx.ModelProto:
    """Merge one loss graph into ``merged`` with ``onnx.compose``."""
    prefix = name + SEPARATOR
    loss_inputs = {value.name: value for value in loss_graph.graph.input}
    absent = sorted(set(mapping) - set(loss_inputs))
    if absent:  # e.g. avg_factor of a reduction="sum" loss, which rejects it
        raise AttachError(
            f"the graph of loss {name!r} has no input(s) {', '.join(absent)}; it takes {sorted(loss_inputs)}"
        )
    if [value.name for value in loss_graph.graph.output] != ["loss"]:
        raise AttachError(f"loss graph {name!r} must have the single output 'loss'")
    loss_graph = onnx.compose.add_prefix(loss_graph, prefix)
    _prefix_dim_params(loss_graph.graph, prefix)
    _rename_value(loss_graph.graph, prefix + "loss", name)
    # Model-level metadata of several loss graphs would collide under the same keys.
    props = {prefix + p.key: p.value for p in loss_graph.metadata_props}
    del loss_graph.metadata_props[:]
    onnx.helper.set_model_props(loss_graph, props)

    existing_inputs = {value.name: value for value in merged.graph.input}
    io_map: list[tuple[str, str]] = []
    new_here: dict[str, onnx.ValueInfoProto] = {}
    symbols: dict[str, tuple[int, str]] = {}
    model_symbols: dict[str, tuple[str, str]] = {}

    def is_new(item: tuple[str, str]) -> bool:
        return item[1] not in model_outputs and item[1] not in existing_inputs

    # Connected inputs first: they give the sizes and symbols that name the new inputs' axes.
    for input_name, source in sorted(mapping.items(), key=is_new):
        target = loss_inputs[input_name]
        what = f"loss {name!r} input {input_name!r}"
        if source in model_outputs or source in existing_inputs:
            value = model_outputs[source] if source in model_outputs else existing_inputs[source]
            _check_readable(what, value, target.type.tensor_type.elem_type, _dims(target), symbols)
            if value.type.tensor_type.elem_type in CAST_TO_FLOAT32:
                _read_as_float32(loss_graph.graph, prefix + input_name, value.type.tensor_type.elem_type)
            _record_model_symbols(value, target, model_symbols, name)
            if source not in model_outputs and source not in {value.name for value in merged.graph.output}:
                # A graph input another loss (or the model) declared: route it through a temporary output.
                merged = _with_output(merged, value)
            io_map.append((source, prefix + input_name))
        elif source in new_here:  # a second input of this loss fed by the same new graph input
            # one graph input of the loss's own dtype: no cast
            _check_readable(what, new_here[source], target.type.tensor_type.elem_type, _dims(target), symbols, False)
            graph_inputs = loss_graph.graph.input
            del graph_inputs[[value.name for value in graph_inputs].index(prefix + input_name)]
            _rename_value(loss_graph.graph, prefix + input_name, source)
        else:
            if source in keep_outputs:
                raise AttachError(f"loss {name!r}: {source!r} is another loss's output, not an input")
            _rename_value(loss_graph.graph, prefix + input_name, source)
            new_here[source] = onnx.helper.make_value_info(source, target.type)
            new_input = next(value for value in loss_graph.graph.input if value.name == source)
            _name_new_input_axes(new_input, prefix, symbols, model_symbols)
    connected = {loss_input for _, loss_input in io_map}
    for value in loss_graph.graph.input:  # a loss graph's inputs the mapping leaves out: new inputs "<loss>/<input>"
        if value.name.startswith(prefix) and value.name not in connected:
            _name_new_input_axes(value, prefix, symbols, model_symbols)

    merged, loss_graph = _reconcile_ir(merged, loss_graph)
    try:
        result = onnx.compose.merge_models(
            merged, loss_graph, io_map=io_map, outputs=keep_outputs + [name], name=merged.graph.name
        )
    except (ValueError, onnx.checker.ValidationError) as error:
        raise AttachError(f"could not merge loss {name!r}: {error}") from error
    _dedupe_opsets(result)
    return result


def _with_output(model: onnx.ModelProto, value: onnx.ValueInfoProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(value)
    return copy


def _reconcile_ir(a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Both at the newer IR version (a newer IR reads every older graph); opsets were aligned before."""
    ir = max(a.ir_version, b.ir_version)
    a.ir_version = ir
    b.ir_version = ir
    return a, b


def _dedupe_opsets(model: onnx.ModelProto) -> None:
    """merge_models concatenates both opset import lists; keep one entry per domain (versions were aligned)."""
    seen: dict[str, int] = {}
    for entry in model.opset_import:
        seen.setdefault(entry.domain, entry.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in seen.items())


def _save_checked(model: onnx.ModelProto, out: Path, overwrite: bool) -> None:
    """Check and write atomically; past protobuf's 2 GiB limit the initializers go to ``<out>.data`` beside it."""
    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.checker.check_model(model, full_check=True)
        with atomic_output(out, overwrite) as tmp:
            onnx.save_model(model, str(tmp))
        return
    data_name = out.name + ".data"
    external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data_name)
    with tempfile.TemporaryDirectory(prefix=".visdet-attach-", dir=out.parent) as staging:
        model_file = Path(staging) / out.name
        onnx.save_model(model, str(model_file), save_as_external_data=True, location=data_name)
        onnx.checker.check_model(str(model_file), full_check=True)
        with atomic_output(out.parent / data_name, overwrite) as tmp_data, atomic_output(out, overwrite) as tmp:
            os.replace(Path(staging) / data_name, tmp_data)
            os.replace(model_file, tmp)


def attached_losses_of(model: onnx.ModelProto) -> dict[str, Any]:
    """The losses attached to ``model`` (names, configs, mappings), from its metadata; empty if none."""
    props = {p.key: p.value for p in model.metadata_props}
    return dict(json.loads(props[ATTACHED_METADATA_KEY])) if ATTACHED_METADATA_KEY in props else {}


def attached_losses(path: PathLike) -> dict[str, Any]:
    """The losses an :func:`attach_losses` model carries (name -> config/graph, plugins and input mapping)."""
    return attached_losses_of(onnx.load(str(path), load_external_data=False))


def verify_attached(path: PathLike, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What ``verify`` checks of a model with attached losses, which runs only on the model's own inputs: its
    checksum (read with the manifest), the merged graph (``onnx.checker``), and that each loss the manifest lists
    is embedded with the same config and is a 0-d output. Each loss graph was checked against eager PyTorch in
    onnxruntime when it was attached; ``evaluate`` runs the model on samples.

    Raises:
        MissingPluginError: an attached loss is registered by a plugin module (its ``plugins``) not imported.
        ArtifactError: (:class:`AttachError`) an invalid graph, losses differing from the manifest's or not 0-d,
            or a config that does not build.
    """
    path = Path(path)
    check_external_data(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    # full_check's shape inference raises its own error (no ValidationError) for shapes that disagree
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise AttachError(f"{path.name} is not a valid ONNX model: {first_line(error)}") from None
    embedded = attached_losses(path)
    if embedded != manifest.get("losses"):
        raise AttachError(f"the losses embedded in {path.name} differ from its manifest's")
    outputs = {value.name: _dims(value) for value in onnx.load(str(path), load_external_data=False).graph.output}
    not_scalar = sorted(name for name in embedded if outputs.get(name, [None]) != [])
    if not_scalar:
        raise AttachError(f"{path.name} has no 0-d output for the attached loss(es) {', '.join(not_scalar)}")
    for name, description in embedded.items():
        if "config" in description:  # a plugin's loss not loaded: say which plugin (older models record none)
            where = f"{path.name}, attached loss {name}"
            build_recorded_loss(dict(description["config"]), description.get("plugins"), location=where)
    return {
        "path": str(path),
        "format": "onnx",
        "attached": sorted(embedded),
        "summary": f"{len(embedded)} attached loss(es), checked when attached; the graph and checksum are intact",
        "passed": True,
    }


# --- batch evaluation ---------------------------------------------------------------------------------------------


Sample = Mapping[str, Any]


@dataclass
class EvaluationSummary:
    """Per-sample values and means of the scalar outputs of a graph over a set of samples.

    Attributes:
        outputs: the evaluated output names.
        values: output name -> one float per sample.
        seconds: wall time of the evaluation.
    """

    outputs: list[str]
    values: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    @property
    def mean(self) -> dict[str, float]:
        return {name: (math.fsum(v) / len(v) if v else math.nan) for name, v in self.values.items()}

    @property
    def nonfinite(self) -> dict[str, int]:
        return {name: sum(not math.isfinite(x) for x in v) for name, v in self.values.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "seconds": self.seconds,
            "mean": self.mean,
            "nonfinite": self.nonfinite,
            "per_sample": self.values,
        }

    def __str__(self) -> str:
        width = max([len(name) for name in self.outputs] + [6])
        lines = [f"{self.count} samples in {self.seconds:.2f} s", f"{'output':<{width}}  {'mean':>14}  non-finite"]
        for name in self.outputs:
            lines.append(f"{name:<{width}}  {self.mean[name]:>14.8g}  {self.nonfinite[name]}")
        return "\n".join(lines)


class _Progress:
    """A one-line progress counter on stderr (rate-limited); silent when disabled."""

    def __init__(self, total: Optional[int], label: str, enabled: bool, stream: Optional[TextIO] = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = sys.stderr if stream is None else stream  # looked up now: stderr may be redirected
        self.count = 0
        self.start = self.last = time.monotonic()

    def update(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.1 or self.count == self.total):
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            rate = self.count / max(now - self.start, 1e-9)
            self.stream.write(f"\r{self.label}: {self.count}{of} samples ({rate:.0f}/s)")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.count:
            self.stream.write("\n")
            self.stream.flush()


def load_samples(path: PathLike) -> list[dict[str, np.ndarray]]:
    """Samples from an ``.npz``: keys ``"<index>/<input>"`` (any shapes per sample, as :func:`save_samples`
    writes), or plain input names holding arrays stacked along a leading sample axis."""
    with np.load(str(path), allow_pickle=False) as data:
        keys = list(data.keys())
        if not keys:  # no samples (evaluate says so), not a stacked file without a sample axis
            return []
        if all(SEPARATOR in key for key in keys):
            grouped: dict[int, dict[str, np.ndarray]] = {}
            for key in keys:
                index, _, name = key.partition(SEPARATOR)
                if not index.isdigit():
                    raise AttachError(f"{path}: key {key!r} is not '<sample index>/<input name>'")
                grouped.setdefault(int(index), {})[name] = data[key]
            return [grouped[i] for i in sorted(grouped)]
        stacked = {key: data[key] for key in keys}
    lengths = {len(v) if v.ndim else -1 for v in stacked.values()}
    if len(lengths) != 1 or -1 in lengths:
        raise AttachError(f"{path}: stacked inputs need one common leading sample axis, got {sorted(lengths)}")
    return [{key: value[i] for key, value in stacked.items()} for i in range(lengths.pop())]


def save_samples(path: PathLike, samples: Iterable[Sample], *, overwrite: bool = False) -> Path:
    """Write samples (dicts of arrays, shapes free per sample) as ``"<index>/<input>"`` keys of an ``.npz``."""
    arrays = {
        f"{i}{SEPARATOR}{name}": _to_array(value) for i, sample in enumerate(samples) for name, value in sample.items()
    }
    out = Path(path)
    with atomic_output(out, overwrite) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type, unused-ignore]  # numpy 2's stubs fear a key "allow_pickle"
    return out


def _to_array(value: Any) -> np.ndarray:
    """A numpy array from an array, a number or a (CPU or device) tensor."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bfloat16
    return np.asarray(value)


def _feeds(sample: Sample, graph_inputs: Mapping[str, onnx.ValueInfoProto], index: int) -> dict[str, Any]:
    missing = sorted(set(graph_inputs) - set(sample))
    extra = sorted(set(sample) - set(graph_inputs))
    if missing or extra:
        raise AttachError(
            f"sample {index}: "
            + (f"missing input(s) {', '.join(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unknown input(s) {', '.join(extra)}" if extra else "")
            + f"; the graph takes {', '.join(graph_inputs)}"
        )
    feeds = {}
    symbols: dict[str, tuple[int, str]] = {}
    for name, value in graph_inputs.items():
        elem_type = value.type.tensor_type.elem_type
        bfloat16 = elem_type == onnx.TensorProto.BFLOAT16
        # numpy has no bfloat16 (onnx maps it to ml_dtypes' from 1.19 and to float32 before): fed as bits, below
        dtype = np.dtype(np.float32 if bfloat16 else onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        array = _to_array(sample[name])
        if (array.dtype.kind == "f" and dtype.kind in "iub") or (array.dtype.kind == "b" and dtype.kind != "b"):
            raise AttachError(f"sample {index}: input {name!r} is {array.dtype} but the graph takes {dtype}")
        dims = _dims(value)
        # onnxruntime reads one symbol as one size when it plans buffers: a mismatch fails there unexplained
        mismatch = None if dims is None else shape_mismatch(name, dims, array.shape, symbols)
        if mismatch:
            raise AttachError(f"sample {index}: input {mismatch}")
        # not np.ascontiguousarray: it turns a 0-d avg_factor into shape (1,), which onnxruntime accepts silently
        feeds[name] = np.require(array.astype(dtype, copy=False), requirements="C")
        if bfloat16:  # rounded as torch rounds to bfloat16 (to nearest even); onnxruntime takes the bits
            import onnxruntime as ort

            bits = torch.from_numpy(feeds[name]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, elem_type)
    return feeds


def evaluate(
    onnx_path: PathLike,
    samples: Union[PathLike, Iterable[Sample]],
    *,
    outputs: Optional[Sequence[str]] = None,
    progress: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> EvaluationSummary:
    """Run ``onnx_path`` in onnxruntime on every sample and summarise its scalar outputs.

    Args:
        onnx_path: a loss graph or a merged model (external data must lie inside its directory).
        samples: an ``.npz`` (see :func:`load_samples`) or an iterable of dicts from input name to array/tensor;
            every graph input must be given, and values are cast to the graph's element types.
        outputs: the outputs to summarise; by default every output declared 0-d (each attached loss).
        progress: show a progress counter on stderr.

    Returns:
        :class:`EvaluationSummary` with per-sample values and means (non-finite values are counted, not dropped;
        every sample counts once in a mean, an empty one too).
    """
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise AttachError(f"{path} is not a file")
    check_external_data(path)
    model = onnx.load(str(path), load_external_data=False)
    scalar_outputs = [
        value.name
        for value in model.graph.output
        if value.type.tensor_type.HasField("shape") and len(value.type.tensor_type.shape.dim) == 0
    ]
    all_outputs = [value.name for value in model.graph.output]
    if outputs is None:
        if not scalar_outputs:
            raise AttachError(f"{path} has no 0-d output to summarise; name the outputs to evaluate")
        names = scalar_outputs
    else:
        names = list(outputs)
        unknown = sorted(set(names) - set(all_outputs))
        if unknown:
            raise AttachError(f"{path} has no output(s) {', '.join(unknown)}; it has {', '.join(all_outputs)}")
    session = ort.InferenceSession(str(path), providers=list(providers))
    if providers and providers[0] not in session.get_providers():  # onnxruntime falls back with a warning only
        raise AttachError(
            f"onnxruntime cannot run {providers[0]} here; it has {', '.join(ort.get_available_providers())}"
        )
    graph_inputs = {value.name: value for value in model.graph.input}
    if isinstance(samples, (str, os.PathLike)):
        samples = load_samples(samples)
    total = len(samples) if isinstance(samples, Sequence) else None
    summary = EvaluationSummary(outputs=names, values={name: [] for name in names})
    bar = _Progress(total, f"evaluate {path.name}", progress)
    start = time.perf_counter()
    try:
        for index, sample in enumerate(samples):
            results = session.run(names, _feeds(sample, graph_inputs, index))
            for name, result in zip(names, results):
                if np.ndim(result) != 0:
                    raise AttachError(
                        f"output {name!r} is not a scalar (shape {np.shape(result)}); it cannot be averaged"
                    )
                summary.values[name].append(float(result))
            bar.update()
    finally:
        bar.close()
    if not summary.values[names[0]]:
        raise AttachError("no samples to evaluate")
    summary.seconds = time.perf_counter() - start
    return summary


__all__ = [
    "AttachError",
    "EvaluationSummary",
    "attach_losses",
    "attached_losses",
    "evaluate",
    "load_model",
    "load_samples",
    "save_samples",
]
