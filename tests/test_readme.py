"""Every code block of README.md and docs/*.md works as printed.

```python blocks run, in the order of their file, in a temporary directory (they write files):
- a block whose first line of code is an import starts a new script; any other block goes on
  with the script of the block before it (its names, its imports), as a reader pastes them;
- a block right after the line `<!-- not run: WHY -->` is not run (a signature, a sketch with
  `...`): the marker says so where a reader sees it.

Runs are shortened, not edited: with PYMAML_DOCS_QUICK=1 (the default here) the harness caps
pymaml.train's iterations at QUICK_ITERATIONS and pymaml.evaluate's held-out tasks at
QUICK_TASKS, without the block knowing; PYMAML_DOCS_QUICK=0 runs every block as printed (the
seed's 275,000 iterations and the paper's 70,000: many minutes).

```bash blocks: every `python -m pymaml ...` command (and torchrun's `-m pymaml ...`) parses
with the command line's own parser, so a renamed or removed flag fails here; commands with
`...` in them are sketches and only their command name is checked. Then each block's commands
run, in order, in a temporary directory of their own (a command may read what one before it
in the block wrote, as in a reader's terminal),
through the command line's own entry point; the placeholders DIR and OTHER_DIR are two small
Omniglot archives written here in the official layout. Runs are shortened the same way: with
PYMAML_DOCS_QUICK=1 `train` and `demo` stop after QUICK_CLI_ITERATIONS and `eval` draws
QUICK_TASKS tasks (an option appended to the command: the last one given wins). Sketches and
torchrun's commands (more processes: tests/test_distributed.py runs torchrun) are not run. And
the outputs those commands write (*.pt, *.ckpt, figures) are ignored by git."""

import ast
import glob
import io
import itertools
import os
import re
import shlex
import shutil
import subprocess
import zipfile

import pytest
import torch

import pymaml
from pymaml.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
QUICK = os.environ.get("PYMAML_DOCS_QUICK", "1") != "0"
QUICK_ITERATIONS = 200
QUICK_TASKS = 50
QUICK_CLI_ITERATIONS = 50
SKIP_MARK = re.compile(r"<!--\s*not run:")


def blocks(doc, language):
    """[(line number, code, skipped)] of the ```language blocks of `doc`, in order."""
    lines = open(os.path.join(ROOT, doc), encoding="utf-8").read().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            found.append((start + 1, "\n".join(lines[start:end]), bool(SKIP_MARK.match(before))))
            i = end
        i += 1
    return found


def scripts(doc):
    """[(first line, [(line, code)...])]: the python blocks of `doc` grouped into scripts."""
    out = []
    for line, code, skipped in blocks(doc, "python"):
        if skipped:
            continue
        try:
            body = ast.parse(code).body
        except SyntaxError:  # a script of its own, which then fails naming the block
            body = [ast.Import(names=[])]
        if not out or body and isinstance(body[0], (ast.Import, ast.ImportFrom)):
            out.append((line, []))
        out[-1][1].append((line, code))
    return out


def _quick(monkeypatch):
    """pymaml.train and pymaml.evaluate, shortened for the blocks (PYMAML_DOCS_QUICK)."""
    train, evaluate = pymaml.train, pymaml.evaluate

    def quick_train(*args, **kwargs):
        kwargs["iterations"] = min(kwargs.get("iterations") or QUICK_ITERATIONS,
                                   QUICK_ITERATIONS)
        return train(*args, **kwargs)

    def quick_evaluate(*args, **kwargs):
        kwargs["num_tasks"] = min(kwargs.get("num_tasks") or QUICK_TASKS, QUICK_TASKS)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(pymaml, "train", quick_train)
    monkeypatch.setattr(pymaml, "evaluate", quick_evaluate)


SCRIPTS = [pytest.param(doc, i, id=f"{doc}:{line}") for doc in DOCS
           for i, (line, _) in enumerate(scripts(doc))]


