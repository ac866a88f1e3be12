"""Entry point of the ``pwlu`` console script, ``python -m pwlu`` and ``python -m pwlu.app``.

It imports only the standard library: before importing the application it checks that the
packages of the ``app`` extra the command line imports at start-up are installed, and turns a
missing one (also one that a subcommand imports later, such as matplotlib for ``pwlu plot``)
into one line on stderr naming the ``pip install`` to run, and exit status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

#: The pip command that installs the application's extra packages.
INSTALL = "pip install 'pwlu[app]'"

#: Modules the command line imports at start-up (checked before importing it).
REQUIRED = ("numpy",)

#: Every module of the ``app`` extra; some are imported only by the subcommands that need them.
APP_MODULES = ("numpy", "tqdm", "torchvision", "matplotlib")


class MissingExtraError(ImportError):
    """A package of the ``app`` extra is not installed; the message names the pip command."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(
            f"the command-line app needs extra packages (missing: {', '.join(self.missing)}); "
            f"install them with: {INSTALL}",
            name=self.missing[0] if self.missing else None,
        )


def missing_modules(names: Sequence[str] = REQUIRED) -> list[str]:
    """The top-level modules among ``names`` that cannot be imported (found without importing them)."""
    missing = []
    for name in names:
        try:
            found = sys.modules.get(name, ...) is not None and importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require(name: str):
    """``importlib.import_module(name)``, raising :class:`MissingExtraError` when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingExtraError([name.split(".")[0]]) from None


def run(entry: str | Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Check the extra, then call ``entry(argv)`` (a callable or ``"module:function"``).

    Returns the entry's exit status, or 2 after printing one line when a package of the
    ``app`` extra is missing.
    """
    missing = missing_modules()
    if missing:
        print(f"pwlu: {MissingExtraError(missing)}", file=sys.stderr)
        return 2
    try:
        if isinstance(entry, str):
            module, _, function = entry.partition(":")
            entry = getattr(importlib.import_module(module), function)
        return entry(argv)
    except MissingExtraError as e:
        print(f"pwlu: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in APP_MODULES:
            raise
        print(f"pwlu: {MissingExtraError([top])}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """The ``pwlu`` console script."""
    return run("pwlu.app.cli:main", argv)
