"""The ``facestream`` command line.

Subcommands are plugins: each package of the distribution registers its commands under the
``facestream.commands`` entry-point group (engines: segment, export, bench; the service and the
training extra add theirs). This keeps the import direction: nothing here imports a package's
internals, and a command whose optional dependencies are missing says which extra to install.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from typing import Protocol

from facestream import __version__


class Command(Protocol):
    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class _Unavailable:
    """Stands in for a command whose module fails to import (an extra is not installed)."""

    def __init__(self, name: str, error: Exception) -> None:
        self.name, self.error = name, error
        self.help = f"(unavailable: {error})"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("rest", nargs=argparse.REMAINDER)

    def run(self, args: argparse.Namespace) -> int:
        print(f"facestream {self.name}: cannot load this command: {self.error}", file=sys.stderr)
        return 2


def load_commands() -> list[Command]:
    commands: list[Command] = []
    for ep in sorted(entry_points(group="facestream.commands"), key=lambda e: e.name):
        try:
            commands.append(ep.load()())
        except ImportError as exc:
            commands.append(_Unavailable(ep.name, exc))
    return commands


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facestream",
        description="Real-time face video segmentation with reinforcement-learned key scheduling.",
    )
    parser.add_argument("--version", action="version", version=f"facestream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(_command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(load_commands())
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args._command.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
