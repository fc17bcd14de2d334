"""The options of ``benchmarks/run.py``, without torch: ``visdet-export bench --help`` and its usage errors answer
before run.py imports torch (``visdet_export/bench.py`` parses with this file first, then runs run.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from visdet_export.parsers import sample_counts

HERE = Path(__file__).resolve().parent
#: The first paragraph of run.py's docstring (its --help says it).
DESCRIPTION = "Benchmark runner: every loss side by side with its MMDetection-style eager baseline."
ALL_PROVIDERS = ("baseline", "eager", "compiled", "torchscript", "floor", "onnx")
#: The floating dtypes a run can measure (``--dtypes``).
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: Optional[list[str]], prog: str) -> argparse.Namespace:
    """run.py's options, checked and completed with their defaults; ``--help`` and mistakes exit (argparse)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats: a smoke run")
    parser.add_argument("--all", action="store_true",
                        help="every representative configuration (default: those of visdet's losses page and "
                        "sigmoid CE on class labels)")
    parser.add_argument("--losses", default="", help="comma-separated config names or loss types")
    parser.add_argument(
        "--sizes", type=sample_counts, default="", help="comma-separated N overriding every loss's sizes"
    )
    parser.add_argument("--providers", default=",".join(ALL_PROVIDERS), help="subset of " + ",".join(ALL_PROVIDERS))
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 7, quick 3)")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed repeats per cell at least (default 3)")
    parser.add_argument(
        "--cell-budget-s", type=float, default=30.0, help="stop repeating a cell after this many seconds (default 30)"
    )
    parser.add_argument(
        "--min-cell-s", type=float, default=None,
        help="repeat short cells past --repeats (up to 10x) until they ran this long (default 1, quick 0)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--allocator", choices=("default", "pinned", "both"), default=None,
                        help="glibc allocator setting; 'both' re-executes twice (default: both on CPU, else default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--positive-fraction", type=float, default=None,
                        help="share of samples with a class label for focal / QFL / sigmoid CE, the rest background "
                        "(e.g. 0.01, as a detector's anchors; default: labels uniform over the 80 classes and "
                        "background)")
    parser.add_argument("--out", default=None,
                        help="output folder for results.json / results.md (default: benchmarks/results, and "
                        "benchmarks/results/quick for --quick, so that a smoke run keeps the recorded results)")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    # mistakes in the options are usage errors (exit 2) before anything runs, not a failed or empty run
    unknown = [p for p in args.providers if p not in ALL_PROVIDERS]
    if unknown or not args.providers:
        parser.error(f"--providers {','.join(unknown) or '(none)'}: choose from {','.join(ALL_PROVIDERS)}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - set(DTYPES):
        parser.error(f"--dtypes {args.dtypes!r}: choose from {','.join(DTYPES)}")
    if args.threads < 1 or args.repeats is not None and args.repeats < 1:
        parser.error("--threads and --repeats take a positive integer")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    args.min_repeats = min(args.min_repeats, args.repeats)
    if args.min_cell_s is None:
        args.min_cell_s = 0.0 if args.quick else 1.0
    if args.allocator is None:  # glibc's state matters to CPU timings only
        args.allocator = "default" if args.quick or args.device != "cpu" else "both"
    if args.out is None:
        args.out = str(HERE / "results" / "quick" if args.quick else HERE / "results")
    return args
