"""Session-wide caches shared by the runtime tests: built losses, compiled callables and exported artifacts.

Fixtures are autouse only for process settings (one intra-op thread, Dynamo's recompile limit, no float
specialisations leaked from earlier tests); tests that do not ask for the caches pay nothing for them. A teardown
hook checks after each process's last test that no loaded ``.pt2`` package outlives the tests.

* ``runner_cache``: one :class:`visdet_export.check.RunnerCache` for the session, keyed by
  ``(config name, runtime key)``; a loss is compiled, scripted or exported at most once per key, whichever test
  asks first (test_compile, test_torchscript, test_pt2 and test_matrix all draw from it). Its ``.pt2`` column
  is one joint AOTInductor bundle of every representative configuration, built on first use
  (``RunnerCache.pt2_bundle``; 60-90 s on 2 cores).
* Parallel runs (``-n auto --dist loadfile``, pyproject's default): each test file runs whole on one worker, so
  its fixtures are built once; :data:`SAME_WORKER` keeps the files that share the ``.pt2`` bundle together.
* No test resets Dynamo (a reset drops the session's compiled runners): ``compile_privately`` compiles with graphs
  of its own, and ``graphs_kept_by`` counts them.
* ``compile_backend(name)``: the real inductor backend for the configurations that exercise its code generation
  (focal, qfl, giou, dfl, softmax CE; 3-6 s each on this 2-core CPU with cold caches, forward and backward); aot_eager
  (the same dynamo graph and AOT-autograd joint graph, no code generation; 0.4-2 s) for the others.
"""

from __future__ import annotations

import gc
import os
import random
import types
from typing import Any, Callable, Optional

import pytest
import torch
import torch._inductor.config
from hypothesis import settings
from torch._dynamo.symbolic_convert import TensorifyState

from visdet_export.check import RunnerCache, runner_options
from visdet_export.runtimes import fresh_function, graphs_kept
from visdet_export.specs import representative_configs

# Inductor checks every vector ISA the CPU reports by compiling and loading a test program for it, once a process:
# ~7 s of the first compile of each test process on cold caches (14.7 -> 7.4 s here), in the workers and in the
# subprocesses of the distributed, README and CLI tests, which inherit the setting. The suite trusts the CPU's flags
# (nothing of ours depends on the probe); TORCHINDUCTOR_VEC_ISA_OK=0 probes again.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")

# Inductor compiles on one thread in every test process (its default is one per CPU, through a pool of worker
# subprocesses started by the first compile): -n auto already runs a worker per CPU, whose compiles would only
# contend; the subprocesses of the distributed, README and CLI tests inherit the setting.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
torch._inductor.config.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])