@pytest.mark.parametrize("doc,index", SCRIPTS)
def test_the_python_blocks_run(doc, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if QUICK:
        _quick(monkeypatch)
    namespace = {"__name__": "__main__"}
    for line, code in scripts(doc)[index][1]:
        try:
            exec(compile(code, f"{doc}, the block at line {line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{doc}: the python block at line {line} fails: "
                                 f"{type(exc).__name__}: {exc}") from exc


def test_every_python_block_is_run_or_says_why_not():
    """A block is run, or marked `<!-- not run: WHY -->`; and every unmarked block parses."""
    for doc in DOCS:
        for line, code, skipped in blocks(doc, "python"):
            if not skipped:
                ast.parse(code, f"{doc}:{line}")  # a SyntaxError names the block


def commands(doc, launcher=False):
    """[(line, argv after `pymaml`)] of the `-m pymaml` commands in `doc`'s bash blocks (with
    launcher=True: [(line, argv, the launcher: python or torchrun)])."""
    out = []
    for line, code, _ in blocks(doc, "bash"):
        text = re.sub(r"\\\n", " ", code)  # continuation lines joined
        for row in text.splitlines():
            row = row.split(" #")[0] if not row.lstrip().startswith("#") else ""
            if not re.search(r"-m\s+pymaml\b", row):
                continue
            for part in re.split(r"&&|;|\|", row):
                words = shlex.split(part)
                if "-m" in words and words.index("-m") + 1 < len(words) \
                        and words[words.index("-m") + 1] == "pymaml":
                    argv = words[words.index("-m") + 2:]
                    out.append((line, argv, os.path.basename(words[0])) if launcher
                               else (line, argv))
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_the_shell_commands_use_flags_that_exist(doc):
    parser = build_parser()
    for line, argv in commands(doc):
        if "..." in argv:
            argv = argv[:1]  # a sketch: its command exists
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"{doc}, the bash block at line {line}: `python -m pymaml "
                                 f"{' '.join(argv)}` does not parse (see the error above)")


def _omniglot_archive(folder, alphabets):
    """folder/images_background_small1.zip in the official layout: per alphabet 6 characters
    of 20 drawers, each drawing a random 105x105 bilevel PNG."""
    image = pytest.importorskip("PIL.Image")
    generator = torch.Generator().manual_seed(len(alphabets[0]))
    folder.mkdir()
    with zipfile.ZipFile(folder / "images_background_small1.zip", "w") as archive:
        for alphabet in alphabets:
            for c, d in itertools.product(range(1, 7), range(1, 21)):
                ink = (torch.rand(105, 105, generator=generator) < 0.8).numpy()
                png = io.BytesIO()
                image.fromarray(ink).save(png, format="PNG")
                archive.writestr(f"images_background_small1/{alphabet}/character{c:02d}/"
                                 f"{c:02d}{d:02d}_{d:02d}.png", png.getvalue())
    return str(folder)


def _shortened(argv):
    """argv with the PYMAML_DOCS_QUICK caps appended (argparse: the last value given wins)."""
    if not QUICK:
        return argv
    caps = {"train": ["--iterations", str(QUICK_CLI_ITERATIONS)],
            "demo": ["--iterations", str(QUICK_CLI_ITERATIONS)],
            "eval": ["--tasks", str(QUICK_TASKS)]}
    return argv + caps.get(argv[0], [])


RUNNABLE = [pytest.param(doc, id=doc) for doc in DOCS
            if any("..." not in argv and launcher != "torchrun"
                   for _, argv, launcher in commands(doc, launcher=True))]


@pytest.mark.parametrize("doc", RUNNABLE)
def test_the_shell_commands_run(doc, tmp_path, monkeypatch, capsys):
    from pymaml import cli
    places = {"DIR": _omniglot_archive(tmp_path / "train-archives", ["Latin", "Greek"]),
              "OTHER_DIR": _omniglot_archive(tmp_path / "test-archives", ["Korean"])}
    for line, argv, launcher in commands(doc, launcher=True):
        if "..." in argv or launcher == "torchrun":
            continue
        (tmp_path / f"block-{line}").mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / f"block-{line}")
        argv = _shortened([places.get(word, word) for word in argv])
        code = cli.main(argv)
        assert code == 0, (f"{doc}, the bash block at line {line}: `python -m pymaml "
                           f"{' '.join(argv)}` exits {code}: {capsys.readouterr().err}")


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git"))
                    and not os.path.isfile(os.path.join(ROOT, ".git")),
                    reason="not a git checkout")
def test_what_runs_write_is_ignored_by_git():
    written = ["maml-sine.pt", "maml-sine.ckpt", "maml-sine.png", "maml-sine-loss.png",
               "daml-sine.pt", "run.ckpt", "out/run.pt", "runs/a/b.ckpt", "bench.json"]
    kept = ["tests/data/new-fixture.pt", "tests/data/new-fixture.ckpt"]
    p = subprocess.run(["git", "check-ignore", "--no-index", *written, *kept], cwd=ROOT,
                       capture_output=True, text=True)
    ignored = set(p.stdout.split())
    assert ignored == set(written), f"not ignored: {set(written) - ignored}; " \
                                    f"ignored but fixtures: {ignored & set(kept)}"
    tracked = subprocess.run(["git", "ls-files", "*.pt", "*.ckpt"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert tracked, "the committed fixtures of tests/data are tracked"
