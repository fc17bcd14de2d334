"""Build and run the C++ consumer (``export_scripts/cpp``) and compare it with eager PyTorch.

The C++ program ``visdet_loss_runner`` links the libtorch that ships inside the torch wheel, loads a TorchScript
loss (``torch::jit::load``) or an AOTInductor ``.pt2`` package (``torch::inductor::AOTIModelPackageLoader``),
runs it on inputs written here and prints JSON. This module builds it once (cached; rebuilt only when its
sources, torch or the compiler change), exports a loss, writes the inputs, runs the program and compares the
loss and d loss / d pred with eager PyTorch. It doubles as a smoke test of a user's C++ toolchain::

    python -m visdet_export.cpp                      # every representative configuration, TorchScript
    python -m visdet_export.cpp --config focal --pt2 # one configuration, TorchScript and .pt2

:func:`check_pt2_bundle` runs a ``.pt2`` bundle (every entry's inputs positionally, the manifest's flat order)
and checks every entry, each call feeding the entries different N (N = 0 included).

Inputs file (``torch.save``, read in C++ with ``torch::pickle_load``)::

    {"format": "visdet-cases/1",
     "cases": [{"name": str, "args": [arg, ...], "grad": bool}, ...]}

``args`` are the positional arguments of the loss's ``forward`` (tensors, None, a reduction string, a Python
number, or a tuple of tensors) for TorchScript, and the package's positional tensors for ``.pt2``. With
``grad`` the program reports d loss.sum() / d args[0] from libtorch's autograd.

If ``cmake`` or a C++ compiler is missing, :func:`toolchain_problem` says which, and :func:`build_runner`
raises :class:`ToolchainUnavailable` (tests skip on it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import parsers
from .parsers import SOURCE_FILES, source_dir
from .registry import MODELS, build_loss
from .specs import CONFIG_VARIANTS, LossSpec, SampleOptions, representative_configs, spec_for

CASES_FORMAT = "visdet-cases/1"
PROGRAM = "visdet_loss_runner"
RTOL = 1e-6
STAMP = "visdet-build.json"

LossLike = nn.Module | Mapping[str, object] | str


class ToolchainUnavailable(RuntimeError):
    """cmake, a C++ compiler or the wheel's libtorch CMake files are missing (the message says which)."""


class CppBuildError(RuntimeError):
    """Configuring or compiling the C++ program failed; the message ends with the build log's tail."""


class CppRunError(RuntimeError):
    """The C++ program could not load the artifact or the inputs, or printed something that is not JSON."""


# --- toolchain and build ---------------------------------------------------------------------------------------


def default_build_dir(sources: str | os.PathLike[str] | None = None) -> Path:
    """``$VISDET_EXPORT_CPP_BUILD_DIR``, else ``$XDG_CACHE_HOME/visdet-export/cpp/<environment>`` (``~/.cache/...``):
    one build per torch installation and source folder (``sources``, default :func:`source_dir`), so virtual
    environments and checkouts sharing the cache neither rebuild over each other's program nor replace it while
    the other runs it."""
    return parsers.default_build_dir(sources if sources is not None else source_dir(), torch_cmake_prefix())


def _compiler() -> str | None:
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def torch_cmake_prefix() -> Path:
    return Path(torch.utils.cmake_prefix_path)


def cxx11_abi() -> int:
    """The libstdc++ ABI libtorch was built with; the C++ program must be compiled with the same."""
    return int(torch._C._GLIBCXX_USE_CXX11_ABI)


def toolchain_problem(sources: Path | None = None) -> str | None:
    """Why the C++ program cannot be built here, or None when cmake, a compiler and libtorch are present."""
    if shutil.which("cmake") is None:
        return "cmake is not installed (it is needed to build the C++ consumer; e.g. apt-get install cmake)"
    if _compiler() is None:
        return "no C++ compiler found (set CXX, or install g++ or clang++)"
    if not (torch_cmake_prefix() / "Torch" / "TorchConfig.cmake").is_file():
        return f"this torch ({torch.__version__}) ships no libtorch CMake files under {torch_cmake_prefix()}"
    sources = sources or source_dir()
    missing = [name for name in SOURCE_FILES if not (sources / name).is_file()]
    if missing:
        why = ""
        if sources.name == "cpp_project" and not sources.is_dir():  # a checkout without symlinks: a text file
            why = (
                ": this copy of visdet-export was built from a git checkout without symbolic links (git config "
                "core.symlinks false), which leaves them out of the wheel; install it from a checkout with symlinks "
                "(git clone -c core.symlinks=true), or"
            )
        return (
            f"the C++ sources are missing from {sources} ({', '.join(missing)}){why or ';'} set "
            "VISDET_EXPORT_CPP_SOURCE to a folder holding them (export_scripts/cpp of a checkout)"
        )
    return None


