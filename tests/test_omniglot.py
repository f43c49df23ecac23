"""load_omniglot (pymaml/tasks/omniglot.py) on tiny archives built here in the official layout,
zipped and extracted: order, labels, ink, the cache, downloads (never over the network) and
every error; plus one test on the real images_background_small1.zip, skipped without it."""

import io
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch

from pymaml.tasks import Episodes, load_omniglot, split_classes
from pymaml.tasks import omniglot

Image = pytest.importorskip("PIL.Image")

ALPHABETS = {"Greek": 3, "Latin": 2}  # alphabet: characters
DRAWERS = 4


def _png(character: int, drawer: int) -> bytes:
    """A 105x105 bilevel PNG, white with a black square whose place tells the drawer and whose
    size tells the character (so images differ, and ink is where the square is)."""
    image = Image.new("1", (105, 105), 1)
    side = 20 + 10 * character
    image.paste(0, (5 + 10 * drawer, 30, 5 + 10 * drawer + side, 30 + side))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _files(name, alphabets=ALPHABETS):
    """{relative path: PNG bytes} of an archive `name` in the official layout."""
    files, character = {}, 0
    for alphabet, count in alphabets.items():
        for c in range(1, count + 1):
            for d in range(1, DRAWERS + 1):
                files[f"{name}/{alphabet}/character{c:02d}/{c:02d}{d:02d}_{d:02d}.png"] = \
                    _png(character, d)
            character += 1
    return files


def make_zip(folder: Path, name: str, alphabets=ALPHABETS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in _files(name, alphabets).items():
            archive.writestr(member, data)
    return path


def make_dir(folder: Path, name: str, alphabets=ALPHABETS) -> Path:
    for member, data in _files(name, alphabets).items():
        (folder / member).parent.mkdir(parents=True, exist_ok=True)
        (folder / member).write_bytes(data)
    return folder / name


def test_reads_a_zip_in_order_with_ink_as_one(tmp_path):
    make_zip(tmp_path, "images_background")
    x, labels, names = load_omniglot(tmp_path, cache=False)
    assert x.shape == (5 * DRAWERS, 28, 28) and x.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.tolist() == [c for c in range(5) for _ in range(DRAWERS)]
    assert names == [f"images_background/Greek/character0{c}" for c in (1, 2, 3)] + \
        [f"images_background/Latin/character0{c}" for c in (1, 2)]
    assert 0 <= x.min() and x.max() <= 1
    # the square is ink (1), the white background 0: character 0, drawer 1 covers pixels
    # 15..34 x 30..49 of 105, about 4..9 x 8..13 of 28
    assert x[0, 10, 6] > 0.99 and x[0, 0, 0] == 0 and x[0, 27, 27] == 0
    # bigger characters have more ink: the order of the files is the order of the classes
    ink = x.sum(dim=(1, 2)).reshape(5, DRAWERS).mean(dim=1)
    assert (ink[1:3] > ink[0:2]).all() and (ink[4] > ink[3])


def test_extracted_folder_reads_as_its_zip(tmp_path):
    make_zip(tmp_path / "a", "images_evaluation")
    make_dir(tmp_path / "b", "images_evaluation")
    zipped = load_omniglot(tmp_path / "a", cache=False)
    extracted = load_omniglot(tmp_path / "b", cache=False, size=28)
    assert torch.equal(zipped[0], extracted[0]) and torch.equal(zipped[1], extracted[1])
    assert zipped[2] == extracted[2]
    # unzipped into a folder of its own name: images_evaluation/images_evaluation/...
    make_dir(tmp_path / "c" / "images_evaluation", "images_evaluation")
    assert torch.equal(load_omniglot(tmp_path / "c", cache=False)[0], zipped[0])


def test_an_archive_zipped_and_extracted_counts_once(tmp_path):
    make_zip(tmp_path, "images_background")
    make_dir(tmp_path, "images_background", {"Greek": 1})  # a half extraction: the zip wins
    x, labels, names = load_omniglot(tmp_path, cache=False)
    assert x.shape[0] == 5 * DRAWERS and len(names) == 5


def test_several_archives_and_the_subsets_of_the_full_one(tmp_path):
    make_zip(tmp_path / "python", "images_evaluation", {"Korean": 2})
    make_zip(tmp_path / "python", "images_background_small1", {"Greek": 1})
    x, labels, names = load_omniglot(tmp_path, cache=False, size=14)
    assert x.shape == (3 * DRAWERS, 14, 14)
    assert names == ["images_background_small1/Greek/character01",
                     "images_evaluation/Korean/character01", "images_evaluation/Korean/character02"]
    assert labels.unique().tolist() == [0, 1, 2]
    make_zip(tmp_path, "images_background")  # the full set: its subset would repeat characters
    x, labels, names = load_omniglot(tmp_path, cache=False)
    assert len(names) == 5 + 2 and not any("small1" in n for n in names)


def test_cache_is_used_then_refreshed_when_an_archive_changes(tmp_path, monkeypatch):
    path = make_zip(tmp_path, "images_background")
    first = load_omniglot(tmp_path)
    assert (tmp_path / ".pymaml_omniglot_28.pt").is_file()
    read = omniglot._read
    monkeypatch.setattr(omniglot, "_read", lambda *a: pytest.fail("read the archives again"))
    again = load_omniglot(tmp_path)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2] == again[2]
    monkeypatch.setattr(omniglot, "_read", read)
    make_zip(tmp_path, "images_background", {"Greek": 1})  # new contents, new size and time
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert load_omniglot(tmp_path)[0].shape[0] == DRAWERS
    assert load_omniglot(tmp_path, size=20)[0].shape == (DRAWERS, 20, 20)  # a cache per size


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "foreign"])
def test_a_damaged_cache_is_rebuilt(tmp_path, damage):
    make_zip(tmp_path, "images_background")
    want = load_omniglot(tmp_path)
    cache = tmp_path / ".pymaml_omniglot_28.pt"
    data = bytearray(cache.read_bytes())
    if damage == "garbage":
        data = bytearray(b"not a cache at all")
    elif damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "flipped":  # a bit of the stored images: only the CRCs tell
        at = data.index(bytes([0] * 64)) + 32
        data[at] ^= 0xFF
    else:
        torch.save({"format": "something else"}, cache)
        data = bytearray(cache.read_bytes())
    cache.write_bytes(bytes(data))
    got = load_omniglot(tmp_path)
    assert torch.equal(got[0], want[0]) and got[2] == want[2]
    assert torch.load(cache, weights_only=True)["format"] == "pymaml.omniglot"  # written anew


