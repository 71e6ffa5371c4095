"""Build a random-weight preset checkpoint into a directory.

    python -m deployments.engine.presets build small --variant thinking --out checkpoints/small-thinking
    python -m deployments.engine.presets list
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from deployments.engine.presets import PRESETS, build_preset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.engine.presets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the built-in presets")
    build = commands.add_parser("build", help="build one preset with save_pretrained")
    build.add_argument("name", choices=sorted(PRESETS))
    build.add_argument("--variant", choices=["instruct", "thinking"], default="instruct")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, spec in PRESETS.items():
            print(f"{name:10} {spec.description}")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_preset(args.name, args.variant, args.out)
    print(f"Built preset {args.name!r} ({args.variant}) in {args.out}. It has random weights: it writes random text.")


if __name__ == "__main__":
    main()
