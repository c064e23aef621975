"""``rsviewer`` command line: a thin surface over the engine.

Each sub-command lives in its own module in this package and exposes
``register(subparsers)`` (adds its parser, sets ``func``). Errors the user can fix are
:class:`~rsviewer.errors.RsviewerError`: printed as one ``error: ...`` line, exit 2.
Without a sub-command, ``rsviewer`` opens the GUI on the bundled model and gallery.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import RsviewerError

# sub-command modules, in help order
COMMANDS = [
    "train",
    "evaluate",
    "index",
    "search",
    "classify",
    "explain",
    "localize",
    "project",
    "models",
    "ensemble",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rsviewer",
        description="Remote-sensing image-text retrieval workbench. Without a command: open the app.",
    )
    p.add_argument("--model", default="default", help="model for the app (default: the bundled one)")
    p.add_argument("--gallery", default=None, help="dataset JSON, folder of images or index for the app")
    p.add_argument("--screenshot", metavar="PNG", help="render the main window after a demo query to PNG and exit")
    p.add_argument("--query", default=None, help="with --screenshot: the demo query")
    p.add_argument("--tab", default=None, help="with --screenshot: the tab to show (results|map|scene|explain|compare)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"rsviewer.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"rsviewer.cli.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="PIL")  # Pillow's EXIF chatter; our errors say what matters
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            from ..gui.app import run_app

            return run_app(args)
        return int(args.func(args) or 0)
    except RsviewerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
