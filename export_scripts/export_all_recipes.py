#!/usr/bin/env python3
"""Export every bundled detector recipe into a directory tree: OUT_DIR/<recipe>/<loss path>.<suffix>.

    python export_scripts/export_all_recipes.py OUT_DIR [--recipes retinanet,gfl] [--format onnx,torchscript]

Every recipe's losses are built and every target checked before the first file is written, so an existing
artifact (without --overwrite) stops the run with nothing changed. Each artifact is verified against eager PyTorch
unless --no-verify, and gets a <file>.json manifest. Exit status: 0 all good, 1 an artifact failed, 2 bad input,
130 interrupted (Ctrl-C or SIGTERM: finished artifacts keep their manifests, nothing partial is left).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="output directory; one sub-directory per recipe")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: all bundled recipes)")
    parser.add_argument(
        "--format", default="onnx,torchscript", help="comma-separated formats (default: onnx,torchscript)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing, so --help answers without loading torch.
    from visdet_export.cli import run_export_script
    from visdet_export.recipes import recipe_losses, recipe_names

    def groups() -> dict[str, dict]:
        names = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else recipe_names()
        return {name: recipe_losses(name) for name in names}

    return run_export_script(
        "export_all_recipes",
        groups,
        args.out_dir,
        args.format,
        verify=args.verify,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )


if __name__ == "__main__":
    sys.exit(main())
