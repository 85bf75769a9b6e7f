"""Fault injection against the real server (CPU, the shipped model, 127.0.0.1 only): is an accepted prompt
ever lost, does every failed prompt carry a readable status, does the server hold steady over time?

Scenarios (each prints tried / survived / lost; "lost" = accepted with 200 but no history entry at the end).
Every prompt is sent with a client_id whose WebSocket (/ws?clientId=..., reconnecting across restarts)
records the terminal message of each prompt (execution_success / execution_error /
execution_interrupted): each row says how many failed prompts the socket reported as failed
(`ws_failed_seen` of `failed_with_status`) and which accepted prompts it never heard end
(`ws_missing_terminal`: prompts that ran while no socket was connected, e.g. around a kill -9).
    flood     500 prompts from 20 clients at once against a `serve()` subprocess (max_queue 100: a 429
              is retried after a pause, so every prompt is eventually accepted)
    kill9     40 prompts queued, `kill -9` of the server while some run, restart on the same --state-dir
    sigterm   40 prompts queued, SIGTERM while some run (drain), restart on the same --state-dir
    oom       a CUDA out-of-memory error injected into the sampler of one prompt (in-process server);
              the prompt must fail with advice in its status, the next one must succeed
    unwritable the output folder replaced by a file while the server runs; the prompt must fail with a
              clear error and leave no partial file, and succeed once the folder is back
    soak      closed-loop clients for --soak-minutes (30 by default) against a subprocess; the server's
              RSS, open fds and threads sampled every minute; RSS growth after warm-up must be <= 5 %

The workflow is the seed's FP8 all-in-one (tests/data/seed-fp8-allinone.json) at 64x64, euler, 4 steps
(--size, --steps: smaller / fewer for a slow CPU; each result records the workflow it ran).

    python benchmarks/faults.py                          # every scenario but the soak
    python benchmarks/faults.py --only soak              # the 30-minute soak
    python benchmarks/faults.py --only oom unwritable    # some

Results are merged into benchmarks/results/faults_cpu.json (one key per scenario, with date and versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
import websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from comfy_models import WORKFLOWS, build_models_folder  # noqa: E402
from live_server import LiveServer, free_port  # noqa: E402

from sd35fp8.server import create_app, serve  # noqa: E402
from sd35fp8.workflow import ModelFolders, PromptExecutor  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "faults_cpu.json"
SCENARIOS = ("flood", "kill9", "sigterm", "oom", "unwritable", "soak")
SIZE, STEPS = 64, 4
WORDS = ["red", "blue", "green", "cube", "ball", "tree", "house", "cat", "dog", "star", "lamp", "boat"]
OOM_SEED = 424242


def make_prompt(seed: int, text: str | None = None) -> dict:
    p = json.loads((WORKFLOWS / "seed-fp8-allinone.json").read_text())
    p["5"]["inputs"].update(width=SIZE, height=SIZE)
    p["3"]["inputs"].update(seed=seed, steps=STEPS, sampler_name="euler")
    rng = random.Random(seed)
    p["6"]["inputs"]["text"] = text or f"a {rng.choice(WORDS)} {rng.choice(WORDS)}"
    p["9"]["inputs"]["filename_prefix"] = "faults"
    return p


# ---- the server as a subprocess ----------------------------------------------------------------------
class ServerProcess:
    """`serve()` in a child process (this file with --serve), on a free loopback port."""

    def __init__(self, work: Path, models: Path, port: int | None = None, drain: float = 120.0, max_batch: int = 1):
        self.work, self.models, self.port, self.drain = work, models, port or free_port(), drain
        self.max_batch = max_batch
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = work / "server.log"

    def start(self, timeout: float = 300.0) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.work), str(self.models),
                                          str(self.port), str(self.drain), str(self.max_batch)], env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if requests.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s; see {self.log}")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 300.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_server_child(work: Path, models: Path, port: int, drain: float, max_batch: int) -> None:
    serve("127.0.0.1", port, models_dir=models, output_dir=work / "output", input_dir=work / "input",
          temp_dir=work / "temp", state_dir=work / "state", device="cpu", serve_frontend=False,
          drain_seconds=drain, max_queue=100, max_batch=max_batch)


# ---- clients --------------------------------------------------------------------------------------------
class WsWatcher:
    """A ComfyUI client's WebSocket (/ws?clientId=...) in a thread: records, per prompt id, the terminal
    messages it hears; reconnects (same clientId) when the server goes away and comes back."""

    TERMINAL = ("execution_success", "execution_error", "execution_interrupted")

    def __init__(self, url: str):
        self.client_id = uuid.uuid4().hex
        self.ws_url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.events: dict[str, list[str]] = {}
        self.connects = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._ws: websocket.WebSocket | None = None
        self._thread = threading.Thread(target=self._run, name="ws-watcher", daemon=True)
        self._thread.start()
        if not self.connected.wait(120):
            raise RuntimeError(f"no WebSocket at {self.ws_url}")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ws = websocket.create_connection(self.ws_url, timeout=10)
            except (websocket.WebSocketException, OSError):
                time.sleep(0.2)
                continue
            ws.settimeout(None)  # blocking reads (a timeout inside a frame would corrupt the stream); close() aborts
            self._ws = ws
            self.connects += 1
            self.connected.set()
            try:
                while not self._stop.is_set():
                    msg = ws.recv()
                    if not msg:  # the server closed
                        break
                    if isinstance(msg, bytes):  # previews
                        continue
                    m = json.loads(msg)
                    data = m.get("data") or {}
                    if m.get("type") in self.TERMINAL and data.get("prompt_id"):
                        with self._lock:
                            self.events.setdefault(data["prompt_id"], []).append(m["type"])
            except (websocket.WebSocketException, OSError):
                pass  # the server went away: reconnect
            finally:
                ws.close()

    def terminal(self, prompt_id: str) -> list[str]:
        with self._lock:
            return list(self.events.get(prompt_id, []))

    def close(self) -> None:
        self._stop.set()
        if self._ws is not None:
            self._ws.abort()  # wakes the blocked recv
        self._thread.join(10)


def ws_report(ws: WsWatcher, result: dict) -> dict:
    """How the WebSocket's terminal messages agree with /history: failed prompts (history status not
    success) the socket reported as execution_error / execution_interrupted, and prompts it never heard end."""
    failed = result["failed_ids"]
    seen = [p for p in failed if set(ws.terminal(p)) & {"execution_error", "execution_interrupted"}]
    ok_seen = [p for p in result["success_ids"] if "execution_success" in ws.terminal(p)]
    silent = sorted(p for p in result["failed_ids"] + result["success_ids"] if not ws.terminal(p))
    return {"ws_failed_seen": len(seen), "ws_success_seen": len(ok_seen), "ws_missing_terminal": len(silent),
            "ws_missing_failed": sorted(set(failed) - set(seen)), "ws_connects": ws.connects}


def post(url: str, prompt: dict, retry_429: bool = True, stats: dict | None = None,
         client_id: str | None = None) -> str | None:
    """POST /prompt; a 429 is retried after a pause. None when refused otherwise or unreachable."""
    body: dict = {"prompt": prompt}
    if client_id is not None:
        body["client_id"] = client_id
    while True:
        try:
            r = requests.post(f"{url}/prompt", json=body, timeout=60)
        except requests.RequestException:
            return None
        if r.status_code == 200:
            return r.json()["prompt_id"]
        if stats is not None:
            stats[r.status_code] = stats.get(r.status_code, 0) + 1
        if r.status_code == 429 and retry_429:  # as a polite client: the server's Retry-After, jittered
            time.sleep(float(r.headers.get("Retry-After", 1)) * random.uniform(1.0, 2.0))
            continue
        return None


def outcome(url: str, ids: list[str], timeout: float) -> dict:
    """Wait until every id has a history entry (or timeout); count by status."""
    deadline = time.monotonic() + timeout
    left = set(ids)
    statuses: dict[str, str] = {}
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                entry = requests.get(f"{url}/history/{pid}", timeout=30).json().get(pid)
            except requests.RequestException:
                entry = None
            if entry is not None:
                statuses[pid] = entry["status"]["status_str"]
                left.discard(pid)
        if left:
            time.sleep(1.0)
    unfinished = []
    if left:  # at the deadline: still queued or running is not lost, only not finished in time
        try:
            q = requests.get(f"{url}/queue", timeout=30).json()
            queued = {i[1] for i in q["queue_running"] + q["queue_pending"]}
            unfinished = sorted(left & queued)
            left -= queued
        except requests.RequestException:
            pass
    return {"success": sum(s == "success" for s in statuses.values()),
            "error": sum(s != "success" for s in statuses.values()), "missing": sorted(left),
            "unfinished": unfinished,
            "success_ids": sorted(p for p, s in statuses.items() if s == "success"),
            "failed_ids": sorted(p for p, s in statuses.items() if s != "success")}


def summary(name: str, tried: int, accepted: int, result: dict, **extra) -> dict:
    lost = len(result["missing"])
    row = {"tried": tried, "accepted": accepted, "survived": accepted - lost, "lost": lost,
           "succeeded": result["success"], "failed_with_status": result["error"],
           "unfinished_at_deadline": len(result.get("unfinished", [])), **extra}
    print(f"{name:10s} tried {tried:4d}  accepted {accepted:4d}  survived {row['survived']:4d}  lost {lost:3d}  "
          f"(succeeded {result['success']}, failed with a status {result['error']})"
          + "".join(f"  {k} {v}" for k, v in extra.items() if not isinstance(v, (list, dict))))
    return row


def wait_running(url: str, at_least_done: int, ids: list[str], timeout: float = 600) -> None:
    """Until something runs and at least `at_least_done` of ids have finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = requests.get(f"{url}/queue", timeout=30).json()
        done = sum(bool(requests.get(f"{url}/history/{p}", timeout=30).json()) for p in ids[:at_least_done + 4])
        if q["queue_running"] and done >= at_least_done:
            return
        time.sleep(0.2)
    raise RuntimeError("the server never reached the state to inject the fault in")


