"""--shard K/N and `verify-optimizers merge`: the shards of a selection share its
runs out, each run to exactly one shard; merged, they are the unsharded report
file for file (byte for byte but the environment block); merge refuses what is
not one selection's complete set of shards; `check --from` compares a merged
run with the baseline, and `check --shard` shards a check."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from conftest import fast_backend, make_selection
from verify import cli
from verify.output import MARKER, write_marker

# nadam: the article's departs (excerpts and figures to merge); adam: it matches
SELECTION = ["--optimizer", "nadam,adam", "--dtype", "float32,float64", "--scenario", "gaussian,tiny",
             "--steps", "30", "--size", "8", "--quiet"]


# --- which runs a shard takes -------------------------------------------------------
@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(1, 2), st.integers(1, 5), st.integers(1, 2),
       st.integers(1, 12))
def test_every_run_is_in_exactly_one_shard_and_shards_are_even(backends, dtypes, configs,
                                                               modes, n):
    sel = make_selection(["tensorflow", "jax", "torch", "x"][:backends],
                         ["keras"], configurations=["sgd", "adam", "nadam", "lion", "ftrl"][:configs],
                         dtypes=["float32", "float64"][:dtypes],
                         modes=["eager", "compiled"][:modes], names=["gaussian"], steps=2,
                         size=4)
    every = sel.runs(every=True)
    shards = []
    for k in range(1, n + 1):
        sel.shard = (k, n)
        shards.append(sel.runs())
    taken = [r for s in shards for r in s]
    assert len(taken) == len(every)
    assert {(c.id, b, d, m) for c, b, d, m in taken} == {(c.id, b, d, m) for c, b, d, m in every}
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for b in sel.backends:  # each backend's runs are shared out evenly too
        per = [sum(r[1] == b for r in s) for s in shards]
        assert max(per) - min(per) <= 1


@pytest.mark.parametrize("shard", ["0/3", "4/3", "2", "a/b", "1/0", "-1/2", "9/9"])
def test_a_bad_shard_is_exit_2_in_one_line(tmp_path, capsys, shard):
    out = tmp_path / "r"
    code = cli.main(["--backend", fast_backend(), *SELECTION, "--shard", shard,
                     "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--shard" in err[0], err
    assert not out.exists()


def test_a_shard_report_needs_csv_and_json(tmp_path, capsys):
    code = cli.main(["--backend", fast_backend(), *SELECTION, "--shard", "1/2", "--format",
                     "md,json", "--output", str(tmp_path / "r")])
    assert code == 2 and "csv and json" in capsys.readouterr().err


# --- shards merged are the unsharded run ----------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The selection unsharded, as 3 shards, and the shards merged."""
    root = tmp_path_factory.mktemp("shards")
    base = ["--backend", fast_backend(), *SELECTION]
    assert cli.main(base + ["--output", str(root / "whole")]) == 0
    for k in (1, 2, 3):
        assert cli.main(base + ["--shard", f"{k}/3", "--output", str(root / f"s{k}")]) == 0
    assert cli.main(["merge", *(str(root / f"s{k}") for k in (3, 1, 2)),
                     "--output", str(root / "merged")]) == 0
    return root


def files(folder: Path) -> list:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def before_environment(path: Path) -> str:
    text = path.read_text()
    if path.name == "summary.md":
        return text[:text.index("\n---\n")]
    if path.name == "summary.json":
        doc = json.loads(text)
        return json.dumps({k: v for k, v in doc.items() if k != "environment"})
    return text


def test_merged_shards_are_the_unsharded_report(runs):
    whole, merged = runs / "whole", runs / "merged"
    assert files(merged) == files(whole)
    for name in files(whole):
        if name == MARKER:  # which command wrote it differs, not the files it lists
            assert json.loads((merged / name).read_text())["files"] == json.loads(
                (whole / name).read_text())["files"]
        elif name in ("summary.md", "summary.json"):
            assert before_environment(merged / name) == before_environment(whole / name), name
        else:
            assert (merged / name).read_bytes() == (whole / name).read_bytes(), name
    # the run has what the comparison must carry over: mismatches with excerpts and figures
    assert "article / nadam" in (whole / "steps.md").read_text()
    assert "data:image/png" in (whole / "report.html").read_text()
    shards = [json.loads((runs / f"s{k}" / "summary.json").read_text()) for k in (1, 2, 3)]
    assert [s["settings"]["shard"] for s in shards] == ["1/3", "2/3", "3/3"]
    assert all(0 < len(s["rows"]) < len(json.loads((whole / "summary.json").read_text())["rows"])
               for s in shards)
    env = json.loads((merged / "summary.json").read_text())["environment"]
    assert sorted(env["shards"]) == ["1/3", "2/3", "3/3"]