@dataclasses.dataclass(frozen=True)
class BuiltRunner:
    """The built program; ``seconds`` is the time this call spent building (0 when the cache was current)."""

    path: Path
    build_dir: Path
    rebuilt: bool
    seconds: float


def _build_key(sources: Path) -> dict[str, str]:
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        digest.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
    return {
        "sources": digest.hexdigest(),
        "source_dir": str(sources.resolve()),
        "torch": torch.__version__,
        "torch_prefix": str(torch_cmake_prefix()),
        "compiler": str(_compiler()),
        "compiler_version": _compiler_version(),
        "cxx11_abi": str(cxx11_abi()),
    }


def _compiler_version() -> str:
    """The first line of ``<compiler> --version``: an upgraded compiler at the same path rebuilds too."""
    compiler = _compiler()
    if compiler is None:
        return "none"
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (result.stdout.strip().splitlines() or ["unknown"])[0]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` so parallel test workers build once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_logged(command: list[str], log: list[str], cwd: Path | None = None) -> None:
    result = subprocess.run(command, check=False, cwd=cwd, capture_output=True, text=True)
    log.append("$ " + " ".join(command) + "\n" + result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join("".join(log).splitlines()[-40:])
        raise CppBuildError(f"{command[0]} failed (exit {result.returncode}):\n{tail}")


def build_runner(
    build_dir: str | os.PathLike[str] | None = None,
    *,
    sources: str | os.PathLike[str] | None = None,
    jobs: int = 2,
    force: bool = False,
) -> BuiltRunner:
    """Configure and build ``visdet_loss_runner`` in ``build_dir`` unless an up-to-date build is there.

    The build is keyed on the sources' contents, the torch version and location, the compiler and the
    libstdc++ ABI; a stale or foreign CMake cache in ``build_dir`` is replaced.
    """
    source_path = Path(sources) if sources is not None else source_dir()
    problem = toolchain_problem(source_path)
    if problem:
        raise ToolchainUnavailable(problem)
    directory = Path(build_dir) if build_dir is not None else default_build_dir(source_path)
    directory.mkdir(parents=True, exist_ok=True)
    program = directory / PROGRAM
    key = _build_key(source_path)
    with _locked(directory):
        stamp = directory / STAMP
        if not force and program.is_file() and stamp.is_file():
            with contextlib.suppress(ValueError, OSError):
                if json.loads(stamp.read_text()) == key:
                    return BuiltRunner(program, directory, False, 0.0)
        stamp.unlink(missing_ok=True)
        cache = directory / "CMakeCache.txt"
        if cache.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={source_path.resolve()}" not in cache.read_text():
            cache.unlink()  # configured for another source tree: cmake would refuse to reuse it
            shutil.rmtree(directory / "CMakeFiles", ignore_errors=True)
        start = time.perf_counter()
        log: list[str] = []
        _run_logged(
            [
                "cmake",
                "-S",
                str(source_path.resolve()),
                "-B",
                str(directory.resolve()),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DCMAKE_PREFIX_PATH={torch_cmake_prefix()}",
                f"-DVISDET_CXX11_ABI={cxx11_abi()}",
                f"-DCMAKE_CXX_COMPILER={_compiler()}",
            ],
            log,
        )
        _run_logged(["cmake", "--build", str(directory.resolve()), "-j", str(max(1, jobs))], log)
        if not program.is_file():
            raise CppBuildError(f"the build finished but {program} is missing")
        seconds = time.perf_counter() - start
        stamp.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
        return BuiltRunner(program, directory, True, seconds)


# --- inputs and running ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One call: the positional ``args`` of forward (TorchScript) or of the package (.pt2)."""

    name: str
    args: list[Any]
    grad: bool = True


def _portable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().contiguous().clone()  # own storage: no views into a larger buffer
    if isinstance(value, tuple):
        return tuple(_portable(v) for v in value)
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def write_cases(path: str | os.PathLike[str], cases: Sequence[Case]) -> Path:
    """Write the inputs file the C++ program reads (see the module docstring for the format)."""
    payload = {
        "format": CASES_FORMAT,
        "cases": [{"name": c.name, "args": _portable(list(c.args)), "grad": bool(c.grad)} for c in cases],
    }
    torch.save(payload, path)
    return Path(path)


def _tensor_from_json(record: Mapping[str, Any]) -> Tensor:
    dtypes = {
        "float32": torch.float32,
        "float64": torch.float64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
        "bool": torch.bool,
    }
    values = torch.tensor(record["values"], dtype=torch.float64)
    return values.reshape(record["shape"]).to(dtypes.get(record["dtype"], torch.float64))


def run_program(
    program: str | os.PathLike[str],
    runtime: str,
    artifact: str | os.PathLike[str],
    cases_path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run the C++ program; returns its JSON with every case's ``outputs`` turned into tensors.

    ``.pt2`` packages run with their compiled input checks on (``AOTI_RUNTIME_CHECK_INPUTS=1``, as the C++
    README advises while integrating), so every size the check feeds must pass them too."""
    command = [str(program), runtime, str(artifact), str(cases_path)]
    if threads is not None:
        command += ["--threads", str(threads)]
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"} if runtime == "pt2" else None
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise CppRunError(
            f"{PROGRAM} exited {result.returncode} without JSON output: {error}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        ) from None
    if report.get("error"):
        raise CppRunError(f"{PROGRAM} could not run {artifact}: {report['error']}")
    for case in report["cases"]:
        case["outputs"] = [_tensor_from_json(t) for t in case["outputs"]]
    report["returncode"] = result.returncode
    report["stderr"] = result.stderr
    return report


# --- cases from a loss's input spec ----------------------------------------------------------------------------


class _Recorder:
    """Stands in for the loss in :meth:`LossSpec.call` to learn the positional arguments it passes."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"the spec passes keyword arguments {sorted(kwargs)}; the C++ runner takes positional")
        self.args = list(args)


def forward_args(spec: LossSpec, inputs: Mapping[str, Any], reduction_override: str | None = None) -> list[Any]:
    """The positional arguments ``spec.call`` passes to the loss for ``inputs``."""
    recorder = _Recorder()
    spec.call(recorder, inputs, reduction_override)  # type: ignore[arg-type]
    return recorder.args


def default_sizes(spec: LossSpec, budget: int = 20_000) -> tuple[int, ...]:
    """N values to test: one "large" N (at most ``budget`` prediction elements, so the JSON stays small), 1, 0."""
    return (max(2, min(37, budget // max(1, spec.per_sample_elements()))), 1, 0)


def torchscript_cases(
    loss: nn.Module,
    spec: LossSpec,
    *,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[Case]:
    """Calls with and without each optional input, a float and a tensor avg_factor, every reduction override,
    at several N (N = 0 included)."""
    optional = [t.name for t in spec.inputs if t.optional]
    has_weight = "weight" in optional
    cases: list[Case] = []
    for index, n in enumerate(sizes or default_sizes(spec)):
        full = spec.sample(loss, n, seed=seed + index, options=SampleOptions(dtype=dtype))
        plain = {k: v for k, v in full.items() if k not in optional}
        variants: list[tuple[str, dict[str, Any], str | None]] = [
            ("required_only", plain, None),
            ("all_inputs", full, None),
        ]
        if has_weight:
            variants.append(("weight", {**plain, "weight": full["weight"]}, None))
        if "avg_factor" in optional:
            avg = {**full, "avg_factor": float(full["avg_factor"])}
            variants += [("avg_factor_float", avg, None), ("avg_factor_mean", full, "mean")]
        variants += [
            ("override_none", full, "none"),
            ("override_sum", {k: v for k, v in full.items() if k != "avg_factor"}, "sum"),
            ("override_mean", plain, "mean"),
        ]
        for label, inputs, override in variants:
            cases.append(Case(f"N={n}/{label}", forward_args(spec, inputs, override)))
    return cases


def eager_outputs(loss: nn.Module, case: Case) -> list[Tensor]:
    """[loss] or [loss, d loss.sum() / d args[0]] in eager PyTorch, as the C++ program computes them."""
    args = list(case.args)
    if not case.grad:
        with torch.no_grad():
            return [loss(*args).detach()]
    pred = args[0].detach().clone().requires_grad_(True)
    args[0] = pred
    value = loss(*args)
    if not value.requires_grad:
        return [value.detach(), torch.zeros_like(pred)]
    (grad,) = torch.autograd.grad(value.sum(), pred, allow_unused=True)
    return [value.detach(), torch.zeros_like(pred) if grad is None else grad]


@dataclasses.dataclass
class Difference:
    """How far a C++ output is from eager: max |c - e| and that divided by max |e| (0 when both are 0)."""

    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


def compare(expected: Tensor, got: Tensor, rtol: float = RTOL) -> Difference:
    """Element-wise ``|got - expected| <= rtol * (|expected| + max|expected|)``, shapes and dtypes equal."""
    if tuple(expected.shape) != tuple(got.shape):
        return Difference(float("inf"), float("inf"), False, f"shape {tuple(got.shape)} != {tuple(expected.shape)}")
    if expected.dtype != got.dtype:
        return Difference(float("inf"), float("inf"), False, f"dtype {got.dtype} != {expected.dtype}")
    if expected.numel() == 0:
        return Difference(0.0, 0.0, True)
    e, g = expected.double(), got.double()
    same_nonfinite = (~torch.isfinite(e)) & (e == g) | (e.isnan() & g.isnan())
    diff = torch.where(same_nonfinite, 0.0, (g - e).abs())
    scale = e.abs().where(torch.isfinite(e), 0.0).max().item()
    max_abs = diff.max().item()
    ok = bool((diff <= rtol * (e.abs().where(torch.isfinite(e), 0.0) + scale)).all())
    return Difference(max_abs, max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")), ok)


@dataclasses.dataclass
class CaseResult:
    name: str
    error: str | None
    forward: Difference | None
    backward: Difference | None

    @property
    def ok(self) -> bool:
        return self.error is None and all(d is None or d.ok for d in (self.forward, self.backward))


@dataclasses.dataclass
class CheckReport:
    """Parity of one loss configuration in one C++ runtime with eager PyTorch."""

    label: str
    runtime: str
    cases: list[CaseResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases)

    def max_diff(self, which: str) -> float:
        """Largest relative difference of ``"forward"`` or ``"backward"`` over the cases."""
        values = [getattr(c, which).max_rel for c in self.cases if getattr(c, which) is not None]
        return max(values, default=0.0)

    def failures(self) -> list[str]:
        out = []
        for c in self.cases:
            if c.error:
                out.append(f"{c.name}: {c.error}")
            for which in ("forward", "backward"):
                d = getattr(c, which)
                if d is not None and not d.ok:
                    out.append(f"{c.name} {which}: max |diff| {d.max_abs:.3g} (rel {d.max_rel:.3g}) {d.note}".rstrip())
        return out

    def summary(self, label_width: int = 28) -> str:
        """One line; ``label_width`` pads the label, so that a column of reports lines up."""
        status = "ok" if self.ok else "FAILED"
        return (
            f"{self.label:{label_width}s} {self.runtime:11s} {status:6s} {len(self.cases):3d} cases  "
            f"forward rel {self.max_diff('forward'):.2e}  backward rel {self.max_diff('backward'):.2e}  "
            f"{self.seconds:.1f}s"
        )


def _resolve(loss: LossLike, variant: str | None) -> tuple[nn.Module, LossSpec, str]:
    module = loss if isinstance(loss, nn.Module) else build_loss(loss)
    spec = spec_for(module, variant)
    return module, spec, f"{type(module).__name__}[{spec.variant}]"


def export_torchscript_artifact(loss: nn.Module, path: Path) -> Path:
    """The project's TorchScript exporter when present, else ``torch.jit.script(loss).save``."""
    try:
        from .export.torchscript import export_torchscript
    except ImportError:
        torch.jit.script(loss).save(str(path))
        return path
    return Path(export_torchscript(loss, path, verify=False, overwrite=True))  # the C++ run is the check


def _expect(function: Any, *args: Any) -> list[Tensor] | Exception:
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - compared with the C++ program's refusal
        return error


def _report(
    label: str,
    runtime: str,
    cases: Sequence[Case],
    expected: Sequence[Any],
    run: Mapping[str, Any],
    seconds: float,
    rtol: float,
) -> CheckReport:
    results = []
    for case, want, got in zip(cases, expected, run["cases"]):
        if isinstance(want, BaseException):  # eager raised: C++ must refuse the call too
            error = None if got["error"] else f"eager PyTorch raised ({want}) but C++ returned a result"
            results.append(CaseResult(case.name, error, None, None))
            continue
        if got["error"]:
            results.append(CaseResult(case.name, got["error"], None, None))
            continue
        outputs = got["outputs"]
        if len(outputs) != len(want):
            results.append(CaseResult(case.name, f"{len(outputs)} outputs, expected {len(want)}", None, None))
            continue
        forward = compare(want[0], outputs[0], rtol)
        backward = compare(want[1], outputs[1], rtol) if len(want) > 1 else None
        results.append(CaseResult(case.name, None, forward, backward))
    if len(run["cases"]) != len(cases):
        results.append(CaseResult("(all)", f"{len(run['cases'])} results for {len(cases)} cases", None, None))
    return CheckReport(label, runtime, results, seconds)


def check_torchscript(
    loss: LossLike,
    program: str | os.PathLike[str],
    *,
    variant: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    rtol: float = RTOL,
    threads: int | None = None,
) -> CheckReport:
    """Script and save ``loss``, run it in C++ (forward and backward) and compare with eager PyTorch."""
    module, spec, label = _resolve(loss, variant)
    start = time.perf_counter()
    with _work_dir(work_dir) as directory:
        artifact = export_torchscript_artifact(module, directory / "loss.pt")
        cases = torchscript_cases(module, spec, sizes=sizes, seed=seed, dtype=dtype)
        expected = [_expect(eager_outputs, module, case) for case in cases]
        cases_path = write_cases(directory / "cases.pt", cases)
        run = run_program(program, "torchscript", artifact, cases_path, threads=threads)
    return _report(label, "torchscript", cases, expected, run, time.perf_counter() - start, rtol)


def pt2_cases(
    loss: nn.Module,
    spec: LossSpec,
    names: Sequence[str],
    *,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[Case]:
    """The package's positional tensors (``names``, in its input order) at several N (dynamic N)."""
    cases = []
    for index, n in enumerate(sizes or (default_sizes(spec)[0], 5, 1, 0)):
        inputs = spec.sample(loss, n, seed=seed + index, options=SampleOptions(dtype=dtype))
        cases.append(Case(f"N={n}", [inputs[name] for name in names], grad=False))
    return cases


def pt2_eager_outputs(loss: nn.Module, spec: LossSpec, names: Sequence[str], case: Case, joint: bool) -> list[Tensor]:
    """What a (joint) .pt2 package of ``loss`` returns: [loss] or [loss, d loss / d pred]."""
    inputs = dict(zip(names, case.args))
    if not joint:
        with torch.no_grad():
            return [spec.call(loss, inputs).detach()]
    pred = inputs[spec.pred].detach().clone().requires_grad_(True)
    value = spec.call(loss, {**inputs, spec.pred: pred})
    (grad,) = torch.autograd.grad(value.sum(), pred, allow_unused=True) if value.requires_grad else (None,)
    return [value.detach(), torch.zeros_like(pred) if grad is None else grad]


def export_pt2_artifact(loss: nn.Module, path: Path, variant: str | None, joint: bool) -> tuple[Path, list[str]]:
    """Export with the project's .pt2 exporter; returns the package and its input names (from the manifest)."""
    from .export.artifacts import read_manifest
    from .export.pt2 import export_pt2  # raises ImportError until the exporter exists

    artifact = Path(export_pt2(loss, path, variant=variant, joint=joint, verify=False, overwrite=True))
    manifest = read_manifest(artifact)
    names = [entry["name"] if isinstance(entry, Mapping) else str(entry) for entry in manifest["inputs"]]
    return artifact, names


def _manifest_inputs(package: Path, spec: LossSpec) -> list[str]:
    """The package's input names from its manifest (``<package>.json``), else every input of the spec."""
    from .export.artifacts import manifest_path, read_manifest

    if not manifest_path(package).is_file():
        return list(spec.names)
    manifest = read_manifest(package)
    if manifest.get("bundle"):
        raise ValueError(f"{package.name} is a bundle; use check_pt2_bundle")
    return [entry["name"] if isinstance(entry, Mapping) else str(entry) for entry in manifest["inputs"]]


def check_pt2(
    loss: LossLike,
    program: str | os.PathLike[str],
    *,
    variant: str | None = None,
    joint: bool = True,
    work_dir: str | os.PathLike[str] | None = None,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
    rtol: float = RTOL,
    threads: int | None = None,
    artifact: str | os.PathLike[str] | None = None,
    input_names: Sequence[str] | None = None,
) -> CheckReport:
    """Export ``loss`` as a (joint loss + gradient) ``.pt2`` package, run it in C++ at several N and compare
    with eager PyTorch. Pass ``artifact`` to check an existing single-loss package instead (its input order from
    ``input_names``, else from its manifest)."""
    module, spec, label = _resolve(loss, variant)
    start = time.perf_counter()
    with _work_dir(work_dir) as directory:
        if artifact is None:
            package, names = export_pt2_artifact(module, directory / "loss.pt2", variant, joint)
        else:
            package = Path(artifact)
            names = list(input_names) if input_names is not None else _manifest_inputs(package, spec)
        cases = pt2_cases(module, spec, names, sizes=sizes, seed=seed)
        expected = [_expect(pt2_eager_outputs, module, spec, names, case, joint) for case in cases]
        cases_path = write_cases(directory / "cases.pt", cases)
        run = run_program(program, "pt2", package, cases_path, threads=threads)
    return _report(label, "pt2-joint" if joint else "pt2", cases, expected, run, time.perf_counter() - start, rtol)


#: Per-entry sizes a bundle check rotates through ("large": see :func:`large_size`).
BUNDLE_SIZES = ("large", 37, 7, 2, 1, 0)
#: Prediction elements per entry at the "large" size: every entry's loss and gradient come back as JSON.
BUNDLE_BUDGET = 8_000


def large_size(spec: LossSpec, budget: int = BUNDLE_BUDGET, most: int = 1000) -> int:
    """The largest N (at most ``most``, at least 2) whose prediction holds at most ``budget`` elements."""
    return max(2, min(most, budget // max(1, spec.per_sample_elements())))


@dataclasses.dataclass
class BundleCheck:
    """Parity of every entry of a ``.pt2`` bundle run in C++: one :class:`CheckReport` per entry, and the sizes
    each call fed (``calls[k][entry] = N``)."""

    path: Path
    entries: dict[str, CheckReport]
    calls: list[dict[str, int]]
    seconds: float

    @property
    def ok(self) -> bool:
        return bool(self.entries) and all(report.ok for report in self.entries.values())

    def max_diff(self, which: str) -> float:
        return max((report.max_diff(which) for report in self.entries.values()), default=0.0)

    def failures(self) -> list[str]:
        return [f"{name}: {line}" for name, report in self.entries.items() for line in report.failures()]

    def summary(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"bundle {self.path.name}: {len(self.entries)} entries x {len(self.calls)} calls {status}  "
            f"forward rel {self.max_diff('forward'):.2e}  backward rel {self.max_diff('backward'):.2e}  "
            f"{self.seconds:.1f}s"
        )


def bundle_calls(names: Sequence[str], sizes: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """The sizes of each call: call k feeds entry i its ``sizes[name][(i + k) % len]`` (so every call mixes
    sizes, N = 0 included, and every entry meets each of its sizes), then one call with every entry at N = 0."""
    count = max((len(s) for s in sizes.values()), default=0)
    calls = [{name: int(sizes[name][(i + k) % len(sizes[name])]) for i, name in enumerate(names)} for k in range(count)]
    return [*calls, {name: 0 for name in names}]


@dataclasses.dataclass(frozen=True)
class RecordedPackage:
    """A ``.pt2`` package as its manifest records it (:func:`recorded_package`): the manifest, its checksum
    checked, and the losses rebuilt from it, one for a single package, one per entry (in the manifest's order)
    for a bundle."""

    path: Path
    manifest: dict[str, Any]
    losses: tuple[nn.Module, ...]

    @property
    def bundle(self) -> bool:
        return bool(self.manifest.get("bundle"))


def _recorded_losses(path: Path, manifest: Mapping[str, Any]) -> tuple[nn.Module, ...]:
    """The losses ``manifest`` records: a single package's, or a bundle's entries each (an entry whose loss does
    not build, e.g. its plugin not loaded, is named, as verify names it)."""
    from .export.artifacts import build_recorded_loss

    if not manifest.get("bundle"):
        return (build_recorded_loss(dict(manifest["config"]), manifest.get("plugins"), location=path.name),)
    return tuple(
        build_recorded_loss(dict(item["config"]), item.get("plugins"), location=f"{path.name}, entry {item['name']}")
        for item in manifest["entries"]
    )


def recorded_package(path: str | os.PathLike[str]) -> RecordedPackage:
    """A ``.pt2`` package or bundle read once: its manifest and the losses rebuilt from it, for
    :func:`check_pt2_package` (``cpp --package`` reads each package once, before the build, and checks that).

    Raises:
        ArtifactError: no manifest, a checksum that differs, not a ``.pt2`` package or a config that does not build
            (:class:`~visdet_export.export.artifacts.MissingPluginError`: its plugin is not imported).
    """
    from .export.artifacts import ArtifactError, read_manifest

    package = Path(path)
    manifest = read_manifest(package)
    if manifest.get("format") != "pt2":
        raise ArtifactError(
            f"{package.name} is not a .pt2 package (its manifest says format {manifest.get('format')!r})"
        )
    return RecordedPackage(package, manifest, _recorded_losses(package, manifest))


def check_pt2_bundle(
    path: str | os.PathLike[str] | RecordedPackage,
    program: str | os.PathLike[str],
    *,
    sizes: Sequence[int | str] = BUNDLE_SIZES,
    seed: int = 0,
    rtol: float = RTOL,
    threads: int | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    budget: int = BUNDLE_BUDGET,
) -> BundleCheck:
    """Run a ``.pt2`` bundle (:func:`visdet_export.export.pt2.export_pt2_bundle`) in C++ and compare every entry's
    outputs (loss, and d loss / d pred for joint entries) with eager PyTorch.

    The losses are rebuilt from the manifest's configurations (``path`` may be the bundle as :func:`recorded_package`
    read it: its manifest and losses are not read again). Each call feeds every entry at its own N
    (:func:`bundle_calls`: a rotation of ``sizes``, where ``"large"`` is :func:`large_size` within ``budget``
    prediction elements, then all entries at N = 0), positionally in the manifest's input order; a last call feeds
    every entry N = 7 at the smaller free sizes its manifest names (20 classes, 4 DFL bins, 7 x 7 masks).
    """
    from .export.artifacts import read_manifest
    from .export.verify import SMALLER_SIZES_N, declared_free_sizes

    losses: tuple[nn.Module, ...] | None = None
    if isinstance(path, RecordedPackage):  # read by recorded_package: not again
        package, manifest, losses = path.path, path.manifest, path.losses
    else:
        package = Path(path)
        manifest = read_manifest(package)
    if not manifest.get("bundle"):
        raise ValueError(f"{package.name} is not a bundle (export_pt2_bundle); use check_pt2")
    if losses is None:
        losses = _recorded_losses(package, manifest)
    entries = []
    free_sizes: dict[str, dict[str, int]] = {}
    for item, module in zip(manifest["entries"], losses):
        spec = spec_for(module, item.get("variant"))
        names = [str(i["name"]) for i in item["inputs"]]
        entries.append((str(item["name"]), module, spec, names, bool(item.get("joint")), list(item["outputs"])))
        free_sizes[str(item["name"])] = declared_free_sizes(item, spec)
    per_entry = {
        name: [large_size(spec, budget) if n == "large" else int(n) for n in sizes]
        for name, _, spec, _, _, _ in entries
    }
    calls = bundle_calls([e[0] for e in entries], per_entry)
    calls.append({e[0]: SMALLER_SIZES_N for e in entries})
    flat_inputs = [str(i["name"]) for i in manifest["inputs"]]
    flat_outputs = [str(name) for name in manifest["outputs"]]
    start = time.perf_counter()
    cases: list[Case] = []
    expected: list[dict[str, list[Tensor] | Exception]] = []
    for k, call in enumerate(calls):
        feed: dict[str, Tensor] = {}
        want: dict[str, list[Tensor] | Exception] = {}
        last = k == len(calls) - 1
        for i, (name, module, spec, names, joint, _) in enumerate(entries):
            options = SampleOptions(sizes=free_sizes[name] if last else {})
            drawn = spec.sample(module, call[name], seed=seed + 1000 * k + i, options=options, include=names)
            case = Case(name, [drawn[n] for n in names], grad=False)
            feed.update({f"{name}/{n}": drawn[n] for n in names})
            want[name] = _expect(pt2_eager_outputs, module, spec, names, case, joint)
        cases.append(Case(f"call{k}", [feed[n] for n in flat_inputs], grad=False))
        expected.append(want)
    with _work_dir(work_dir) as directory:
        run = run_program(program, "pt2", package, write_cases(directory / "cases.pt", cases), threads=threads)
    results: dict[str, list[CaseResult]] = {e[0]: [] for e in entries}
    for k, (call, want) in enumerate(zip(calls, expected)):
        missing: dict[str, Any] = {"error": "no result for this call", "outputs": []}
        got: dict[str, Any] = run["cases"][k] if k < len(run["cases"]) else missing
        outputs = dict(zip(flat_outputs, got["outputs"]))
        count_error = (
            None
            if got["error"] or len(got["outputs"]) == len(flat_outputs)
            else f"{len(got['outputs'])} outputs, the manifest names {len(flat_outputs)}"
        )
        for name, _, _, _, _, outs in entries:
            label = f"call{k}/N={call[name]}"
            if k == len(calls) - 1:
                label += "".join(f",{symbol}={size}" for symbol, size in free_sizes[name].items())
            value = want[name]
            if isinstance(value, BaseException):
                note = None if got["error"] else f"eager PyTorch raised ({value}) but C++ returned a result"
                results[name].append(CaseResult(label, note, None, None))
                continue
            if got["error"] or count_error:
                results[name].append(CaseResult(label, got["error"] or count_error, None, None))
                continue
            diffs = [compare(w, outputs[f"{name}/{out}"], rtol) for w, out in zip(value, outs)]
            results[name].append(CaseResult(label, None, diffs[0], diffs[1] if len(diffs) > 1 else None))
    seconds = time.perf_counter() - start
    reports = {
        name: CheckReport(f"{name}: {type(module).__name__}[{spec.variant}]", "pt2-bundle", results[name], seconds)
        for name, module, spec, _, _, _ in entries
    }
    return BundleCheck(package, reports, calls, seconds)


@contextlib.contextmanager
def _work_dir(path: str | os.PathLike[str] | None) -> Iterator[Path]:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="visdet-cpp-") as tmp:
        yield Path(tmp)


def program_info(program: str | os.PathLike[str]) -> dict[str, Any]:
    """``visdet_loss_runner info``: the torch version, libstdc++ ABI and C++ standard it was built with."""
    result = subprocess.run([str(program), "info"], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


# --- command line ----------------------------------------------------------------------------------------------


def check_pt2_package(
    path: str | os.PathLike[str] | RecordedPackage, program: str | os.PathLike[str]
) -> CheckReport | BundleCheck:
    """Run an exported ``.pt2`` package in C++ and compare it with eager PyTorch, the losses rebuilt from its
    manifest (``path`` may be the package as :func:`recorded_package` read it): a bundle entry by entry
    (:func:`check_pt2_bundle`), a single package with :func:`check_pt2`.

    Raises:
        ArtifactError: no manifest, a checksum that differs, not a ``.pt2`` package or a config that does not build
            (:class:`~visdet_export.export.artifacts.MissingPluginError`: its plugin is not imported).
    """
    recorded = path if isinstance(path, RecordedPackage) else recorded_package(path)
    if recorded.bundle:
        return check_pt2_bundle(recorded, program)
    manifest = recorded.manifest
    joint = bool(manifest.get("joint"))
    return check_pt2(recorded.losses[0], program, variant=manifest.get("variant"), joint=joint, artifact=recorded.path)


def main(argv: Sequence[str] | None = None) -> int:
    """Smoke-test the C++ toolchain: build the program, run losses in C++ and compare with eager PyTorch; or check
    exported .pt2 packages (--package) in C++ against eager (the options: :func:`visdet_export.parsers.cpp_parser`).

    Exit status: 0 all parity checks passed, 1 a check failed, 2 a usage mistake or the program could not be built.
    """
    from .export.artifacts import ArtifactError, build_recorded_loss
    from .registry import load_plugins  # $VISDET_EXPORT_PLUGINS and --plugin: losses of one's own
    from .validation import ConfigError

    parser = parsers.cpp_parser()
    args = parser.parse_args(argv)
    try:
        load_plugins(args.plugin)
    except ConfigError as error:
        parser.error(str(error))
    # the configs and packages first: a mistake there is reported before a build of a minute
    known = representative_configs()
    selected: list[tuple[str, Any, str | None]] = []
    for item in args.config or ([] if args.package else list(known)):
        if item in known:
            selected.append((item, known[item], CONFIG_VARIANTS.get(item)))
            continue
        try:
            selected.append((item, json.loads(item), None))
            # a loss of one's own not loaded: the message names --plugin, as verify's does
            build_recorded_loss(selected[-1][1], source=f"--config {item!r}")
        except json.JSONDecodeError:
            # `check --configs` takes a loss type by name; here it goes as a JSON loss dict
            hint = ""
            if item in MODELS:
                hint = f"; for the loss type {item} pass JSON: --config '{{\"type\": \"{item}\"}}'"
            parser.error(f"--config {item!r} is neither a configuration name ({', '.join(known)}) nor JSON{hint}")
        except ArtifactError as error:
            parser.error(str(error))
    packages: list[RecordedPackage] = []  # read once here; checked as read after the build
    for package in args.package:
        try:
            packages.append(recorded_package(package))
        except ArtifactError as error:
            parser.error(str(error))
    if packages:
        print(
            f"{parser.prog}: note: .pt2 packages are programs: the C++ check runs the native code they contain "
            f"({len(packages)} here). Check only files you trust.",
            file=sys.stderr,
        )

    try:
        built = build_runner(args.build_dir, jobs=args.jobs, force=args.rebuild)
    except (ToolchainUnavailable, CppBuildError) as error:
        print(f"{parser.prog}: error: cannot build the C++ program: {error}", file=sys.stderr)
        return 2
    how = f"built in {built.seconds:.1f}s" if built.rebuilt else "cached"
    print(f"{PROGRAM}: {built.path} ({how})")
    print(json.dumps(program_info(built.path)))

    # column widths from the content: names and labels such as LocalizationDistillationLoss[distributions] vary
    labels = []
    for _, cfg, variant in selected:
        try:
            labels.append(_resolve(cfg, variant)[2])
        except Exception:  # noqa: BLE001 - the check itself reports it below
            labels.append("")
    name_width = max((len(name) for name, _, _ in selected), default=0)
    label_width = max(labels, key=len, default="")
    failed = False
    for name, cfg, variant in selected:
        reports = [check_torchscript(cfg, built.path, variant=variant)]
        if args.pt2:
            reports.append(check_pt2(cfg, built.path, variant=variant))
        for report in reports:
            print(f"{name:{name_width}s} {report.summary(len(label_width))}")
            for line in report.failures():
                print(f"    {line}")
            failed |= not report.ok
    for package, recorded in zip(args.package, packages):
        checked = check_pt2_package(recorded, built.path)
        print(checked.summary() if isinstance(checked, BundleCheck) else f"{Path(package).name} {checked.summary()}")
        if isinstance(checked, BundleCheck):
            for entry, report in checked.entries.items():
                print(f"  {entry} {report.summary()}")
        for line in checked.failures():
            print(f"    {line}")
        failed |= not checked.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