# ---- scenarios ------------------------------------------------------------------------------------------
def flood(work: Path, models: Path, n: int = 500, clients: int = 20, max_batch: int = 1,
          timeout: float = 3600) -> dict:
    srv = ServerProcess(work / "flood", models, max_batch=max_batch).start()
    codes: dict = {}
    t0 = time.perf_counter()
    ws = WsWatcher(srv.url)
    try:
        with ThreadPoolExecutor(clients) as pool:
            ids = list(pool.map(lambda i: post(srv.url, make_prompt(1000 + i), stats=codes, client_id=ws.client_id),
                                range(n)))
        accepted = [i for i in ids if i is not None]
        res = outcome(srv.url, accepted, timeout=timeout)
        time.sleep(1.0)  # the last messages reach the socket
    finally:
        ws.close()
        srv.stop()
    return summary("flood", n, len(accepted), res, clients=clients, retried_429=codes.get(429, 0),
                   other_refusals={k: v for k, v in codes.items() if k != 429},
                   seconds=round(time.perf_counter() - t0, 1), max_batch=max_batch, **ws_report(ws, res))


def restart_after(work: Path, models: Path, name: str, sig: int, n: int = 40, max_batch: int = 1) -> dict:
    """Queue n prompts, send `sig` once a few finished and one runs, restart, wait for all."""
    srv = ServerProcess(work / name, models, drain=120.0, max_batch=max_batch).start()
    port = srv.port
    ws = WsWatcher(srv.url)  # reconnects to the restarted server (same port, same clientId)
    try:
        ids = [post(srv.url, make_prompt(2000 + i), client_id=ws.client_id) for i in range(n)]
        accepted = [i for i in ids if i is not None]
        wait_running(srv.url, 3, accepted)
        running = requests.get(f"{srv.url}/queue", timeout=30).json()
        at_fault = {"running": len(running["queue_running"]), "pending": len(running["queue_pending"])}
        t0 = time.perf_counter()
        srv.signal(sig)
        rc = srv.wait(300)
        stop_s = time.perf_counter() - t0
    finally:
        srv.stop()
    srv2 = ServerProcess(work / name, models, port=port, max_batch=max_batch).start()
    try:
        res = outcome(srv2.url, accepted, timeout=1800)
        time.sleep(1.0)
    finally:
        ws.close()
        srv2.stop()
    return summary(name, n, len(accepted), res, at_fault=at_fault, exit_code=rc, stop_seconds=round(stop_s, 1),
                   max_batch=max_batch, **ws_report(ws, res))


