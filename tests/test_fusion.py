"""Multi-view fusion as pure functions: the two rules, contributions, and the time window."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemesh.runtime.fusion import FusionWindow, fuse, fused_result
from tilemesh.runtime.preprocess import softmax


def p(*xs):
    a = np.array(xs, dtype=np.float64)
    return a / a.sum()


def test_average_and_max_rules():
    views = {"a": p(0.6, 0.3, 0.1), "b": p(0.1, 0.5, 0.4), "c": p(0.2, 0.45, 0.35)}
    np.testing.assert_allclose(fuse(views, "avg"), [0.3, 0.41666667, 0.28333333], atol=1e-8)
    mx = np.array([0.6, 0.5, 0.4]) / 1.5
    np.testing.assert_allclose(fuse(views, "max"), mx)
    # One confident view decides the max rule; the average follows the majority.
    assert int(np.argmax(fuse(views, "max"))) == 0 and int(np.argmax(fuse(views, "avg"))) == 1
    with pytest.raises(ValueError):
        fuse(views, "median")
    with pytest.raises(ValueError):
        fuse({}, "avg")
    with pytest.raises(ValueError):
        fuse({"a": p(1, 1), "b": p(1, 1, 1)})


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10), min_size=4, max_size=4), min_size=1, max_size=5),
       st.sampled_from(["avg", "max"]))
def test_fused_vector_is_a_distribution_and_one_view_is_itself(scores, method):
    views = {f"v{i}": softmax(np.array(s)) for i, s in enumerate(scores)}
    f = fuse(views, method)
    assert f.shape == (4,) and np.all(f >= 0) and f.sum() == pytest.approx(1.0)
    if len(views) == 1:
        np.testing.assert_allclose(f, views["v0"], atol=1e-12)
    # Agreement: when every view ranks the same class first, so does the fusion.
    tops = {int(np.argmax(v)) for v in views.values()}
    if len(tops) == 1:
        assert int(np.argmax(f)) in tops


def test_contributions_name_each_views_share_of_the_fused_label():
    r = fused_result({"phone1": p(0.7, 0.2, 0.1), "phone2": p(0.2, 0.7, 0.1), "phone3": p(0.5, 0.4, 0.1)}, "avg", 2)
    assert r.top[0][0] == 0 and len(r.top) == 2
    assert r.views == pytest.approx({"phone1": 0.7, "phone2": 0.2, "phone3": 0.5})
    assert r.view_top1 == {"phone1": 0, "phone2": 1, "phone3": 0}


def test_window_keeps_each_views_newest_and_forgets_stale_views():
    w = FusionWindow(window_s=1.0)
    w = w.add("a", 10.0, np.array([3.0, 0.0, 0.0]))
    w = w.add("b", 10.2, np.array([0.0, 3.0, 0.0]))
    w = w.add("a", 10.5, np.array([0.0, 0.0, 3.0]))  # a's newer view replaces its older one
    w = w.add("a", 10.1, np.array([9.0, 0.0, 0.0]))  # a late, older result changes nothing
    assert set(w.live(10.6)) == {"a", "b"}
    assert int(np.argmax(w.live(10.6)["a"])) == 2
    assert set(w.live(11.3)) == {"a"}  # b is 1.1 s old
    assert w.result(12.0) is None
    assert set(w.expire(11.3).views) == {"a"}
    r = w.result(10.6, "avg")
    assert r is not None and set(r.views) == {"a", "b"}
    with pytest.raises(ValueError):
        w.add("c", 11.0, np.array([np.inf, 0.0]))
