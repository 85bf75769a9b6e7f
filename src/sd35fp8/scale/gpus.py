"""`sd35fp8 serve --gpus-per-image K [--cfg-parallel 2]`: one server, every image sampled on K processes.

    sd35fp8 serve --models models --gpus-per-image 2                    # serve starts ranks 1..K-1 itself
    torchrun --nproc-per-node 2 -m sd35fp8 serve --models models --gpus-per-image 2   # or torchrun does

Rank 0 is the server: HTTP, queue, history, WebSocket and its prompt-worker thread. Ranks 1..K-1 run
`follow`: no HTTP, a PromptExecutor on their own device (cuda:LOCAL_RANK; on the CPU K gloo processes)
that receives every command rank 0's executor runs (execute, execute_batch, warmup, clear_cache, stop:
the job description, i.e. prompt graph, prompt id, extra data and output nodes, as one broadcast over a
gloo control group) and runs it too. Every rank loads the same models and runs the same nodes with the
same seeds; each MMDiT a loader builds is wrapped in `parallel.ParallelMMDiT` (EngineOptions.parallel),
so the MMDiT call of each sampler step is where the ranks split the work (CFG parallel x Ulysses
sequence parallel) and meet. Rank 0 sends the events and keeps the images; the other ranks save theirs
in a temporary folder removed at exit. The parallel MMDiT runs eager (no torch.compile, no CUDA graphs)
and without offload; ControlNet is refused on it.

Interrupts must stop every rank at the same step, or the others would wait in a collective for ever:
rank 0's `interrupt()` only files the request; at each interrupt check (before each node, each
sampler step) rank 0 applies what was filed and broadcasts its interrupt state, and every rank decides
from that one state.

Start: `sd35fp8 serve` spawns ranks 1..K-1 (torch.multiprocessing, a file store for the rendezvous);
a rank that dies during start-up is reported at once. Under torchrun (WORLD_SIZE set) every process
runs the command; rank 0 serves, the others follow. The followers ignore SIGINT / SIGTERM (a Ctrl-C
reaches the whole process group): rank 0 drains as usual, then sends `stop`, and they exit; spawned
ranks also exit when their parent process is gone. A prompt still running after the drain (second
signal, --drain-seconds) holds the ranks: they are killed instead.

Failure modes: a rank that fails alone inside a collective (out of memory on one GPU) leaves the
others waiting until the process group's timeout; the server's hang detection then restarts its
worker thread, which cannot help while the old one holds the ranks: restart the server.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sd35fp8.errors import InputError, SD35Error
from sd35fp8.workflow import ModelFolders, PromptExecutor
from sd35fp8.workflow.executor import ExecutionResult, PromptJob

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(days=365)  # a follower waits for the next command as long as the server idles
START_TIMEOUT = timedelta(minutes=10)  # the rendezvous (a rank that died is reported before that)


@dataclass(frozen=True)
class RankOptions:
    """What every rank needs to build the executor rank 0 builds (picklable: spawned ranks get it)."""

    world: int
    cfg: int = 1
    device: str = "cpu"  # "cuda" (rank r on cuda:LOCAL_RANK) or "cpu" (gloo)
    models_dir: str = "models"
    input_dir: str | None = None
    extra_model_paths: str | None = None
    attention: str = "auto"
    cache_threshold: float = 0.0
    preview_method: str = "none"  # rank 0's (the only rank whose events reach clients)
    preview_size: int = 512
    max_prompt_tokens: int | None = None
    max_text_chars: int | None = None
    max_pixel_steps: int | None = None  # the work meter's budget (sd35fp8.work_budget), as rank 0's executor has it
    log_level: int = logging.WARNING


def check_layout(gpus_per_image: int, cfg: int, device: str, local_world: int | None = None) -> None:
    """The errors a `--gpus-per-image K --cfg-parallel C` layout can have before any model loads."""
    if gpus_per_image < 1:
        raise InputError(f"--gpus-per-image must be at least 1, got {gpus_per_image}")
    if cfg not in (1, 2):
        raise InputError(f"--cfg-parallel must be 1 or 2 (the cond and uncond halves), got {cfg}")
    if gpus_per_image % cfg:
        raise InputError(f"--cfg-parallel {cfg} needs an even --gpus-per-image (the ranks form a cfg x sequence "
                         f"grid), got {gpus_per_image}")
    if device not in ("cuda", "cpu"):
        raise InputError(f"--gpus-per-image runs on 'cuda' or 'cpu' (rank r takes cuda:r), got --device {device}")
    if device == "cuda":
        have = torch.cuda.device_count()
        need = gpus_per_image if local_world is None else local_world
        if need > have:
            raise InputError(f"--gpus-per-image {gpus_per_image} needs {need} GPUs on this machine, {have} "
                             f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def torchrun_world() -> tuple[int, int, int, int] | None:
    """(rank, world, local rank, local world) when launched by torchrun (WORLD_SIZE > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return (int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


class DistributedExecutor(PromptExecutor):
    """A PromptExecutor on one rank of `--gpus-per-image`. Rank 0's (the leader's) commands are mirrored
    on the other ranks (`follow`); its interrupts are agreed at each check (module docstring)."""

    def __init__(self, folders: ModelFolders, device: str | torch.device, *, cfg: int, groups: tuple,
                 control: Any, attention: str = "auto", cache_threshold: float = 0.0, preview_method: str = "none",
                 preview_size: int = 512):
        super().__init__(folders, device=device, compile=False, offload="none", attention=attention,
                         cache_threshold=cache_threshold, preview_method=preview_method, preview_size=preview_size)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sends_previews = self.rank == 0  # the followers' events go nowhere: no preview work there
        self.cfg, self.groups, self.control = cfg, groups, control
        self.engine_options = replace(self.engine_options, parallel=self._parallel)
        self.command_lock = threading.Lock()  # rank 0: one command at a time crosses the ranks
        self._inbox: list[str | None] = []  # rank 0: interrupt requests not yet agreed
        self._inbox_lock = threading.Lock()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _parallel(self, engine: Any) -> Any:
        from sd35fp8.scale.parallel import ParallelMMDiT

        model = ParallelMMDiT(engine, cfg=self.cfg, groups=self.groups)
        heads, sp = model.config.num_heads, model.sp
        if heads % sp and self.leader:
            log.warning("%d attention heads on %d sequence-parallel ranks: padded to %d (%.0f %% more attention "
                        "work); a sequence-parallel degree dividing %d avoids it", heads, sp, heads + (-heads % sp),
                        100 * (-heads % sp) / heads, heads)
        log.info("%s", model.describe())
        return model

    # ---- commands (rank 0 sends, every rank runs) ---------------------------------------------------
    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    @contextmanager
    def _command(self, *command: Any) -> Iterator[None]:
        if not self.leader:  # a follower runs what `follow` received
            yield
            return
        with self.command_lock:
            self._broadcast(command)
            yield

    def execute(self, prompt: dict, prompt_id: str = "", extra_data: dict | None = None, hooks: Any = None,
                execute_outputs: list[str] | None = None) -> ExecutionResult:
        with self._command("execute", prompt, prompt_id, extra_data, execute_outputs):
            return super().execute(prompt, prompt_id, extra_data, hooks=hooks, execute_outputs=execute_outputs)

    def execute_batch(self, jobs: Sequence[PromptJob], on_result: Callable[[int, ExecutionResult], None] | None = None
                      ) -> list[ExecutionResult]:
        sent = [(j.prompt, j.prompt_id, j.extra_data, j.execute_outputs) for j in jobs]
        with self._command("execute_batch", sent):
            return super().execute_batch(jobs, on_result)

    def warmup(self, prompt: dict, shapes: Sequence[tuple[int, int, int]] | None = None) -> float:
        with self._command("warmup", prompt, None if shapes is None else [tuple(s) for s in shapes]):
            return super().warmup(prompt, shapes)

    def clear_cache(self) -> None:
        with self._command("clear_cache"):
            super().clear_cache()

    def stop_followers(self, timeout: float) -> bool:
        """Rank 0: tell the other ranks to leave `follow`. False when a command still holds the ranks
        after `timeout` seconds (an abandoned prompt): then they cannot be stopped cleanly."""
        if not self.command_lock.acquire(timeout=max(timeout, 0.0)):
            return False
        try:
            self._broadcast(("stop",))
        finally:
            self.command_lock.release()
        return True

    # ---- interrupts, agreed at every check ------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> None:
        if not self.leader:
            return super().interrupt(prompt_id)
        with self._inbox_lock:
            self._inbox.append(prompt_id)

    def _agree_interrupts(self) -> None:
        state = None
        if self.leader:
            with self._inbox_lock:
                inbox, self._inbox = self._inbox, []
            for prompt_id in inbox:
                super().interrupt(prompt_id)
            with self._interrupt_lock:
                state = (self._interrupt.is_set(), None if self._interrupt_ids is None else sorted(self._interrupt_ids))
        is_set, ids = self._broadcast(state)
        if not self.leader:
            with self._interrupt_lock:
                self._interrupt.set() if is_set else self._interrupt.clear()
                self._interrupt_ids = None if ids is None else set(ids)

    def _start_interrupts(self, prompt_ids) -> None:
        prompt_ids = list(prompt_ids)
        self._agree_interrupts()
        super()._start_interrupts(prompt_ids)

    def _check_interrupt(self) -> None:
        self._agree_interrupts()
        super()._check_interrupt()

    def _check_interrupt_for(self, prompt_id: str) -> None:
        self._agree_interrupts()
        super()._check_interrupt_for(prompt_id)

    def interrupt_pending(self) -> bool:
        self._agree_interrupts()
        return super().interrupt_pending()


def follow(executor: DistributedExecutor) -> None:
    """Ranks 1..K-1: run rank 0's commands until it sends `stop`."""
    while True:
        name, *args = executor._broadcast(None)
        if name == "stop":
            return
        try:
            if name == "execute":
                prompt, prompt_id, extra_data, outputs = args
                executor.execute(prompt, prompt_id, extra_data, execute_outputs=outputs)
            elif name == "execute_batch":
                executor.execute_batch([PromptJob(p, i, e, None, o) for p, i, e, o in args[0]])
            elif name == "warmup":
                executor.warmup(*args)
            elif name == "clear_cache":
                executor.clear_cache()
            else:
                raise RuntimeError(f"rank {executor.rank}: unknown command {name!r} from rank 0")
        except SD35Error as e:  # rank 0 meets the same error and reports it
            log.info("rank %d: %s: %s", executor.rank, name, e)
        except Exception:  # noqa: BLE001 - logged; rank 0 reports the prompt's own outcome
            log.exception("rank %d: %s failed", executor.rank, name)


# ---- processes -----------------------------------------------------------------------------------------
def _init_rank(rank: int, options: RankOptions, init_method: str, local_rank: int) -> tuple[torch.device, tuple, Any]:
    """Join the process group; every rank makes the same groups in the same order."""
    from sd35fp8.scale.parallel import make_groups

    if options.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=options.world,
                            timeout=START_TIMEOUT)
    groups = make_groups(options.cfg)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return device, groups, control


def _share_cores(options: RankOptions) -> None:
    """CPU ranks split the cores (called on the main thread: torch's thread count is read per thread)."""
    if options.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // options.world))


def _text_limit(options: RankOptions, folders: ModelFolders):
    from sd35fp8.server.prompt_text import TextBudget
    from sd35fp8.server.validation import Limits

    limits = Limits(**{k: v for k, v in (("max_prompt_tokens", options.max_prompt_tokens),
                                         ("max_text_chars", options.max_text_chars)) if v is not None})
    return TextBudget(limits.max_prompt_tokens, folders, max_chars=limits.max_text_chars).limit


def _follower(rank: int, options: RankOptions, init_method: str, local_rank: int) -> None:
    """A rank other than 0: its executor (outputs in a temporary folder) follows rank 0 until `stop`."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when the ranks stop
        signal.signal(sig, signal.SIG_IGN)
    _share_cores(options)
    work = Path(tempfile.mkdtemp(prefix=f"sd35fp8-rank{rank}-"))
    try:
        device, groups, control = _init_rank(rank, options, init_method, local_rank)
        try:
            folders = ModelFolders(options.models_dir, output_dir=work / "output", input_dir=options.input_dir,
                                   temp_dir=work / "temp", extra_config=options.extra_model_paths)
            executor = DistributedExecutor(folders, device, cfg=options.cfg, groups=groups, control=control,
                                           attention=options.attention, cache_threshold=options.cache_threshold)
            executor.text_limit = _text_limit(options, folders)  # as create_app sets rank 0's
            executor.work_budget = options.max_pixel_steps  # a refused sampler stops every rank at the same node
            log.info("rank %d of %d on %s (pid %d): following rank 0", rank, options.world, device, os.getpid())
            follow(executor)
        finally:
            dist.destroy_process_group()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spawned(rank: int, options: RankOptions, init_method: str, parent: int) -> None:
    """torch.multiprocessing target for ranks 1..K-1 of `sd35fp8 serve --gpus-per-image`."""
    logging.basicConfig(level=options.log_level, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")

    def orphaned() -> None:  # the server process is gone (killed): nobody will send `stop`
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphaned, name="sd35fp8-parent-watch", daemon=True).start()
    _follower(rank, options, init_method, local_rank=rank)


class Ranks:
    """Rank 0's view of the K processes: its executor, the spawned ranks (none under torchrun)."""

    def __init__(self, executor: DistributedExecutor, processes: list, store_dir: Path | None):
        self.executor, self.processes, self.store_dir = executor, processes, store_dir

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the followers (cleanly when no command holds them), leave the process group."""
        clean = self.executor.stop_followers(timeout)
        if not clean:
            log.warning("a prompt still holds the %d ranks: killing ranks 1..%d", self.executor.world,
                        self.executor.world - 1)
        for p in self.processes:
            if not clean:
                p.kill()
            p.join(timeout=30)
            if p.is_alive():
                log.warning("rank process %s (pid %s) did not exit: killed", p.name, p.pid)
                p.kill()
                p.join(timeout=5)
        if clean:
            dist.destroy_process_group()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)


def start_ranks(options: RankOptions, output_dir: str | os.PathLike | None = None,
                temp_dir: str | os.PathLike | None = None) -> Ranks | None:
    """Start (or, under torchrun, join) the K ranks. Rank 0 gets its Ranks (`.executor` for the server,
    `.stop()` at the end); any other rank under torchrun follows rank 0 here and gets None after `stop`."""
    run = torchrun_world()
    if run is not None:
        rank, world, local_rank, local_world = run
        if world != options.world:
            raise InputError(f"--gpus-per-image {options.world} but torchrun started {world} processes "
                             "(--nproc-per-node x nodes): give the same number")
        check_layout(world, options.cfg, options.device, local_world)
        if rank != 0:
            _follower(rank, options, "env://", local_rank)
            return None
        _share_cores(options)
        ranks = Ranks(_leader(options, "env://", local_rank, output_dir, temp_dir), [], None)
        _announce(options, f"ranks 1..{world - 1} from torchrun follow")
        return ranks
    check_layout(options.world, options.cfg, options.device)
    _share_cores(options)
    store_dir = Path(tempfile.mkdtemp(prefix="sd35fp8-ranks-"))
    init_method = f"file://{store_dir / 'store'}"
    ctx = torch.multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=_spawned, args=(r, options, init_method, os.getpid()), name=f"sd35fp8-rank{r}",
                             daemon=True) for r in range(1, options.world)]
    for p in processes:
        p.start()
    box: dict[str, Any] = {}

    def lead() -> None:
        try:
            box["executor"] = _leader(options, init_method, 0, output_dir, temp_dir)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    thread = threading.Thread(target=lead, name="sd35fp8-rank0-start", daemon=True)
    thread.start()
    while thread.is_alive():  # a rank that dies during start-up would leave the rendezvous waiting
        thread.join(0.2)
        dead = [p for p in processes if p.exitcode is not None]
        if dead and thread.is_alive():
            for p in processes:
                p.kill()
            shutil.rmtree(store_dir, ignore_errors=True)
            raise InputError(f"rank process {dead[0].name} exited with code {dead[0].exitcode} during start-up "
                             "(its log is above)")
    if "error" in box:
        for p in processes:
            p.kill()
        shutil.rmtree(store_dir, ignore_errors=True)
        raise box["error"]
    _announce(options, f"ranks 1..{options.world - 1} follow (pids {' '.join(str(p.pid) for p in processes)})")
    return Ranks(box["executor"], processes, store_dir)


def _leader(options: RankOptions, init_method: str, local_rank: int, output_dir: str | os.PathLike | None,
            temp_dir: str | os.PathLike | None) -> DistributedExecutor:
    device, groups, control = _init_rank(0, options, init_method, local_rank)
    folders = ModelFolders(options.models_dir, output_dir=output_dir, input_dir=options.input_dir, temp_dir=temp_dir,
                           extra_config=options.extra_model_paths)
    executor = DistributedExecutor(folders, device, cfg=options.cfg, groups=groups, control=control,
                                   attention=options.attention, cache_threshold=options.cache_threshold,
                                   preview_method=options.preview_method, preview_size=options.preview_size)
    return executor


def _announce(options: RankOptions, followers: str) -> None:
    sp = options.world // options.cfg
    print(f"sd35fp8 serve: one image on {options.world} processes ({options.device}: cfg parallel {options.cfg} x "
          f"sequence parallel {sp}); rank 0 (pid {os.getpid()}) serves, {followers}", flush=True)


def serve_ranks(options: RankOptions, serve: Callable[[DistributedExecutor], list[str]],
                output_dir: str | os.PathLike | None = None) -> list[str]:
    """Run `serve(executor)` on rank 0 with the other ranks following; stop them when it returns.
    Returns what `serve` returned ([] on the other ranks under torchrun)."""
    ranks = start_ranks(options, output_dir)
    if ranks is None:
        return []
    pending: list[str] = []
    try:
        pending = serve(ranks.executor)
    finally:
        ranks.stop(timeout=5.0)
    return pending


__all__ = ["DistributedExecutor", "RankOptions", "Ranks", "check_layout", "follow", "serve_ranks", "start_ranks",
           "torchrun_world"]
