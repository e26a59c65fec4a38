"""The serving process: MLServer 1.7.1's `start`, with this project's changes to MLServer applied here and only here.

The image runs `python -m runtimes.server start FOLDER` (Dockerfile) and `mlops serve` runs the same;
FOLDER is what `mlserver start` takes (settings.json, model-settings.json files, or MLSERVER_MODEL_*).
Before anything else it refuses an MLServer release the changes were not tested with
(runtimes/mlserver_patches.py). Importing a runtime changes nothing in MLServer: under a plain
`mlserver start` the runtimes still serve, without the REST and gRPC edges, the drain or the patches.
"""

from __future__ import annotations

import asyncio

import click
from mlserver.cli.serve import load_settings
from mlserver.logging import configure_logger
from mlserver.server import MLServer
from mlserver.settings import ModelSettings
from mlserver.utils import install_uvloop_event_loop

from . import drain, grpc_edge, mlserver_patches, rest


class Server(MLServer):
    """MLServer whose REST app instance is served through `rest.Edge`, whose gRPC `ModelInfer` takes the short
    road of `grpc_edge`, and whose stop is the drain."""

    def _create_servers(self) -> None:
        super()._create_servers()
        # MLServer adds custom handlers' routes to `_app` later; the Edge hands it every attribute it lacks.
        self._rest_server._app = rest.Edge(self._rest_server._app)
        grpc_edge.install(self._grpc_server)

    async def start(self, models_settings: list[ModelSettings] | None = None) -> None:
        releasing = asyncio.ensure_future(drain.release_signals(self))
        try:
            await super().start(models_settings or [])
        finally:
            releasing.cancel()

    async def stop(self, sig: int | None = None) -> None:
        await drain.stop(self, sig)


@click.group()
def cli() -> None:
    """MLServer with this project's runtimes and its changes to MLServer 1.7.1 (runtimes/server.py)."""


@cli.command()
@click.argument("folder")
def start(folder: str) -> None:
    """Serve the models FOLDER describes, as `mlserver start FOLDER` would."""

    async def serve() -> None:
        settings, models_settings = await load_settings(folder)
        await Server(settings).start(models_settings)  # built on the running loop: MLServer adds its signal handlers to it

    asyncio.run(serve())


def main() -> None:
    mlserver_patches.apply()
    configure_logger()
    install_uvloop_event_loop()
    cli()


if __name__ == "__main__":
    main()
