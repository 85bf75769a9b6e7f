"""tiny/evaluate.py, cli/eval.py and tiny/contact_sheet.py on a random tiny checkpoint (CPU, 32 px, 2 steps)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from PIL import Image

from sd35fp8.cli.eval import add_parsers
from sd35fp8.errors import InputError
from sd35fp8.tiny import world
from sd35fp8.tiny.contact_sheet import contact_sheet
from sd35fp8.tiny.evaluate import ALL_MODES, available_modes, evaluate, parse_modes, psnr


def _strict_json(text: str) -> dict:
    def bad(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def eval_run(tiny_random_checkpoint, tmp_path_factory):
    path, _ = tiny_random_checkpoint
    out = tmp_path_factory.mktemp("eval") / "tiny_eval.json"
    result = evaluate(model=path, n=3, seed=0, device="cpu", batch=3, steps=2, size=32, out=out, warmup=False,
                      verbose=False)
    return result, out


def test_psnr():
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert psnr(a, a.copy()) == math.inf
    b = a.copy()
    b[0, 0, 0] ^= 1  # one value off by one
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 * a.size), rel=1e-9)
    with pytest.raises(InputError):
        psnr(a, a[:8])


def test_parse_modes():
    assert parse_modes("static, bf16,dynamic") == ("bf16", "dynamic", "static")
    assert parse_modes(["weight_only"]) == ("weight_only",)
    for bad in ("bf16,fp4", "", "dynamic,dynamic"):
        with pytest.raises(InputError):
            parse_modes(bad)
    modes, skipped = available_modes("cpu")  # torch 2.13 CPU has _scaled_mm: every mode runs
    assert modes == ALL_MODES and skipped == {}


def test_evaluate_json_table_sheet(eval_run, capsys):
    result, out = eval_run
    data = _strict_json(out.read_text())
    assert set(data["modes"]) == set(ALL_MODES)
    assert data["n"] == 3 and len(data["items"]) == 3
    assert data["device"] == "cpu" and data["torch"] and data["date"].startswith("20")  # benchmark evidence
    assert data["params"]["steps"] == 2 and data["params"]["width"] == 32
    items = world.heldout_prompts(3, 0)
    assert [it["caption"] for it in data["items"]] == [it.caption for it in items]
    for mode, entry in data["modes"].items():
        assert entry["effective_mode"] == ("none" if mode == "bf16" else mode)  # FP8 really ran, no fallback
        assert entry["dtype"] == "float32"
        assert entry["seconds_per_image"] > 0
        scores = entry["scores"]
        assert scores["n"] == 3 and 0.0 <= scores["overall"] <= 1.0
        assert set(scores["per_category"]) == {"single", "two_object", "two_relation"}
        if mode == "bf16":
            assert "psnr_vs_bf16" not in entry
            assert entry["rerun_psnr_min"] == "inf"  # same seeds -> identical pixels
        else:
            ps = entry["psnr_vs_bf16"]
            assert 20.0 < ps["min"] <= ps["mean"] <= ps["max"] < 99.0, (mode, ps)  # close, but not identical
    assert "calibrated" in data["modes"]["static"]["static_scales"]
    for it in data["items"]:
        assert set(it["results"]) == set(ALL_MODES)
        assert isinstance(it["results"]["dynamic"]["psnr_vs_bf16"], float)
    # the returned dict keeps floats; the file has the JSON-safe form
    assert result["modes"]["bf16"]["rerun_psnr_min"] == math.inf
    sheet = Image.open(data["sheet"])
    assert sheet.mode == "RGB" and sheet.height >= 3 * 128 and sheet.width >= 5 * 128  # 3 rows, ref + 4 modes


def test_table_printed(tiny_random_checkpoint, tmp_path, capsys):
    path, _ = tiny_random_checkpoint
    evaluate(model=path, n=1, modes="dynamic", device="cpu", batch=1, steps=1, size=32, out=tmp_path / "e.json",
             warmup=False, verbose=False)
    text = capsys.readouterr().out
    assert "mode" in text and "overall" in text and "PSNR mean" in text
    assert [line.split()[0] for line in text.splitlines()[2:4]] == ["bf16", "dynamic"]  # baseline always runs
    assert (tmp_path / "e.png").exists()


def test_contact_sheet_checks_lengths():
    items = world.heldout_prompts(2, 0)
    img = np.zeros((32, 32, 3), np.uint8)
    sheet = contact_sheet(items, {"bf16": [img, img]}, {"bf16": [True, False]})
    assert sheet.size[1] >= 2 * 128
    with pytest.raises(InputError):
        contact_sheet(items, {"bf16": [img]})


def test_subcommand_parses_and_checks_before_loading(tmp_path):
    parser = argparse.ArgumentParser(prog="sd35fp8")
    sub = parser.add_subparsers(dest="command", required=True)
    handler = add_parsers(sub)["eval"]
    args = parser.parse_args(["eval", "--model", str(tmp_path / "none.safetensors"), "--n", "4", "--seed", "3",
                              "--modes", "bf16,dynamic", "--device", "cpu", "--out", str(tmp_path / "r.json"),
                              "--sheet", str(tmp_path / "s.png")])
    assert (args.command, args.n, args.seed, args.modes) == ("eval", 4, 3, "bf16,dynamic")
    with pytest.raises(InputError, match="does not exist"):
        handler(args)  # a missing model is reported, not crashed on
    args.modes = "bf16,int4"
    with pytest.raises(InputError, match="int4"):
        handler(args)


def test_subcommand_sampler_and_scheduler(tiny_random_checkpoint, tmp_path):
    parser = argparse.ArgumentParser(prog="sd35fp8")
    handler = add_parsers(parser.add_subparsers(dest="command", required=True))["eval"]
    path, _ = tiny_random_checkpoint
    base = ["eval", "--model", str(path), "--n", "1", "--batch", "1", "--steps", "2", "--size", "32",
            "--modes", "bf16", "--device", "cpu", "--out", str(tmp_path / "r.json")]
    with pytest.raises(InputError, match="unknown sampler"):
        handler(parser.parse_args(base + ["--sampler", "nope"]))
    with pytest.raises(InputError, match="unknown scheduler"):
        handler(parser.parse_args(base + ["--scheduler", "nope"]))
    assert handler(parser.parse_args(base + ["--sampler", "euler_ancestral", "--scheduler", "simple"])) == 0
    params = _strict_json((tmp_path / "r.json").read_text())["params"]
    assert (params["sampler"], params["scheduler"]) == ("euler_ancestral", "simple")
