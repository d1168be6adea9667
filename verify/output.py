"""What the harness may write, and how: reports appear whole or not at all,
nothing it did not write is ever deleted or overwritten, and what it reads
back is what it wrote.

A folder the harness writes carries a marker file (MARKER) listing the files
it wrote there with the SHA-256 of each.  An existing folder is written only if
it is empty or carries the marker; a folder is replaced only if it holds nothing
but the files its marker lists.  A replacement is written aside (a partial
folder whose marker names its writer's pid and host), swapped in by two renames,
and only then is the old folder removed.  A single report file (explain) starts
with FILE_MARKER.  While a command writes an output it holds a lock on it
(`.NAME.lock` beside it), so a second command on the same output is refused.
Inputs (gradient files, the baseline, an edited keras) may not lie inside an
output, nor an output inside them.  A report read back (a shard, `check --from`,
the baseline) must match its marker's digests.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

MARKER = ".verify-optimizers"
FILE_MARKER = "<!-- written by verify-optimizers; regenerate it rather than edit it -->"


class OutputRefused(ValueError):
    """The harness will not write there, or will not trust a report it reads back
    (reported as a usage error, exit 2)."""


def _files_under(folder: Path) -> list:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() or p.is_symlink())


def _marker(folder: Path):
    """The marker of `folder` as a dict, or None when it has none."""
    try:
        doc = json.loads((folder / MARKER).read_text())
        if doc.get("written_by") != "verify-optimizers" or not isinstance(doc["files"], list):
            return None
        return doc
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _manifest(folder: Path):
    """The files the marker of `folder` lists, or None when it has no marker."""
    doc = _marker(folder)
    return None if doc is None else {str(f) for f in doc["files"]}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _marker_text(command: str, digests: dict) -> str:
    """`digests`: file -> its SHA-256 (None: not known, e.g. listed by an older marker)."""
    names = sorted(set(digests) - {MARKER})
    return json.dumps({"written_by": "verify-optimizers", "command": command, "files": names,
                       "sha256": {n: digests[n] for n in names}}, indent=0) + "\n"


def write_marker(folder: Path, command: str) -> None:
    """List every file now in `folder` as the harness's own, with its digest."""
    folder = Path(folder)
    (folder / MARKER).write_text(_marker_text(
        command, {f: _sha256(folder / f) for f in _files_under(folder) if f != MARKER}))


def read_back(folder, names=(), what="report") -> dict:
    """Check that `folder` holds exactly what the harness wrote there: every file its
    marker lists, each with the recorded SHA-256, and nothing else; return the bytes
    of the files `names` (name -> bytes, as hashed).  OutputRefused (one line,
    exit 2) otherwise: a hand-edited report is never trusted."""
    folder = Path(folder)
    doc = _marker(folder)
    digests = doc.get("sha256") if doc is not None else None
    if not (isinstance(digests, dict) and set(digests) == set(doc["files"])
            and all(isinstance(d, str) for d in digests.values())):
        raise OutputRefused(f"{what} {folder} carries no digests of what verify-optimizers "
                            f"wrote there ({MARKER} missing, or from an older version): "
                            "write it again")
    present = set(_files_under(folder)) - {MARKER}
    foreign = sorted(present - set(digests))
    if foreign:
        raise OutputRefused(f"{what} {folder} holds {foreign[0]}, which verify-optimizers did "
                            "not write: move it away")
    contents = {}
    for name in sorted(digests):
        path = folder / name
        if name not in present or path.is_symlink():
            raise OutputRefused(f"{what} {folder} lacks {name}, which verify-optimizers wrote "
                                "there")
        if name in names:
            contents[name] = path.read_bytes()
            digest = hashlib.sha256(contents[name]).hexdigest()
        else:
            digest = _sha256(path)
        if digest != digests[name]:
            raise OutputRefused(f"{what} {folder}: {name} is not what verify-optimizers wrote "
                                f"(its SHA-256 differs from the one in {MARKER}): it was "
                                "edited; write the report again")
    missing = [n for n in names if n not in contents]
    if missing:
        raise OutputRefused(f"{what} {folder} lacks {missing[0]}")
    return contents


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
    # a symbolic link is refused, not followed: the report is swapped in by renames,
    # which would replace the link rather than write where it points
    if output.is_symlink():
        raise OutputRefused(f"{what} {output} is a symbolic link: give the folder itself")
    if output.exists() and not output.is_dir():
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
    if output.is_symlink():
        raise OutputRefused(f"{what} {output} is a symbolic link: give the file itself")
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


