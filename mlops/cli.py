"""`mlops`: one command with verbs, from training to serving.

The registry is `MLFLOW_TRACKING_URI` when set (with MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD as MLflow reads them), else an embedded SQLite registry
under `.mlops/` in the project root (the folder holding deployments.yaml).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from runtimes.contract import GRPC_PORT, HTTP_PORT, LOOPBACK, METRICS_PORT, MODEL_SETTINGS_DIR, SPEC_FILE

from .domain.registry import RegistryError, default_registry, embedded_write_lock
from .domain.spec import SpecError

app = typer.Typer(
    help="Train models into MLflow, sync deployments.yaml to MLServer and Seldon, serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

HttpPort = Annotated[int, typer.Option(help="REST (V2 inference protocol) port.")]
GrpcPort = Annotated[int, typer.Option(help="gRPC (V2 inference protocol) port.")]
MetricsPort = Annotated[int, typer.Option(help="Prometheus metrics port.")]
Host = Annotated[str, typer.Option(envvar="MLSERVER_HOST", help="Interface to listen on. 0.0.0.0 serves every network this machine is on, unauthenticated.")]


def project_root() -> Path:
    """The folder holding deployments.yaml: MLOPS_PROJECT_DIR, else the nearest from here upwards."""
    if "MLOPS_PROJECT_DIR" in os.environ:
        return Path(os.environ["MLOPS_PROJECT_DIR"]).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / SPEC_FILE).is_file():
            return d
    return here


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def fail_if_stale(changed: list[str], diff: list[str], source: str, command: str) -> None:
    """`--check` for CI: print the diff, name what is stale and how to regenerate it."""
    if changed:
        sys.stdout.writelines(diff)
        fail(f"{', '.join(changed)} out of date with {source}; run `{command}`")


def _train(models: list[str]) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from training.catalog import JOBS
    from training.train import TrainingError, train_model

    unknown = [m for m in models if m not in JOBS]
    if unknown:
        fail(f"no training job for {', '.join(unknown)} (jobs: {', '.join(JOBS)})")
    root = project_root()
    registry = default_registry(root)
    out.print(f"Registry: {registry.tracking_uri}", highlight=False)
    with (
        embedded_write_lock(root, registry, on_wait=lambda msg: err.print(msg, highlight=False)),
        Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as bar,
    ):
        task = bar.add_task("training", total=len(models))
        for name in models:
            try:
                results = train_model(registry, name, on_step=lambda msg: bar.update(task, description=msg))
            except TrainingError as exc:
                fail(str(exc))
            except Exception as exc:  # noqa: BLE001 - registry and database failures
                fail(f"training {name} against {registry.tracking_uri} failed: {str(exc).splitlines()[0]}")
            bar.advance(task)
            for r in results:
                alias = f" @{r.alias}" if r.alias else ""
                bar.console.print(f"  {r.model} v{r.version} {r.candidate}: score={r.score:.4f}{alias}", highlight=False)


@app.command()
def train(
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Train only this model (repeatable).")] = None,
) -> None:
    """Fit every candidate, log it to MLflow, register versions, set @champion/@challenger."""
    from training.catalog import JOBS

    _train(model or list(JOBS))


def _sync(check: bool, reload: list[str] = ()):
    from .render.sync import sync as do_sync
    from .supervise.serve import ServerError, reload_models

    root = project_root()
    registry = default_registry(root)
    try:
        result = do_sync(root, registry, check=check)
    except (SpecError, RegistryError) as exc:
        fail(str(exc))
    if check:
        fail_if_stale(result.changed, result.diff, "deployments.yaml and the registry", "mlops sync")
    for url in reload:
        try:
            reload_models(url, result.models_changed, result.models_removed)
        except ServerError as exc:
            fail(str(exc))
        if result.models_changed or result.models_removed:
            out.print(f"{url}: reloaded {', '.join(result.models_changed + result.models_removed)}", highlight=False)
    return result


@app.command()
def sync(
    check: Annotated[bool, typer.Option("--check", help="Write nothing; exit 1 with a diff if generated files are stale.")] = False,
    reload: Annotated[
        list[str] | None,
        typer.Option(
            "--reload",
            metavar="URL",
            help="After writing, make the MLServer at URL (e.g. http://127.0.0.1:8080) load changed models "
            "and unload removed ones, without downtime. Repeatable.",
        ),
    ] = None,
) -> None:
    """Resolve aliases in deployments.yaml to registry versions; write model-settings/ and seldon/."""
    if check and reload:
        fail("--check writes nothing, so there is nothing to --reload")
    result = _sync(check, reload or [])
    if check:
        out.print("generated files are up to date")
    else:
        out.print(f"updated {', '.join(result.changed)}" if result.changed else "generated files already up to date")


@app.command()
def serve(http_port: HttpPort = HTTP_PORT, grpc_port: GrpcPort = GRPC_PORT, metrics_port: MetricsPort = METRICS_PORT, host: Host = LOOPBACK) -> None:
    """Start MLServer on model-settings/ in the foreground: REST, gRPC and metrics, every model at once."""
    _serve(http_port, grpc_port, metrics_port, host)


def _serve(http_port: int, grpc_port: int, metrics_port: int, host: str, prometheus_port: int | None = None) -> None:
    from .supervise.prometheus import PrometheusError
    from .supervise.serve import Ports
    from .supervise.serve import serve as run

    root = project_root()
    settings = root / MODEL_SETTINGS_DIR
    if not (settings / "settings.json").is_file():
        fail(f"{settings} has no generated settings; run `mlops sync` first")
    try:
        code = run(settings, default_registry(root), Ports(http_port, grpc_port, metrics_port, host), echo=typer.echo, prometheus_port=prometheus_port)
    except PrometheusError as exc:
        fail(str(exc))
    raise typer.Exit(code)


@app.command()
def up(
    http_port: HttpPort = HTTP_PORT,
    grpc_port: GrpcPort = GRPC_PORT,
    metrics_port: MetricsPort = METRICS_PORT,
    host: Host = LOOPBACK,
    with_prometheus: Annotated[
        bool,
        typer.Option("--with-prometheus", help="Also run Prometheus (Debian's `prometheus`) scraping the server, with the alert rules loaded."),
    ] = False,
    prometheus_port: Annotated[int, typer.Option(help="Port of Prometheus with --with-prometheus.")] = 9090,
) -> None:
    """The main job: train if the registry lacks the spec's models, sync, then serve."""
    from .domain.registry import fail_fast_http
    from .domain.spec import load_spec

    if with_prometheus:
        from .supervise.prometheus import PrometheusError, binary

        try:
            binary()
        except PrometheusError as exc:
            fail(str(exc))
    root = project_root()
    try:
        spec = load_spec(root / SPEC_FILE)
    except SpecError as exc:
        fail(str(exc))
    registry = default_registry(root)
    fail_fast_http()
    try:
        registered = {m.name for m in registry.client().search_registered_models()}
    except Exception as exc:  # noqa: BLE001
        fail(f"cannot reach MLflow registry at {registry.tracking_uri}: {str(exc).splitlines()[0]}")
    missing = [m for m in spec.models if m not in registered]
    if missing:
        _train(missing)
    _sync(check=False)
    _serve(http_port, grpc_port, metrics_port, host, prometheus_port if with_prometheus else None)


