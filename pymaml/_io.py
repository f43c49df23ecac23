"""Files pymaml writes: saved models and training checkpoints, torch.save'd dicts of plain
tensors and values (loadable with torch.load(weights_only=True)), written atomically and sealed
with a SHA-256 digest in the zip archive's comment; what this promises (damaged files refused,
no litter of temporary files, errors in words) is docs/training.md's "Files and failures"."""

from __future__ import annotations

import errno
import hashlib
import numbers
import os
import re
import socket
import struct
import uuid
import zipfile
from typing import Any, Dict

import torch

from ._checks import check_device

MODEL_FORMAT = "pymaml.MetaMLP"
CHECKPOINT_FORMAT = "pymaml.checkpoint"
# DAML's model (both networks: pymaml.daml_model) and earlier versions' DAML checkpoints
DAML_MODEL_FORMAT = "pymaml.DAMLModel"
DAML_CHECKPOINT_FORMAT = "pymaml.daml-checkpoint"
FORMATS = (MODEL_FORMAT, CHECKPOINT_FORMAT, DAML_MODEL_FORMAT, DAML_CHECKPOINT_FORMAT)

# The zip comment that seals a file: this prefix, then the hex SHA-256 of every byte before
# the comment (the end-of-archive record included, with its comment length set).
_DIGEST_PREFIX = b"pymaml-sha256:"
_COMMENT_LEN = len(_DIGEST_PREFIX) + 64
_EOCD = b"PK\x05\x06"  # the end-of-central-directory record: 22 bytes, then the comment
_EOCD_LEN = 22
_CHUNK = 1 << 20


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


# ---- temporary files --------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_name(path: str) -> str:
    return f"{path}.pymaml-tmp.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a number we cannot ask about): keep its file
    return True


def remove_stale_temp_files(path) -> None:
    """Removes the temporary files that saves of `path` by processes of this host, now gone,
    left behind (also the previous version's PATH.PID.HEX.tmp names); quietly, as one may
    vanish meanwhile."""
    directory, base = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = re.compile(re.escape(base) + r"\.(?:pymaml-tmp\.(?P<host>[A-Za-z0-9_-]+)\."
                         r"(?P<pid>\d+)|(?P<oldpid>\d+))\.[0-9a-f]{8}\.tmp$")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m is None or (m["host"] is not None and m["host"] != _HOST):
            continue
        pid = int(m["pid"] or m["oldpid"])
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


# ---- writing ------------------------------------------------------------------------------------

class PathError(OSError, ValueError):
    """A path pymaml cannot write or read, said in words (an OSError with the errno, and a
    ValueError as pymaml's other bad-argument errors)."""

    def __str__(self):
        return self.strerror or super().__str__()  # the words, without "[Errno N]"


# What an OSError of each errno says of the directory DIR a file is written in.
_IO_WORDS = {
    errno.ENOSPC: "no space left on {}",
    errno.EDQUOT: "disk quota exceeded on {}",
    errno.EROFS: "{} is on a read-only filesystem",
    errno.EACCES: "permission denied: the directory {} is not writable",
    errno.EPERM: "permission denied: the directory {} is not writable",
    errno.ENOTDIR: "a part of {} is a file, not a directory",
}


def io_error(exc: OSError, path: str, doing: str) -> OSError:
    """`exc` in words that name the file (and, for a full disk, the directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    words = _IO_WORDS.get(exc.errno)
    if exc.errno == errno.ENOENT:  # a missing directory, or one that takes no new files (/proc)
        words = ("the directory {} does not take new files" if os.path.isdir(directory)
                 else "the directory {} does not exist")
    if words is None:
        return PathError(exc.errno, f"cannot write {path}: {exc.strerror or exc}")
    return PathError(exc.errno, f"{words.format(directory)} ({doing} {path})")


def fspath(path, what: str = "path") -> str:
    """`path` as a str; TypeError naming `what` for anything that is not a file path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a file path (a str or os.PathLike), got "
                        f"{type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise TypeError(f"{what} must be a non-empty file path, got {path!r}")
    return path


