"""A user's own optimizer class checked against the user's rule (`--class`, `--rule`;
verify/user_class.py, reference/user_rule.py), with the examples in
examples/own_optimizer/: the correct AdamLike matches its rule on every backend, dtype
and mode (specificity); DoubleDecayAdam, which decays its weights twice, is a mismatch
at step 1 in the weights on every one of them, exit 1 (sensitivity).  Bad input is one
line, exit 2, nothing written."""

from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, fast_backend, in_process

EXAMPLES = ROOT / "examples" / "own_optimizer"
ADAM_LIKE = f"{EXAMPLES / 'adam_like.py'}:AdamLike"
DOUBLE_DECAY = f"{EXAMPLES / 'double_decay.py'}:DoubleDecayAdam"
RULE = str(EXAMPLES / "adam_rule.py")
SMALL = ["--scenario", "gaussian,tiny", "--steps", "4", "--size", "4", "--quiet",
         "--format", "csv"]
CONFIG = '{"learning_rate": 0.01, "weight_decay": 0.01}'


def rows(out: Path) -> pd.DataFrame:
    got = pd.read_csv(out / "summary.csv")
    assert len(got) and set(got.family) == {"rule"}
    return got


def test_a_correct_class_matches_its_rule_everywhere(tmp_path, backends):
    r = in_process("--class", ADAM_LIKE, "--rule", RULE, "--config", CONFIG, *SMALL,
                   "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    assert set(got.backend) == set(backends) and set(got.dtype) == {"float32", "float64"}
    assert set(got.verdict) <= {"exact", "match"}, got[["backend", "dtype", "mode", "reason"]]
    assert got.optimizer.str.fullmatch(r"adamlike_[0-9a-f]{8}").all()


def test_a_class_that_decays_twice_is_a_mismatch_at_step_1_in_the_weights(tmp_path, backends):
    r = in_process("--class", DOUBLE_DECAY, "--rule", RULE, "--config", CONFIG, *SMALL,
                   "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    got = rows(tmp_path / "out")
    assert set(got.backend) == set(backends)
    assert (got.verdict == "mismatch").all()
    assert (got.first_divergent_step == 1).all() and (got.divergent_state == "variable").all()


def test_the_same_class_without_weight_decay_matches(tmp_path):
    """The defect is the second decay: at weight_decay 0 the class is Adam."""
    r = in_process("--class", DOUBLE_DECAY, "--rule", RULE, "--backend", fast_backend(),
                   *SMALL, "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert set(rows(tmp_path / "out").verdict) <= {"exact", "match"}


NOT_OPTIMIZER = "import keras\n\nclass Plain:\n    pass\n\nclass Layer(keras.layers.Dense):\n    pass\n"
NO_UPDATE = "def step(g):\n    return g\n"


@pytest.mark.parametrize("args,message", [
    (["--class", ADAM_LIKE], "--class needs --rule"),
    (["--class", "nowhere.py:AdamLike", "--rule", RULE], "no such file"),
    (["--class", f"{EXAMPLES / 'adam_like.py'}:Missing", "--rule", RULE], "defines no class Missing"),
    (["--class", "AdamLike", "--rule", RULE], "expected FILE.py:ClassName"),
    (["--class", "no_such_package.module:AdamLike", "--rule", RULE], "no module"),
    (["--class", ADAM_LIKE, "--rule", "missing_rule.py"], "no such rule file"),
    (["--class", ADAM_LIKE, "--rule", RULE, "--config", "[1, 2]"], "one JSON object"),
    (["--class", ADAM_LIKE, "--rule", RULE, "--config", "{nope"], "not JSON"),
    (["--class", ADAM_LIKE, "--rule", RULE, "--config", '{"momentum": 0.9}'],
     "AdamLike(**{\"momentum\": 0.9}) fails"),
    (["--class", "{here}/plain.py:Plain", "--rule", RULE], "not a subclass of keras.optimizers"),
    (["--class", "{here}/plain.py:Layer", "--rule", RULE], "not a subclass of keras.optimizers"),
    (["--class", ADAM_LIKE, "--rule", "{here}/no_update.py"], "defines no function update"),
    (["--family", "rule"], "family"),
], ids=["no-rule", "no-file", "no-class", "no-source", "no-module", "no-rule-file",
        "config-list", "config-not-json", "unknown-argument", "not-an-optimizer",
        "a-layer", "rule-without-update", "rule-family-without-class"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, message):
    (tmp_path / "plain.py").write_text(NOT_OPTIMIZER)
    (tmp_path / "no_update.py").write_text(NO_UPDATE)
    args = [a.replace("{here}", str(tmp_path)) for a in args]
    out = tmp_path / "out"
    r = in_process(*args, "--backend", fast_backend(), *SMALL, "--output", str(out),
                   cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists()
