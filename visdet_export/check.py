"""The runtime matrix: every representative loss configuration x every runtime, against eager PyTorch.

``python -m visdet_export check`` (wired to :func:`main`) runs it in the user's environment and prints one row
per loss configuration and runtime: pass / fail / skip, the largest error against eager, and the reason of a
failure. :func:`run_matrix` is the same matrix as data (the tests use it with shared caches).

Each cell draws random inputs from the loss's input spec at every size (N = 0, 1, 7, 1000 by default; N is
capped for inputs with many elements per sample, such as 80 x 28 x 28 mask logits) and compares the runtime's
value with eager's, and for the differentiable runtimes (compile, script) the gradient with respect to ``pred``.
Tolerances: ``torch.testing.assert_close`` float32 defaults for TorchScript (same kernels as eager),
rtol = atol = 1e-5 for compiled and AOTInductor code (fused kernels reorder sums), rtol 1e-4 / atol 1e-5 for
onnxruntime.

``--device cuda`` (``device=`` of :func:`run_matrix`) runs the differentiable runtimes (eager, compile, script) on
that device, each on its own copy of the loss, and compares them with eager on the CPU, the reference of every
cell (at least rtol = atol = 1e-5 there: another device's kernels round differently). The exported artifacts'
columns are skipped there: their runtimes run on the CPU.

``.pt2``: one AOTInductor package takes 20-70 s to compile on a small CPU, so by default (``--pt2 bundle``) the
``pt2`` column exports every checked configuration into ONE joint package
(:func:`visdet_export.export.pt2.export_pt2_bundle`: each configuration's loss and its gradient with respect to
``pred``, each with its own dynamic N; about 2 minutes for all 22 configurations on 2 cores, against 20-70 s per
configuration as separate packages) and checks each configuration's entry in values and gradients.
``--pt2 separate`` builds one package per configuration with :func:`~visdet_export.export.pt2.export_pt2`
instead; ``--pt2 subset`` does that for :data:`PT2_CONFIGS` only and skips the rest.

``--onnx joint`` checks the ONNX column's graphs as distillation and evaluation graphs export them with their
gradient (``export_onnx(..., joint=True)``: the loss and ``grad_pred``): both outputs against eager's value and
gradient, where the default (``loss``) exports and checks the loss alone.

``--autocast float16`` (``autocast=`` of :func:`run_matrix`) runs the differentiable runtimes inside
``torch.autocast`` on their device, as mixed-precision training calls the losses, against eager outside it: the
losses compute in float32 either way, so the tolerances stay. The exported artifacts' columns are skipped:
autocast does not reach their runtimes.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .export.artifacts import raise_hidden_interrupt
from .parsers import AUTOCAST_NAMES, DEFAULT_RUNTIMES, DEFAULT_SIZES, ONNX_MODES, PT2_CONFIGS, PT2_MODES
from .parsers import check_parser as build_parser
from .registry import MODELS, build_loss
from .runtimes import RUNTIMES, LossRunner, build_runner
from .specs import CONFIG_VARIANTS, LossSpec, SampleOptions, representative_configs, spec_for
from .validation import check_names

PT2_JOINT = ("dfl",)
AUTOCAST_DTYPES = {name: getattr(torch, name) for name in AUTOCAST_NAMES}
TOLERANCES: dict[str, dict[str, float]] = {
    "eager": {"rtol": 0.0, "atol": 0.0},
    "compile": {"rtol": 1e-5, "atol": 1e-5},
    "script": {"rtol": 1.3e-6, "atol": 1e-5},
    "onnx": {"rtol": 1e-4, "atol": 1e-5},
    "pt2": {"rtol": 1e-5, "atol": 1e-5},
}
#: The least tolerance of a cell run on another device than its CPU reference.
DEVICE_TOLERANCE: dict[str, float] = {"rtol": 1e-5, "atol": 1e-5}


@dataclass
class Cell:
    """One (configuration, runtime) cell of the matrix."""

    config: str
    loss_type: str
    runtime: str
    status: str  # "pass" | "fail" | "skip"
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    reason: str = ""
    seconds: float = 0.0
    sizes: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "pass"


class RunnerCache:
    """Built losses and runners shared across cells, tests and calls: nothing is compiled or exported twice.

    Keys are ``(config name, runtime key)``; the runtime key is the runtime name plus its options
    (``"compile:aot_eager"``).
    """

    def __init__(self, bundle_configs: Optional[Iterable[str]] = None) -> None:
        self.losses: dict[str, tuple[nn.Module, LossSpec]] = {}
        self.device_losses: dict[tuple[str, str], nn.Module] = {}
        self.runners: dict[tuple[str, str], LossRunner] = {}
        self.errors: dict[tuple[str, str], BaseException] = {}
        #: Configurations the next ``.pt2`` bundle is built for (default: every representative configuration).
        self.bundle_configs: Optional[list[str]] = None if bundle_configs is None else list(bundle_configs)
        self.bundles: list[Any] = []  # loaded bundles (``export.pt2.load_runner``), each for a set of configs
        self.bundle_seconds: float = 0.0  # time spent exporting + compiling bundles
        self._scratch: list[Any] = []

    def pt2_bundle(self, name: str) -> Any:
        """The loaded joint ``.pt2`` bundle holding configuration ``name``; built on first need for
        :attr:`bundle_configs` (plus ``name``) in a temporary directory that lives as long as the cache."""
        import tempfile
        from pathlib import Path

        from .export.pt2 import export_pt2_bundle, load_runner

        for bundle in self.bundles:
            if any(entry["name"] == name for entry in bundle.manifest["entries"]):
                return bundle
        key = ("<bundle>", name)
        if key in self.errors:
            raise self.errors[key]
        names = list(dict.fromkeys([*(self.bundle_configs or representative_configs()), name]))
        start = time.perf_counter()
        try:
            scratch = tempfile.TemporaryDirectory(prefix="visdet_pt2_bundle_")
            self._scratch.append(scratch)
            losses = {config: (self.loss(config)[0], CONFIG_VARIANTS.get(config)) for config in names}
            path = export_pt2_bundle(losses, Path(scratch.name) / "bundle.pt2", joint=True, verify=False)
            bundle = load_runner(path)
        except Exception as exc:
            for config in names:
                self.errors[("<bundle>", config)] = exc
            raise
        finally:
            self.bundle_seconds += time.perf_counter() - start
        self.bundles.append(bundle)
        return bundle

    def loss(self, name: str, cfg: Optional[Mapping[str, Any]] = None) -> tuple[nn.Module, LossSpec]:
        if name not in self.losses:
            cfg = representative_configs().get(name, {"type": name}) if cfg is None else cfg
            loss = build_loss(cfg)
            self.losses[name] = (loss, spec_for(loss, CONFIG_VARIANTS.get(name)))
        return self.losses[name]

    def loss_on(self, name: str, device: torch.device) -> nn.Module:
        """A copy of configuration ``name``'s loss on ``device`` (built once)."""
        if (name, str(device)) not in self.device_losses:
            self.device_losses[(name, str(device))] = copy.deepcopy(self.loss(name)[0]).to(device)
        return self.device_losses[(name, str(device))]

    def runner(
        self, name: str, runtime: str, key: Optional[str] = None, device: Optional[torch.device] = None, **options: Any
    ) -> LossRunner:
        """The runner of configuration ``name`` in ``runtime`` (built once; a failure is remembered too), on a copy
        of the loss on ``device`` if one is given."""
        key = key or runtime + "".join(f":{value}" for value in options.values())
        if device is not None:
            key = f"{key}@{device}"
        if (name, key) in self.errors:
            raise self.errors[(name, key)]
        if (name, key) not in self.runners:
            loss, spec = self.loss(name)
            if device is not None:
                loss = self.loss_on(name, device)
                if runtime == "script":  # the saved module loads onto the CPU
                    options = {**options, "device": device}
            try:
                if runtime == "pt2" and options.pop("bundle", False):
                    options.update(bundle=self.pt2_bundle(name), entry=name)
                self.runners[(name, key)] = build_runner(runtime, loss, spec, **options)
            except Exception as exc:
                self.errors[(name, key)] = exc
                raise
        return self.runners[(name, key)]


