"""report.html, check.html, matrix.html: they parse, reference nothing outside
themselves, draw every mismatching (or changed) cell in a figure and no figure
where nothing mismatches, and hold one grid cell per combination."""

import base64
import csv
import io
import json
import shutil
import sys
from html import escape
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

import reference
from reference.explanations import cause
from reference.rule import REGISTRY
from verify import cli, compare, output
from verify.commands import matrix
from verify.commands.baseline import CELL, cell_class
from verify.report import html as html_report
from conftest import own_modes
from verify.selection import installed_backends

PNG = b"\x89PNG\r\n\x1a\n"
BACKEND = "torch" if "torch" in installed_backends() else installed_backends()[0]
SMALL = ["--backend", BACKEND, "--steps", "20", "--size", "8", "--quiet"]
MODES = len(own_modes(BACKEND))  # the modes that run on it


class Page(HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.tags, self.imgs, self.grid, self.ids, self.text = [], [], [], set(), []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "td" and "data-cell" in a:
            self.grid.append(a)

    def handle_data(self, data):
        self.text.append(data)

    def cells_drawn(self) -> set:
        return {c for img in self.imgs for c in img["data-cells"].split()}


def page(path) -> Page:
    return Page(path.read_text())


def run(tmp_path, *args) -> tuple:
    out = tmp_path / "report"
    code = cli.main([*SMALL, *args, "--output", str(out)])
    return code, out, json.loads((out / "summary.json").read_text())


def cell_id(row) -> str:
    return "-".join(row[f] for f in CELL)


def mismatching(doc) -> set:
    return {cell_id(r) for r in doc["rows"] if r["verdict"] == "mismatch"}


@pytest.fixture(scope="module")
def article_run(tmp_path_factory):
    code, out, doc = run(tmp_path_factory.mktemp("article"), "--family", "article,keras",
                         "--optimizer", "adagrad,adam", "--scenario", "gaussian,tiny")
    assert code == 0
    return out, doc


# --- report.html of a run ---------------------------------------------------------
def self_contained(path) -> Page:
    """The page at `path`, after checking that it references nothing outside itself
    and its report folder."""
    out, text = path.parent, path.read_text()
    p = Page(text)
    assert "http:" not in text and "https:" not in text
    for tag, attrs in p.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is None:
                continue
            if name == "src":
                assert value.startswith("data:image/png;base64,")
                assert base64.b64decode(value.split(",", 1)[1])[:8] == PNG
            elif value.startswith("#"):
                assert value[1:] in p.ids, value            # an anchor of this page
            else:                                            # a file of this report
                assert ":" not in value and not value.startswith("/"), value
                assert (out / value).is_file(), value
    return p


def test_the_page_parses_and_references_nothing_outside_itself(article_run):
    out, _ = article_run
    assert self_contained(out / "report.html").imgs


def test_every_image_is_a_png_that_decodes(article_run):
    import matplotlib.image

    out, _ = article_run
    for img in page(out / "report.html").imgs:
        data = base64.b64decode(img["src"].split(",", 1)[1])
        assert data[:8] == PNG
        assert matplotlib.image.imread(io.BytesIO(data), format="png").ndim == 3


def test_every_mismatching_cell_is_drawn_in_its_findings_figure(article_run):
    out, doc = article_run
    p = page(out / "report.html")
    assert mismatching(doc) and p.cells_drawn() == mismatching(doc)
    for img in p.imgs:  # one figure per family x configuration
        assert len({"-".join(c.split("-")[:2]) for c in img["data-cells"].split()}) == 1


def test_the_grid_has_one_cell_per_combination_with_the_worst_verdict(article_run):
    out, doc = article_run
    df = pd.DataFrame(doc["rows"])
    p = page(out / "report.html")
    expected = {}
    for key, g in df.groupby(["family", "optimizer", "backend", "dtype", "mode"]):
        expected["/".join(key)] = compare.worst(g.verdict)
    got = {td["data-cell"]: td["data-verdict"] for td in p.grid}
    assert len(p.grid) == len(got) == len(expected) and got == expected
    assert "mismatch" in got.values() and {"exact", "match"} & set(got.values())


def test_findings_carry_their_causes_and_link_to_their_tables(article_run):
    out, doc = article_run
    text = (out / "report.html").read_text()
    p = Page(text)
    bad = {(r["family"], r["optimizer"]) for r in doc["rows"] if r["verdict"] == "mismatch"}
    for family, optimizer in bad:
        assert f"finding-{family}-{optimizer}" in p.ids
        assert f"figure-finding-{family}-{optimizer}" in p.ids
        assert f"cells-finding-{family}-{optimizer}" in p.ids
        curated = cause(family, optimizer, BACKEND, "float64")
        assert curated and curated.split(".")[0] in "".join(p.text)
    links = {a["href"] for tag, a in p.tags if tag == "a" and not a["href"].startswith("#")}
    assert links == {html_report.steps_path(tuple(cell_id(r).split("-")))
                     for r in doc["rows"] if r["verdict"] == "mismatch"}


def test_a_findings_figure_alone_is_the_figure_of_the_page(article_run, tmp_path):
    out, doc = article_run
    img = next(i for i in page(out / "report.html").imgs if "article-adagrad-" in i["data-cells"])
    target = tmp_path / "adagrad.png"
    assert html_report.main([str(out), "article/adagrad", str(target)]) == 0
    assert target.read_bytes() == base64.b64decode(img["src"].split(",", 1)[1])


def test_a_perturbed_keras_family_is_a_failure_with_a_figure(tmp_path, monkeypatch):
    import perturbations  # noqa: F401  (registers the perturbed rules)

    monkeypatch.setitem(REGISTRY, ("keras", "Adam"),
                        reference.get_rule("eps-inside-sqrt", "Adam"))
    code, out, doc = run(tmp_path, "--family", "keras", "--optimizer", "adam", "--dtype",
                         "float64", "--scenario", "gaussian")
    p = page(out / "report.html")
    assert code == 1 and mismatching(doc)
    assert "Failures: the keras family" in "".join(p.text)
    assert p.cells_drawn() == mismatching(doc)


def test_a_run_without_mismatches_has_no_figure(tmp_path):
    code, out, doc = run(tmp_path, "--family", "keras", "--optimizer", "adam", "--dtype",
                         "float64", "--scenario", "gaussian")
    p = page(out / "report.html")
    assert code == 0 and not mismatching(doc)
    assert p.imgs == [] and "Failures" not in "".join(p.text) and len(p.grid) == MODES


def test_without_matplotlib_the_page_has_tables_only(article_run, monkeypatch):
    out, doc = article_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "verify.report.figures", raising=False)
    assert html_report.plotting() is None
    df = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=[""])
    text = html_report.render(df, doc["settings"], {}, {}, ["html"])
    p = Page(text)
    assert p.imgs == [] and escape(html_report.NO_FIGURES) in text and p.grid


