"""MMDiT test cases without diffusers: the tiny configs, a random model, random inputs (shared by the
MMDiT, LoRA and ControlNet tests; test_mmdit.py adds the diffusers reference, which the GPU machine lacks)."""

from __future__ import annotations

import torch

from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

CONFIGS = {
    "mmdit": MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=8, context_dim=48,
                         pooled_dim=40, qk_norm=False),
    "mmdit_qknorm": MMDiTConfig(depth=3, hidden_size=192, num_heads=3, pos_embed_max_size=8, context_dim=64,
                                pooled_dim=32, qk_norm=True),
    "mmditx": MMDiTConfig(depth=3, hidden_size=192, num_heads=3, pos_embed_max_size=8, context_dim=64,
                          pooled_dim=32, qk_norm=True, x_block_self_attn_layers=(0, 1)),
    "mmditx_no_qknorm": MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=8,
                                    context_dim=48, pooled_dim=40, qk_norm=False, x_block_self_attn_layers=(0,)),
}


def build(cfg: MMDiTConfig, seed: int = 0) -> MMDiT:
    with torch.device("meta"):
        model = MMDiT(cfg)
    model.to_empty(device="cpu")
    return init_random_(model, torch.Generator().manual_seed(seed)).eval()


def inputs(cfg: MMDiTConfig, h: int, w: int, batch: int = 2, ctx_len: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    sigma = torch.tensor([0.93, 0.31])[:batch]
    context = torch.randn(batch, ctx_len, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    return x, sigma, context, pooled
