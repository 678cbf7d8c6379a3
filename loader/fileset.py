"""Which files a command names: paths, quoted globs and directories, in a stable order.

Each argument in the order given; the files a glob or a directory yields, sorted by path.
A directory stands for every file under it, at any depth. Found through a glob or a
directory, hidden files and directories (a name starting with ".") are left out, and so are
the loader's own rejects files, which sit next to their sources. A file named twice is
loaded once, at its first place.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UsageError
from .rejects import REJECTS_SUFFIX

_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class FileSet:
    arguments: tuple[str, ...]  # as given
    sources: tuple[str, ...]  # the files, in load order
    empty: tuple[str, ...]  # the globs and directories that matched no file
    several: bool  # more than one argument, or a glob or directory: each source is reported


def expand(arguments: Sequence[str]) -> FileSet:
    if "-" in arguments and len(arguments) > 1:
        raise UsageError("- (standard input) must be the only source")
    sources: list[str] = []
    seen: set[str] = set()
    empty: list[str] = []
    expanded = False  # a glob or a directory among the arguments
    for argument in arguments:
        if _is_pattern(argument):
            found, expanded = _matching(argument), True
        elif os.path.isdir(argument):
            found, expanded = _under(argument), True
        else:
            found = [argument]  # a path, even a missing one: reported by name when it is loaded
        if not found:
            empty.append(argument)
        for path in found:
            key = os.path.normpath(path)
            if key not in seen:
                seen.add(key)
                sources.append(path)
    return FileSet(tuple(arguments), tuple(sources), tuple(empty), several=len(arguments) > 1 or expanded)


def _is_pattern(argument: str) -> bool:
    return any(c in _GLOB_CHARACTERS for c in argument) and not os.path.exists(argument)


def _matching(pattern: str) -> list[str]:
    return sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path) and _wanted(path))


def _under(directory: str) -> list[str]:
    found: list[str] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, name) for name in files)
    return sorted(path for path in found if os.path.isfile(path) and _wanted(path))


def _wanted(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and not name.endswith(REJECTS_SUFFIX)
