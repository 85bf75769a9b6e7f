"""One engine replica: a PromptExecutor in its own process, streaming a prompt's events back.

Ray-agnostic (ray_serve.py wraps it in a Ray Serve deployment; tests can call it directly):

    replica = EngineReplica("ComfyUI/models", device="cuda")
    async for item in replica.run([{"prompt": graph, "prompt_id": pid, "extra_data": {}, "execute_outputs": ["9"]}]):
        ...   # ("event", job index, event, data, replica id) ... ("result", job index, result dict, replica id)

The replica writes its images into a private folder and sends their bytes with the events that name
them (`executed`) and with the final result (key FILES_KEY, {(type, subfolder, filename): bytes}), so the
front server stores them in its own output folder whichever machine the replica runs on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from sd35fp8.errors import SD35Error
from sd35fp8.workflow import ModelFolders, PromptExecutor
from sd35fp8.workflow.executor import ExecutionResult, PromptJob

log = logging.getLogger(__name__)

FILES_KEY = "_sd35fp8_files"  # bytes of the images a ui dict names, keyed (type, subfolder, filename)
FILE_TYPES = ("output", "temp")


class EngineReplica:
    """Loads nothing up front: the executor loads models on the first prompt (and caches them)."""

    def __init__(self, models_dir: str | os.PathLike, device: str | None = None,
                 input_dir: str | os.PathLike | None = None, extra_model_paths: str | os.PathLike | None = None,
                 executor_options: dict | None = None, compile: bool | None = None, offload: str = "none",
                 engine: dict | None = None):
        """compile / offload: the engine options of the replica's PromptExecutor (as `sd35fp8 serve
        --compile/--no-compile --offload`; None = the device's default for a server); engine: its other
        keyword options (attention, cache_threshold, preview_method, preview_size)."""
        self.replica_id = uuid.uuid4().hex[:12]
        self.work = Path(tempfile.mkdtemp(prefix=f"sd35fp8-replica-{self.replica_id}-"))
        folders = ModelFolders(models_dir, output_dir=self.work / "output", input_dir=input_dir,
                               temp_dir=self.work / "temp", extra_config=extra_model_paths)
        dev = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.executor = PromptExecutor(folders, device=dev, options=executor_options, compile=compile, offload=offload,
                                       **(engine or {}))
        self.broken: str | None = None  # set when the executor thread raised something it must not
        self.busy = threading.Lock()
        log.info("engine replica %s on %s (pid %d, compile %s, offload %s)", self.replica_id, dev, os.getpid(),
                 self.executor.compile, self.executor.offload)

    # ---- Ray Serve hooks ------------------------------------------------------------------------
    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose executor failed outside a node is restarted."""
        if self.broken is not None:
            raise RuntimeError(f"engine replica {self.replica_id} is broken: {self.broken}")

    def info(self) -> dict:
        return {"replica_id": self.replica_id, "pid": os.getpid(), "device": str(self.executor.device),
                "compile": self.executor.compile, "offload": self.executor.offload}

    # ---- running prompts ------------------------------------------------------------------------
    def _files_of(self, ui: dict) -> dict:
        """ui dict -> a copy carrying the bytes of the images it names."""
        out = {k: v for k, v in ui.items() if k != FILES_KEY}
        files = {}
        for img in ui.get("images", []) if isinstance(ui.get("images"), list) else []:
            kind = img.get("type")
            if kind not in FILE_TYPES:
                continue
            root = self.executor.folders.output_dir if kind == "output" else self.executor.folders.temp_dir
            path = Path(root) / img.get("subfolder", "") / img["filename"]
            files[(kind, img.get("subfolder", ""), img["filename"])] = path.read_bytes()
        if files:
            out[FILES_KEY] = files
        return out

    def _result(self, r: ExecutionResult) -> dict:
        return {"prompt_id": r.prompt_id, "success": r.success, "error": r.error, "interrupted": r.interrupted,
                "sampled_with": r.sampled_with, "outputs": {nid: self._files_of(ui) for nid, ui in r.outputs.items()}}

    async def run(self, jobs: list[dict]) -> AsyncIterator[tuple]:
        """Run one prompt (or a cross-prompt batch) and stream its events and results.

        jobs: [{"prompt", "prompt_id", "extra_data", "execute_outputs"}]. Yields ("event", i, event, data,
        replica id), ("result", i, result dict, replica id), and ("raised", -1, message, replica id) when the
        executor refused the batch before running it (an SD35Error; the caller runs the prompts alone).
        Cancelling the stream interrupts the prompts.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def put(item: tuple) -> None:
            loop.call_soon_threadsafe(q.put_nowait, item)

        def hook(i: int):
            def send(event: str, data: Any) -> None:
                if event == "executed" and isinstance(data.get("output"), dict):
                    data = {**data, "output": self._files_of(data["output"])}
                put(("event", i, event, data, self.replica_id))
            return send

        def work() -> None:
            try:
                with self.busy:
                    pjobs = [PromptJob(j["prompt"], j["prompt_id"], j.get("extra_data"), hook(i), j.get("execute_outputs"))
                             for i, j in enumerate(jobs)]
                    if len(pjobs) == 1:
                        p = pjobs[0]
                        r = self.executor.execute(p.prompt, p.prompt_id, p.extra_data, hooks=p.hooks,
                                                  execute_outputs=p.execute_outputs)
                        put(("result", 0, self._result(r), self.replica_id))
                    else:
                        self.executor.execute_batch(
                            pjobs, lambda i, r: put(("result", i, self._result(r), self.replica_id)))
            except SD35Error as ex:
                put(("raised", -1, f"{type(ex).__name__}: {ex}", self.replica_id))
            except BaseException as ex:  # noqa: BLE001 - anything else breaks the replica: Ray restarts it
                self.broken = f"{type(ex).__name__}: {ex}"
                put(("raised", -1, self.broken, self.replica_id))
                raise
            finally:
                put(("end",))

        fut = loop.run_in_executor(None, work)
        try:
            while True:
                item = await q.get()
                if item[0] == "end":
                    break
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            for j in jobs:
                self.executor.interrupt(j["prompt_id"])
            raise
        await fut
