"""The Omniglot data set (Lake, Salakhutdinov and Tenenbaum, 2015) from its authors' archives.

load_omniglot(root) reads the image archives (ARCHIVES) of the official repository
brendenlake/omniglot found in `root` or up to two folders below it, zipped or extracted, laid
out as <archive>/<alphabet>/<character>/<id>_<drawer>.png, each character a class.

Choices, and why:
- Images are 105x105 black-on-white bilevel PNGs; they are turned to 8-bit grey, then resized
  with Pillow's LANCZOS filter to size x size (28: the MAML paper's). MAML's own script called
  resize(LANCZOS) on the bilevel image, which Pillow silently does with NEAREST (it does for
  mode "1"), dropping thin strokes; grey first keeps every stroke, antialiased.
- Values are float32 in [0, 1] with 1 = ink: the PNGs' white background becomes 0, so that an
  empty pixel is a zero input.
- Order: archives by name, then alphabets, characters and files sorted by name; labels count
  the characters in that order. A zip and its extracted folder read the same.
- An archive is read once: from its zip when both the zip and its extracted folder are there
  (a zip is whole or refused, a folder may be half extracted). The small subsets are skipped
  when images_background itself is there: their characters are its own, and would otherwise
  appear twice, as two classes that a class split could put on both sides.
- The cache (root/.pymaml_omniglot_<size>.pt by default) holds the ink as uint8 (what the
  resize gives: exact, 4 times smaller than float32) and the list of archives read with their
  sizes and modification times; it is used only when that list matches the archives found now,
  and a damaged or foreign cache is read again from the archives, never trusted.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import urllib.request
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import _checks, _io
from .episodes import Episodes

__all__ = ["load_omniglot", "Omniglot", "ARCHIVES"]

ARCHIVES = ("images_background", "images_evaluation", "images_background_small1",
            "images_background_small2")
DOWNLOADS = ("images_background", "images_evaluation")
URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}.zip"
_SUBSETS_OF = {"images_background_small1": "images_background",
               "images_background_small2": "images_background"}
_CACHE_FORMAT, _CACHE_VERSION = "pymaml.omniglot", 1
_DEPTH = 2  # archives are looked for in root and up to this many folders below it


# ---- finding the archives -------------------------------------------------------------------

def _check_root(root: str) -> None:
    if not os.path.exists(root):
        raise _io.PathError(errno.ENOENT, f"data: the directory {root} does not exist")
    if not os.path.isdir(root):
        raise _io.PathError(errno.ENOTDIR, f"data: {root} is not a directory")


def _candidates(root: str) -> Dict[str, List[Tuple[str, str]]]:
    """{archive name: [(kind "zip" or "dir", path), ...]} of the official archives under root."""
    found: Dict[str, List[Tuple[str, str]]] = {}
    for here, dirs, files in os.walk(root):
        for f in files:
            if f.endswith(".zip") and f[:-4] in ARCHIVES:
                found.setdefault(f[:-4], []).append(("zip", os.path.join(here, f)))
        for d in dirs:
            if d in ARCHIVES:
                inner = os.path.join(here, d, d)  # unzipped into a folder of its own name
                path = inner if os.listdir(os.path.join(here, d)) == [d] else os.path.join(here, d)
                found.setdefault(d, []).append(("dir", path))
        deep = here != root and os.path.relpath(here, root).count(os.sep) + 1 >= _DEPTH
        # an extracted archive is not searched inside, and neither are hidden folders
        dirs[:] = [] if deep else sorted(d for d in dirs if d not in ARCHIVES and d[0] != ".")
    return found


def _archives(root: str) -> List[Tuple[str, str, str]]:
    """[(name, kind, path)] of the archives to read, sorted by name: one per name."""
    chosen = []
    found = _candidates(root)
    for name in sorted(found):
        if _SUBSETS_OF.get(name) in found:
            continue
        zips = [p for kind, p in found[name] if kind == "zip"]
        paths = zips or [p for _, p in found[name]]
        if len(paths) > 1:
            raise ValueError(f"data: {name} is under {root} more than once ({', '.join(paths)}); "
                             "keep one")
        chosen.append((name, "zip" if zips else "dir", paths[0]))
    if not chosen:
        raise ValueError(f"data: no Omniglot archive under {root}: expected one or more of "
                         f"{', '.join(n + '.zip' for n in ARCHIVES)} (zipped or extracted), "
                         "from github.com/brendenlake/omniglot (or load with download=True)")
    return chosen


def _signature(root: str, archives) -> list:
    """What the cache must have been built from: each archive's name, kind, path under root,
    and size and modification time (for a folder: its PNGs' count, total size, latest)."""
    out = []
    for name, kind, path in archives:
        if kind == "zip":
            st = os.stat(path)
            stamp = [1, st.st_size, st.st_mtime_ns]
        else:
            stamp = [0, 0, 0]
            for here, _, files in os.walk(path):
                for f in files:
                    if f.lower().endswith(".png"):
                        st = os.stat(os.path.join(here, f))
                        stamp = [stamp[0] + 1, stamp[1] + st.st_size, max(stamp[2], st.st_mtime_ns)]
        out.append([name, kind, os.path.relpath(path, root)] + stamp)
    return out


# ---- reading the images ---------------------------------------------------------------------

def _pil_image():
    try:
        from PIL import Image  # only here: `import pymaml` does not need Pillow
    except ImportError:
        raise ImportError("reading the Omniglot images needs Pillow: pip install pillow") from None
    return Image


def _zip_members(path: str):
    """[((alphabet, character, file), where, bytes)] of a zip's PNGs, at any depth in it."""
    items = []
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                parts = member.split("/")
                if member.lower().endswith(".png") and len(parts) >= 3 and \
                        not any(p.startswith((".", "__MACOSX")) for p in parts):
                    where = f"{path}:{member}"
                    try:
                        items.append((tuple(parts[-3:]), where, archive.read(member)))
                    except Exception as exc:  # a bad CRC, a broken deflate stream, ...
                        raise ValueError(f"{where}: cannot read it from the archive "
                                         f"({_io.first_line(exc)})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable zip archive ({_io.first_line(exc)})") from None
    return items


def _dir_members(path: str):
    """[((alphabet, character, file), where, bytes)] of an extracted archive's PNGs."""
    items = []
    for here, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        parts = os.path.relpath(here, path).split(os.sep)
        for f in files:
            if f.lower().endswith(".png") and len(parts) == 2 and not f.startswith("."):
                where = os.path.join(here, f)
                try:
                    with open(where, "rb") as file:
                        items.append(((parts[0], parts[1], f), where, file.read()))
                except OSError as exc:
                    raise ValueError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    return items


def _members(path: str, kind: str):
    """An archive's PNGs, sorted by (alphabet, character, file): zip and folder alike."""
    items = _zip_members(path) if kind == "zip" else _dir_members(path)
    if not items:
        raise ValueError(f"{path} holds no images laid out as <alphabet>/<character>/<id>.png")
    return sorted(items, key=lambda item: item[0])


def _ink(Image, where: str, data: bytes, size: int) -> bytes:
    """The size x size ink of one PNG (255 - grey: 255 = a stroke), as size * size bytes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            grey = image.convert("L").resize((size, size), Image.LANCZOS)
    except Exception as exc:  # Pillow and zlib raise many kinds for a broken file
        # Pillow's words for a file it cannot identify name an in-memory buffer, not the file
        why = ("not an image file Pillow knows" if isinstance(exc, Image.UnidentifiedImageError)
               else _io.first_line(exc))
        raise ValueError(f"{where}: cannot read the PNG image ({why})") from None
    return grey.point(lambda v: 255 - v).tobytes()


def _read(archives, size: int):
    """(ink [N, size, size] uint8, labels [N] int64, class names) of `archives`, in order."""
    Image = _pil_image()
    chunks, labels, names = [], [], []
    for name, kind, path in archives:
        for (alphabet, character, _), where, data in _members(path, kind):
            cls = f"{name}/{alphabet}/{character}"
            if not names or names[-1] != cls:
                names.append(cls)
            labels.append(len(names) - 1)
            chunks.append(_ink(Image, where, data, size))
    ink = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return ink.reshape(-1, size, size), torch.tensor(labels, dtype=torch.int64), names


# ---- the cache --------------------------------------------------------------------------------

def _cache_path(root: str, size: int, cache):
    if cache is False or cache is None:
        return None
    name = f".pymaml_omniglot_{size}.pt"
    if cache is True:
        return os.path.join(root, name)
    path = _io.fspath(cache, "cache")
    return os.path.join(path, name) if os.path.isdir(path) else path


def _load_cache(path: str, size: int, signature: list):
    """(ink, labels, names) from the cache file when it is whole and was built from
    `signature` at this size; None otherwise (missing, damaged, stale or foreign)."""
    if not os.path.isfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:  # torch.load checks no CRC: a flipped bit would pass
            if archive.testzip() is not None:
                return None
        got = torch.load(path, map_location="cpu", weights_only=True)
        ink, labels, names = got["ink"], got["labels"], got["class_names"]
        fine = (got["format"] == _CACHE_FORMAT and got["version"] == _CACHE_VERSION
                and got["sources"] == signature and ink.dtype == torch.uint8
                and ink.dim() == 3 and tuple(ink.shape[1:]) == (size, size)
                and labels.dtype == torch.int64 and labels.shape == (ink.shape[0],)
                and isinstance(names, list) and all(isinstance(n, str) for n in names)
                and int(labels.min()) >= 0 and int(labels.max()) == len(names) - 1)
    except Exception:  # whatever a damaged or foreign file makes the readers raise: rebuild
        return None
    return (ink, labels, names) if fine else None


def _save_cache(path: str, size: int, signature: list, ink, labels, names) -> None:
    record = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "size": size,
              "sources": signature, "ink": ink, "labels": labels, "class_names": names}
    try:
        _io.atomic_save(record, path)  # a temporary file renamed over it: never half written
    except OSError as exc:  # e.g. a read-only data folder: the data is read, only not kept
        warnings.warn(f"could not write the Omniglot cache {path} ({exc}); the archives will "
                      "be read again next time (cache= another path, or False)", stacklevel=3)


# ---- downloading --------------------------------------------------------------------------------

def _download(root: str) -> None:
    """Fetches the archives of DOWNLOADS not already under root (zipped or extracted) from the
    authors' repository, each to a temporary file renamed once whole and checked to be a zip."""
    os.makedirs(root, exist_ok=True)
    have = _candidates(root)
    for name in DOWNLOADS:
        if name in have:
            continue
        url, path = URL.format(name), os.path.join(root, name + ".zip")
        tmp = f"{path}.part-{os.getpid()}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
            if not zipfile.is_zipfile(tmp):
                raise ValueError("what came back is not a zip archive")
            os.replace(tmp, path)
        except Exception as exc:  # URLError, timeouts, HTTP errors, a full disk, ...
            reason = getattr(exc, "reason", None) or _io.first_line(exc)
            raise RuntimeError(f"could not download {name}.zip from {url}: {reason}; download "
                               f"the archives by hand and put them under {root}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def load_omniglot(root, *, size: int = 28, download: bool = False, cache=True):
    """(x [N, size, size] float32 in [0, 1], 1 = ink; labels [N] int64, one per character;
    class_names [C], e.g. "images_background/Greek/character01") of the Omniglot archives
    under the directory `root` (the module's docstring says which, and how they are read).

    download: first fetch images_background.zip and images_evaluation.zip into root unless
    they are there. cache: True (root/.pymaml_omniglot_<size>.pt), False, or a file or folder
    path to keep the decoded images in, for fast later loads."""
    root = _io.fspath(root, "root")
    size = _checks.check_int("size", size, 1)
    if not isinstance(download, bool):
        raise TypeError(f"download must be True or False, got {download!r}")
    if download:
        _download(root)
    _check_root(root)
    archives = _archives(root)
    path = _cache_path(root, size, cache)
    signature = _signature(root, archives)
    got = _load_cache(path, size, signature) if path else None
    if got is None:
        got = _read(archives, size)
        if path:
            _save_cache(path, size, signature, *got)
    ink, labels, names = got
    return ink.to(torch.float32).div_(255), labels, names


class Omniglot(Episodes):
    """The task family "omniglot" (pymaml.train("omniglot", data=DIR, ways=5, shots=1)):
    N-way K-shot episodes of every character under `data` (load_omniglot), each character
    also turned by 90, 180 and 270 degrees as three more classes (the MAML paper's
    augmentation; rotations=False leaves it out), images flattened to 28 * 28 = 784 inputs.
    queries: query examples per class (None: as many as shots, as the MAML paper's code
    draws them). Meta-test on characters never trained on: a directory holding other
    alphabets (images_evaluation), or Episodes over one side of split_classes."""

    def __init__(self, data=None, *, ways: int = 5, shots: int = 1,
                 queries: Optional[int] = None, rotations: bool = True, download: bool = False):
        if data is None:
            raise ValueError("task 'omniglot' needs data=DIR: the directory holding the "
                             "Omniglot archives (images_background.zip, ...; "
                             "download=True fetches the official ones)")
        x, labels, self.class_names = load_omniglot(data, download=download)
        super().__init__(x, labels, ways=ways, shots=shots, queries=queries,
                         rotations=rotations, name="omniglot")
        self.data = os.fspath(data)

    def run_defaults(self) -> Dict[str, Any]:
        """pymaml.train's defaults for this family: the MAML paper's non-convolutional
        Omniglot MLP (256-128-64-64, ReLU; without its batch normalisation) and settings
        (Finn et al. 2017, its classification experiments and appendix: 5-way: one inner step
        of 0.4, meta-batch 32; 20-way: five steps of 0.1, meta-batch 16; Adam at 0.001;
        60,000 iterations)."""
        wide = self.ways >= 20
        return dict(sizes=(self.n_in, 256, 128, 64, 64, self.ways), loss="cross_entropy",
                    inner_steps=5 if wide else 1, inner_lr=0.1 if wide else 0.4,
                    meta_batch_size=16 if wide else 32, optimizer="adam", outer_lr=1e-3,
                    iterations=60_000)
