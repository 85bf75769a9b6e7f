"""The command line as a new user meets it (issue 26): results go where asked and never over a
tracked file, output paths and formats are checked before any work, img2img / inpainting / a
separate VAE / random seeds from `generate`, long prompts explained, exact names for bad --set
targets and node types."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from sd35fp8.cli import main
from sd35fp8.tiny import SHIPPED_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "1", "--width", "32", "--height", "32"]


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_default_output_is_a_new_file_in_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for expected in ("sd35fp8_00001.png", "sd35fp8_00002.png"):
        rc, out, err = _run(["generate", "a red circle", *FAST], capsys)
        assert rc == 0, err
        assert out.strip() == expected and (tmp_path / expected).is_file()


def test_output_checked_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    tracked = ROOT / "benchmarks" / "results" / "tiny_eval_cpu.png"
    for path, message in ((tmp_path / "missing" / "x.png", "does not exist"),
                          (blocker / "x.png", "does not exist"),
                          (tmp_path / "x.gif", "cannot save images as '.gif'"),
                          (tracked, "tracked by git; pass --force")):
        rc, _, err = _run(["generate", "x", "-o", str(path)], capsys)
        assert rc != 0 and message in err, err
        assert "loaded" not in err and "MMDiT" not in err  # no model was loaded


def test_jpeg_and_webp_carry_the_parameters_and_random_seed(tmp_path, capsys):
    for suffix in ("jpg", "webp"):
        path = tmp_path / f"out.{suffix}"
        rc, _, err = _run(["generate", "a blue square", *FAST, "--seed", "random", "-o", str(path)], capsys)
        assert rc == 0, err
        seed = int(err.split("sd35fp8: seed ")[1].split()[0])
        with Image.open(path) as im:
            assert im.format == {"jpg": "JPEG", "webp": "WEBP"}[suffix]
            comment = im.getexif().get_ifd(0x8769)[0x9286]
        params = json.loads(comment[8:].decode("ascii"))
        assert params["seed"] == seed and params["prompt"] == "a blue square"


def test_img2img_inpainting_and_separate_vae(tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 16, 32, 32))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "inpaint.png"
    rc, _, err = _run(["generate", "a blue square", "--steps", "2", "--image", str(init), "--mask",
                       str(tmp_path / "mask.png"), "--denoise", "1.0", "--vae", str(SHIPPED_CHECKPOINT),
                       "-o", str(out)], capsys)
    assert rc == 0, err
    with Image.open(out) as im:
        params = json.loads(im.info["sd35fp8"])
        assert im.size == (32, 32) and params["denoise"] == 1.0
    for argv, message in ((["--mask", str(init)], "--mask needs --image"),
                          (["--denoise", "0.5"], "--denoise needs --image"),
                          (["--image", str(tmp_path / "nope.png")], "no such file")):
        rc, _, err = _run(["generate", "x", *argv, "-o", str(tmp_path / "y.png")], capsys)
        assert rc != 0 and message in err, err


def test_long_prompt_warning_says_what_the_encoders_see(tmp_path, capsys):
    prompt = " ".join(["a red circle above a blue square"] * 20)
    rc, _, err = _run(["generate", prompt, *FAST, "-o", str(tmp_path / "long.png")], capsys)
    assert rc == 0, err
    assert "longer than one 77-token CLIP window" in err and "2 windows of 77 tokens" in err
    assert "T5 sees all" in err


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "sd35fp8", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "generate" in done.stdout


def test_run_checks_its_output_folder_first(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    wf = ROOT / "examples" / "workflows" / "shipped_api.json"
    rc, _, err = _run(["run", str(wf), "--models", str(tmp_path), "--output", str(blocker / "out")], capsys)
    assert rc != 0 and f"--output {blocker / 'out'}: cannot write there" in err and "node 3" not in err, err


def test_set_names_unknown_inputs(tmp_path, capsys):
    wf = ROOT / "examples" / "workflows" / "shipped_api.json"
    rc, _, err = _run(["run", str(wf), "--set", "3.sed=42"], capsys)
    assert rc != 0 and "node 3 (KSampler) has no input 'sed'" in err and "seed" in err, err


def test_eval_leaves_the_checkout_clean(capsys):
    """`sd35fp8 eval` run from the repo root writes a new ignored file, never over the committed results."""
    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout

    before = status()
    done = subprocess.run([sys.executable, "-m", "sd35fp8", "eval", "--n", "1", "--steps", "1", "--size", "32",
                           "--modes", "bf16", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    made = sorted(ROOT.glob("tiny_eval_cpu_[0-9][0-9][0-9][0-9][0-9].*"))
    try:
        assert done.returncode == 0, done.stderr[-2000:]
        assert made and status() == before
        assert "1 images: 100%" in done.stderr  # the progress bar
    finally:
        for path in made:
            path.unlink()


def test_examples_models_folder_and_workflows(tmp_path, capsys):
    """examples/: the models folder built from the shipped files runs the API- and the UI-format
    workflow, and both give generate's pixels."""
    import runpy

    import numpy as np

    from sd35fp8 import SD35Pipeline

    models = runpy.run_path(str(ROOT / "examples" / "make_models_folder.py"))["build"](tmp_path / "models")
    assert (models / "checkpoints" / "sd35fp8_tiny.safetensors").resolve() == SHIPPED_CHECKPOINT.resolve()
    images = []
    for name in ("shipped_api.json", "shipped_ui.json"):
        out = tmp_path / name
        rc, stdout, err = _run(["run", str(ROOT / "examples" / "workflows" / name), "--models", str(models),
                                "--output", str(out), "--set", "3.steps=2"], capsys)
        assert rc == 0, err
        assert "node 3: 100%" in err and "2/2" in err  # the sampling progress bar
        (png,) = sorted(out.glob("*.png"))
        images.append(np.asarray(Image.open(png).convert("RGB")))
    pipe = SD35Pipeline.from_pretrained(models / "checkpoints" / "sd35fp8_tiny.safetensors", device="cpu")
    ref = pipe.generate("a red circle above a blue square", negative_prompt="", num_inference_steps=2,
                        guidance_scale=4.0, seed=13, sampler="euler_ancestral", scheduler="normal",
                        progress=False).images[0]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], np.asarray(ref))


