"""Probe: ways to apply a 1% sparse residual S (4096×4096, 168k nnz) to x (8192×4096) on the GPU
(COO, CSR fp32/bf16 with and without a contiguous right-hand side, dense@sparse, BSR), each
against float64, timed with layerzip.bench. Output: results/kronecker_residual_probe.txt.

    python benchmarks/kronecker_residual_probe.py
"""

import json

import torch
from layerzip.bench import time_callable


def main() -> None:
    torch.manual_seed(0)
    m = n = 4096; t = 8192; nnz = int(0.01 * m * n)
    idx = torch.randperm(m * n)[:nnz].sort().values.cuda()
    rows, cols = idx // n, idx % n
    val = torch.randn(nnz, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(m, n, device="cuda", dtype=torch.float32); w.view(-1)[idx] = val.float()
    ref = (x.double() @ w.double().t())
    out = {}
    def rec(name, fn):
        try:
            y = fn(); torch.cuda.synchronize()
            err = float((y.double() - ref).norm() / ref.norm())
            tm = time_callable(fn, rounds=20, warmup=3).median * 1e3
            out[name] = (round(tm, 4), err)
        except Exception as e:  # noqa: BLE001 - a format torch lacks is a result here
            out[name] = repr(e)[:200]
        print(name, out[name], flush=True)
    dense = time_callable(lambda: x @ w.bfloat16().t(), rounds=20, warmup=3).median * 1e3
    print("dense_ms", dense)
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), val.float(), (m, n)).coalesce()
    rec("coo_fp32 (current)", lambda: torch.sparse.mm(coo, x.t().float()).t())
    csr32 = coo.to_sparse_csr()
    rec("csr_fp32 S@xT", lambda: (csr32 @ x.t().float()).t())
    rec("csr_fp32 S@xT contig", lambda: (csr32 @ x.t().contiguous().float()).t())
    csr16 = torch.sparse_coo_tensor(torch.stack([rows, cols]), val,
                                    (m, n)).coalesce().to_sparse_csr()
    rec("csr_bf16 S@xT", lambda: (csr16 @ x.t()).t())
    rec("csr_bf16 S@xT contig", lambda: (csr16 @ x.t().contiguous()).t())
    # x @ S^T as (S @ x^T)^T via transposed CSR (CSC of S = CSR of S^T)
    csrT16 = torch.sparse_coo_tensor(torch.stack([cols, rows]), val,
                                     (n, m)).coalesce().to_sparse_csr()
    rec("x @ csrT_bf16 (dense@sparse)", lambda: x @ csrT16)
    rec("x @ csrT_fp32", lambda: x.float() @ torch.sparse_coo_tensor(
        torch.stack([cols, rows]), val.float(), (n, m)).coalesce().to_sparse_csr())
    try:
        for bs in (16, 32):
            wb = w.bfloat16()
            b = wb.to_sparse_bsr((bs, bs))
            density = b.values().shape[0] * bs * bs / (m * n)
            rec(f"bsr{bs}_bf16 (density of blocks {density:.2f})", lambda b=b: (b @ x.t()).t())
    except Exception as e:  # noqa: BLE001 - a format torch lacks is a result here
        print("bsr", repr(e)[:200])
    print(json.dumps({"dense_ms": dense, **{k: v for k, v in out.items()}}))


if __name__ == "__main__":
    main()
