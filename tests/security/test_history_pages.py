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
