"""``visdet-export bench``: the benchmark runner of ``benchmarks/run.py`` (in a source checkout).

The runner and its MMDetection-style baselines live in the repository's ``benchmarks/`` folder, next to the
package; ``main(argv)`` runs it with the runner's own options (``--quick``, ``--losses``, ``--sizes``, ...).
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

NEEDS_CHECKOUT = (
    "visdet-export bench needs a source checkout: it runs benchmarks/run.py, which the wheel does not ship; run it "
    "from the root of a clone of the repository (its --help lists the runner's options)"
)


def runner_path() -> Optional[Path]:
    """``benchmarks/run.py`` of this project's checkout: the one beside the package (a source checkout or an
    editable install), else the working directory's (an installed wheel run from the root of a clone); None
    without one. Any other ``benchmarks/run.py`` (a folder's, another distribution's top-level ``benchmarks`` in
    site-packages) is someone else's code."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "run.py").is_file() and _is_this_project(root):
            return root / "benchmarks" / "run.py"
    return None


def _is_this_project(root: Path) -> bool:
    try:
        return 'name = "visdet-export"' in (root / "pyproject.toml").read_text()
    except OSError:
        return False


def main(argv: Optional[list[str]] = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    path = runner_path()
    if path is None or not path.is_file():
        asked_for_help = bool({"-h", "--help"} & set(arguments))
        print("usage: visdet-export bench [runner options]\n\n" + NEEDS_CHECKOUT if asked_for_help else NEEDS_CHECKOUT,
              file=sys.stdout if asked_for_help else sys.stderr)
        return 0 if asked_for_help else 2
    options = path.with_name("run_options.py")
    if options.is_file():  # its --help and usage errors answer here, before run.py imports torch
        _load(options, "visdet_export_bench_options").parse_args(arguments, prog="visdet-export bench")
    return int(_load(path, "visdet_export_bench_runner").main(arguments))


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(main())