def test_html_is_written_only_when_asked(tmp_path):
    code, out, _ = run(tmp_path, "--family", "keras", "--optimizer", "sgd", "--dtype",
                       "float64", "--scenario", "gaussian", "--format", "json")
    assert code == 0 and not (out / "report.html").exists()


def bin_max(step, values) -> tuple:
    """A whole series through html.Bins."""
    bins = html_report.Bins(len(values))
    bins.add(step, values)
    return bins.result()


def test_binning_keeps_every_peak_and_leaves_short_runs_alone():
    rng = np.random.default_rng(0)
    step = np.arange(1001)
    values = rng.uniform(0, 1, 1001)
    values[537], values[999] = 1e6, np.nan
    s, v = bin_max(step, values)
    assert len(v) <= html_report.POINTS and 1e6 in v and s[list(v).index(1e6)] == 537
    assert list(s[np.isinf(v)]) == [999] and s[-1] == 1000
    assert np.all(np.diff(s) > 0)
    s, v = bin_max(step[:40], values[:40])
    assert list(s) == list(step[:40]) and list(v) == list(values[:40])


def test_a_figure_draws_zero_inf_and_the_largest_floats():
    from verify.report import figures

    step = np.arange(6)
    table = pd.DataFrame({"step": step, "drift": [0, 1e-300, 1.0, 1e308, np.inf, np.nan],
                          "variable_scaled": [0, 1e-5, 1e307, np.inf, 3.0, 1e308]})
    t = html_report.trace(table, "variable", 2)
    assert t.first == (2, 1e307)
    png = figures.divergence_figure("extremes", {"torch\nfloat64": [figures.Line(t, 0)]},
                                    [("gaussian", 0, "-")], compare.TOLERANCE, 5)
    assert png[:8] == PNG