@app.command("registry-server", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def registry_server(
    ctx: typer.Context,
    backend_store_uri: Annotated[
        str | None,
        typer.Option(envvar="MLOPS_BACKEND_STORE_URI", help="postgresql://user:pw@host/db or mysql+pymysql://user:pw@host/db."),
    ] = None,
    artifacts_destination: Annotated[
        str | None,
        typer.Option(envvar="MLOPS_ARTIFACTS_DESTINATION", help="Folder or s3://bucket/path (default: .mlops/registry-server/artifacts)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; anything but loopback requires auth.")] = LOOPBACK,
    port: Annotated[int, typer.Option(help="Port of the REST API and UI.")] = 5000,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 4,
    auth: Annotated[bool, typer.Option("--auth/--no-auth", help="MLflow basic auth; --no-auth only on loopback.")] = True,
    auth_db_uri: Annotated[
        str | None,
        typer.Option(envvar="MLOPS_AUTH_DB_URI", help="Users and permissions (default: SQLite in .mlops/registry-server/)."),
    ] = None,
    admin_username: Annotated[str, typer.Option(envvar="MLOPS_REGISTRY_ADMIN_USERNAME", help="Admin created on first start.")] = "admin",
    default_permission: Annotated[str, typer.Option(help="What users may do with what others created.")] = "READ",
    auth_cache_seconds: Annotated[
        int,
        typer.Option(
            min=0,
            envvar="MLOPS_AUTH_CACHE_SECONDS",
            help="Trust a login this long once its password checked out, instead of hashing it on every request "
            "(each worker keeps its own: a changed or deleted password still works that long on the others). 0: check every request.",
        ),
    ] = 0,
) -> None:
    """Start the team's MLflow registry: database backend, proxied artifacts, basic auth.

    The admin password comes from MLOPS_REGISTRY_ADMIN_PASSWORD or a prompt.
    Arguments after `--` go to `mlflow server` as they are, e.g. `-- --allowed-hosts mlflow.example.com`.
    """
    from .supervise import registry_server as server

    opts = server.Options(
        backend_store_uri=backend_store_uri, artifacts_destination=artifacts_destination, auth_db_uri=auth_db_uri,
        host=host, port=port, workers=workers, auth=auth, admin_username=admin_username,
        default_permission=default_permission.upper(), auth_cache_seconds=auth_cache_seconds, extra_args=tuple(ctx.args),
    )  # fmt: skip
    try:
        server.run(opts, project_root(), echo=lambda line: out.print(line, highlight=False, soft_wrap=True))
    except server.ConfigError as exc:
        fail(str(exc))


@app.command()
def validate(
    crds_dir: Annotated[Path | None, typer.Option(help="Upstream CRDs to validate against [env: MLOPS_CRDS_DIR; default: ../shared/crds].")] = None,
) -> None:
    """Render every clusters/<env> with kubectl kustomize and validate each object offline."""
    from .check import validate as validation

    raise typer.Exit(validation.main(project_root(), crds_dir))


@app.command()
def cluster(env: Annotated[str, typer.Argument(help="The environment: a folder under clusters/.")] = "dev") -> None:
    """Show what Seldon Core's operator and Istio make of an environment's manifests.

    For each SeldonDeployment: how clients reach it through the ingress (REST path, gRPC headers),
    the traffic weights and mirror, and each predictor's MLServer container as the pods run it
    (the env and ports the operator adds, where metrics are served, the user). `mlops validate`
    checks the same model; mlops/check/cluster.py cites the upstream source it follows.
    """
    import yaml

    from .check import cluster as model
    from .check import validate as validation

    try:
        envs = validation.rendered_environments(project_root())
    except RuntimeError as exc:
        fail(str(exc))
    if env not in envs:
        fail(f"no environment '{env}': clusters/ has {', '.join(sorted(envs)) or 'none'}")
    typer.echo(yaml.safe_dump(model.describe(envs[env], project_root().resolve()), sort_keys=False, width=120), nl=False)


@app.command()
def dashboards(
    check: Annotated[bool, typer.Option("--check", help="Write nothing; exit 1 with a diff if generated files are stale.")] = False,
) -> None:
    """Generate the Grafana dashboards and the PrometheusRule under clusters/base/monitoring/."""
    from .render import dashboards as gen

    result = gen.write(project_root(), check=check)
    if check:
        fail_if_stale(result.changed, result.diff, "mlops/render/dashboards.py", "mlops dashboards")
    if check:
        out.print("dashboards and alerts are up to date")
    else:
        out.print(f"updated {', '.join(result.changed)}" if result.changed else "dashboards and alerts already up to date", highlight=False, soft_wrap=True)


PrometheusUrl = Annotated[
    str, typer.Option("--prometheus", envvar="MLOPS_PROMETHEUS_URL", help="The Prometheus that scrapes the model's servers, e.g. http://prometheus:9090.")
]
ModelName = Annotated[str, typer.Argument(help="A model of deployments.yaml with a `rollout` policy, e.g. iris.")]


def _rollout_target(model: str, env: str | None):
    from .domain.spec import load_spec
    from .rollout.promote import PromotionError, policy_of

    root = project_root()
    try:
        spec = load_spec(root / SPEC_FILE)
        if env is not None and env not in spec.environments:
            raise PromotionError(f"no environment '{env}' in {SPEC_FILE} (environments: {', '.join(spec.environments)})")
        policy = policy_of(model, spec.models.get(model))
    except (SpecError, PromotionError) as exc:
        fail(str(exc))
    return root, spec, policy


@app.command()
def promote(
    model: ModelName,
    prometheus: PrometheusUrl,
    env: Annotated[
        str | None, typer.Option(help="Change this environment's weights (models.<m>.environments.<env>.weights); default: the model's own.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the decision and its evidence; write nothing.")] = False,
    commit: Annotated[bool, typer.Option("--commit", help="Commit the rewritten spec and generated files, the evidence as the message.")] = False,
) -> None:
    """Decide promote | step | hold | rollback for MODEL's challenger from live outcomes, and write it to Git.

    Reads each variant's feedback and the challenger's error ratio and p99 from Prometheus, tests the difference with an always-valid sequential test (safe to run on a schedule), and prints `decision: ...` with the evidence.

    step raises the challenger's weight by the policy's step_weight; promote points the champion's registry alias at the challenger's version and sets the weights to champion 100; rollback sets the challenger's weight to 0. Anything but hold rewrites deployments.yaml and runs sync: the change is a small diff for review, and Flux applies it. Never talks to the cluster.
    """
    from .rollout.promote import PromotionError, decide, last_scrape, read_arms, read_guardrails, report, write

    root, spec, policy = _rollout_target(model, env)
    weights = spec.models[model].weights(env)
    try:
        at = last_scrape(prometheus, model)
        champion, challenger = read_arms(prometheus, model, policy, at)
        decision = decide(policy, weights, champion, challenger, read_guardrails(prometheus, model, policy, at))
    except PromotionError as exc:
        fail(str(exc))
    lines = report(model, env, policy, decision)
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)
    if decision.action == "hold" or dry_run:
        if dry_run and decision.action != "hold":
            out.print("dry run: nothing written", highlight=False)
        return
    registry = default_registry(root)
    try:
        with embedded_write_lock(root, registry, on_wait=lambda msg: err.print(msg, highlight=False)):
            changed = write(root, registry, model, env, decision, commit=commit, message=lines)
    except (PromotionError, SpecError, RegistryError) as exc:
        fail(str(exc))
    written = ", ".join([SPEC_FILE, *changed])
    out.print(f"wrote {written}" + ("; committed" if commit else "; review with `git diff` and commit"), highlight=False)


