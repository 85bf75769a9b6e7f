"""`sd35fp8 serve --gpus-per-image K` (scale/gpus.py) on the CPU: K gloo processes behind one server.

Real server processes on the example models folder (the shipped model): `python -m sd35fp8 serve
--gpus-per-image 2` (it spawns rank 1 itself; sequence parallel 2, 3 heads padded to 4) and the README's
`torchrun ... -m sd35fp8 serve --gpus-per-image 2 --cfg-parallel 2`. A prompt through ComfyUI's POST
/prompt gives the image one process gives, within tests/test_scale_parallel.py's IMG_TOL uint8 levels
(float32; only GEMM row counts differ). An interrupt sent while the sampler runs stops both ranks at the
same step (the next prompt still runs on both); SIGTERM stops the server with exit code 0 and rank 1
gone. The flag errors come before any process starts.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd35fp8.cli import main
from sd35fp8.errors import InputError
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from test_scale_parallel import IMG_TOL

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")


def _graph(steps: int = 4, seed: int = 13) -> dict:
    graph = json.loads((ROOT / "examples" / "workflows" / "shipped_api.json").read_text())
    graph["3"]["inputs"].update(steps=steps, seed=seed)
    graph["5"]["inputs"].update(width=64, height=64)  # 4x4 image tokens: split over 2 ranks
    return graph


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r) if r.headers.get("Content-Type", "").startswith("application/json") else None


class Server:
    """`python -m sd35fp8 serve ... --gpus-per-image 2` on a free port, stderr in a file."""

    def __init__(self, tmp: Path, argv: list[str]):
        """argv: the command up to its serve flags; the port, output folder, CPU and no journal are added."""
        from live_server import free_port

        self.port, self.err_path, self.output = free_port(), tmp / "stderr.txt", tmp / "output"
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [*argv, "--output", str(self.output), "--port", str(self.port), "--device", "cpu", "--state-dir", "none",
                "--no-progress"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        self.out_path = tmp / "stdout.txt"
        with open(self.err_path, "w") as err, open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + 120
        while True:
            try:
                _get(f"{self.url}/ready")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise AssertionError(f"the server did not start: {self.log()}") from None
                time.sleep(0.3)

    def log(self) -> str:
        return self.out_path.read_text()[-2000:] + self.err_path.read_text()[-3000:]

    def run(self, graph: dict, timeout: float = 120) -> tuple[str, dict]:
        pid = _post(f"{self.url}/prompt", {"prompt": graph})["prompt_id"]
        return pid, self.wait(pid, timeout)

    def wait(self, pid: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            entry = _get(f"{self.url}/history/{pid}").get(pid)
            if entry is not None:
                return entry
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log()
            time.sleep(0.2)

    def image(self, entry: dict) -> np.ndarray:
        (img,) = entry["outputs"]["9"]["images"]
        return np.asarray(Image.open(self.output / img["subfolder"] / img["filename"])).astype(int)

    def pids(self) -> tuple[int, list[int]]:
        """(rank 0's pid, the spawned ranks' pids) from the start-up line."""
        banner = self.out_path.read_text()
        leader = int(banner.split("rank 0 (pid ")[1].split(")")[0])
        return leader, [int(p) for p in banner.split("(pids ")[1].split(")")[0].split()] if "(pids " in banner else []

    def stop(self, pid: int | None = None) -> int:
        """SIGTERM to `pid` (default: the process started) and wait for the process started."""
        os.kill(self.proc.pid if pid is None else pid, signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _one_process_image(models: Path, graph: dict, out: Path) -> np.ndarray:
    from sd35fp8.workflow import ModelFolders, PromptExecutor

    result = PromptExecutor(ModelFolders(models, output_dir=out), device="cpu").execute(graph, "reference")
    assert result.success, result.error
    (img,) = result.outputs["9"]["images"]
    return np.asarray(Image.open(out / img["filename"])).astype(int)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpus")
    return runpy.run_path(str(ROOT / "examples" / "make_models_folder.py"))["build"](root / "models")


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> np.ndarray:
    return _one_process_image(models, _graph(), tmp_path_factory.mktemp("reference"))


def test_serve_gpus_per_image_matches_one_process(models, reference, tmp_path):
    """Sequence parallel 2 (serve spawns rank 1): the image, an interrupt mid-sampling (both ranks stop at one
    step and stay in step: the next prompt runs), SIGTERM (exit 0, rank 1 gone)."""
    srv = Server(tmp_path, [sys.executable, "-m", "sd35fp8", "serve", "--models", str(models), "--gpus-per-image", "2"])
    try:
        banner = srv.out_path.read_text()
        assert "one image on 2 processes (cpu: cfg parallel 1 x sequence parallel 2)" in banner, banner
        _, (follower,) = srv.pids()
        _, entry = srv.run(_graph())
        assert entry["status"]["status_str"] == "success", entry["status"]
        diff = np.abs(srv.image(entry) - reference)
        assert diff.max() <= IMG_TOL, (diff.max(), diff.mean())
        # an interrupt mid-sampling stops both ranks at one step; the ranks stay in step after it
        long = _post(f"{srv.url}/prompt", {"prompt": _graph(steps=5000, seed=1)})["prompt_id"]
        deadline = time.monotonic() + 60
        while not any(item[1] == long for item in _get(f"{srv.url}/queue")["queue_running"]):
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        time.sleep(1.0)  # into the sampler (the models are cached from the first prompt)
        _post(f"{srv.url}/interrupt", {"prompt_id": long})
        stopped = srv.wait(long, timeout=60)
        events = [m[0] for m in stopped["status"]["messages"]]
        assert "execution_interrupted" in events, stopped["status"]
        interrupted = next(m[1] for m in stopped["status"]["messages"] if m[0] == "execution_interrupted")
        assert interrupted["node_id"] == "3", interrupted  # the KSampler: between two sampler steps
        _, again = srv.run(_graph())
        assert again["status"]["status_str"] == "success", again["status"]
        assert np.abs(srv.image(again) - reference).max() <= IMG_TOL
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
    deadline = time.monotonic() + 10
    while _alive(follower):
        assert time.monotonic() < deadline, f"rank 1 (pid {follower}) still runs after the server stopped"
        time.sleep(0.2)


def test_readme_torchrun_serve_command(models, reference, tmp_path):
    """The README's `torchrun ... -m sd35fp8 serve ... --cfg-parallel 2` line (its models folder: the example
    one; torchrun = this python's torch.distributed.run): rank 0 serves, rank 1 follows, the image is the
    one-process image; SIGTERM to rank 0 drains it and stops rank 1, so torchrun sees both exit 0."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    (line,) = [ln.split("#")[0] for ln in readme.splitlines() if ln.startswith("torchrun ") and "sd35fp8 serve" in ln]
    argv = [str(models) if a == "models" else a for a in shlex.split(line)]
    srv = Server(tmp_path, [sys.executable, "-m", "torch.distributed.run", *argv[1:]])
    try:
        banner = srv.out_path.read_text()
        assert "(cpu: cfg parallel 2 x sequence parallel 1)" in banner and "ranks 1..1 from torchrun follow" in banner, \
            srv.log()
        _, entry = srv.run(_graph())
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert np.abs(srv.image(entry) - reference).max() <= IMG_TOL
    finally:
        rc = srv.stop(srv.pids()[0])
    assert rc == 0, srv.log()