def test_cache_argument(tmp_path):
    make_zip(tmp_path / "data", "images_background")
    load_omniglot(tmp_path / "data", cache=False)
    assert not list((tmp_path / "data").glob(".pymaml*"))
    (tmp_path / "cache").mkdir()
    load_omniglot(tmp_path / "data", cache=tmp_path / "cache")
    assert (tmp_path / "cache" / ".pymaml_omniglot_28.pt").is_file()
    load_omniglot(tmp_path / "data", cache=str(tmp_path / "mine.pt"))
    assert (tmp_path / "mine.pt").is_file()
    with pytest.warns(UserWarning, match="could not write the Omniglot cache"):
        x = load_omniglot(tmp_path / "data", cache=tmp_path / "missing" / "c.pt")[0]
    assert x.shape[0] == 5 * DRAWERS
    with pytest.raises(TypeError, match="cache must be a file path"):
        load_omniglot(tmp_path / "data", cache=3)


def test_errors_name_the_directory_or_file(tmp_path):
    with pytest.raises(ValueError, match=f"data: the directory {tmp_path / 'no'} does not exist"):
        load_omniglot(tmp_path / "no")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        load_omniglot(tmp_path / "file")
    with pytest.raises(ValueError) as info:
        load_omniglot(tmp_path)
    assert str(tmp_path) in str(info.value) and "images_evaluation.zip" in str(info.value)
    assert "\n" not in str(info.value)
    (tmp_path / "images_background.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="images_background.zip is not a readable zip archive"):
        load_omniglot(tmp_path, cache=False)
    make_zip(tmp_path, "images_background")
    make_zip(tmp_path / "copy", "images_background")
    with pytest.raises(ValueError, match="images_background is under .* more than once"):
        load_omniglot(tmp_path, cache=False)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        load_omniglot(tmp_path, size=0)
    with pytest.raises(TypeError, match="download must be True or False"):
        load_omniglot(tmp_path, download="yes")


def test_a_broken_png_or_an_empty_archive_is_named(tmp_path):
    folder = make_dir(tmp_path / "d", "images_background")
    bad = folder / "Latin" / "character02" / "0202_02.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=f"{bad}: cannot read the PNG image"):
        load_omniglot(tmp_path / "d", cache=False)
    (tmp_path / "z").mkdir()
    with zipfile.ZipFile(tmp_path / "z" / "images_evaluation.zip", "w") as archive:
        archive.writestr("images_evaluation/Greek/character01/x.png", b"nothing")
    with pytest.raises(ValueError, match=r"images_evaluation.zip:images_evaluation/Greek/"
                                         r"character01/x.png: cannot read the PNG image \(not an"):
        load_omniglot(tmp_path / "z", cache=False)
    make_zip(tmp_path / "crc", "images_background")  # a member whose bytes changed
    data = bytearray((tmp_path / "crc" / "images_background.zip").read_bytes())
    at = data.index(b"IDAT") + 8
    data[at] ^= 0xFF
    (tmp_path / "crc" / "images_background.zip").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"images_background.zip:images_background/Greek/"
                                         r"character01/0101_01.png: cannot read it from the arc"):
        load_omniglot(tmp_path / "crc", cache=False)
    (tmp_path / "e" / "images_background" / "Greek").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images laid out as"):
        load_omniglot(tmp_path / "e", cache=False)


