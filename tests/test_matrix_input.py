"""`verify-optimizers matrix`'s input (issue 30): a release is a version number,
refused up front otherwise (exit 2, one line, nothing created); nothing outside
--work, nor a folder there the harness did not make, is created, cleared or
removed; --timeout is a positive, finite number of seconds."""

import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from packaging.version import Version

from verify import cli
from verify.commands import matrix
from verify.selection import UsageError, installed_backends
from verify.output import OutputRefused, write_marker

ROOT = Path(__file__).resolve().parent.parent
PROPERTIES = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def matrix_argv(tmp_path, *extra, steps="3", size="8"):
    backend = "torch" if "torch" in installed_backends() else installed_backends()[0]
    return ["matrix", "--backend", backend, "--family", "keras", "--optimizer", "sgd",
            "--dtype", "float32", "--mode", "eager", "--scenario", "gaussian", "--steps", steps,
            "--size", size, "--work", str(tmp_path / "work"), "--output",
            str(tmp_path / "out"), *extra]


def own_work(tmp_path) -> Path:
    """A --work the harness made (it carries the marker)."""
    work = tmp_path / "work"
    work.mkdir()
    write_marker(work, "matrix --work")
    return work


def refused_up_front(tmp_path, capsys, argv, before):
    """Exit 2, one line on stderr, no --work, no --output, the rest as it was."""
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error" in err[0], (code, err)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before
    return err[0]


