"""Step previews of a running sampler: ComfyUI's live latent previews and the OpenAI API's partial images.

    preview = StepPreview(method="latent2rgb", partial_images=0, decode=None)   # one sampler node of one prompt
    preview(step, total, denoised, send)      # from the sampler's step callback; send(event, data)

`method` is ComfyUI's preview method (`--preview-method`, or a prompt's extra_data["preview_method"], which the
web UI sends from its "Live preview method" setting; "default" or a name ComfyUI does not know means the server's
own): "none", "auto", "latent2rgb" or "taesd". auto is latent2rgb, as in ComfyUI. taesd decodes with the TAESD
decoder `taesd` (models/vae_approx/taesd3_decoder.*, models/taesd.py; sd35fp8 ships none) at the image's size;
without one it falls back to latent2rgb, as ComfyUI does. Latent2RGB is ComfyUI's (latent_preview.py): the first
image's denoised latent (model space, [B, 16, h, w]) through SD3's 16 -> 3 linear map, at 1/8 of the image's size.
Either way clamp(-1, 1), (x + 1) * 127.5 rounded, shrunk to fit `preview_size` (ComfyUI --preview-size, 512),
JPEG at quality 95 -> event "preview_image" {"image": bytes, "format": "JPEG"} (the /ws binary frame). On CUDA
the preview is copied to the host behind the step's kernels and encoded and sent by one finisher thread (in
order), so the sampler does not wait for the GPU; the last step waits for every preview to be sent.

`partial_images` (the OpenAI API's, 0-3): at that many steps spread evenly before the last, the step's prediction
of the clean image, decoded by `decode` (the prompt's own VAE) -> event "partial_image" {"index", "image": PNG}
(server-internal: the /v1 route that asked for it streams it; no socket sees it).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from sd35fp8.defaults import DEFAULT_PREVIEW_SIZE, PREVIEW_METHODS
from sd35fp8.errors import InputError

log = logging.getLogger(__name__)

MAX_PARTIAL_IMAGES = 3  # OpenAI: partial_images 0-3
TAESD_DECODER_NAME = "taesd3_decoder"  # ComfyUI latent_formats.SD3.taesd_decoder_name (models/vae_approx)
JPEG_QUALITY = 95  # ComfyUI server.py encodes previews at quality 95

# ComfyUI comfy/latent_formats.py SD3: latent (model space) -> RGB in about [-1, 1]; rows are latent channels
SD3_LATENT_RGB_FACTORS = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)
SD3_LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)

Decode = Callable[[torch.Tensor], torch.Tensor]  # denoised [1, 16, h, w] model space -> IMAGE [1, H, W, 3] 0..1
Send = Callable[[str, dict], None]


def resolve_method(override: Any, default: str) -> str:
    """A prompt's preview_method against the server's: ComfyUI's set_preview_method (None, "default" or an
    unknown name -> the server's)."""
    if isinstance(override, str) and override.lower() in PREVIEW_METHODS:
        return override.lower()
    return default


def check_method(method: str) -> str:
    """The server's --preview-method, checked (InputError names the choices)."""
    if method not in PREVIEW_METHODS:
        raise InputError(f"unknown preview method {method!r}; choose one of {', '.join(PREVIEW_METHODS)}")
    return method


def partial_steps(count: int, total: int) -> list[int]:
    """The step numbers (1..total-1) after which a partial image goes out: `count` of them, evenly spread."""
    picked = {round((i + 1) * total / (count + 1)) for i in range(count)}
    return sorted(s for s in picked if 1 <= s < total)


def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """ComfyUI's preview_to_image: [-1, 1] -> clamp, (x + 1) * 127.5, rounded, uint8 (on rgb's device)."""
    return rgb.float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


_FACTORS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (factors [3, 16], bias [3])


