"""One call of the fused decode kernel per shape (T = 16, r = 256; 4096² and 4096→11008), then
the dense layer and the two cuBLAS GEMMs of the T = 8192, r = 512 prefill, to run under Nsight
Compute and read where the time goes (DRAM throughput over the kernel, warp stalls, the
second prefill GEMM's efficiency):

    ncu --clock-control none --set full -k regex:'decode|gemm|sm90' \
        python3 lowrank_decode_profile.py

Nsight Compute serializes kernels, so a dependent launch's overlap with the layer before does
not show here: these are isolated kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from layerzip_lowrank.decode_kernel import lowrank_decode

from lowrank_cases import make_case


def main() -> None:
    with torch.no_grad():
        for t, n, m, r in ((16, 4096, 4096, 256), (16, 4096, 11008, 256)):
            x, _, u, v, b = make_case(t, n, m, r, torch.bfloat16, "cuda")
            lowrank_decode(x, u, v, b)
        x, w, u, v, b = make_case(8192, 4096, 4096, 512, torch.bfloat16, "cuda")
        F.linear(x, w, b)
        h = F.linear(x, v.t())
        F.linear(h, u, b)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
