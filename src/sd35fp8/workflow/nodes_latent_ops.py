"""ComfyUI's latent arithmetic and transform nodes: LatentComposite, LatentBlend, LatentCrop, LatentFlip,
LatentRotate (nodes.py) and LatentAdd, LatentSubtract, LatentMultiply, LatentInterpolate, LatentBatch,
LatentBatchSeedBehavior (comfy_extras/nodes_latent.py), with ComfyUI's inputs, outputs and arithmetic; and the
LATENT_OPERATION nodes of comfy_extras/nodes_latent.py: LatentOperationTonemapReinhard and LatentOperationSharpen
make an operation (a callable operation(latent=[B, C, h, w]) -> [B, C, h, w]), LatentApplyOperation runs it on a
LATENT, LatentApplyOperationCFG on the guidance (cond - uncond) of every sampling step, as a pre-CFG function, or
of the steps inside its optional start_percent / end_percent (Comfy-Org/ComfyUI's newest form of the node).

LATENT is a dict {"samples": [B, C, h, w], optional "noise_mask", "batch_index", ...}; each node returns a
shallow copy of its first latent with new samples, so the other keys ride along as in ComfyUI (LatentBatch
writes batch_index, LatentBatchSeedBehavior sets or drops it). Where ComfyUI's tensor code cannot run (channel
counts that differ, batches that do not broadcast) the node raises an InputError naming itself and the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from sd35fp8.errors import InputError
from sd35fp8.image_ops import common_upscale, gaussian_kernel, repeat_to_batch_size
from sd35fp8.sampling.guidance import LatentOperationCFG
from sd35fp8.workflow.node_base import MAX_RESOLUTION, Node
from sd35fp8.workflow.nodes_image import FLIP_METHODS, ROTATIONS, check_widgets, rotation_turns


def _samples(node: str, name: str, latent: Any) -> torch.Tensor:
    """latent["samples"], checked to be [B, C, h, w]."""
    z = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(z, torch.Tensor) or z.ndim != 4:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(latent).__name__
        raise InputError(f"{node}: {name} must be a LATENT with samples [B, C, h, w], got {got}")
    return z


def _broadcast(node: str, what: str, *shapes: torch.Size) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as e:
        raise InputError(f"{node}: {what} " + " and ".join(str(tuple(s)) for s in shapes)
                         + " do not broadcast") from e


def reshape_latent_to(node: str, target_shape: torch.Size, latent: torch.Tensor,
                      repeat_batch: bool = True) -> torch.Tensor:
    """comfy_extras.nodes_latent.reshape_latent_to: `latent` scaled to the target's h x w (bilinear, center
    crop) where its [C, h, w] differ, then cut or cycled to the target's batch size (repeat_batch)."""
    if latent.shape[1:] != target_shape[1:]:
        if latent.shape[1] != target_shape[1]:
            raise InputError(f"{node}: latents of {target_shape[1]} and {latent.shape[1]} channels cannot be "
                             "combined")
        latent = common_upscale(latent, target_shape[-1], target_shape[-2], "bilinear", "center")
    return repeat_to_batch_size(latent, target_shape[0]) if repeat_batch else latent


