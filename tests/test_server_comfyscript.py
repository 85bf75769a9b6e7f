"""End to end with ComfyScript (PyPI `comfy-script`, a Python front end for ComfyUI servers) against a real
uvicorn server with the shipped model: it reads /object_info, builds its node functions from it, queues the
workflow its Python code describes, follows /ws and fetches the saved image through /view. The client runs in a
child process: its watcher thread retries for ever once the server is gone, and dies with that process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from comfy_models import build_models_folder
from live_server import LiveServer
from sd35fp8.server import create_app
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow import ModelFolders, PromptExecutor

pytest.importorskip("comfy_script", reason='pip install "comfy-script[client]"')
pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")

CLIENT = textwrap.dedent("""
    import sys
    from comfy_script.runtime import Workflow, load
    load(sys.argv[1] + "/")
    from comfy_script.runtime import nodes as n
    with Workflow(wait=True):
        model, clip, vae = n.CheckpointLoaderSimple("stable-diffusion-3.5-fp8.safetensors")
        pos = n.CLIPTextEncode("a red circle", clip)
        neg = n.CLIPTextEncode("", clip)
        latent = n.EmptySD3LatentImage(64, 64, 1)
        latent = n.KSampler(model, 5, 3, 4.0, "euler", "normal", pos, neg, latent, 1)
        latent = n.LatentFlip(latent, "y-axis: horizontally")  # a node new in session 29, from /object_info
        saved = n.SaveImage(n.VAEDecode(latent, vae), "cs")
    (img,) = saved.wait().wait()  # the node's result, then its images fetched through /view
    img.save(sys.argv[2])
""")


def test_comfyscript_end_to_end(tmp_path):
    from PIL import Image

    models = build_models_folder(tmp_path)
    folders = ModelFolders(models, output_dir=tmp_path / "output", input_dir=tmp_path / "input",
                           temp_dir=tmp_path / "temp")
    app = create_app(models, executor=PromptExecutor(folders, device="cpu"))
    script = tmp_path / "client.py"  # a file: ComfyScript reads the source of the code that builds the workflow
    script.write_text(CLIENT)
    with LiveServer(app, timeout=20) as srv:
        done = subprocess.run([sys.executable, str(script), srv.url, str(tmp_path / "fetched.png")],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = (tmp_path / "output").rglob("cs_*.png")
    fetched, saved = Image.open(tmp_path / "fetched.png"), Image.open(path)
    assert saved.size == (64, 64) and list(fetched.convert("RGB").getdata()) == list(saved.convert("RGB").getdata())