@app.command("ab-report")
def ab_report(
    model: ModelName,
    prometheus: PrometheusUrl,
    env: Annotated[str | None, typer.Option(help="Show this environment's configured weights.")] = None,
    chart: Annotated[Path | None, typer.Option(help="Where to write the PNG chart of quality and share over time; default ab-report-MODEL.png.")] = None,
    since: Annotated[str, typer.Option(help="How far back the chart goes (a duration such as 6h or 7d).")] = "6h",
) -> None:
    """Print MODEL's per-variant A/B table (weight, share, requests, errors, p99, outcomes, quality with interval) and chart it.

    The numbers are the ones `mlops promote` decides on, over the rollout policy's window, read with the dashboards' queries.
    """
    from rich.table import Table

    from .rollout.promote import PromotionError
    from .rollout.report import chart as draw
    from .rollout.report import rows, table

    _, spec, policy = _rollout_target(model, env)
    try:
        found = rows(prometheus, model, spec.models[model], policy, env)
        path = draw(prometheus, model, policy, since, chart or Path(f"ab-report-{model}.png"))
    except PromotionError as exc:
        fail(str(exc))
    header, *lines = table(model, policy, found)
    view = Table(title=f"{model}: {policy.metric} over {policy.window}" + (f" ({env})" if env else ""))
    for name in header:
        view.add_column(name, justify="left" if name == "variant" else "right")
    for line in lines:
        view.add_row(*line)
    out.print(view)
    out.print(f"chart: {path}", highlight=False)