class LatentComposite(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "composite"
    CATEGORY = "latent"
    DISPLAY_NAME = "Latent Composite"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "samples_to": ("LATENT",), "samples_from": ("LATENT",),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "feather": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
        }}

    def composite(self, samples_to, samples_from, x, y, composite_method="normal", feather=0):
        """samples_from pasted into a copy of samples_to at (x, y) px (// 8), cut at its right and bottom edges.
        feather (px // 8) > 0: the pasted block fades in over that many latent rows / columns from each side
        that lies inside the destination (linear, (t + 1) / feather at the t-th from the edge), blended with
        the destination as from * mask + to * (1 - mask); ComfyUI's slicing kept as is, so a feather wider
        than the block wraps to its other side."""
        check_widgets(LatentComposite, x=x, y=y, feather=feather)
        dest = _samples("LatentComposite", "samples_to", samples_to)
        src_full = _samples("LatentComposite", "samples_from", samples_from)
        x, y, feather = int(x) // 8, int(y) // 8, int(feather) // 8
        out = dict(samples_to)
        s = dest.clone()
        h, w = dest.shape[2], dest.shape[3]
        src = src_full[:, :, :h - y, :w - x]
        # feather == 0 writes the full source's extent, feathering the cut one's: they differ only off-canvas
        extent = src_full if feather == 0 else src
        region = s[:, :, y:y + extent.shape[2], x:x + extent.shape[3]]
        if region.shape[2:] != src.shape[2:]:
            raise InputError(f"LatentComposite: x={x * 8}, y={y * 8} puts samples_from {tuple(src_full.shape)} "
                             f"outside samples_to {tuple(dest.shape)}")
        if _broadcast("LatentComposite", "samples_from and samples_to batches", src.shape, region.shape) \
                != region.shape:
            raise InputError(f"LatentComposite: samples_from {tuple(src_full.shape)} does not fit the batch / "
                             f"channels of samples_to {tuple(dest.shape)}")
        if feather == 0:
            s[:, :, y:y + src_full.shape[2], x:x + src_full.shape[3]] = src
        else:
            mask = torch.ones_like(src)
            mh, mw = mask.shape[2], mask.shape[3]
            for t in range(feather):
                ramp = (1.0 / feather) * (t + 1)
                if y != 0:
                    mask[:, :, t:1 + t, :] *= ramp
                if y + mh < h:
                    mask[:, :, mh - 1 - t:mh - t, :] *= ramp
                if x != 0:
                    mask[:, :, :, t:1 + t] *= ramp
                if x + mw < w:
                    mask[:, :, :, mw - 1 - t:mw - t] *= ramp
            rev_mask = torch.ones_like(mask) - mask
            s[:, :, y:y + mh, x:x + mw] = src * mask + s[:, :, y:y + mh, x:x + mw] * rev_mask
        out["samples"] = s
        return (out,)


class LatentBlend(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "blend"
    CATEGORY = "_for_testing"
    DISPLAY_NAME = "Latent Blend"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "samples1": ("LATENT",), "samples2": ("LATENT",),
            "blend_factor": ("FLOAT", {"default": 0.5, "min": 0, "max": 1, "step": 0.01}),
        }}

    def blend(self, samples1, samples2, blend_factor, blend_mode="normal"):
        """samples1 * blend_factor + samples2 * (1 - blend_factor); samples2 scaled to samples1's h x w (bicubic,
        center crop) when their shapes differ."""
        check_widgets(LatentBlend, blend_factor=blend_factor)
        if blend_mode != "normal":
            raise InputError(f"LatentBlend: unsupported blend mode {blend_mode!r} (only 'normal')")
        s1 = _samples("LatentBlend", "samples1", samples1)
        s2 = _samples("LatentBlend", "samples2", samples2)
        if s1.shape != s2.shape:
            s2 = common_upscale(s2, s1.shape[3], s1.shape[2], "bicubic", "center")
        _broadcast("LatentBlend", "samples1 and samples2 of shapes", s1.shape, s2.shape)
        out = dict(samples1)
        out["samples"] = s1 * blend_factor + s2 * (1 - blend_factor)
        return (out,)


