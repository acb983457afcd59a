"""kv_lookup backends: top-K or range maximum-inner-product search over PQ-coded signed keys.

Signature: ``backend(q, index, *, k=None, threshold=None) -> (ids, scores, valid)``, q (T, n)
whitened queries, ids (T, K') into the 2r signed keys, scores their approximate inner products,
valid False on padding (range results vary in length per query). All three compute the same
function of the same codes; ties may order differently.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from layerzip import Backend

from .config import faiss_gpu_available
from .module import OP, KVIndex
from .quantize import adc_scores, pq_decode


def _pad(lims, ids, scores, device):
    """faiss range results (CSR: lims, ids, scores) as padded (T, K') tensors, vectorized."""
    lims = lims.astype(np.int64)
    counts = np.diff(lims)
    t, width = len(counts), max(1, int(counts.max()) if len(counts) else 1)
    rows = np.repeat(np.arange(t), counts)
    cols = np.arange(len(ids)) - np.repeat(lims[:-1], counts)
    out_ids = np.full((t, width), -1, dtype=np.int64)
    out_scores = np.zeros((t, width), dtype=np.float32)
    out_ids[rows, cols] = ids
    out_scores[rows, cols] = scores
    ids_t = torch.from_numpy(out_ids)
    return ids_t.to(device), torch.from_numpy(out_scores).to(device), (ids_t >= 0).to(device)


def _select(scores: torch.Tensor, k, threshold):
    """Top-k, or everything above the threshold padded to the longest row (topk over the masked
    scores keeps it batched)."""
    if k is None:
        scores = scores.masked_fill(scores <= threshold, float("-inf"))
        k = max(1, int(torch.isfinite(scores).sum(1).max()))
    vals, ids = scores.topk(min(k, scores.shape[1]), dim=1)
    valid = torch.isfinite(vals)
    return ids, torch.where(valid, vals, 0.0), valid


class TorchLookup(Backend):
    op = OP
    name = "torch"
    reference = True
    description = "batched ADC tables + gather + top-k / threshold in torch (any device)"

    def __call__(self, q, index: KVIndex, *, k=None, threshold=None):
        scores = adc_scores(q, index.codebooks.to(q.dtype), index.codes)
        if index.coarse is not None:
            probe = (q @ index.coarse.to(q.dtype).t()).topk(index.nprobe, dim=1).indices
            allowed = (index.lists.long()[None, :, None] == probe[:, None, :]).any(-1)
            scores = scores.masked_fill(~allowed, float("-inf"))
        return _select(scores, k, threshold)


class NanopqLookup(Backend):
    op = OP
    name = "nanopq"
    description = "nanopq's asymmetric distance tables (metric dot), evaluated for the whole batch"

    def available(self):
        if importlib.util.find_spec("nanopq") is None:
            return False, "nanopq is not installed (pip install nanopq)"
        return True, ""

    def supports(self, x):
        return x.device.type == "cpu"

    def __call__(self, q, index: KVIndex, *, k=None, threshold=None):
        if index.coarse is not None:
            raise ValueError("the nanopq backend has no IVF: build the layer without nlist")
        cw = index.codebooks.float().numpy()                           # nanopq's codewords
        m, ks, dsub = cw.shape
        qs = q.detach().float().numpy().reshape(q.shape[0], m, dsub)
        # nanopq's dtable for metric 'dot' is q_m · codewords[m], for every query at once
        dtable = np.einsum("tmd,mkd->tmk", qs, cw)
        codes = index.codes.numpy().astype(np.int64)                   # (N, m)
        scores = dtable[:, np.arange(m)[None, :], codes].sum(-1)      # nanopq adist, batched
        return _select(torch.from_numpy(scores).to(q.dtype), k, threshold)


class FaissLookup(Backend):
    op = OP
    name = "faiss"
    differentiable = False
    description = "faiss IndexPQ / IndexIVFPQ (inner product) rebuilt from the stored codes"

    def __init__(self):
        self._cache: dict = {}

    def available(self):
        if importlib.util.find_spec("faiss") is None:
            return False, "faiss is not installed (pip install faiss-cpu)"
        return True, ""

    def supports(self, x):
        return x.device.type == "cpu" or faiss_gpu_available()[0]

    def _index(self, index: KVIndex):
        import faiss

        hit = self._cache.get(index.version[:1])
        if hit is not None and hit[0] == index.version:
            return hit[1]
        m, ks, dsub = index.codebooks.shape
        d, nbits = m * dsub, ks.bit_length() - 1
        if 2 ** nbits != ks:
            raise ValueError(f"faiss needs a power-of-two codebook size, got {ks}")
        cb = np.ascontiguousarray(index.codebooks.float().cpu().numpy().ravel())
        if index.coarse is None:
            fidx = faiss.IndexPQ(d, m, nbits, faiss.METRIC_INNER_PRODUCT)
            pq = fidx.pq
        else:
            quantizer = faiss.IndexFlatIP(d)
            quantizer.add(np.ascontiguousarray(index.coarse.float().cpu().numpy()))
            fidx = faiss.IndexIVFPQ(quantizer, d, index.coarse.shape[0], m, nbits,
                                    faiss.METRIC_INNER_PRODUCT)
            fidx.by_residual = False
            fidx.nprobe = index.nprobe
            pq = fidx.pq
        faiss.copy_array_to_vector(cb, pq.centroids)
        fidx.is_trained = True
        # the decoded keys are exactly centroids, so faiss re-encodes them to the stored codes
        fidx.add(np.ascontiguousarray(pq_decode(index.codes.cpu(), index.codebooks.float().cpu())
                                      .numpy()))
        self._cache[index.version[:1]] = (index.version, fidx)
        return fidx

    def __call__(self, q, index: KVIndex, *, k=None, threshold=None):
        fidx = self._index(index)
        qn = np.ascontiguousarray(q.detach().float().cpu().numpy())
        if k is not None:
            scores, ids = fidx.search(qn, k)
            ids_t = torch.from_numpy(ids).long()
            valid = ids_t >= 0
            return (ids_t.to(q.device), torch.from_numpy(scores).to(q.device, q.dtype)
                    .masked_fill(~valid.to(q.device), 0.0), valid.to(q.device))
        lims, scores, ids = fidx.range_search(qn, float(threshold))
        ids_t, s_t, valid = _pad(lims, ids, scores, q.device)
        return ids_t, s_t.to(q.dtype), valid