def latent_rgb(denoised: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Latent2RGB of the first image: [B, 16, h, w] (model space) -> uint8 [h, w, 3] on its device."""
    x0 = denoised[0].float().movedim(0, -1)  # [h, w, 16]
    if x0.device not in _FACTORS:  # once a device: a copy from pageable memory would wait for the step's kernels
        _FACTORS[x0.device] = (torch.tensor(SD3_LATENT_RGB_FACTORS, device=x0.device).T.contiguous(),
                               torch.tensor(SD3_LATENT_RGB_BIAS, device=x0.device))
    factors, bias = _FACTORS[x0.device]
    return _to_uint8(torch.nn.functional.linear(x0, factors, bias))  # [h, w, 3]


def taesd_rgb(decoder: torch.nn.Module, denoised: torch.Tensor) -> torch.Tensor:
    """ComfyUI's TAESD preview of the first image: [B, C, h, w] (model space) -> uint8 [8h, 8w, 3] on the
    decoder's device."""
    p = next(decoder.parameters())
    return _to_uint8(decoder(denoised[:1].to(p.device, p.dtype))[0].float().sub(0.5).mul(2).movedim(0, -1))


class _Finisher:
    """One daemon thread that finishes GPU previews in order: it waits for a preview's copy to the host, then
    encodes and sends it, so the sampler never waits for the GPU (ComfyUI's --preview-stream idea; a
    synchronising preview cost a Large step ~15 ms on an H100, benchmarks/preview_cost.py)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sd35fp8-previews", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def flush(self) -> None:
        """Wait until every submitted preview is sent."""
        self._jobs.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # noqa: BLE001 - a preview that fails is dropped, never the generation
                log.exception("a live preview could not be sent")
            finally:
                self._jobs.task_done()


FINISHER = _Finisher()


def encode_jpeg(rgb: torch.Tensor, max_size: int) -> bytes:
    """uint8 [h, w, 3] -> JPEG bytes, shrunk (never enlarged) to fit max_size x max_size."""
    from PIL import Image

    im = Image.fromarray(rgb.numpy())
    im.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def encode_png(image: torch.Tensor) -> bytes:
    """IMAGE [H, W, 3] in 0..1 -> PNG bytes."""
    from PIL import Image

    arr = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG", compress_level=1)
    return out.getvalue()


class StepPreview:
    """What one sampler node of one prompt sends after its steps (module docstring)."""

    def __init__(self, method: str = "none", partial_images: int = 0, decode: Decode | None = None,
                 preview_size: int = DEFAULT_PREVIEW_SIZE, taesd: torch.nn.Module | None = None):
        self.method = check_method(method)
        self.taesd = taesd if self.method == "taesd" else None
        self.partial_images = max(0, min(MAX_PARTIAL_IMAGES, int(partial_images))) if decode is not None else 0
        self.decode = decode
        self.preview_size = int(preview_size)
        self._sent = 0  # partial images sent so far

    @property
    def active(self) -> bool:
        return self.method != "none" or self.partial_images > 0

    def __call__(self, step: int, total: int, denoised: torch.Tensor, send: Send) -> None:
        if self.method != "none":
            rgb = taesd_rgb(self.taesd, denoised) if self.taesd is not None else latent_rgb(denoised)
            size = self.preview_size
            if rgb.is_cuda:  # copy to pinned memory behind the step's kernels; the finisher thread encodes
                host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
                host.copy_(rgb, non_blocking=True)
                done = torch.cuda.Event()
                done.record()

                def finish() -> None:
                    done.synchronize()
                    send("preview_image", {"image": encode_jpeg(host, size), "format": "JPEG"})

                FINISHER.submit(finish)
            else:
                send("preview_image", {"image": encode_jpeg(rgb, size), "format": "JPEG"})
        if self.partial_images and step in partial_steps(self.partial_images, total):
            image, index = self.decode(denoised[:1])[0], self._sent  # [H, W, 3] on the host
            FINISHER.submit(lambda: send("partial_image", {"index": index, "image": encode_png(image)}))
            self._sent += 1
        if step >= total:  # the last step: everything this node previewed is out before its prompt finishes
            FINISHER.flush()
