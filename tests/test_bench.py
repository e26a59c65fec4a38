"""`mlops bench` end to end at its smallest: every system answers under wrk and h2load, results are written.

The figures themselves are not checked here: timing targets are read from a full
run of the benchmark, never asserted in a test.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import MLOPS, mlops

from bench.run import SOAK_ERRORS, SOAK_MEMORY, SOAK_THROUGHPUT


def test_bench_measures_every_system_and_writes_its_report(tmp_path):
    out = tmp_path / "results"
    proc = mlops(tmp_path, "bench", "--rounds", "1", "--seconds", "1", "--connections", "2", "--no-scale", "--no-sweep",
                 "--soak-seconds", "2", "--out", str(out), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == {
        "routed-rest",
        "routed-grpc",
        "routed-grpc-one",
        "direct-rest",
        "stock-mlflow",
        "stock-mlflow-tuned",
        "monolith",
        "columns-direct",
        "columns-stock",
    }
    for key, by_conns in results["load"].items():
        run = by_conns["2"]
        assert run["requests"] > 0 and run["rps"] > 0, key
        assert run["errors"] == 0, key
        assert 0 < run["p50_ms"] <= run["p99_ms"], key
    assert results["failed_requests"] == {**{key: 0 for key in results["systems"]}, "soak": 0}
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "routed REST p99 at 8 connections" not in results["targets"]  # no 8-connection run, no verdict on it

    soak = results["soak"]  # two slices of a second: the row's plumbing, not its figures
    assert (soak["system"], soak["connections"], soak["seconds"], len(soak["slices"])) == ("routed-rest", 8, 2, 2)
    assert all(s["requests"] > 0 and s["rps"] > 0 and s["errors"] == 0 and s["rss_mb"] > 0 for s in soak["slices"])
    assert (soak["rps_first"], soak["rps_last"], soak["rss_mb_end"]) == (soak["slices"][0]["rps"], soak["slices"][-1]["rps"], soak["slices"][-1]["rss_mb"])
    assert soak["rss_mb_start"] > 0 and len(soak["load_average_at_start"]) == 3
    assert soak["requests"] > sum(s["requests"] for s in soak["slices"])  # the warm-up's count too
    assert {SOAK_MEMORY, SOAK_THROUGHPUT, SOAK_ERRORS} <= set(results["targets"])
    assert results["targets"][SOAK_ERRORS] == {"value": 0, "target": "== 0", "met": True}

    rows = (out / "table.md").read_text().splitlines()
    assert len(rows) == 2 + len(results["systems"]) + 1 + 5  # the load table, a blank line, the soak's
    assert rows[-5].startswith(f"| soak: {results['systems']['routed-rest']}, 8 conn., 2 s (2 x 1 s) |")
    assert rows[-1] == f"| failed requests | | 0 of {soak['requests']:,} | | yes (== 0) |"


def test_bench_names_the_missing_load_generator(tmp_path):
    env = {"PATH": str(Path(MLOPS).parent)}  # the venv only: neither wrk nor h2load
    proc = mlops(tmp_path, "bench", "--no-scale", env=env)
    assert proc.returncode == 1
    assert "wrk, h2load not found" in proc.stderr and "apt-get install wrk nghttp2-client" in proc.stderr