@app.command()
def bench(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for results.json, throughput.png and table.md.")] = Path("bench/results"),
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; the order of systems rotates every round.")] = 3,
    seconds: Annotated[float, typer.Option(min=1, help="Seconds of load per system, connection count and round.")] = 10,
    connections: Annotated[str, typer.Option(help="Comma-separated concurrent connection counts.")] = "1,8,64",
    scale: Annotated[bool, typer.Option("--scale/--no-scale", help="Also measure memory, load and sync time with many models.")] = True,
    sweep: Annotated[bool, typer.Option("--sweep/--no-sweep", help="Also compare the chosen server settings with the alternatives.")] = True,
    soak: Annotated[
        bool, typer.Option("--soak/--no-soak", help="Also hold the routed model under load: memory, throughput and errors at the start and the end.")
    ] = True,
    soak_seconds: Annotated[int, typer.Option(min=2, help="Length of the soak, in slices of a minute (two at least).")] = 300,
) -> None:
    """Load-test the served system against stock MLflowRuntime and a FastAPI monolith (needs wrk and h2load).

    Trains iris into a registry of its own in a temporary folder, so it never
    touches the project's registry. Takes about 25 minutes with the defaults, the soak included.
    """
    from rich.table import Table

    try:
        from bench import run as b
    except ImportError as exc:
        fail(f"mlops bench needs the bench extra ({exc.name} is missing): pip install 'mlops-platform[bench]', or make bench")

    try:
        conns = [int(c) for c in connections.split(",") if c.strip()]
    except ValueError:
        fail(f"--connections: expected numbers separated by commas, got '{connections}'")
    try:
        results = b.run(
            out_dir, rounds, seconds, conns, scale, sweep, soak_seconds if soak else 0,
            echo=lambda line: err.print(line, highlight=False, markup=False),
        )  # fmt: skip
    except b.BenchError as exc:
        fail(str(exc))
    grid = Table("target", "measured", "goal", "met")
    for name, t in results["targets"].items():
        grid.add_row(name, str(t["value"]), t["target"], "yes" if t["met"] else "[red]no[/]")
    out.print(grid)
    out.print(f"results in {out_dir}/ (results.json, throughput.png, table.md)", highlight=False)
    if any(results["failed_requests"].values()):
        fail(f"requests failed under load: {results['failed_requests']}")


if __name__ == "__main__":
    app()
