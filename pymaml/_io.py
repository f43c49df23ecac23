"""Files pymaml writes: saved models and training checkpoints. Both are torch.save'd dicts of
plain tensors and plain values (numbers, strings, lists, dicts), loadable with
torch.load(weights_only=True); both are written atomically, so a crash or Ctrl-C during a
save leaves the previous file whole."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict

import torch

MODEL_FORMAT = "pymaml.MetaMLP"
CHECKPOINT_FORMAT = "pymaml.checkpoint"


def atomic_save(obj: Dict[str, Any], path) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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
