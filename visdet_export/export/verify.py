"""Check an exported artifact against eager PyTorch on fresh random inputs.

:func:`verify` reads the artifact's manifest (its checksum must match), rebuilds the loss from the manifest's
config, draws fresh inputs from the loss's input spec, runs the artifact through the runner of its format
(``visdet_export.export.<format>.load_runner``) and eager PyTorch side by side, and compares them with the
tolerance of that format (:data:`TOLERANCES`). Joint artifacts (loss + gradient) are compared with eager autograd.

:func:`check_parity` is the comparison itself; the exporters call it on the freshly written file before it is
renamed into place, so an artifact that does not match eager is never left behind.

The element-wise test is ``|artifact - eager| <= atol + rtol * |eager|`` (``torch.testing.assert_close``), the
output shapes must be equal, and non-finite values must coincide.
"""

from __future__ import annotations

import importlib
import math
import os
import secrets
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, TypedDict

import torch
from torch import Tensor, nn

from ..specs import LossSpec, SampleOptions, spec_for
from .artifacts import ArtifactError, build_recorded_loss, read_manifest
from .joint import eager_joint

Runner = Callable[[Mapping[str, Tensor]], list[Tensor]]

#: Formats :func:`verify` dispatches on; each names a module ``visdet_export.export.<format>`` that provides
#: ``load_runner(path, manifest) -> Runner`` (and optionally ``embedded_config(path) -> dict | None``).
FORMATS = ("onnx", "torchscript", "pt2")


class Tolerance(TypedDict):
    """``torch.testing.assert_close``'s bounds."""

    rtol: float
    atol: float


#: Per-format tolerances against eager float32. onnxruntime reorders reductions and uses its own kernels
#: (rtol 1e-4, atol 1e-5, as the design asks); TorchScript runs the same aten kernels as eager, so it gets
#: ``assert_close``'s float32 defaults; AOTInductor fuses and may reorder sums, so a little more.
TOLERANCES: dict[str, Tolerance] = {
    "onnx": {"rtol": 1e-4, "atol": 1e-5},
    "torchscript": {"rtol": 1.3e-6, "atol": 1e-5},
    "pt2": {"rtol": 1e-5, "atol": 1e-5},
}

DEFAULT_SIZES = (0, 1, 7, 257)
#: Logits of the extreme-input check (uniform in [-r, r]): past onnxruntime's Log(Sigmoid) overflow at |x| ~ 18
#: and float32's exp overflow at ~88, where a loss written with the textbook formulas turns inf/NaN in one runtime.
EXTREME_LOGITS = 100.0
EXTREME_N = 64
#: The sample count of the check at other free sizes than the defaults.
SMALLER_SIZES_N = 7


def _as_float64(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float64)


def compare(actual: Tensor, expected: Tensor, *, rtol: float, atol: float) -> dict[str, Any]:
    """Compare one output with its eager value.

    Returns ``{"shape_ok", "ok", "max_abs_err", "max_rel_err"}``; the relative error is taken over elements
    with ``|expected| > atol`` (below that the absolute tolerance decides), and errors over finite elements.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return {"shape_ok": False, "ok": False, "max_abs_err": math.inf, "max_rel_err": math.inf}
    a, e = _as_float64(actual), _as_float64(expected)
    finite = torch.isfinite(a) & torch.isfinite(e)
    # Non-finite values must coincide: NaN with NaN, inf with an inf of the same sign.
    nonfinite_ok = bool(torch.all(finite | (a.isnan() & e.isnan()) | (a == e)))
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    within = bool(torch.all(diff <= atol + rtol * e.abs().where(finite, torch.zeros_like(e))))
    meaningful = finite & (e.abs() > atol)
    rel = torch.where(meaningful, diff / e.abs().clamp(min=atol), torch.zeros_like(a))
    return {
        "shape_ok": True,
        "ok": nonfinite_ok and within,
        "nonfinite_ok": nonfinite_ok,
        "max_abs_err": float(diff.max()) if diff.numel() else 0.0,
        "max_rel_err": float(rel.max()) if rel.numel() else 0.0,
    }


def _draws_logits(loss: nn.Module, spec: LossSpec, options: SampleOptions) -> bool:
    """Whether the spec's sampler takes ``logit_range`` (draws logits): box and regression losses do not."""
    drawn = [
        spec.sample(loss, 2, seed=0, options=replace(options, logit_range=logit_range))[spec.pred]
        for logit_range in (None, EXTREME_LOGITS)
    ]
    return not torch.equal(drawn[0], drawn[1])