# --- who is writing -----------------------------------------------------------------
def _writer() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie (an orphan nobody reaps, in a container) is gone: /proc/PID/stat, proc(5)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def locked(output: Path):
    """Hold the lock of `output` (`.NAME.lock` beside it) while the block runs;
    OutputRefused, naming the holder, when another process holds it.  flock: the
    kernel releases it when its holder dies, so a lock file left by a killed run
    does not block (and is removed by the next)."""
    output = Path(output)
    path = output.parent / f".{output.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(fd, errors="replace") as f:
                holder = f.read(500)
            try:
                who = json.loads(holder)
                who = f"pid {who['pid']} on {who['host']}, since {who['started']}"
            except (ValueError, KeyError, TypeError):
                who = "pid not yet recorded"
            raise OutputRefused(f"{output} is being written by another verify-optimizers run "
                                f"({who}): wait for it to end or choose another output") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed that file as we took it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_writer()) + "\n").encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a waiter re-checks the inode
        os.close(fd)


def _owned_folder(parent: Path, prefix: str, command: str) -> Path:
    """A new folder `prefix<pid>-*` in `parent` whose marker names this process as
    its writer (how a later run knows it for the harness's own)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    (folder / MARKER).write_text(json.dumps({"written_by": "verify-optimizers",
                                             "command": command, "files": [],
                                             "writer": _writer()}) + "\n")
    return folder


def note_child(folder: Path, pid: int) -> None:
    """Record in the marker of an _owned_folder a process started to use it (a worker
    reading its inputs): the folder is stale only when that process is gone too."""
    doc = _marker(Path(folder))
    doc["writer"]["children"] = doc["writer"].get("children", []) + [pid]
    _write_atomically(Path(folder) / MARKER, json.dumps(doc) + "\n")


def remove_stale(parent: Path, prefix: str) -> list:
    """Remove the folders `prefix<pid>-*` in `parent` that a harness process of this
    host left when it was killed: only a real folder whose marker names as its
    writer that pid, on this host, and only when that process and every process it
    recorded there (note_child) are gone."""
    removed = []
    for path in Path(parent).glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix):].split("-")[0]
        if path.is_symlink() or not path.is_dir() or not pid.isdigit():
            continue
        writer = (_marker(path) or {}).get("writer")
        if not (isinstance(writer, dict) and writer.get("pid") == int(pid)
                and writer.get("host") == socket.gethostname()):
            continue
        children = writer.get("children", [])
        users = [int(pid)] + (children if isinstance(children, list) else [None])
        if all(isinstance(u, int) and not isinstance(u, bool) and u > 0 and not _alive(u)
               for u in users):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def scratch_folder(prefix: str):
    """A temporary folder `prefix<pid>-*` in the system's temporary folder, removed at
    the end; the ones a killed run left (remove_stale) are removed first."""
    parent = Path(tempfile.gettempdir())
    remove_stale(parent, prefix)
    folder = _owned_folder(parent, prefix, "scratch")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- writing ------------------------------------------------------------------------
@contextmanager
def replacing_folder(output: Path, command: str = "run"):
    """Yield a fresh folder next to `output`; when the block succeeds it
    replaces `output` (old folder moved aside, new one renamed in, old one
    removed); when it fails, or is interrupted, it is removed and `output` is
    untouched.  The lock of `output` is held throughout."""
    output = Path(output)
    check_folder(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with locked(output):
        check_folder(output)  # again, now that no other run of the harness can change it
        remove_stale(output.parent, f".{output.name}-partial-")
        tmp = _owned_folder(output.parent, f".{output.name}-partial-", command)
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
    atomically, leaving every other file there alone; the marker lists them with
    their digests (the digests of the files it listed before are kept as
    recorded, not taken anew from what is there now)."""
    output = Path(output)
    check_folder(output, replace=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    with locked(output):
        check_folder(output, replace=False)
        output.mkdir(exist_ok=True)
        doc = _marker(output) or {"files": []}
        recorded = doc.get("sha256") if isinstance(doc.get("sha256"), dict) else {}
        digests = {str(f): recorded.get(f) for f in doc["files"]}
        for name, text in files.items():
            _write_atomically(output / name, text)
            digests[name] = _sha256(output / name)
        _write_atomically(output / MARKER, _marker_text(command, digests))


def replace_file(output: Path, text: str) -> None:
    """Write a single report file (FILE_MARKER first) atomically."""
    output = Path(output)
    check_file(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with locked(output):
        check_file(output)
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
