"""`mlops bench` end to end at its smallest: every system answers under wrk and h2load, results are written.

The figures themselves are not checked here: timing targets are read from a full
run of the benchmark, never asserted in a test.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import MLOPS, mlops


def test_bench_measures_every_system_and_writes_its_report(tmp_path):
    out = tmp_path / "results"
    proc = mlops(tmp_path, "bench", "--rounds", "1", "--seconds", "1", "--connections", "2", "--no-scale", "--no-sweep", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == {"routed-rest", "routed-grpc", "direct-rest", "stock-mlflow", "stock-mlflow-tuned", "monolith", "columns-direct", "columns-stock"}
    for key, by_conns in results["load"].items():
        run = by_conns["2"]
        assert run["requests"] > 0 and run["rps"] > 0, key
        assert run["errors"] == 0, key
        assert 0 < run["p50_ms"] <= run["p99_ms"], key
    assert results["failed_requests"] == {key: 0 for key in results["systems"]}
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "table.md").read_text().splitlines()
    assert len(rows) == 2 + len(results["systems"])
    assert "routed REST p99 at 8 connections" not in results["targets"]  # no 8-connection run, no verdict on it


def test_bench_names_the_missing_load_generator(tmp_path):
    env = {"PATH": str(Path(MLOPS).parent)}  # the venv only: neither wrk nor h2load
    proc = mlops(tmp_path, "bench", "--no-scale", env=env)
    assert proc.returncode == 1
    assert "wrk, h2load not found" in proc.stderr and "apt-get install wrk nghttp2-client" in proc.stderr
