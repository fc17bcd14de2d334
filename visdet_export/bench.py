"""``visdet-export bench``: the benchmark runner of ``benchmarks/run.py`` (in a source checkout).

The runner and its MMDetection-style baselines live in the repository's ``benchmarks/`` folder, next to the
package; ``main(argv)`` runs it with the runner's own options (``--quick``, ``--losses``, ``--sizes``, ...).
"""

import importlib.util
import sys
from pathlib import Path
from typing import Optional


NEEDS_CHECKOUT = (
    "visdet-export bench needs a source checkout: it runs benchmarks/run.py, which the wheel does not ship; run it "
    "from the root of a clone of the repository (its --help lists the runner's options)"
)


def runner_path() -> Path:
    """``benchmarks/run.py`` beside the package (a source checkout or an editable install), else in the working
    directory when that is a clone of this project (an installed wheel run from its root): any other folder's
    ``benchmarks/run.py`` is someone else's code."""
    beside = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    here = Path.cwd() / "benchmarks" / "run.py"
    return here if not beside.is_file() and here.is_file() and _is_this_project(Path.cwd()) else beside


def _is_this_project(root: Path) -> bool:
    try:
        return 'name = "visdet-export"' in (root / "pyproject.toml").read_text()
    except OSError:
        return False


def main(argv: Optional[list[str]] = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    path = runner_path()
    if not path.exists():
        asked_for_help = bool({"-h", "--help"} & set(arguments))
        print("usage: visdet-export bench [runner options]\n\n" + NEEDS_CHECKOUT if asked_for_help else NEEDS_CHECKOUT,
              file=sys.stdout if asked_for_help else sys.stderr)
        return 0 if asked_for_help else 2
    spec = importlib.util.spec_from_file_location("visdet_export_bench_runner", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(arguments))


if __name__ == "__main__":
    sys.exit(main())
