"""Checked command-line flags: the parser of the ``softflow`` command and the types of its flags.

Each type checks its value where it enters (argparse calls it while parsing) and raises
``argparse.ArgumentTypeError`` with the valid range; :class:`OneLineParser` turns that, and every other argparse
error, into one ``ConfigError`` line (``softflow: error: --port: must be in [0, 65535] (got '70000')``, exit 2).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from softflow.deploy.config import SEED_MAX, ConfigError, valid_range


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise ConfigError with one line naming the flag, instead of printing the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(re.sub(r"^argument ([^:]+): ", r"\1: ", message))


def _checked(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    parse.__name__ = name
    parse.checked = True  # type: ignore[attr-defined]
    return parse


def integer(**bounds: int) -> Callable[[str], int]:
    """An integer within ``ge``/``gt``/``le``/``lt`` bounds."""
    interval = valid_range(bounds, integer=True)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not _within(value, bounds):
            raise argparse.ArgumentTypeError(f"must be an integer {interval} (got {text!r})".replace("  ", " "))
        return value

    return _checked(parse, "integer")


def number(**bounds: float) -> Callable[[str], float]:
    """A finite number within ``ge``/``gt``/``le``/``lt`` bounds."""
    interval = valid_range(bounds)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not _within(value, bounds):
            raise argparse.ArgumentTypeError(f"must be a finite number {interval} (got {text!r})".replace("  ", " "))
        return value

    return _checked(parse, "number")


def _within(value: float, bounds: dict[str, float]) -> bool:
    return (value > bounds.get("gt", -math.inf) and value >= bounds.get("ge", -math.inf)
            and value < bounds.get("lt", math.inf) and value <= bounds.get("le", math.inf))


def integer_list(**bounds: int) -> Callable[[str], str]:
    """Comma-separated integers within bounds, e.g. ``256,1024``; the text is passed on as given."""
    item = integer(**bounds)

    def parse(text: str) -> str:
        try:
            for part in text.split(","):
                item(part.strip())
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers {valid_range(bounds, True)}, "
                                             f"e.g. 1,8,64 (got {text!r})") from None
        return text

    return _checked(parse, "integer list")


def choice_list(choices: Iterable[str]) -> Callable[[str], str]:
    """Comma-separated names out of ``choices``; the text is passed on as given."""
    choices = list(choices)

    def parse(text: str) -> str:
        if not text or any(part.strip() not in choices for part in text.split(",")):
            raise argparse.ArgumentTypeError(f"must be comma-separated names out of {', '.join(choices)} "
                                             f"(got {text!r})")
        return text

    return _checked(parse, "name list")


def existing_file(text: str) -> str:
    """A path to a readable file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"must be an existing file (got {text!r}: "
                                         f"{'a directory' if path.is_dir() else 'no such file'})")
    return text


def new_file(text: str) -> str:
    """A file path to write: its directory exists and the path is not a directory."""
    path = Path(text)
    if not text or path.is_dir() or not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"must be a file path in an existing directory (got {text!r})")
    return text


def directory(text: str) -> str:
    """A directory to create or use: not an existing file."""
    if not text or (Path(text).exists() and not Path(text).is_dir()):
        raise argparse.ArgumentTypeError(f"must be a directory, not a file (got {text!r})")
    return text


def existing_directory(text: str) -> str:
    """A path to an existing directory."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"must be an existing directory (got {text!r}: "
                                         f"{'a file' if Path(text).is_file() else 'no such directory'})")
    return text


def address(text: str) -> str:
    """host:port with a port in [1, 65535]."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be host:port with a port in [1, 65535] (got {text!r})")
    return text


def env_id(text: str) -> str:
    """A registered gymnasium id (LQR is configured in experiment files, not here)."""
    from softflow.actors.envs import check_env_id

    try:
        check_env_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("env.id: ")) from None
    return text


for _parse in (existing_file, existing_directory, new_file, directory, address, env_id):
    _checked(_parse, _parse.__name__.replace("_", " "))

port = integer(ge=0, le=65535)
seed = integer(ge=0, le=SEED_MAX)
count = integer(ge=1)
seconds = number(gt=0)


def constrain(parser: argparse.ArgumentParser, types: dict[str, Callable[[str], Any]]) -> None:
    """Gives the flags named in ``types`` (by dest) those checked types; ValueError if one is missing."""
    actions = {action.dest: action for action in parser._actions}
    for dest, kind in types.items():
        if dest not in actions:
            raise ValueError(f"{parser.prog} has no flag {dest}")
        actions[dest].type = kind
