"""The ``visdet-export`` command (also ``python -m visdet_export``).

Commands::

    visdet-export export (--loss CFG | --recipe NAME | --config FILE) --out DIR
                         [--format onnx,torchscript,pt2,onnx-joint,pt2-joint] [--only PATH,...] [--name NAME]
                         [--variant NAME] [--optional NAMES] [--skip-unknown] [--overwrite] [--no-verify]
                         [--opset N] [--quiet]
    visdet-export list [--recipes] [--inputs] [--json]
    visdet-export verify PATH... [--seed N]
    visdet-export attach MODEL.onnx OUT.onnx --spec ATTACH.json [--opset N] [--overwrite]
    visdet-export evaluate GRAPH.onnx SAMPLES.npz [--output NAME ...] [--json]
    visdet-export check [ARGS...]      (the runtime matrix: visdet_export.check)
    visdet-export bench [ARGS...]      (benchmarks/run.py; source checkouts only)
    visdet-export cpp [ARGS...]        (C++ toolchain smoke test: visdet_export.cpp)

Exit status: 0 on success, 1 when an export or a verification failed, 2 for a usage or input mistake (unknown
recipe, bad or unsafe config, an output that exists, a symlinked output); 130 when interrupted. Mistakes are
reported in one line without a traceback; ``--debug`` shows the traceback of unexpected failures. ``check``,
``bench`` and ``cpp`` take their own options (``visdet-export bench --help``) and return their own status.

The functions :func:`plan_exports`, :func:`export_losses` and :func:`export_groups` are the batch API the command
and the scripts in ``export_scripts/`` share (the scripts through :func:`run_export_script`); run it inside
:func:`stop_signals`, as they do, so that SIGTERM cleans up as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .validation import PLUGINS_VARIABLE, ConfigError, plugin_names

PROG = "visdet-export"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


@dataclass(frozen=True)
class Format:
    """One artifact format: its file suffix, the exporter function name and the keywords it gets."""

    name: str
    suffix: str
    exporter: str
    options: Mapping[str, Any] = field(default_factory=dict)
    runs_code: bool = False  # loading the artifact executes code it contains
    description: str = ""


FORMATS: dict[str, Format] = {
    "onnx": Format("onnx", ".onnx", "export_onnx", {}, False, "ONNX graph of the loss (onnxruntime)"),
    "onnx-joint": Format(
        "onnx-joint", ".joint.onnx", "export_onnx", {"joint": True}, False, "ONNX graph of the loss and its gradient"
    ),
    "torchscript": Format(
        "torchscript", ".ts.pt", "export_torchscript", {}, True, "TorchScript module (torch.jit / libtorch C++)"
    ),
    "pt2": Format("pt2", ".pt2", "export_pt2", {}, True, "torch.export / AOTInductor package"),
    "pt2-joint": Format(
        "pt2-joint", ".joint.pt2", "export_pt2", {"joint": True}, True, "AOTInductor package of loss and gradient"
    ),
}
FORMAT_ALIASES = {"ts": "torchscript", "jit": "torchscript", "torch.export": "pt2", "aoti": "pt2"}
DEFAULT_FORMATS = "onnx,torchscript"

# Artifact names come from config keys: keep them to plain file names (no separators, no leading dot).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


# ---------------------------------------------------------------------------------------------------------------
# Batch API


@dataclass(frozen=True)
class Job:
    """One artifact to write: the loss at ``path`` in ``fmt`` to ``target``, in input ``variant`` (None: the
    loss's default)."""

    path: str
    config: Mapping[str, Any]
    fmt: Format
    target: Path
    variant: str | None = None


@dataclass
class Result:
    job: Job
    ok: bool
    seconds: float = 0.0
    size: int | None = None
    parity: Any = None
    verified: bool = False
    error: str = ""


def parse_formats(text: str) -> list[Format]:
    """``"onnx,torchscript"`` -> formats; ``all`` is every format. Unknown names raise :class:`UsageError`."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            names.extend(FORMATS)
            continue
        name = FORMAT_ALIASES.get(name, name)
        if name not in FORMATS:
            raise UsageError(
                f"unknown format {raw.strip()!r}; choose from {', '.join(FORMATS)} (comma-separated) or all"
            )
        names.append(name)
    if not names:
        raise UsageError(f"no format given; choose from {', '.join(FORMATS)}")
    return [FORMATS[name] for name in dict.fromkeys(names)]


def artifact_name(path: str, fmt: Format) -> str:
    """``model.bbox_head.loss_cls`` + onnx -> ``model.bbox_head.loss_cls.onnx`` (checked to be a plain file name)."""
    if not _SAFE_NAME.fullmatch(path) or ".." in path:
        raise UsageError(
            f"the loss path {path!r} cannot be used as a file name; config keys used as loss names may hold only "
            "letters, digits, '_', '-' and '.' (give --name for a --loss)"
        )
    return f"{path}{fmt.suffix}"


def input_variants(
    losses: Mapping[str, Mapping[str, Any]], variants: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """The input variant each loss is exported in: ``variants[path]`` where given, else the layout its detector
    head calls it with (:func:`visdet_export.specs.head_variant`)."""
    from .specs import head_variant

    return {path: (variants or {}).get(path, head_variant(path, cfg)) for path, cfg in losses.items()}


def build_checked(losses: Mapping[str, Mapping[str, Any]], variants: Mapping[str, str] | None = None) -> None:
    """Build every loss and look up its input spec (in its variant), so a bad entry fails before anything is
    written."""
    from .registry import build_loss
    from .specs import spec_for

    chosen = input_variants(losses, variants)
    for path, cfg in losses.items():
        try:
            loss = build_loss(dict(cfg))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{path}: {cfg!r} cannot be built: {error}") from None
        try:
            spec_for(loss, chosen[path])
        except (KeyError, ValueError) as error:
            message = error.args[0] if error.args else str(error)
            raise ConfigError(f"{path}: {message}") from None


def plan_exports(
    losses: Mapping[str, Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    formats: Sequence[Format],
    overwrite: bool,
    variants: Mapping[str, str] | None = None,
) -> list[Job]:
    """The artifacts to write, after checking every target up front (``variants``: see :func:`input_variants`).

    Raises:
        UsageError: ``out_dir`` is a symlink or a file, a target (or its manifest) exists and ``overwrite`` is
            false, or a target is a symlink or a directory. Nothing has been written when this is raised.
    """
    out = Path(out_dir)
    if out.is_symlink():
        raise UsageError(f"refusing to write into {out}: it is a symlink; give the real directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    jobs: list[Job] = []
    problems: list[str] = []
    chosen = input_variants(losses, variants)
    for path, cfg in losses.items():
        for fmt in formats:
            target = out / artifact_name(path, fmt)
            jobs.append(Job(path, cfg, fmt, target, chosen[path]))
            for candidate in (target, Path(f"{target}.json")):
                if candidate.is_symlink():
                    problems.append(f"{candidate} is a symlink (refused even with --overwrite)")
                elif candidate.is_dir():
                    problems.append(f"{candidate} is a directory")
                elif candidate.exists() and not overwrite:
                    problems.append(f"{candidate} exists")
    if problems:
        hint = "" if overwrite or not any(p.endswith(" exists") for p in problems) else "; pass --overwrite to replace"
        listing = "\n  ".join(problems)
        raise UsageError(f"nothing was written; {len(problems)} output path(s) cannot be used{hint}:\n  {listing}")
    return jobs


def _exporters() -> Any:
    try:
        from . import export as export_api
    except ImportError as error:  # pragma: no cover - the package always ships export/
        raise RuntimeError(f"the export API cannot be imported: {error}") from error
    return export_api


class UnavailableError(RuntimeError):
    """A requested format or command that this installation cannot provide (exit status 1)."""


def resolve_exporter(fmt: Format) -> Callable[..., Any]:
    """The exporter function of ``fmt``; :class:`UnavailableError` if this installation lacks it."""
    try:
        exporter = getattr(_exporters(), fmt.exporter, None)
    except ImportError as error:
        raise UnavailableError(f"the {fmt.name} format is not available in this installation ({error})") from None
    if exporter is None:
        raise UnavailableError(f"the {fmt.name} format is not available in this installation (no {fmt.exporter})")
    return exporter


def _run_job(
    job: Job, *, verify: bool, overwrite: bool, opset: int | None, optional_inputs: Sequence[str] | None
) -> Result:
    from .export.artifacts import read_manifest

    exporter = resolve_exporter(job.fmt)
    options: dict[str, Any] = dict(job.fmt.options)
    if opset is not None and job.fmt.exporter == "export_onnx":
        options["opset"] = opset
    if optional_inputs is not None and job.fmt.exporter != "export_torchscript":  # scripted: optional arguments
        options["optional_inputs"] = tuple(optional_inputs)
    if job.variant is not None:
        options["variant"] = job.variant
    start = time.perf_counter()
    exporter(dict(job.config), job.target, verify=verify, overwrite=overwrite, **options)
    seconds = time.perf_counter() - start
    manifest = read_manifest(job.target)
    return Result(
        job,
        True,
        seconds=seconds,
        size=job.target.stat().st_size,
        parity=manifest.get("parity"),
        verified=verify,
    )


def export_losses(
    losses: Mapping[str, Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    formats: Sequence[Format] | str = DEFAULT_FORMATS,
    *,
    verify: bool = True,
    overwrite: bool = False,
    opset: int | None = None,
    progress: bool = True,
    debug: bool = False,
    stream: TextIO | None = None,
    variants: Mapping[str, str] | None = None,
    optional_inputs: Sequence[str] | None = None,
) -> list[Result]:
    """Export every loss (dotted path -> config) in every format into ``out_dir``; one :class:`Result` each.

    Every loss is built and every target checked before the first file is written (see :func:`plan_exports`).
    A failing artifact is reported in its result and the others still run. ``variants``: see
    :func:`input_variants`. ``optional_inputs``: the optional inputs ONNX graphs and ``.pt2`` packages take
    (None: ``weight`` and ``avg_factor``); scripted modules take every one as an optional argument.

    Raises:
        ConfigError: a loss cannot be built. UsageError: an output path cannot be used.
    """
    if isinstance(formats, str):
        formats = parse_formats(formats)
    build_checked(losses, variants)
    jobs = plan_exports(losses, out_dir, formats, overwrite, variants)
    for fmt in formats:  # a missing exporter fails before anything is written
        resolve_exporter(fmt)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    stream = sys.stderr if stream is None else stream
    results: list[Result] = []
    with _Progress(len(jobs), enabled=progress, stream=stream) as bar:
        for index, job in enumerate(jobs, 1):
            bar.describe(f"{job.path} [{job.fmt.name}]")
            try:
                with _stop_on_signal():
                    result = _run_job(
                        job, verify=verify, overwrite=overwrite, opset=opset, optional_inputs=optional_inputs
                    )
            except KeyboardInterrupt:
                _remove_unfinished(job.target)
                raise
            except Exception as error:  # noqa: BLE001 - reported per artifact, the batch goes on
                if debug:
                    traceback.print_exc(file=stream)
                result = Result(job, False, error=f"{type(error).__name__}: {_one_line(error)}")
            results.append(result)
            status = "ok" if result.ok else f"FAILED: {result.error}"
            bar.step(f"[{index}/{len(jobs)}] {job.target.name}: {status} ({result.seconds:.1f} s)")
    return results


def _remove_unfinished(target: Path) -> None:
    """An export interrupted between putting its artifact in place and writing the manifest leaves an artifact its
    manifest does not describe: remove both, so that what is left is complete."""
    from .export.artifacts import ArtifactError, manifest_path, read_manifest

    if target.exists():
        try:
            read_manifest(target)
        except ArtifactError:
            target.unlink(missing_ok=True)
            manifest_path(target).unlink(missing_ok=True)


class _Progress:
    """A tqdm bar on a terminal; one line per finished step otherwise (logs stay readable)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO) -> None:
        self.enabled = enabled
        self.stream = stream
        self.bar: Any = None
        if enabled and _isatty(stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=stream, unit="artifact", dynamic_ncols=True, leave=False)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)

    def step(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
            self.bar.update(1)
        elif self.enabled:
            print(line, file=self.stream, flush=True)


def export_groups(
    groups: Mapping[str, Mapping[str, Mapping[str, Any]]],
    out_dir: Path,
    formats: Sequence[Format],
    *,
    verify: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
) -> int:
    """Export several groups of losses (one recipe or one detector config each) into ``out_dir/<group>``.

    Every loss is built and every target checked before the first file is written (raising ``ConfigError``,
    ``UsageError`` or ``ArtifactError``); then each group is exported with a summary table. Returns 0, or 1 when
    an artifact failed.
    """
    for name, losses in groups.items():
        build_checked(losses)
        plan_exports(losses, out_dir / name, formats, overwrite)
    failed = total = 0
    for name, losses in groups.items():
        if not quiet:
            print(f"== {name}: {len(losses)} loss(es)", file=sys.stderr)
        results = export_losses(losses, out_dir / name, formats, verify=verify, overwrite=overwrite, progress=not quiet)
        print(f"\n{name}\n{summary_table(results)}")
        failed += sum(not r.ok for r in results)
        total += len(results)
    print(f"\n{total - failed} of {total} artifact(s) written to {out_dir}" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def run_export_script(
    prog: str,
    groups: Callable[[], Mapping[str, Mapping[str, Mapping[str, Any]]]],
    out_dir: Path,
    formats: str,
    *,
    verify: bool,
    overwrite: bool,
    quiet: bool,
) -> int:
    """The ``main`` of a batch script (``export_scripts/``): :func:`export_groups` of what ``groups()`` reads, inside
    :func:`stop_signals`. A mistake in the inputs (ConfigError, UsageError, ArtifactError) is one line and exit 2,
    an interruption exit 130; otherwise :func:`export_groups`' status."""
    from .export.artifacts import ArtifactError

    def export() -> int:
        try:
            return export_groups(
                groups(), out_dir, parse_formats(formats), verify=verify, overwrite=overwrite, quiet=quiet
            )
        except (ConfigError, UsageError, ArtifactError) as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return EXIT_USAGE

    return _until_stopped(export, prog)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    return lines[0] if len(lines) == 1 else f"{lines[0]} (+{len(lines) - 1} more lines; --debug for details)"


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def format_parity(parity: Any, verified: bool = True) -> str:
    """A short text for a parity record (the manifest's ``parity`` field or a verify report)."""
    if not verified and not parity:
        return "not verified"
    if parity is None or parity == {}:
        return "-"
    if isinstance(parity, Mapping) and "summary" in parity:
        return str(parity["summary"])
    if isinstance(parity, Mapping) and "max_abs_err" in parity:
        text = f"max abs err {_g(parity['max_abs_err'])}, rel {_g(parity.get('max_rel_err'))}"
        if "rtol" in parity or "atol" in parity:
            text += f" (rtol {_g(parity.get('rtol'))}, atol {_g(parity.get('atol'))})"
        sizes = parity.get("sizes")
        if isinstance(sizes, Sequence) and not isinstance(sizes, str):
            text += f" at N={','.join(str(n) for n in sizes)}"
        free = parity.get("free_sizes")
        if isinstance(free, Mapping) and free:
            text += " and " + ", ".join(f"{symbol}={size}" for symbol, size in free.items())
        if "extreme_logits" in parity:
            text += f", logits to ±{parity['extreme_logits']:g}"
        if "seed" in parity:
            text += f", seed {parity['seed']}"
        return text
    if isinstance(parity, str):
        return parity
    if isinstance(parity, bool):
        return "passed" if parity else "FAILED"
    if isinstance(parity, (int, float)):
        return _g(parity)
    return json.dumps(parity, sort_keys=True, default=str)[:100]


def _g(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, row)) for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def summary_table(results: Sequence[Result]) -> str:
    rows = []
    for r in results:
        if r.ok:
            rows.append(
                [r.job.path, r.job.fmt.name, str(r.job.target), human_size(r.size), format_parity(r.parity, r.verified)]
            )
        else:
            rows.append([r.job.path, r.job.fmt.name, str(r.job.target), "-", f"FAILED: {r.error}"])
    return render_table(["loss", "format", "file", "size", "parity"], rows)


# ---------------------------------------------------------------------------------------------------------------
# Commands


def _format_default(value: object) -> str:
    import inspect

    if value is inspect.Parameter.empty:
        return "(required)"
    return repr(value)


def cmd_list(args: argparse.Namespace) -> int:
    if args.recipes:
        from .recipes import recipe_description, recipe_losses, recipe_names
        from .specs import head_variant

        recipes: dict[str, dict[str, Any]] = {
            name: {
                "description": recipe_description(name),
                "losses": {path: cfg for path, cfg in recipe_losses(name).items()},
            }
            for name in recipe_names()
        }
        if args.inputs:  # per recipe, {"inputs": {path: [...]}} beside its losses
            for record in recipes.values():
                record["inputs"] = {
                    path: input_spec(str(cfg["type"]), cfg, head_variant(path, cfg))
                    for path, cfg in record["losses"].items()
                }
        if args.json:
            print(json.dumps(recipes, indent=2))
            return EXIT_OK
        for name, record in recipes.items():
            print(f"{name}: {record['description']}")
            for path, cfg in record["losses"].items():
                options = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "type")
                print(f"    {path} = {cfg['type']}({options})")
                if args.inputs:
                    print(f"        {format_inputs(record['inputs'][path])}")
        return EXIT_OK

    import inspect

    from .registry import MODELS, config_parameters

    losses = {name: config_parameters(cls) for name, cls in sorted(MODELS.module_dict.items())}
    if args.json:
        records: dict[str, Any] = {
            name: {k: (None if v is inspect.Parameter.empty else v) for k, v in params.items()}
            for name, params in losses.items()
        }
        if args.inputs:  # {"parameters": {...}, "inputs": [...], "variants": [...]} per loss; else the parameters
            records = {
                name: {"parameters": params, "inputs": input_spec(name), "variants": list(variants_of(name))}
                for name, params in records.items()
            }
        print(json.dumps(records, indent=2, default=repr))
        return EXIT_OK
    rows = [
        [name, ", ".join(f"{k}={_format_default(v)}" for k, v in params.items())] for name, params in losses.items()
    ]
    if not args.inputs:
        print(render_table(["loss", "parameters (defaults)"], rows))
        return EXIT_OK
    blocks = []
    for name, parameters in rows:
        inputs = input_spec(name)
        if isinstance(inputs, str):
            block = f"    {inputs}"
        else:
            block = "\n".join(
                f"    {line}"
                for line in render_table(
                    ["input", "dtype[shape]", "", "meaning"],
                    [
                        [
                            t["name"],
                            f"{t['dtype']}[{', '.join(map(str, t['shape']))}]",
                            "optional" if t["optional"] else "required",
                            t.get("doc", ""),
                        ]
                        for t in inputs
                    ],
                ).splitlines()
            )
        variants = variants_of(name)
        if len(variants) > 1:
            block += f"\n    input variants (export --variant): {variants[0]} (default), {', '.join(variants[1:])}"
        blocks.append(f"{name}({parameters})\n{block}")
    print("\n\n".join(blocks))
    print(
        "\nN: the number of samples; C: classes, B: DFL bins (reg_max + 1), H x W: mask size, D: values per sample "
        "(free: exported graphs take any, random inputs draw 80, 17, 28 x 28, 4); integers: fixed by the "
        "configuration; float: the data's floating dtype (float32 by default). CrossEntropyLoss (softmax) takes the "
        "variants labels (default) and probabilities (float targets of pred's shape); with use_sigmoid=True, binary "
        "(default), labels and dense; with use_mask=True, mask (default) and points"
    )
    return EXIT_OK


