"""What the harness may write, and how: reports appear whole or not at all, and
nothing it did not write is ever deleted or overwritten.

A folder the harness writes carries a marker file (MARKER) listing the files
it wrote there.  An existing folder is written only if it is empty or carries
the marker; a folder is replaced only if it holds nothing but the files its
marker lists.  A replacement is written aside, swapped in by two renames, and
only then is the old folder removed.  A single report file (explain) starts
with FILE_MARKER.  Inputs (gradient files, the baseline, an edited keras) may
not lie inside an output, nor an output inside them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MARKER = ".verify-optimizers"
FILE_MARKER = "<!-- written by verify-optimizers; regenerate it rather than edit it -->"


class OutputRefused(ValueError):
    """The harness will not write there (reported as a usage error, exit 2)."""


def _files_under(folder: Path) -> list:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() or p.is_symlink())


def _manifest(folder: Path):
    """The files the marker of `folder` lists, or None when it has no marker."""
    try:
        doc = json.loads((folder / MARKER).read_text())
        files = doc["files"]
        if doc.get("written_by") != "verify-optimizers" or not isinstance(files, list):
            return None
        return {str(f) for f in files}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _marker_text(command: str, files) -> str:
    return json.dumps({"written_by": "verify-optimizers", "command": command,
                       "files": sorted(set(files) - {MARKER})}, indent=0) + "\n"


def write_marker(folder: Path, command: str) -> None:
    """List every file now in `folder` as the harness's own."""
    folder = Path(folder)
    (folder / MARKER).write_text(_marker_text(command, _files_under(folder)))


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_folder(output, *, inputs=(), what="--output", replace=True) -> Path:
    """Raise OutputRefused unless the harness may write the folder `output`.

    `replace`: the folder will be replaced whole, so it may hold nothing the
    harness did not write; otherwise the harness only adds or replaces its own
    files there and leaves the rest alone."""
    output = Path(output)
    for label, path in inputs:
        if path is not None and _overlaps(output, Path(path)):
            raise OutputRefused(f"{what} {output} overlaps {label} {path}: choose a folder "
                                "apart from the inputs")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise OutputRefused(f"{what} {output} exists and is not a folder")
    if not output.exists() or not any(output.iterdir()):
        return output
    own = _manifest(output)
    if own is None:
        raise OutputRefused(f"{what} {output} is a folder that verify-optimizers did not "
                            "write (it is not empty and has no marker): choose a new or empty "
                            "folder")
    if replace:
        foreign = [f for f in _files_under(output) if f != MARKER and f not in own]
        if foreign:
            raise OutputRefused(f"{what} {output} holds {foreign[0]}, which verify-optimizers "
                                "did not write: move it away or choose another folder")
    return output


def check_file(output, *, inputs=(), what="--output") -> Path:
    """Raise OutputRefused unless the harness may write the single file `output`."""
    output = Path(output)
    for label, path in inputs:
        if path is not None and _overlaps(output, Path(path)):
            raise OutputRefused(f"{what} {output} overlaps {label} {path}")
    if output.is_dir():
        raise OutputRefused(f"{what} {output} is a folder; give a file name")
    if output.exists():
        try:
            with open(output, errors="replace") as f:
                first = f.readline().rstrip("\n")
        except OSError as exc:
            raise OutputRefused(f"{what} {output} cannot be read: {exc}") from None
        if first != FILE_MARKER:
            raise OutputRefused(f"{what} {output} exists and was not written by "
                                "verify-optimizers: choose another file name")
    return output


@contextmanager
def replacing_folder(output: Path, command: str = "run"):
    """Yield a fresh folder next to `output`; when the block succeeds it
    replaces `output` (old folder moved aside, new one renamed in, old one
    removed); when it fails, or is interrupted, it is removed and `output` is
    untouched."""
    output = Path(output)
    check_folder(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a report folder is not
    old = None
    try:
        yield tmp
        write_marker(tmp, command)
        check_folder(output)  # again: it may have changed while the run went on
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}-old-", dir=output.parent))
            output.rename(old / output.name)
        tmp.rename(output)
    except BaseException:
        if old is not None and not output.exists():
            (old / output.name).rename(output)  # put the earlier report back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def add_files(output: Path, files: dict, command: str) -> None:
    """Write `files` (name -> text) into the folder `output`, each replaced
    atomically, leaving every other file there alone; the marker lists them."""
    output = Path(output)
    check_folder(output, replace=False)
    output.mkdir(parents=True, exist_ok=True)
    listed = (_manifest(output) or set()) | set(files)
    for name, text in {**files, MARKER: _marker_text(command, listed)}.items():
        _write_atomically(output / name, text)


def replace_file(output: Path, text: str) -> None:
    """Write a single report file (FILE_MARKER first) atomically."""
    output = Path(output)
    check_file(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(output, FILE_MARKER + "\n" + text)


def _write_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole, or is as it was: written aside, renamed over it."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
