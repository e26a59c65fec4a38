"""The rollout policy in deployments.yaml, and editing weights in the spec's text (fast: no servers, no registry)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
import yaml

from mlops.domain.spec import DeploymentSpec, Guardrails, Rollout, SpecError, load_spec
from mlops.rollout.weights import set_weights

REPO = Path(__file__).resolve().parents[1]
SPEC = (REPO / "deployments.yaml").read_text()

MINIMAL = """\
environments:
  dev: {auth: none}
  prod: {auth: none}
models:
  iris:
    variants:
      champion:   {alias: champion, weight: 80}
      challenger: {alias: challenger, weight: 20}
      pinned:     {version: 3}
      shadowed:   {alias: shadowed, shadow: true}
    rollout: {metric: accuracy}
"""


def load_text(tmp_path: Path, text: str) -> DeploymentSpec:
    path = tmp_path / "deployments.yaml"
    path.write_text(text)
    return load_spec(path)


def changed_lines(old: str, new: str) -> tuple[list[str], list[str]]:
    removed, added = [], []
    for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0):
        if line.startswith("-") and not line.startswith("---"):
            removed.append(line[1:])
        elif line.startswith("+") and not line.startswith("+++"):
            added.append(line[1:])
    return removed, added


def comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]


# --- the policy ------------------------------------------------------------------------------------


def test_repo_spec_has_rollout_policies():
    spec = load_spec(REPO / "deployments.yaml")
    iris, diabetes = spec.models["iris"], spec.models["diabetes"]
    assert iris.rollout == Rollout(metric="accuracy", min_samples=200, alpha=0.05, step_weight=10, max_weight=50)
    assert diabetes.rollout is not None and diabetes.rollout.metric == "mae"
    assert spec.models["wine"].rollout is None
    assert iris.weights() == {"champion": 80, "challenger": 20}
    assert iris.weights("prod") == {"champion": 90, "challenger": 10}


def test_rollout_defaults(tmp_path):
    rollout = load_text(tmp_path, MINIMAL).models["iris"].rollout
    assert rollout == Rollout(
        champion="champion",
        challenger="challenger",
        metric="accuracy",
        min_samples=200,
        alpha=0.05,
        step_weight=10,
        max_weight=50,
        window="7d",
        guardrails=Guardrails(error_ratio=0.05, p99_seconds=0.5, min_requests=100),
    )


def test_a_full_policy_is_valid(tmp_path):
    text = MINIMAL.replace(
        "rollout: {metric: accuracy}",
        "rollout:\n      metric: mae\n      min_samples: 30\n      alpha: 0.2\n      step_weight: 25\n      max_weight: 25\n"
        "      window: 12h\n      guardrails: {error_ratio: 0.01, p99_seconds: 0.25, min_requests: 1}",
    )
    rollout = load_text(tmp_path, text).models["iris"].rollout
    assert (rollout.metric, rollout.min_samples, rollout.alpha, rollout.step_weight, rollout.max_weight, rollout.window) == ("mae", 30, 0.2, 25, 25, "12h")
    assert rollout.guardrails == Guardrails(error_ratio=0.01, p99_seconds=0.25, min_requests=1)


BAD_POLICIES = {
    "alpha 0": ("{metric: accuracy, alpha: 0}", "alpha", r"greater than 0"),
    "alpha 0.5": ("{metric: accuracy, alpha: 0.5}", "alpha", r"less than or equal to 0.2"),
    "step 0": ("{metric: accuracy, step_weight: 0}", "step_weight", r"greater than or equal to 1"),
    "max above 100": ("{metric: accuracy, max_weight: 101}", "max_weight", r"less than or equal to 100"),
    "max below step": ("{metric: accuracy, step_weight: 20, max_weight: 10}", "max_weight", r"at least step_weight \(20\) \(got 10\)"),
    "few samples": ("{metric: accuracy, min_samples: 10}", "min_samples", r"greater than or equal to 30"),
    "no metric": ("{alpha: 0.05}", "metric", r"Field required"),
    "unknown metric": ("{metric: f1}", "metric", r"'accuracy' or 'mae'"),
    "unknown field": ("{metric: accuracy, interval: 1h}", "interval", r"unknown field"),
    "unknown challenger": ("{metric: accuracy, challenger: ghost}", "challenger", r"no such variant 'ghost'"),
    "unknown champion": ("{metric: accuracy, champion: ghost}", "champion", r"no such variant 'ghost'"),
    "shadow challenger": ("{metric: accuracy, challenger: shadowed}", "challenger", r"is a shadow"),
    "pinned challenger": ("{metric: accuracy, challenger: pinned}", "challenger", r"pins version 3; promotion moves registry aliases"),
    "same variant": ("{metric: accuracy, challenger: champion}", "challenger", r"different variant from the champion"),
    "bad window": ("{metric: accuracy, window: 7 days}", "window", r"Prometheus duration"),
    "window unit": ("{metric: accuracy, window: 7y}", "window", r"Prometheus duration"),
    "zero window": ("{metric: accuracy, window: 0d}", "window", r"Prometheus duration"),
    "error ratio 1": ("{metric: accuracy, guardrails: {error_ratio: 1}}", "guardrails.error_ratio", r"less than 1"),
    "p99 0": ("{metric: accuracy, guardrails: {p99_seconds: 0}}", "guardrails.p99_seconds", r"greater than 0"),
    "min requests 0": ("{metric: accuracy, guardrails: {min_requests: 0}}", "guardrails.min_requests", r"greater than or equal to 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_bad_policy_names_its_field(tmp_path, case):
    policy, field, pattern = BAD_POLICIES[case]
    text = MINIMAL.replace("rollout: {metric: accuracy}", f"rollout: {policy}")
    assert text != MINIMAL
    with pytest.raises(SpecError) as err:
        load_text(tmp_path, text)
    message = str(err.value)
    assert message.startswith(f"deployments.yaml: models.iris.rollout.{field}: "), message
    assert re.search(pattern, message), message
    assert "\n" not in message


def test_the_repo_spec_without_aliases_cannot_roll_out(tmp_path):
    """Pinning the iris challenger to a version while iris has a rollout is refused with a reason."""
    text = SPEC.replace("challenger: {alias: challenger, weight: 20}", "challenger: {version: 2, weight: 20}")
    with pytest.raises(SpecError, match=r"models\.iris\.rollout\.challenger: variant 'challenger' pins version 2"):
        load_text(tmp_path, text)


# --- editing weights in the text ---------------------------------------------------------------------


def test_variant_weights_change_only_the_variant_lines():
    new = set_weights(SPEC, "iris", {"champion": 70, "challenger": 30})
    removed, added = changed_lines(SPEC, new)
    assert removed == ["      champion:   {alias: champion, weight: 80}", "      challenger: {alias: challenger, weight: 20}"]
    assert added == ["      champion:   {alias: champion, weight: 70}", "      challenger: {alias: challenger, weight: 30}"]
    assert comments(new) == comments(SPEC)
    spec = DeploymentSpec.model_validate(yaml.safe_load(new))
    assert spec.models["iris"].weights() == {"champion": 70, "challenger": 30}
    assert spec.models["iris"].weights("prod") == {"champion": 90, "challenger": 10}


def test_environment_weights_change_one_line():
    new = set_weights(SPEC, "iris", {"champion": 80, "challenger": 20}, env="prod")
    removed, added = changed_lines(SPEC, new)
    assert removed == ["      prod: {weights: {champion: 90, challenger: 10}}"]
    assert added == ["      prod: {weights: {champion: 80, challenger: 20}}"]
    assert comments(new) == comments(SPEC)


def test_missing_environment_override_is_added():
    new = set_weights(SPEC, "iris", {"champion": 60, "challenger": 40}, env="stage")
    removed, added = changed_lines(SPEC, new)
    assert removed == []
    assert added == ["      stage: {weights: {champion: 60, challenger: 40}}"]
    spec = DeploymentSpec.model_validate(yaml.safe_load(new))
    assert spec.models["iris"].weights("stage") == {"champion": 60, "challenger": 40}
    assert spec.models["iris"].weights("prod") == {"champion": 90, "challenger": 10}


def test_missing_environments_mapping_is_added_after_the_variants():
    new = set_weights(SPEC, "diabetes", {"champion": 70, "challenger": 30}, env="prod")
    removed, added = changed_lines(SPEC, new)
    assert removed == []
    assert added == ["    environments:", "      prod: {weights: {champion: 70, challenger: 30}}"]
    lines = new.splitlines()
    at = lines.index("    environments:", lines.index("  diabetes:"))
    assert lines[at - 1] == "      challenger: {alias: challenger, weight: 10}"
    assert lines[at + 2].startswith("    rollout:")
    spec = DeploymentSpec.model_validate(yaml.safe_load(new))
    assert spec.models["diabetes"].weights("prod") == {"champion": 70, "challenger": 30}
    assert spec.models["diabetes"].weights() == {"champion": 90, "challenger": 10}


@pytest.mark.parametrize("env", [None, "prod", "stage"])
def test_no_change_returns_the_same_text(env):
    spec = load_spec(REPO / "deployments.yaml")
    for model in ("iris", "wine", "diabetes"):
        assert set_weights(SPEC, model, spec.models[model].weights(env), env=env) is SPEC


BLOCK = """\
models:
  m:
    variants:
      a:
        alias: champion
        weight: 100  # all of it, for now
      b:
        alias: challenger
      # a shadow gets copies
      s:
        alias: shadowed
        shadow: true
    environments:
      prod:
        weights:
          a: 100
    trust:
      allow_pickle: true
