"""The serving contract (runtimes/contract.py): what sync writes is what the runtimes read, and a
hand-edited model-settings file that breaks it is refused at load, naming the field."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from conftest import REPO
from mlserver.settings import ModelParameters, ModelSettings

from mlops.domain.registry import ResolvedVariant
from mlops.domain.spec import Trust
from mlops.render.sync import router_settings, variant_settings
from runtimes.artifacts import ModelLoadError
from runtimes.contract import MODEL_SETTINGS_DIR, RouterExtra, RuntimeExtra
from runtimes.registry_sklearn import RegistrySKLearnRuntime
from runtimes.router import RouterRuntime

VARIANTS = [ResolvedVariant("iris", "champion", "3", "champion", 90, False), ResolvedVariant("iris", "shadow", "4", None, 0, True)]


def test_what_sync_writes_reads_back_unchanged():
    trust = Trust(allow_pickle=True, skops_trusted_types=["sklearn.tree._tree.Tree"])
    extra = router_settings("iris", VARIANTS, fallback=True, trust=trust)["parameters"]["extra"]
    parsed = RouterExtra.model_validate(extra)
    assert parsed.model_dump(exclude_unset=True) == extra
    assert [(v.name, v.version, v.weight, v.shadow) for v in parsed.variants] == [("champion", "3", 90, False), ("shadow", "4", 0, True)]
    assert parsed.fallback and parsed.runtime.allow_pickle and parsed.runtime.registered_model == "iris"
    variant = variant_settings(VARIANTS[0], trust)["parameters"]["extra"]
    assert RuntimeExtra.model_validate(variant).model_dump(exclude_unset=True) == variant


@pytest.mark.parametrize(
    ("runtime", "extra", "message"),
    [
        (RouterRuntime, {"variants": []}, "router 'iris': parameters.extra.variants: List should have at least 1 item"),
        (
            RouterRuntime,
            {"variants": [{"name": "a", "uri": "models:/iris/1", "version": "1", "weight": 120}]},
            "parameters.extra.variants.0.weight: Input should be less than or equal to 100",
        ),
        (
            RouterRuntime,
            {"variants": [{"name": "a", "uri": "models:/iris/1", "version": "1", "weight": 100}], "fallbak": True},
            "parameters.extra.fallbak: Extra inputs are not permitted",
        ),
        (RegistrySKLearnRuntime, {"allow_pickle": "perhaps"}, "model 'iris': parameters.extra.allow_pickle: Input should be a valid boolean"),
    ],
)
def test_settings_that_break_the_contract_are_refused_naming_the_field(runtime, extra, message):
    model = runtime(ModelSettings(name="iris", implementation=runtime, parameters=ModelParameters(uri="models:/iris/1", extra=extra)))
    with pytest.raises(ModelLoadError) as err:
        asyncio.run(model.load_model())
    assert message in str(err.value)


def test_the_patches_refuse_an_mlserver_they_were_not_tested_with():
    import mlserver

    from runtimes import mlserver_patches

    mlserver_patches.check_version(mlserver.__version__)  # the installed one is the tested one
    with pytest.raises(mlserver_patches.UntestedMLServer, match=r"MLServer 1\.8\.0 is installed; .* patch MLServer 1\.7\.1 .* install mlserver==1\.7\.1"):
        mlserver_patches.check_version("1.8.0")


def run_python(code: str) -> subprocess.CompletedProcess:
    """In a fresh interpreter: this session has imported MLServer in ways that are not the point here."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_importing_the_runtimes_changes_nothing_in_mlserver():
    """Only the serving entry point changes MLServer; the CLI, the tests and `mlserver start` import the runtimes as they are."""
    proc = run_python(
        "import sys, fastapi, uvicorn, mlserver.server as server, mlserver.grpc.converters as conv, mlserver.grpc.utils as gu\n"
        "from mlserver.grpc.server import GRPCServer\n"
        "from mlserver.grpc.servicers import InferenceServicer\n"
        "from mlserver.parallel.dispatcher import Dispatcher\n"
        "from mlserver.parallel.model import ParallelModel\n"
        "state = lambda: (fastapi.FastAPI.__call__, uvicorn.Server.serve, server.MLServer.stop, server.MLServer._create_servers,\n"
        "    conv.ModelInferRequestConverter.__dict__['to_types'], Dispatcher._get_worker, ParallelModel.load, dict(gu.STATUS_CODE_MAPPING),\n"
        "    GRPCServer._create_server, InferenceServicer.ModelInfer)\n"
        "before = state()\n"
        "import runtimes.registry_sklearn, runtimes.router, runtimes.rest, runtimes.grpc_edge, runtimes.drain, runtimes.feedback\n"
        "assert state() == before, 'an import changed MLServer'\n"
        "assert 'runtimes.mlserver_patches' not in sys.modules\n"
        "from runtimes import mlserver_patches; mlserver_patches.apply()\n"
        "assert state() != before  # the check above would see a patch\n"
        "print('ok')"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_serving_entry_point_refuses_an_untested_mlserver_before_serving():
    proc = run_python(
        "import sys, mlserver; mlserver.__version__ = '1.8.0'\n"
        "from runtimes import server\n"
        f"sys.argv = ['runtimes.server', 'start', {str(REPO / MODEL_SETTINGS_DIR)!r}]\n"
        "server.main()"
    )
    assert proc.returncode != 0 and "MLServer 1.8.0 is installed" in proc.stderr and "install mlserver==1.7.1" in proc.stderr, proc.stderr
    assert "HTTP server running" not in proc.stderr + proc.stdout