def input_spec(
    loss_type: str, config: Mapping[str, Any] | None = None, variant: str | None = None
) -> list[dict[str, Any]] | str:
    """The inputs of ``loss_type`` built with ``config`` (its defaults by default) in input ``variant``: name,
    dtype, symbolic shape, optional; or the reason there is no spec (a string)."""
    from .registry import build_loss
    from .specs import spec_for

    try:
        spec = spec_for(build_loss({"type": loss_type, **(config or {})}), variant)
    except (KeyError, TypeError, ValueError) as error:
        return f"(no input spec: {_one_line(error)})"
    return [
        {
            "name": t.name,
            "dtype": t.kind,
            "shape": list(t.shape),
            "optional": t.optional,
            **({"doc": t.doc} if t.doc else {}),
        }
        for t in spec.inputs
    ]


def variants_of(loss_type: str, config: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The input variants of ``loss_type`` built with ``config``, the default first (none without a spec)."""
    from .registry import build_loss
    from .specs import spec_for

    try:
        return spec_for(build_loss({"type": loss_type, **(config or {})})).variants
    except (KeyError, TypeError, ValueError):
        return ()


def format_inputs(inputs: list[dict[str, Any]] | str) -> str:
    """``pred: float[N, 80], target: int64[N], weight?: float[N], avg_factor?: float[]``."""
    if isinstance(inputs, str):
        return inputs
    return ", ".join(
        f"{t['name']}{'?' if t['optional'] else ''}: {t['dtype']}[{', '.join(map(str, t['shape']))}]" for t in inputs
    )


def _select(losses: dict[str, dict[str, Any]], only: str | None) -> dict[str, dict[str, Any]]:
    if not only:
        return losses
    chosen: dict[str, dict[str, Any]] = {}
    for wanted in (item.strip() for item in only.split(",") if item.strip()):
        # a full dotted path, or its end when one path ends so (loss_bbox for model.bbox_head.loss_bbox)
        matches = [wanted] if wanted in losses else [path for path in losses if path.endswith("." + wanted)]
        if len(matches) != 1:
            problem = f"{wanted} names {', '.join(matches)}; give one" if matches else f"no loss named {wanted}"
            raise UsageError(f"--only: {problem}; this config has {', '.join(losses)}")
        chosen[matches[0]] = losses[matches[0]]
    return chosen


def _known_losses(losses: dict[str, dict[str, Any]], skip_unknown: bool) -> dict[str, dict[str, Any]]:
    """With ``--skip-unknown``, ``losses`` less those whose type this package does not register (said on stderr)."""
    from .registry import MODELS

    if not skip_unknown:
        return losses
    known = {}
    for path, cfg in losses.items():
        try:
            MODELS.get(cfg.get("type"))  # type: ignore[arg-type]
        except ConfigError:
            print(f"{PROG}: skipped {path}: {cfg.get('type')!r} is not a loss of this package", file=sys.stderr)
            continue
        known[path] = cfg
    if not known:
        raise UsageError("--skip-unknown left no loss to export")
    return known


def losses_from_args(args: argparse.Namespace) -> tuple[str, dict[str, dict[str, Any]]]:
    """(a description of the source, dotted path -> loss config) from --loss / --recipe / --config."""
    from .config import losses_from_file, parse_loss_string

    if args.loss is not None:
        cfg = parse_loss_string(args.loss)
        name = args.name or str(cfg["type"])
        return "--loss", {name: cfg}
    if args.name:
        raise UsageError("--name applies to --loss only (a recipe or config names its losses by their paths)")
    if args.variant:
        raise UsageError("--variant applies to --loss only (a recipe or config gives each loss its head's layout)")
    if args.recipe is not None:
        from .recipes import recipe_losses, recipe_path

        path = recipe_path(args.recipe)
        return f"recipe {path.stem}", recipe_losses(args.recipe)
    return f"config {args.config}", losses_from_file(args.config)


def check_opset(opset: int | None) -> None:
    """An ``--opset`` the ONNX exporters refuse is a usage mistake, reported before anything is written."""
    import onnx

    from .export.onnx import MIN_OPSET

    if opset is not None and opset < MIN_OPSET:
        raise UsageError(f"--opset {opset} is not supported; the loss graphs need opset >= {MIN_OPSET}")
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise UsageError(
            f"--opset {opset} is newer than this onnx {onnx.__version__} knows (at most "
            f"{onnx.defs.onnx_opset_version()})"
        )


def check_optional(
    value: str | None, losses: Mapping[str, Mapping[str, Any]], variants: Mapping[str, str] | None
) -> list[str] | None:
    """``--optional NAMES`` as a list (``""``: none), each name an optional input of at least one loss."""
    from .registry import build_loss
    from .specs import spec_for

    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    chosen = input_variants(losses, variants)
    known = {
        t.name for path, cfg in losses.items() for t in spec_for(build_loss(dict(cfg)), chosen[path]).inputs
        if t.optional
    }
    unknown = sorted(set(names) - known)
    if unknown:
        raise UsageError(
            f"--optional {value}: {', '.join(unknown)} is not an optional input of these losses; "
            f"they have {', '.join(sorted(known))} ('' for none)"
        )
    return names


def cmd_export(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format)
    source, losses = losses_from_args(args)
    losses = _known_losses(_select(losses, args.only), args.skip_unknown)
    variants = {path: args.variant for path in losses} if args.variant else None
    build_checked(losses, variants)  # every mistake is reported before the announcement below
    optional = check_optional(args.optional, losses, variants)
    if any(fmt.exporter == "export_onnx" for fmt in formats):
        check_opset(args.opset)
    plan_exports(losses, args.out, formats, args.overwrite, variants)
    for fmt in formats:
        resolve_exporter(fmt)
    if not args.quiet:
        verified = "verified against eager" if args.verify else "not verified: --no-verify"
        print(
            f"exporting {len(losses)} loss(es) from {source} as {', '.join(f.name for f in formats)} "
            f"into {args.out} ({verified})",
            file=sys.stderr,
        )
    results = export_losses(
        losses,
        args.out,
        formats,
        verify=args.verify,
        overwrite=args.overwrite,
        opset=args.opset,
        progress=not args.quiet,
        debug=args.debug,
        variants=variants,
        optional_inputs=optional,
    )
    print(summary_table(results))
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{PROG}: {len(failed)} of {len(results)} artifact(s) failed", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _artifact_suffixes() -> list[str]:
    return sorted({f.suffix.rsplit(".", 1)[-1] for f in FORMATS.values()} | {"pt"})


def collect_artifacts(paths: Sequence[str]) -> list[Path]:
    """Artifacts named on the command line: files (a manifest names its artifact) and directories (searched for
    artifacts, manifests and temporary files)."""
    found: dict[Path, None] = {}
    suffixes = tuple(f".{s}" for s in _artifact_suffixes())
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # what an interrupted or concurrent export can leave is listed too, and fails verification: an
            # artifact without its manifest, a manifest without its artifact, a temporary file
            for candidate in sorted(path.rglob("*")):
                name = candidate.name
                described = Path(str(candidate)[: -len(".json")])
                if candidate.is_file() and name.endswith(suffixes):
                    found[candidate] = None
                elif name.endswith(".json") and described.name.endswith(suffixes) and not described.exists():
                    found[described] = None
                elif candidate.is_file() and name.startswith(".") and name.endswith(".tmp"):
                    found[candidate] = None
            continue
        if path.name.endswith(".json") and Path(str(path)[: -len(".json")]).is_file():
            path = Path(str(path)[: -len(".json")])
        if not path.exists():
            raise UsageError(f"{raw} does not exist")
        if not path.is_file():
            raise UsageError(f"{raw} is not a file")
        found[path] = None
    if not found:
        raise UsageError(
            f"no artifacts found in {', '.join(paths)} (looked for .onnx, .pt and .pt2 files and their manifests)"
        )
    return list(found)


def _runs_code(path: Path) -> bool:
    return path.name.endswith((".pt", ".pt2"))


def cmd_verify(args: argparse.Namespace) -> int:
    from .export.artifacts import ArtifactError, MissingPluginError

    artifacts = collect_artifacts(args.paths)
    code = [p for p in artifacts if _runs_code(p)]
    if code and not args.quiet:
        print(
            f"{PROG}: note: TorchScript (.pt) and .pt2 artifacts are programs: loading them to verify runs the code "
            f"they contain ({len(code)} of {len(artifacts)} here). Verify only files you trust; ONNX files are data.",
            file=sys.stderr,
        )
    export_api = _exporters()
    verify = getattr(export_api, "verify", None)
    if verify is None:
        raise RuntimeError("this installation has no visdet_export.export.verify")
    rows = []
    failures = 0
    with _Progress(len(artifacts), enabled=not args.quiet, stream=sys.stderr) as bar:
        for index, artifact in enumerate(artifacts, 1):
            bar.describe(artifact.name)
            start = time.perf_counter()
            try:
                kwargs = {} if args.seed is None else {"seed": args.seed}
                with _stop_on_signal():
                    report = verify(artifact, **kwargs)
                status, detail = "ok", format_parity(report)
            except MissingPluginError:  # a usage mistake (exit 2), not a broken artifact
                raise
            except ArtifactError as error:
                failures += 1
                status, detail = "FAILED", _one_line(error)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001 - reported per artifact
                if args.debug:
                    traceback.print_exc()
                failures += 1
                status, detail = "FAILED", f"{type(error).__name__}: {_one_line(error)}"
            rows.append([str(artifact), status, detail])
            bar.step(f"[{index}/{len(artifacts)}] {artifact.name}: {status} ({time.perf_counter() - start:.1f} s)")
    print(render_table(["artifact", "status", "parity"], rows))
    if failures:
        print(f"{PROG}: {failures} of {len(artifacts)} artifact(s) failed verification", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_check(argv: Sequence[str]) -> int:
    return _passthrough("check", "the runtime check", argv)


def _passthrough(module_name: str, what: str, argv: Sequence[str]) -> int:
    """Run ``visdet_export.<module_name>.main(argv)`` with its own options; its status is ours. Where the module
    imports torch, its parser (:data:`visdet_export.parsers.PARSERS`) reads ``argv`` first: ``--help`` and usage
    errors answer without torch."""
    import importlib

    from .parsers import PARSERS

    try:
        if module_name in PARSERS:
            PARSERS[module_name]().parse_args(list(argv))
        module = importlib.import_module(f".{module_name}", __package__)
    except ImportError as error:
        print(f"{PROG}: error: {what} is not available in this installation ({error})", file=sys.stderr)
        return EXIT_FAILED
    except SystemExit as exit_:  # argparse's --help and usage errors
        return int(exit_.code or 0)
    try:
        status = module.main(list(argv))
    except SystemExit as exit_:  # argparse's --help and usage errors, or a tool's own SystemExit("message")
        if exit_.code is None or isinstance(exit_.code, int):
            return int(exit_.code or 0)
        print(f"{PROG} {module_name}: error: {exit_.code}", file=sys.stderr)
        return EXIT_USAGE
    return int(status or 0)


def cmd_bench(argv: Sequence[str]) -> int:
    return _passthrough("bench", "the benchmark runner", argv)


def cmd_cpp(argv: Sequence[str]) -> int:
    return _passthrough("cpp", "the C++ smoke test", argv)


# --- attach ------------------------------------------------------------------------------------------------------

ATTACH_KEYS = ("name", "loss", "inputs", "variant")


@dataclass(frozen=True)
class AttachEntry:
    """One loss of an attach spec: its output name, its config (or a loss graph path), its input mapping and the
    input layout of a config (``variant``, None: the loss's default).

    ``mapping`` is what :func:`visdet_export.export.attach.attach_losses` takes (loss input -> name);
    ``outputs`` and ``inputs`` hold the names the spec marked ``{"output": ...}`` / ``{"input": ...}``.
    """

    name: str
    loss: Any
    mapping: dict[str, str]
    outputs: frozenset[str] = frozenset()
    inputs: frozenset[str] = frozenset()
    variant: str | None = None

    def attachment(self) -> tuple[str, Any, dict[str, str], str | None]:
        """What :func:`~visdet_export.export.attach.attach_losses` takes for this entry."""
        return (self.name, self.loss, self.mapping, self.variant)


def read_attach_spec(path: str | os.PathLike[str]) -> list[AttachEntry]:
    """The losses to attach, from a JSON file (read with the safe config reader: no code, finite numbers).

    The file holds a list (or ``{"losses": [...]}``) of ``{"name": ..., "loss": ..., "inputs": {...}}``:

    * ``loss``: a loss config (``{"type": "FocalLoss", "gamma": 2.0}``), a loss string as ``--loss`` takes it
      (``"FocalLoss"``, ``'dict(type="FocalLoss")'``), or the path of an exported loss graph (``*.onnx``,
      relative to the spec file);
    * ``inputs``: loss input -> ``"NAME"`` (a model output when the model has one, else a new graph input),
      ``{"output": "NAME"}`` (must be a model output) or ``{"input": "NAME"}`` (a new graph input);
    * ``variant`` (optional): the input layout of a config's loss, as ``export --variant`` takes it (``"labels"``
      for a sigmoid CE on (N, C) logits with labels).

    Raises:
        ConfigError: the file cannot be read or an entry is malformed (the message names the entry).
    """
    from .config import _read_text, parse_json, parse_loss_string

    spec_path = Path(path)
    if not spec_path.is_file():
        raise UsageError(
            f"--spec {spec_path} does not exist" if not spec_path.exists() else f"{spec_path} is not a file"
        )
    if spec_path.suffix.lower() != ".json":
        raise UsageError(f"--spec {spec_path}: the attach spec is a .json file (a list of name/loss/inputs entries)")
    source = str(spec_path)
    data = parse_json(_read_text(spec_path), source)
    if isinstance(data, dict) and set(data) == {"losses"}:
        data = data["losses"]
    if not isinstance(data, list) or not data:
        raise ConfigError(
            f'{source}: expected a non-empty list of {{"name": ..., "loss": ..., "inputs": {{...}}}} entries'
        )
    entries: list[AttachEntry] = []
    for index, item in enumerate(data):
        where = f"{source}: entry {index}"
        if not isinstance(item, dict):
            raise ConfigError(
                f"{where} must be an object with keys {', '.join(ATTACH_KEYS)}, got {type(item).__name__}"
            )
        unknown = sorted(set(item) - set(ATTACH_KEYS))
        missing = [key for key in ("name", "loss") if key not in item]
        if unknown or missing:
            problem = f"unknown key(s) {', '.join(unknown)}" if unknown else f"no {', '.join(missing)}"
            raise ConfigError(f"{where}: {problem}; an entry has the keys {', '.join(ATTACH_KEYS)}")
        name = item["name"]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        where = f"{source}: loss {name!r}"
        loss = item["loss"]
        if isinstance(loss, str) and loss.strip().lower().endswith(".onnx"):
            graph = Path(loss.strip())
            graph = graph if graph.is_absolute() else spec_path.parent / graph
            if not graph.is_file():
                raise ConfigError(f"{where}: the loss graph {graph} does not exist")
            loss = graph
        elif isinstance(loss, str):
            loss = parse_loss_string(loss, where)
        elif isinstance(loss, dict):
            if "type" not in loss:
                raise ConfigError(f"{where}: the loss config {loss!r} has no 'type' key")
        else:
            raise ConfigError(f"{where}: 'loss' must be a config object, a loss string or a .onnx path, got {loss!r}")
        inputs = item.get("inputs", {})
        if not isinstance(inputs, dict):
            raise ConfigError(f"{where}: 'inputs' must map loss inputs to names, got {inputs!r}")
        mapping: dict[str, str] = {}
        outputs: set[str] = set()
        new_inputs: set[str] = set()
        for key, value in inputs.items():
            if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("output", "input"):
                kind, value = next(iter(value.items()))
                if isinstance(value, str) and value:
                    (outputs if kind == "output" else new_inputs).add(value)
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f'{where}: input {key!r} must map to a name, {{"output": NAME}} or {{"input": NAME}}, '
                    f"got {inputs[key]!r}"
                )
            mapping[key] = value
        variant = item.get("variant")
        if variant is not None and not (isinstance(variant, str) and variant):
            raise ConfigError(f"{where}: 'variant' must be an input layout's name, got {variant!r}")
        entries.append(AttachEntry(name, loss, mapping, frozenset(outputs), frozenset(new_inputs), variant))
    return entries


def _load_graph(path: Path) -> Any:
    """An ONNX model read without its external data (after checking where that lies): its graph and types."""
    import onnx

    from .export.onnx import check_external_data

    if not path.exists():
        raise UsageError(f"the model {path} does not exist")
    if not path.is_file():
        raise UsageError(f"the model {path} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)  # the external data is not read here
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UsageError(f"{path} is not an ONNX model ({type(error).__name__}: {_one_line(error)})") from None
    check_external_data(path)  # RELIABILITY 36: its locations must stay inside the model's folder
    return model


def declared_new_inputs(entries: Sequence[AttachEntry]) -> frozenset[str]:
    """The names any entry marks ``{"input": ...}``: a new graph input is shared by every loss that names it."""
    return frozenset().union(*(entry.inputs for entry in entries))


def check_attach_plan(model: Path, entries: Sequence[AttachEntry]) -> None:
    """Every mistake :func:`attach_losses` would find only after exporting some losses, reported up front as a
    usage mistake: a loss that cannot be built, a name marked ``{"output": ...}`` that the model lacks (or
    ``{"input": ...}`` that it has as an output), and what :func:`~visdet_export.export.attach.check_plan` finds.
    """
    from .export.attach import AttachError, check_plan

    graph = _load_graph(model)
    model_outputs = [value.name for value in graph.graph.output]
    for entry in entries:
        if isinstance(entry.loss, dict):
            build_checked({entry.name: entry.loss})
        for key, source in entry.mapping.items():
            if source in entry.outputs and source not in model_outputs:
                raise UsageError(
                    f"loss {entry.name!r} input {key!r}: {source!r} is not an output of {model.name}; "
                    f"its outputs are {', '.join(model_outputs)}"
                )
    try:
        check_plan(graph, [entry.attachment() for entry in entries], declared_new_inputs(entries), model.name)
    except AttachError as error:
        raise UsageError(str(error)) from None


def cmd_attach(args: argparse.Namespace) -> int:
    from .export.artifacts import ArtifactError, check_output_path
    from .export.attach import AttachError, attach_losses

    entries = read_attach_spec(args.spec)
    model, out = Path(args.model), Path(args.out)
    for target in (out, Path(f"{out}.json")):
        try:
            check_output_path(target, args.overwrite)
        except ArtifactError as error:
            raise UsageError(f"nothing was written: {error}") from None
    if out.resolve() == model.resolve():
        raise UsageError(f"the output {out} is the model itself; write the merged model to another file")
    check_opset(args.opset)
    check_attach_plan(model, entries)
    if not args.quiet:
        print(
            f"attaching {len(entries)} loss(es) to {model}: exporting each loss graph and verifying it in onnxruntime "
            "against eager PyTorch",
            file=sys.stderr,
        )
    start = time.perf_counter()
    try:
        attach_losses(
            model,
            [entry.attachment() for entry in entries],
            out,
            overwrite=args.overwrite,
            opset=args.opset,
            new_inputs=declared_new_inputs(entries),
        )
    except AttachError as error:
        if error.__cause__ is None:  # a mistake in the spec or the model (mapping, names, types, shapes)
            raise
        print(f"{PROG}: failed: {_one_line(error)}", file=sys.stderr)  # onnx could not merge or convert
        return EXIT_FAILED
    except ArtifactError as error:  # a loss graph failed its parity check: nothing was written
        print(f"{PROG}: failed: {_one_line(error)}; nothing was written", file=sys.stderr)
        return EXIT_FAILED
    seconds = time.perf_counter() - start
    from .export.artifacts import read_manifest

    manifest = read_manifest(out)
    rows = []
    for entry in entries:
        kind = entry.loss["type"] if isinstance(entry.loss, dict) else str(entry.loss)
        mapping = ", ".join(f"{k}<-{v}" for k, v in entry.mapping.items()) or "-"
        rows.append([entry.name, kind, mapping])
    print(render_table(["loss output", "loss", "inputs (loss input <- model output or graph input)"], rows))
    print(f"wrote {out} ({human_size(out.stat().st_size)}, opset {manifest.get('opset')}) in {seconds:.1f} s")
    print(f"graph inputs:  {', '.join(manifest.get('inputs', []))}")
    print(f"graph outputs: {', '.join(manifest.get('outputs', []))}")
    return EXIT_OK


# --- evaluate ----------------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: non-finite numbers become null (``nonfinite`` counts them)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .export.attach import evaluate, load_samples

    graph, samples_path = Path(args.graph), Path(args.samples)
    for path, what in ((graph, "graph"), (samples_path, "samples file")):
        if not path.exists():
            raise UsageError(f"the {what} {path} does not exist")
        if not path.is_file():
            raise UsageError(f"the {what} {path} is not a file")
    _load_graph(graph)  # a readable ONNX model with safe external data
    try:
        samples = load_samples(samples_path)  # allow_pickle=False: object arrays are refused, never unpickled
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise UsageError(f"{samples_path} is not a readable .npz of samples ({_one_line(error)})") from None
    if not samples:
        raise UsageError(f"{samples_path} holds no samples")
    try:
        summary = evaluate(graph, samples, outputs=args.output or None, progress=not args.quiet)
    except Exception as error:
        if type(error).__name__ in ("InvalidArgument", "InvalidGraph"):  # onnxruntime: a sample of the wrong shape
            raise UsageError(f"onnxruntime refused a sample: {_one_line(error)}") from None
        raise
    if args.json:
        print(json.dumps(_finite_or_none(summary.to_dict()), indent=2, allow_nan=False))
    else:
        print(summary)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export visdet detection losses to ONNX, TorchScript and torch.export (.pt2), verified against "
        "eager PyTorch. Configs are parsed, never executed.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected failures")
    # read (and removed) by main before parsing: listed here for --help
    parser.add_argument(
        "--plugin", metavar="MODULE", action="append",
        help="import MODULE first, a module registering losses of your own and their input specs (repeatable; "
        f"also ${PLUGINS_VARIABLE}, comma-separated; found on sys.path or in the working directory; plugins are code)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_list = commands.add_parser(
        "list", help="list the registered losses with their parameters and inputs (or the bundled recipes)"
    )
    p_list.add_argument("--recipes", action="store_true", help="list the bundled detector recipes and their losses")
    p_list.add_argument(
        "--inputs", action="store_true", help="also show each loss's inputs (names, dtypes, symbolic shapes)"
    )
    p_list.add_argument("--json", action="store_true", help="print JSON")
    p_list.set_defaults(func=cmd_list)

    format_help = ", ".join(f"{f.name} ({f.description})" for f in FORMATS.values())
    p_export = commands.add_parser(
        "export",
        help="export the losses of a loss dict, a bundled recipe or a detector config",
        description="Export every loss of the source in every format into --out, as <loss path><suffix> plus a "
        "<file>.json manifest. Every target is checked before anything is written.",
    )
    source = p_export.add_mutually_exclusive_group(required=True)
    source.add_argument("--loss", metavar="CFG", help="one loss: 'dict(type=\"FocalLoss\", gamma=2.0)', JSON or a name")
    source.add_argument("--recipe", metavar="NAME", help="a bundled recipe (see: list --recipes), e.g. retinanet")
    source.add_argument("--config", metavar="FILE", help="a detector config (.py parsed with ast, .json, .toml)")
    p_export.add_argument(
        "--format", default=DEFAULT_FORMATS, help=f"comma-separated, or all: {format_help} (default: {DEFAULT_FORMATS})"
    )
    p_export.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p_export.add_argument(
        "--only", metavar="PATH[,PATH]", help="export only these loss paths of the config (or a path's unique end)"
    )
    p_export.add_argument(
        "--skip-unknown", action="store_true", help="leave out losses of types this package does not implement"
    )
    p_export.add_argument("--name", help="file name stem for --loss (default: its type)")
    p_export.add_argument(
        "--variant",
        help="input layout for --loss, e.g. onehot (FocalLoss), dense (QualityFocalLoss), labels (sigmoid "
        "CrossEntropyLoss); default: the loss's first (see: list --inputs)",
    )
    p_export.add_argument(
        "--optional",
        metavar="NAMES",
        help="optional inputs that ONNX graphs and .pt2 packages take (default weight,avg_factor; '' for none: a "
        "plain mean); TorchScript modules take every one as an optional argument",
    )
    p_export.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    p_export.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    p_export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p_export.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p_export.set_defaults(func=cmd_export)

    p_verify = commands.add_parser(
        "verify",
        help="re-check artifacts against eager PyTorch on fresh inputs",
        description="Re-check artifacts (files or directories) against eager PyTorch on fresh random inputs, using "
        "the manifest beside each. Loading TorchScript and .pt2 artifacts runs the code they contain: verify only "
        "files you trust.",
    )
    p_verify.add_argument("paths", nargs="+", metavar="PATH", help="artifact files or directories")
    p_verify.add_argument("--seed", type=int, default=None, help="seed for the random inputs")
    p_verify.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p_verify.set_defaults(func=cmd_verify)

    p_attach = commands.add_parser(
        "attach",
        help="attach losses to a model's ONNX outputs: one graph that runs the model and its losses",
        description="Merge MODEL.onnx with one exported, verified loss graph per entry of --spec into OUT.onnx "
        "(plus OUT.onnx.json). The merged model keeps the model's inputs and outputs and adds one 0-d output per "
        'loss. --spec is a JSON list of {"name": OUTPUT, "loss": {config} | "FocalLoss" | "loss.onnx", '
        '"inputs": {LOSS_INPUT: "NAME" | {"output": NAME} | {"input": NAME}}}: a bare NAME feeds the '
        "loss from the model output of that name, or else becomes a new graph input (shared by the losses "
        "naming it); unmapped required loss inputs become graph inputs <name>/<input>. See `list --inputs` for "
        "each loss's input names.",
    )
    p_attach.add_argument("model", metavar="MODEL.onnx", help="the model (external data must stay in its folder)")
    p_attach.add_argument("out", metavar="OUT.onnx", help="the merged model to write")
    p_attach.add_argument("--spec", required=True, metavar="ATTACH.json", help="the losses and their input mapping")
    p_attach.add_argument("--opset", type=int, default=None, help="opset of the result (default: the model's, >= 18)")
    p_attach.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx")
    p_attach.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p_attach.set_defaults(func=cmd_attach)

    p_evaluate = commands.add_parser(
        "evaluate",
        help="run an ONNX loss graph over the samples of an .npz and summarise its scalar outputs",
        description="Run GRAPH.onnx in onnxruntime on every sample of SAMPLES.npz and print the mean (and, with "
        "--json, every per-sample value) of its 0-d outputs. The .npz holds '<index>/<input>' keys (shapes free "
        "per sample; visdet_export.export.attach.save_samples writes them) or one array per input stacked along a "
        "leading sample axis.",
    )
    p_evaluate.add_argument("graph", metavar="GRAPH.onnx", help="a merged model (attach) or a loss graph")
    p_evaluate.add_argument("samples", metavar="SAMPLES.npz", help="the samples (no pickled objects)")
    p_evaluate.add_argument(
        "--output", action="append", metavar="NAME", help="an output to summarise (repeatable; default: every 0-d one)"
    )
    p_evaluate.add_argument("--json", action="store_true", help="print JSON: count, mean, nonfinite, per_sample")
    p_evaluate.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p_evaluate.set_defaults(func=cmd_evaluate)

    commands.add_parser(
        "check", help="run the runtime matrix in this environment (check --help for options)", add_help=False
    )
    commands.add_parser(
        "bench",
        help="benchmark every runtime against the MMDetection-style baseline (source checkout; bench --help)",
        add_help=False,
    )
    commands.add_parser(
        "cpp", help="build the libtorch C++ consumer and compare it with eager (cpp --help)", add_help=False
    )
    return parser


# Commands with their own options: everything after the name is handed over untouched.
PASSTHROUGH: dict[str, Callable[[Sequence[str]], int]] = {"check": cmd_check, "bench": cmd_bench, "cpp": cmd_cpp}


def main(argv: Sequence[str] | None = None) -> int:
    return _until_stopped(lambda: _main(list(sys.argv[1:] if argv is None else argv)), PROG)


def _until_stopped(run: Callable[[], int], prog: str) -> int:
    """``run()`` inside :func:`stop_signals`; an interruption is reported as ``prog``'s and exits 130."""
    try:
        with stop_signals():
            return run()
    except KeyboardInterrupt:
        print(f"{prog}: {INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM (timeout, CI cancellation, docker stop) stop the block as Ctrl-C does, with a
    KeyboardInterrupt (:class:`StopSignal`) that the exports re-raise where torch swallowed it: the interrupted
    artifact and its temporary files are removed, finished ones keep their manifests. For programs on the batch API
    (:func:`export_losses`, :func:`export_groups`), which :func:`main` and :func:`run_export_script` run in it,
    printing :data:`INTERRUPTED` and exiting :data:`EXIT_INTERRUPTED` on the KeyboardInterrupt. A signal the process
    ignores stays ignored (a shell starts background jobs with SIGINT ignored, as Python's own handler respects); a
    no-op off the main thread, where Python delivers no signal."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        _signalled.clear()
        for number in _STOP_SIGNALS:
            if signal.getsignal(number) is not signal.SIG_IGN:
                previous[number] = signal.signal(number, _interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


INTERRUPTED = "interrupted; finished artifacts are complete, no partial files were left"

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Set by a stop signal and kept: the KeyboardInterrupt it raises can land in third-party code that swallows it.
# torch's ONNX exporter is one: interrupted inside the import of torch._dynamo, its `except
# torch._dynamo.exc.UserError` clause fails on the half-imported module, and the AttributeError that replaces the
# interrupt is caught by its `except Exception`; the export then failed or went on, and the CLI exited 1 or 0.
_signalled = threading.Event()


class StopSignal(KeyboardInterrupt):
    """The KeyboardInterrupt of SIGINT or SIGTERM under :func:`stop_signals`.

    A subclass, because CPython (3.11 here) marks a plain KeyboardInterrupt that leaves an ``exec`` of a string as
    unhandled, even when a caller then catches it, and ``python -m visdet_export`` then ends by SIGINT whatever its
    exit status (subprocess reads -2, not 130). torch's imports run such code (dataclasses build their methods with
    ``exec``), so a signal during the first export's import of torch._dynamo did it. CPython checks the exact type.
    """


def _interrupt(signum: int, frame: object) -> None:
    _signalled.set()
    raise StopSignal


@contextlib.contextmanager
def _stop_on_signal() -> Iterator[None]:
    """Raise, on leaving the block, the KeyboardInterrupt of a stop signal that code inside it caught and did not
    re-raise: it replaces the block's result or the error the swallowed interrupt left behind."""
    try:
        yield
    finally:
        if _signalled.is_set():
            raise StopSignal


def _main(argv: list[str]) -> int:
    try:
        argv = _load_plugins(argv, load=not {"-h", "--help", "--version"} & set(argv))
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    debug = "--debug" in argv
    # `check`, `bench` and `cpp` have their own options: hand everything after the name over untouched.
    rest = [a for a in argv if a != "--debug"]
    if rest and rest[0] in PASSTHROUGH:
        command = PASSTHROUGH[rest[0]]
        return _guard(lambda: command(rest[1:]), debug)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the commands and what they do, rather than argparse's "COMMAND is required"
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return _guard(lambda: args.func(args), args.debug)


def _load_plugins(argv: list[str], load: bool = True) -> list[str]:
    """Import the modules named by ``--plugin MODULE`` (before the command; repeatable) and by the environment
    variable ``VISDET_EXPORT_PLUGINS`` (comma-separated): a user's own losses register themselves (and their input
    specs) on import, so that every command builds, exports, verifies and checks them. Returns ``argv`` without
    those options (and imports nothing without ``load``: help needs no plugin, and a broken one would hide it).
    Plugins are code: name only modules you trust."""
    names: list[str] = []
    rest: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--plugin":
            names.append(next(items, ""))
        elif item.startswith("--plugin="):
            names.append(item.split("=", 1)[1])
        else:
            rest.append(item)
    if load and plugin_names(names):  # none: the registry (torch) loads when a command needs it
        from .registry import load_plugins

        load_plugins(names)
    return rest


def _one_line_warnings() -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints each warning text once as one line of ours: the script's line
    (``visdet-export:8``) and the source line told a user nothing."""
    shown: set[str] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
        text = f"{PROG}: warning: {message}"
        if text not in shown:
            shown.add(text)
            print(text, file=sys.stderr)

    return show


def _guard(run: Callable[[], int], debug: bool) -> int:
    try:
        with _stop_on_signal(), warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings()
            return run()
    except _usage_errors() as error:  # called only once something was raised
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UnavailableError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # e.g. `visdet-export list | head`
        return EXIT_OK
    except Exception as error:  # noqa: BLE001 - an unexpected failure: one line unless --debug
        if debug:
            traceback.print_exc()
        print(
            f"{PROG}: failed: {type(error).__name__}: {_one_line(error)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _usage_errors() -> tuple[type[Exception], ...]:
    """The errors :func:`_guard` reports as the user's mistake: UsageError, ConfigError and, once its module is
    loaded, ArtifactError (only then can one have been raised; importing the module imports torch, which
    ``check --help`` and the like do without)."""
    artifacts = sys.modules.get(f"{__package__}.export.artifacts")
    return (UsageError, ConfigError) if artifacts is None else (UsageError, ConfigError, artifacts.ArtifactError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
