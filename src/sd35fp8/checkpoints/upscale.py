"""Upscale-model files (ComfyUI's models/upscale_models) -> models.esrgan modules, the architecture inferred from
the weights: RRDBNet in Real-ESRGAN's layout or the older ESRGAN one (model.0, model.1.sub.N.RDBK.convJ.0, ...),
and SRVGGNetCompact. .safetensors, or .pth / .pt / .ckpt / .bin state dicts read with weights_only (Real-ESRGAN's
{"params_ema": ...} wrappers and "module." prefixes unwrapped).

ComfyUI loads these through spandrel, which also knows transformer upscalers (SwinIR, HAT, DAT, ...). sd35fp8 does
not depend on it: spandrel requires torchvision, whose newest release pins a newer torch than the one installed
(so `pip install` replaces a CPU torch by a CUDA build); the two convolutional families here cover the upscalers
SD workflows share most, and any other file is refused with an error naming it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from sd35fp8.errors import CheckpointError
from sd35fp8.models.esrgan import CompactConfig, RRDBConfig, RRDBNet, SRVGGNetCompact

_WRAPPERS = ("params_ema", "params", "state_dict", "model")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one clear error naming it
        raise CheckpointError(f"cannot read the upscale model {path}: {e}", str(path)) from None
    for key in _WRAPPERS:  # Real-ESRGAN / BasicSR save {"params_ema": state_dict}
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors", str(path))
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)$")
_OLD_BODY_CONV = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)$")


def _from_old_esrgan(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The original ESRGAN layout's keys in Real-ESRGAN's names."""
    top = sorted({int(m.group(1)) for k in sd if (m := _OLD_TOP.match(k))})
    if not top or top[0] != 0 or (top[-1] - 4) % 3:
        raise CheckpointError(f"{where}: an ESRGAN layout with convs at model.{top}; expected model.0, the "
                              "upsampling convs at model.3, 6, ..., then the HR and last convs", where)
    ups = (top[-1] - 4) // 3
    names = {0: "conv_first", 3 * ups + 2: "conv_hr", 3 * ups + 4: "conv_last"}
    names.update({3 * k: f"conv_up{k}" for k in range(1, ups + 1)})
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if m := _OLD_RDB.match(k):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = v
        elif m := _OLD_BODY_CONV.match(k):
            out[f"conv_body.{m.group(2)}"] = v
        elif (m := _OLD_TOP.match(k)) and int(m.group(1)) in names:
            out[f"{names[int(m.group(1))]}.{m.group(2)}"] = v
        else:
            raise CheckpointError(f"{where}: unexpected key {k!r} for an ESRGAN model", where)
    return out


def _rrdb(sd: dict[str, torch.Tensor], where: str) -> RRDBNet:
    try:
        first, last = sd["conv_first.weight"], sd["conv_last.weight"]
        blocks = len({k.split(".")[1] for k in sd if k.startswith("body.")})
        growth = sd["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{where}: an RRDBNet without {e.args[0]!r}", where) from None
    out_ch = last.shape[0]
    ratio = first.shape[1] // out_ch if first.shape[1] % out_ch == 0 else 1
    unshuffle = {4: 2, 16: 4}.get(ratio, 1)  # Real-ESRGAN x2 / x1: pixel_unshuffle before conv_first
    ups = len({k.split(".")[0] for k in sd if k.startswith("conv_up")})
    cfg = RRDBConfig(in_channels=first.shape[1] // unshuffle ** 2, out_channels=out_ch, features=first.shape[0],
                     blocks=blocks, growth=growth, upsamples=ups, unshuffle=unshuffle)
    net = RRDBNet(cfg)
    _load(net, sd, where)
    return net


def _compact(sd: dict[str, torch.Tensor], where: str) -> SRVGGNetCompact:
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("body.")})
    last = sd[f"body.{idx[-1]}.weight"]
    first = sd["body.0.weight"]
    out_ch = first.shape[1]  # as Real-ESRGAN: out channels = in channels
    scale = math.isqrt(last.shape[0] // out_ch)
    if scale * scale * out_ch != last.shape[0] or (idx[-1] - 2) % 2:
        raise CheckpointError(f"{where}: not an SRVGGNetCompact (last conv {tuple(last.shape)})", where)
    cfg = CompactConfig(in_channels=first.shape[1], out_channels=out_ch, features=first.shape[0],
                        convs=(idx[-1] - 2) // 2, scale=scale)
    net = SRVGGNetCompact(cfg)
    _load(net, sd, where)
    return net


def _load(net: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    want = net.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        raise CheckpointError(f"{where}: does not fit {net.config.describe()}: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}", where)
    bad = [k for k in want if want[k].shape != sd[k].shape]
    if bad:
        raise CheckpointError(f"{where}: {bad[0]} is {tuple(sd[bad[0]].shape)}, {net.config.describe()} needs "
                              f"{tuple(want[bad[0]].shape)}", where)
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    net.eval().requires_grad_(False)


def load_upscale_model(path: str | Path) -> RRDBNet | SRVGGNetCompact:
    """An upscale-model file -> its module (float32, CPU, eval); CheckpointError naming the file otherwise."""
    where = str(path)
    sd = read_state_dict(path)
    if "model.0.weight" in sd and any(_OLD_RDB.match(k) for k in sd):
        return _rrdb(_from_old_esrgan(sd, where), where)
    if "conv_first.weight" in sd:
        return _rrdb(sd, where)
    if "body.0.weight" in sd and "body.1.weight" in sd and sd["body.1.weight"].ndim == 1:
        return _compact(sd, where)
    keys = ", ".join(sorted(sd)[:5])
    raise CheckpointError(f"{where}: not an upscale model sd35fp8 knows (ESRGAN / Real-ESRGAN RRDBNet, "
                          f"SRVGGNetCompact); its first keys: {keys}. Transformer upscalers (SwinIR, HAT, DAT) "
                          "are not supported", where)
