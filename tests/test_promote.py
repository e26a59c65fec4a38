"""`mlops promote` end to end: a served project, a real Prometheus scraping it, live traffic and feedback.

One server serves three experiments at once: iris, whose challenger is truly better (it steps, then
promotes); diabetes, whose variants score the same (hold); and wine, whose challenger is a version that
fails on every request (its error guardrail rolls it back). Each decision must change only the weights,
and the aliases on promote, and the generated files only where those land.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import Server, free_port, in_registry, mlops

from mlops.domain.spec import load_spec
from mlops.rollout.promote import Guardrail, decide
from mlops.rollout.sequential import Arm
from mlops.supervise.prometheus import Prometheus, scrape_job
from runtimes import contract as c

WINE_AB = "  wine:\n    variants:\n      champion:   {alias: champion, weight: 50}\n      challenger: {alias: challenger, weight: 50}\n"
WINE_ROLLOUT = "    rollout: {metric: accuracy, guardrails: {min_requests: 20, window: 5m}}\n"
GIT = {"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com", "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com"}


def git(project, *args) -> str:
    return subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True, text=True, env={**os.environ, **GIT}).stdout


def break_wine_challenger(project) -> str:
    """Register a wine version that loads but raises on every prediction (a corrupted fit), aliased challenger."""
    return in_registry(
        project,
        "import mlflow, mlflow.sklearn, numpy as np\n"
        "from mlflow.models import infer_signature\n"
        "from sklearn.datasets import load_wine\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "mlflow.set_tracking_uri(client.tracking_uri)\n"
        "X, y = load_wine(return_X_y=True); m = LogisticRegression(max_iter=5000).fit(X, y)\n"
        "signature = infer_signature(X[:5], m.predict(X[:5]))\n"
        "m.coef_ = np.zeros((3, 14))  # n_features_in_ still 13: input checks pass, the product fails\n"
        f"exp = client.create_experiment('wine-broken', artifact_location={(project / '.mlops' / 'broken').as_uri()!r})\n"
        "with mlflow.start_run(experiment_id=exp):\n"
        "    info = mlflow.sklearn.log_model(m, name='model', signature=signature, registered_model_name='wine', serialization_format='skops')\n"
        "client.set_registered_model_alias('wine', 'challenger', info.registered_model_version)\n"
        "print(info.registered_model_version)",
    ).splitlines()[-1]


@pytest.fixture(scope="module")
def ab(trained, tmp_path_factory):
    """The project under git, served, scraped every second by Prometheus, with the traffic and feedback sent."""
    project = tmp_path_factory.mktemp("ab") / "project"
    shutil.copytree(trained, project, symlinks=True)
    spec = project / "deployments.yaml"
    text = spec.read_text()
    wine = re.search(r"  wine:\n(    .*\n)+", text).group(0)
    spec.write_text(text.replace(wine, WINE_AB + WINE_ROLLOUT))
    break_wine_challenger(project)
    mlops(project, "sync", check=True, env={"MLOPS_PROJECT_DIR": str(project)})
    (project / ".gitignore").write_text(".mlops/\nmlserver.log\n")
    git(project, "init", "--quiet")
    git(project, "add", ".")
    git(project, "commit", "--quiet", "-m", "the experiment")

    srv = Server(project)
    prom = Prometheus(project.parent / "prometheus", free_port(), [scrape_job("mlserver", [f"127.0.0.1:{srv.metrics}"])], interval="1s")
    try:
        srv.wait_ready_models(["iris", "diabetes", "wine"])
        prom.wait_ready()
        # Prometheus sees the feedback series at 0 before any outcome arrives (the runtimes publish them at load).
        srv.wait_until(lambda: len(prom.query(f'{c.FEEDBACK}_total{{model="iris"}}')["data"]["result"]) == 4, 60, "no feedback series scraped")
        send_traffic(srv)
        send_feedback(srv)
        srv.wait_until(lambda: scraped(prom, f'sum({c.FEEDBACK}_total{{model="iris"}})') == 600, 60, "feedback not scraped")
        srv.wait_until(lambda: scraped(prom, f'sum({c.ROUTER_REQUESTS}_total{{model="wine", outcome="error"}})') >= 20, 60, "errors not scraped")
        yield project, prom
    finally:
        prom.stop()
        srv.stop()


def scraped(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)["data"]["result"]
    return float(result[0]["value"][1]) if result else -1.0


def send_traffic(srv: Server) -> None:
    """200 requests each to iris and wine; wine's challenger fails every one it gets."""
    client = httpclient.InferenceServerClient(srv.url)
    for model, features in (("iris", 4), ("wine", 13)):
        for i in range(200):
            inp = httpclient.InferInput("input-0", [1, features], "FP64")
            inp.set_data_from_numpy(np.full((1, features), 1.0 + i % 7))
            try:
                client.infer(model, [inp])
            except Exception as exc:  # noqa: BLE001 - the broken challenger's 500s are the point
                assert "500" in str(exc) or "Internal" in str(exc) or "matmul" in str(exc), exc


