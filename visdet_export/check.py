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

``.pt2`` packages take 30-70 s each to compile on a small CPU, so by default the ``pt2`` column covers
:data:`PT2_CONFIGS` (one configuration per loss family with a dedicated kernel path) and says "skip" elsewhere;
``--pt2 all`` checks every configuration.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .registry import build_loss
from .runtimes import RUNTIMES, LossRunner, build_runner, default_names
from .specs import CONFIG_VARIANTS, LossSpec, representative_configs, spec_for

DEFAULT_SIZES = (0, 1, 7, 1000)
DEFAULT_RUNTIMES = ("eager", "compile", "script", "onnx", "pt2")
#: Configurations the ``pt2`` column covers by default (``dfl`` as a joint loss + gradient package).
PT2_CONFIGS = ("focal", "giou", "dfl")
PT2_JOINT = ("dfl",)
#: Cap on the ``pred`` elements of one drawn input (mask logits are 62720 per sample).
MAX_ELEMENTS = 1 << 22
TOLERANCES: dict[str, dict[str, float]] = {
    "eager": {"rtol": 0.0, "atol": 0.0},
    "compile": {"rtol": 1e-5, "atol": 1e-5},
    "script": {"rtol": 1.3e-6, "atol": 1e-5},
    "onnx": {"rtol": 1e-4, "atol": 1e-5},
    "pt2": {"rtol": 1e-5, "atol": 1e-5},
}


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

    def __init__(self) -> None:
        self.losses: dict[str, tuple[nn.Module, LossSpec]] = {}
        self.runners: dict[tuple[str, str], LossRunner] = {}
        self.errors: dict[tuple[str, str], BaseException] = {}

    def loss(self, name: str, cfg: Optional[Mapping[str, Any]] = None) -> tuple[nn.Module, LossSpec]:
        if name not in self.losses:
            cfg = representative_configs()[name] if cfg is None else cfg
            loss = build_loss(cfg)
            self.losses[name] = (loss, spec_for(loss, CONFIG_VARIANTS.get(name)))
        return self.losses[name]

    def runner(self, name: str, runtime: str, key: Optional[str] = None, **options: Any) -> LossRunner:
        """The runner of configuration ``name`` in ``runtime`` (built once; a failure is remembered too)."""
        key = key or runtime + "".join(f":{value}" for value in options.values())
        if (name, key) in self.errors:
            raise self.errors[(name, key)]
        if (name, key) not in self.runners:
            loss, spec = self.loss(name)
            try:
                self.runners[(name, key)] = build_runner(runtime, loss, spec, **options)
            except Exception as exc:
                self.errors[(name, key)] = exc
                raise
        return self.runners[(name, key)]


