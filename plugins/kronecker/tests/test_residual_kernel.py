"""The sparse-residual gather kernel against the torch CSR form (CPU: interpreter)."""

import pytest
import torch

from layerzip_kronecker.module import add_residual_and_bias
from layerzip_kronecker.residual_kernel import (
    SLICE_ROWS, TRANSPOSE_COLUMNS, UNROLL, add_entry_residual_, pack_entry_residual)
from layerzip.testing import triton_test_device

DEVICE = triton_test_device()


def residual(m, n, nnz, seed, dtype=torch.float32, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # most entries in a few rows, as around outlier channels of real weights
        rows = torch.cat([torch.randint(0, 3, (nnz // 2,), generator=g),
                          torch.randint(0, m, (nnz - nnz // 2,), generator=g)])
        flat = (rows * n + torch.randint(0, n, (nnz,), generator=g)).unique()
    else:
        flat = torch.randperm(m * n, generator=g)[:nnz].sort().values
    return flat.to(DEVICE, torch.int32), torch.randn(flat.numel(), generator=g).to(DEVICE, dtype)


def unpack(p):
    """The dense (m, n) matrix a packed residual holds, lane by lane."""
    dense = torch.zeros(p.m, p.n, dtype=torch.float64)
    lane_rows, slice_rows = p.lane_rows.long().cpu(), p.slice_rows.long().cpu()
    for s in range(p.n_slices):
        w, off = int(p.widths[s]), int(p.offsets[s])
        cols = p.cols[off:off + w * SLICE_ROWS].view(w, SLICE_ROWS).long().cpu()
        vals = p.vals[off:off + w * SLICE_ROWS].view(w, SLICE_ROWS).double().cpu()
        assert w == 0 or bool((cols[-1] >= 0).any())  # as wide as its longest lane, no wider
        # a regular slice holds rows s·SR…, a many-row overflow slice a row per lane, a
        # one-row slice one row in all its lanes
        if s < p.n_regular:
            rows = torch.arange(SLICE_ROWS) + s * SLICE_ROWS
        elif s < p.n_regular + p.n_multi:
            rows = lane_rows[(s - p.n_regular) * SLICE_ROWS:][:SLICE_ROWS]
            assert rows[rows >= 0].unique().numel() == int((rows >= 0).sum())
        else:
            rows = slice_rows[s - p.n_regular - p.n_multi].expand(SLICE_ROWS)
        for i in range(SLICE_ROWS):
            keep = cols[:, i] >= 0
            assert bool((vals[~keep, i] == 0).all())  # padding carries nothing
            if keep.any():
                assert 0 <= rows[i] < p.m
                dense[rows[i], cols[keep, i]] += vals[keep, i]
    return dense


@pytest.mark.parametrize("skew", [False, True])
def test_packing_puts_every_entry_in_one_slot(skew):
    m, n = 150, 400 if skew else 70  # three regular slices, the last one partial
    idx, val = residual(m, n, 900, seed=1, skew=skew)
    p = pack_entry_residual(idx, val, m, n)
    assert p.n_regular == 3 and p.cols.dtype == torch.int16
    want = torch.zeros(m * n, dtype=torch.float64)
    want[idx.long().cpu()] = val.double().cpu()
    torch.testing.assert_close(unpack(p), want.view(m, n))
    if skew:  # three rows hold ~450 entries: overflow slices keep the other slices narrow
        longest = int(torch.bincount(idx.long().cpu() // n).max())
        assert p.slice_rows.numel() >= 1  # the longest rows get slices of their own
        assert p.cols.numel() < 0.25 * longest * SLICE_ROWS * p.n_regular


def test_the_cap_is_the_best_of_all_caps():
    # the cap is searched among the counts where the packing's size changes slope only; on
    # random row lengths (with a few outlier rows) it is as good as trying every cap
    from layerzip_kronecker.residual_kernel import _best_cap, _slots

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = int(torch.randint(64, 1500, (1,), generator=g))
        counts = torch.poisson(torch.full((m,), float(torch.rand(1, generator=g)) * 60 + 0.5),
                               generator=g).long()
        outliers = int(torch.randint(0, 8, (1,), generator=g))
        counts[:outliers] = torch.randint(50, 600, (outliers,), generator=g)
        counts = torch.cat([counts, torch.zeros((-m) % SLICE_ROWS, dtype=torch.long)])
        every_cap = min(_slots(counts, c) for c in range(1, int(counts.max()) + 1))
        assert _slots(counts, _best_cap(counts)) == every_cap


@pytest.mark.parametrize("t,m,n,nnz,bias,skew", [
    (37, 150, 70, 900, True, False),   # token tail, partial last slice, bias fused
    (16, 64, 4096, 2000, False, True),  # long rows, skewed counts; int16 columns up to 4095
    (5, 200, 40, 0, True, False),      # no entries: only the bias
    (9, 130, 30, 20, False, False),    # most slices empty: y untouched there
    (20, 150, 70, 900, True, True),    # overflow slices: rows updated from several slices
    (70, 150, 300, 2000, True, True),  # 5 token tiles over 3 persistent programs
])
@pytest.mark.parametrize("persistent", [False, True], ids=["x_transposed", "persistent"])
def test_matches_the_torch_form(t, m, n, nnz, bias, skew, persistent):
    idx, val = residual(m, n, nnz, seed=t + nnz, skew=skew)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(t, n, generator=g).to(DEVICE)
    y0 = torch.randn(t, m, generator=g).to(DEVICE)
    b = torch.randn(m, generator=g).to(DEVICE) if bias else None
    want = add_residual_and_bias(y0.double(), x.double(), idx, val.double(),
                                 None if b is None else b.double())
    y = y0.clone()
    out = add_entry_residual_(y, x, pack_entry_residual(idx, val, m, n), b,
                              persistent=persistent)
    assert out is y  # in place
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("persistent", [False, True], ids=["x_transposed", "persistent"])
def test_half_precision_and_strided_rows(persistent):
    m, n, t = 96, 128, 20
    idx, val = residual(m, n, 600, seed=3, dtype=torch.float16)
    x = torch.randn(t, n + 24).to(DEVICE, torch.float16)[:, :n]  # rows n + 24 apart
    y0 = torch.randn(t, m).to(DEVICE, torch.float16)
    want = add_residual_and_bias(y0.double(), x.double(), idx, val.double(), None)
    out = add_entry_residual_(y0.clone(), x, pack_entry_residual(idx, val, m, n),
                              persistent=persistent)
    assert out.dtype == torch.float16
    assert float((out.double() - want).norm() / want.norm()) < 2e-3


def test_wide_inputs_use_int32_columns():
    idx = torch.tensor([5, 40_000, 2 * 40_000 + 39_999], dtype=torch.int64)
    p = pack_entry_residual(idx, torch.ones(3), 3, 40_000)
    assert p.cols.dtype == torch.int32 and set(p.cols.tolist()) == {-1, 5, 0, 39_999}


def test_shape_mismatch_is_named():
    idx, val = residual(64, 32, 10, seed=0)
    p = pack_entry_residual(idx, val, 64, 32)
    with pytest.raises(ValueError, match=r"residual of shape \(64, 32\)"):
        add_entry_residual_(torch.zeros(4, 64, device=DEVICE), torch.zeros(4, 31, device=DEVICE), p)


SIGNATURE = {"xt_ptr": "*bf16", "cols_ptr": "*i16", "vals_ptr": "*bf16", "off_ptr": "*i64",
             "width_ptr": "*i32", "lane_rows_ptr": "*i32", "slice_rows_ptr": "*i32",
             "b_ptr": "*bf16", "y_ptr": "*bf16", "T": "i32", "T_BUCKET": "i32", "M": "i32",
             "N": "i32", "N_SLICES": "i32", "N_REGULAR": "i32", "N_MULTI": "i32",
             "HAS_BIAS": "constexpr", "SR": "constexpr", "KU": "constexpr", "BT": "constexpr"}
PERSISTENT_SIGNATURE = {"x_ptr": "*bf16", "scratch_ptr": "*bf16",
                        **{k: v for k, v in SIGNATURE.items() if k != "xt_ptr"},
                        "sxt": "i32", "NC": "constexpr"}


@pytest.mark.parametrize("persistent", [False, True], ids=["x_transposed", "persistent"])
@pytest.mark.parametrize("has_bias,bt,warps", [(True, 16, 4), (False, 32, 8), (False, 8, 2)])
def test_compiles_for_hopper_with_vector_gathers(has_bias, bt, warps, persistent):
    # what the interpreter cannot show: the kernel compiles for sm_90, each thread gathers a
    # column's 8 tokens as one 16-byte load, the entries bypass L1 (.cg, so the xᵀ tile
    # stays there), nothing spills to local memory, and the persistent kernel's transposed
    # tile is written to its scratch in 16-byte stores (through shared memory)
    pytest.importorskip("triton")
    from layerzip.testing import compile_ptx

    sig = PERSISTENT_SIGNATURE if persistent else SIGNATURE
    consts = {"HAS_BIAS": has_bias, "SR": SLICE_ROWS, "KU": UNROLL, "BT": bt}
    if persistent:
        consts["NC"] = TRANSPOSE_COLUMNS
    ptx = compile_ptx("layerzip_kronecker.residual_kernel",
                      "_entry_residual_persistent" if persistent else "_entry_residual", sig,
                      consts, num_warps=warps,
                      divisible=[k for k, v in sig.items() if v.startswith("*")]
                      + ["T", "M", "N"] + (["sxt"] if persistent else []))
    gathers = ptx.count("ld.global.v4.b32")
    assert gathers >= UNROLL, f"{gathers} 16-byte loads: the gathers are not vectorized"
    assert "ld.global.cg.b16" in ptx  # the packed columns and values, past L1
    assert ".local" not in ptx
    if persistent:
        assert "st.global.v4.b32" in ptx
