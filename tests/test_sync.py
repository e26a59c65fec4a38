"""`mlops sync`: deterministic, portable, atomic; `--check` for CI; one clear line per bad spec."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, free_port, in_registry, mlops, tree_bytes

from mlops.domain.spec import SpecError, load_spec

GENERATED = ("model-settings", "seldon")


def generated(project: Path) -> dict[str, bytes]:
    return {f"{d}/{k}": v for d in GENERATED for k, v in tree_bytes(project / d).items()}


def synced(project: Path, env: dict | None = None) -> dict[str, bytes]:
    mlops(project, "sync", env=env, check=True)
    return generated(project)


def test_second_sync_changes_no_byte(project):
    first = synced(project)
    mtimes = {p: p.stat().st_mtime_ns for p in (project / "model-settings").rglob("*")}
    proc = mlops(project, "sync", check=True)
    assert "already up to date" in proc.stdout
    assert generated(project) == first
    assert {p: p.stat().st_mtime_ns for p in (project / "model-settings").rglob("*")} == mtimes


def test_output_is_portable_and_pinned(project):
    files = synced(project)
    for rel, data in files.items():
        text = data.decode()
        assert str(project) not in text, f"{rel} holds an absolute path of this machine"
        assert not re.search(r'"/(tmp|home|root|work|usr|var)/', text), rel
    settings = (project / "model-settings/iris-champion/model-settings.json").read_text()
    champion = in_registry(project, 'print(client.get_model_version_by_alias("iris", "champion").version)')
    assert json.loads(settings)["parameters"]["uri"] == f"models:/iris/{champion}"
    assert json.loads(settings)["parameters"]["version"] == champion


def test_same_registry_and_spec_give_identical_files(project, tmp_path):
    """Two syncs of the same spec and registry in different folders, by processes with different hash seeds,
    write the same bytes."""
    for d in GENERATED:
        shutil.rmtree(project / d)
    elsewhere = shutil.copytree(project, tmp_path / "elsewhere" / "project", symlinks=True)
    first = synced(project, {"PYTHONHASHSEED": "1"})
    assert first and synced(elsewhere, {"PYTHONHASHSEED": "2"}) == first


def test_check_passes_when_current_and_fails_after_alias_moves(project):
    synced(project)
    assert mlops(project, "sync", "--check").returncode == 0
    before = generated(project)

    current, other = in_registry(
        project,
        "cur = client.get_model_version_by_alias('iris', 'challenger').version\n"
        "other = next(v.version for v in client.search_model_versions(\"name='iris'\") if v.version != cur)\n"
        "client.set_registered_model_alias('iris', 'challenger', other)\n"
        "print(cur, other)",
    ).split()

    proc = mlops(project, "sync", "--check")
    assert proc.returncode == 1
    assert f'-    "version": "{current}"' in proc.stdout and f'+    "version": "{other}"' in proc.stdout
    assert "out of date" in proc.stderr
    assert generated(project) == before, "--check must write nothing"

    mlops(project, "sync", check=True)
    assert mlops(project, "sync", "--check").returncode == 0


BASE = (REPO / "deployments.yaml").read_text()
PINNABLE = re.sub(r"(?m)^    rollout: .*\n", "", BASE)  # without rollout policies, which need aliases, a variant may pin a version
BAD_SPECS = {
    "unknown model": (
        BASE.replace("  diabetes:", "  nosuch:\n    variants:\n      a: {alias: champion, weight: 100}\n  diabetes:"),
        r"deployments.yaml: models.nosuch: no registered model 'nosuch'",
    ),
    "unknown alias": (
        BASE.replace("challenger: {alias: challenger, weight: 20}", "challenger: {alias: nope, weight: 20}"),
        r"deployments.yaml: models.iris.variants.challenger.alias: model 'iris' has no alias 'nope' \(aliases: challenger, champion\)",
    ),
    "unknown version": (
        PINNABLE.replace("challenger: {alias: challenger, weight: 20}", "challenger: {version: 999, weight: 20}"),
        r"deployments.yaml: models.iris.variants.challenger.version: model 'iris' has no version 999",
    ),
    "weights not 100": (
        BASE.replace("{alias: challenger, weight: 20}", "{alias: challenger, weight: 30}"),
        r"deployments.yaml: models.iris.variants: weights must sum to 100 \(got champion=80 \+ challenger=30 = 110\)",
    ),
    "negative weight": (
        BASE.replace("{alias: challenger, weight: 20}", "{alias: challenger, weight: -20}"),
        r"deployments.yaml: models.iris.variants.challenger.weight: Input should be greater than or equal to 0 \(got -20\)",
    ),
    "malformed yaml": (
        BASE.replace("  wine:\n", "  wine: [\n"),
        r"deployments.yaml:\d+:\d+: malformed YAML",
    ),
    "unknown field": (
        BASE.replace("{alias: challenger, weight: 20}", "{alias: challenger, wieght: 20}"),
        r"deployments.yaml: models.iris.variants.challenger.wieght: unknown field",
    ),
    "fallback not a boolean": (
        BASE.replace("  wine:\n", "  wine:\n    fallback: sometimes\n"),
        r"deployments.yaml: models.wine.fallback: Input should be a valid boolean.*\(got 'sometimes'\)",
    ),
    "env override for unknown variant": (
        BASE.replace("prod: {weights: {champion: 90, challenger: 10}}", "prod: {weights: {champion: 90, ghost: 10}}"),
        r"deployments.yaml: models.iris.environments.prod.weights.ghost: no such variant",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_one_clear_line_and_writes_nothing(project, case):
    before = synced(project)
    text, pattern = BAD_SPECS[case]
    assert text != BASE, "the case must change the spec"
    (project / "deployments.yaml").write_text(text)
    proc = mlops(project, "sync")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr
    assert generated(project) == before


def test_unreachable_registry_names_the_uri_and_writes_nothing(project):
    before = synced(project)
    uri = f"http://127.0.0.1:{free_port()}"
    proc = mlops(project, "sync", env={"MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert proc.returncode != 0
    assert f"cannot reach MLflow registry at {uri}" in proc.stderr
    assert generated(project) == before


def test_failure_while_writing_leaves_previous_files(project):
    """A crash half-way through writing (disk full, say) must not leave a half-written tree."""
    before = synced(project)
    out = in_registry(
        project,
        "client.set_registered_model_alias('iris', 'challenger', client.get_model_version_by_alias('iris', 'champion').version)\n"
        "from mlops.render.sync import sync\n"
        "real_write, written = Path.write_text, []\n"
        "def failing_write(self, *a, **k):\n"
        "    if len(written) == 3:\n"
        "        raise OSError(28, 'No space left on device')\n"
        "    written.append(self)\n"
        "    return real_write(self, *a, **k)\n"
        "Path.write_text = failing_write\n"
        "try:\n"
        f"    sync(Path({str(project)!r}), default_registry(Path({str(project)!r})))\n"
        "except OSError as exc:\n"
        "    print(len(written), exc.strerror)\n",
    )
    assert out == "3 No space left on device"
    assert generated(project) == before
    assert not [p.name for p in project.iterdir() if p.name.startswith((".model-settings", ".seldon"))]


def test_committed_files_match_the_spec(trained):
    """CI's `mlops sync --check`: the committed generated files are what deployments.yaml gives
    on a freshly trained registry, so a spec edit committed without `mlops sync` fails here."""
    proc = mlops(trained, "sync", "--check", env={"MLOPS_PROJECT_DIR": str(trained)})
    assert proc.returncode == 0
    committed = generated(REPO)
    assert committed, "model-settings/ and seldon/ must be committed"
    fresh = generated(trained)
    stale = sorted(k for k in set(committed) | set(fresh) if committed.get(k) != fresh.get(k))
    assert not stale, f"regenerate with `mlops sync` on a fresh registry (`make clean up`): {stale}"


def test_fallback_is_written_into_the_router_settings_only_where_the_spec_sets_it(project):
    spec = project / "deployments.yaml"
    spec.write_text(spec.read_text().replace("  wine:\n", "  wine:\n    fallback: true\n"))
    before = synced(project)
    extra = lambda model: json.loads((project / "model-settings" / model / "model-settings.json").read_text())["parameters"]["extra"]  # noqa: E731
    assert extra("wine")["fallback"] is True
    assert "fallback" not in extra("iris") and "fallback" not in extra("diabetes")
    spec.write_text(spec.read_text().replace("  wine:\n    fallback: true\n", "  wine:\n"))
    after = synced(project)
    assert sorted(k for k in before if before[k] != after.get(k)) == ["model-settings/wine/model-settings.json"]


TRUST_CASES = {
    "trust not a boolean": (
        "    trust: {allow_pickle: maybe}\n",
        r"deployments.yaml: models.wine.trust.allow_pickle: Input should be a valid boolean.*\(got 'maybe'\)",
    ),
    "trust of an unknown kind": ("    trust: {pickles: true}\n", r"deployments.yaml: models.wine.trust.pickles: unknown field"),
    "skops type that is not a type name": (
        "    trust: {skops_trusted_types: [rm -rf]}\n",
        r"deployments.yaml: models.wine.trust: skops_trusted_types: 'rm -rf' is not a dotted type name",
    ),
}


@pytest.mark.parametrize("case", sorted(TRUST_CASES))
def test_bad_trust_declaration_is_one_clear_line(tmp_path, case):
    """Spec errors stop sync before anything is resolved or written (the cases above show the writing side)."""
    line, pattern = TRUST_CASES[case]
    path = tmp_path / "deployments.yaml"
    path.write_text(BASE.replace("  wine:\n", "  wine:\n" + line))
    with pytest.raises(SpecError, match=pattern):
        load_spec(path)


def test_variants_with_different_inputs_are_refused_naming_both(project):
    """One public name, one interface: a version that takes 3 features cannot be a variant of a 4-feature iris."""
    version = in_registry(
        project,
        "import mlflow, mlflow.sklearn, numpy as np\n"
        "from mlflow.models import infer_signature\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "mlflow.set_tracking_uri(client.tracking_uri)\n"
        "X = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]]); m = LogisticRegression().fit(X, [0, 1])\n"
        f"exp = client.create_experiment('iris-narrow', artifact_location={(project / '.mlops' / 'narrow').as_uri()!r})\n"
        "with mlflow.start_run(experiment_id=exp):\n"
        "    info = mlflow.sklearn.log_model(m, name='model', signature=infer_signature(X, m.predict(X)), registered_model_name='iris')\n"
        "print(info.registered_model_version)",
    ).splitlines()[-1]
    before = generated(project)
    (project / "deployments.yaml").write_text(
        PINNABLE.replace("challenger: {alias: challenger, weight: 20}", f"challenger: {{version: {version}, weight: 20}}")
    )
    proc = mlops(project, "sync")
    assert proc.returncode != 0
    assert re.search(rf"deployments.yaml: models.iris.variants: variants take different inputs.*challenger \(version {version}\) takes .*-1, 3", proc.stderr), (
        proc.stderr
    )
    assert generated(project) == before