# hypothesis: fresh examples every run, a reproduction blob on failure; HYPOTHESIS_PROFILE=thorough for 10x
settings.register_profile("default", max_examples=60, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=600, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Configurations compiled with the inductor backend (code generation); the rest use aot_eager.
INDUCTOR_CONFIGS = ("focal", "qfl", "giou", "dfl", "ce_softmax")
CONFIG_NAMES = tuple(representative_configs())


def compile_backend(name: str) -> str:
    return "inductor" if name in INDUCTOR_CONFIGS else "aot_eager"


def onnx_model(graph: Any, **options: Any) -> Any:
    """A hand-written ``onnx.GraphProto`` as a model at opset 18 and IR version 10, as the exporter writes them (both
    overridable): onnx's default IR version follows its release (14 in onnx 1.23), past what older onnxruntime
    releases load (1.23, the last with Python 3.10 wheels, loads 11)."""
    from onnx import helper

    options.setdefault("opset_imports", [helper.make_opsetid("", 18)])
    options.setdefault("ir_version", 10)
    return helper.make_model(graph, **options)


def guard_variant_runner(name: str, runtime: str) -> tuple[Optional[str], dict]:
    """Cache key and options of a runner for tests that call it under other guards (autocast, half precision, other
    memory layouts, inputs that require grad, calls without grad or without the optional inputs): compiled with
    aot_eager into graphs of its own, so the matrix's compiled runners keep the one graph test_properties and
    test_matrix assert."""
    key, options = runner_options(name, runtime, backend="aot_eager")
    return (f"{key}:guard-variants" if runtime == "compile" else key), options


def compile_privately(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(fn, **options)`` with Dynamo state of its own, instead of a ``torch._dynamo.reset()`` before
    it: a reset drops every graph of the process, the session's cached runners included, which later tests on the
    worker then compile again. Dynamo keeps graphs on the code object of the frame it compiles:
    ``torch.compile(module)`` on the class's ``forward``, shared by every instance in every test, a closure on the
    code of its definition. Here a Python function is compiled as a :func:`~visdet_export.runtimes.fresh_function`
    copy (the frame Dynamo sees is unchanged); anything else (a module) through a fresh function whose frame calls
    it, as a training step does."""
    if isinstance(fn, types.FunctionType):
        return torch.compile(fresh_function(fn), **options)

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return torch.compile(fresh_function(call), **options)


def graphs_kept_by(compiled: Callable[..., Any]) -> int:
    """The graphs Dynamo keeps for a :func:`compile_privately` result (a backend's call count also counts the
    analyses torch restarts, which depend on earlier compiles)."""
    return graphs_kept(compiled._torchdynamo_orig_callable)  # type: ignore[attr-defined]


def assert_all_close(compared: list[tuple[str, bool, float, float, str]]) -> None:
    """Every comparison of :func:`visdet_export.check.compare_with_eager` passed (the first failure named)."""
    for label, ok, max_abs, max_rel, why in compared:
        assert ok, f"{label}: {why} (max abs {max_abs:.2e}, rel {max_rel:.2e})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Any:
    """After the process's last test, its fixtures torn down: every loaded ``.pt2`` package has been destroyed (a
    failure here is that test's teardown error). A package's loader deletes its extracted copy
    (``/tmp/aotinductor_*``) when it is destroyed, and one still held at interpreter exit may never be: what a
    module's globals hold is not always destroyed then (never, once Dynamo compiled a function of that module). A
    module-level cache of runners left a directory behind in most CI runs; hold them in fixtures, or clear the
    cache in one."""
    result = yield
    if nextitem is None:
        from torch.export.pt2_archive._package import AOTICompiledModel

        item.funcargs.clear()  # the last test's fixture values, which pytest lets go of only after this hook
        gc.collect()
        alive = [obj for obj in gc.get_objects() if type(obj) is AOTICompiledModel]  # isinstance warns on lazy modules
        holders = [type(holder).__name__ for holder in gc.get_referrers(*alive) if holder is not alive]
        assert not alive, f"{len(alive)} loaded .pt2 package(s) outlive the tests, held by {holders}"
    return result


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """One intra-op thread in every test process: tiny tensors on a shared machine, where intra-op threads only wait
    on each other, and ``-n auto`` already runs a worker per CPU. One count for the whole session also keeps the
    shared compiled runners to one graph: Dynamo guards a graph on torch's thread count, and a module that set its
    own (a module-scoped fixture, before) recompiled the runners another module had compiled on the same worker
    (test_properties' one-graph assertion failed after test_matrix)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Graphs Dynamo keeps per compiled function in this session (its default is 8). The guard-variant runners are
#: called under many guards, by several files (autocast on and off, float16 / bfloat16 / float32, other memory
#: layouts, inputs that require grad, calls without grad or without the optional inputs); with fullgraph=True the
#: ninth graph is a hard failure, which would depend on which files share a worker.
RECOMPILE_LIMIT = 32


@pytest.fixture(scope="session", autouse=True)
def room_for_guard_variants():
    before = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    yield
    torch._dynamo.config.recompile_limit = before


@pytest.fixture(autouse=True)
def no_float_specialisations_of_earlier_tests():
    """Each test compiles Python floats as in a fresh process. torch 2.13 keeps the names of the float symbols its
    scalar analysis chose to specialise process-wide (``TensorifyState``; ``torch._dynamo.reset()`` clears them, and
    the tests no longer reset), then specialises a later compile's float of the same name: a graph per value, so
    frame counts would depend on which tests ran before on the worker (12 graphs for 12 values of a float
    avg_factor, after test_compile's other tests)."""
    TensorifyState.clear()


@pytest.fixture(scope="session")
def runner_cache() -> RunnerCache:
    return RunnerCache()


@pytest.fixture
def seeded() -> int:
    """Seed Python's and torch's global generators (the specs draw from their own seeded generators)."""
    random.seed(0)
    torch.manual_seed(0)
    return 0


#: Test files that run on the worker of another because they use the same expensive session artifacts, which each
#: worker would otherwise build: the joint ``.pt2`` bundle of every configuration (~85 s) feeds test_matrix's pt2
#: column, test_pt2, test_cpp and test_properties' drawn pt2 cells (with test_pt2 on another worker, two of them
#: built it: 85 s more CPU time; with test_properties, 58 s more, and its compiled and exported matrix runners).
SAME_WORKER = {
    "tests/test_cpp.py": "tests/test_matrix.py",
    "tests/test_pt2.py": "tests/test_matrix.py",
    "tests/test_properties.py": "tests/test_matrix.py",
}

#: Workers of ``-n auto`` at most: each holds its own compiled losses and exported artifacts (1-2 GB).
MAX_AUTO_WORKERS = 8


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> Optional[int]:
    """``-n auto``: one worker per CPU this process may run on, at most :data:`MAX_AUTO_WORKERS`; xdist's own
    count (physical cores, or ``$PYTEST_XDIST_AUTO_NUM_WORKERS``) where that variable is set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(usable, MAX_AUTO_WORKERS))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with the files of :data:`SAME_WORKER` in one work unit; other modes as xdist has them."""
    if config.getvalue("dist") != "loadfile":
        return None
    missing = [name for name in {*SAME_WORKER, *SAME_WORKER.values()} if not (config.rootpath / name).is_file()]
    if missing:  # a renamed file would silently build the artifact on two workers again
        raise pytest.UsageError(f"conftest.SAME_WORKER names files that do not exist: {sorted(missing)}")
    from xdist.scheduler import LoadFileScheduling

    class LoadFileSharingArtifacts(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SAME_WORKER.get(scope, scope)

    return LoadFileSharingArtifacts(config, log)
