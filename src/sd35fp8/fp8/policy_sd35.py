"""Per-layer precision policy for the SD3.5 MMDiT, decided by measured sensitivity.

    results = measure_sensitivity(model, inputs, "dynamic")     # one FP8 layer at a time
    policy = policy_from_sensitivity(results, budget_db=30.0)   # keep the noisiest layers 16-bit

Model: quantisation noise of different layers is close to independent, so output noise powers
add: an all-FP8 model has noise sum(n_i), n_i = 10^(-sqnr_i/10) (sqnr_i: output SQNR when ONLY
layer i is FP8). `policy_from_sensitivity` keeps layers in high precision, largest n_i first,
until the predicted output SQNR reaches `budget_db` (or `max_keep` layers are kept).

The shipped default (policies/sd35_default.json) holds the measurement that justified it.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from sd35fp8.errors import InputError
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.quantize import Policy
from sd35fp8.fp8.scaling import sqnr

DEFAULT_POLICY_FILE = "sd35_default.json"
T5_POLICY_FILE = "t5xxl_default.json"
_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.")


def default_policy() -> Policy:
    """The shipped SD3.5 MMDiT policy (fp8/policies/sd35_default.json)."""
    return Policy(keep=tuple(load_default_policy_data()["keep"]))


def load_default_policy_data(file: str = DEFAULT_POLICY_FILE) -> dict:
    text = resources.files("sd35fp8.fp8").joinpath("policies", file).read_text()
    return json.loads(text)


def default_t5_policy(num_layers: int | None = None) -> Policy:
    """The shipped T5-XXL policy (fp8/policies/t5xxl_default.json): the Linear layers kept 16-bit.
    It was measured on T5-XXL's 24 blocks and names blocks by index, so an encoder of another depth
    (`num_layers`, when given) gets no kept layers rather than a policy that does not fit it."""
    data = load_default_policy_data(T5_POLICY_FILE)
    if num_layers is not None and num_layers != data.get("num_layers"):
        return Policy(keep=())
    return Policy(keep=tuple(data["keep"]))


def generalize(name: str, depth: int | None = None) -> str:
    """Layer name -> pattern independent of model depth: the last block becomes `joint_blocks.last.*`.

    Block indices stay (block i of Large and Medium are both early/late); a depth-aware caller passes
    `depth` so the pre-only last block is named by role.
    """
    m = _BLOCK.match(name)
    if m and depth is not None and int(m.group(1)) == depth - 1:
        return "joint_blocks.last." + name[m.end():]
    return name


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


@torch.no_grad()
def measure_sensitivity(model: nn.Module, inputs: Sequence[tuple] | Callable[[nn.Module], torch.Tensor],
                        mode: str = "dynamic", layers: Sequence[str] | None = None,
                        granularity: str = "channel") -> list[tuple[str, float]]:
    """[(layer, output SQNR in dB when only this Linear is FP8)], least robust first.

    `inputs`: argument tuples for model(*args) (outputs concatenated), or a function model -> output.
    Static mode is calibrated per layer on the same inputs (amax of its input).
    """
    run = inputs if callable(inputs) else (lambda m: torch.cat([m(*a).flatten().float() for a in inputs]))
    ref = run(model).float()
    names = list(layers) if layers is not None else _linear_names(model)
    results = []
    for name in names:
        lin = model.get_submodule(name)
        q = FP8Linear.from_linear(lin, mode="weight_only" if mode == "static" else mode, granularity=granularity)
        old = _swap(model, name, q)
        try:
            if mode == "static":
                amax = []
                h = q.register_forward_pre_hook(lambda _m, a: amax.append(a[0].detach().abs().amax().float()))
                run(model)
                h.remove()
                q.set_input_scale(torch.stack(amax).max())
                q.set_mode("static")
            results.append((name, sqnr(ref, run(model).float())))
        finally:
            _swap(model, name, old)
    return sorted(results, key=lambda r: r[1])


def predicted_sqnr(results: Sequence[tuple[str, float]], keep: set[str] = frozenset()) -> float:
    """Output SQNR (dB) predicted for FP8 everywhere except `keep`, adding noise powers."""
    noise = sum(10 ** (-s / 10) for n, s in results if n not in keep and math.isfinite(s))
    return math.inf if noise == 0 else -10 * math.log10(noise)


def policy_from_sensitivity(results: Sequence[tuple[str, float]], budget_db: float, max_keep: int | None = None,
                            base_keep: Sequence[str] = ()) -> tuple[Policy, dict]:
    """Keep the least robust layers until predicted output SQNR >= budget_db -> (Policy, justification).

    `base_keep`: patterns kept regardless (e.g. non-Linear-shaped decisions). The justification dict
    holds per-layer SQNR, predicted SQNR with and without the kept layers: ship it with the policy.
    """
    if not results:
        raise InputError("policy_from_sensitivity: no measurements")
    ranked = sorted(results, key=lambda r: r[1])
    keep: list[str] = []
    while predicted_sqnr(ranked, set(keep)) < budget_db and len(keep) < len(ranked):
        if max_keep is not None and len(keep) >= max_keep:
            break
        keep.append(ranked[len(keep)][0])
    policy = Policy(keep=tuple(base_keep) + tuple(keep))
    info = {
        "budget_db": budget_db,
        "predicted_sqnr_all_fp8_db": round(predicted_sqnr(ranked), 2),
        "predicted_sqnr_with_policy_db": round(predicted_sqnr(ranked, set(keep)), 2),
        "kept": keep,
        "per_layer_sqnr_db": {n: round(s, 2) for n, s in ranked},
    }
    return policy, info


def write_policy(path, policy: Policy, info: dict, where: str) -> None:
    """JSON with `keep` (fnmatch patterns for Policy) + the measurement that justified them."""
    data = {"keep": list(policy.keep), "measured_on": where, **info}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # a measurement hours long must not die on a missing folder
    path.write_text(json.dumps(data, indent=1) + "\n")
