"""A float64 result computed in float32 is refused, not reported."""


from conftest import make_selection, needs, run_selection


def test_jax_without_x64_float64_is_an_error(backends, tmp_path):
    needs("jax")
    sel = make_selection(["jax"], ["keras"], configurations=["sgd"], dtypes=["float64"],
                         modes=["eager"], names=["gaussian"], steps=3, size=4, jax_x64=False)
    df = run_selection(sel, tmp_path)
    assert (df.verdict == "error").all()
    assert df.reason.str.contains("float32").all()


def test_jax_with_x64_float64_runs(backends, tmp_path):
    needs("jax")
    sel = make_selection(["jax"], ["keras"], configurations=["sgd"], dtypes=["float64"],
                         modes=["eager"], names=["gaussian"], steps=3, size=4)
    df = run_selection(sel, tmp_path)
    assert df.verdict.isin(["exact", "match"]).all()
