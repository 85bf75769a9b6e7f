"""History pages (issue 27 item 6): PromptHistory.get gives exactly ComfyUI's slice, walked from the
nearer end, for every (offset, max_items)."""

from __future__ import annotations

from sd35fp8.server.history import PromptHistory


def _naive(ids: list[str], max_items, offset) -> list[str]:
    if offset < 0 and max_items is not None:
        offset = max(len(ids) - max_items, 0)
    offset = max(offset, 0)
    end = None if max_items is None else offset + max_items
    return ids[offset:end]


def test_pages_match_comfyui_slices():
    h = PromptHistory(max_history=25)
    for i in range(30):  # the first five are dropped
        h.add(f"p{i}", {"n": i})
    ids = [f"p{i}" for i in range(5, 30)]
    for max_items in (None, 0, 1, 3, 12, 25, 40):
        for offset in (-1, 0, 1, 7, 13, 24, 25, 30):
            assert list(h.get(max_items=max_items, offset=offset)) == _naive(ids, max_items, offset), (max_items, offset)
    assert h.get("p29") == {"p29": {"n": 29}} and h.get("p0") == {}
    import json

    for max_items, offset in ((None, -1), (3, -1), (4, 2), (0, -1)):
        assert json.loads(h.get_json(max_items=max_items, offset=offset)) == h.get(max_items=max_items, offset=offset)
    h.get_json()
    h.add("p30", {"n": 30})  # evicts p5 and its cached rendering
    assert "p5" not in h._json and json.loads(h.get_json("p30")) == {"p30": {"n": 30}}
    h.delete("p29")
    h.wipe()
    assert h.get_json() == b"{}" and not h._json


def test_sorted_jobs_follow_the_history():
    from sd35fp8.server.jobs import _Summaries
    from sd35fp8.server.queue import PromptQueue

    q = PromptQueue(max_queue=4)
    s = _Summaries()

    def finish(pid: str, created: int) -> None:
        q.put([created, pid, {}, {"create_time": created}, []])
        task, _ = q.get(timeout=1)
        q.task_done(task, {}, {"status_str": "success", "completed": True, "messages": []})

    finish("b", 20)
    finish("a", 10)
    assert [j["id"] for j in s.sorted_jobs(q)] == ["a", "b"]
    assert s.sorted_jobs(q) is s.sorted_jobs(q)  # cached while the history is unchanged
    finish("c", 15)
    q.delete_history_item("b")
    assert [j["id"] for j in s.sorted_jobs(q)] == ["a", "c"]


def test_full_dump_is_cached_until_the_history_changes():
    """GET /history (no max_items): one body per history version, the same bytes object on every read."""
    import json

    h = PromptHistory(max_history=3)
    for i in range(3):
        h.add(f"p{i}", {"n": i})
    first = h.get_json()
    assert h.get_json() is first and h.get_json(offset=0) is first
    assert json.loads(first) == h.get()
    h.add("p3", {"n": 3})  # evicts p0
    after_add = h.get_json()
    assert after_add is not first and list(json.loads(after_add)) == ["p1", "p2", "p3"]
    assert h.get_json() is after_add
    h.delete("p2")
    assert list(json.loads(h.get_json())) == ["p1", "p3"]
    h.restore([("p9", {"n": 9})])
    assert list(json.loads(h.get_json())) == ["p1", "p3", "p9"]
    h.wipe()
    assert h.get_json() == b"{}"


