"""Which files a command writes, compared as files: two paths name the same file however they
are spelled (`run.pt`, `./run.pt`, an absolute path, a symbolic or hard link), and one kind of
pymaml file (a model, a training checkpoint) never replaces another kind, nor does a figure
replace either, unless the caller asked for it (overwrite=True, --overwrite)."""

from __future__ import annotations

import os
from typing import Dict, Optional

from . import _io

# What each format tag is, in the words of the messages.
KINDS = {_io.MODEL_FORMAT: "model", _io.DAML_MODEL_FORMAT: "model",
         _io.CHECKPOINT_FORMAT: "training checkpoint",
         _io.DAML_CHECKPOINT_FORMAT: "training checkpoint"}


def same_file(a, b) -> bool:
    """Whether paths `a` and `b` name the same file: the same existing file (os.path.samefile),
    or, where one does not exist yet, the same path once resolved (os.path.realpath)."""
    a, b = os.fspath(a), os.fspath(b)
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet), or cannot be looked at
        return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(named: Dict[str, Optional[str]]) -> None:
    """{what: path} of the files one command writes (None: not written) name different files;
    ValueError naming the two that do not."""
    items = [(what, path) for what, path in named.items() if path is not None]
    for i, (what, path) in enumerate(items):
        for other, other_path in items[i + 1:]:
            if same_file(path, other_path):
                same = "" if os.fspath(path) == os.fspath(other_path) else f" ({other_path})"
                raise ValueError(f"{what} {path} is also the {other}{same}: one would "
                                 "overwrite the other; choose another path")


def check_replaceable(path, kind: str, what: str, overwrite: bool = False,
                      ask: Optional[str] = "overwrite=True") -> None:
    """Before writing a file of `kind` ("model", "training checkpoint", "figure") to `path`:
    a pymaml file of another kind there is not replaced unless `overwrite`, nor is any other
    file (a damaged pymaml file, the user's own) by a model or a checkpoint (a figure only
    replaces pymaml's files when asked); FileExistsError naming both (`what` is the writer:
    "MetaMLP.save", "this run's model"...) and how to ask (`ask`; None: there is no asking)."""
    if overwrite or not os.path.isfile(os.fspath(path)):
        return
    try:
        held = KINDS.get(_io.load_file(path)["format"])
    except (OSError, ValueError):  # a damaged file, or not a pymaml one
        held = None
    if held is None and kind != "figure":
        held = "file that is not a readable pymaml file"
    if held is not None and held != kind:
        how = f"pass {ask} to replace it, or choose" if ask else "choose"
        raise FileExistsError(f"{path} holds a {held}, which {what} would replace with a "
                              f"{kind}: {how} another path")
