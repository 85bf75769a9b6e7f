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
