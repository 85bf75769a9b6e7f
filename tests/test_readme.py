"""The README's commands. README_COMMANDS lists every command of its code blocks and where it runs:
here (the first set-up command's `sd35fp8 generate` as written; the user's files the other commands name
replaced by stand-ins made from the shipped model, under the same names), in the test named for it, or
why it cannot run in CI (a GPU, a real 16 GB model, a Ray cluster); a command missing from the list fails
test_every_readme_command_is_accounted_for. The second set-up command is exactly what .ci/run runs."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
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


# Every command of the README's code blocks (a bash line with its continuations, or a python block by its
# first line) -> where it runs: HERE (on the stand-ins below), a test that runs it ("tests/FILE.py::TEST",
# checked to exist), or "not run: why". test_every_readme_command_is_accounted_for keeps this complete.
HERE = "here"
README_COMMANDS = {
    # set-up
    'python -m pip install torch==2.13.0 && python -m pip install -e . && sd35fp8 generate "a red circle above a '
    'blue square" --seed 13 -o out.png': "tests/test_readme.py::test_readme_generate_command",  # the install: CI
    'python -m pip install torch==2.13.0 && python -m pip install -q -e ".[test]" && python -m pytest -q':
        "tests/test_readme.py::test_readme_starts_with_two_commands",  # exactly .ci/run, which CI runs
    # Command line
    'sd35fp8 generate "a photo of a cat" --model sd3.5_large.safetensors --clip-l clip_l.safetensors --clip-g '
    'clip_g.safetensors --t5xxl t5xxl_fp16.safetensors -o cat.png': HERE,
    'sd35fp8 generate "a cat" --model stabilityai/stable-diffusion-3.5-medium --steps 40 --cfg 4.5 --sampler dpmpp_2m '
    '--scheduler sgm_uniform --seed 7 --width 1024 --height 768 --batch 2 -o cat.png':
        "not run: the real Medium in the Hugging Face cache (1024x768 is beyond the shipped model's 256-pixel grid); "
        "flags parsed in test_readme_cli_examples_parse, repo ids in tests/test_checkpoints.py::test_hf_cache_repo_id",
    'sd35fp8 generate "a cat" --model sd3.5_large_fp8_scaled.safetensors --compile -o cat.png':
        "not run: GPU only (--compile needs CUDA); the compiled step: tests/test_fast.py::test_compiled_graphed_"
        "matches_eager_gpu on a GPU; the same line without --compile runs here as the LoRA line's base",
    'sd35fp8 generate "a red circle" --sampler euler --steps 28 --cache-threshold -o circle.png': HERE,
    "sd35fp8 info sd3.5_large_fp8_scaled.safetensors": HERE,
    "sd35fp8 samplers": HERE,
    "sd35fp8 quantize sd3.5_large.safetensors sd3.5_large_fp8_scaled.safetensors --format comfy": HERE,
    "sd35fp8 calibrate sd3.5_large.safetensors --clip-l clip_l.safetensors --clip-g clip_g.safetensors --t5xxl "
    "t5xxl_fp16.safetensors --out recipe.json": HERE + ", shortened: --num-prompts 2 (the 32 default trajectories "
    "and their scoring take 20-100 s on 2 CPU cores)",
    "sd35fp8 run workflow.json --models ~/ComfyUI/models --set 3.seed=42": HERE,
    "sd35fp8 serve --models ~/ComfyUI/models --port 8188":
        "tests/test_cli_dayone.py::test_serve_draws_a_progress_bar_per_prompt",  # the example models folder
    "sd35fp8 eval": "not run as written (100 images x 4 modes: minutes on the CPU); "
                    "tests/test_cli_dayone.py::test_eval_leaves_the_checkout_clean runs it with --n 1",
    # Python
    "import torch\nfrom sd35fp8 import StableDiffusion3Pipeline":
        "tests/test_readme.py::test_readme_diffusers_snippet_runs_on_the_shipped_model",
    "import torch\nfrom sd35fp8 import SD35Pipeline, load_mmdit, load_vae":
        "tests/test_readme.py::test_readme_native_snippet_runs_on_stand_ins",
    # LoRA
    "sd35fp8 info src/sd35fp8/tiny/weights/sd35fp8_tiny_brown_lora.safetensors": HERE,
    'sd35fp8 generate "a photo of a brown star" --lora src/sd35fp8/tiny/weights/sd35fp8_tiny_brown_lora.safetensors:1.0 '
    "--seed 1 -o brown.png": HERE,
    'sd35fp8 generate "a cat" --model sd3.5_large_fp8_scaled.safetensors --lora hands.safetensors:0.8 --lora '
    "style.safetensors:0.5 --lora-merge -o cat.png": HERE,
    'pipe = SD35Pipeline.from_pretrained("sd3.5_large_fp8_scaled.safetensors", t5xxl="t5xxl_fp16.safetensors")':
        "tests/test_readme.py::test_readme_lora_snippet_runs_on_stand_ins",
    # ComfyUI workflows and server
    "sd35fp8 serve --models ~/ComfyUI/models": "tests/test_cli_dayone.py::test_serve_draws_a_progress_bar_per_prompt",
    # Serving at scale
    "curl -s http://127.0.0.1:8188/v1/images/generations": "tests/test_openai_api.py::test_readme_curl_and_openai_examples",
    "import base64, openai": "tests/test_openai_api.py::test_readme_curl_and_openai_examples",
    "sd35fp8 serve --models ~/ComfyUI/models --replicas 2":
        "tests/test_scale_ray.py::test_twenty_concurrent_requests_each_get_their_image",  # create_ray_app, 2 CPU
    # replicas (the flags -> its keywords: tests/test_scale_options.py)
    "sd35fp8 serve --models /models --ray-address auto --attach --max-replicas 4":
        "not run: needs a Ray cluster running deploy/ray_serve.yaml (`serve deploy`); the config is validated and "
        "built in tests/test_scale_ray.py::test_deploy_config_is_valid_and_builds",
    "sd35fp8 serve --models ~/ComfyUI/models --gpus-per-image 2":
        "tests/test_scale_gpus.py::test_serve_gpus_per_image_matches_one_process",  # example folder, --device cpu
    "torchrun --nproc-per-node 2 -m sd35fp8 serve --models models --gpus-per-image 2 --cfg-parallel 2":
        "tests/test_scale_gpus.py::test_readme_torchrun_serve_command",
    'torchrun --nproc-per-node 2 -m sd35fp8.scale.parallel model.safetensors "a red cube" --cfg-parallel 2 --steps 4':
        "tests/test_scale_parallel.py::test_readme_torchrun_command",
}


SHORTENED = {"calibrate": ["--num-prompts", "2"]}  # flags added to a HERE command said to be shortened


def _readme_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block of the README."""
    parts = (ROOT / "README.md").read_text().split("```")
    return [(b.split("\n", 1)[0].strip(), b.split("\n", 1)[1]) for b in parts[1::2]]


