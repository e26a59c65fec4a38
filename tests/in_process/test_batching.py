"""The coalescer stacks concurrent predictions into one estimator call and splits the answers back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from runtimes.batching import Coalescer


class Counting:
    """An estimator that counts its calls and refuses negative features."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def predict(self, X):
        self.calls.append(len(X))
        if (X < 0).any():
            raise ValueError("negative feature")
        return self.model.predict(X)

    def predict_proba(self, X):
        self.calls.append(len(X))
        return self.model.predict_proba(X)


@pytest.fixture(scope="module")
def iris():
    data = load_iris()
    X, y = data.data, data.target
    return X, LogisticRegression(max_iter=500).fit(X, y)


def run(coalescer, requests):
    async def main():
        return await asyncio.gather(*(coalescer.predict(m, x) for m, x in requests), return_exceptions=True)

    return asyncio.run(main())


def test_concurrent_requests_share_one_call_and_get_their_own_rows(iris):
    X, model = iris
    est = Counting(model)
    chunks = [X[i : i + n] for i, n in ((0, 1), (50, 3), (100, 2), (7, 1))]
    answers = run(Coalescer(est), [(("predict",), c) for c in chunks])
    assert est.calls == [7]  # one call for all seven rows
    for chunk, (labels,) in zip(chunks, answers, strict=True):
        np.testing.assert_array_equal(labels, model.predict(chunk))


def test_requests_arriving_a_loop_turn_apart_share_one_call(iris):
    """As over HTTP: requests sent together reach the server over more than one poll of the network."""
    X, model = iris
    est = Counting(model)

    async def main():
        c = Coalescer(est)
        first = asyncio.ensure_future(c.predict(("predict",), X[:1]))
        await asyncio.sleep(0)  # one loop turn: the first request reaches the model
        later = [asyncio.ensure_future(c.predict(("predict",), X[i : i + 1])) for i in range(1, 8)]
        return await asyncio.gather(first, *later)

    answers = asyncio.run(main())
    assert est.calls == [8]
    assert [a[0][0] for a in answers] == list(model.predict(X[:8]))


def test_requests_for_different_outputs_are_stacked_separately(iris):
    X, model = iris
    est = Counting(model)
    answers = run(Coalescer(est), [(("predict",), X[:2]), (("predict_proba",), X[50:51]), (("predict", "predict_proba"), X[100:103])])
    assert sorted(est.calls) == [1, 2, 3, 3]
    np.testing.assert_array_equal(answers[0][0], model.predict(X[:2]))
    np.testing.assert_allclose(answers[1][0], model.predict_proba(X[50:51]))
    np.testing.assert_array_equal(answers[2][0], model.predict(X[100:103]))
    np.testing.assert_allclose(answers[2][1], model.predict_proba(X[100:103]))


def test_a_failing_request_fails_alone(iris):
    X, model = iris
    bad = -np.ones((1, 4))
    answers = run(Coalescer(Counting(model)), [(("predict",), X[:1]), (("predict",), bad), (("predict",), X[60:62])])
    assert isinstance(answers[1], ValueError) and "negative feature" in str(answers[1])
    np.testing.assert_array_equal(answers[0][0], model.predict(X[:1]))
    np.testing.assert_array_equal(answers[2][0], model.predict(X[60:62]))


def test_a_lone_request_is_answered_without_waiting_for_company(iris):
    X, model = iris
    est = Counting(model)

    async def main():
        c = Coalescer(est)
        return [await c.predict(("predict",), X[i : i + 1]) for i in range(3)]  # one after another

    answers = asyncio.run(main())
    assert est.calls == [1, 1, 1]
    assert [a[0][0] for a in answers] == list(model.predict(X[:3]))


def test_column_requests_are_stacked_into_one_data_frame():
    """A DataFrame model (clinic example): per-column arrays are stacked, then one DataFrame per call."""
    from runtimes.signature import Column, ColumnDecoder
    from training.clinic_job import build_pipeline, load_frame

    X, y = load_frame()
    model = build_pipeline().fit(X, y)
    decoder = ColumnDecoder([Column(c, "string" if c == "clinic" else "double") for c in X.columns], 1000)
    frames = []

    class Recording:
        def predict(self, frame):
            frames.append(len(frame))
            return model.predict(frame)

    chunks = [X.iloc[i : i + n] for i, n in ((0, 2), (100, 1), (300, 3))]
    requests = [(("predict",), {c: chunk[c].to_numpy() for c in chunk.columns}) for chunk in chunks]
    answers = run(Coalescer(Recording(), prepare=decoder.frame), requests)
    assert frames == [6]
    for chunk, answer in zip(chunks, answers, strict=True):
        assert answer[0].tolist() == model.predict(chunk).tolist()


def test_each_call_is_counted_with_its_requests_and_wait(iris):
    """The coalescing's own metrics (the dashboards' Coalescing row): one observation per estimator call."""
    from prometheus_client import REGISTRY

    X, model = iris

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "counted"}) or 0.0

    before = {n: sample(n) for n in ("mlops_batch_requests_count", "mlops_batch_requests_sum", "mlops_batch_wait_seconds_count")}
    est = Counting(model)
    run(Coalescer(est, name="counted"), [(("predict",), X[i : i + 1]) for i in range(5)] + [(("predict_proba",), X[:2])])
    assert est.calls == [5, 2]
    assert sample("mlops_batch_requests_count") - before["mlops_batch_requests_count"] == 2  # two calls
    assert sample("mlops_batch_requests_sum") - before["mlops_batch_requests_sum"] == 6  # of 5 and 1 requests
    assert sample("mlops_batch_wait_seconds_count") - before["mlops_batch_wait_seconds_count"] == 2
    assert 0 < sample("mlops_batch_wait_seconds_sum") < 1
