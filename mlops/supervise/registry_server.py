"""`mlops registry-server`: one MLflow server that a team's jobs and serving share.

The embedded SQLite registry takes one writer at a time and lives on one
machine. A team needs a database server that takes concurrent writes
(PostgreSQL, MySQL/MariaDB), artifacts proxied by the tracking server (clients
need no storage credentials, only MLFLOW_TRACKING_URI and a login), and
MLflow's basic-auth app, so the registry is not open to whoever reaches the port.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from runtimes.contract import STATE_DIR

SERVER_DIR = "registry-server"  # under .mlops/: default artifacts and auth database
PASSWORD_ENV = "MLOPS_REGISTRY_ADMIN_PASSWORD"
# mlflow.server.auth.permissions, without importing the whole server app to check an option.
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
BACKENDS = {"postgresql": "postgresql://user:password@host:5432/db", "mysql": "mysql+pymysql://user:password@host:3306/db"}


class ConfigError(Exception):
    """The server would not start, or would start insecurely; the message says what to change."""


@dataclass(frozen=True)
class Options:
    backend_store_uri: str | None
    artifacts_destination: str | None
    auth_db_uri: str | None
    host: str
    port: int
    workers: int
    auth: bool
    admin_username: str
    default_permission: str
    auth_cache_seconds: int = 0
    extra_args: tuple[str, ...] = ()


def is_loopback(host: str) -> bool:
    """True only if every address the name resolves to is loopback: 0.0.0.0, :: and LAN names are not."""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
    except (OSError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _with_installed_driver(url):
    """Plain postgresql:// and mysql:// mean SQLAlchemy's default drivers (psycopg 3, mysqlclient), which
    this project does not install; it ships psycopg2-binary and PyMySQL, which need no system libraries."""
    import importlib.util

    defaults = {"postgresql": ("psycopg", "postgresql+psycopg2"), "mysql": ("MySQLdb", "mysql+pymysql")}
    if url.drivername in defaults and importlib.util.find_spec(defaults[url.drivername][0]) is None:
        return url.set(drivername=defaults[url.drivername][1])
    return url


def check_backend(uri: str) -> tuple[str, str]:
    """Connect once, so a typo or a missing database is one line here rather than a traceback per worker.

    Returns the URI to hand to MLflow and the same with its password masked, for messages.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url

    examples = " or ".join(BACKENDS.values())
    try:
        url = _with_installed_driver(make_url(uri))
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"--backend-store-uri is not a database URI (expected {examples})") from None
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend not in BACKENDS:
        raise ConfigError(
            f"backend store {shown}: a team registry needs PostgreSQL or MySQL/MariaDB ({examples}); "
            "SQLite takes one writer at a time, which is what the embedded registry is for"
        )
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10})
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as exc:
        raise ConfigError(f"backend store {shown}: no driver ({exc}); use {BACKENDS[backend]}") from None
    except Exception as exc:  # noqa: BLE001 - refused, unknown database, bad login, ...
        raise ConfigError(f"cannot connect to backend store {shown}: {_first_line(exc)}") from None
    return url.render_as_string(hide_password=False), shown


def _artifacts(dest: str | None, default: Path) -> str:
    if dest and "://" in dest:
        if dest.startswith("s3://"):
            try:
                import boto3  # noqa: F401
            except ModuleNotFoundError:
                raise ConfigError(
                    f"artifacts destination {dest} needs boto3 on the server (pip install boto3) and AWS credentials in its environment; clients need neither"
                ) from None
        return dest
    path = Path(dest).expanduser().resolve() if dest else default
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _admin_password() -> str:
    """From the environment or a prompt: a password kept in the repo or a default would be everyone's."""
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        if not sys.stdin.isatty():
            raise ConfigError(f"set {PASSWORD_ENV} to the registry admin's password (or run in a terminal to be prompted)")
        import typer

        password = typer.prompt("Registry admin password", hide_input=True, confirmation_prompt=True)
    if len(password) < 12:
        raise ConfigError(f"the registry admin password ({PASSWORD_ENV}) must be at least 12 characters")
    return password


def _write_auth_config(path: Path, opts: Options, database_uri: str) -> None:
    """MLflow's basic-auth app reads this file (MLFLOW_AUTH_CONFIG_PATH); the password stays out of it."""
    settings = {
        "default_permission": opts.default_permission,
        "database_uri": database_uri,
        "admin_username": opts.admin_username,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    if opts.auth_cache_seconds:
        # Each request's login otherwise costs a scrypt hash, tens of milliseconds of a worker's CPU:
        # a training job's hundred-odd calls queue behind it. Failed logins are never cached.
        settings["auth_cache_ttl_seconds"] = str(opts.auth_cache_seconds)
    # MLflow reads it with configparser's interpolation: a URL-encoded password's % must be doubled.
    text = "[mlflow]\n" + "".join(f"{k} = {v.replace('%', '%%')}\n" for k, v in settings.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # database_uri may hold a password
    with os.fdopen(fd, "w") as f:
        f.write(text)


def command(opts: Options, root: Path, echo: Callable[[str], None] = print) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` argv and environment, after every check that can fail with a clear message."""
    if not opts.auth and not is_loopback(opts.host):
        raise ConfigError(
            f"refusing to serve the registry without authentication on {opts.host}, which is reachable from "
            "other machines; drop --no-auth, or bind to 127.0.0.1"
        )
    if opts.default_permission not in PERMISSIONS:
        raise ConfigError(f"--default-permission must be one of {', '.join(PERMISSIONS)} (got {opts.default_permission})")
    if not opts.backend_store_uri:
        raise ConfigError(f"no backend store: pass --backend-store-uri or set MLOPS_BACKEND_STORE_URI ({' or '.join(BACKENDS.values())})")
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    # MLflow's GenAI job runner (LLM judges, trace rollups) is eight more processes a model registry never uses.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    password = _admin_password() if opts.auth else None
    backend, shown = check_backend(opts.backend_store_uri)
    state = root / STATE_DIR / SERVER_DIR
    state.mkdir(parents=True, exist_ok=True)
    artifacts = _artifacts(opts.artifacts_destination, state / "artifacts")
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--serve-artifacts", "--artifacts-destination", artifacts,
        "--host", opts.host, "--port", str(opts.port), "--workers", str(opts.workers),
    ]  # fmt: skip
    auth_note = "none (loopback only)"
    if opts.auth:
        auth_db = opts.auth_db_uri or f"sqlite:///{state / 'basic_auth.db'}"
        ini = state / "basic_auth.ini"
        _write_auth_config(ini, opts, auth_db)
        argv += ["--app-name", "basic-auth"]
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_AUTH_ADMIN_USERNAME=opts.admin_username,
            MLFLOW_AUTH_ADMIN_PASSWORD=password,
        )
        # CSRF key of the sign-up form; one per start is consistent across this server's workers.
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        from sqlalchemy.engine import make_url

        auth_note = f"basic auth, admin '{opts.admin_username}', users in {make_url(auth_db).render_as_string(hide_password=True)}"
        if opts.auth_cache_seconds:
            auth_note += f", logins trusted for {opts.auth_cache_seconds} s once checked"
    argv += opts.extra_args
    echo(f"Team registry on {opts.host}:{opts.port}")
    echo(f"  backend store: {shown}")
    echo(f"  artifacts:     {artifacts} (proxied as mlflow-artifacts:/)")
    echo(f"  auth:          {auth_note}")
    return argv, env


def run(opts: Options, root: Path, echo: Callable[[str], None] = print) -> NoReturn:
    """Become `mlflow server`, so signals and the exit status are its own."""
    argv, env = command(opts, root, echo)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
