"""Prompt text bounds (issue 27 item 1): over --max-text-chars a text is refused (400, nothing queued);
below it a text longer than --max-prompt-tokens is cut to the budget with a warning in the /prompt
answer and the history entry, so the worker never tokenizes or encodes an unbounded prompt: the RSS
growth of a prompt at the hard cap stays modest (shipped model, CPU)."""

from __future__ import annotations

import json
import random
import time

import pytest
from fastapi.testclient import TestClient

from comfy_models import WORKFLOWS, build_models_folder
from conftest import TESTCLIENT_HOST
from sd35fp8.server import create_app
from sd35fp8.server.prompt_text import TextBudget
from sd35fp8.server.validation import Limits
from sd35fp8.text.t5_tokenizer import T5Tokenizer
from sd35fp8.text.tokenizer import SD3Tokenizer
from sd35fp8.tiny import SHIPPED_T5_TOKENIZER

WORDS = ("a watercolor of a (red:1.2) fox in the snowy forest at dawn, highly detailed, 4k, "
         "émigré 東京 🦊 (((nested))) \\(literal\\) embedding:thing").split()


def long_text(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = ""
    while len(out) < chars:
        out += rng.choice(WORDS) + " "
    return out[:chars]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_cut_matches_the_encoders_tokenizer():
    """The cut text tokenizes (SD3Tokenizer, the encoders' own) within the budget, one more character
    would not, and short texts are untouched."""
    t5 = T5Tokenizer(SHIPPED_T5_TOKENIZER)
    budget = TextBudget(100, t5_tokenizer=t5)
    reference = SD3Tokenizer(t5=t5, t5_min_length=1)
    assert budget.fit("a red fox", ("clip", "t5")) == ("a red fox", None)
    for seed in range(3):
        text = long_text(3000, seed)
        cut, counts = budget.fit(text, ("clip", "t5"))
        assert counts is not None and max(counts.values()) > 100 and text.startswith(cut) and len(cut) < len(text)
        tokens = reference.tokenize(cut)
        clip_content = sum(sum(1 for t in chunk if t not in (49406, 49407)) for chunk in tokens["l"])
        assert clip_content <= 100 and len(tokens["t5"]) - 1 <= 100  # T5: ids + EOS
        assert len(tokens["l"]) <= 2  # 100 tokens: at most two 77-token windows
        assert not budget.fits(text[:len(cut) + 1], ("clip", "t5"))
        t5_only, _ = budget.fit(text, ("t5",))
        assert len(reference.tokenize(t5_only)["t5"]) - 1 <= 100


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models_folder(tmp_path_factory.mktemp("comfy"))


def seed_prompt(text: str) -> dict:
    p = json.loads((WORKFLOWS / "seed-fp8-allinone.json").read_text())
    for node in p.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 1
    p["6"]["inputs"]["text"] = text
    return p


def run(c: TestClient, text: str, peak: list[float] | None = None) -> tuple[dict, dict]:
    r = c.post("/prompt", json={"prompt": seed_prompt(text)})
    assert r.status_code == 200, r.text
    answer = r.json()
    pid = answer["prompt_id"]
    deadline = time.monotonic() + 600
    while not (entry := c.get(f"/history/{pid}").json().get(pid)):
        if peak is not None:
            peak.append(rss_mb())
        assert time.monotonic() < deadline, "the prompt did not finish"
        time.sleep(0.01)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return answer, entry


def test_long_prompts_are_refused_or_cut_and_memory_stays_bounded(models, tmp_path):
    limits = Limits(max_text_chars=8192, max_prompt_tokens=512)
    app = create_app(models, tmp_path / "out", device="cpu", serve_frontend=False, allow_hosts=(TESTCLIENT_HOST,),
                     limits=limits)
    with TestClient(app) as c:
        huge = c.post("/prompt", json={"prompt": seed_prompt("x " * 50_000)})  # 100 000 characters
        assert huge.status_code == 400
        errors = huge.json()["node_errors"]["6"]["errors"]
        assert errors[0]["type"] == "value_too_long" and errors[0]["extra_info"]["max_length"] == 8192
        assert c.get("/queue").json()["queue_pending"] == [] and c.get("/history").json() == {}

        short, _ = run(c, "a red fox")  # loads the models; no warning for a short text
        assert "warnings" not in short
        run(c, "a red fox in the snow")  # settle the allocator at the model's working size
        idle = rss_mb()
        peak: list[float] = []
        text = long_text(8192)  # at the hard cap
        answer, entry = run(c, text, peak)
        (warning,) = answer["warnings"]
        assert warning["type"] == "prompt_text_cut" and warning["node_id"] == "6" and warning["input_name"] == "text"
        assert warning["chars_given"] == 8192 and warning["chars_kept"] < 8192
        assert max(warning["tokens_given"].values()) > 512 and warning["max_tokens"] == 512
        kept = entry["prompt"][2]["6"]["inputs"]["text"]
        assert text.startswith(kept) and len(kept) == warning["chars_kept"]
        assert entry["prompt"][3]["warnings"] == answer["warnings"]
        growth = max(peak + [rss_mb()]) - idle
        print(f"RSS idle {idle:.0f} MB, growth for an 8192-character prompt {growth:.0f} MB")
        assert growth < 300, f"RSS grew {growth:.0f} MB for a prompt at the hard cap"


def test_text_linked_from_a_string_primitive_is_cut_at_its_source(models, tmp_path):
    """A CLIPTextEncode whose text is linked from a String (Multiline) node: the primitive's literal is
    cut to the budget at /prompt, the warning names both nodes, and the prompt runs."""
    app = create_app(models, tmp_path / "out", device="cpu", serve_frontend=False, allow_hosts=(TESTCLIENT_HOST,),
                     limits=Limits(max_text_chars=8192, max_prompt_tokens=64))
    text = long_text(4000, seed=3)
    prompt = seed_prompt("unused")
    prompt["50"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": text}}
    prompt["6"]["inputs"]["text"] = ["50", 0]
    with TestClient(app) as c:
        r = c.post("/prompt", json={"prompt": prompt})
        assert r.status_code == 200, r.text
        (warning,) = r.json()["warnings"]
        assert warning["node_id"] == "6" and warning["source_node_id"] == "50" and warning["max_tokens"] == 64
        pid = r.json()["prompt_id"]
        deadline = time.monotonic() + 600
        while not (entry := c.get(f"/history/{pid}").json().get(pid)):
            assert time.monotonic() < deadline, "the prompt did not finish"
            time.sleep(0.05)
    assert entry["status"]["status_str"] == "success", entry["status"]
    kept = entry["prompt"][2]["50"]["inputs"]["value"]
    assert text.startswith(kept) and len(kept) == warning["chars_kept"] < len(text)
    assert TextBudget(64, t5_tokenizer=T5Tokenizer(SHIPPED_T5_TOKENIZER)).fits(kept, ("clip", "t5"))


def test_every_text_reaching_an_encoder_is_bounded(monkeypatch):
    """A text built at run time (here a node that repeats its input: any STRING output linked in) is cut
    by the encoder node itself, for CLIPTextEncode and each CLIPTextEncodeSD3 text, hard cap first."""
    from sd35fp8.workflow import engine
    from sd35fp8.workflow.node_base import NodeContext
    from sd35fp8.workflow.nodes import CLIPTextEncode, CLIPTextEncodeSD3

    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(engine, "encode_text", lambda clip, text: seen.append((text,)) or "cond")
    monkeypatch.setattr(engine, "encode_text_sd3",
                        lambda clip, l_, g, t5, pad: seen.append((l_, g, t5)) or "cond")
    t5 = T5Tokenizer(SHIPPED_T5_TOKENIZER)
    budget = TextBudget(50, t5_tokenizer=t5, max_chars=3000)
    ctx = NodeContext(folders=None, node_id="6", text_limit=budget.limit)
    huge = long_text(3000, seed=5) * 100  # 300 000 characters: what no literal may hold
    CLIPTextEncode(ctx).encode(clip=None, text=huge)
    CLIPTextEncodeSD3(ctx).encode(None, huge, "a red fox", huge, "none")
    (text,), (clip_l, clip_g, t5xxl) = seen
    for cut, encoders in ((text, ("clip", "t5")), (clip_l, ("clip",)), (t5xxl, ("t5",))):
        assert huge.startswith(cut) and 0 < len(cut) < 3000 and budget.fits(cut, encoders)
        assert not budget.fits(huge[:len(cut) + 1], encoders)
    assert clip_g == "a red fox"
    unbounded = NodeContext(folders=None, node_id="6")  # no server: texts as given (sd35fp8 run, the library)
    CLIPTextEncode(unbounded).encode(clip=None, text=huge)
    assert seen[-1] == (huge,)
