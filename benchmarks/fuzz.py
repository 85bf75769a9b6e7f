"""Hostile-input fuzz of the ComfyUI server, and /history at 10 000 entries.

Part 1 starts `sd35fp8 serve` as a child process on 127.0.0.1 with the SHIPPED model (a ComfyUI
models folder from tests/comfy_models.py, the seed all-in-one FP8 workflow at 128x128), warms it up
with one prompt, then sends --count generated hostile requests (seeded, so a run can be repeated):
malformed and deeply nested JSON, NaN/Infinity, mistyped fields, mutated workflows (hostile literal
values, broken links, cycles, huge texts and sizes), oversized bodies, every JSON route with garbage,
garbage query parameters, /view traversal and over-long names, upload bombs and polyglots, hostile
Origin / Host / Sec-Fetch-Site / Content-Type headers, hostile WebSocket handshakes and messages.
It counts answers by status, 500s, hangs (no answer within --timeout), and whether the server died,
and samples the server's RSS (/proc) every 20 ms: idle RSS after warm-up, the peak during each
request, and the peak over the run (accepted prompts run meanwhile).

Part 2 builds an app in this process (test_server's fake executor, no model) whose history holds
10 000 entries shaped like the seed workflow's, serves it with uvicorn on 127.0.0.1 and times
/history, /history?max_items=100, /history/{id}, /jobs?limit=100 and /queue (median of 20). The full
/history dump (~15 MB) is timed three ways: with requests as above (bound by requests' 10 KB read
loop), and with a plain socket reading 1 MB at a time: to the first byte of the answer (the server's
own latency: the body is cached per history version) and to the last byte (the whole transfer).

    python benchmarks/fuzz.py                  # writes benchmarks/results/fuzz_cpu.json
    python benchmarks/fuzz.py --count 50 --out /tmp/fuzz.json
    python benchmarks/fuzz.py --schemathesis 40   # + schemathesis over /openapi.json (pip install schemathesis)
Stops by itself: at most --count requests and --max-seconds of fuzzing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import platform
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

SIZE, STEPS = 128, 2


# ---- the server under test ----------------------------------------------------------------------
def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """RSS of `pid` every 20 ms; `window()` gives the peak since the last call."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.window_peak = pid, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                now = rss_kb(self.pid)
            except OSError:
                return
            self.peak, self.window_peak = max(self.peak, now), max(self.window_peak, now)
            time.sleep(0.02)

    def window(self) -> int:
        peak, self.window_peak = self.window_peak, 0
        return peak


