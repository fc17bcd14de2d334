"""The ``visdet-export`` command (also ``python -m visdet_export``).

Commands::

    visdet-export list [--recipes] [--json]
    visdet-export export (--loss CFG | --recipe NAME | --config FILE) --out DIR
                         [--format onnx,torchscript,pt2,onnx-joint,pt2-joint] [--only PATH,...] [--name NAME]
                         [--overwrite] [--no-verify] [--opset N] [--quiet]
    visdet-export verify PATH... [--seed N]
    visdet-export check [ARGS...]

Exit status: 0 on success, 1 when an export or a verification failed, 2 for a usage or input mistake (unknown
recipe, bad or unsafe config, an output that exists, a symlinked output); 130 when interrupted. Mistakes are
reported in one line without a traceback; ``--debug`` shows the traceback of unexpected failures.

The functions :func:`plan_exports` and :func:`export_losses` are the batch API the command and the scripts in
``export_scripts/`` share.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .validation import ConfigError

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
    """One artifact to write: the loss at ``path`` in ``fmt`` to ``target``."""

    path: str
    config: Mapping[str, Any]
    fmt: Format
    target: Path


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


def build_checked(losses: Mapping[str, Mapping[str, Any]]) -> None:
    """Build every loss and look up its input spec, so a bad entry fails before anything is written."""
    from .registry import build_loss
    from .specs import spec_for

    for path, cfg in losses.items():
        try:
            loss = build_loss(dict(cfg))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{path}: {cfg!r} cannot be built: {error}") from None
        try:
            spec_for(loss)
        except (KeyError, ValueError) as error:
            message = error.args[0] if error.args else str(error)
            raise ConfigError(f"{path}: {message}") from None


def plan_exports(
    losses: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike[str], formats: Sequence[Format], overwrite: bool
) -> list[Job]:
    """The artifacts to write, after checking every target up front.

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
    for path, cfg in losses.items():
        for fmt in formats:
            target = out / artifact_name(path, fmt)
            jobs.append(Job(path, cfg, fmt, target))
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


def _run_job(job: Job, *, verify: bool, overwrite: bool, opset: int | None) -> Result:
    from .export.artifacts import read_manifest

    exporter = resolve_exporter(job.fmt)
    options: dict[str, Any] = dict(job.fmt.options)
    if opset is not None and job.fmt.exporter == "export_onnx":
        options["opset"] = opset
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
) -> list[Result]:
    """Export every loss (dotted path -> config) in every format into ``out_dir``; one :class:`Result` each.

    Every loss is built and every target checked before the first file is written (see :func:`plan_exports`).
    A failing artifact is reported in its result and the others still run.

    Raises:
        ConfigError: a loss cannot be built. UsageError: an output path cannot be used.
    """
    if isinstance(formats, str):
        formats = parse_formats(formats)
    build_checked(losses)
    jobs = plan_exports(losses, out_dir, formats, overwrite)
    for fmt in formats:  # a missing exporter fails before anything is written
        resolve_exporter(fmt)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    stream = sys.stderr if stream is None else stream
    results: list[Result] = []
    with _Progress(len(jobs), enabled=progress, stream=stream) as bar:
        for index, job in enumerate(jobs, 1):
            bar.describe(f"{job.path} [{job.fmt.name}]")
            try:
                result = _run_job(job, verify=verify, overwrite=overwrite, opset=opset)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001 - reported per artifact, the batch goes on
                if debug:
                    traceback.print_exc(file=stream)
                result = Result(job, False, error=f"{type(error).__name__}: {_one_line(error)}")
            results.append(result)
            status = "ok" if result.ok else f"FAILED: {result.error}"
            bar.step(f"[{index}/{len(jobs)}] {job.target.name}: {status} ({result.seconds:.1f} s)")
    return results


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
    if isinstance(parity, Mapping) and "max_abs_err" in parity:
        text = f"max abs err {_g(parity['max_abs_err'])}, rel {_g(parity.get('max_rel_err'))}"
        if "rtol" in parity or "atol" in parity:
            text += f" (rtol {_g(parity.get('rtol'))}, atol {_g(parity.get('atol'))})"
        sizes = parity.get("sizes")
        if isinstance(sizes, Sequence) and not isinstance(sizes, str):
            text += f" at N={','.join(str(n) for n in sizes)}"
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

        records = {
            name: {
                "description": recipe_description(name),
                "losses": {path: cfg for path, cfg in recipe_losses(name).items()},
            }
            for name in recipe_names()
        }
        if args.json:
            print(json.dumps(records, indent=2))
            return EXIT_OK
        for name, record in records.items():
            print(f"{name}: {record['description']}")
            for path, cfg in record["losses"].items():
                options = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "type")
                print(f"    {path} = {cfg['type']}({options})")
        return EXIT_OK

    from .registry import MODELS, config_parameters

    losses = {name: config_parameters(cls) for name, cls in sorted(MODELS.module_dict.items())}
    if args.json:
        import inspect

        print(
            json.dumps(
                {
                    name: {k: (None if v is inspect.Parameter.empty else v) for k, v in params.items()}
                    for name, params in losses.items()
                },
                indent=2,
                default=repr,
            )
        )
        return EXIT_OK
    rows = [
        [name, ", ".join(f"{k}={_format_default(v)}" for k, v in params.items())] for name, params in losses.items()
    ]
    print(render_table(["loss", "parameters (defaults)"], rows))
    return EXIT_OK