def edited(runs, tmp_path, name, k, settings=None, part=None):
    """A copy of shard k with its settings or its part edited in both its files."""
    copy = tmp_path / name
    shutil.copytree(runs / f"s{k}", copy)
    shard, summary = (json.loads((copy / f).read_text()) for f in ("shard.json", "summary.json"))
    shard["settings"].update(settings or {})
    summary["settings"].update(settings or {})
    if part:
        shard["part"] = summary["settings"]["shard"] = part
    (copy / "shard.json").write_text(json.dumps(shard))
    (copy / "summary.json").write_text(json.dumps(summary))
    write_marker(copy, "run")  # as the harness would have written it: merge checks the digests
    return copy


@pytest.mark.parametrize("case,expected", [
    ("missing", "shard(s) 2/3 missing"),
    ("twice", "shard 1/3 is given twice"),
    ("settings", "shards of different settings (seed differ)"),
    ("count", "is a shard of 2"),
    ("overlap", "overlap: both hold"),
    ("unsharded", "is not a shard report"),
    ("empty", "is not a shard report"),
])
def test_merge_refuses_what_is_not_one_complete_set_of_shards(runs, tmp_path, capsys, case,
                                                              expected):
    s1, s2, s3 = (str(runs / f"s{k}") for k in (1, 2, 3))
    folders = {
        "missing": lambda: [s1, s3],
        "twice": lambda: [s1, s1, s2, s3],
        "settings": lambda: [s1, s2, edited(runs, tmp_path, "other", 3, settings={"seed": 1})],
        "count": lambda: [s1, s2, edited(runs, tmp_path, "other", 3, part="2/2")],
        # shard 2 relabelled 3: every part once, but shard 2's runs twice
        "overlap": lambda: [s1, s2, edited(runs, tmp_path, "other", 2, part="3/3")],
        "unsharded": lambda: [s1, s2, s3, runs / "whole"],
        "empty": lambda: [s1, s2, s3, tmp_path / "empty"],
    }[case]()
    (tmp_path / "empty").mkdir()
    out = tmp_path / "merged"
    code = cli.main(["merge", *map(str, folders), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not out.exists()


# --- check on sharded runs ------------------------------------------------------------
def test_check_from_a_merged_run_compares_it_with_the_baseline(runs, tmp_path, capsys):
    baseline, merged = tmp_path / "baseline", tmp_path / "merged"
    shutil.copytree(runs / "merged", merged)
    assert cli.main(["check", "--update-baseline", "--from", str(merged),
                     "--baseline", str(baseline)]) == 0
    assert cli.main(["check", "--from", str(merged), "--baseline", str(baseline)]) == 0
    assert "no change: all 24 cells" in capsys.readouterr().out
    assert (merged / "check.md").exists() and "check.md" in (merged / MARKER).read_text()
    # sensitivity: the baseline says one cell diverged elsewhere
    cells = pd.read_csv(baseline / "cells.csv", dtype=str, keep_default_na=False)
    i = (cells.verdict == "mismatch").idxmax()
    cells.loc[i, "first_divergent_step"] = str(int(cells.first_divergent_step[i]) + 1)
    cells.to_csv(baseline / "cells.csv", index=False, lineterminator="\n")
    write_marker(baseline, "baseline")  # signed: else check refuses the edit (digests)
    assert cli.main(["check", "--from", str(merged), "--baseline", str(baseline)]) == 1
    assert "first divergent step" in (merged / "check.md").read_text()


def test_check_from_refuses_a_shard_and_selection_flags(runs, tmp_path, capsys):
    baseline = tmp_path / "baseline"
    assert cli.main(["check", "--update-baseline", "--from", str(runs / "merged"),
                     "--baseline", str(baseline)]) == 0
    capsys.readouterr()
    for argv, expected in ((["--from", str(runs / "s1")], "merge the shards first"),
                           (["--from", str(runs / "merged"), "--steps", "30"], "--steps"),
                           (["--from", str(tmp_path / "nothing")], "not a run report")):
        code = cli.main(["check", *argv, "--baseline", str(baseline)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], err


def test_check_shards_merged_are_checked_like_the_whole(runs, tmp_path, capsys):
    baseline = tmp_path / "baseline"
    assert cli.main(["check", "--update-baseline", "--from", str(runs / "merged"),
                     "--baseline", str(baseline)]) == 0
    for k in (1, 2):
        assert cli.main(["check", "--baseline", str(baseline), "--optimizer", "adam",
                         "--shard", f"{k}/2", "--quiet", "--output",
                         str(tmp_path / f"c{k}")]) == 0
        assert not (tmp_path / f"c{k}" / "check.md").exists()  # a shard compares nothing
    merged = tmp_path / "merged"
    assert cli.main(["merge", str(tmp_path / "c1"), str(tmp_path / "c2"),
                     "--output", str(merged)]) == 0
    capsys.readouterr()
    assert cli.main(["check", "--from", str(merged), "--baseline", str(baseline)]) == 0
    assert "no change: all 12 cells" in capsys.readouterr().out