def start_server(models: Path, out: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sd35fp8.cli", "serve", "--models", str(models), "--output", str(out),
           "--input", str(out.parent / "input"), "--device", "cpu", "--port", str(port), "--max-queue", "20", "--max-batch", "1",
           "--max-pixel-steps", str(SIZE * SIZE * 4 * 20), "--max-upload-mb", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_up(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/queue", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not start")


def wait_idle(url: str, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        q = requests.get(f"{url}/queue", timeout=5).json()
        if not q["queue_running"] and not q["queue_pending"]:
            return True
        time.sleep(0.2)
    return False


# ---- hostile requests ----------------------------------------------------------------------------
def seed_prompt() -> dict:
    from comfy_models import WORKFLOWS

    p = json.loads((WORKFLOWS / "seed-fp8-allinone.json").read_text())
    for node in p.values():
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            node["inputs"].update(width=SIZE, height=SIZE)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = STEPS
    return p


HOSTILE_VALUES = [float("nan"), float("inf"), -1e308, 1e308, 2**70, -2**70, "NaN", "inf", "", "x" * 100_000,
                  [], [[[[]]]], {"a": {"b": {}}}, None, True, "../../etc/passwd", "\u0000", "\udcff"[:0] + "é" * 50,
                  ["1", 0], ["999", 0], ["3", 99], ["3", -1], [3, "0"], 0, -1, 16384, 99999999]


def png(size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def bomb(w: int = 30000, h: int = 30000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def generate(rng: random.Random, base: dict, host: str) -> list[dict]:
    """One hostile request of a random kind: {kind, method, path, body, headers, files?, ws?}."""
    J = {"Content-Type": "application/json"}
    kind = rng.choice(["json", "types", "mutate", "mutate", "size", "routes", "query", "view", "upload",
                       "headers", "ws", "openai", "models"])
    if kind == "json":
        body = rng.choice([b"{", b"[" * rng.randint(100, 50_000), b'{"prompt": NaN}', b'{"prompt": {}, "number": Infinity}',
                           b'{"prompt": 1e999}', bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 500))),
                           b"\xef\xbb\xbf{}", b'{"prompt": {"1": {"class_type": "KSampler"}}}' * 3, b"null", b'"x"',
                           b'{"prompt": {"\\ud800": {"class_type": "SaveImage", "inputs": {}}}}'])  # lone surrogate
        return [{"kind": kind, "method": "POST", "path": "/prompt", "body": body, "headers": J}]
    if kind == "types":
        p = copy.deepcopy(base)
        field, value = rng.choice([("class_type", ["KSampler"]), ("class_type", {"x": 1}), ("inputs", [1]),
                                   ("inputs", "x"), ("class_type", 5)])
        nid = rng.choice(list(p))
        p[nid][field] = value
        top = rng.choice([{"prompt": p}, {"prompt": base, "partial_execution_targets": 5},
                          {"prompt": base, "number": [1]}, {"prompt": base, "extra_data": [1]},
                          {"prompt": base, "client_id": {"a": 1}}, {"prompt": base, "prompt_id": "x" * 40},
                          {"prompt": base, "front": {"a": 1}}, {"prompt": [base]}])
        return [{"kind": kind, "method": "POST", "path": "/prompt", "body": dumps(top), "headers": J}]
    if kind == "mutate":
        p = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            nid = rng.choice(list(p))
            inputs = p[nid]["inputs"]
            name = rng.choice(list(inputs) + ["extra"])
            choice = rng.random()
            if choice < 0.15:
                inputs[name] = [nid, 0]  # a cycle through itself
            elif choice < 0.25:
                inputs.pop(name, None)
            else:
                inputs[name] = rng.choice(HOSTILE_VALUES)
        return [{"kind": kind, "method": "POST", "path": "/prompt", "body": dumps({"prompt": p}), "headers": J}]
    if kind == "size":
        p = copy.deepcopy(base)
        what = rng.choice(["text", "nodes", "pixels", "body", "batch"])
        if what == "text":
            node = next(n for n in p.values() if n["class_type"] == "CLIPTextEncode")
            node["inputs"]["text"] = "a cat " * rng.choice([2_000, 20_000, 200_000])
        elif what == "nodes":
            for i in range(rng.choice([2_500, 20_000])):
                p[f"x{i}"] = {"class_type": "SaveImage", "inputs": {}}
        elif what in ("pixels", "batch"):
            lat = next(n for n in p.values() if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"))
            lat["inputs"].update(width=16384, height=16384) if what == "pixels" else lat["inputs"].update(batch_size=4096)
        else:
            return [{"kind": kind, "method": "POST", "path": "/prompt", "headers": J,
                     "body": dumps({"prompt": base, "extra_data": {"pad": "x" * 20_000_000}})}]
        return [{"kind": kind, "method": "POST", "path": "/prompt", "body": dumps({"prompt": p}), "headers": J}]
    if kind == "models":  # the merge / save / list nodes, with hostile values (path prefixes, ratios, batch sizes)
        p = copy.deepcopy(base)
        ckpt = next(k for k, n in p.items() if n["class_type"] == "CheckpointLoaderSimple")
        sampler = next(k for k, n in p.items() if n["class_type"] == "KSampler")
        decode = next(k for k, n in p.items() if n["class_type"] == "VAEDecode")
        merge = rng.choice(["ModelMergeSimple", "ModelMergeAdd", "ModelMergeSubtract", "ModelMergeSD3_2B",
                            "ModelMergeBlocks"])
        value = rng.choice(HOSTILE_VALUES + [0.5, 0.0, 1.0, -3.0])
        p["m1"] = {"class_type": merge, "inputs": {"model1": [ckpt, 0], "model2": [ckpt, 0], "ratio": value,
                                                   "multiplier": value, "input": value, "middle": 0.5, "out": 0.5,
                                                   **{f"joint_blocks.{i}.": 0.5 for i in range(24)}}}
        p[sampler]["inputs"]["model"] = ["m1", 0]
        from sd35fp8.sampling.samplers import SAMPLERS  # every KSampler name, the new ones included
        p[sampler]["inputs"]["sampler_name"] = rng.choice(list(SAMPLERS))
        prefix = rng.choice(["../../x", "/etc/x", "a" * 5000, "m/%year%/x", "\u0000", "ok", "", ".."])
        p["s1"] = {"class_type": rng.choice(["ModelSave", "CheckpointSave", "CLIPSave", "VAESave"]),
                   "inputs": {"model": ["m1", 0], "clip": [ckpt, rng.choice([1, 0, 7])], "vae": [ckpt, 2],
                              "filename_prefix": prefix}}
        p["r1"] = {"class_type": "RebatchImages", "inputs": {"images": [decode, 0],
                                                             "batch_size": rng.choice([1, 0, -1, 2**40, "x"])}}
        p["r2"] = {"class_type": "ImageInvert", "inputs": {"image": ["r1", 0]}}
        p["r3"] = {"class_type": "PreviewImage", "inputs": {"images": ["r2", 0]}}
        return [{"kind": kind, "method": "POST", "path": "/prompt", "body": dumps({"prompt": p}), "headers": J}]
    if kind == "routes":
        path = rng.choice(["/queue", "/history", "/interrupt", "/free", "/jobs/cancel", "/settings",
                           "/settings/Comfy.X", "/api/queue", "/jobs/x/cancel", "/userdata/a.json",
                           "/userdata/..%2F..%2Fx.json", "/users"])
        body = rng.choice([b"", b"{", b"[1,2]", b'{"delete": 5}', b'{"clear": [1]}', b'{"job_ids": 5}',
                           b'{"unload_models": {"a": 1}}', b"[" * 10_000, b'{"a": NaN}', b"\x00" * 100])
        method = rng.choice(["POST", "POST", "PUT", "DELETE", "PATCH"])
        return [{"kind": kind, "method": method, "path": path, "body": body, "headers": J}]
    if kind == "query":
        path = rng.choice(["/history?max_items=abc", "/history?offset=-99999999999999999999", "/jobs?limit=x",
                           "/jobs?status=" + "x," * 1000, "/history/" + "a" * 5000, "/object_info/" + "%00" * 50,
                           "/models/..%2F..", "/userdata?dir=..%2F..&recurse=true", "/view?filename=",
                           "/internal/files/../../etc", "/history?max_items=1e309", "/jobs?sort_order=" + "z" * 999])
        return [{"kind": kind, "method": "GET", "path": path, "body": b"", "headers": {}}]
    if kind == "view":
        name = rng.choice(["../secret", "/etc/passwd", "a" * 300 + ".png", "..\\x.png", "x.png\0.png", "x.png [input]",
                           "%2e%2e%2fx", "\u202e.png"])
        sub = rng.choice(["", "..", "/tmp", "a/../../..", "b" * 300, "/".join(["c" * 200] * 25)])
        return [{"kind": kind, "method": "GET", "path": "/view", "params": {"filename": name, "subfolder": sub,
                 "type": rng.choice(["output", "input", "temp", "models", "../"])}, "body": b"", "headers": {}}]
    if kind == "upload":
        data, name = rng.choice([(bomb(), "bomb.png"), (png() + b"<script>alert(1)</script>", "poly.html"),
                                 (b"GIF89a" + b"\0" * 50, "fake.gif"), (png(), "a" * 300 + ".png"),
                                 (png(), "../escape.png"), (b"\0" * (5 * 1024 * 1024), "big.png"),
                                 (bytes(rng.getrandbits(8) for _ in range(2000)), "noise.png")])
        form = rng.choice([{}, {"subfolder": "../.."}, {"type": "models"}, {"subfolder": "s" * 300},
                           {"overwrite": "true"}])
        if rng.random() < 0.3:  # the mask editor's upload: a (short, mismatched, hostile) mask onto an original
            ref = rng.choice([{"filename": "example.png", "type": "input"}, {"filename": "short.png", "type": "input"},
                              {"filename": "../x.png", "type": "input"},
                              {"filename": "a.png", "type": "models"}, "not json", {"filename": ["x"]}])
            mask = rng.choice([bomb(8, 8), png(8), png(64), b"junk", data])
            form = {**form, "original_ref": ref if isinstance(ref, str) else json.dumps(ref)}
            return [{"kind": kind, "method": "POST", "path": "/upload/mask",
                     "files": {"image": ("mask.png", mask, "image/png")}, "data": form, "headers": {}}]
        return [{"kind": kind, "method": "POST", "path": "/upload/image", "files": {"image": (name, data, "image/png")},
                 "data": form, "headers": {}}]
    if kind == "openai":  # the OpenAI images API: JSON generations and multipart edits
        if rng.random() < 0.4:
            body = rng.choice([{"prompt": "a cat", "n": rng.choice([0, -1, 10**9, "2", None])},
                               {"prompt": "a cat", "size": rng.choice(["65x64", "0x0", "99999x99999", "axb", "", 5])},
                               {"prompt": "a cat " * 50_000}, {"prompt": None}, {"prompt": ["a"]},
                               {"prompt": "x", "model": rng.choice(["../x", "", "a" * 5000, 5])},
                               {"prompt": "x", "response_format": "xml"}, {"prompt": "x", "steps": 10**6},
                               {"prompt": "x", "output_format": rng.choice(["gif", "jpeg", "webp"]),
                                "output_compression": rng.choice([-1, 101, "x", 0])},
                               {"prompt": "x", "seed": 2**80}, {"prompt": "x", "cfg": float("nan")},
                               # the stream (server-sent events) and the newer gpt-image fields
                               {"prompt": "x", "stream": rng.choice([True, "yes", 1, None]),
                                "partial_images": rng.choice([0, 3, 4, -1, 10**9, "2"]), "steps": 2},
                               {"prompt": "x", "background": rng.choice(["transparent", "pink"]),
                                "svg": rng.choice([{}, {"model": "x"}, "x"]), "frame_count": rng.choice([2, -5, 10**9]),
                                "quality": rng.choice(["xhigh", "max", "ultra"]), "safety_identifier": "a" * 5000,
                                "complexity": rng.choice(["low", "extreme"])}])
            raw = rng.choice([dumps(body), b"{", b"[" * 20_000, b"\x00" * 64])
            return [{"kind": kind, "method": "POST", "path": "/v1/images/generations", "body": raw, "headers": J}]
        image = rng.choice([png(), png(64), bomb(), bomb(64, 64), b"not an image", b"",
                            bytes(rng.getrandbits(8) for _ in range(500))])
        files = {"image": ("a.png", image, "image/png")}
        if rng.random() < 0.5:
            files["mask"] = ("m.png", rng.choice([png(), png(16), b"junk", bomb(200, 200)]), "image/png")
        if rng.random() < 0.2:
            files["other"] = ("b.png", png(), "image/png")
        data = rng.choice([{"prompt": "x"}, {}, {"prompt": "x", "n": "many"}, {"prompt": "x", "size": "17x17"},
                           {"prompt": "x", "size": "16384x16384"}, {"prompt": "x", "denoise": "2"},
                           {"prompt": "x" * 100_000}, {"prompt": "x", "model": "nope"}])
        if rng.random() < 0.3:  # stream an edit
            data = {**data, "stream": rng.choice(["true", "false", "maybe"]), "partial_images": rng.choice(["1", "9"])}
        path = rng.choice(["/v1/images/edits", "/v1/images/variations"])
        if rng.random() < 0.1:  # not multipart at all
            return [{"kind": kind, "method": "POST", "path": path, "body": dumps(data), "headers": J}]
        return [{"kind": kind, "method": "POST", "path": path, "files": files, "data": data, "headers": {}}]
    if kind == "headers":
        h = rng.choice([{"Origin": "http://localhost:3000"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Host": "rebind.evil.example"}, {"Content-Type": "text/plain"}, {"Content-Type": ""},
                        {"Origin": "http://[::1"}, {"Host": "127.0.0.1:abc"}, {"Cookie": '"\\x; sd35fp8_token=";'},
                        {"X-Big": "x" * 70_000}, {"Content-Length": "99999999999"}, {"Authorization": "Bearer " + "a" * 9000}])
        headers = {"Content-Type": "application/json", **h}
        return [{"kind": kind, "method": "POST", "path": "/prompt", "body": dumps({"prompt": base}), "headers": headers}]
    ws_headers = rng.choice([{"origin": "http://localhost:3000"}, {"origin": "http://evil.example"},
                             {"host": "rebind.evil.example"}, {"header": ["Sec-Fetch-Site: cross-site"]},
                             {"messages": ["{", "[" * 10_000, '{"type": "feature_flags", "data": NaN}', "x" * 100_000]}])
    return [{"kind": "ws", "ws": ws_headers, "path": "/ws?clientId=" + rng.choice(["a", "x" * 3000, "%00"])}]


def send(req: dict, url: str, host: str, timeout: float) -> str:
    """The answer's status ('101' for an accepted WebSocket), 'hang', or 'closed' (connection dropped)."""
    if req["kind"] == "ws":
        import websocket

        opts = dict(req["ws"])
        messages = opts.pop("messages", None)
        try:
            ws = websocket.create_connection(f"ws://{host}{req['path']}", timeout=timeout, **opts)
        except websocket.WebSocketBadStatusException as e:
            return str(e.status_code)
        except websocket.WebSocketTimeoutException:
            return "hang"
        except (ConnectionError, OSError, websocket.WebSocketException):
            return "closed"
        try:
            ws.recv()
            for m in messages or []:
                ws.send(m)
            ws.ping()
            return "101"
        except websocket.WebSocketTimeoutException:
            return "hang"
        except (ConnectionError, OSError, websocket.WebSocketException):
            return "closed"
        finally:
            ws.close()
    try:
        r = requests.request(req["method"], url + req["path"], data=req.get("body") if "files" not in req else req["data"],
                             files=req.get("files"), params=req.get("params"), headers=req["headers"], timeout=timeout)
        return str(r.status_code)
    except requests.Timeout:
        return "hang"
    except requests.ConnectionError:
        return "closed"


def fuzz(args, work: Path) -> dict:
    from comfy_models import build_models_folder
    from live_server import free_port

    models = build_models_folder(work)
    port = free_port()
    url, host = f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"
    proc = start_server(models, work / "out", port, work / "server.log")
    try:
        wait_up(url, proc)
        base = seed_prompt()
        r = requests.post(f"{url}/prompt", json={"prompt": base}, timeout=30)
        assert r.status_code == 200, r.text
        assert wait_idle(url, 300), "warm-up prompt did not finish"
        warm = requests.get(f"{url}/history/{r.json()['prompt_id']}", timeout=10).json()
        assert warm[r.json()["prompt_id"]]["status"]["status_str"] == "success", warm
        # originals for /upload/mask: one uploaded; one whose pixel data is cut short, which /upload/image refuses,
        # put into the input folder by hand (as a user's copy could be)
        up = requests.post(f"{url}/upload/image", files={"image": ("example.png", png(64), "image/png")}, timeout=30)
        assert up.status_code == 200, up.text
        short = requests.post(f"{url}/upload/image", files={"image": ("short.png", bomb(8, 8), "image/png")}, timeout=30)
        assert short.status_code == 400, short.text
        (work / "input" / "short.png").write_bytes(bomb(8, 8))
        time.sleep(1.0)
        idle = rss_kb(proc.pid)
        sampler = Sampler(proc.pid)
        sampler.start()
        rng = random.Random(args.seed)
        statuses, by_kind, worst, latencies, errors = Counter(), {}, [], [], []
        t_end = time.monotonic() + args.max_seconds
        sent = 0
        while sent < args.count and time.monotonic() < t_end:
            for req in generate(rng, base, host):
                sampler.window()
                t0 = time.perf_counter()
                status = send(req, url, host, args.timeout)
                latencies.append(time.perf_counter() - t0)
                peak = sampler.window()
                statuses[status] += 1
                by_kind.setdefault(req["kind"], Counter())[status] += 1
                if status.startswith("5") and status not in ("503", "507") and len(errors) < 20:
                    body = req.get("body")
                    errors.append({"status": status, "kind": req["kind"], "method": req["method"], "path": req["path"],
                                   "body": (body.decode("utf-8", "replace") if isinstance(body, bytes)
                                            else str(body))[:4000]})
                worst.append((peak, req["kind"], (req.get("path") or "")[:80]))
                sent += 1
                if proc.poll() is not None:
                    break
            if proc.poll() is not None:
                break
            if requests.get(f"{url}/prompt", timeout=10).json()["exec_info"]["queue_remaining"] > 10:
                wait_idle(url, 60)  # let accepted prompts run rather than fill the queue with 429s
        schema = schema_fuzz(args, url, host, work) if args.schemathesis and proc.poll() is None else None
        drained = proc.poll() is None and wait_idle(url, 300)
        sampler.stop.set()
        alive = proc.poll() is None and requests.get(f"{url}/queue", timeout=10).status_code == 200
        hwm = rss_kb(proc.pid, "VmHWM") if alive else 0
        worst.sort(reverse=True)
        return {
            "requests": sent, "seconds": round(sum(latencies), 2), "by_status": dict(sorted(statuses.items())),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
            "count_500": sum(v for k, v in statuses.items() if k.startswith("5") and k not in ("503", "507")),
            "hangs": statuses.get("hang", 0), "server_alive": alive, "crashes": 0 if alive else 1,
            "queue_drained": drained,
            "rss_idle_mb": round(idle / 1024, 1), "rss_peak_per_request_mb": round(worst[0][0] / 1024, 1),
            "rss_peak_run_mb": round(sampler.peak / 1024, 1), "rss_hwm_mb": round(hwm / 1024, 1),
            "peak_over_idle": round(worst[0][0] / idle, 3),
            "heaviest_requests": [{"rss_mb": round(p / 1024, 1), "kind": k, "path": pth} for p, k, pth in worst[:5]],
            "latency_ms_p50": round(statistics.median(latencies) * 1000, 1),
            "latency_ms_max": round(max(latencies) * 1000, 1),
            "server_errors": errors,  # the first 20 requests answered 5xx (not 503 / 507), to reproduce them
            "server_log_tracebacks": _tracebacks(work / "server.log"),
            "schemathesis": schema,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def schema_fuzz(args, url: str, host: str, work: Path) -> dict:
    """Schemathesis (`st`, a separate install: python -m pip install schemathesis) over the server's own OpenAPI
    schema (every route, its coverage, fuzzing and stateful phases) with the check not_a_server_error: whether any
    generated request is answered 5xx. -> {"command", "returncode", "summary" (its last lines)}."""
    import shutil

    st = args.schemathesis_bin or shutil.which("st")
    if st is None:
        return {"error": "schemathesis is not installed (python -m pip install schemathesis)"}
    cmd = [st, "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples",
           str(args.schemathesis), "--workers", "2", "-H", f"Host: {host}", "--request-timeout", str(args.timeout),
           "--seed", str(args.seed), "--no-color"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds, cwd=work)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "error": f"did not finish in {args.max_seconds} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    cases = next((ln.strip() for ln in lines if "generated" in ln and ("passed" in ln or "failed" in ln)), None)
    failures = [ln for i, ln in enumerate(lines) if "Server error" in ln or (i and "Server error" in lines[i - 1])]
    cut = next((i for i, ln in enumerate(lines) if "FAILURES" in ln), None)  # the failing requests, replayable
    return {"command": "st " + " ".join(cmd[1:]), "returncode": done.returncode, "test_cases": cases,
            "failures": lines[cut:cut + 60] if cut is not None else failures, "summary": lines[-25:]}


def _tracebacks(log: Path, limit: int = 5) -> list[str]:
    """The server log's first `limit` Python tracebacks (what a 500 left behind)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    blocks = text.split("Traceback (most recent call last):")[1:limit + 1]
    return ["Traceback (most recent call last): ..." + b.split("\nINFO")[0][-3000:] for b in blocks]  # its end


# ---- /history at scale ---------------------------------------------------------------------------
def history_scale(entries: int, work: Path) -> dict:
    from live_server import LiveServer
    from test_server import make_fake_executor

    from sd35fp8.server import create_app

    app = create_app(work / "models", executor=make_fake_executor(work), serve_frontend=False, max_queue=10)
    queue = app.state.queue
    base = seed_prompt()
    t0 = time.perf_counter()
    for i in range(entries):
        pid = f"00000000-0000-4000-8000-{i:012d}"
        queue.put([i, pid, base, {"client_id": "bench", "create_time": 1_700_000_000_000 + i}, ["9"]])
        task_id, _ = queue.get(timeout=1)
        ts = 1_700_000_000_000 + i
        queue.task_done(task_id, {"9": {"images": [{"filename": f"img_{i:05}_.png", "subfolder": "", "type": "output"}]}},
                        {"status_str": "success", "completed": True,
                         "messages": [["execution_start", {"prompt_id": pid, "timestamp": ts}],
                                      ["execution_success", {"prompt_id": pid, "timestamp": ts + 900}]]})
    fill_s = time.perf_counter() - t0
    last = f"00000000-0000-4000-8000-{entries - 1:012d}"
    out = {"entries": entries, "fill_seconds": round(fill_s, 2)}
    with LiveServer(app) as srv, requests.Session() as s:
        for name, path in (("history_max_items_100", "/history?max_items=100"), ("history_one", f"/history/{last}"),
                           ("jobs_limit_100", "/jobs?limit=100"), ("queue", "/queue"), ("history_all", "/history")):
            times, size = [], 0
            for _ in range(5 if name == "history_all" else 20):
                t = time.perf_counter()
                r = s.get(srv.url + path, timeout=120)
                times.append((time.perf_counter() - t) * 1000)
                size = len(r.content)
                assert r.status_code == 200, (path, r.status_code)
            out[name] = {"ms_median": round(statistics.median(times), 2), "bytes": size}
        first, full = [], []
        for _ in range(9):
            ttfb, total, size = _socket_get(srv.url, "/history")
            first.append(ttfb)
            full.append(total)
        out["history_all_socket"] = {"ms_first_byte_median": round(statistics.median(first), 2),
                                     "ms_last_byte_median": round(statistics.median(full), 2), "bytes": size}
    return out


def _socket_get(url: str, path: str) -> tuple[float, float, int]:
    """(ms to the first byte, ms to the last byte, bytes) of one GET read 1 MB at a time."""
    import socket

    host, port = url.split("//")[1].rsplit(":", 1)
    t = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = s.recv(1 << 20)
        ttfb = (time.perf_counter() - t) * 1000
        n = len(data)
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        while data:
            data = s.recv(1 << 20)
            n += len(data)
    return ttfb, (time.perf_counter() - t) * 1000, n


def print_history(hs: dict) -> None:
    for k in ("history_max_items_100", "history_one", "jobs_limit_100", "queue", "history_all"):
        print(f"{k:<40} {hs[k]['ms_median']:>8} {hs[k]['bytes']:>10}")
    sock = hs["history_all_socket"]
    print(f"{'history_all, socket: first byte':<40} {sock['ms_first_byte_median']:>8} {sock['bytes']:>10}")
    print(f"{'history_all, socket: last byte':<40} {sock['ms_last_byte_median']:>8} {sock['bytes']:>10}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300, help="hostile requests to send")
    ap.add_argument("--max-seconds", type=float, default=900, help="stop fuzzing after this long")
    ap.add_argument("--timeout", type=float, default=20, help="seconds without an answer that count as a hang")
    ap.add_argument("--seed", type=int, default=27)
    ap.add_argument("--history-entries", type=int, default=10_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_cpu.json"))
    ap.add_argument("--schemathesis", type=int, default=0, metavar="N",
                    help="then run schemathesis (installed separately) over the server's OpenAPI schema, N examples "
                         "an operation, checking that no generated request is answered 5xx")
    ap.add_argument("--schemathesis-bin", default=None, help="the `st` executable (default: on PATH)")
    ap.add_argument("--history-only", action="store_true",
                    help="re-measure only part 2 and replace history_scale in the existing --out file")
    args = ap.parse_args(argv)
    import torch

    if args.history_only:
        result = json.loads(Path(args.out).read_text())
        with tempfile.TemporaryDirectory(prefix="sd35fp8-fuzz-") as tmp:
            result["history_scale"] = hs = history_scale(args.history_entries, Path(tmp) / "hist")
        hs["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        print_history(hs)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0

    with tempfile.TemporaryDirectory(prefix="sd35fp8-fuzz-") as tmp:
        fz = fuzz(args, Path(tmp) / "fuzz")
        hs = history_scale(args.history_entries, Path(tmp) / "hist")
    result = {
        "benchmark": "fuzz", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "seed": args.seed,
        "model": "shipped tiny model, seed-fp8-allinone workflow at 128x128, 2 steps",
        "fuzz": fz, "history_scale": hs,
    }
    print(f"{'status':>8} {'count':>6}")
    for k, v in fz["by_status"].items():
        print(f"{k:>8} {v:>6}")
    print(f"requests {fz['requests']}  500s {fz['count_500']}  hangs {fz['hangs']}  crashes {fz['crashes']}  "
          f"RSS idle {fz['rss_idle_mb']} MB, peak per request {fz['rss_peak_per_request_mb']} MB "
          f"({fz['peak_over_idle']}x idle), run peak {fz['rss_peak_run_mb']} MB")
    if fz.get("schemathesis"):
        sc = fz["schemathesis"]
        print(f"schemathesis: {sc.get('test_cases') or sc.get('error')} (exit {sc.get('returncode')})")
    print(f"{'route at ' + str(hs['entries']) + ' history entries':<40} {'ms':>8} {'bytes':>10}")
    print_history(hs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