def _queue_with_history(done: int, pending: int, running: int = 1):
    """A PromptQueue whose history holds `done` entries (every third failed, every fifth cancelled,
    create times shuffled), `running` taken items and `pending` waiting ones."""
    import random

    from sd35fp8.server.queue import PromptQueue

    rng = random.Random(0)
    q = PromptQueue(max_queue=done + pending + running + 1)
    for i in range(done):
        created = rng.randrange(1000)
        extra = {"create_time": created, "extra_pnginfo": {"workflow": {"id": f"w{i % 3}"}}}
        q.put([i, f"d{i}", {"1": {"class_type": "X", "inputs": {"t": "é" * (i % 3)}}}, extra, ["1"]])
        task, _ = q.get(timeout=1)
        event = "execution_success" if i % 3 else "execution_error"
        event = "execution_interrupted" if i % 5 == 0 else event
        q.task_done(task, {"1": {"images": [{"filename": f"{i}.png", "subfolder": "", "type": "output"}]}},
                    {"status_str": "success" if event == "execution_success" else "error", "completed": True,
                     "messages": [["execution_start", {"timestamp": created}],
                                  [event, {"timestamp": created + 1 + i % 4}]]})  # durations with ties
    for i in range(running + pending):
        extra = {"create_time": 500 + rng.randrange(1000), "extra_pnginfo": {"workflow": {"id": f"w{i % 2}"}}}
        q.put([done + i, f"q{i}", {"1": {"class_type": "X", "inputs": {}}}, extra, ["1"]])
    for _ in range(running):
        q.get(timeout=1)
    return q


def test_queue_json_is_comfy_queue():
    """GET /queue's cached bytes are exactly comfy_queue() through every kind of change: one running item as in
    ComfyUI, the rest of a running batch first among the pending."""
    import json

    q = _queue_with_history(3, 6, running=2)
    running = sorted(q.current_queue()[0], key=lambda i: i[0])
    shown = json.loads(q.queue_json())
    assert len(running) == 2 and shown["queue_running"] == running[:1] and shown["queue_pending"][0] == running[1]

    def check():
        running, pending = q.comfy_queue()
        body = q.queue_json()
        assert json.loads(body) == {"queue_running": running, "queue_pending": pending}
        assert body == json.dumps({"queue_running": running, "queue_pending": pending}, ensure_ascii=False,
                                  separators=(",", ":")).encode()  # the bytes a JSONResponse would send

    check()
    q.put([-1, "front", {}, {"create_time": 1}, []])
    check()
    assert [i[1] for i in json.loads(q.queue_json())["queue_pending"][:2]] == [running[1][1], "front"]
    q.delete_queue_item("q3")
    check()
    task, _ = q.get(timeout=1)
    check()
    q.task_done(task, {}, {"status_str": "success", "completed": True, "messages": []})
    check()
    q.wipe_queue()
    check()
    assert q.pending() == [] and not q._item_json
    assert json.loads(q.queue_json())["queue_pending"] == [running[1]]  # still running in the first one's batch


