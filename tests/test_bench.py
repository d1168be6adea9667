"""`verify-optimizers bench`: the floor and the harness measured side by side, and
the harness's CPU attributed to the part that spends it."""

import json
import statistics
import threading
import time

import pytest

from verify import cli, runner
from verify.commands import bench
from verify.compare import RunComparison
from conftest import fast_backend, make_selection


SMALL = ["--backend", fast_backend(), "--optimizer", "sgd,adam", "--dtype", "float32",
         "--scenario", "gaussian,tiny", "--steps", "40", "--size", "16"]


def test_bench_writes_floor_harness_ratio_and_parts(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["bench", *SMALL, "--repeat", "2", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "bench.json").read_text())
    result = doc["result"]
    assert result["repeats"] == 2 and len(doc["pairs"]) == 2
    for side in ("floor", "harness"):
        assert result[side]["wall"] > 0 and result[side]["cpu"] > 0
    for f, h in doc["pairs"]:
        # the harness does the floor's Keras work and more
        assert h["parts"]["Keras steps"] > 0 and f["keras_steps"] > 0
        assert abs(sum(h["parts"].values()) - h["cpu"]) <= 0.25 * h["cpu"]
    for side in ("wall", "cpu"):  # the median of the per-pair ratios, as bench.md says
        ratios = [h[side] / f[side] for f, h in doc["pairs"]]
        assert result["ratio"][side] == pytest.approx(statistics.median(ratios))
    text = (out / "bench.md").read_text()
    assert "ratio harness / floor" in text and "reference and diff" in text


class ThreadClock:
    """verify.runner's `time` with a fake `thread_time`: each thread's clock stands
    still until the test advances it."""

    def __init__(self):
        self.seconds = {}

    def advance(self, seconds):
        me = threading.get_ident()
        self.seconds[me] = self.seconds.get(me, 0.0) + seconds

    def thread_time(self):
        return self.seconds.get(threading.get_ident(), 0.0)

    def __getattr__(self, name):
        return getattr(time, name)


def test_diff_time_is_attributed_to_the_diff(monkeypatch):
    """Each feed of a comparison costs 0.25 s on its thread's (fake) clock, and
    nothing else does: "reference and diff" is exactly that, and receiving the
    workers' messages none of it."""
    clock, feeds = ThreadClock(), []
    feed = RunComparison.feed

    def costly_feed(self, *args):
        clock.advance(0.25)
        feeds.append(threading.get_ident())
        return feed(self, *args)

    monkeypatch.setattr(runner, "time", clock)
    monkeypatch.setattr(RunComparison, "feed", costly_feed)
    sel = make_selection([fast_backend()], ["keras", "article"], configurations=["sgd"],
                         dtypes=["float32"], modes=["eager"], names=["gaussian"], steps=200,
                         size=8)
    parts = bench.measure_harness(sel, ["json"])["parts"]
    assert len(feeds) >= 2  # both families, every chunk
    assert threading.get_ident() not in feeds  # on the diff's threads
    assert parts["reference and diff"] == pytest.approx(0.25 * len(feeds))
    assert parts["receiving states"] == 0.0


def test_what_keras_refuses_does_not_stop_the_floor(tmp_path, capsys):
    """A configuration Keras raises on is an error cell in the harness's run; the
    floor skips it the same way instead of failing (Muon on TensorFlow float64)."""
    refused = json.dumps({"class_name": "SGD", "id": "two_clips",
                          "config": {"clipnorm": 1.0, "clipvalue": 0.5}})
    small = ["sgd" if a == "sgd,adam" else a for a in SMALL]
    out = tmp_path / "bench"
    code = cli.main(["bench", *small, "--config", refused, "--repeat", "1",
                     "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "bench.json").read_text())["result"]["repeats"] == 1
