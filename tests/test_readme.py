"""The README's commands: the first set-up command's `sd35fp8 generate` runs as written (the install
part is what CI itself does), the second is exactly what .ci/run runs; every other `sd35fp8` command
parses, and those whose files ship with the repository run."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from sd35fp8.tiny.detector import score_caption_image

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_commands():
    run, test = _setup_commands()
    assert "sd35fp8 generate" in run and "torch==2.13.0" in run
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_generate_command(tmp_path):
    run, _ = _setup_commands()
    generate = shlex.split(run.split("&&")[-1])
    assert generate[:2] == ["sd35fp8", "generate"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(generate, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / generate[generate.index("-o") + 1]
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (128, 128, 3)
    assert score_caption_image(image, generate[2])["correct"]


def _readme_cli_commands() -> list[list[str]]:
    """Every `sd35fp8 ...` command in the README's code blocks (line continuations joined)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in text.split("```bash\n")[1:]:
        body = block.split("```", 1)[0].replace("\\\n", " ")
        for line in body.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("sd35fp8 "):
                    commands.append(shlex.split(part)[1:])
    return commands


def test_readme_cli_examples_parse():
    """The README's command examples use real subcommands and flags (the shipped-model ones also run)."""
    from sd35fp8.cli import build_parser

    commands = _readme_cli_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # exits (SystemExit) on an unknown subcommand or flag


def test_readme_commands_on_shipped_files_run(tmp_path, monkeypatch, capsys):
    """Every README command whose files all ship with the repository runs here (its -o redirected to a
    temporary folder). Not run: those naming the user's own SD3.5 files or models folder (parsed above),
    `serve` (tests/test_cli_dayone.py serves the example models folder), and the bare `eval` (100 images;
    tests/test_cli_dayone.py runs it with --n 1 from the repo root)."""
    from sd35fp8.cli import main

    monkeypatch.chdir(ROOT)
    ran = []
    for argv in _readme_cli_commands()[1:]:  # the first one: test_readme_generate_command
        files = [a.split(":")[0] for a in argv if a.endswith((".safetensors", ".json")) or ".safetensors:" in a]
        files += [argv[i + 1] for i, a in enumerate(argv) if a in ("--model", "--models")]  # repo ids, folders
        outputs = {argv[i + 1] for i, a in enumerate(argv) if a in ("-o", "--out")}
        if argv[0] in ("serve", "eval") or not all((ROOT / f).is_file() for f in files if f not in outputs):
            continue
        argv = [str(tmp_path / a) if a in outputs else a for a in argv]
        assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
        ran.append(argv[0])
    assert ran == ["generate", "samplers", "info", "generate"], ran  # the first: --cache-threshold on the shipped model


def test_readme_diffusers_snippet_runs_on_the_shipped_model(tmp_path, monkeypatch):
    """The Python section's first snippet (the diffusers-style call), with only the model id, device,
    size and steps swapped for the shipped model on the CPU: the rest runs as written."""
    from sd35fp8.tiny import SHIPPED_CHECKPOINT

    section = (ROOT / "README.md").read_text().split("\n## Python\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from sd35fp8 import StableDiffusion3Pipeline" in code and "generator=torch.Generator" in code
    swaps = {'"stabilityai/stable-diffusion-3.5-large"': repr(str(SHIPPED_CHECKPOINT)), 'pipe.to("cuda")': 'pipe.to("cpu")',
             "torch_dtype=torch.bfloat16": "torch_dtype=torch.float32", "num_inference_steps=28": "num_inference_steps=2",
             "height=1024, width=1024": "height=128, width=128"}
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Python)", "exec"), {})
    assert Image.open(tmp_path / "cat.png").size == (128, 128)
