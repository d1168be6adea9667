"""The worker reports a digest of the gradients it applied, and the runner
checks it against the gradients its comparison uses: an indexing slip in the
harness is a harness error, never read as a Keras mismatch."""

import pytest

from conftest import fast_backend, make_selection
from verify.report.tables import Sink
from verify.runner import Runner


@pytest.mark.parametrize("slip", [False, True], ids=["same-gradients", "reversed-elements"])
def test_a_comparison_with_other_gradients_than_the_worker_applied_is_an_error(tmp_path, slip):
    sel = make_selection([fast_backend()], ["keras"], configurations=["sgd"],
                         dtypes=("float64",), modes=("eager",), names=["gaussian"], steps=3,
                         size=8)
    sink = Sink(tmp_path, [], {"steps": sel.steps}, {})
    runner = Runner(sel, sink)
    if slip:
        runner.all_gradients = {k: v[:, ::-1].copy() for k, v in runner.all_gradients.items()}
    runner.run()
    rows = sink.frame()
    if slip:
        assert list(rows.verdict) == ["error"]
        assert "applied other gradients at steps 1..3" in rows.reason[0]
    else:
        assert list(rows.verdict) == ["exact"] or list(rows.verdict) == ["match"]
