"""Console progress bars for a workflow's sampling steps, fed by the executor's events.

    bars = ProgressBars(per_prompt=True)     # sd35fp8 serve: one bar per prompt and sampler node
    send = bars.wrap(hub.send)               # draws on "progress" events, passes every event on
    run_workflow(..., hooks=ProgressBars())  # sd35fp8 run: one bar per sampler node

A bar is keyed by (prompt id, node id) and shown on stderr (tqdm); it closes when its node reaches
its last step, or when a new run of the same node starts over. Thread safe: the server's worker
threads (several with Ray replicas) report through one instance.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm


class ProgressBars:
    """`self(event, data)` draws the executor's "progress" events ({value, max, node, prompt_id})."""

    def __init__(self, file: TextIO | None = None, per_prompt: bool = False):
        self.file = file
        self.per_prompt = per_prompt
        self._bars: dict[tuple[str, str], tqdm] = {}
        self._lock = threading.Lock()

    def __call__(self, event: str, data: Any) -> None:
        if event != "progress" or not isinstance(data, dict) or data.get("node") is None:
            return
        pid, node = str(data.get("prompt_id") or ""), str(data["node"])
        value, total = int(data["value"]), int(data["max"])
        label = f"prompt {pid[:8]} node {node}" if self.per_prompt else f"node {node}"
        with self._lock:
            bar = self._bars.get((pid, node))
            if bar is None or bar.total != total or value < bar.n:
                if bar is not None:
                    bar.close()
                bar = self._bars[(pid, node)] = tqdm(total=total, desc=label, unit="step",
                                                     file=self.file if self.file is not None else sys.stderr)
            bar.update(value - bar.n)
            if value >= total:
                bar.close()
                del self._bars[(pid, node)]

    def wrap(self, send: Callable[[str, Any, Any], None]) -> Callable[[str, Any, Any], None]:
        """A server `send(event, data, sid)` that also draws the bars."""
        def send_and_draw(event: str, data: Any, sid: Any) -> None:
            self(event, data)
            send(event, data, sid)

        return send_and_draw

    def close(self) -> None:
        """Close the bars of nodes that did not finish (an error or interrupt)."""
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
