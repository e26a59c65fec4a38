"""A model that cannot load is not ready, not gone; a router with fallback shares out a missing variant's weight."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest
from conftest import in_registry
from mlserver.settings import ModelParameters, ModelSettings
from prometheus_client import REGISTRY

from runtimes.artifacts import ModelLoadError
from runtimes.registry_sklearn import RegistrySKLearnRuntime
from runtimes.router import BUCKETS, RouterRuntime


@pytest.fixture(scope="module")
def iris_uris(trained) -> list[str]:
    """Artifact locations of iris versions 1 and 2 (one registry call: each starts a process)."""
    return in_registry(trained, "print(*(client.get_model_version_download_uri('iris', v) for v in '12'))").split()


def runtime(name: str, uri: str) -> RegistrySKLearnRuntime:
    return RegistrySKLearnRuntime(ModelSettings(name=name, implementation=RegistrySKLearnRuntime, parameters=ModelParameters(uri=uri)))


def test_failed_first_load_is_not_ready_and_failed_reload_keeps_the_loaded_one(iris_uris, tmp_path, caplog):
    missing = str(tmp_path / "missing")
    first = runtime("first-load", missing)
    with caplog.at_level(logging.ERROR, logger="mlserver.runtimes"):
        assert asyncio.run(first.load()) is False
    assert asyncio.run(first.is_ready()) is False
    assert f"model 'first-load' failed to load and stays not ready: model artifact not found at {missing}" in caplog.text
    assert REGISTRY.get_sample_value("mlops_model_ready", {"model": "first-load"}) == 0

    good = runtime("reloaded", iris_uris[0])
    assert asyncio.run(good.load()) is True and asyncio.run(good.is_ready()) is True
    # MLServer loads the new instance before unloading the old: a failure must raise, so it keeps the old one.
    with pytest.raises(ModelLoadError, match="model artifact not found"):
        asyncio.run(runtime("reloaded", missing).load())
    asyncio.run(good.unload())


def test_fallback_shares_out_a_missing_variants_weight_in_proportion(iris_uris, tmp_path):
    variants = [
        {"name": "a", "shadow": False, "uri": iris_uris[0], "version": "1", "weight": 50},
        {"name": "b", "shadow": False, "uri": iris_uris[1], "version": "2", "weight": 30},
        {"name": "gone", "shadow": False, "uri": str(tmp_path / "missing"), "version": "3", "weight": 20},
    ]
    settings = lambda name, **extra: ModelSettings(  # noqa: E731
        name=name, implementation=RouterRuntime, parameters=ModelParameters(extra={"variants": variants, **extra})
    )
    strict = RouterRuntime(settings("strict"))
    assert asyncio.run(strict.load()) is False, "without fallback a missing live variant leaves the router not ready"

    r = RouterRuntime(settings("shared", fallback=True))
    assert asyncio.run(r.load()) is True
    assert [(upper, v.name) for upper, v in r._table] == [(BUCKETS * 50 // 80, "a"), (BUCKETS, "b")]
    weight = lambda v: REGISTRY.get_sample_value("mlops_router_variant_weight", {"model": "shared", "variant": v})  # noqa: E731
    available = lambda v: REGISTRY.get_sample_value("mlops_router_variant_available", {"model": "shared", "variant": v})  # noqa: E731
    assert (weight("a"), weight("b"), weight("gone")) == (62.5, 37.5, 0)
    assert (available("a"), available("b"), available("gone")) == (1, 1, 0)
    chosen = Counter(r.choose(f"key-{i}").name for i in range(20_000))
    assert set(chosen) == {"a", "b"} and abs(chosen["a"] / 20_000 - 0.625) < 0.02
