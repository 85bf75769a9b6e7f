"""fp8/attention_policy.py and MMDiTEngine(attention_16bit_blocks=...): per-block 16-bit attention under FP8
attention (the kernel's torch emulation on the CPU), chosen by measured sensitivity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.fast import MMDiTEngine
from sd35fp8.fp8 import attention_policy as ap
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

TINY = dataclasses.replace(MMDiTConfig.tiny(), depth=3, x_block_self_attn_layers=())


def _model():
    torch.manual_seed(0)
    return init_random_(MMDiT(TINY), torch.Generator().manual_seed(0)).eval().requires_grad_(False)


def _inputs(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, TINY.in_channels, 16, 12, generator=g), torch.rand(2, generator=g),
             torch.randn(2, 21, TINY.context_dim, generator=g), torch.randn(2, TINY.pooled_dim, generator=g))
            for _ in range(n)]


def _build(model, blocks):
    return MMDiTEngine(model, None, attention_backend="fp8_emulated", attention_16bit_blocks=blocks)


def test_every_block_16bit_is_the_plain_sdpa_engine():
    model, (args,) = _model(), _inputs(1)
    with torch.no_grad():
        plain = MMDiTEngine(model, None, attention_backend=None)(*args)
        kept = _build(model, range(TINY.depth))
        fp8 = _build(model, ())(*args)
        assert torch.equal(kept(*args), plain)
        assert "16-bit attention in blocks [0, 1, 2]" in kept.describe()
    assert 20 < sqnr(plain.float(), fp8.float()) < 60  # FP8 attention does change the output


def test_blocks_outside_the_model_raise():
    with pytest.raises(InputError, match="attention_16bit_blocks"):
        _build(_model(), [TINY.depth])


def test_sensitivity_adds_up_and_the_policy_keeps_the_noisiest_block():
    model = _model()
    sens = ap.measure_attention_sensitivity(lambda blocks: _build(model, blocks), _inputs(), TINY.depth)
    per = sens["per_block_sqnr_db"]
    assert sorted(per) == list(range(TINY.depth)) and all(20 < s < 80 for s in per.values())
    assert abs(sens["all_fp8_sqnr_db"] - sens["predicted_all_fp8_db"]) < 3  # block noises add
    assert ap.attention_policy(per, budget_db=0.0)[0] == []
    blocks, info = ap.attention_policy(per, budget_db=99.0, max_keep=1)
    assert blocks == [min(per, key=per.get)] and info["kept"] == blocks
    with pytest.raises(InputError):
        ap.measure_attention_sensitivity(lambda blocks: _build(model, blocks), [], TINY.depth)


def test_shipped_policy_matches_by_config():
    assert ap.default_attention_16bit_blocks(dataclasses.replace(TINY, depth=7)) == ()
    for entry in ap.json.loads(ap.resources.files("sd35fp8.fp8").joinpath("policies", ap.POLICY_FILE).read_text())["models"]:
        cfg = dataclasses.replace(TINY, **entry["config"])
        assert ap.default_attention_16bit_blocks(cfg) == tuple(entry["attention_16bit_blocks"])
