"""``visdet-export bench``: the benchmark runner of ``benchmarks/run.py`` (in a source checkout).

The runner and its MMDetection-style baselines live in the repository's ``benchmarks/`` folder, next to the
package; ``main(argv)`` runs it with the runner's own options (``--quick``, ``--losses``, ``--sizes``, ...).
"""

import importlib.util
import sys
from pathlib import Path
from typing import Optional


def runner_path() -> Path:
    """``benchmarks/run.py`` beside the package (a source checkout or an editable install), else in the working
    directory (an installed wheel, run from the root of a clone)."""
    beside = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    here = Path.cwd() / "benchmarks" / "run.py"
    return here if not beside.is_file() and here.is_file() else beside


def main(argv: Optional[list[str]] = None) -> int:
    path = runner_path()
    if not path.exists():
        print(
            "visdet-export bench needs a source checkout: it runs benchmarks/run.py, which the wheel does not ship; "
            "run it from the root of a clone of the repository",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location("visdet_export_bench_runner", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