def _readme_command_lines() -> list[str]:
    """Each bash command (continuations joined, comment dropped, spaces normalised) and each python block
    (its first line, or first two when the first is `import torch`)."""
    out = []
    for lang, body in _readme_blocks():
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                line = line.split(" # ", 1)[0].split("  #", 1)[0].strip()
                if line:
                    out.append(" ".join(line.split()) if not line.startswith("curl ") else line)
        elif lang == "python":
            lines = [ln.split("  #", 1)[0].rstrip() for ln in body.strip().splitlines()]
            out.append("\n".join(lines[:2]) if lines[0] == "import torch" else lines[0])
    return out


def test_every_readme_command_is_accounted_for():
    """Every README command runs here or in the test named for it, or says why it cannot run in CI."""
    commands = _readme_command_lines()
    keys = {k: [c for c in commands if c == k or (k.startswith("curl ") and c.startswith(k))] for k in README_COMMANDS}
    unlisted = [c for c in commands if not any(c in hits for hits in keys.values())]
    assert not unlisted, f"README commands with no entry in README_COMMANDS (run them or say why not): {unlisted}"
    stale = [k for k, hits in keys.items() if not hits]
    assert not stale, f"README_COMMANDS entries no longer in the README: {stale}"
    for where in README_COMMANDS.values():
        if where.startswith("tests/"):
            file, test = where.split("::")
            assert f"def {test}(" in (ROOT / file).read_text(), where
        else:
            assert where.startswith((HERE, "not run")), where