def _inprocess_app(work: Path, models: Path):
    work.mkdir(parents=True, exist_ok=True)
    folders = ModelFolders(models, output_dir=work / "output", input_dir=work / "input", temp_dir=work / "temp")
    ex = PromptExecutor(folders, device="cpu")
    return create_app(models, executor=ex, serve_frontend=False, max_batch=1), ex


def oom(work: Path, models: Path) -> dict:
    """A torch.cuda.OutOfMemoryError raised from inside the sampler (engine.sample) for one seed."""
    from sd35fp8.workflow import engine

    real = engine.sample

    def sample(ctx, model, seed, *args, **kwargs):
        if seed == OOM_SEED:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB (injected)")
        return real(ctx, model, seed, *args, **kwargs)

    app, _ = _inprocess_app(work / "oom", models)
    engine.sample = sample
    try:
        with LiveServer(app) as srv:
            ws = WsWatcher(srv.url)
            ids = [post(srv.url, make_prompt(OOM_SEED), client_id=ws.client_id),
                   post(srv.url, make_prompt(3001), client_id=ws.client_id)]
            res = outcome(srv.url, ids, timeout=600)
            time.sleep(1.0)
            ws.close()
            entry = requests.get(f"{srv.url}/history/{ids[0]}", timeout=30).json()[ids[0]]
            msg = [d for e, d in entry["status"]["messages"] if e == "execution_error"][0]["exception_message"]
            after = requests.get(f"{srv.url}/history/{ids[1]}", timeout=30).json()[ids[1]]["status"]["status_str"]
    finally:
        engine.sample = real
    seen = ws_report(ws, res)
    ok = res["error"] == 1 and after == "success" and "--offload model" in msg and seen["ws_failed_seen"] == 1
    return summary("oom", 2, 2, res, next_prompt=after, advice_given="--offload model" in msg, passed=ok,
                   message=msg, **seen)


