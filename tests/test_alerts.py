"""The generated PrometheusRule under promtool, and the generated files kept in step with the code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, mlops, new_project, tree_bytes

from mlops.render import dashboards

ALERT_TESTS = Path(__file__).parent / "alerts"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH; it comes with Prometheus: `apt-get install prometheus`")
    return path


def rules_dir(tmp_path: Path) -> Path:
    """The PrometheusRule's spec as a plain rules file (what promtool reads), beside the unit tests."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(dashboards.prometheus_rule()["spec"], sort_keys=False))
    for test in ALERT_TESTS.glob("*.yaml"):
        shutil.copy(test, tmp_path / test.name)
    return tmp_path


def test_rules_pass_promtool_check(tmp_path):
    proc = subprocess.run([promtool(), "check", "rules", str(rules_dir(tmp_path) / "rules.yaml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_pass(tmp_path):
    d = rules_dir(tmp_path)
    tests = sorted(p.name for p in ALERT_TESTS.glob("*.yaml"))
    proc = subprocess.run([promtool(), "test", "rules", *tests], cwd=d, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases: dict[str, list] = {}
    for path in ALERT_TESTS.glob("*.yaml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append(bool(case.get("exp_alerts")))
    for rule in dashboards.alert_rules():
        assert {True, False} <= set(cases.get(rule["alert"], [])), f"{rule['alert']} needs a firing and a not-firing case in tests/alerts/"
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}


def test_generated_files_are_up_to_date():
    proc = mlops(REPO, "dashboards", "--check")
    assert proc.returncode == 0, f"run `mlops dashboards`:\n{proc.stdout}{proc.stderr}"


def test_check_reports_a_stale_file_with_a_diff(tmp_path):
    root = tmp_path / "project"
    shutil.copytree(REPO / "clusters", root / "clusters")
    (root / "deployments.yaml").write_text((REPO / "deployments.yaml").read_text())
    rules = root / dashboards.RULES_FILE
    rules.write_text(rules.read_text().replace("> 0.05", "> 0.5"))
    proc = mlops(root, "dashboards", "--check")
    assert proc.returncode == 1 and "prometheus-rules.yaml out of date" in proc.stderr
    assert "-      expr:" in proc.stdout and "> 0.5" in proc.stdout
    assert mlops(root, "dashboards").returncode == 0
    assert rules.read_text() == (REPO / dashboards.RULES_FILE).read_text()


def test_output_is_deterministic(tmp_path):
    """`mlops dashboards` writes the same bytes from processes with other hash seeds in other folders, as on
    a laptop and then in CI's `--check`; this process's render (a third seed) agrees."""
    written = []
    for seed, folder in (("1", "a"), ("2", "b/c")):
        root = new_project(tmp_path / folder)
        mlops(root, "dashboards", env={"PYTHONHASHSEED": seed}, check=True)
        written.append(tree_bytes(root / dashboards.MONITORING))
    here = {p.relative_to(dashboards.MONITORING).as_posix(): text.encode() for p, text in dashboards.render().items()}
    assert written == [here, here], [rel for rel in sorted(here) if not written[0].get(rel) == written[1].get(rel) == here[rel]]
    uids = [dashboards.DASHBOARDS[n]()["uid"] for n in dashboards.DASHBOARDS]
    assert len(set(uids)) == len(uids) and all(u.startswith("mlops-") for u in uids)