def _select(losses: dict[str, dict[str, Any]], only: str | None) -> dict[str, dict[str, Any]]:
    if not only:
        return losses
    wanted = [item.strip() for item in only.split(",") if item.strip()]
    unknown = [w for w in wanted if w not in losses]
    if unknown:
        raise UsageError(f"--only: no loss named {', '.join(unknown)}; this config has {', '.join(losses)}")
    return {w: losses[w] for w in wanted}


def losses_from_args(args: argparse.Namespace) -> tuple[str, dict[str, dict[str, Any]]]:
    """(a description of the source, dotted path -> loss config) from --loss / --recipe / --config."""
    from .config import losses_from_file, parse_loss_string

    if args.loss is not None:
        cfg = parse_loss_string(args.loss)
        name = args.name or str(cfg["type"])
        return "--loss", {name: cfg}
    if args.name:
        raise UsageError("--name applies to --loss only (a recipe or config names its losses by their paths)")
    if args.recipe is not None:
        from .recipes import recipe_losses, recipe_path

        path = recipe_path(args.recipe)
        return f"recipe {path.stem}", recipe_losses(args.recipe)
    return f"config {args.config}", losses_from_file(args.config)


def cmd_export(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format)
    source, losses = losses_from_args(args)
    losses = _select(losses, args.only)
    build_checked(losses)  # every mistake is reported before the announcement below
    plan_exports(losses, args.out, formats, args.overwrite)
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
    """Artifacts named on the command line: files (a manifest names its artifact) and directories (searched)."""
    found: dict[Path, None] = {}
    suffixes = tuple(f".{s}" for s in _artifact_suffixes())
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                if candidate.is_file() and candidate.name.endswith(suffixes) and Path(f"{candidate}.json").is_file():
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
            f"no artifacts found in {', '.join(paths)} (looked for files with a .json manifest beside them)"
        )
    return list(found)


def _runs_code(path: Path) -> bool:
    return path.name.endswith((".pt", ".pt2"))


def cmd_verify(args: argparse.Namespace) -> int:
    from .export.artifacts import ArtifactError

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
                report = verify(artifact, **kwargs)
                status, detail = "ok", format_parity(report)
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
    try:
        from . import check
    except ImportError as error:
        print(f"{PROG}: error: the runtime check is not available in this installation ({error})", file=sys.stderr)
        return EXIT_FAILED
    status = check.main(list(argv))
    return int(status or 0)


# ---------------------------------------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export visdet detection losses to ONNX, TorchScript and torch.export (.pt2), verified against "
        "eager PyTorch. Configs are parsed, never executed.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected failures")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p_list = commands.add_parser("list", help="list the registered losses (or the bundled recipes)")
    p_list.add_argument("--recipes", action="store_true", help="list the bundled detector recipes and their losses")
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
    p_export.add_argument("--only", metavar="PATH[,PATH]", help="export only these loss paths of the config")
    p_export.add_argument("--name", help="file name stem for --loss (default: its type)")
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

    commands.add_parser(
        "check", help="run the runtime matrix in this environment (check --help for options)", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # `check` has its own options: hand everything after it over untouched.
    rest = [a for a in argv if a != "--debug"]
    if rest and rest[0] == "check":
        return _guard(lambda: cmd_check(rest[1:]), debug)
    parser = build_parser()
    args = parser.parse_args(argv)
    return _guard(lambda: args.func(args), args.debug)


def _guard(run: Callable[[], int], debug: bool) -> int:
    from .export.artifacts import ArtifactError

    try:
        return run()
    except (UsageError, ConfigError, ArtifactError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UnavailableError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished artifacts are complete, no partial files were left", file=sys.stderr)
        return EXIT_INTERRUPTED
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