def test_jobs_pages_match_a_full_sort():
    """GET /jobs from cached rows gives what ComfyUI's get_all_jobs gives (every job normalized, filtered,
    then a stable sort of running + pending + history by create_time or execution duration), for every
    status filter, workflow_id, sort, order, offset and limit, before and after the queue and the history
    change."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sd35fp8.server.jobs import history_job, jobs_routes, queue_job

    q = _queue_with_history(40, 7, running=1)
    app = FastAPI()
    app.include_router(jobs_routes(q))

    def duration(job: dict) -> int:
        start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
        return end - start if end and start else 0

    def naive(status: str, workflow: str, sort_by: str, limit, offset: int, order: str) -> dict:
        wanted = {s for s in status.split(",") if s} or {"pending", "in_progress", "completed", "failed", "cancelled"}
        running, pending = q.current_queue()
        jobs = [queue_job(i, "in_progress") for i in running] + [queue_job(i, "pending") for i in pending]
        jobs += [history_job(p, e) for p, e in q.history().items()]
        jobs = [j for j in jobs if j["status"] in wanted and (not workflow or j.get("workflow_id") == workflow)]
        key = duration if sort_by == "execution_duration" else (lambda j: j.get("create_time", 0))
        jobs = sorted(jobs, key=key, reverse=order == "desc")  # stable both ways, as ComfyUI apply_sorting
        page = jobs[offset:] if limit is None else jobs[offset:offset + limit]
        return {"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": len(jobs),
                                             "has_more": offset + len(page) < len(jobs)}}

    pages = ((None, 0), (5, 0), (5, 3), (10, 44), (3, 100), (1, 2), (None, 7), (300, 1))
    with TestClient(app) as c:
        for round_ in range(2):
            for status in ("", "completed", "failed,cancelled", "pending,in_progress", "pending,completed"):
                for workflow, sort_by in (("", "created_at"), ("", "execution_duration"), ("w1", "created_at"),
                                          ("w0", "execution_duration")):
                    for order in ("desc", "asc"):
                        for limit, offset in pages:
                            params = {"status": status, "sort_order": order, "offset": offset, "sort_by": sort_by}
                            if limit is not None:
                                params["limit"] = limit
                            if workflow:
                                params["workflow_id"] = workflow
                            got = c.get("/jobs", params=params)
                            assert got.status_code == 200
                            assert got.json() == naive(status, workflow, sort_by, limit, offset, order), (
                                round_, status, workflow, sort_by, order, limit, offset)
            task, _ = q.get(timeout=1)  # the queue and the history change between rounds
            q.task_done(task, {}, {"status_str": "success", "completed": True, "messages": []})
            q.delete_history_item("d4")
            q.put([99, "late", {}, {"create_time": 3}, []])


def _plain_dump(h) -> bytes:
    """The full dump as the pages render it: every entry's rendering joined (no blocks)."""
    from sd35fp8.server.history import join_wrapped, render_entry

    return join_wrapped(b"{", [render_entry(p, e) for p, e in h.get().items()], b"}")


def test_full_dump_chunks_rejoin_only_the_blocks_that_changed():
    """GET /history sends cached blocks of BLOCK entries: after one entry is added (and the oldest
    dropped) the bytes are those of a fresh rendering, and only the first and last blocks are new."""
    import json

    from sd35fp8.server.history import BLOCK

    h = PromptHistory(max_history=3 * BLOCK)
    for i in range(3 * BLOCK):
        h.add(f"p{i}", {"n": i, "t": "é" * (i % 3)})
    first = h.full_chunks()
    assert h.full_chunks() is first and b"".join(first) == _plain_dump(h) == h.get_json()
    assert len(first) == 2 * 3 + 1  # "{", block, ",", block, ",", block, "}"
    h.add("new", {"n": -1})  # drops p0: block 0 loses one entry, a fourth block starts
    after = h.full_chunks()
    assert b"".join(after) == _plain_dump(h) and list(json.loads(b"".join(after)))[0] == "p1"
    assert after[1] is not first[1] and after[3] is first[3] and after[5] is first[5]  # the middle kept
    h.add("p5", {"n": "again"})  # drops p1; a stored id keeps its place (a dict, as in ComfyUI)
    assert b"".join(h.full_chunks()) == _plain_dump(h) and list(h.get())[3] == "p5"
    for pid in ("p300", "new", "nope"):
        h.delete(pid)
        assert b"".join(h.full_chunks()) == _plain_dump(h)
    h.wipe()
    assert h.full_chunks() == (b"{", b"}") and h.get_json() == b"{}"


def test_chunks_response_sends_the_joined_bytes():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sd35fp8.server.history import ChunksResponse

    app = FastAPI()
    bodies = {"a": (b"{", b'"x":1', b"", b",", b'"y":[2]', b"}"), "b": (), "c": (b"{}",)}

    @app.get("/{name}")
    async def route(name: str):
        return ChunksResponse(bodies[name])

    with TestClient(app) as c:
        for name, chunks in bodies.items():
            got = c.get(f"/{name}")
            assert got.status_code == 200 and got.content == b"".join(chunks)
            assert got.headers["content-length"] == str(len(b"".join(chunks)))
            assert got.headers["content-type"] == "application/json"


