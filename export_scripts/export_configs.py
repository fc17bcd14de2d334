#!/usr/bin/env python3
"""Export the losses of many detector configs: OUT/<config name>/<loss path>.<suffix>.

    python export_scripts/export_configs.py configs/*.py --out OUT [--format onnx] [--only loss_cls]

Configs (.py in MMDetection syntax, .json, .toml) are parsed, never executed: a config containing code is refused.
``_base_`` files are followed inside each config's own directory. Every config is read, every loss built and every
target checked before the first file is written. Exit status: 0 all good, 1 an artifact failed, 2 bad input,
130 interrupted (Ctrl-C or SIGTERM: finished artifacts keep their manifests, nothing partial is left).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="detector config files")
    parser.add_argument("--out", type=Path, required=True, help="output directory; one sub-directory per config")
    parser.add_argument(
        "--format", default="onnx,torchscript", help="comma-separated formats (default: onnx,torchscript)"
    )
    parser.add_argument("--only", help="comma-separated loss paths to export from each config (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from visdet_export.cli import UsageError, run_export_script
    from visdet_export.config import losses_from_file

    def groups() -> dict[str, dict]:
        only = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else None
        groups: dict[str, dict] = {}
        for config in args.configs:
            name = config.stem.replace(".", "_")
            if name in groups:
                raise UsageError(f"two configs share the name {name!r}; export them in separate runs")
            losses = losses_from_file(config)
            if only:
                missing = [p for p in only if p not in losses]
                if missing:
                    raise UsageError(f"{config}: no loss named {', '.join(missing)}; it has {', '.join(losses)}")
                losses = {p: losses[p] for p in only}
            groups[name] = losses
        return groups

    return run_export_script(
        "export_configs", groups, args.out, args.format, verify=args.verify, overwrite=args.overwrite, quiet=args.quiet
    )


if __name__ == "__main__":
    sys.exit(main())