def unwritable(work: Path, models: Path) -> dict:
    app, ex = _inprocess_app(work / "unwritable", models)
    out = ex.folders.output_dir
    with LiveServer(app) as srv:
        ws = WsWatcher(srv.url)
        first = post(srv.url, make_prompt(4000), client_id=ws.client_id)
        outcome(srv.url, [first], timeout=600)
        shutil.rmtree(out)
        out.write_text("not a folder")  # root ignores permission bits: a file in its place is unwritable
        bad = post(srv.url, make_prompt(4001), client_id=ws.client_id)
        res_bad = outcome(srv.url, [bad], timeout=600)
        entry = requests.get(f"{srv.url}/history/{bad}", timeout=30).json()[bad]
        msg = [d for e, d in entry["status"]["messages"] if e == "execution_error"][0]["exception_message"]
        out.unlink()
        out.mkdir()
        good = post(srv.url, make_prompt(4002), client_id=ws.client_id)
        res_good = outcome(srv.url, [good], timeout=600)
        time.sleep(1.0)
        ws.close()
        partial = [p.name for p in out.rglob("*") if p.name.endswith(".partial")]
    res = {"success": res_bad["success"] + res_good["success"], "error": res_bad["error"] + res_good["error"],
           "missing": res_bad["missing"] + res_good["missing"], "failed_ids": res_bad["failed_ids"] + res_good["failed_ids"],
           "success_ids": res_bad["success_ids"] + res_good["success_ids"]}
    seen = ws_report(ws, res)
    ok = res_bad["error"] == 1 and res_good["success"] == 1 and not partial and seen["ws_failed_seen"] == 1
    return summary("unwritable", 2, 2, res, partial_files=len(partial), passed=ok, message=msg, **seen)