def test_jobs_rows_follow_the_history_change_by_change():
    """_Summaries.done_rows updated from the history's change log (adds, re-adds, deletes, the oldest
    dropped when full, a wipe, a burst longer than the log) equals the rows rebuilt from scratch, oldest
    first and newest first."""
    import random

    from sd35fp8.server.history import CHANGE_LOG
    from sd35fp8.server.jobs import _Summaries
    from sd35fp8.server.queue import PromptQueue

    rng = random.Random(3)
    q = PromptQueue(max_queue=10, max_history=50)
    s = _Summaries()

    def entry(pid: str) -> dict:
        created = rng.randrange(40)  # many ties: history order must break them
        ok = rng.random() < 0.7
        return {"prompt": [0, pid, {}, {"create_time": created}, []], "outputs": {},
                "status": {"status_str": "success" if ok else "error", "completed": True, "messages": []}}

    def check():
        got = s.done_rows(q)
        want = _Summaries().done_rows(q)
        assert got[0] == want[0] and [r[:3] for r in got[1]] == [r[:3] for r in want[1]]
        newest = sorted(want[1], key=lambda r: r[0], reverse=True)  # stable: equal times in history order
        assert [r[:3] for r in got[2]] == [r[:3] for r in want[2]] == [r[:3] for r in newest]

    check()
    for step in range(400):
        r = rng.random()
        if r < 0.6:
            pid = f"j{rng.randrange(120)}"  # sometimes a stored id again
            q.histories.add(pid, entry(pid))
        elif r < 0.9:
            q.delete_history_item(rng.choice(list(q.history()) or ["none"]))
        elif r < 0.93:
            q.wipe_history()
        if step % 7 == 0:
            check()
    check()
    for i in range(CHANGE_LOG + 10):  # more changes than the log holds: a rebuild
        q.histories.add(f"burst{i}", entry(f"burst{i}"))
    check()


def test_queue_chunks_keep_unchanged_blocks():
    """GET /queue's chunks: the joined bytes are comfy_queue() rendered, through puts at both ends,
    takes, removals and batches; a change leaves most blocks the same objects."""
    import json
    import random

    from sd35fp8.server.queue import PENDING_BLOCK, PromptQueue

    rng = random.Random(5)
    q = PromptQueue(max_queue=100_000)

    def put(n: float, pid: str) -> None:
        q.put([n, pid, {"1": {"class_type": "X", "inputs": {"seed": rng.randrange(9)}}}, {"create_time": 1}, ["1"]])

    def check() -> tuple[bytes, ...]:
        running, pending = q.comfy_queue()
        chunks = q.queue_chunks()
        assert b"".join(chunks) == q.queue_json() == json.dumps(
            {"queue_running": running, "queue_pending": pending}, ensure_ascii=False,
            separators=(",", ":")).encode()
        return chunks

    for i in range(20 * PENDING_BLOCK):
        put(i, f"p{i}")
    before = check()
    for change in (lambda: put(10 ** 6, "last"), lambda: put(-5, "front"), lambda: q.get(timeout=1),
                   lambda: q.delete_queue_item(f"p{7 * PENDING_BLOCK}"), lambda: put(3.5, "middle")):
        change()
        after = check()
        kept = {id(c) for c in before if len(c) > 1} & {id(c) for c in after if len(c) > 1}
        assert len(kept) >= len([c for c in before if len(c) > 1]) - 3, "one change re-joins about one block"
        before = after
    q.get_batch(timeout=1, max_batch=4)
    check()
    q.wipe_queue()
    running = sorted(q.current_queue()[0], key=lambda i: i[0])
    assert check()[-1] == b"]}" and q.pending() == [] and not q._blocks
    assert len(running) > 1 and json.loads(q.queue_json())["queue_pending"] == running[1:]  # one batch, one shown