class LatentCrop(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "crop"
    CATEGORY = "latent/transform"
    DISPLAY_NAME = "Crop Latent"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "samples": ("LATENT",),
            "width": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
        }}

    def crop(self, samples, width, height, x, y):
        """The (width // 8) x (height // 8) window at (x // 8, y // 8), its corner kept at least 8 latent
        pixels (64 px) from the right and bottom edges; the noise mask is left as it is (ComfyUI's)."""
        check_widgets(LatentCrop, width=width, height=height, x=x, y=y)
        z = _samples("LatentCrop", "samples", samples)
        x, y = int(x) // 8, int(y) // 8
        x = min(x, z.shape[3] - 8)
        y = min(y, z.shape[2] - 8)
        out = dict(samples)
        out["samples"] = z[:, :, y:y + int(height) // 8, x:x + int(width) // 8]
        return (out,)


class LatentFlip(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "flip"
    CATEGORY = "latent/transform"
    DISPLAY_NAME = "Flip Latent"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",), "flip_method": (list(FLIP_METHODS),)}}

    def flip(self, samples, flip_method):
        check_widgets(LatentFlip, flip_method=flip_method)
        z = _samples("LatentFlip", "samples", samples)
        out = dict(samples)
        out["samples"] = torch.flip(z, dims=[2] if flip_method.startswith("x") else [3])
        return (out,)


class LatentRotate(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "rotate"
    CATEGORY = "latent/transform"
    DISPLAY_NAME = "Rotate Latent"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",), "rotation": (list(ROTATIONS),)}}

    def rotate(self, samples, rotation):
        check_widgets(LatentRotate, rotation=rotation)
        z = _samples("LatentRotate", "samples", samples)
        out = dict(samples)
        out["samples"] = torch.rot90(z, k=rotation_turns(rotation), dims=[3, 2])
        return (out,)


class _LatentPair(Node):
    """samples1 (op) samples2, samples2 reshaped to samples1 as ComfyUI's reshape_latent_to."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    @staticmethod
    def combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def op(self, samples1, samples2):
        name = type(self).__name__
        s1 = _samples(name, "samples1", samples1)
        s2 = reshape_latent_to(name, s1.shape, _samples(name, "samples2", samples2))
        out = dict(samples1)
        out["samples"] = self.combine(s1, s2)
        return (out,)


class LatentAdd(_LatentPair):
    @staticmethod
    def combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class LatentSubtract(_LatentPair):
    @staticmethod
    def combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - b


class LatentMultiply(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",),
                             "multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    def op(self, samples, multiplier):
        check_widgets(LatentMultiply, multiplier=multiplier)
        z = _samples("LatentMultiply", "samples", samples)
        out = dict(samples)
        out["samples"] = z * multiplier
        return (out,)


class LatentInterpolate(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",),
                             "ratio": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def op(self, samples1, samples2, ratio):
        """Directions and lengths interpolated apart: each latent divided by its norm over the channels (0 / 0
        -> 0), the unit vectors mixed (ratio for samples1), renormalised, then scaled by the mixed norms.
        ComfyUI divides [B, C, h, w] by the [B, h, w] norm without keeping the channel axis, so the norm lines
        up with the latent by broadcasting: right for a batch of 1; a batch that does not broadcast (not 1,
        not C) is an InputError here (an exception in ComfyUI)."""
        check_widgets(LatentInterpolate, ratio=ratio)
        s1 = _samples("LatentInterpolate", "samples1", samples1)
        s2 = reshape_latent_to("LatentInterpolate", s1.shape, _samples("LatentInterpolate", "samples2", samples2))
        m1 = torch.linalg.vector_norm(s1, dim=1)
        m2 = torch.linalg.vector_norm(s2, dim=1)
        if s1.shape[0] not in (1, s1.shape[1]):
            raise InputError(f"LatentInterpolate: ComfyUI's per-position norm only lines up with a batch of 1 "
                             f"(or of {s1.shape[1]}, one per channel); samples1 has a batch of {s1.shape[0]}")
        u1 = torch.nan_to_num(s1 / m1)
        u2 = torch.nan_to_num(s2 / m2)
        t = u1 * ratio + u2 * (1.0 - ratio)
        mt = torch.linalg.vector_norm(t, dim=1)
        st = torch.nan_to_num(t / mt)
        out = dict(samples1)
        out["samples"] = st * (m1 * ratio + m2 * (1.0 - ratio))
        return (out,)


class LatentBatch(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "batch"
    CATEGORY = "latent/batch"
    DEPRECATED = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples1": ("LATENT",), "samples2": ("LATENT",)}}

    def batch(self, samples1, samples2):
        """samples1's items then samples2's (scaled to samples1's h x w, bilinear, center crop); batch_index
        is each latent's own (0..B-1 where it has none) one after the other, so the KSampler draws each item's
        noise as in its own batch. samples1's other keys (noise_mask) are kept as they are."""
        s1 = _samples("LatentBatch", "samples1", samples1)
        s2 = reshape_latent_to("LatentBatch", s1.shape, _samples("LatentBatch", "samples2", samples2),
                               repeat_batch=False)
        out = dict(samples1)
        out["samples"] = torch.cat((s1, s2), dim=0)
        out["batch_index"] = (list(samples1.get("batch_index", range(s1.shape[0])))
                              + list(samples2.get("batch_index", range(s2.shape[0]))))
        return (out,)


class LatentBatchSeedBehavior(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",), "seed_behavior": (["random", "fixed"], {"default": "fixed"})}}

    def op(self, samples, seed_behavior):
        """random: no batch_index (each item its own noise); fixed: every item the batch_index of the first (0
        where there is none), so all get the same noise."""
        check_widgets(LatentBatchSeedBehavior, seed_behavior=seed_behavior)
        z = _samples("LatentBatchSeedBehavior", "samples", samples)
        out = dict(samples)
        if seed_behavior == "random":
            out.pop("batch_index", None)
        else:
            out["batch_index"] = [out.get("batch_index", [0])[0]] * z.shape[0]
        return (out,)


def _operation_latent(name: str, latent: Any) -> torch.Tensor:
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
        got = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise InputError(f"{name}: the operation takes a latent [B, C, h, w], got {got}")
    return latent


@dataclass(frozen=True)
class TonemapReinhard:
    """LatentOperationTonemapReinhard's operation: each position's channel vector keeps its direction while its
    length m goes through Reinhard's curve m / (m + 1) scaled to top = (5 std + mean) * multiplier of the
    image's lengths (m / top in, times top out)."""

    multiplier: float

    def __call__(self, latent: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        latent = _operation_latent("LatentOperationTonemapReinhard", latent)
        magnitude = (torch.linalg.vector_norm(latent, dim=1) + 0.0000000001)[:, None]  # [B, 1, h, w]
        normalized = latent / magnitude
        dims = list(range(1, magnitude.ndim))
        mean = torch.mean(magnitude, dim=dims, keepdim=True)  # [B, 1, 1, 1]
        std = torch.std(magnitude, dim=dims, keepdim=True)
        top = (std * 5 + mean) * self.multiplier
        magnitude = magnitude * (1.0 / top)
        new_magnitude = magnitude / (magnitude + 1.0)
        new_magnitude = new_magnitude * top
        return normalized * new_magnitude


@dataclass(frozen=True)
class Sharpen:
    """LatentOperationSharpen's operation: an unsharp mask (Gaussian of `sigma` over a 2 * radius + 1 kernel, the
    surround weighted by -10 * alpha, the centre making the kernel sum to 1) on the latent divided by its channel
    norm (reflect padding), multiplied back by that norm."""

    sharpen_radius: int
    sigma: float
    alpha: float

    def __call__(self, latent: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        latent = _operation_latent("LatentOperationSharpen", latent)
        r = self.sharpen_radius
        if r >= latent.shape[2] or r >= latent.shape[3]:
            raise InputError(f"LatentOperationSharpen: sharpen_radius {r} needs a latent larger than {r} x {r} "
                             f"(reflect padding), got {latent.shape[3]} x {latent.shape[2]}")
        luminance = (torch.linalg.vector_norm(latent, dim=1) + 1e-6)[:, None]  # [B, 1, h, w]
        normalized = latent / luminance
        channels = latent.shape[1]
        kernel_size = r * 2 + 1
        kernel = gaussian_kernel(kernel_size, self.sigma, device=luminance.device)
        center = kernel_size // 2
        kernel *= self.alpha * -10
        kernel[center, center] = kernel[center, center] - kernel.sum() + 1.0
        padded = F.pad(normalized, (r, r, r, r), "reflect")
        sharpened = F.conv2d(padded, kernel.repeat(channels, 1, 1).unsqueeze(1), padding=kernel_size // 2,
                             groups=channels)[:, :, r:-r, r:-r]
        return luminance * sharpened


def _operation(node: str, operation: Any) -> Any:
    if not callable(operation):
        raise InputError(f"{node}: operation must be a LATENT_OPERATION, got {type(operation).__name__}")
    return operation


class LatentApplyOperation(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced/operations"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",), "operation": ("LATENT_OPERATION",)}}

    def op(self, samples, operation):
        """operation(latent=samples); the LATENT's other keys ride along."""
        z = _samples("LatentApplyOperation", "samples", samples)
        out = dict(samples)
        out["samples"] = _operation("LatentApplyOperation", operation)(latent=z)
        return (out,)


class LatentApplyOperationCFG(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "latent/advanced/operations"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "operation": ("LATENT_OPERATION",)},
                "optional": {
                    "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": (
                        "Start applying the operation at this fraction of the model's denoising schedule. 0 is the "
                        "beginning.")}),
                    "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": (
                        "Stop applying the operation at this fraction of the model's denoising schedule. 1 is the "
                        "end.")}),
                }}

    def patch(self, model, operation, start_percent=0.0, end_percent=1.0):
        """A pre-CFG function (set_model_sampler_pre_cfg_function), after the ones already there: at the steps whose
        sigma lies between the MODEL's sigmas at start_percent and end_percent (its shift now, as ComfyUI reads its
        model_sampling when the node runs) the cond prediction becomes operation(latent=cond - uncond) + uncond
        (sampling.guidance.LatentOperationCFG)."""
        from sd35fp8.sampling import FlowMatching

        check_widgets(LatentApplyOperationCFG, start_percent=start_percent, end_percent=end_percent)
        ms = FlowMatching(model.shift)
        op = LatentOperationCFG(_operation("LatentApplyOperationCFG", operation),
                                sigma_start=ms.percent_to_sigma(float(start_percent)),
                                sigma_end=ms.percent_to_sigma(float(end_percent)))
        return (replace(model, post_cfg=model.post_cfg + (("pre_cfg", op),)),)