def post_feedback(srv: Server, model: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://{srv.url}/v2/models/{model}/feedback", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def send_feedback(srv: Server) -> None:
    """iris: the challenger right 291 of 300 times, the champion 255; diabetes: identical errors for both."""
    truth = [i % 3 for i in range(300)]
    for variant, wrong in (("champion", 45), ("challenger", 9)):
        prediction = [(t + 1) % 3 if i < wrong else t for i, t in enumerate(truth)]
        assert post_feedback(srv, "iris", {"variant": variant, "prediction": prediction, "truth": truth}) == {"recorded": 300}
    rng = np.random.default_rng(7)
    actual = rng.uniform(25, 350, 300).round(1).tolist()
    predicted = (np.asarray(actual) + rng.normal(0, 50, 300)).round(1).tolist()
    for variant in ("champion", "challenger"):
        assert post_feedback(srv, "diabetes", {"variant": variant, "prediction": predicted, "truth": actual}) == {"recorded": 300}


def promote(project, prom, *args) -> subprocess.CompletedProcess:
    return mlops(project, "promote", *args, "--prometheus", prom.url, env={"MLOPS_PROJECT_DIR": str(project), **GIT})


def changed_lines(project) -> dict[str, list[str]]:
    """Lines changed since the last commit, per file: what a reviewer of the diff sees."""
    out: dict[str, list[str]] = {}
    for path in git(project, "diff", "--name-only").split():
        old = git(project, "show", f"HEAD:{path}").splitlines()
        new = (project / path).read_text().splitlines()
        out[path] = [line for line in difflib.unified_diff(old, new, lineterm="", n=0) if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return out


def test_a_better_challenger_steps_then_promotes(ab):
    project, prom = ab
    dry = promote(project, prom, "iris", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.splitlines()[0] == "decision: step", dry.stdout + dry.stderr
    assert "verdict better" in dry.stdout and "dry run: nothing written" in dry.stdout
    assert "champion: 300 outcomes, accuracy 0.8500" in dry.stdout and "challenger: 300 outcomes, accuracy 0.9700" in dry.stdout
    assert changed_lines(project) == {}

    step = promote(project, prom, "iris")
    assert step.returncode == 0 and step.stdout.splitlines()[0] == "decision: step", step.stdout + step.stderr
    changed = changed_lines(project)
    assert changed["deployments.yaml"] == [
        "-      champion:   {alias: champion, weight: 80}",
        "-      challenger: {alias: challenger, weight: 20}",
        "+      champion:   {alias: champion, weight: 70}",
        "+      challenger: {alias: challenger, weight: 30}",
    ]
    # prod keeps its own override (90/10): its overlay does not change
    overlays = [f"seldon/overlays/{env}/{name}.yaml" for env in ("dev", "stage") for name in ("iris", "variant-weights")]
    assert sorted(changed) == ["deployments.yaml", "model-settings/iris/model-settings.json", *overlays], changed
    for path, lines in changed.items():  # generated files change only where iris's weights land
        assert all(re.search(r"weight|traffic", line) for line in lines), (path, lines)
        assert all("model: iris" in line for line in lines if "variant-weights" in path), (path, lines)
    git(project, "commit", "--quiet", "-am", "step")

    # At max_weight a better challenger is promoted: the champion alias moves to its version.
    spec = project / "deployments.yaml"
    spec.write_text(spec.read_text().replace("weight: 70}", "weight: 50}").replace("weight: 30}", "weight: 50}"))
    git(project, "commit", "--quiet", "-am", "at max_weight")
    challenger_version = in_registry(project, "print(client.get_model_version_by_alias('iris', 'challenger').version)").splitlines()[-1]
    done = promote(project, prom, "iris", "--commit")
    assert done.returncode == 0 and done.stdout.splitlines()[0] == "decision: promote", done.stdout + done.stderr
    assert in_registry(project, "print(client.get_model_version_by_alias('iris', 'champion').version)").splitlines()[-1] == challenger_version
    assert git(project, "status", "--porcelain") == "", "--commit leaves nothing uncommitted"
    message = git(project, "log", "-1", "--format=%B")
    assert message.startswith("promote iris: promote") and "decision: promote" in message and "verdict better" in message
    model = load_spec(spec).models["iris"]
    assert model.weights() == {"champion": 100, "challenger": 0} and model.weights("prod") == {"champion": 100, "challenger": 0}
    settings = json.loads((project / "model-settings/iris/model-settings.json").read_text())
    assert {v["name"]: v["version"] for v in settings["parameters"]["extra"]["variants"]}["champion"] == challenger_version


def test_equal_variants_hold_and_change_nothing(ab):
    project, prom = ab
    before = git(project, "rev-parse", "HEAD")
    held = promote(project, prom, "diabetes")
    assert held.returncode == 0 and held.stdout.splitlines()[0] == "decision: hold", held.stdout + held.stderr
    assert "no significant difference" in held.stdout and "difference (challenger - champion): +0.0000" in held.stdout
    assert changed_lines(project) == {} and git(project, "rev-parse", "HEAD") == before


def test_a_challenger_that_fails_is_rolled_back_by_its_guardrail(ab):
    project, prom = ab
    rolled = promote(project, prom, "wine")
    assert rolled.returncode == 0 and rolled.stdout.splitlines()[0] == "decision: rollback", rolled.stdout + rolled.stderr
    assert "guardrail breached: error ratio" in rolled.stdout
    assert load_spec(project / "deployments.yaml").models["wine"].weights() == {"champion": 100, "challenger": 0}
    git(project, "checkout", "--quiet", "--", ".")


@pytest.mark.parametrize(
    ("args", "spec_change", "message"),
    [
        (("iris", "--prometheus", "http://127.0.0.1:9"), None, "cannot reach Prometheus at http://127.0.0.1:9"),
        (("nope",), None, "deployments.yaml has no model 'nope'"),
        (("iris", "--env", "qa"), None, "no environment 'qa' in deployments.yaml"),
        (("iris",), ("alpha: 0.05, step_weight: 10", "alpha: 0.5, step_weight: 10"), "models.iris.rollout.alpha"),
        (("iris",), ("max_weight: 50}", "max_weight: 5}"), "models.iris.rollout.max_weight: must be at least step_weight"),
    ],
    ids=["prometheus unreachable", "unknown model", "unknown environment", "alpha out of range", "max below step"],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(ab, args, spec_change, message):
    project, prom = ab
    spec = project / "deployments.yaml"
    original = spec.read_text()
    if spec_change:
        spec.write_text(original.replace(*spec_change))
    try:
        extra = () if "--prometheus" in args else ("--prometheus", prom.url)
        proc = mlops(project, "promote", *args, *extra, env={"MLOPS_PROJECT_DIR": str(project)})
        assert proc.returncode == 1 and message in proc.stderr, proc.stdout + proc.stderr
        assert spec.read_text() == (original.replace(*spec_change) if spec_change else original)
    finally:
        spec.write_text(original)
    assert changed_lines(project) == {}


POLICY = load_spec(Path(__file__).parents[1] / "deployments.yaml").models["iris"].rollout
QUIET = [Guardrail("error ratio", 0.0, 0.05, "ratio")]


@pytest.mark.parametrize(
    ("weights", "champion", "challenger", "guardrails", "action", "after"),
    [
        ({"champion": 80, "challenger": 20}, (400, 340), (400, 390), QUIET, "step", {"champion": 70, "challenger": 30}),
        ({"champion": 55, "challenger": 45}, (400, 340), (400, 390), QUIET, "step", {"champion": 50, "challenger": 50}),
        ({"champion": 50, "challenger": 50}, (400, 340), (400, 390), QUIET, "promote", {"champion": 100, "challenger": 0}),
        ({"champion": 80, "challenger": 20}, (400, 360), (400, 361), QUIET, "hold", {"champion": 80, "challenger": 20}),
        ({"champion": 80, "challenger": 20}, (400, 390), (400, 330), QUIET, "rollback", {"champion": 100, "challenger": 0}),
        ({"champion": 80, "challenger": 20}, (100, 85), (100, 100), QUIET, "hold", {"champion": 80, "challenger": 20}),
        ({"champion": 80, "challenger": 20}, (400, 340), (400, 390), [Guardrail("error ratio", 0.2, 0.05, "ratio")], "rollback", {"champion": 100, "challenger": 0}),
        ({"champion": 80, "challenger": 20}, (400, 340), (400, 390), [Guardrail("error ratio", None, 0.05, "ratio")], "step", {"champion": 70, "challenger": 30}),
        ({"champion": 100, "challenger": 0}, (400, 340), (400, 390), QUIET, "hold", {"champion": 100, "challenger": 0}),
    ],
    ids=["better steps", "step stops at max", "better at max promotes", "equal holds", "worse rolls back", "too few holds",
         "breached guardrail", "guardrail not judged", "no traffic holds"],
)  # fmt: skip
def test_decisions(weights, champion, challenger, guardrails, action, after):
    d = decide(POLICY, weights, Arm.classifier(*champion), Arm.classifier(*challenger), guardrails)
    assert (d.action, d.new_weights) == (action, after), d.reason


def test_ab_report_shows_each_variant_and_draws_the_chart(ab, tmp_path):
    project, prom = ab
    png = tmp_path / "iris.png"
    proc = mlops(project, "ab-report", "iris", "--prometheus", prom.url, "--chart", str(png), "--since", "10m", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {cells[0]: cells for line in proc.stdout.splitlines() if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 8}
    for variant, accuracy in (("champion (champion)", 0.85), ("challenger (challenger)", 0.97)):
        outcomes, quality = rows[variant][6], rows[variant][7]
        assert float(outcomes) == 300 and float(quality.split()[0]) == accuracy, proc.stdout  # exact: read at the last scrape
        assert float(rows[variant][3]) > 0 and rows[variant][2].endswith("%") and rows[variant][5].endswith("ms"), proc.stdout  # requests, share, p99
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"chart: {png}" in proc.stdout