def test_serve_draws_a_progress_bar_per_prompt(tmp_path):
    """`sd35fp8 serve` (a real process, the example models folder): each prompt's sampling steps show as a
    bar on the server's stderr, labelled with the prompt id."""
    import runpy
    import signal
    import time
    import urllib.request

    from live_server import free_port

    models = runpy.run_path(str(ROOT / "examples" / "make_models_folder.py"))["build"](tmp_path / "models")
    graph = json.loads((ROOT / "examples" / "workflows" / "shipped_api.json").read_text())
    graph["3"]["inputs"]["steps"] = 2
    graph["5"]["inputs"].update(width=32, height=32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    err = tmp_path / "stderr.txt"
    with open(err, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "sd35fp8", "serve", "--models", str(models), "--port", str(port),
                                 "--device", "cpu", "--state-dir", "none"], stdout=subprocess.DEVNULL, stderr=errf)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/ready", timeout=5):
                        break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
                    time.sleep(0.5)
            body = json.dumps({"prompt": graph}).encode()
            req = urllib.request.Request(f"{url}/prompt", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                pid = json.load(r)["prompt_id"]
            while True:
                with urllib.request.urlopen(f"{url}/history/{pid}", timeout=30) as r:
                    if json.load(r).get(pid, {}).get("status", {}).get("completed"):
                        break
                assert time.monotonic() < deadline, err.read_text()[-2000:]
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    text = err.read_text()
    assert f"prompt {pid[:8]} node 3: 100%" in text and "2/2" in text, text[-2000:]


def test_quantize_shows_its_progress(tiny_random_checkpoint, tmp_path, capsys):
    path, _ = tiny_random_checkpoint
    rc, _, err = _run(["quantize", str(path), str(tmp_path / "q.safetensors"), "--mode", "dynamic"], capsys)
    assert rc == 0, err
    assert "writing q.safetensors: 100%" in err


def test_unknown_node_type_named_by_class_type_and_id(tmp_path, capsys):
    """A node type nobody defines is reported under its class_type and node id (not its title), and a
    ComfyUI core node sd35fp8 lacks is not called a custom node."""
    graph = json.loads((ROOT / "examples" / "workflows" / "shipped_api.json").read_text())
    graph["3"]["class_type"] = "FooBarNode"
    graph["3"]["_meta"] = {"title": "KSampler"}
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph))
    rc, _, err = _run(["run", str(wf), "--models", str(tmp_path)], capsys)
    assert rc != 0 and "node type 'FooBarNode' not found" in err and "#3" in err, err
    assert "not a ComfyUI core node" in err
    graph["3"]["class_type"] = "FreeU_V2"
    wf.write_text(json.dumps(graph))
    rc, _, err = _run(["run", str(wf), "--models", str(tmp_path)], capsys)
    assert rc != 0 and "'FreeU_V2' not found; it is a ComfyUI core node that sd35fp8 does not implement" in err, err


def test_serve_warns_about_a_models_folder_without_models(tmp_path):
    """`sd35fp8 serve --models DIR` starts anyway (models may be added while it runs, as with ComfyUI), but says
    when DIR is missing, a file, or holds no model file."""
    from sd35fp8.cli.serve import models_folder_warning

    assert "does not exist" in models_folder_warning(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    assert "is a file" in models_folder_warning(str(tmp_path / "file"))
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    assert "no model file" in models_folder_warning(str(tmp_path / "models"))
    (tmp_path / "models" / "checkpoints" / "a.safetensors").write_bytes(b"")
    assert models_folder_warning(str(tmp_path / "models")) is None
