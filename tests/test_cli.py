"""`sd35fp8` command-line errors: bad input is one line on stderr and exit code 2, found before any
model loads; nothing is left half-written."""

from __future__ import annotations

import importlib
import json

import pytest

from sd35fp8.cli import main


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--cfg", "nan"], "--cfg must be a finite number"),
    (["generate", "x", "--shift", "inf"], "--shift must be a finite number"),
    (["generate", "x", "--device", "foo"], "unknown device 'foo'"),
    (["generate", "x", "--device", "mps"], "runs on cpu or cuda"),
])
def test_generate_rejects_before_loading(argv, message, capsys, monkeypatch):
    import sd35fp8.pipeline as pipeline

    monkeypatch.setattr(pipeline.SD35Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    rc, err = _run(argv, capsys)
    assert rc == 2 and message in err and "Traceback" not in err


def test_generate_output_is_a_folder(tmp_path, capsys, monkeypatch):
    import sd35fp8.pipeline as pipeline

    monkeypatch.setattr(pipeline.SD35Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "dir.png").mkdir()
    rc, err = _run(["generate", "x", "-o", str(tmp_path / "dir.png")], capsys)
    assert rc == 2 and "is a folder" in err


def test_cuda_device_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, err = _run(["generate", "x", "--device", "cuda"], capsys)
    assert rc == 2 and "no CUDA" in err


def test_quantize_and_calibrate_check_paths(tiny_random_checkpoint, tmp_path, capsys):
    path, _ = tiny_random_checkpoint
    for argv, message in (
        (["quantize", str(path), str(tmp_path / "no" / "q.safetensors")], "does not exist"),
        (["quantize", str(path), str(tmp_path / "q.bin")], "must be a .safetensors file"),
        (["quantize", str(path), str(tmp_path / "q.safetensors"), "--recipe", str(tmp_path / "r.json")], "is not a file"),
        (["calibrate", str(path), "--out", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["calibrate", str(path), "--out", str(tmp_path / "r.json"), "--prompts", str(tmp_path / "p.txt")],
         "is not a file"),
        (["calibrate", str(path), "--out", str(tmp_path / "r.json"), "--size", "40"], "multiple of 16"),
    ):
        rc, err = _run(argv, capsys)
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)
    (tmp_path / "bad.json").write_text("{not json")
    rc, err = _run(["quantize", str(path), str(tmp_path / "q.safetensors"), "--recipe", str(tmp_path / "bad.json")],
                   capsys)
    assert rc == 2 and "error" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "q.safetensors").exists()
    with pytest.raises(SystemExit):  # argparse: 0 is not a step count
        main(["calibrate", str(path), "--out", str(tmp_path / "r.json"), "--steps", "0"])


def test_eval_out_png_keeps_json_and_sheet(tiny_random_checkpoint, tmp_path, capsys):
    path, _ = tiny_random_checkpoint
    out = tmp_path / "ev.png"
    assert main(["eval", "--model", str(path), "--n", "1", "--batch", "1", "--steps", "1", "--size", "32",
                 "--modes", "bf16", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 1  # the JSON, not overwritten by the sheet
    assert (tmp_path / "ev_sheet.png").exists()
    rc, err = _run(["eval", "--model", str(path), "--cfg", "nan", "--out", str(out)], capsys)
    assert rc == 2 and "--cfg must be a finite number" in err


def test_verbose_before_or_after_the_subcommand():
    from sd35fp8.cli import build_parser

    p = build_parser()
    assert p.parse_args(["generate", "x", "-v"]).verbose and p.parse_args(["-v", "generate", "x"]).verbose
    assert not p.parse_args(["generate", "x"]).verbose and not p.parse_args(["samplers"]).verbose


def test_offload_flags(monkeypatch):
    from sd35fp8.cli import build_parser

    p = build_parser()
    for flags, offload in [([], "none"), (["--lowvram"], "model"), (["--novram"], "sequential"),
                           (["--offload", "sequential"], "sequential")]:
        args = p.parse_args(["generate", "x"] + flags)
        assert (args.offload, args.compile) == (offload, None)
    assert p.parse_args(["generate", "x", "--no-compile"]).compile is False


def test_run_and_serve_pass_engine_flags(monkeypatch, tmp_path):
    """`run` and `serve` take the same engine flags as `generate` and hand them to the executor."""
    import sd35fp8.workflow as workflow

    server_serve = importlib.import_module("sd35fp8.server.serve")  # the package re-exports a function of that name
    from sd35fp8.cli import build_parser, main

    p = build_parser()
    for cmd in (["run", "w.json"], ["serve"]):
        for flags, offload in [([], "none"), (["--lowvram"], "model"), (["--novram"], "sequential")]:
            args = p.parse_args(cmd + flags + ["--no-compile"])
            assert (args.offload, args.compile) == (offload, False)
    seen = {}

    class Result:
        success, outputs, output_dir = True, {}, tmp_path

    def fake_run(*a, **kw):
        seen["run"] = (kw["compile"], kw["offload"])
        return Result()

    def fake_serve(**kw):
        seen["serve"] = (kw["compile"], kw["offload"])
        return []

    monkeypatch.setattr(workflow, "run_workflow", fake_run)
    monkeypatch.setattr(server_serve, "serve", fake_serve)
    assert main(["run", "w.json", "--lowvram", "--device", "cpu"]) == 0
    assert main(["serve", "--novram", "--no-compile", "--device", "cpu", "--state-dir", "none"]) == 0
    assert seen == {"run": (None, "model"), "serve": (False, "sequential")}
    assert main(["run", "w.json", "--compile", "--device", "cpu"]) == 2  # --compile needs CUDA: one-line error


def test_python_dash_m():
    import subprocess
    import sys

    for module in ("sd35fp8", "sd35fp8.cli"):
        out = subprocess.run([sys.executable, "-m", module, "samplers"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "euler" in out.stdout, out.stderr


def test_serve_help_names_the_server_defaults():
    """`sd35fp8 serve --help` shows the request limits without importing the server: they must match it."""
    from sd35fp8.cli.serve import SERVER_DEFAULTS
    from sd35fp8.server import connections, files
    from sd35fp8.server.validation import Limits

    actual = {**vars(Limits()), "max_upload_pixels": files.DEFAULT_MAX_UPLOAD_PIXELS,
              "header_timeout": connections.DEFAULT_HEADER_TIMEOUT_S, "keep_alive": connections.DEFAULT_KEEP_ALIVE_S,
              "max_connections": connections.DEFAULT_MAX_CONNECTIONS}
    assert SERVER_DEFAULTS == actual
    from sd35fp8.cli.serve import DRAIN_SECONDS, HANG_SECONDS
    from sd35fp8.server import lifecycle

    assert (DRAIN_SECONDS, HANG_SECONDS) == (lifecycle.DEFAULT_DRAIN_SECONDS, lifecycle.DEFAULT_HANG_SECONDS)


def test_help_does_not_load_the_engine():
    """`sd35fp8 --help` and every subcommand's parser build without torch, FastAPI or transformers."""
    import subprocess
    import sys

    code = ("import sys; from sd35fp8.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'fastapi', 'transformers', 'sd35fp8.server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cli_fp8_mode_names_match_the_engine():
    from sd35fp8.cli.fp8 import MODES
    from sd35fp8.fp8.device import MODES as ENGINE_MODES

    assert MODES == ENGINE_MODES
