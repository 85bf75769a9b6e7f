"""benchmarks/gemm_epilogue.py's kernels: the MLP's two FP8 GEMMs in Triton, the GELU + quantise pass folded into
fc1's epilogue. Measured and not adopted (H100, session 25: the chain 0.947 ms against cuBLAS + the row pass 0.678 ms;
in the step 89.0 against 79.2 ms; docs/PERF.md), kept here as the benchmark's contender.

    triton_mm(a, w, sa, sw, b, gelu_q=True)   fc1 -> (e4m3 GELU(fc1) [M, N], scales [M, N / QBLOCK])
    triton_mm_blockscaled(g8, gs, w, sw, b)   fc2 over the block-scaled input -> bf16 [M, N]

A per-token scale needs the whole row's amax, which no output tile of fc1 sees, so the fc2 input is scaled per
1 x QBLOCK block (each fc1 output tile quantises its own columns: DeepSeek-V3's activation tiles), and fc2 applies
those scales per K block (each block's partial product times its rows' scales, accumulated in fp32). fc1 runs as a
plain tiled kernel or persistent with TMA loads (Triton's Hopper recipe); GELU's tanh is computed from a sigmoid
(portable: `gemm_epilogue.py --check-cpu` runs these kernels in Triton's interpreter).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None

QBLOCK = 128  # the fc2 input's quantisation block (columns)
FC1_TILE = (128, 256, 128, 8, 3)  # BM, BN, BK, warps, stages (BN a multiple of QBLOCK)
FC1_TMA = True
FC2_TILE = (128, 128, QBLOCK, 8, 4)


if triton is not None:

    @triton.jit
    def _gelu_tanh(h):
        z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tanh (portable: the interpreter runs no inline PTX)
        return 0.5 * h * (1.0 + t)

    @triton.jit
    def _tile(A, W, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """This program's output tile in grouped order (GROUP row tiles share their column tiles in L2) ->
        (offs_m, offs_n, rows clamped to M - 1 (loads need no mask, stores do), A and W tile pointers at k = 0)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        per_group = GROUP * tl.cdiv(N, BLOCK_N)
        first_m = (pid // per_group) * GROUP
        size_m = tl.minimum(num_m - first_m, GROUP)
        offs_m = (first_m + (pid % per_group) % size_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = ((pid % per_group) // size_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows = tl.minimum(offs_m, M - 1)
        a_ptr = A + rows[:, None].to(tl.int64) * K + offs_k[None, :]
        w_ptr = W + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        return offs_m, offs_n, rows, a_ptr, w_ptr

    @triton.jit
    def _epilogue(acc, SA, SW, BIAS, OUT, OS, offs_m, offs_n, rows, M, N, EPI: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, QB: tl.constexpr, HAS_BIAS: tl.constexpr):
        """acc [BM, BN] fp32 -> * SA[rows] * SW (+ BIAS) -> OUT (EPI 0: bf16; 1: GELU, e4m3 per row and QB
        columns with their scales in OS)."""
        acc = acc * tl.load(SA + rows)[:, None] * tl.load(SW + offs_n)[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n).to(tl.float32)[None, :]
        mask = (offs_m < M)[:, None]
        if EPI == 0:
            tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(tl.bfloat16), mask=mask)
        else:
            g = tl.reshape(_gelu_tanh(acc), (BLOCK_M, BLOCK_N // QB, QB))
            s = tl.maximum(tl.max(tl.abs(g), axis=2), 1e-12) / 448.0  # [BM, BN / QB]
            q = tl.reshape(tl.clamp(g / s[:, :, None], -448.0, 448.0), (BLOCK_M, BLOCK_N)).to(tl.float8e4nv)
            tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], q, mask=mask)
            offs_s = tl.min(offs_n, axis=0) // QB + tl.arange(0, BLOCK_N // QB)  # this tile's scale columns
            tl.store(OS + offs_m[:, None].to(tl.int64) * (N // QB) + offs_s[None, :], s, mask=mask)

    @triton.jit
    def _mm_kernel(A, W, SA, SW, BIAS, OUT, OS, M, N, K, EPI: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QB: tl.constexpr, GROUP: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
        """A [M, K] e4m3 @ W [N, K]^T e4m3 * SA [M] * SW [N] + BIAS [N]. EPI 0: bf16 out [M, N]. EPI 1: GELU, then
        e4m3 out [M, N] with one scale per row and QB columns, OS [M, N / QB] fp32 (amax / 448)."""
        offs_m, offs_n, rows, a_ptr, w_ptr = _tile(A, W, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for _ in tl.range(0, K, BLOCK_K):
            acc = tl.dot(tl.load(a_ptr), tl.trans(tl.load(w_ptr)), acc)
            a_ptr += BLOCK_K
            w_ptr += BLOCK_K
        _epilogue(acc, SA, SW, BIAS, OUT, OS, offs_m, offs_n, rows, M, N, EPI, BLOCK_M, BLOCK_N, QB, HAS_BIAS)

    @triton.jit
    def _mm_tma_kernel(a_desc, w_desc, SA, SW, BIAS, OUT, OS, M, N, K, EPI: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QB: tl.constexpr, GROUP: tl.constexpr,
                       HAS_BIAS: tl.constexpr, NUM_SMS: tl.constexpr):
        """_mm_kernel persistent (NUM_SMS programs walk the output tiles in grouped order) with TMA loads of A and W
        (tensor descriptors, blocks [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K]): Triton's Hopper matmul recipe."""
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP * num_n
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            first_m = (tile // per_group) * GROUP
            size_m = tl.minimum(num_m - first_m, GROUP)
            m0 = (first_m + (tile % per_group) % size_m) * BLOCK_M
            n0 = ((tile % per_group) // size_m) * BLOCK_N
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                acc = tl.dot(a_desc.load([m0, k0]), w_desc.load([n0, k0]).T, acc)
            offs_m = m0 + tl.arange(0, BLOCK_M)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows = tl.minimum(offs_m, M - 1)
            _epilogue(acc, SA, SW, BIAS, OUT, OS, offs_m, offs_n, rows, M, N, EPI, BLOCK_M, BLOCK_N, QB, HAS_BIAS)

    @triton.jit
    def _mm_blockscaled_kernel(A, SA, W, SW, BIAS, OUT, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               QB: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr):
        """OUT [M, N] bf16 = sum over K blocks of (A[:, kb] e4m3 @ W[:, kb]^T e4m3) * SA[:, kb] (SA [M, K / QB]),
        * SW [N] + BIAS [N]: the K loop steps one quantisation block (BLOCK_K = QB)."""
        offs_m, offs_n, rows, a_ptr, w_ptr = _tile(A, W, M, N, K, BLOCK_M, BLOCK_N, QB, GROUP)
        s_ptr = SA + rows.to(tl.int64) * (K // QB)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kb in tl.range(0, K // QB):
            part = tl.dot(tl.load(a_ptr), tl.trans(tl.load(w_ptr)))
            acc += part * tl.load(s_ptr + kb)[:, None]
            a_ptr += QB
            w_ptr += QB
        acc = acc * tl.load(SW + offs_n)[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n).to(tl.float32)[None, :]
        tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(tl.bfloat16),
                 mask=(offs_m < M)[:, None])


def _grid(M, N, bm, bn):
    return (triton.cdiv(M, bm) * triton.cdiv(N, bn),)


def triton_mm(a, w, sa, sw, bias, tile=None, gelu_q: bool = False, tma: bool | None = None):
    """a [M, K] e4m3, w [N, K] e4m3, sa [M] / [M, 1], sw [N] / [1, N] fp32, bias [N] or None -> bf16 [M, N];
    gelu_q: (e4m3 [M, N] of GELU, scales [M, N / QBLOCK]). tile (BM, BN, BK, warps, stages), tma (the persistent
    TMA kernel): FC1_TILE / FC1_TMA when None."""
    tile = FC1_TILE if tile is None else tile
    tma = FC1_TMA if tma is None else tma
    bm, bn, bk, warps, stages = tile
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=torch.float8_e4m3fn if gelu_q else torch.bfloat16)
    os_ = torch.empty(M, N // QBLOCK, device=a.device, dtype=torch.float32) if gelu_q else sw
    meta = dict(EPI=int(gelu_q), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, QB=QBLOCK, GROUP=8, HAS_BIAS=bias is not None,
                num_warps=warps, num_stages=stages)
    bias = sw if bias is None else bias
    if not tma:
        _mm_kernel[_grid(M, N, bm, bn)](a, w, sa, sw, bias, out, os_, M, N, K, **meta)
    else:
        from triton.tools.tensor_descriptor import TensorDescriptor

        sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
        grid = (min(sms, _grid(M, N, bm, bn)[0]),)
        _mm_tma_kernel[grid](TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]), sa,
                             sw, bias, out, os_, M, N, K, NUM_SMS=grid[0], **meta)
    return (out, os_) if gelu_q else out


def triton_mm_blockscaled(a, sa, w, sw, bias, tile=None):
    """a [M, K] e4m3 with scales sa [M, K / QBLOCK] (triton_mm's gelu_q output), w [N, K] e4m3, sw per channel,
    bias [N] or None -> bf16 [M, N]. tile: FC2_TILE when None (its BK is QBLOCK)."""
    bm, bn, _, warps, stages = FC2_TILE if tile is None else tile
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16)
    _mm_blockscaled_kernel[_grid(M, N, bm, bn)](a, sa, w, sw, sw if bias is None else bias, out, M, N, K, BLOCK_M=bm,
                                                BLOCK_N=bn, QB=QBLOCK, GROUP=8, HAS_BIAS=bias is not None,
                                                num_warps=warps, num_stages=stages)
    return out