def capped_size(spec: LossSpec, n: int, max_elements: int = MAX_ELEMENTS) -> int:
    per_sample = 1
    for dim in spec.inputs[0].shape:
        if dim != "N":
            per_sample *= int(dim)
    return min(int(n), max(7, max_elements // max(per_sample, 1)))


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
) -> Cell:
    """Compare configuration ``name`` in ``runtime`` with eager at every size (values, and gradients where the
    runtime is differentiable)."""
    start = time.perf_counter()
    loss, spec = cache.loss(name)
    cell = Cell(name, spec.loss_type, runtime, "pass")
    tol = dict(TOLERANCES[runtime] if tolerance is None else tolerance)
    try:
        runner = cache.runner(name, runtime, key=runner_key, **dict(runner_options or {}))
        eager = cache.runner(name, "eager")
        for index, n in enumerate(sizes):
            n = capped_size(spec, n)
            cell.sizes.append(n)
            drawn = spec.sample(loss, n, seed=seed + index, include=list(runner.names))
            inputs = {key: drawn[key] for key in runner.names if key in drawn}
            grad = runner.differentiable
            want, want_grad = _value_and_grad(eager, inputs, spec.pred, grad)
            got, got_grad = _value_and_grad(runner, inputs, spec.pred, grad)
            pairs = [("loss", got, want)] + ([("grad", got_grad, want_grad)] if grad else [])
            for label, actual, expected in pairs:
                assert actual is not None and expected is not None
                ok, max_abs, max_rel, why = _max_errors(actual, expected, **tol)
                cell.max_abs_err = max(cell.max_abs_err, max_abs)
                cell.max_rel_err = max(cell.max_rel_err, max_rel)
                if not ok and cell.status == "pass":
                    cell.status = "fail"
                    cell.reason = f"{label} at N={n}: {why} (max abs {max_abs:.2e}, rel {max_rel:.2e})"
    except Exception as exc:  # noqa: BLE001 - a failing runtime is a row of the table, not a crash
        cell.status = "fail"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        cell.reason = f"{type(exc).__name__}: {first}"[:300]
    cell.seconds = time.perf_counter() - start
    return cell


def run_matrix(
    configs: Optional[Iterable[str]] = None,
    runtimes: Optional[Iterable[str]] = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    cache: Optional[RunnerCache] = None,
    backend: str = "inductor",
    pt2_configs: Optional[Iterable[str]] = PT2_CONFIGS,
    seed: int = 0,
    progress: Optional[Callable[[Cell], None]] = None,
) -> list[Cell]:
    """Run the matrix and return its cells (configuration-major).

    Args:
        configs: names of :func:`visdet_export.specs.representative_configs` (default: all) or loss type names
            (every configuration of that type).
        runtimes: names of :data:`visdet_export.runtimes.RUNTIMES` (default: all).
        sizes: sample counts N.
        cache: a :class:`RunnerCache` to share (default: a fresh one).
        backend: the ``torch.compile`` backend.
        pt2_configs: configurations the ``pt2`` column checks (``None``: all); the others are "skip".
        progress: called with each finished cell.
    """
    cache = RunnerCache() if cache is None else cache
    names = select_configs(configs)
    chosen = list(DEFAULT_RUNTIMES if runtimes is None else runtimes)
    for runtime in chosen:
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    pt2_set = None if pt2_configs is None else set(pt2_configs)
    cells = []
    for name in names:
        for runtime in chosen:
            if runtime == "pt2" and pt2_set is not None and name not in pt2_set:
                loss, spec = cache.loss(name)
                cell = Cell(name, spec.loss_type, runtime, "skip", reason="not in the .pt2 subset (--pt2 all)")
            else:
                key, options = runner_options(name, runtime, backend)
                cell = check_cell(name, runtime, cache, sizes, seed=seed, runner_key=key, runner_options=options)
            cells.append(cell)
            if progress is not None:
                progress(cell)
    return cells


def runner_options(name: str, runtime: str, backend: str = "inductor") -> tuple[Optional[str], dict[str, Any]]:
    """The cache key and builder options a matrix cell uses (shared with the tests)."""
    if runtime == "compile":
        return f"compile:{backend}", {"backend": backend}
    if runtime == "pt2" and name in PT2_JOINT:
        return "pt2:joint", {"joint": True}
    return None, {}


def select_configs(configs: Optional[Iterable[str]]) -> list[str]:
    known = representative_configs()
    if configs is None:
        return list(known)
    names: list[str] = []
    for item in configs:
        if item in known:
            names.append(item)
            continue
        matches = [name for name, cfg in known.items() if cfg["type"] == item]
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
    passed = sum(c.status == "pass" for c in cells)
    failed = sum(c.status == "fail" for c in cells)
    skipped = sum(c.status == "skip" for c in cells)
    return f"{passed} passed, {failed} failed, {skipped} skipped of {len(cells)} cells"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visdet-export check",
        description="Run every representative loss configuration in every runtime and compare it with eager PyTorch.",
    )
    parser.add_argument("--configs", help="comma-separated configuration names or loss types (default: all)")
    parser.add_argument(
        "--runtimes", default=",".join(DEFAULT_RUNTIMES), help=f"comma-separated, from {', '.join(RUNTIMES)}"
    )
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="sample counts N")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument(
        "--pt2", choices=("subset", "all"), default="subset", help=f"pt2 column: {', '.join(PT2_CONFIGS)} or all"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def _split(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``visdet-export check``: print the matrix; exit status 1 if any cell failed, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.list:
        for name, cfg in representative_configs().items():
            print(f"{name:24s} {cfg}")
        return 0
    try:
        sizes = [int(n) for n in _split(args.sizes) or []]
        if any(n < 0 for n in sizes):
            raise ValueError("sizes must be >= 0")
        configs = select_configs(_split(args.configs))
        runtimes = _split(args.runtimes) or list(DEFAULT_RUNTIMES)
        unknown = [r for r in runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    except ValueError as exc:
        print(f"visdet-export check: error: {exc}", file=sys.stderr)
        return 2
    total = len(configs) * len(runtimes)
    done = [0]

    def progress(cell: Cell) -> None:
        done[0] += 1
        if not args.quiet:
            print(f"[{done[0]}/{total}] {cell.config} {cell.runtime}: {cell.status} ({cell.seconds:.1f}s)", file=sys.stderr)

    cells = run_matrix(
        configs,
        runtimes,
        sizes,
        backend=args.backend,
        pt2_configs=None if args.pt2 == "all" else PT2_CONFIGS,
        seed=args.seed,
        progress=progress,
    )
    print(render(cells))
    print(summary(cells))
    return 1 if any(c.status == "fail" for c in cells) else 0


__all__ = [
    "Cell",
    "DEFAULT_RUNTIMES",
    "DEFAULT_SIZES",
    "PT2_CONFIGS",
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
