"""Benchmark runner: every loss side by side with its MMDetection-style eager baseline.

For each representative configuration (``visdet_export.specs.representative_configs()``; by default the
configurations of visdet's losses page, with sigmoid CE on class labels) and each size, it times forward, backward
and forward + backward of

* ``baseline``    the MMDetection-style eager formulation (``benchmarks/baselines.py``),
* ``eager``       our loss in eager PyTorch,
* ``compiled``    our loss under ``torch.compile(fullgraph=True, dynamic=True)`` (inductor),
* ``torchscript`` ``torch.jit.script`` of our loss module,
* ``floor``       the cheapest loss over the same tensor, compiled: BCE-with-logits over ``pred`` for the
  classification / distribution losses, element-wise L1 over the boxes for the box and regression losses,

and the forward pass alone (no autograd graph) of ``eager`` and of ``onnx`` (our loss exported to ONNX and run in
onnxruntime). Providers are interleaved (A B C A B C ...) after a warm-up, each cell reports min / median / max,
and every figure is also given as a ratio against the baseline measured in the same run. Peak memory of one
forward + backward per torch provider is the high-water mark of live tensor bytes (torch.profiler memory events
on CPU, ``max_memory_allocated`` on CUDA), inputs included, so it does not depend on the allocator.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py                  # visdet's configs, full sizes, both allocators (7-11 min)
    .venv/bin/python benchmarks/run.py --quick          # small sizes, ~1 min per loss (compiling)
    .venv/bin/python benchmarks/run.py --losses focal,giou --sizes 100000 --allocator pinned
    .venv/bin/python benchmarks/run.py --all            # every representative configuration
    .venv/bin/python benchmarks/run.py --device cuda --dtypes float32,bfloat16   # GPU (untested here)

``--allocator both`` (the default) re-executes the runner in two subprocesses, one with the default glibc
allocator and one with ``MALLOC_MMAP_MAX_=0`` (large temporaries stay in the heap instead of being returned to the
OS and re-faulted), and writes both tables, labelled. Output: ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*|copyreg")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from baselines import BASELINES  # noqa: E402
from run_options import ALL_PROVIDERS  # noqa: E402  # the options, without torch (visdet-export bench --help)
from run_options import parse_args as parse_options  # noqa: E402

from visdet_export import build_loss  # noqa: E402
from visdet_export.export.torchscript import script_loss  # noqa: E402
from visdet_export.registry import loss_config  # noqa: E402
from visdet_export.specs import (  # noqa: E402
    CONFIG_VARIANTS,
    OPTION_CONFIGS,
    SEED_CONFIGS,
    SampleOptions,
    representative_configs,
    spec_for,
)

TRAIN_PROVIDERS = ("baseline", "eager", "compiled", "torchscript", "floor")
INFER_PROVIDERS = ("eager", "onnx")
BOX_LOSSES = {"L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss", "IoULoss", "GIoULoss"}
ALLOCATORS = {"default": {}, "pinned": {"MALLOC_MMAP_MAX_": "0"}}
ALLOCATOR_LABELS = {
    "default": "default glibc allocator",
    "pinned": "MALLOC_MMAP_MAX_=0 (large temporaries kept in the heap)",
}

# --- sizes -----------------------------------------------------------------------------------------------------


def size_kind(pred_shape: tuple) -> str:
    rest = [d for d in pred_shape if d != "N"]
    if len(pred_shape) == 4:
        return "mask"
    if not rest:
        return "vector"
    width = int(rest[0])
    if width == 4:
        return "boxes"
    if width <= 32:
        return "distribution"
    if width <= 72:
        return "sides"  # (N, 4 * (reg_max + 1)): four DFL distributions per box
    return "classification"


SIZES = {
    "classification": ([10_000, 100_000, 400_000], [2_000]),
    "boxes": ([100_000, 1_000_000], [5_000]),
    "distribution": ([100_000, 1_000_000], [5_000]),
    "vector": ([100_000, 1_000_000], [5_000]),
    "sides": ([25_000, 250_000], [1_000]),  # the DFL rows of 100k and 1M box sides
    "mask": ([64, 256], [4]),
}

# --- timing ----------------------------------------------------------------------------------------------------


class Clock:
    """Wall clock on CPU, CUDA events on a GPU (each interval synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


def stats(samples: list[float]) -> Optional[dict[str, float]]:
    if not samples:
        return None
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "n": len(samples)}


