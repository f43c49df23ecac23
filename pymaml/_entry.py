"""What the command line (`python -m pymaml`, the `pymaml` script) does around its commands:
Ctrl-C while torch and pymaml load (seconds, before pymaml.cli.main can catch anything), or
while the process exits, ends it with one line ("pymaml: interrupted") and exit status 130
(killed by SIGINT), not a traceback. Imported first by pymaml/__init__.py, before torch,
where it sets this up for the command line alone: a program that imports pymaml as a library
is left as it is."""

from __future__ import annotations

import os
import sys


def is_command_line() -> bool:
    """Whether this process is pymaml's command line: `python [options] -m pymaml...` (also
    under torchrun), or the `pymaml` console script."""
    argv = getattr(sys, "orig_argv", None) or []
    for i, arg in enumerate(argv):
        module = argv[i + 1] if arg == "-m" and i + 1 < len(argv) else \
            arg[2:] if arg.startswith("-m") and len(arg) > 2 else None
        if module is not None:
            return module == "pymaml" or module.startswith("pymaml.")
    return bool(sys.argv) and os.path.basename(sys.argv[0]) in ("pymaml", "pymaml.exe")


def _said(exc_type) -> bool:
    """One line for an interruption; False for any other exception (Python's own report)."""
    if exc_type is None or not issubclass(exc_type, KeyboardInterrupt):
        return False
    try:
        sys.stderr.write("pymaml: interrupted\n")
        sys.stderr.flush()
    except Exception:  # stderr already closed at exit: nothing to say it on
        pass
    return True


def quiet_interrupts() -> None:
    """A Ctrl-C that nothing catches (while importing; after the command returned: in atexit
    callbacks, joining threads) says one line instead of its traceback. Python still exits
    as killed by SIGINT."""
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def on_uncaught(exc_type, exc, tb):
        if not _said(exc_type):
            excepthook(exc_type, exc, tb)

    def on_unraisable(unraisable):
        if not _said(unraisable.exc_type):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = on_uncaught, on_unraisable


if is_command_line():
    quiet_interrupts()