def check_parity(
    runner: Runner,
    loss: nn.Module,
    spec: LossSpec,
    names: Sequence[str],
    *,
    joint: bool = False,
    sizes: Sequence[int] = DEFAULT_SIZES,
    seed: int = 0,
    rtol: float,
    atol: float,
    options: SampleOptions = SampleOptions(),
    free_sizes: Optional[Mapping[str, int]] = None,
    extreme: bool = True,
) -> dict[str, Any]:
    """Run ``runner`` and eager ``loss`` on the same random inputs at each size and compare every output; where
    the spec has free sizes (classes, bins), once more at N = 7 with ``free_sizes`` (by default
    :meth:`LossSpec.smaller_sizes`; ``{}``: no such check, for an artifact whose sizes are fixed); with ``extreme``,
    once more at N = :data:`EXTREME_N` with logits in [-:data:`EXTREME_LOGITS`, :data:`EXTREME_LOGITS`] (for specs
    whose sampler draws logits: ``SampleOptions.logit_range``).

    Returns the parity record (``sizes``, ``max_abs_err``, ``max_rel_err``, ``rtol``, ``atol``, ``seed``, the
    ``free_sizes`` of the last check where there is one, ``extreme_logits`` where that check ran, and one entry per
    check); raises :class:`ArtifactError` naming the sizes and output that differ.
    """
    outputs = ["loss", f"grad_{spec.pred}"] if joint else ["loss"]
    per_size: list[dict[str, Any]] = []
    max_abs = max_rel = 0.0
    other = dict(spec.smaller_sizes() if free_sizes is None else free_sizes)
    checks: list[tuple[int, dict[str, int], Optional[float]]] = [(int(n), {}, options.logit_range) for n in sizes]
    if other:
        checks.append((SMALLER_SIZES_N, other, options.logit_range))
    extreme = extreme and options.logit_range is None
    if extreme and not _draws_logits(loss, spec, options):
        extreme = False
        if any("logit" in t.doc.lower() for t in spec.inputs):
            warnings.warn(
                f"the spec of {spec.loss_type} documents logits but its sampler ignores SampleOptions.logit_range: "
                f"artifacts are not checked at logits to ±{EXTREME_LOGITS:g} (where onnxruntime's Log(Sigmoid) "
                "overflows); draw logits with visdet_export.specs.sample_logits",
                stacklevel=2,
            )
    if extreme:
        checks.append((EXTREME_N, {}, EXTREME_LOGITS))
    for index, (n, free, logit_range) in enumerate(checks):
        drawn = spec.sample(
            loss, n, seed=seed + index,
            options=replace(options, sizes={**options.sizes, **free}, logit_range=logit_range), include=list(names),
        )
        inputs = {name: drawn[name] for name in names}
        at = f"N={n}" + "".join(f", {symbol}={size}" for symbol, size in free.items())
        if logit_range != options.logit_range:
            at += f", logits in [-{logit_range:g}, {logit_range:g}]"
        if joint:
            expected = list(eager_joint(loss, spec, inputs))
        else:
            with torch.no_grad():
                expected = [spec.call(loss, inputs)]
        actual = runner(inputs)
        if len(actual) != len(expected):
            raise ArtifactError(f"the artifact returned {len(actual)} output(s), expected {len(expected)} ({outputs})")
        entry: dict[str, Any] = {"n": n, **({"free_sizes": free} if free else {})}
        if logit_range != options.logit_range:
            entry["logit_range"] = logit_range
        for name, got, want in zip(outputs, actual, expected):
            result = compare(got, want, rtol=rtol, atol=atol)
            if not result["shape_ok"]:
                raise ArtifactError(
                    f"{spec.loss_type}: output {name!r} at {at} has shape {tuple(got.shape)}, "
                    f"eager has {tuple(want.shape)}"
                )
            if not result["ok"]:
                if not result["nonfinite_ok"]:
                    raise ArtifactError(
                        f"{spec.loss_type}: output {name!r} at {at} is NaN or inf where eager's is not (or the "
                        f"reverse): {got.flatten()[:4].tolist()} against eager's {want.flatten()[:4].tolist()}"
                    )
                raise ArtifactError(
                    f"{spec.loss_type}: output {name!r} at {at} differs from eager beyond rtol={rtol}, atol={atol}: "
                    f"max abs error {result['max_abs_err']:.3g}, max rel error {result['max_rel_err']:.3g}"
                )
            entry[name] = {"max_abs_err": result["max_abs_err"], "max_rel_err": result["max_rel_err"]}
            max_abs = max(max_abs, result["max_abs_err"])
            max_rel = max(max_rel, result["max_rel_err"])
        per_size.append(entry)
    return {
        "sizes": [int(n) for n in sizes],
        **({"free_sizes": other} if other else {}),
        **({"extreme_logits": EXTREME_LOGITS} if extreme else {}),
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "rtol": rtol,
        "atol": atol,
        "seed": seed,
        "per_size": per_size,
    }


def format_module(fmt: object) -> Any:
    """The module implementing artifact format ``fmt`` (only the names in :data:`FORMATS` are ever imported)."""
    if fmt not in FORMATS:
        raise ArtifactError(f"unknown artifact format {fmt!r}; supported formats: {', '.join(FORMATS)}")
    try:
        return importlib.import_module(f"{__package__}.{fmt}")
    except ImportError as exc:
        raise ArtifactError(f"{fmt} artifacts cannot be verified here: {exc}") from exc


