"""Which joint blocks keep 16-bit attention when the engine runs FP8 attention, decided by measured sensitivity
(as fp8/policy_sd35.py decides which linears stay 16-bit).

    sens = measure_attention_sensitivity(build, inputs, depth)   # FP8 attention in one block at a time
    blocks, info = attention_policy(sens["per_block_sqnr_db"], budget_db=30.0, max_keep=1)

`build(attention_16bit_blocks)` returns an MMDiT callable (an MMDiTEngine with an FP8 attention kind) whose
attention is 16-bit in the listed blocks; `inputs` are (x, sigma, context, pooled) tuples, ideally taken
from sampling trajectories. A block's sensitivity is the output SQNR, over all inputs, when only that block
runs FP8 attention, against every block in 16 bits. The noise of different blocks adds (the linear policy's
model, `policy_sd35.predicted_sqnr`), so the policy keeps the noisiest blocks 16-bit until the predicted
output SQNR reaches `budget_db` (at most `max_keep` blocks).

Shipped policies (fp8/policies/attention_default.json) name the model they were measured on by its
config (depth, hidden size, heads, context dim); `default_attention_16bit_blocks(config)` returns the
blocks of the entry that matches, else none.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Callable, Sequence

import torch

from sd35fp8.errors import InputError
from sd35fp8.fp8.policy_sd35 import policy_from_sensitivity, predicted_sqnr
from sd35fp8.fp8.scaling import sqnr

POLICY_FILE = "attention_default.json"


def _name(i: int) -> str:
    return f"joint_blocks.{i}.attn"


def _outputs(fn: Callable, inputs: Sequence[tuple]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(*inp).float().flatten() for inp in inputs])


def measure_attention_sensitivity(build: Callable[[Sequence[int]], Callable], inputs: Sequence[tuple],
                                  depth: int) -> dict:
    """-> {"per_block_sqnr_db": {block: dB}, "all_fp8_sqnr_db": dB, "predicted_all_fp8_db": dB}."""
    if not inputs:
        raise InputError("measure_attention_sensitivity: no inputs")
    everyone = list(range(depth))
    ref = _outputs(build(everyone), inputs)
    per_block = {i: sqnr(ref, _outputs(build([j for j in everyone if j != i]), inputs)) for i in everyone}
    return {"per_block_sqnr_db": per_block, "all_fp8_sqnr_db": sqnr(ref, _outputs(build([]), inputs)),
            "predicted_all_fp8_db": predicted_sqnr([(_name(i), s) for i, s in per_block.items()])}


def attention_policy(per_block_sqnr_db: dict[int, float], budget_db: float,
                     max_keep: int | None = None) -> tuple[list[int], dict]:
    """The blocks to keep 16-bit (noisiest first) until the predicted output SQNR >= budget_db -> (blocks,
    justification: per-block SQNR, predicted SQNR without and with the kept blocks)."""
    policy, info = policy_from_sensitivity([(_name(i), s) for i, s in per_block_sqnr_db.items()], budget_db,
                                           max_keep)
    blocks = sorted(int(n.split(".")[1]) for n in policy.keep)
    return blocks, {**info, "kept": blocks}


def config_key(config) -> dict:
    """What a shipped attention policy matches a model by."""
    return {"depth": int(config.depth), "hidden_size": int(config.hidden_size), "num_heads": int(config.num_heads),
            "context_dim": int(config.context_dim)}


def default_attention_16bit_blocks(config) -> tuple[int, ...]:
    """The shipped policy's 16-bit attention blocks for a model of this config (fp8/policies/
    attention_default.json), () when none was measured for it."""
    entries = json.loads(resources.files("sd35fp8.fp8").joinpath("policies", POLICY_FILE).read_text())["models"]
    key = config_key(config)
    for entry in entries:
        if entry["config"] == key:
            return tuple(entry["attention_16bit_blocks"])
    return ()
