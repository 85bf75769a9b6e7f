"""GET /history, /jobs and /queue at 10 000 entries, timed over a socket to the last byte.

Builds the server app in this process (tests/test_server.py's fake executor: no model), fills its
history with --entries finished prompts shaped like the seed workflow (~1.7 KB each, as ComfyUI stores
them), serves it with uvicorn on 127.0.0.1 and times each route with a plain socket (HTTP/1.1, read
1 MB at a time): milliseconds to the first byte and to the last byte, median and max of --repeat reads.
Then it holds the worker on one prompt, queues --entries more prompts behind it (so /queue lists
10 000 pending and /jobs 20 000 jobs) and times /queue and /jobs again. "after one change" rows time
the first read after one entry was added (the cost of bringing the cached bodies up to date), --repeat
times, one new entry before each read (a finished prompt: the full history drops its oldest; or one
more pending prompt).
A bare Starlette app sending the same number of bytes gives the transfer floor of this machine now
(the CPU is shared: compare the rows with it).

    python benchmarks/history.py                  # writes benchmarks/results/history_cpu.json
    python benchmarks/history.py --entries 2000 --out /tmp/history.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def socket_get(url: str, path: str) -> tuple[float, float, int]:
    """(ms to the first byte, ms to the last byte, bytes) of one GET, read 1 MB at a time."""
    host, port = url.split("//")[1].rsplit(":", 1)
    t = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = s.recv(1 << 20)
        first = (time.perf_counter() - t) * 1000
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET {path}: {data[:200]!r}")
        n = len(data)
        while data:
            data = s.recv(1 << 20)
            n += len(data)
    return first, (time.perf_counter() - t) * 1000, n


def timed(url: str, path: str, repeat: int, before=None) -> dict:
    """Median and max of `repeat` reads; `before(k)`, when given, runs before read k (untimed)."""
    first, last, size = [], [], 0
    for k in range(repeat):
        if before is not None:
            before(k)
        f, t, size = socket_get(url, path)
        first.append(f)
        last.append(t)
    return {"ms_first_byte_median": round(statistics.median(first), 2),
            "ms_last_byte_median": round(statistics.median(last), 2),
            "ms_last_byte_max": round(max(last), 2), "bytes": size}


def floor(nbytes: int, repeat: int) -> dict:
    """The same number of bytes from a bare Starlette route: what the transfer alone costs now."""
    from live_server import free_port
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    import threading

    import uvicorn

    body = b"x" * nbytes

    async def route(request):
        return Response(body, media_type="application/json")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/", route)]), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        return timed(f"http://127.0.0.1:{port}", "/", repeat)
    finally:
        server.should_exit = True
        thread.join(30)


def finished_entry(i: int, prompt: dict) -> tuple[list, dict, dict]:
    pid = f"00000000-0000-4000-8000-{i:012d}"
    ts = 1_700_000_000_000 + i
    item = [i, pid, prompt, {"client_id": "bench", "create_time": ts}, ["9"]]
    outputs = {"9": {"images": [{"filename": f"img_{i:05}_.png", "subfolder": "", "type": "output"}]}}
    status = {"status_str": "success", "completed": True,
              "messages": [["execution_start", {"prompt_id": pid, "timestamp": ts}],
                           ["execution_success", {"prompt_id": pid, "timestamp": ts + 900}]]}
    return item, outputs, status


def run(entries: int, repeat: int, work: Path) -> dict:
    from fuzz import seed_prompt
    from live_server import LiveServer
    from test_server import HOLD, HOLD_SEED, fake_prompt, make_fake_executor, wait_for

    from sd35fp8.server import create_app

    app = create_app(work / "models", executor=make_fake_executor(work), serve_frontend=False,
                     max_queue=entries + repeat + 10)
    queue = app.state.queue
    base = seed_prompt()
    t0 = time.perf_counter()
    for i in range(entries):
        item, outputs, status = finished_entry(i, base)
        queue.put(item)
        task_id, _ = queue.get(timeout=1)
        queue.task_done(task_id, outputs, status)
    out: dict = {"entries": entries, "fill_seconds": round(time.perf_counter() - t0, 2), "routes": {}}
    rows = out["routes"]
    last = f"00000000-0000-4000-8000-{entries - 1:012d}"
    HOLD.clear()
    with LiveServer(app) as srv:
        url = srv.url
        for path in ("/history", "/history?max_items=100", f"/history/{last}", "/jobs", "/jobs?limit=100", "/queue"):
            socket_get(url, path)  # the first read renders and caches
            rows[f"GET {path}"] = timed(url, path, repeat)
        added = iter(range(entries, entries + 2 * repeat))

        def one_more_finished(_k: int) -> None:  # the oldest entry is dropped when the history is full
            item, outputs, status = finished_entry(next(added), base)
            queue.histories.add(item[1], {"prompt": item, "outputs": outputs, "status": status, "meta": {}})

        rows["GET /history, after one change"] = timed(url, "/history", repeat, one_more_finished)
        rows["GET /jobs, after one change"] = timed(url, "/jobs", repeat, one_more_finished)

        # the worker holds one prompt; `entries` prompts wait behind it
        queue.put([-1, "held", fake_prompt(seed=HOLD_SEED), {"create_time": 1_800_000_000_000}, ["3"]])
        wait_for(lambda: queue.running_ids() == ["held"])
        for i in range(entries):
            queue.put([entries + 1 + i, f"pending-{i:05}", base, {"client_id": "bench",
                                                                  "create_time": 1_800_000_000_001 + i}, ["9"]])
        for path in ("/queue", "/jobs", "/jobs?limit=100", "/jobs?status=pending&limit=100"):
            socket_get(url, path)
            rows[f"GET {path}, {entries} pending"] = timed(url, path, repeat)

        def one_more_pending(k: int) -> None:
            queue.put([10 ** 9 + k, f"one-more-{k}", base, {"create_time": 1_900_000_000_000 + k}, ["9"]])

        rows[f"GET /queue, {entries} pending, after one change"] = timed(url, "/queue", repeat, one_more_pending)
        queue.wipe_queue()
        HOLD.set()
        wait_for(lambda: not queue.running_ids(), timeout=60)
    out["floor_same_bytes_as_history"] = floor(rows["GET /history"]["bytes"], repeat)
    return out


def cpu_pressure() -> str | None:
    """/proc/pressure/cpu's "some" line: how much of the time runnable tasks waited for a CPU."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=15, help="reads per route (median and max)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "history_cpu.json"))
    args = ap.parse_args(argv)
    import fastapi
    import starlette
    import uvicorn

    load_before, pressure_before = list(os.getloadavg()), cpu_pressure()
    with tempfile.TemporaryDirectory(prefix="sd35fp8-history-") as tmp:
        res = run(args.entries, args.repeat, Path(tmp))
    result = {
        "benchmark": "history", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg": list(os.getloadavg()),
        "cpu_pressure_before": pressure_before, "cpu_pressure": cpu_pressure(),
        "versions": {"fastapi": fastapi.__version__, "starlette": starlette.__version__,
                     "uvicorn": uvicorn.__version__},
        "command": "python benchmarks/history.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **res,
    }
    print(f"{'route':<52} {'first ms':>9} {'last ms':>9} {'max ms':>9} {'bytes':>10}")
    for name, r in [*res["routes"].items(), ("floor: bare app, same bytes as /history", res["floor_same_bytes_as_history"])]:
        print(f"{name:<52} {r['ms_first_byte_median']:>9} {r['ms_last_byte_median']:>9} {r['ms_last_byte_max']:>9} "
              f"{r['bytes']:>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
