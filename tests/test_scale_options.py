"""`sd35fp8 serve` replica flags (scale/options.py) -> create_ray_app's keywords."""

from __future__ import annotations

import pytest

from sd35fp8.cli import build_parser
from sd35fp8.scale.options import scale_options


def opts(*argv: str):
    return scale_options(build_parser().parse_args(["serve", "--models", "m", *argv]))


def test_no_replica_flags_is_the_plain_server():
    assert opts() is None


def test_replicas_and_autoscaling():
    assert opts("--replicas", "2") == {"replicas": 2, "ray_address": None, "attach": False, "app_name": "sd35fp8",
                                       "deployment": {"max_ongoing_requests": 1, "num_cpus": 1.0}}
    o = opts("--ray-address", "auto", "--attach", "--max-replicas", "4", "--replica-gpus", "1")
    assert o["attach"] and o["ray_address"] == "auto"
    assert o["deployment"] == {"max_ongoing_requests": 1, "num_cpus": 1.0, "num_gpus": 1.0, "min_replicas": None,
                               "max_replicas": 4}


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit):
        opts("--replicas", "0")


def test_replicas_get_the_engine_options(monkeypatch, tmp_path):
    """`serve --replicas N --compile/--offload`: serve() hands compile / offload to create_ray_app, which
    starts every replica (EngineReplica -> PromptExecutor) with them; with --attach they are refused."""
    from sd35fp8.scale import ray_serve
    from sd35fp8.scale.replica import EngineReplica
    from sd35fp8.server import stop_app

    seen = {}

    def fake_start_engines(models_dir, **kw):
        seen.update(kw)
        return object()  # the deployment handle; no prompt runs in this test

    monkeypatch.setattr(ray_serve, "start_engines", fake_start_engines)
    app = ray_serve.create_ray_app(tmp_path / "models", tmp_path / "out", replicas=2, compile=False,
                                   offload="model", state_dir=None, attention="bf16", cache_threshold=0.5,
                                   preview_method="latent2rgb")
    stop_app(app, timeout=0)
    assert seen["compile"] is False and seen["offload"] == "model" and seen["replicas"] == 2
    # the executor options create_app would only give its own executor reach the replicas too (they were lost)
    assert seen["engine"] == {"attention": "bf16", "cache_threshold": 0.5, "preview_method": "latent2rgb"}
    replica = EngineReplica(tmp_path / "models", device="cpu", compile=False, offload="sequential",
                            engine=seen["engine"])
    assert replica.info()["offload"] == "sequential" and replica.info()["compile"] is False
    options = replica.executor.engine_options
    assert options.offload == "sequential" and options.attention == "bf16" and options.cache_threshold == 0.5
    assert replica.executor.preview_method == "latent2rgb"


def test_attach_refuses_engine_options():
    pytest.importorskip("ray.serve")
    from sd35fp8.errors import InputError
    from sd35fp8.scale.ray_serve import start_engines

    with pytest.raises(InputError, match="put compile / offload in that config"):
        start_engines("models", attach=True, offload="model")
