"""Kronecker forward in Triton: y_t = Σₖ Aₖ X_t Bₖᵀ for every token t, one kernel.

Each program takes TOK consecutive tokens; for each it loads X_t (n1 × n2) once, applies the
factors (small, L1/L2-resident) with two tensor-core dots per term, and writes Y_t (m1 × m2)
once — the x and y traffic the plain formulation also has, without its intermediate tensor
(T × n1 × m2) going through memory. Factor sizes are padded to powers of two ≥ 16 with masks.
The sparse residual and the bias are added outside (same code as the reference).

Backward (:func:`kron_fused_autograd`): dX = Σₖ (Aₖᵀ ⊗ Bₖᵀ) dY is the same kernel with
transposed factors; dBₖ = Σ_t dY_tᵀ (Aₖ X_t) and dAₖ = Σ_t dY_t (Bₖ X_tᵀ) are one batched
product each plus one GEMM whose reduction runs over all T·m rows (cuBLAS splits it), on
contiguous views — only dY is transposed once, for the dA products.
A tiled variant (TB tokens as one tile, both products as single dots, the second transposed)
measured slower at r=1 (1.92× vs 2.38× of dense) and equal at r=4 on the H100
(benchmarks/results/history/kronecker_gpu_run4_tiled_kernel.md), so this version stays.
"""

from __future__ import annotations


import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from layerzip import triton_interpreted

INTERPRET = triton_interpreted()


def _configs():
    if INTERPRET:
        return [triton.Config({"TOK": 4}, num_warps=1)]
    return [triton.Config({"TOK": tok}, num_warps=w, num_stages=s)
            for tok in (8, 16, 32) for w in (4, 8) for s in (2, 3)]


if triton is not None:

    @triton.autotune(configs=_configs(), key=["T_BUCKET", "M1", "N1", "M2", "N2", "R"])
    @triton.jit
    def _kron_kernel(x_ptr, a_ptr, b_ptr, y_ptr, T, T_BUCKET, M1, N1, M2, N2,
                     R: tl.constexpr, BM1: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr,
                     BN2: tl.constexpr, PRECISION: tl.constexpr, TOK: tl.constexpr):
        pid = tl.program_id(0)
        im1 = tl.arange(0, BM1)
        in1 = tl.arange(0, BN1)
        im2 = tl.arange(0, BM2)
        in2 = tl.arange(0, BN2)
        xmask = (in1[:, None] < N1) & (in2[None, :] < N2)
        ymask = (im1[:, None] < M1) & (im2[None, :] < M2)
        amask = (im1[:, None] < M1) & (in1[None, :] < N1)
        btmask = (in2[:, None] < N2) & (im2[None, :] < M2)
        for j in range(TOK):
            t = pid * TOK + j
            if t < T:
                x = tl.load(x_ptr + t * N1 * N2 + in1[:, None] * N2 + in2[None, :], mask=xmask,
                            other=0.0)
                acc = tl.zeros((BM1, BM2), dtype=tl.float32)
                for k in tl.static_range(R):
                    bt = tl.load(b_ptr + k * M2 * N2 + im2[None, :] * N2 + in2[:, None],
                                 mask=btmask, other=0.0)                      # Bₖᵀ: (n2, m2)
                    z = tl.dot(x, bt, input_precision=PRECISION)              # X Bₖᵀ: (n1, m2)
                    a = tl.load(a_ptr + k * M1 * N1 + im1[:, None] * N1 + in1[None, :],
                                mask=amask, other=0.0)                        # Aₖ: (m1, n1)
                    acc = tl.dot(a, z.to(x.dtype), acc, input_precision=PRECISION)
                tl.store(y_ptr + t * M1 * M2 + im1[:, None] * M2 + im2[None, :],
                         acc.to(y_ptr.dtype.element_ty), mask=ymask)


def _p2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def kron_fused(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σₖ (Aₖ ⊗ Bₖ) x over the last dimension of x (no residual, no bias)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n1 * n2).contiguous()
    t = x2.shape[0]
    y = torch.empty((t, m1 * m2), device=x.device, dtype=x.dtype)
    _kron_kernel[lambda meta: (triton.cdiv(t, meta["TOK"]),)](
        x2, a.contiguous(), b.contiguous(), y, t, 1 << max(0, (t - 1).bit_length()),
        m1, n1, m2, n2, R=r, BM1=_p2(m1), BN1=_p2(n1), BM2=_p2(m2), BN2=_p2(n2),
        PRECISION="tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    return y.reshape(*lead, m1 * m2)


class _KronFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, a, b):
        ctx.save_for_backward(x2, a, b)
        return kron_fused(x2, a, b)

    @staticmethod
    def backward(ctx, dy):
        x2, a, b = ctx.saved_tensors
        r, m1, n1 = a.shape
        _, m2, n2 = b.shape
        t = x2.shape[0]
        dy = dy.contiguous()
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = kron_fused(dy, a.transpose(1, 2), b.transpose(1, 2))   # (A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if need_a or need_b:
            x3 = x2.view(t, n1, n2)
            dy3 = dy.view(t, m1, m2)
            dyt = dy3.transpose(1, 2).reshape(t * m2, m1) if need_a else None
            da = torch.empty_like(a) if need_a else None
            db = torch.empty_like(b) if need_b else None
            for k in range(r):
                if need_b:  # Σ_t dY_tᵀ (Aₖ X_t): reduction over the T·m1 rows
                    p = torch.matmul(a[k], x3).reshape(t * m1, n2)
                    db[k] = dy3.reshape(t * m1, m2).t() @ p
                if need_a:  # Σ_t dY_t (Bₖ X_tᵀ): reduction over the T·m2 rows
                    q = torch.matmul(b[k], x3.transpose(1, 2)).reshape(t * m2, n1)
                    da[k] = dyt.t() @ q
        return dx, da, db


def kron_fused_autograd(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`kron_fused` that autograd can see through (gradients for x, A and B)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    lead = x.shape[:-1]
    y = _KronFused.apply(x.reshape(-1, n1 * n2).contiguous(), a, b)
    return y.reshape(*lead, m1 * m2)