class LatentOperationTonemapReinhard(Node):
    RETURN_TYPES = ("LATENT_OPERATION",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced/operations"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"multiplier": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01})}}

    def op(self, multiplier):
        check_widgets(LatentOperationTonemapReinhard, multiplier=multiplier)
        if multiplier == 0:  # 1 / top = inf: ComfyUI's operation turns every latent into NaN
            raise InputError("LatentOperationTonemapReinhard: multiplier 0 divides by zero (every value would be "
                             "NaN); use a multiplier above 0")
        return (TonemapReinhard(float(multiplier)),)


class LatentOperationSharpen(Node):
    RETURN_TYPES = ("LATENT_OPERATION",)
    FUNCTION = "op"
    CATEGORY = "latent/advanced/operations"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "sharpen_radius": ("INT", {"default": 9, "min": 1, "max": 31, "step": 1, "advanced": True}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1, "advanced": True}),
            "alpha": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 5.0, "step": 0.01, "advanced": True}),
        }}

    def op(self, sharpen_radius, sigma, alpha):
        check_widgets(LatentOperationSharpen, sharpen_radius=sharpen_radius, sigma=sigma, alpha=alpha)
        return (Sharpen(int(sharpen_radius), float(sigma), float(alpha)),)


LATENT_OPS_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    LatentComposite, LatentBlend, LatentCrop, LatentFlip, LatentRotate, LatentAdd, LatentSubtract, LatentMultiply,
    LatentInterpolate, LatentBatch, LatentBatchSeedBehavior,
)}
# the LATENT_OPERATION nodes (registered apart: the ones above are the plain latent-in, latent-out nodes)
LATENT_OPERATION_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    LatentApplyOperation, LatentApplyOperationCFG, LatentOperationTonemapReinhard, LatentOperationSharpen,
)}
for _cls in (LatentAdd, LatentSubtract, LatentMultiply, LatentInterpolate, LatentBatch, LatentBatchSeedBehavior,
             LatentApplyOperation, LatentApplyOperationCFG, LatentOperationTonemapReinhard, LatentOperationSharpen):
    _cls.PYTHON_MODULE = "comfy_extras.nodes_latent"
