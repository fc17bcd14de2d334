"""The options of ``visdet-export check`` and ``visdet-export cpp``, without torch.

:mod:`visdet_export.check` and :mod:`visdet_export.cpp` import torch (a second or more) at import time. Their
argparse parsers live here, with the constants those need, so that ``--help`` and usage errors answer before the
command's module is imported (:func:`visdet_export.cli._passthrough` parses with them first). Both modules build
their parsers from here and re-export the constants.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
from pathlib import Path

# --- check -------------------------------------------------------------------------------------------------------

DEFAULT_SIZES = (0, 1, 7, 1000)
#: The names of :data:`visdet_export.runtimes.RUNTIMES`, in its order.
RUNTIME_NAMES = ("eager", "compile", "script", "onnx", "pt2")
DEFAULT_RUNTIMES = ("eager", "compile", "script", "onnx", "pt2")
#: Configurations ``--pt2 subset`` covers with separate packages (``dfl`` as a joint loss + gradient package).
PT2_CONFIGS = ("focal", "giou", "dfl")
#: How the pt2 column builds its packages: one joint bundle for every configuration, one package per
#: configuration, or separate packages for :data:`PT2_CONFIGS` only.
PT2_MODES = ("bundle", "separate", "subset")
#: What the onnx column exports: the loss alone, or the joint loss + gradient graph of distillation.
ONNX_MODES = ("loss", "joint")
#: The ``--autocast`` dtypes (torch dtype names): mixed-precision training's lower precisions.
AUTOCAST_NAMES = ("float16", "bfloat16")


def sample_counts(text: str) -> list[int]:
    """``--sizes`` of ``check`` and ``bench``: sample counts N >= 0 separated by commas (argparse ``type``, so a
    usage error is reported before torch is imported)."""
    try:
        sizes = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes sample counts separated by commas, got {text!r}") from None
    if any(n < 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"sample counts must be >= 0, got {text!r}")
    return sizes


def check_parser() -> argparse.ArgumentParser:
    """The options of ``visdet-export check`` (:func:`visdet_export.check.main`)."""
    parser = argparse.ArgumentParser(
        prog="visdet-export check",
        description="Run every representative loss configuration in every runtime and compare it with eager PyTorch.",
    )
    parser.add_argument("--configs", help="comma-separated configuration names or loss types (default: all)")
    parser.add_argument(
        "--runtimes", default=",".join(DEFAULT_RUNTIMES), help=f"comma-separated, from {', '.join(RUNTIME_NAMES)}"
    )
    parser.add_argument(
        "--sizes", type=sample_counts, default=",".join(map(str, DEFAULT_SIZES)),
        help="comma-separated sample counts N (default %(default)s)",
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument(
        "--pt2",
        choices=(*PT2_MODES, "all"),
        default="bundle",
        help="pt2 column: every configuration in one joint package (bundle, default; 'all' is the same), one "
        f"package per configuration (separate, slow), or separate packages for {', '.join(PT2_CONFIGS)} (subset)",
    )
    parser.add_argument(
        "--onnx",
        choices=ONNX_MODES,
        default="loss",
        help="onnx column: export the loss alone (loss, default) or with its gradient output, as distillation "
        "graphs are (joint: values and gradients are checked)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default %(default)s)")
    parser.add_argument(
        "--device",
        help="run eager, compile and script on this device (e.g. cuda) against eager on the CPU; the exported "
        "artifacts' columns are skipped",
    )
    parser.add_argument(
        "--autocast",
        choices=AUTOCAST_NAMES,
        help="run eager, compile and script inside torch.autocast of this dtype, as mixed-precision training does, "
        "against eager outside it; the exported artifacts' columns are skipped",
    )
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


# --- cpp ---------------------------------------------------------------------------------------------------------

SOURCE_FILES = ("CMakeLists.txt", "main.cpp")

CPP_DESCRIPTION = """Smoke-test the C++ toolchain: build the program, run losses in C++ and compare with eager
PyTorch; or check exported .pt2 packages (--package) in C++ against eager.

Exit status: 0 all parity checks passed, 1 a check failed, 2 a usage mistake or the program could not be built."""


def source_dir() -> Path:
    """The CMake project: ``$VISDET_EXPORT_CPP_SOURCE``, else the sources shipped in the package.

    ``visdet_export/cpp_project`` is a symlink to ``export_scripts/cpp`` in a source checkout, and a copy of it
    (package data) in an installed wheel; ``export_scripts/cpp`` beside the package is the fallback for a
    checkout without symlinks.
    """
    env = os.environ.get("VISDET_EXPORT_CPP_SOURCE")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here / "cpp_project", here.parent / "export_scripts" / "cpp"):
        if all((candidate / name).is_file() for name in SOURCE_FILES):
            return candidate.resolve()
    return here / "cpp_project"


def torch_cmake_prefix() -> Path:
    """``torch.utils.cmake_prefix_path`` (``<torch>/share/cmake``), found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:  # no regular torch package: let torch say what it is
        import torch

        return Path(torch.utils.cmake_prefix_path)
    return Path(os.path.join(os.path.dirname(spec.origin), "share", "cmake"))


def default_build_dir(sources: str | os.PathLike[str] | None = None, prefix: Path | None = None) -> Path:
    """:func:`visdet_export.cpp.default_build_dir` for the torch whose CMake files are under ``prefix`` (default:
    :func:`torch_cmake_prefix`)."""
    env = os.environ.get("VISDET_EXPORT_CPP_BUILD_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    source_path = Path(sources) if sources is not None else source_dir()
    where = f"{torch_cmake_prefix() if prefix is None else prefix}\0{source_path.resolve()}"
    return cache / "visdet-export" / "cpp" / hashlib.sha256(where.encode()).hexdigest()[:12]


def cpp_parser() -> argparse.ArgumentParser:
    """The options of ``visdet-export cpp`` (:func:`visdet_export.cpp.main`)."""
    parser = argparse.ArgumentParser(prog="visdet-export cpp", description=CPP_DESCRIPTION)
    parser.add_argument("--build-dir", help=f"where to build (default {default_build_dir()})")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--rebuild", action="store_true", help="build even if the cached build is current")
    parser.add_argument(
        "--config",
        action="append",
        help="a representative configuration name or a JSON loss dict (repeatable); "
        "default: all representative configurations unless --package is given",
    )
    parser.add_argument("--pt2", action="store_true", help="also check joint .pt2 packages (slow: AOTInductor)")
    parser.add_argument(
        "--package", action="append", default=[], metavar="PATH",
        help="an exported .pt2 package or bundle (with its manifest) to run in C++ against eager (repeatable)",
    )
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import MODULE first, a module registering losses of your own (repeatable; also $VISDET_EXPORT_PLUGINS)",
    )
    return parser


#: The parsers of the commands whose modules import torch, by command name.
PARSERS = {"check": check_parser, "cpp": cpp_parser}

__all__ = [
    "AUTOCAST_NAMES",
    "CPP_DESCRIPTION",
    "DEFAULT_RUNTIMES",
    "DEFAULT_SIZES",
    "ONNX_MODES",
    "PARSERS",
    "PT2_CONFIGS",
    "PT2_MODES",
    "RUNTIME_NAMES",
    "SOURCE_FILES",
    "check_parser",
    "cpp_parser",
    "default_build_dir",
    "source_dir",
    "torch_cmake_prefix",
]