def declared_free_sizes(manifest: Mapping[str, Any], spec: LossSpec) -> dict[str, int]:
    """The spec's smaller free sizes that the artifact's manifest names as symbols (an artifact of an earlier
    version fixed the class count: its manifest writes 80, and it is checked at its own sizes only)."""
    declared = {dim for item in manifest.get("inputs", []) for dim in item.get("shape", []) if isinstance(dim, str)}
    return {symbol: size for symbol, size in spec.smaller_sizes().items() if symbol in declared}


def _manifest_names(manifest: Mapping[str, Any], spec: LossSpec) -> list[str]:
    try:
        names = [str(entry["name"]) for entry in manifest["inputs"]]
    except (KeyError, TypeError) as exc:
        raise ArtifactError("the manifest has no valid 'inputs' list") from exc
    unknown = [name for name in names if name not in spec.names]
    missing = [t.name for t in spec.inputs if not t.optional and t.name not in names]
    if unknown or missing:
        raise ArtifactError(
            f"the manifest's inputs {names} do not fit {spec.loss_type} ({spec.variant}): "
            f"unknown {unknown}, missing {missing}; the spec's inputs are {spec.names}"
        )
    return names


def verify(
    path: str | os.PathLike[str], *, sizes: Sequence[int] = DEFAULT_SIZES, seed: Optional[int] = None
) -> dict[str, Any]:
    """Reload the artifact at ``path`` and compare it with eager PyTorch on fresh random inputs.

    Only ``path`` and its manifest ``<path>.json`` are read (ONNX external data must lie in the model's
    directory). Note that verifying a TorchScript artifact loads it, and TorchScript is code. A ``.pt2`` bundle of
    several losses (:func:`~visdet_export.export.pt2.export_pt2_bundle`) is checked entry by entry; a model with
    attached losses as :func:`~visdet_export.export.attach.verify_attached` says.

    Args:
        path: the artifact.
        sizes: sample counts N to check.
        seed: seed of the random inputs (default: a fresh random seed, reported back).

    Returns:
        A report: ``path``, ``format``, ``loss_type``, ``variant``, ``joint``, ``sizes``, ``seed``,
        ``max_abs_err``, ``max_rel_err``, ``rtol``, ``atol``, ``per_size`` and ``passed`` (True).

    Raises:
        ValueError: no sizes, or a negative one.
        MissingPluginError: the manifest's loss is registered by a plugin module (its ``plugins``) not imported.
        ArtifactError: missing or mismatching manifest (checksum), unknown format, a config that does not build,
            or outputs that differ from eager (or, for ONNX, a config embedded in the model that differs from
            the manifest's).
    """
    if not sizes or any(int(n) < 0 for n in sizes):
        raise ValueError(f"sizes must be sample counts >= 0, at least one, got {list(sizes)}")
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is not a file")
    manifest = read_manifest(path)
    if manifest.get("kind") == "attached_losses":
        from .attach import verify_attached

        return verify_attached(path, manifest)
    fmt = manifest.get("format")
    module = format_module(fmt)
    if manifest.get("bundle"):  # several losses in one package: each entry is checked against its own config
        return module.verify_bundle(path, sizes=sizes, seed=seed)
    config = manifest.get("config")
    if not isinstance(config, Mapping):
        raise ArtifactError(f"the manifest of {path.name} has no loss config")
    loss = build_recorded_loss(config, manifest.get("plugins"), location=path.name)
    try:
        spec = spec_for(loss, manifest.get("variant"))
    except (ValueError, KeyError, TypeError) as exc:  # ConfigError is a ValueError
        raise ArtifactError(f"the manifest's config does not build a loss: {exc}") from exc
    if manifest.get("loss_type", spec.loss_type) != spec.loss_type:
        raise ArtifactError(
            f"the manifest says loss_type {manifest.get('loss_type')!r} but its config builds {spec.loss_type}"
        )
    names = _manifest_names(manifest, spec)
    dtype = manifest.get("dtype", "float32")
    if dtype != "float32":
        raise ArtifactError(f"only float32 artifacts can be verified, the manifest says {dtype!r}")
    joint = bool(manifest.get("joint", False))
    tolerance = TOLERANCES[str(fmt)]
    seed = secrets.randbelow(2**31) if seed is None else int(seed)

    runner = module.load_runner(path, manifest)
    report: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "loss_type": spec.loss_type,
        "variant": spec.variant,
        "joint": joint,
        "passed": False,
    }
    try:
        parity = check_parity(
            runner, loss, spec, names, joint=joint, sizes=sizes, seed=seed,
            free_sizes=declared_free_sizes(manifest, spec), **tolerance,
        )
    except ArtifactError as exc:
        raise ArtifactError(f"{path.name} does not match its manifest's loss (seed {seed}): {exc}") from exc
    embedded = getattr(module, "embedded_config", None)
    if embedded is not None:
        recorded = embedded(path)
        if recorded is not None and dict(recorded) != dict(config):
            raise ArtifactError(
                f"the config embedded in {path.name} ({recorded}) differs from its manifest's ({dict(config)})"
            )
    report.update(parity)
    report["passed"] = True
    return report


__all__ = ["DEFAULT_SIZES", "FORMATS", "TOLERANCES", "check_parity", "compare", "format_module", "verify"]
