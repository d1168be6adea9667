"""`verify-optimizers bench`: the floor and the harness measured side by side, and
the harness's CPU attributed to the part that spends it."""

import json
import time

from verify import bench, cli
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
    ratios = sorted(h["wall"] / f["wall"] for f, h in doc["pairs"])
    assert ratios[0] <= result["ratio"]["wall"] <= ratios[-1]
    text = (out / "bench.md").read_text()
    assert "ratio harness / floor" in text and "reference and diff" in text


def test_diff_time_is_attributed_to_the_diff(tmp_path, monkeypatch):
    burned = []
    feed = RunComparison.feed

    def slow_feed(self, *args):
        start = time.thread_time()
        while time.thread_time() - start < 0.02:  # CPU, not sleep
            pass
        burned.append(time.thread_time() - start)
        return feed(self, *args)

    sel = make_selection([fast_backend()], ["keras"], configurations=["sgd"],
                         dtypes=["float32"], modes=["eager"], names=["gaussian"], steps=200,
                         size=8)
    plain = bench.measure_harness(sel, ["json"])
    monkeypatch.setattr(RunComparison, "feed", slow_feed)
    slow = bench.measure_harness(sel, ["json"])
    assert sum(burned) > 0.05
    assert slow["parts"]["reference and diff"] >= 0.9 * sum(burned)
    assert slow["parts"]["reference and diff"] - plain["parts"]["reference and diff"] >= \
        0.8 * sum(burned)
