"""Product and scalar quantizers as plain tensors, and the batched lookups on them.

Codebooks are trained by the library the config names (faiss's ProductQuantizer / Kmeans, nanopq's
PQ, or k-means in torch); encoding is always nearest-centroid in torch, so every lookup backend
reads the same codes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kmeans(x: Tensor, k: int, *, iters: int = 25, seed: int = 0) -> Tensor:
    """Lloyd's k-means (L2) in float64, seeded; empty clusters are re-seeded from far points."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    cent = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, cent).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if members.numel():
                cent[j] = members.mean(0)
            else:
                cent[j] = x[torch.cdist(x, cent).min(1).values.argmax()]
    return cent


def train_pq(x: Tensor, m: int, ks: int, trainer: str, seed: int = 0) -> Tensor:
    """Codebooks (m, ks, D/m) for vectors x (N, D)."""
    n, dim = x.shape
    dsub = dim // m
    if trainer == "faiss":
        import faiss
        import numpy as np

        pq = faiss.ProductQuantizer(dim, m, int(ks).bit_length() - 1)
        pq.cp.seed = seed
        pq.cp.min_points_per_centroid = 1
        pq.train(np.ascontiguousarray(x.float().numpy()))
        return torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(m, ks, dsub).copy())
    if trainer == "nanopq":
        import nanopq
        import numpy as np

        pq = nanopq.PQ(M=m, Ks=ks, verbose=False)
        pq.fit(np.ascontiguousarray(x.float().numpy()), seed=seed)
        return torch.from_numpy(np.asarray(pq.codewords, dtype=np.float32).copy())
    subs = x.reshape(n, m, dsub)
    return torch.stack([kmeans(subs[:, j], ks, seed=seed + j).float() for j in range(m)])


def pq_encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """Nearest centroid per sub-vector: codes (N, m) uint8."""
    m, ks, dsub = codebooks.shape
    subs = x.float().reshape(x.shape[0], m, dsub).transpose(0, 1)  # (m, N, dsub)
    return torch.cdist(subs, codebooks.float()).argmin(-1).t().to(torch.uint8).contiguous()


def pq_decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    m, ks, dsub = codebooks.shape
    idx = codes.long()                                                  # (N, m)
    parts = codebooks[torch.arange(m, device=codes.device)[None, :], idx]  # (N, m, dsub)
    return parts.reshape(codes.shape[0], m * dsub)


def adc_scores(q: Tensor, codebooks: Tensor, codes: Tensor) -> Tensor:
    """Asymmetric inner products q·decode(codes), batched: (T, N) from per-query tables
    (T, m, ks) summed over the codes — the PQ-compressed keys are never decoded."""
    m, ks, dsub = codebooks.shape
    tables = torch.einsum("tmd,mkd->tmk", q.reshape(q.shape[0], m, dsub).to(codebooks.dtype),
                          codebooks)
    idx = codes.long().t()                                              # (m, N)
    return tables.gather(2, idx[None].expand(q.shape[0], -1, -1)).sum(1)


# -- scalar quantization of the values -----------------------------------------------------------
SQ_BITS = {"QT_8bit": 8, "QT_8bit_uniform": 8, "QT_4bit": 4, "QT_fp16": 16}


def sq_train(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(vmin, vdiff) per dimension (one pair for the uniform kind); unused for fp16."""
    if kind == "QT_8bit_uniform":
        lo, hi = x.min(), x.max()
        lo, hi = lo.expand(x.shape[1]), hi.expand(x.shape[1])
    else:
        lo, hi = x.min(0).values, x.max(0).values
    return lo.float().clone(), (hi - lo).clamp_min(1e-12).float().clone()


def sq_encode(x: Tensor, kind: str, vmin: Tensor, vdiff: Tensor) -> Tensor:
    if kind == "QT_fp16":  # stored as int16 bit patterns so that module.to(dtype) keeps them
        return x.half().view(torch.int16)
    levels = 2 ** SQ_BITS[kind] - 1
    return ((x - vmin) / vdiff * levels).round().clamp(0, levels).to(torch.uint8)


def sq_decode(codes: Tensor, kind: str, vmin: Tensor, vdiff: Tensor) -> Tensor:
    if kind == "QT_fp16":
        return codes.view(torch.float16).float()
    levels = 2 ** SQ_BITS[kind] - 1
    return vmin + codes.float() / levels * vdiff