def _file_to_write(path, what: str, prefix: str) -> str:
    """`path` as a str naming a file (not a directory, nor a name ending in a separator,
    which only a directory can have); PathError(EISDIR) otherwise."""
    path = fspath(path, what)
    if os.path.isdir(path):
        raise PathError(errno.EISDIR, f"{prefix}{path} is a directory; give a file path")
    if path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise PathError(errno.EISDIR, f"{prefix}{path} ends with {path[-1]!r}, so it names a "
                                      "directory; give a file path")
    return path


def check_writable(path, what: str = "output") -> str:
    """Before any work: `path` can be written (by atomic_save) now. Creates and removes a
    temporary file beside it (which finds read-only filesystems, permissions, a missing
    directory); raises PathError in words naming `what` and the path.
    Also removes the stale temporary files of earlier saves of `path`."""
    path = _file_to_write(path, what, f"{what} ")
    tmp = _temp_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(tmp)
    except OSError as exc:
        raise io_error(exc, path, f"checking that {what} can be written:") from None
    remove_stale_temp_files(path)
    return path


def check_space(path, needed: int, what: str = "output") -> None:
    """Before any work: the filesystem of `path` has `needed` bytes free (an estimate of the
    file); OSError "no space left on DIR" otherwise. Filesystems that report no size pass."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
        return
    if st.f_blocks == 0:
        return
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise PathError(errno.ENOSPC, f"no space left on {directory}: the {what} {path} will "
                                    f"need about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free")


class _SealingWriter:
    """What torch.save writes to. Each write goes to the file whole and unbuffered, so a full
    disk raises OSError(ENOSPC) at the write that meets it (through a buffered file torch
    sees a short write and reports an "enforce fail" instead); and is hashed on the way, all
    but the last two bytes (the archive's comment length, which `seal` sets), so sealing
    reads nothing back."""

    def __init__(self, fd: int):
        self.fd = fd
        self.digest = hashlib.sha256()
        self.held = b""  # the last two bytes written so far, not hashed yet

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        _write_all(self.fd, view)
        if n >= 2:
            self.digest.update(self.held)
            self.digest.update(view[:-2])
            self.held = bytes(view[-2:])
        else:
            joined = self.held + bytes(view)
            self.digest.update(joined[:-2])
            self.held = joined[-2:]
        return n

    def flush(self) -> None:
        pass

    def seal(self) -> None:
        """Appends the digest comment to the archive torch.save has just written: the comment
        length over the archive's last two bytes (held: zero), then the comment."""
        end = os.lseek(self.fd, 0, os.SEEK_END)
        eocd = os.pread(self.fd, _EOCD_LEN, end - _EOCD_LEN)
        if eocd[:4] != _EOCD or self.held != b"\0\0":  # torch.save always ends so: never here
            raise RuntimeError("torch.save wrote an archive pymaml cannot seal")
        length = struct.pack("<H", _COMMENT_LEN)
        self.digest.update(length)
        os.lseek(self.fd, end - 2, os.SEEK_SET)
        _write_all(self.fd, length + _DIGEST_PREFIX + self.digest.hexdigest().encode())


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_save(obj: Dict[str, Any], path) -> None:
    """torch.save to a temporary file beside `path`, sealed with its digest, flushed to disk,
    then renamed over `path`. On any failure the temporary file is removed and `path` is left
    as it was; OSErrors are raised in words (see io_error)."""
    path = _file_to_write(path, "path", "")
    remove_stale_temp_files(path)
    tmp = _temp_name(path)
    try:
        # os.open with mode 0o666 leaves the permissions to the umask, as a plain open() would.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise io_error(exc, path, "writing") from None
    try:
        try:
            writer = _SealingWriter(fd)
            torch.save(obj, writer)
            writer.seal()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise io_error(exc, path, "writing") from None
        raise


# ---- reading ------------------------------------------------------------------------------------

class DamagedFile(ValueError):
    """A pymaml file whose bytes changed after it was written (its digest or a CRC fails)."""


def _digest_of(f, length: int) -> bytes:
    """The hex SHA-256 of the first `length` bytes of binary file `f`."""
    f.seek(0)
    digest = hashlib.sha256()
    while length > 0:
        block = f.read(min(_CHUNK, length))
        if not block:
            break
        digest.update(block)
        length -= len(block)
    return digest.hexdigest().encode()


def _verify_seal(path: str) -> bool:
    """Whether the file is sealed, after checking that its seal holds (else DamagedFile).
    False for an archive that ends as torch.save ends one (no comment: an earlier pymaml's
    file, or a foreign one), which the CRCs then check; ValueError for a file that is no
    archive. The archive's end record is found as zip readers find it, the last signature
    within the maximal comment's reach of the end."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (_EOCD_LEN + 0xFFFF + _COMMENT_LEN)))
        tail = f.read()
        at = tail.rfind(_EOCD)
        if at < 0 or at + _EOCD_LEN > len(tail):
            if re.search(rb"sha256:[0-9a-f]{64}$", tail[-_COMMENT_LEN:]):
                raise DamagedFile(f"{path} is damaged: its archive's end record is broken")
            raise ValueError(f"{path} is not a pymaml file, or is cut short (it does not end "
                             "as the zip archives pymaml writes do)")
        comment_len = struct.unpack("<H", tail[at + _EOCD_LEN - 2:at + _EOCD_LEN])[0]
        comment = tail[at + _EOCD_LEN:]
        if comment_len == 0 and not comment:
            return False
        if comment_len != _COMMENT_LEN or len(comment) != _COMMENT_LEN \
                or not comment.startswith(_DIGEST_PREFIX):
            raise DamagedFile(f"{path} is damaged, or was not written by pymaml: its archive "
                              "ends with bytes other than pymaml's digest record")
        if _digest_of(f, size - _COMMENT_LEN) != comment[len(_DIGEST_PREFIX):]:
            raise DamagedFile(f"{path} is damaged: its contents do not match the SHA-256 digest "
                              "pymaml wrote into it (changed or corrupted since)")
    return True


def _verify_crcs(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError,
            struct.error, RuntimeError) as exc:
        raise DamagedFile(f"{path} is damaged: its archive structure is broken "
                          f"({first_line(exc)})") from None
    if bad is not None:
        raise DamagedFile(f"{path} is damaged: the archive member {bad} fails its CRC check")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's may run to many), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_file(path) -> Dict[str, Any]:
    """A file written by pymaml, verified (digest or CRCs) and read with weights_only=True.
    Raises TypeError for what is no path, FileNotFoundError / IsADirectoryError /
    PermissionError / ValueError for paths that name no readable regular file, DamagedFile (a
    ValueError) for a damaged one and ValueError for anything that is not a pymaml model or
    checkpoint."""
    path = fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a pymaml model or checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file (a pymaml model or checkpoint is one)")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: permission denied (the file is not readable)")
    if not _verify_seal(path):  # written before the digest existed: the archive's own CRCs
        _verify_crcs(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign file can make the unpickler raise almost anything
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            # weights_only refused a Python object: never load it (torch's own message
            # suggests weights_only=False, which would run the file's code).
            raise ValueError(f"{path} is not a pymaml file: it holds Python objects other "
                             "than tensors and plain values, which pymaml files never do; it "
                             "was not loaded") from None
        raise ValueError(f"{path} could not be read as a pymaml file (damaged, or not written "
                         f"by pymaml: {first_line(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") not in FORMATS:
        raise ValueError(f"{path} is not a pymaml model or checkpoint (no pymaml format tag)")
    return obj


# ---- the model in a file, whatever its format ------------------------------------------------

# format tag -> fn(path, record, device) -> model. Each format's reader is registered by the
# module that owns the format (model.py, daml_model.py, checkpoint.py), so that reading a file
# needs no module to know the ones above it.
_READERS: Dict[str, Any] = {}


def register_reader(fmt: str, reader) -> None:
    _READERS[fmt] = reader


def load_model(path, *, device=None, want=None):
    """pymaml.load: the model in a pymaml file (a saved model, or the model of a training
    checkpoint, checked whole first), of `want`'s class when given (else a ValueError saying
    what the file holds)."""
    device = None if device is None else check_device("device", device)
    model = model_of(path, load_file(path), device)
    if want is not None and not isinstance(model, want):
        raise ValueError(f"{path} holds a {model.kind}, not a {want.__name__}: load it with "
                         f"pymaml.load or pymaml.{type(model).__name__}.load")
    return model


def model_of(path, record: Dict[str, Any], device=None):
    """The model in `record`, a pymaml file's contents read from `path` (load_file), through
    its format's registered reader."""
    return _READERS[record["format"]](path, record, device)
