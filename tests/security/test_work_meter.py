"""The work a prompt really samples is metered against the server's budget (sd35fp8.work_budget), not only the
widths / heights / steps the graph names before it runs (validation.prompt_work): a graph that upscales its latent
after the check stops with an execution error at the sampler that would pass the budget, and nothing is a 500.
The shipped model on the CPU."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from comfy_models import tiny_base_prompt, tiny_checkpoint_folder
from sd35fp8.server import create_app
from sd35fp8.server.validation import Limits, prompt_work
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.work_budget import WorkBudgetExceeded, WorkMeter, charge_sampling, metered

pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
BUDGET = 64 * 64 * 4  # the static estimate of both graphs below, exactly


def test_meter_charges_what_runs():
    charge_sampling((1, 16, 8, 8), 100)  # no meter: nothing counted, nothing raised
    with metered(WorkMeter(64 * 64 * 6)) as m:
        charge_sampling((1, 16, 8, 8), 4)  # 64 x 64 px, batch 1, 4 steps
        assert m.used == 64 * 64 * 4
        with pytest.raises(WorkBudgetExceeded, match="--max-pixel-steps"):
            charge_sampling((2, 16, 8, 8), 2)  # 64 x 64 x 2 x 2 would pass 6 x 64 x 64
        assert m.used == 64 * 64 * 4  # a refused run counts nothing
        charge_sampling((1, 16, 8, 8), 1, growth=1.4)  # SamplerLCMUpscale: the grown area
        assert m.used == 64 * 64 * 4 + int(64 * 64 * 1.4 ** 2)
        with metered(None):  # an unmetered stretch inside
            charge_sampling((1, 16, 64, 64), 1000)
        assert m.used == 64 * 64 * 4 + int(64 * 64 * 1.4 ** 2)


def _ksampler(latent: list, steps: int) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 1, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": latent, "denoise": 1.0}}


def _run(c: TestClient, prompt: dict) -> dict:
    r = c.post("/prompt", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    for _ in range(1200):
        hist = c.get(f"/history/{pid}").json()
        if pid in hist and hist[pid]["status"]["completed"] is not None:
            return hist[pid]
        time.sleep(0.1)
    raise AssertionError("the prompt did not finish")


def test_upscaled_latent_is_metered(tmp_path):
    root = tiny_checkpoint_folder(tmp_path)
    app = create_app(root / "models", root / "output", device="cpu", allow_hosts=("testserver",),
                     serve_frontend=False, limits=Limits(max_pixel_steps=BUDGET))
    base = tiny_base_prompt()  # 64 x 64, batch 1
    within = {**base, "5": _ksampler(["4", 0], 2), "6": _ksampler(["5", 0], 2),
              "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "ok"}}}
    grown = {**base, "5": _ksampler(["4", 0], 2),
             "8": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["5", 0], "upscale_method": "nearest-exact",
                                                               "scale_by": 2.0}},
             "6": _ksampler(["8", 0], 2),
             "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "grown"}}}
    assert prompt_work(within) == prompt_work(grown) == BUDGET  # the check before running passes both
    with TestClient(app) as c:
        ok = _run(c, within)
        assert ok["status"]["status_str"] == "success", ok["status"]
        bad = _run(c, grown)
        assert bad["status"]["status_str"] == "error"
        (error,) = [m[1] for m in bad["status"]["messages"] if m[0] == "execution_error"]
        assert error["node_id"] == "6" and "--max-pixel-steps" in error["exception_message"]
        assert error["exception_type"].endswith("WorkBudgetExceeded")
        assert c.get("/health").status_code == 200
