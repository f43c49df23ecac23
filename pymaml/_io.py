"""Files pymaml writes: saved models and training checkpoints. Both are torch.save'd dicts of
plain tensors and plain values (numbers, strings, lists, dicts), loadable with
torch.load(weights_only=True); both are written atomically, so a crash or Ctrl-C during a
save leaves the previous file whole."""

from __future__ import annotations

import numbers
import os
import uuid
from typing import Any, Dict

import torch

MODEL_FORMAT = "pymaml.MetaMLP"
CHECKPOINT_FORMAT = "pymaml.checkpoint"


def plain(name: str, value):
    """`value` as the plain Python types torch.load(weights_only=True) reads back (int, float,
    bool, str, None, and lists / dicts of them): numpy scalars and other numbers are
    converted; anything else is a TypeError naming `name`."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        items = [plain(name, v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {plain(name, k): plain(name, v) for k, v in value.items()}
    raise TypeError(f"{name} may hold only numbers, strings, bools, None and lists/dicts of "
                    f"them (it is saved with the model), got {type(value).__name__}")


def atomic_save(obj: Dict[str, Any], path) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over it."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        # os.open with mode 0o666 leaves the permissions to the umask, as a plain open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OSError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_file(path, map_location="cpu") -> Dict[str, Any]:
    """A file written by pymaml, read with weights_only=True. Raises FileNotFoundError for a
    missing file and ValueError for anything that is not a pymaml model or checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a foreign file can make the unpickler raise almost anything
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable pymaml file ({first_line})") from None
    if not isinstance(obj, dict) or obj.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"{path} is not a pymaml model or checkpoint (no pymaml format tag)")
    return obj