def _proc_sample(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {"rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def soak(work: Path, models: Path, minutes: float, clients: int = 4) -> dict:
    srv = ServerProcess(work / "soak", models).start()
    ws = WsWatcher(srv.url)
    stop = threading.Event()
    ids: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            pid = post(srv.url, make_prompt(10_000 * (k + 1) + i), client_id=ws.client_id)
            i += 1
            if pid is None:
                continue
            with lock:
                ids.append(pid)
            while not stop.is_set():
                if requests.get(f"{srv.url}/history/{pid}", timeout=60).json():
                    break
                time.sleep(0.2)

    samples = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        while time.monotonic() - t0 < minutes * 60:
            samples.append({"minute": round((time.monotonic() - t0) / 60, 2), "prompts": len(ids),
                            **_proc_sample(srv.proc.pid)})
            print(f"  soak {samples[-1]}", flush=True)
            time.sleep(60)
        samples.append({"minute": round((time.monotonic() - t0) / 60, 2), "prompts": len(ids),
                        **_proc_sample(srv.proc.pid)})
        stop.set()
        for t in threads:
            t.join(120)
        res = outcome(srv.url, list(ids), timeout=600)
        time.sleep(1.0)
    finally:
        stop.set()
        ws.close()
        srv.stop()
    warm = next((s for s in samples if s["minute"] >= 2), samples[0])  # after warm-up (models loaded, caches)
    growth = (samples[-1]["rss_mib"] - warm["rss_mib"]) / warm["rss_mib"] * 100
    return summary("soak", len(ids), len(ids), res, minutes=minutes, rss_growth_pct_after_warmup=round(growth, 2),
                   fds_first_last=[warm["fds"], samples[-1]["fds"]],
                   threads_first_last=[warm["threads"], samples[-1]["threads"]], samples=samples,
                   **ws_report(ws, res))


def versions() -> dict:
    import fastapi
    import uvicorn

    from results_io import versions as base_versions

    return {**base_versions(), "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "cpu_count": os.cpu_count(), "platform": platform.platform()}


def main() -> None:
    global SIZE, STEPS
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        work, models, port, drain = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        run_server_child(work, models, port, drain, int(sys.argv[6]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, help="scenarios to run (default: all but soak)")
    ap.add_argument("--soak-minutes", type=float, default=30.0)
    ap.add_argument("--flood", type=int, default=500, help="prompts in the flood")
    ap.add_argument("--flood-timeout", type=float, default=3600, help="seconds to wait for the flood's prompts")
    ap.add_argument("--max-batch", type=int, default=1,
                    help="the server's --max-batch (cross-prompt batching; 1 = off, the server's default)")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--size", type=int, default=SIZE, help=f"image side in pixels (default {SIZE})")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"sampler steps (default {STEPS})")
    args = ap.parse_args()
    SIZE, STEPS = args.size, args.steps  # the server child runs the prompts the parent sends: no need to pass them
    todo = args.only or [s for s in SCENARIOS if s != "soak"]
    with tempfile.TemporaryDirectory(prefix="sd35fp8-faults-") as tmp:
        work = Path(tmp)
        models = build_models_folder(work / "comfy")
        for name in todo:  # each result is written as soon as it is known (a later scenario may not finish)
            if name == "flood":
                row = flood(work, models, n=args.flood, max_batch=args.max_batch, timeout=args.flood_timeout)
            elif name in ("kill9", "sigterm"):
                row = restart_after(work, models, name, signal.SIGKILL if name == "kill9" else signal.SIGTERM,
                                    max_batch=args.max_batch)
            elif name == "oom":
                row = oom(work, models)
            elif name == "unwritable":
                row = unwritable(work, models)
            else:
                row = soak(work, models, args.soak_minutes)
            write_result(args.out, name, row)


def write_result(out: Path, name: str, row: dict) -> None:
    """Merge one scenario's row (with date, versions, workflow) into the JSON; print the loss total."""
    data = json.loads(out.read_text()) if out.exists() else {"scenarios": {}}
    stamp = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "versions": versions(), "device": "cpu", "workflow": f"seed-fp8-allinone {SIZE}x{SIZE} euler {STEPS} steps"}
    stamp["command"] = "python benchmarks/faults.py " + " ".join(sys.argv[1:])
    if name in data["scenarios"]:  # an earlier run's row is kept, not lost
        data.setdefault("previous_runs", {}).setdefault(name, []).append(data["scenarios"][name])
    data["scenarios"][name] = {**row, **stamp}
    core = [n for n in ("flood", "kill9", "sigterm") if n in data["scenarios"]]
    lost = sum(data["scenarios"][n]["lost"] for n in core)
    data["accepted_lost_flood_kill9_sigterm"] = lost if len(core) == 3 else None  # None: not all three run
    data["not_run"] = [n for n in SCENARIOS if n not in data["scenarios"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"accepted prompts lost in {', '.join(core) or 'no loss scenario run yet'}: {lost}; "
          f"not run: {', '.join(data['not_run']) or 'none'}; wrote {out}")

if __name__ == "__main__":
    main()