"""


def test_block_style_variant_weight_is_replaced_and_inserted():
    text = BLOCK.replace("          a: 100\n", "          a: 100\n          b: 0\n")
    new = set_weights(text, "m", {"a": 90, "b": 10})
    removed, added = changed_lines(text, new)
    assert removed == ["        weight: 100  # all of it, for now"]
    assert added == ["        weight: 90  # all of it, for now", "        weight: 10"]
    assert new.index("weight: 10\n") < new.index("# a shadow gets copies")
    spec = DeploymentSpec.model_validate(yaml.safe_load(new))
    assert spec.models["m"].weights() == {"a": 90, "b": 10}
    assert spec.models["m"].weights("prod") == {"a": 100, "b": 0}


def test_block_style_environment_weight_is_inserted():
    # prod's override names a only; b comes from the variants (0), so setting it adds a line under weights
    new = set_weights(BLOCK, "m", {"a": 80, "b": 20}, env="prod")
    removed, added = changed_lines(BLOCK, new)
    assert removed == ["          a: 100"]
    assert added == ["          a: 80", "          b: 20"]
    assert DeploymentSpec.model_validate(yaml.safe_load(new)).models["m"].weights("prod") == {"a": 80, "b": 20}


def test_block_style_new_environment():
    new = set_weights(BLOCK, "m", {"a": 50, "b": 50}, env="dev")
    removed, added = changed_lines(BLOCK, new)
    assert (removed, added) == ([], ["      dev: {weights: {a: 50, b: 50}}"])
    assert new.index("dev:") < new.index("    trust:")


def test_flow_style_throughout():
    text = "models: {m: {variants: {a: {alias: x, weight: 100}, b: {alias: y}}}}\n"
    assert set_weights(text, "m", {"a": 70, "b": 30}) == "models: {m: {variants: {a: {alias: x, weight: 70}, b: {alias: y, weight: 30}}}}\n"
    assert (
        set_weights(text, "m", {"a": 70, "b": 30}, env="dev")
        == "models: {m: {variants: {a: {alias: x, weight: 100}, b: {alias: y}}, environments: {dev: {weights: {a: 70, b: 30}}}}}\n"
    )
    empty = "models:\n  m:\n    variants: {a: {alias: x, weight: 100}, b: {alias: y}}\n    environments: {prod: {}}\n"
    assert set_weights(empty, "m", {"a": 70, "b": 30}, env="prod").endswith("    environments: {prod: {weights: {a: 70, b: 30}}}\n")


def test_line_endings_are_kept():
    text = SPEC.replace("\n", "\r\n")
    new = set_weights(text, "diabetes", {"champion": 70, "challenger": 30}, env="prod")
    assert "\n" not in new.replace("\r\n", "")
    assert "    environments:\r\n      prod: {weights: {champion: 70, challenger: 30}}\r\n" in new


@pytest.mark.parametrize(
    ("model", "weights", "env", "pattern"),
    [
        ("nosuch", {"a": 100}, None, r"^models\.nosuch: "),
        ("iris", {"ghost": 100}, None, r"^models\.iris\.variants\.ghost: no such variant"),
        ("iris", {"champion": 70}, None, r"models\.iris\.variants: weights must sum to 100"),
        ("iris", {"champion": 70}, "prod", r"models\.iris\.environments\.prod\.weights: weights must sum to 100"),
        ("wine", {"champion": 90, "challenger": 10}, None, r"models\.wine\.variants\.challenger: a shadow variant takes no weight"),
        ("iris", {"champion": 60, "challenger": 40}, "qa", r"models\.iris\.environments\.qa: unknown environment"),
        ("iris", {"champion": 60.5, "challenger": 39.5}, None, r"^models\.iris\.variants\.champion\.weight: weight must be an integer"),
    ],
)
def test_weights_that_cannot_be_written_are_refused(model, weights, env, pattern):
    with pytest.raises(ValueError, match=pattern):
        set_weights(SPEC, model, weights, env=env)


def test_a_weight_shared_through_an_anchor_is_refused():
    text = "models:\n  m:\n    variants:\n      a: &v {alias: x, weight: 50}\n      b: *v\n"
    with pytest.raises(ValueError, match=r"models\.m\.variants\.a\.weight: shared with another place through a YAML anchor"):
        set_weights(text, "m", {"a": 60, "b": 40})


def test_a_weight_that_is_not_a_number_is_refused():
    text = SPEC.replace("{alias: champion, weight: 80}", "{alias: champion, weight: [80]}")
    with pytest.raises(ValueError, match=r"models\.iris\.variants\.champion\.weight: not an integer weight"):
        set_weights(text, "iris", {"champion": 70, "challenger": 30})