def test_pillow_missing_says_how_to_install(tmp_path, monkeypatch):
    make_zip(tmp_path, "images_background")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        load_omniglot(tmp_path, cache=False)


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_offline_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as info:
        load_omniglot(tmp_path / "new", download=True)
    message = str(info.value)
    assert "\n" not in message and "could not download images_background.zip from https://" \
        "github.com/brendenlake/omniglot/raw/master/python/images_background.zip" in message
    assert "Network is unreachable" in message and str(tmp_path / "new") in message
    assert os.listdir(tmp_path / "new") == []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(b"<html>"))
    with pytest.raises(RuntimeError, match="not a zip archive"):
        load_omniglot(tmp_path / "new", download=True)
    assert os.listdir(tmp_path / "new") == []


def test_download_fetches_only_the_missing_archives(tmp_path, monkeypatch):
    make_zip(tmp_path / "src", "images_evaluation", {"Korean": 1})
    make_dir(tmp_path / "data", "images_background", {"Greek": 1})
    asked = []

    def serve(url, timeout=None):
        asked.append(url)
        return _Response((tmp_path / "src" / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    x, labels, names = load_omniglot(tmp_path / "data", download=True, cache=False)
    assert [u.rsplit("/", 1)[1] for u in asked] == ["images_evaluation.zip"]
    assert names == ["images_background/Greek/character01", "images_evaluation/Korean/character01"]
    assert sorted(os.listdir(tmp_path / "data")) == ["images_background", "images_evaluation.zip"]


def _real_subset():
    """The real images_background_small1.zip: $PYMAML_OMNIGLOT, the repository's ../shared, or
    /work/shared; None when none has it."""
    places = [os.environ.get("PYMAML_OMNIGLOT", ""),
              Path(__file__).resolve().parents[2] / "shared/data/omniglot",
              "/work/shared/data/omniglot"]
    for place in places:
        if place and (Path(place) / "images_background_small1.zip").is_file():
            return Path(place)
    return None


@pytest.mark.skipif(_real_subset() is None,
                    reason="images_background_small1.zip not found (set PYMAML_OMNIGLOT to its "
                           "folder; it is in brendenlake/omniglot under python/)")
def test_the_real_background_small1_subset(tmp_path):
    x, labels, names = load_omniglot(_real_subset(), cache=tmp_path)
    assert x.shape == (2720, 28, 28) and len(names) == 136
    assert torch.bincount(labels).tolist() == [20] * 136
    assert names[0] == "images_background_small1/Balinese/character01"
    assert 0 <= x.min() and x.max() == 1
    ink = (x > 0.5).float().mean().item()
    assert 0.03 < ink < 0.2  # strokes on an empty page: ink is the small part
    assert x[:, 0, :].mean() < 0.01  # the border is background
    cached = load_omniglot(_real_subset(), cache=tmp_path)
    assert torch.equal(cached[0], x) and cached[2] == names
    train, test = split_classes(labels, 100, seed=0)
    family = Episodes(x, labels, ways=5, shots=1, classes=train, rotations=True)
    batch = family.sample(8, generator=torch.Generator().manual_seed(0))
    assert batch.x_support.shape == (8, 5, 784) and family.n_classes == 400
