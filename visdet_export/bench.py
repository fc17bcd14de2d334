"""``visdet-export bench``: the benchmark runner of ``benchmarks/run.py`` (source checkouts only).

The runner and its MMDetection-style baselines live in the repository's ``benchmarks/`` folder, next to the
package; ``main(argv)`` runs it with the runner's own options (``--quick``, ``--losses``, ``--sizes``, ...).
"""

import importlib.util
import sys
from pathlib import Path
from typing import Optional


def runner_path() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def main(argv: Optional[list[str]] = None) -> int:
    path = runner_path()
    if not path.exists():
        print(f"visdet-export bench needs a source checkout: {path} not found", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("visdet_export_bench_runner", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