def _stand_ins(root: Path) -> Path:
    """The user's files the README names, made from the shipped model (with its metadata, so its 128-pixel
    defaults): sd3.5_large / sd3.5_medium (MMDiT + VAE, the official single-file layout), clip_l, clip_g,
    t5xxl_fp16 (+ spiece.model), sd3.5_large_fp8_scaled (all-in-one ComfyUI scaled fp8, as Comfy-Org's),
    hands / style (the shipped LoRA), workflow.json (the example API workflow), ComfyUI/models (the example
    models folder)."""
    import runpy
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from sd35fp8.checkpoints.export import export
    from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_T5_TOKENIZER

    def part(prefix: str) -> dict:
        with safe_open(str(SHIPPED_CHECKPOINT), framework="pt") as f:
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    with safe_open(str(SHIPPED_CHECKPOINT), framework="pt") as f:
        metadata = f.metadata()
    single = {**{f"model.diffusion_model.{k}": v for k, v in part("model.diffusion_model.").items()},
              **{f"first_stage_model.{k}": v for k, v in part("first_stage_model.").items()}}
    root.mkdir(parents=True, exist_ok=True)
    for name in ("sd3.5_large.safetensors", "sd3.5_medium.safetensors"):
        save_file(single, str(root / name), metadata=metadata)
    save_file(part("text_encoders.clip_l.transformer."), str(root / "clip_l.safetensors"))
    save_file(part("text_encoders.clip_g.transformer."), str(root / "clip_g.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in part("text_encoders.t5xxl.transformer.").items()},
              str(root / "t5xxl_fp16.safetensors"))
    shutil.copy(SHIPPED_T5_TOKENIZER, root / "spiece.model")
    export(SHIPPED_CHECKPOINT, root / "sd3.5_large_fp8_scaled.safetensors", fmt="comfy")
    lora = SHIPPED_CHECKPOINT.with_name("sd35fp8_tiny_brown_lora.safetensors")
    for name in ("hands.safetensors", "style.safetensors"):
        shutil.copy(lora, root / name)
    shutil.copy(ROOT / "examples" / "workflows" / "shipped_api.json", root / "workflow.json")
    runpy.run_path(str(ROOT / "examples" / "make_models_folder.py"))["build"](root / "ComfyUI" / "models")
    return root


def _stand_in_arg(arg: str, outputs: set, out: Path, stand_ins: Path) -> str:
    if arg in outputs:
        return str(out / arg)
    if arg == "~/ComfyUI/models":
        return str(stand_ins / "ComfyUI" / "models")
    if arg.startswith("src/"):  # a file of the repository (a LoRA path may end in :strength)
        return str(ROOT / arg)
    return arg


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    return _stand_ins(tmp_path_factory.mktemp("readme") / "files")


def test_readme_commands_run_on_stand_ins(stand_ins, tmp_path, monkeypatch, capsys):
    """Every README command marked HERE runs as written, in a folder of stand-ins for the user's files
    (`~/ComfyUI/models`: the example models folder; the repository's own files from the repo root); outputs
    (-o, --out, quantize's output) go to a temporary folder."""
    from sd35fp8.cli import main

    monkeypatch.chdir(stand_ins)
    out = tmp_path / "out"
    out.mkdir()
    ran = []
    for line, where in README_COMMANDS.items():
        if not where.startswith(HERE):
            continue
        assert ("shortened" in where) == (shlex.split(line)[1] in SHORTENED), line
        argv = shlex.split(line)[1:]
        outputs = {argv[i + 1] for i, a in enumerate(argv) if a in ("-o", "--out")}
        if argv[0] == "quantize":
            outputs.add(argv[2])
        argv = [_stand_in_arg(a, outputs, out, stand_ins) for a in argv]
        assert main([*argv, *SHORTENED.get(argv[0], [])]) == 0, (line, capsys.readouterr().err[-2000:])
        ran.append(argv[0])
    assert len(ran) == 10, ran
    assert (out / "recipe.json").is_file() and (out / "sd3.5_large_fp8_scaled.safetensors").is_file()


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


def _python_block(first_line: str) -> str:
    (code,) = [body for lang, body in _readme_blocks()
               if lang == "python" and any(ln.startswith(first_line) for ln in body.split("\n")[:2])]
    return code


def test_readme_native_snippet_runs_on_stand_ins(stand_ins, tmp_path, monkeypatch):
    """The Python section's native snippet on the stand-ins, with only the device, dtype, size and steps swapped
    for the CPU and the shipped model (its latent grid is 32x32 at most): the rest runs as written."""
    code = _python_block("from sd35fp8 import SD35Pipeline, load_mmdit, load_vae")
    swaps = {'"cuda"': '"cpu"', "torch.bfloat16": "torch.float32", "num_inference_steps=28": "num_inference_steps=2",
             "height=1024, width=1024": "height=128, width=128", "torch.randn(1, 16, 128, 128,": "torch.randn(1, 16, 16, 16,"}
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    for name in ("sd3.5_large.safetensors", "sd3.5_medium.safetensors", "clip_l.safetensors", "clip_g.safetensors",
                 "t5xxl_fp16.safetensors"):
        code = code.replace(f'"{name}"', repr(str(stand_ins / name)))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (native)", "exec"), scope)
    assert Image.open(tmp_path / "cat.png").size == (128, 128)
    assert scope["v"].shape == scope["x"].shape and bool(scope["v"].isfinite().all())
    assert type(scope["vae"]).__name__ == "SD3VAE"


def test_readme_lora_snippet_runs_on_stand_ins(stand_ins, monkeypatch):
    """The LoRA section's Python lines, as written (SD35Pipeline imported as the native snippet does), on the
    stand-ins: the all-in-one scaled-fp8 file, T5 replaced by t5xxl_fp16, the shipped LoRA as hands and style."""
    from sd35fp8 import SD35Pipeline

    code = _python_block('pipe = SD35Pipeline.from_pretrained("sd3.5_large_fp8_scaled.safetensors"')
    monkeypatch.chdir(stand_ins)
    scope: dict = {"SD35Pipeline": SD35Pipeline}
    exec(compile(code, "README.md (LoRA)", "exec"), scope)
    assert scope["pipe"].get_active_adapters() == []
