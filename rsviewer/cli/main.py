"""``rsviewer`` command line: a thin surface over the engine.

Each sub-command lives in its own module in this package and exposes
``register(subparsers)`` (adds its parser, sets ``func``). The error contract: errors
the user can fix — :class:`~rsviewer.errors.RsviewerError`, an ``OSError`` (permission,
missing folder, full disk; the message names the path) and bad arguments (argparse) —
print one ``error: ...`` line and exit 2; anything else is a bug and keeps its
traceback, followed by one line asking to report it (exit 1).
Without a sub-command, ``rsviewer`` opens the GUI on the bundled model and gallery.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
import traceback
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
    "import_",
    "ensemble",
]


class Parser(argparse.ArgumentParser):
    """argparse with rsviewer's error line: usage, then ``error: ...`` (exit 2)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="rsviewer",
        description="Remote-sensing image-text retrieval workbench. Without a command: open the app.",
    )
    p.add_argument("--model", default="default", help="model for the app (default: the bundled one)")
    p.add_argument("--gallery", default=None, help="dataset JSON, folder of images or index for the app")
    p.add_argument("--screenshot", metavar="PNG", help="render the main window after a demo query to PNG and exit")
    p.add_argument("--query", default=None, help="with --screenshot: the demo query")
    p.add_argument("--force", action="store_true", help="with --screenshot: replace an existing PNG")
    p.add_argument("--tab", default=None, help="with --screenshot: the tab to show (results|map|scene|explain|compare|evaluate)")
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
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # permissions, a missing folder, a full disk: the user's to fix
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except Exception:  # a bug: keep the traceback, and say so
        traceback.print_exc()
        print(f"rsviewer {_version()} hit a bug (not a problem with your input); please report it with the "
              "command line and the traceback above", file=sys.stderr)
        return 1


def one_line(msg: str) -> str:
    return " ".join(msg.split()) or "unknown problem"


def os_error_line(e: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` → ``cannot write x: No space left on device``."""
    why = e.strerror or one_line(str(e))
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    if not paths:
        return one_line(why)
    verb = "cannot write" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "cannot access"
    return one_line(f"{verb} {' → '.join(map(str, paths))}: {why}")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("rsviewer")
    except Exception:  # noqa: BLE001 — only decoration for the bug line
        return ""


if __name__ == "__main__":
    sys.exit(main())