@pytest.fixture
def victim(tmp_path):
    """A user's folder holding a file, beside --work (tmp_path/work)."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    return folder


# The audit's reproduction: work/venvs/keras-<release> with a release that walks up.
# venv (os.path.abspath) folds "keras-../.." lexically, so four levels reach tmp_path.
@pytest.mark.parametrize("bad", ["../../../../victim", "../../../victim", "../../victim",
                                 "../victim", "3.1.0/../../../../../victim"])
def test_a_release_that_walks_up_touches_nothing(bad, tmp_path, capsys, victim, monkeypatch):
    monkeypatch.setattr(matrix, "probe_backends", lambda *a: pytest.fail("got past validation"))
    before = snapshot(tmp_path)
    code = cli.main(matrix_argv(tmp_path, "--keras", bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert (victim / "thesis.txt").read_text() == "years of work"
    assert code == 2 and len(err) == 1 and "release number" in err[0], (code, err)
    assert not (tmp_path / "work").exists() and snapshot(tmp_path) == before


def test_the_refusal_from_the_command_line_is_one_line_and_exit_2(tmp_path, victim):
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "verify.cli",
                           *matrix_argv(tmp_path, "--keras", "3.5.0,../../../../victim")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "-inf", "-0.5", "soon"])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused_up_front(
        value, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(matrix, "prepare", lambda *a: pytest.fail("got past validation"))
    before = snapshot(tmp_path)
    line = refused_up_front(tmp_path, capsys,
                            matrix_argv(tmp_path, "--keras", "3.5.0", "--timeout", value), before)
    assert "--timeout" in line


@pytest.mark.parametrize("flags", [{"steps": "-1"}, {"steps": "0"}, {"size": "0"},
                                   {"steps": "nan"}, {"size": "inf"}])
def test_the_other_numeric_flags_are_refused_up_front(flags, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(matrix, "prepare", lambda *a: pytest.fail("got past validation"))
    refused_up_front(tmp_path, capsys, matrix_argv(tmp_path, "--keras", "3.5.0", **flags),
                     snapshot(tmp_path))


def test_a_negative_seed_is_refused_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(matrix, "prepare", lambda *a: pytest.fail("got past validation"))
    refused_up_front(tmp_path, capsys, matrix_argv(tmp_path, "--keras", "3.5.0", "--seed", "-3"),
                     snapshot(tmp_path))


def fake_prepare(calls):
    def prepare(version, work, timeout):
        calls.append((version, timeout))
        return None, "not installed in this test"
    return prepare


@pytest.mark.parametrize("value,seconds", [("1800", 1800), ("0.5", 0.5), ("7", 7)])
def test_a_positive_timeout_reaches_prepare(value, seconds, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(matrix, "prepare", fake_prepare(calls))
    code = cli.main(matrix_argv(tmp_path, "--keras", "3.5.0", "--timeout", value))
    assert code == 2 and "no release could run" in capsys.readouterr().err
    assert calls == [("3.5.0", seconds)]


def test_releases_reach_prepare_normalised_and_once(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(matrix, "prepare", fake_prepare(calls))
    cli.main(matrix_argv(tmp_path, "--keras", "v3.5.0, 3.5.0,3.6.0-RC1", "--keras", "1!3.0"))
    capsys.readouterr()
    assert [v for v, _ in calls] == ["3.5.0", "3.6.0rc1", "1!3.0"]


# --- release(): refused iff not a plain version ------------------------------------

def plain(text: str) -> bool:
    """A public PEP 440 version with no whitespace or path separator."""
    if any(c.isspace() or c in "/\\" for c in text):
        return False
    try:
        version = Version(text)
    except ValueError:
        return False
    return version.local is None and len(str(version)) <= matrix.MAX_RELEASE


def check_release(text: str, tmp_path: Path) -> None:
    try:
        normal = matrix.release(text)
    except UsageError as exc:
        assert not plain(text), (text, exc)
        return
    assert plain(text), text
    assert re.fullmatch(r"[0-9a-z.!]+", normal), normal  # one folder name, nothing else
    assert Version(normal) == Version(text) and matrix.release(normal) == normal
    work = tmp_path / "work"
    assert work.resolve() in matrix.inside(work, "venvs", f"keras-{normal}").resolve().parents


VERSION_ALPHABET = string.digits + ".!+-_abcdeilnoprstv/\\ \t\n" + "\u00a0\u0660"


@PROPERTIES
@given(text=st.text(alphabet=VERSION_ALPHABET, max_size=24) | st.text(max_size=24))
def test_any_text_is_refused_unless_a_plain_version(text, tmp_path):
    check_release(text, tmp_path)


numbers = st.integers(0, 40).map(str)
versions = st.builds(
    lambda epoch, release, pre, post, dev: epoch + ".".join(release) + pre + post + dev,
    st.sampled_from(["", "1!"]), st.lists(numbers, min_size=1, max_size=4),
    st.sampled_from(["", "a1", "b2", "rc1", "-rc2", ".beta3"]),
    st.sampled_from(["", ".post1", "-1"]), st.sampled_from(["", ".dev0", "dev3"]))
near_misses = st.one_of(
    st.builds(lambda v, local: f"{v}+{local}", versions, st.sampled_from(["local", "cpu", "1"])),
    st.builds(lambda v, pad: pad + v, versions, st.sampled_from([" ", "\t", "\n"])),
    st.builds(lambda v, pad: v + pad, versions, st.sampled_from([" ", "\t", "\n", " x"])),
    st.builds(lambda v, tail: v + tail, versions,
              st.sampled_from(["/..", "/../..", "\\..", "/", "/x", "..", ".", "!"])),
    st.builds(lambda v, head: head + v, versions,
              st.sampled_from(["../", "./", "/", "~/", "keras==", "==", ">=", "keras-"])),
    st.sampled_from(["latest", "", "..", ".", "/", "3.1.0/..", "3.1 .0", "3,1", "3.1.*",
                     "3.1.0;rm", "-e .", "file:///tmp/x", "9" * 5000]))


@PROPERTIES
@given(text=versions)
def test_every_plain_version_passes_normalised(text, tmp_path):
    assert plain(text)
    assert matrix.release(text) == str(Version(text))
    check_release(text, tmp_path)


@PROPERTIES
@given(text=near_misses)
def test_near_versions_are_refused(text, tmp_path):
    with pytest.raises(UsageError):
        matrix.release(text)
    check_release(text, tmp_path)


@pytest.mark.parametrize("text,normal", [("3.1", "3.1"), ("3.1.0", "3.1.0"),
                                         ("V3.1.0", "3.1.0"), ("3.0.0rc1", "3.0.0rc1"),
                                         ("3.0.0.dev20240101", "3.0.0.dev20240101")])
def test_release_numbers_pass(text, normal):
    assert matrix.release(text) == normal


@pytest.mark.parametrize("text", ["3.1.0+local", " 3.1.0", "3.1.0 ", "3.1.0/..", "latest",
                                  "1" * (matrix.MAX_RELEASE + 1)])
def test_near_versions_fail(text):
    with pytest.raises(UsageError):
        matrix.release(text)


# --- what lies inside --work ---------------------------------------------------------

def test_a_users_folder_at_a_venv_path_is_refused_not_cleared(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(matrix, "probe_backends", lambda *a: pytest.fail("got past validation"))
    mine = own_work(tmp_path) / "venvs" / "keras-3.5.0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code = cli.main(matrix_argv(tmp_path, "--keras", "3.5.0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not made by verify-optimizers" in err[0], err
    assert snapshot(tmp_path) == before


def test_a_venvs_symlink_out_of_work_is_refused(tmp_path, capsys, victim, monkeypatch):
    monkeypatch.setattr(matrix, "probe_backends", lambda *a: pytest.fail("got past validation"))
    (own_work(tmp_path) / "venvs").symlink_to(tmp_path)  # venvs/keras-X -> tmp_path/keras-X
    (tmp_path / "keras-3.5.0").mkdir()
    (tmp_path / "keras-3.5.0" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code = cli.main(matrix_argv(tmp_path, "--keras", "3.5.0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "outside --work" in err[0], err
    assert snapshot(tmp_path) == before


def test_prepare_rebuilds_only_its_own_folder(tmp_path, monkeypatch):
    """An environment folder the harness made (its marker) is cleared and rebuilt;
    the marker is there before the environment, and stays."""
    work = tmp_path / "work"
    runs = []

    def run(cmd, **kwargs):
        runs.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            raise subprocess.CalledProcessError(1, cmd, stderr="no venv in this test")
        return subprocess.CompletedProcess(cmd, 1, "", "")

    monkeypatch.setattr(matrix.subprocess, "run", run)
    python, reason = matrix.prepare("3.5.0", work, 10)
    env = work / "venvs" / "keras-3.5.0"
    assert python is None and "no venv in this test" in reason
    assert (env / matrix.VENV_MARKER).is_file()
    assert runs[-1] == [sys.executable, "-m", "venv", str(env)]  # no --clear
    (env / "stale.txt").write_text("left by a broken build")
    matrix.prepare("3.5.0", work, 10)  # its own folder: cleared, marked again
    assert sorted(p.name for p in env.iterdir()) == [matrix.VENV_MARKER]
    (env / matrix.VENV_MARKER).unlink()
    (env / "notes.txt").write_text("mine now")
    with pytest.raises(OutputRefused):
        matrix.prepare("3.5.0", work, 10)
    assert (env / "notes.txt").read_text() == "mine now"


@pytest.mark.parametrize("found,expected", [("3.1.0", True), ("3.1", True), ("3.1.1", False),
                                            ("not a version", False)])
def test_an_installed_release_is_compared_as_a_version(found, expected):
    assert matrix._same_release(found, "3.1") is expected