def _max_errors(actual: Tensor, expected: Tensor, rtol: float, atol: float) -> tuple[bool, float, float, str]:
    if tuple(actual.shape) != tuple(expected.shape):
        return False, math.inf, math.inf, f"shape {tuple(actual.shape)} != eager {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    finite = torch.isfinite(a) & torch.isfinite(e)
    same_nonfinite = bool(torch.all(finite | (a.isnan() & e.isnan()) | (a == e)))
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    ok = same_nonfinite and bool(torch.all(diff <= atol + rtol * e.abs().where(finite, torch.zeros_like(e))))
    rel = torch.where(finite & (e.abs() > atol), diff / e.abs().clamp(min=atol), torch.zeros_like(a))
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float(rel.max()) if rel.numel() else 0.0
    return ok, max_abs, max_rel, "" if ok else ("non-finite values differ" if not same_nonfinite else "values differ")


def _value_and_grad(
    fn: Callable[[Mapping[str, Tensor]], Tensor], inputs: Mapping[str, Tensor], pred: str, grad: bool
) -> tuple[Tensor, Optional[Tensor]]:
    if not grad:
        with torch.no_grad():
            return fn(inputs).detach(), None
    leaf = inputs[pred].detach().clone().requires_grad_(True)
    value = fn({**inputs, pred: leaf})
    (gradient,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    return value.detach(), torch.zeros_like(leaf) if gradient is None else gradient


def compare_with_eager(
    runner: LossRunner,
    eager: Callable[[Mapping[str, Tensor]], Tensor],
    inputs: Mapping[str, Tensor],
    pred: str,
    tolerance: Mapping[str, float],
    *,
    device: Optional[torch.device] = None,
    autocast: Optional[torch.dtype] = None,
    grad_tolerance: Optional[Mapping[str, float]] = None,
) -> list[tuple[str, bool, float, float, str]]:
    """``runner`` against ``eager`` (a runner, or any function of the inputs) on ``inputs``: the loss, and its
    gradient with respect to ``pred`` where the runner has one (autograd, or a joint artifact's second output);
    ``(label, ok, max abs error, max relative error, why not ok)`` for each, the gradient at ``grad_tolerance``
    where one is given. With ``device`` the runner runs there, with ``autocast`` inside ``torch.autocast``."""
    grad = runner.differentiable or bool(getattr(runner, "joint", False))
    want, want_grad = _value_and_grad(eager, inputs, pred, grad)
    if runner.differentiable or not grad:
        placed = inputs if device is None else {key: value.to(device) for key, value in inputs.items()}
        device_type = "cpu" if device is None else torch.device(device).type
        with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
            got, got_grad = _value_and_grad(runner, placed, pred, grad)
    else:  # a joint artifact: its second output is d loss.sum() / d pred
        got, got_grad = runner.run_all(inputs)[:2]  # type: ignore[attr-defined]
    pairs = [("loss", got, want)] + ([("grad", got_grad, want_grad)] if grad else [])
    compared = []
    for label, actual, expected in pairs:
        assert actual is not None and expected is not None
        bounds = grad_tolerance if label == "grad" and grad_tolerance is not None else tolerance
        compared.append((label, *_max_errors(actual, expected, **bounds)))
    return compared


def check_cell(
    name: str,
    runtime: str,
    cache: RunnerCache,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    seed: int = 0,
    runner_key: Optional[str] = None,
    runner_options: Optional[Mapping[str, Any]] = None,
    tolerance: Optional[Mapping[str, float]] = None,
    device: Optional[torch.device] = None,
    autocast: Optional[torch.dtype] = None,
    free_sizes: Optional[Mapping[str, int]] = None,
) -> Cell:
    """Compare configuration ``name`` in ``runtime`` with eager at every size (values, and gradients where the
    runtime is differentiable); with ``device``, ``runtime`` runs there against eager on the CPU; with
    ``autocast``, inside ``torch.autocast`` of that dtype against eager outside it; with ``free_sizes``, inputs
    of those class / bin / mask sizes (``{"C": 20}``) instead of the spec's defaults."""
    start = time.perf_counter()
    loss, spec = cache.loss(name)
    check_runtime(runtime)
    cell = Cell(name, spec.loss_type, runtime, "pass")
    tol = dict(TOLERANCES[runtime] if tolerance is None else tolerance)
    if device is not None and torch.device(device).type != "cpu":
        if RUNTIMES[runtime].fixed_graph:
            cell.status, cell.reason = "skip", f"the {runtime} artifact runs on the CPU, not on {device}"
            return cell
        tol = {bound: max(value, DEVICE_TOLERANCE[bound]) for bound, value in tol.items()}
    if autocast is not None and RUNTIMES[runtime].fixed_graph:
        cell.status, cell.reason = "skip", f"autocast does not reach the {runtime} artifact's runtime"
        return cell
    try:
        runner = cache.runner(name, runtime, key=runner_key, device=device, **dict(runner_options or {}))
        eager = cache.runner(name, "eager")
        for index, n in enumerate(sizes):
            n = spec.capped(n)
            cell.sizes.append(n)
            drawn = spec.sample(
                loss, n, seed=seed + index, options=SampleOptions(sizes=free_sizes or {}), include=list(runner.names)
            )
            inputs = {key: drawn[key] for key in runner.names if key in drawn}
            for label, ok, max_abs, max_rel, why in compare_with_eager(
                runner, eager, inputs, spec.pred, tol, device=device, autocast=autocast
            ):
                cell.max_abs_err = max(cell.max_abs_err, max_abs)
                cell.max_rel_err = max(cell.max_rel_err, max_rel)
                if not ok and cell.status == "pass":
                    cell.status = "fail"
                    cell.reason = f"{label} at N={n}: {why} (max abs {max_abs:.2e}, rel {max_rel:.2e})"
    except Exception as exc:  # noqa: BLE001 - a failing runtime is a row of the table, not a crash
        raise_hidden_interrupt(exc)
        cell.status = "fail"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        cell.reason = f"{type(exc).__name__}: {first}"[:300]
        if runtime == "compile" and "data-dependent" in first:
            cell.reason = cell.reason[:200] + f" [{UNBACKED_HINT}]"
    cell.seconds = time.perf_counter() - start
    return cell


#: Why a loss that compiles with plain ``torch.compile`` can fail the matrix's compile runtime.
UNBACKED_HINT = (
    "N is unbacked here, one graph for every N: an operation deciding on the size (torch.logsumexp; use "
    "torch.log_softmax) cannot trace"
)


def run_matrix(
    configs: Optional[Iterable[str]] = None,
    runtimes: Optional[Iterable[str]] = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    cache: Optional[RunnerCache] = None,
    backend: str = "inductor",
    pt2: str = "bundle",
    onnx: str = "loss",
    seed: int = 0,
    progress: Optional[Callable[[Cell], None]] = None,
    device: Optional[torch.device] = None,
    autocast: Optional[torch.dtype] = None,
) -> list[Cell]:
    """Run the matrix and return its cells (configuration-major).

    Args:
        configs: names of :func:`visdet_export.specs.representative_configs` (default: all) or loss type names
            (every configuration of that type).
        runtimes: names of :data:`visdet_export.runtimes.RUNTIMES` (default: all).
        sizes: sample counts N.
        cache: a :class:`RunnerCache` to share (default: a fresh one).
        backend: the ``torch.compile`` backend.
        pt2: how the ``pt2`` column builds packages (:data:`PT2_MODES`): ``"bundle"`` (one joint package for
            every configuration checked: values and gradients), ``"separate"`` (one package per configuration) or
            ``"subset"`` (separate packages for :data:`PT2_CONFIGS`, "skip" elsewhere).
        onnx: what the ``onnx`` column exports (:data:`ONNX_MODES`): ``"loss"`` or ``"joint"`` (the loss and its
            gradient with respect to ``pred`` in one graph: values and gradients are checked).
        progress: called with each finished cell.
        device: where eager, compile and script run (default: the CPU); the reference stays eager on the CPU.
        autocast: run eager, compile and script inside ``torch.autocast`` of this dtype on their device (the
            reference stays outside it); the exported artifacts' columns are skipped.
    """
    cache = RunnerCache() if cache is None else cache
    names = select_configs(configs)
    chosen = list(DEFAULT_RUNTIMES) if runtimes is None else check_names("runtimes", runtimes)
    for runtime in chosen:
        check_runtime(runtime)
    if pt2 not in PT2_MODES:
        raise ValueError(f"unknown pt2 mode {pt2!r}; choose from {', '.join(PT2_MODES)}")
    if onnx not in ONNX_MODES:
        raise ValueError(f"unknown onnx mode {onnx!r}; choose from {', '.join(ONNX_MODES)}")
    pt2_set = set(PT2_CONFIGS) if pt2 == "subset" else None
    if pt2 == "bundle" and cache.bundle_configs is None:
        cache.bundle_configs = names
    cells = []
    for name in names:
        for runtime in chosen:
            if runtime == "pt2" and pt2_set is not None and name not in pt2_set:
                loss, spec = cache.loss(name)
                cell = Cell(name, spec.loss_type, runtime, "skip", reason="not in the .pt2 subset (--pt2 bundle)")
            else:
                key, options = runner_options(name, runtime, backend, pt2=pt2, onnx=onnx)
                cell = check_cell(
                    name, runtime, cache, sizes, seed=seed, runner_key=key, runner_options=options, device=device,
                    autocast=autocast,
                )
            cells.append(cell)
            if progress is not None:
                progress(cell)
    return cells


def runner_options(
    name: str, runtime: str, backend: str = "inductor", *, pt2: str = "bundle", onnx: str = "loss"
) -> tuple[Optional[str], dict[str, Any]]:
    """The cache key and builder options a matrix cell uses (shared with the tests)."""
    if runtime == "compile":
        return f"compile:{backend}", {"backend": backend}
    if runtime == "pt2" and pt2 == "bundle":
        return "pt2:bundle", {"bundle": True}
    if runtime == "pt2" and name in PT2_JOINT:
        return "pt2:joint", {"joint": True}
    if runtime == "onnx" and onnx == "joint":
        return "onnx:joint", {"joint": True}
    return None, {}


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def select_configs(configs: Optional[Iterable[str]]) -> list[str]:
    """The configuration names of the matrix's rows: names of :func:`~visdet_export.specs.representative_configs`
    as given, a loss type as every configuration of that type (or its defaults, for a loss registered without
    one); None: all. Raises ValueError for a name that is neither."""
    known = representative_configs()
    if configs is None:
        return list(known)
    names: list[str] = []
    for item in check_names("configs", configs):
        if item in known:
            names.append(item)
            continue
        matches = [name for name, cfg in known.items() if cfg["type"] == item]
        if not matches and item in MODELS:  # a loss registered without a representative configuration (a
            matches = [item]  # plugin's): its defaults
        if not matches:
            types = sorted({str(cfg["type"]) for cfg in known.values()})
            raise ValueError(
                f"unknown configuration {item!r}; choose from {', '.join(known)} or a loss type ({', '.join(types)})"
            )
        names.extend(matches)
    return list(dict.fromkeys(names))


def render(cells: Sequence[Cell]) -> str:
    """The matrix as a text table: loss configuration x runtime."""
    header = ["config", "loss", "runtime", "status", "max abs err", "max rel err", "time", "reason"]
    rows = [
        [
            c.config,
            c.loss_type,
            c.runtime,
            c.status.upper() if c.status == "fail" else c.status,
            "" if c.status == "skip" else f"{c.max_abs_err:.1e}",
            "" if c.status == "skip" else f"{c.max_rel_err:.1e}",
            "" if c.status == "skip" else f"{c.seconds:.1f}s",
            c.reason,
        ]
        for c in cells
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(cells: Sequence[Cell]) -> str:
    """One line: how many cells passed, failed and were skipped."""
    passed = sum(c.status == "pass" for c in cells)
    failed = sum(c.status == "fail" for c in cells)
    skipped = sum(c.status == "skip" for c in cells)
    return f"{passed} passed, {failed} failed, {skipped} skipped of {len(cells)} cells"


def _split(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _available_device(name: str) -> torch.device:
    """``torch.device(name)``, refused (ValueError) where this torch cannot run on it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``visdet-export check``: print the matrix; exit status 1 if any cell failed, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.list:
        for name, cfg in representative_configs().items():
            print(f"{name:24s} {cfg}")
        return 0
    try:
        configs = select_configs(_split(args.configs))
        runtimes = _split(args.runtimes) or list(DEFAULT_RUNTIMES)
        unknown = [r for r in runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
        device = None if args.device is None else _available_device(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"visdet-export check: error: {exc}", file=sys.stderr)
        return 2
    total = len(configs) * len(runtimes)
    done = [0]

    def progress(cell: Cell) -> None:
        done[0] += 1
        if not args.quiet:
            progress = f"[{done[0]}/{total}] {cell.config} {cell.runtime}: {cell.status} ({cell.seconds:.1f}s)"
            print(progress, file=sys.stderr)

    cache = RunnerCache()
    cells = run_matrix(
        configs,
        runtimes,
        args.sizes,
        cache=cache,
        backend=args.backend,
        pt2="bundle" if args.pt2 == "all" else args.pt2,
        onnx=args.onnx,
        seed=args.seed,
        progress=progress,
        device=device,
        autocast=None if args.autocast is None else AUTOCAST_DTYPES[args.autocast],
    )
    print(render(cells))
    if args.onnx == "joint" and "onnx" in runtimes:
        print("onnx: joint graphs (loss and grad_pred outputs), both checked against eager")
    if args.autocast is not None:
        where = "cpu" if device is None else device.type
        print(f"autocast: eager, compile and script ran inside torch.autocast({where!r}, {args.autocast}); eager "
              "outside it is the reference")
    print(summary(cells))
    if cache.bundles and not args.quiet:
        entries = sum(len(bundle.manifest["entries"]) for bundle in cache.bundles)
        print(
            f"pt2: {entries} configurations in {len(cache.bundles)} joint AOTInductor bundle(s), built in "
            f"{cache.bundle_seconds:.0f}s (counted in the first pt2 cell's time)",
            file=sys.stderr,
        )
    return 1 if any(c.status == "fail" for c in cells) else 0


__all__ = [
    "AUTOCAST_DTYPES",
    "Cell",
    "DEFAULT_RUNTIMES",
    "DEFAULT_SIZES",
    "DEVICE_TOLERANCE",
    "ONNX_MODES",
    "PT2_CONFIGS",
    "PT2_MODES",
    "RunnerCache",
    "TOLERANCES",
    "check_cell",
    "main",
    "render",
    "run_matrix",
    "runner_options",
    "select_configs",
    "summary",
]


if __name__ == "__main__":  # python -m visdet_export.check
    sys.exit(main())