@pytest.mark.parametrize("argv,message", [
    (["--gpus-per-image", "3", "--cfg-parallel", "2"], "--cfg-parallel 2 needs an even --gpus-per-image"),
    (["--cfg-parallel", "2"], "--cfg-parallel 2 needs --gpus-per-image 2 or more"),
    (["--gpus-per-image", "2", "--replicas", "2"], "does not combine with --replicas"),
    (["--gpus-per-image", "2", "--offload", "model"], "--offload model does not combine with --gpus-per-image"),
    (["--gpus-per-image", "2", "--device", "cpu:0"], "names one GPU"),
])
def test_serve_gpus_per_image_flag_errors(argv, message, capsys, tmp_path, monkeypatch):
    """Refused in one line before any process starts or model loads."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if "--device" not in argv:
        argv = [*argv, "--device", "cpu"]
    assert main(["serve", "--models", str(tmp_path), "--state-dir", "none", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_gpus_per_image_checks_the_gpu_count_and_torchrun(monkeypatch):
    import torch

    from sd35fp8.scale.gpus import RankOptions, check_layout, start_ranks

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"--gpus-per-image 2 needs 2 GPUs on this machine, 1 visible"):
        check_layout(2, 1, "cuda")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InputError, match="torchrun started 4 processes"):
        start_ranks(RankOptions(world=2))