# --- check.html -----------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    assert cli.main(["check", "--update-baseline", "--baseline", str(root / "baseline"),
                     "--output", str(root / "run"), *SMALL, "--family", "keras",
                     "--optimizer", "adam", "--dtype", "float64",
                     "--scenario", "gaussian,tiny"]) == 0
    return root / "baseline"


def test_check_html_without_changes_has_no_figure(baseline, tmp_path):
    out = tmp_path / "check"
    assert cli.main(["check", "--baseline", str(baseline), "--output", str(out),
                     "--quiet"]) == 0
    p = page(out / "check.html")
    assert p.imgs == [] and len(p.grid) == MODES
    assert not [a for _, a in p.tags if "changed" in a.get("class", "")]
    assert "no change" in "".join(p.text)


def test_check_html_marks_and_draws_the_changed_cell(baseline, tmp_path):
    edited = tmp_path / "baseline"
    shutil.copytree(baseline, edited)
    lines = list(csv.reader(io.StringIO((edited / "cells.csv").read_text())))
    target = next(r for r in lines[1:] if r[4] == "eager" and r[5] == "tiny")
    target[6:10] = ["mismatch", "3", "velocity", "1e-04"]
    with open(edited / "cells.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(lines)
    output.write_marker(edited, "baseline")  # signed: else check refuses the edit (digests)
    out = tmp_path / "check"
    assert cli.main(["check", "--baseline", str(edited), "--output", str(out),
                     "--quiet"]) == 1
    p = self_contained(out / "check.html")
    assert p.cells_drawn() == {"-".join(target[:6])}
    marked = [td["data-cell"] for td in p.grid if "changed" in td["class"]]
    assert marked == ["/".join(target[:5])]
    assert "baseline mismatch at step 3 in velocity" in "".join(p.text)


# --- matrix.html ----------------------------------------------------------------
def _matrix(tmp_path, baseline, edit):
    """Two releases that ran the baseline's run (kept as their runs under work/)."""
    work = tmp_path / "work"
    for v in ("3.1", "3.2"):
        shutil.copytree(baseline.parent / "run", work / "runs" / v / "all")
    doc = json.loads((work / "runs" / "3.1" / "all" / "summary.json").read_text())
    columns = {v: {tuple(c[f] for f in CELL): c
                   for c in map(cell_class, doc["rows"])} for v in ("3.1", "3.2")}
    changed = edit(columns["3.2"])
    cells = [dict(zip(CELL, k)) for k in columns["3.1"]]
    settings = doc["settings"]
    out = tmp_path / "matrix"
    matrix.write_report(out, settings, ["3.1", "3.2"], {"3.1": {"status": "ran"},
                                                          "3.2": {"status": "ran"}},
                        columns, cells, work)
    return self_contained(out / "matrix.html"), changed


def test_matrix_html_without_changes_has_no_figure(baseline, tmp_path):
    p, _ = _matrix(tmp_path, baseline, lambda column: None)
    assert p.imgs == [] and not [td for td in p.grid if "changed" in td["class"]]


def test_matrix_html_draws_a_changed_cell_before_and_after(baseline, tmp_path):
    def edit(column):
        key = next(k for k in column if k[4] == "eager" and k[5] == "gaussian")
        column[key] = {**column[key], "verdict": "mismatch", "first_divergent_step": 2,
                       "divergent_state": "momentum", "magnitude": "1e-03"}
        return "-".join(key)

    p, changed = _matrix(tmp_path, baseline, edit)
    assert p.cells_drawn() == {f"{changed}@3.1", f"{changed}@3.2"}
    assert [td["data-cell"] for td in p.grid if "changed" in td["class"]] == ["keras/adam/3.2"]