# --- providers -------------------------------------------------------------------------------------------------


def _positional(inputs: dict[str, Tensor], names: list[str]) -> list[Tensor]:
    return [inputs[name] for name in names]


def floor_function(loss_type: str) -> Callable[..., Tensor]:
    if loss_type in BOX_LOSSES:

        def l1_floor(pred: Tensor, target: Tensor) -> Tensor:
            return (pred - target).abs().mean()

        return l1_floor

    def bce_floor(pred: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(pred, target)

    return bce_floor


def onnx_session(module: torch.nn.Module, spec, names: list[str], threads: int, workdir: Path, tag: str,
                 device: torch.device):
    """Export ``module`` with the package exporter (the graphs users get: dynamic ``N``, the onnx.py rewrites)
    and open an onnxruntime session on it, with the inputs of ``names`` that are optional among them."""
    import onnxruntime as ort

    from visdet_export.export.onnx import export_onnx

    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" not in available:
        # onnxruntime on the CPU against torch on the GPU would be no comparison
        raise RuntimeError("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    path = workdir / f"{tag}.onnx"
    optional = tuple(t.name for t in spec.inputs if t.optional and t.name in names)
    export_onnx(module, path, variant=spec.variant, optional_inputs=optional, overwrite=True, verify=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    input_names = [i.name for i in session.get_inputs()]
    return session, input_names


# --- memory ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null: the profiler's C++ start / stop lines (``USDT: ...
    SyncActivityProfilerHandler.cpp:52] profiler_start``, two per memory pass) ignore ``KINETO_LOG_LEVEL`` (torch
    2.13). A Python exception still propagates, and is printed once the descriptor is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_tensor_bytes(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """High-water mark of tensor bytes allocated by ``step`` above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events() if prof.profiler is not None else []
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


# --- one configuration -----------------------------------------------------------------------------------------


def _more_repeats(done: int, elapsed_s: float, args: argparse.Namespace) -> bool:
    """At least --min-repeats; up to --repeats within --cell-budget-s; past them, up to 10x --repeats while the cell
    has run less than --min-cell-s (cells of a few milliseconds: their medians need the samples)."""
    if done < args.min_repeats:
        return True
    if done < args.repeats:
        return elapsed_s < args.cell_budget_s
    return done < 10 * args.repeats and elapsed_s < args.min_cell_s


def run_config(name: str, cfg: dict, sizes: Optional[list[int]], args: argparse.Namespace, dtype: torch.dtype,
               device: torch.device, workdir: Path, log: Callable[[str], None]) -> list[dict]:
    # every config compiles the same PositionalLoss.forward / floor code objects: start each from a clean cache
    # so fullgraph=True never trips dynamo's recompile limit across configurations
    torch._dynamo.reset()
    loss = build_loss(cfg).to(device)
    spec = spec_for(loss, CONFIG_VARIANTS.get(name))
    names = spec.names
    pred_shape = ("N", *spec.inputs[0].concrete_shape(1, spec.sizes)[1:])  # free sizes at their defaults
    kind = size_kind(pred_shape)
    full, quick = SIZES[kind]
    cell_sizes = sizes or (quick if args.quick else full)
    loss_type = type(loss).__name__
    wanted = [p for p in args.providers if p in ALL_PROVIDERS]
    clock = Clock(device)

    providers: dict[str, Callable[[dict[str, Tensor]], Tensor]] = {}
    if "baseline" in wanted and loss_type in BASELINES:
        baseline = BASELINES[loss_type]
        providers["baseline"] = lambda inp: baseline(loss, inp)
    if "eager" in wanted:
        providers["eager"] = lambda inp: spec.call(loss, inp)
    if "compiled" in wanted:
        compiled = torch.compile(spec.bind(loss, names), fullgraph=True, dynamic=True)
        providers["compiled"] = lambda inp: compiled(*_positional(inp, names))
    if "torchscript" in wanted:
        try:
            scripted = script_loss(build_loss(cfg).to(device))  # the exporter's scripting, without its warning
            providers["torchscript"] = lambda inp: spec.call(scripted, inp)
        except Exception as error:  # reported, not fatal: the runtime matrix owns TorchScript failures
            log(f"  torchscript unavailable for {name}: {type(error).__name__}: {error}")
    if "floor" in wanted:
        floor_fn = torch.compile(floor_function(loss_type), fullgraph=True, dynamic=True)
        providers["floor"] = lambda inp: floor_fn(inp["pred"], inp["__floor_target"])

    rows = []
    session = None
    for n in cell_sizes:
        options = SampleOptions(dtype=dtype, positive_fraction=args.positive_fraction)
        inputs = spec.sample(loss, n, seed=0, options=options)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        pred = inputs["pred"]
        if loss_type in BOX_LOSSES:
            inputs["__floor_target"] = inputs["target"]
        else:
            inputs["__floor_target"] = (torch.rand(pred.shape, device=device) > 0.9).to(pred.dtype)
        pred.requires_grad_(True)
        pred_bytes = pred.numel() * pred.element_size()
        input_bytes = sum(v.numel() * v.element_size() for k, v in inputs.items() if not k.startswith("__"))

        def train_step(fn: Callable, timed: bool = True) -> tuple[float, float]:
            pred.grad = None
            clock.sync()
            t0 = clock.now()
            out = fn(inputs)
            t1 = clock.now()
            out.backward()
            t2 = clock.now()
            clock.sync()
            return clock.elapsed_ms(t0, t1), clock.elapsed_ms(t1, t2)

        infer: dict[str, Callable[[], Any]] = {}
        if "eager" in wanted:
            detached = {k: (v.detach() if k == "pred" else v) for k, v in inputs.items()}

            def eager_infer() -> Tensor:
                with torch.no_grad():
                    return spec.call(loss, detached)

            infer["eager"] = eager_infer
        if "onnx" in wanted and dtype != torch.float32:
            # the package exports float32 graphs (and numpy has no bfloat16 to feed onnxruntime with)
            log(f"  onnx column left out for {name} in {dtype}: the exported graphs take float32 inputs")
            wanted = [p for p in wanted if p != "onnx"]
        if "onnx" in wanted:
            try:
                if session is None:
                    t_export = time.perf_counter()
                    session = onnx_session(loss, spec, names, args.threads, workdir, name, device)
                    log(f"  onnx export + session: {time.perf_counter() - t_export:.1f} s")
                ort_session, ort_names = session
                feed = {k: inputs[k].detach().cpu().numpy() for k in ort_names}
                ort_session.run(None, feed)  # inputs the graph cannot take fail here, not in the timed loop
                infer["onnx"] = lambda: ort_session.run(None, feed)
            except Exception as error:
                log(f"  onnx unavailable for {name}: {type(error).__name__}: {str(error)[:300]}")
                wanted = [p for p in wanted if p != "onnx"]

        # warm-up (compiles on the first size), and a value check against the baseline
        t_warm = time.perf_counter()
        values = {}
        for label, fn in providers.items():
            for _ in range(args.warmup):
                train_step(fn)
            with torch.no_grad():
                values[label] = float(fn(inputs).detach().float().sum())
        for label, fn in infer.items():
            for _ in range(args.warmup):
                fn()
        log(f"  {name} N={n}: warm-up {time.perf_counter() - t_warm:.1f} s")

        fwd: dict[str, list[float]] = {p: [] for p in providers}
        bwd: dict[str, list[float]] = {p: [] for p in providers}
        total: dict[str, list[float]] = {p: [] for p in providers}
        inf: dict[str, list[float]] = {p: [] for p in infer}
        start = time.perf_counter()
        rep = 0
        while _more_repeats(rep, time.perf_counter() - start, args):
            for label, fn in providers.items():  # interleaved: A B C ... A B C ...
                f_ms, b_ms = train_step(fn)
                fwd[label].append(f_ms)
                bwd[label].append(b_ms)
                total[label].append(f_ms + b_ms)
            for label, fn in infer.items():
                clock.sync()
                t0 = clock.now()
                fn()
                t1 = clock.now()
                inf[label].append(clock.elapsed_ms(t0, t1))
            rep += 1

        memory: dict[str, Optional[int]] = {}
        if not args.no_memory:
            for label, fn in providers.items():
                gc.collect()
                pred.grad = None
                memory[label] = peak_tensor_bytes(lambda: fn(inputs).backward(), device)
                pred.grad = None

        row = {
            "config": name,
            "loss": loss_type,
            "variant": spec.variant,
            "kind": kind,
            "N": n,
            "pred_shape": list(pred.shape),
            "dtype": str(dtype).replace("torch.", ""),
            "pred_bytes": pred_bytes,
            "input_bytes": input_bytes,
            "repeats": rep,
            "values": values,
            "forward_ms": {p: stats(v) for p, v in fwd.items()},
            "backward_ms": {p: stats(v) for p, v in bwd.items()},
            "fwd_bwd_ms": {p: stats(v) for p, v in total.items()},
            "infer_ms": {p: stats(v) for p, v in inf.items()},
            "peak_bytes": {p: (None if b is None else b + input_bytes) for p, b in memory.items()},
        }
        row["ratios"] = ratios(row)
        if device.type == "cuda":
            row["achieved_GBps"] = achieved_bandwidth(row)
        rows.append(row)
        gc.collect()
    return rows


def _median(table: dict, provider: str) -> Optional[float]:
    cell = table.get(provider)
    return None if cell is None else cell["median"]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(row: dict) -> dict[str, Optional[float]]:
    total, fwd, bwd, inf, mem = row["fwd_bwd_ms"], row["forward_ms"], row["backward_ms"], row["infer_ms"], row[
        "peak_bytes"]
    base = _median(total, "baseline")
    out: dict[str, Optional[float]] = {}
    for provider in ("eager", "compiled", "torchscript", "floor"):
        out[f"{provider}/baseline"] = _ratio(_median(total, provider), base)
        out[f"{provider}/baseline fwd"] = _ratio(_median(fwd, provider), _median(fwd, "baseline"))
        out[f"{provider}/baseline bwd"] = _ratio(_median(bwd, provider), _median(bwd, "baseline"))
    out["compiled/floor"] = _ratio(_median(total, "compiled"), _median(total, "floor"))
    out["onnx/eager fwd"] = _ratio(_median(inf, "onnx"), _median(inf, "eager"))
    out["eager mem/baseline mem"] = _ratio(mem.get("eager"), mem.get("baseline"))
    # The memory target: pred + its gradient + whatever the loss allocates. The other inputs (targets,
    # weights, labels) are held by the caller either way; box losses' (N, 4) targets and weights alone would put
    # the all-inputs ratio at 2.0 for a loss that allocates nothing but the gradient.
    held_by_caller = row["input_bytes"] - row["pred_bytes"]
    for provider in ("compiled", "eager", "baseline"):
        peak = mem.get(provider)
        held_by_loss = None if peak is None else peak - held_by_caller
        out[f"{provider} mem/(pred+grad)"] = _ratio(held_by_loss, 2 * row["pred_bytes"])
        out[f"{provider} mem incl. all inputs/(pred+grad)"] = _ratio(peak, 2 * row["pred_bytes"])
    return out


def achieved_bandwidth(row: dict) -> dict[str, Optional[float]]:
    """GB/s of fwd+bwd if it read the inputs once and wrote pred's gradient once (the memory-bound floor)."""
    moved = row["input_bytes"] + row["pred_bytes"]
    return {p: (None if s is None else moved / (s["median"] * 1e-3) / 1e9) for p, s in row["fwd_bwd_ms"].items()}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth, GB/s (read + write)."""
    clock = Clock(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        clock.sync()
        t0 = clock.now()
        dst.copy_(src)
        t1 = clock.now()
        clock.sync()
        best = min(best, clock.elapsed_ms(t0, t1))
    return 2 * nbytes / (best * 1e-3) / 1e9


# --- environment ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "threads_requested": threads,
        "loadavg_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "MALLOC_MMAP_MAX_": os.environ.get("MALLOC_MMAP_MAX_"),
    }
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except Exception:
        env["onnxruntime"] = None
    try:
        env["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE, timeout=10
        ).stdout.strip()
    except Exception:
        env["git"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["copy_GBps"] = copy_bandwidth(device)
    return env


# --- markdown -------------------------------------------------------------------------------------------------


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(cell: Optional[dict]) -> str:
    if cell is None:
        return "-"
    m = cell["median"]
    return f"{m:.1f}" if m >= 10 else f"{m:.2f}"


def markdown(result: dict) -> str:
    lines = []
    for run in result["runs"]:
        env = run["environment"]
        allocator = ALLOCATOR_LABELS.get(run["allocator"], run["allocator"])
        lines.append(f"### {allocator} ({run['dtype']}, {env['device']})")
        lines.append("")
        lines.append(
            f"{env['date']} · {env['cpu']} · {env['threads']} thread(s) · load average "
            f"{' / '.join(f'{x:.2f}' for x in env['loadavg_start'])} → "
            f"{' / '.join(f'{x:.2f}' for x in env.get('loadavg_end', env['loadavg_start']))} · torch {env['torch']}"
            f" · onnxruntime {env['onnxruntime']} · git {env.get('git')}"
        )
        if env.get("gpu"):
            lines.append(f"GPU {env['gpu']}, measured copy bandwidth {env['copy_GBps']:.0f} GB/s")
        if run.get("positive_fraction") is not None:
            lines.append(
                f"Class labels (focal, QFL, sigmoid CE): {run['positive_fraction']:.1%} of the samples with a class, "
                "the rest background."
            )
        lines.append("")
        lines.append(
            "Fwd+bwd medians; ratios < 1 are faster than the baseline. ORT/eager: forward only, no autograd. "
            "Memory: peak live tensor bytes of one fwd+bwd, inputs included; compiled mem/(pred+grad) leaves out the "
            "inputs other than pred (targets, weights: held by the caller either way)."
        )
        lines.append("")
        header = (
            "| config | N | baseline ms | eager/base | compiled/base | TS/base | floor ms | compiled/floor "
            "| eager fwd ms | ORT/eager fwd | base mem MB | eager mem/base | compiled mem/(pred+grad) | reps |"
        )
        lines.append(header)
        lines.append("|" + "---|" * (header.count("|") - 1))
        for row in run["rows"]:
            r = row["ratios"]
            base_mem = row["peak_bytes"].get("baseline")
            lines.append(
                f"| {row['config']} | {row['N']:,} | {_ms(row['fwd_bwd_ms'].get('baseline'))} "
                f"| {_fmt(r['eager/baseline'])} | {_fmt(r['compiled/baseline'])} | {_fmt(r['torchscript/baseline'])} "
                f"| {_ms(row['fwd_bwd_ms'].get('floor'))} | {_fmt(r['compiled/floor'])} "
                f"| {_ms(row['infer_ms'].get('eager'))} | {_fmt(r['onnx/eager fwd'])} "
                f"| {_fmt(None if base_mem is None else base_mem / 1e6, 0)} | {_fmt(r['eager mem/baseline mem'])} "
                f"| {_fmt(r['compiled mem/(pred+grad)'])} | {row['repeats']} |"
            )
        lines.append("")
        lines.append("<details><summary>forward / backward ratios and min–max spread</summary>")
        lines.append("")
        lines.append(
            "| config | N | eager fwd/base | eager bwd/base | compiled fwd/base | compiled bwd/base "
            "| baseline fwd+bwd min–max ms | eager min–max ms | compiled min–max ms |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for row in run["rows"]:
            r = row["ratios"]

            def spread(p: str) -> str:
                cell = row["fwd_bwd_ms"].get(p)
                return "-" if cell is None else f"{cell['min']:.1f}–{cell['max']:.1f}"

            lines.append(
                f"| {row['config']} | {row['N']:,} | {_fmt(r['eager/baseline fwd'])} | {_fmt(r['eager/baseline bwd'])} "
                f"| {_fmt(r['compiled/baseline fwd'])} | {_fmt(r['compiled/baseline bwd'])} "
                f"| {spread('baseline')} | {spread('eager')} | {spread('compiled')} |"
            )
        lines.append("")
        lines.append("</details>")
        if any("achieved_GBps" in row for row in run["rows"]):
            lines.append("")
            lines.append("| config | N | " + " | ".join(f"{p} GB/s" for p in TRAIN_PROVIDERS) + " |")
            lines.append("|---|---|" + "---|" * len(TRAIN_PROVIDERS))
            for row in run["rows"]:
                bw = row.get("achieved_GBps", {})
                cells = " | ".join(_fmt(bw.get(p), 0) for p in TRAIN_PROVIDERS)
                lines.append(f"| {row['config']} | {row['N']:,} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> Optional[Path]:
    """Speed-up of compiled over the baseline against N, one line per config and one panel per run (allocator,
    dtype), if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 5), squeeze=False)
    styles = ("-", "--", ":")  # the colour cycle has 10 colours; more configs than that repeat one
    for ax, run in zip(axes[0], runs):
        configs = sorted({row["config"] for row in run["rows"]})
        for index, config in enumerate(configs):
            rows = [row for row in run["rows"] if row["config"] == config]
            xs = [row["N"] for row in rows]
            ys = [1 / r if (r := row["ratios"]["compiled/baseline"]) else math.nan for row in rows]
            ax.plot(xs, ys, marker="o", linestyle=styles[index // 10 % len(styles)], label=config)
        ax.set_xscale("log")
        ax.set_xlabel("N")
        ax.set_ylabel("compiled speed-up over the baseline (fwd+bwd)")
        ax.set_title(f"{ALLOCATOR_LABELS.get(run['allocator'], run['allocator'])}, {run['dtype']}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "speedup.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- entry point ------------------------------------------------------------------------------------------------


# Sigmoid CE with class labels at classification sizes: the "CE-sigmoid" targets (the seed's own sigmoid CE
# is FCOS centerness, one logit per box).
DEFAULT_EXTRA_CONFIGS = {"ce_sigmoid_labels": OPTION_CONFIGS["ce_sigmoid_labels"]}


def select_configs(args: argparse.Namespace) -> dict[str, dict]:
    configs = representative_configs() if args.all else {**SEED_CONFIGS, **DEFAULT_EXTRA_CONFIGS}
    if args.losses:
        wanted = [w.strip() for w in args.losses.split(",") if w.strip()]
        everything = representative_configs()
        picked = {}
        for w in wanted:
            if w in everything:
                picked[w] = everything[w]
            else:
                picked.update({k: v for k, v in everything.items() if v["type"] == w})
        unknown = [w for w in wanted if w not in everything and not any(v["type"] == w for v in everything.values())]
        if unknown:
            raise SystemExit(f"unknown loss / config {', '.join(unknown)}; choose from {', '.join(everything)}")
        configs = picked
    # drop configurations that build the same loss as an earlier one (e.g. qfl_gfl == qfl)
    seen: dict[str, str] = {}
    unique = {}
    for name, cfg in configs.items():
        try:
            key = json.dumps(loss_config(build_loss(cfg)), sort_keys=True, default=str) + CONFIG_VARIANTS.get(name, "")
        except Exception:
            key = name
        if key in seen and not args.losses:
            continue
        seen[key] = name
        unique[name] = cfg
    return unique


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    # run as a script (`python benchmarks/run.py`) or through `visdet-export bench` (visdet_export.bench imports it)
    prog = "python benchmarks/run.py" if __name__ == "__main__" else "visdet-export bench"
    return parse_options(argv, prog)


def _run_record(env: dict[str, Any], dtype_name: str, rows: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    allocator = "pinned" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "default"
    return {"allocator": allocator, "dtype": dtype_name, "positive_fraction": args.positive_fraction,
            "environment": env, "rows": [r for r in rows if "error" not in r],
            "errors": [r for r in rows if "error" in r]}


def run_here(
    args: argparse.Namespace, log: Callable[[str], None], checkpoint: Callable[[list[dict]], None] = lambda runs: None
) -> list[dict]:
    """Every dtype's run of the selected configurations in this process; ``checkpoint`` gets the runs so far after
    each configuration (a run cut short by a time limit keeps what it measured)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is available")
    sizes = args.sizes or None
    runs = []
    with tempfile.TemporaryDirectory(prefix="visdet-bench-") as tmp:
        for dtype_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            dtype = getattr(torch, dtype_name)
            env = environment(device, args.threads)
            rows: list[dict] = []
            for name, cfg in select_configs(args).items():
                t0 = time.perf_counter()
                try:
                    rows.extend(run_config(name, cfg, sizes, args, dtype, device, Path(tmp), log))
                except Exception as error:
                    log(f"  {name} failed: {type(error).__name__}: {error}")
                    rows.append({"config": name, "error": f"{type(error).__name__}: {error}"})
                log(f"{name}: {time.perf_counter() - t0:.1f} s")
                checkpoint([*runs, _run_record(env, dtype_name, rows, args)])
            env["loadavg_end"] = list(os.getloadavg())
            runs.append(_run_record(env, dtype_name, rows, args))
    return runs


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def write(runs: list[dict], complete: bool) -> dict:
        result = {"runner": "benchmarks/run.py", "argv": list(argv if argv is not None else sys.argv[1:]),
                  "complete": complete, "runs": runs}
        with open(out / "results.json", "w") as f:
            json.dump(result, f, indent=1)
        if not args.json_only:
            (out / "results.md").write_text(markdown(result))
        return result

    current = "pinned" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "default"
    wanted = ["default", "pinned"] if args.allocator == "both" else [args.allocator]
    runs: list[dict] = []
    for allocator in wanted:
        if allocator == current and len(wanted) == 1:
            runs.extend(run_here(args, log, lambda partial: write(partial, complete=False)))
            continue
        # re-execute with the allocator's environment; the child writes JSON only
        env = dict(os.environ)
        env.pop("MALLOC_MMAP_MAX_", None)
        env.update(ALLOCATORS[allocator])
        child_out = out / f"_{allocator}"
        child_argv = list(argv if argv is not None else sys.argv[1:])
        child_argv = _strip_option(child_argv, "--allocator")
        child_argv = _strip_option(child_argv, "--out")
        command = [sys.executable, str(Path(__file__).resolve()), *child_argv, "--allocator", allocator,
                   "--out", str(child_out), "--json-only"]
        log(f"== allocator: {ALLOCATOR_LABELS[allocator]}")
        subprocess.run(command, env=env, check=True)
        with open(child_out / "results.json") as f:
            runs.extend(json.load(f)["runs"])
        for leftover in child_out.iterdir():
            leftover.unlink()
        child_out.rmdir()
    result = write(runs, complete=True)
    if not args.json_only:
        print((out / "results.md").read_text())
        plot(result, out)
    return 0


def _strip_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == option:
            skip = True
            continue
        if item.startswith(option + "="):
            continue
        out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main())
