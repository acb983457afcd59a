"""The sparse residual of single entries in Triton: y[t, i] += Σ_j S[i, j] x[t, j] (+ bias).

A residual kept at 1% of a 4096² layer has ~168k entries spread over every row and column:
no tile of S is dense enough for tensor cores, so each entry is a gather of x's column j for
every token. cuSPARSE's CSR product took 1.16 ms for that at T = 8192 on the H100, three times
the dense layer (benchmarks/results/kronecker_residual_probe.txt).

Here the gathers come from L1. A program owns a tile of BT tokens and reads xᵀ (n × T, made
once per call), so column j of its tile is BT contiguous elements (a 16-byte vector per
thread) and the whole tile, n · BT elements, stays in L1 while the program walks the residual
rows; the entries themselves stream past L1 (``.cg``) so that they do not evict it.

The residual is packed once per version of its tensors (:func:`pack_entry_residual`, cached
by the backend) as a sliced ELL: rows in slices of SR; slice s stores entry k of its lane i
at ``offsets[s] + k·SR + i``, its width the longest lane of the slice, with column −1 marking
padding (masked: no gather); the kernel walks a slice KU entries at a time, masking past its
width. A row keeps at most
``cap`` entries in its own slice (the cap that packs smallest): one long row — an outlier
channel — would otherwise widen its whole slice. Its further entries go to one lane of a
many-row overflow slice (rows sorted by overflow, so a slice's lanes are about as long), or,
with SR or more of them, to a slice of its own, spread over all SR lanes, whose products are
summed. A program owns y for its
tokens and adds every slice's products in place — no atomics; a barrier orders the two
updates of a long row — and fuses the bias.

xᵀ costs a pass over x (read and write: ≈ 45 µs at T = 8192, n = 4096 on the H100). The
persistent variant (``persistent=True``) instead has one program per SM transpose each of
its token tiles into its own scratch, which stays in L2; which is faster is for the GPU to
say (benchmarks/kronecker_entry_residual.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from layerzip import LaunchCache, cdiv, triton_interpreted

from .triton_kernel import _sm_count

INTERPRET = triton_interpreted()
QUICK = os.environ.get("LAYERZIP_TRITON_QUICK") == "1"
SLICE_ROWS = 64   # SR: rows per slice; with BT = 16 tokens a thread of 4 warps gathers 8 of them
UNROLL = 8        # KU: entries per row gathered together (independent loads in flight)
TRANSPOSE_COLUMNS = 256  # NC: columns of x per step of the persistent kernel's transpose


@dataclass(frozen=True)
class PackedResidual:
    """A residual of single entries as a sliced ELL (see the module docstring): regular
    slices, then overflow slices of many rows (one per lane), then of one row each."""

    cols: torch.Tensor       # (total,) int16 when n < 2¹⁵, else int32; −1: padding
    vals: torch.Tensor       # (total,) the residual's dtype; 0 at padding
    offsets: torch.Tensor    # (n_slices,) int64: where slice s starts
    widths: torch.Tensor     # (n_slices,) int32: entries per lane in slice s (its longest lane)
    lane_rows: torch.Tensor  # (n_multi · SR,) int32: the output row of each lane; −1: none
    slice_rows: torch.Tensor  # (n_single,) int32: the output row of each one-row slice
    m: int
    n: int

    @property
    def n_slices(self) -> int:
        return self.offsets.numel()

    @property
    def n_multi(self) -> int:
        return self.lane_rows.numel() // SLICE_ROWS

    @property
    def n_regular(self) -> int:
        return self.n_slices - self.n_multi - self.slice_rows.numel()


def _overflow(counts: torch.Tensor, cap: int):
    """With cap entries kept per row in its own slice, the rows past it: (rows of a lane in
    a many-row overflow slice, sorted longest first; their extra entries), (rows with a
    slice of their own — SR or more extra entries, spread over all lanes; their extra)."""
    extra = (counts - cap).clamp(min=0)
    short = torch.nonzero((extra > 0) & (extra < SLICE_ROWS)).flatten()
    short = short[torch.argsort(extra[short], descending=True, stable=True)]
    long = torch.nonzero(extra >= SLICE_ROWS).flatten()
    return short, extra[short], long, extra[long]


def _slots(counts: torch.Tensor, cap: int) -> int:
    """Slots (per lane) the packing takes with this cap."""
    _, short_extra, _, long_extra = _overflow(counts, cap)
    regular = counts.view(-1, SLICE_ROWS).amax(1).clamp(max=cap).sum()
    multi = short_extra[::SLICE_ROWS].sum()  # each group's width: its first (longest) lane
    single = ((long_extra + SLICE_ROWS - 1) // SLICE_ROWS).sum()
    return int(regular + multi + single)


def _best_cap(counts: torch.Tensor) -> int:
    """Entries a row keeps in its own slice: the cap that packs into the fewest slots. One
    long row would otherwise widen its whole slice."""
    # the slot count is linear in the cap between the caps where a row starts or stops
    # overflowing (a count) or changes kind (a count − SR): its minimum is at one of those
    top = max(1, int(counts.max()))
    candidates = torch.cat([counts, counts - SLICE_ROWS, torch.tensor([1, top])])
    candidates = candidates[(candidates >= 1) & (candidates <= top)].unique().tolist()
    sizes = {cap: _slots(counts, cap) for cap in candidates}
    return min(sizes, key=lambda cap: (sizes[cap], -cap))


def pack_entry_residual(res_idx: torch.Tensor, res_val: torch.Tensor, m: int,
                        n: int) -> PackedResidual:
    """Pack the residual given as sorted flat indices i·n + j (int32/int64) and values."""
    device = res_idx.device
    idx = res_idx.long()
    rows, cols = idx // n, idx % n
    n_reg = cdiv(m, SLICE_ROWS)
    counts = torch.bincount(rows, minlength=n_reg * SLICE_ROWS).cpu()
    cap = _best_cap(counts)
    short, short_extra, long, long_extra = _overflow(counts, cap)
    n_multi, n_single = cdiv(short.numel(), SLICE_ROWS), long.numel()
    # where each row's entries past the cap go: (slice, lane) for a short row, slice for a
    # long one (its entries spread over the lanes)
    slice_of_row = torch.full((counts.numel(),), -1, dtype=torch.long)
    lane_of_row = torch.zeros(counts.numel(), dtype=torch.long)
    order = torch.arange(short.numel())
    slice_of_row[short] = n_reg + order // SLICE_ROWS
    lane_of_row[short] = order % SLICE_ROWS
    slice_of_row[long] = n_reg + n_multi + torch.arange(n_single)
    widths = torch.cat([counts.view(-1, SLICE_ROWS).amax(1).clamp(max=cap),
                        short_extra[::SLICE_ROWS],
                        (long_extra + SLICE_ROWS - 1) // SLICE_ROWS])
    lane_rows = torch.full((n_multi * SLICE_ROWS,), -1, dtype=torch.int32)
    lane_rows[: short.numel()] = short.to(torch.int32)
    # each entry's rank in its row (the indices are sorted, so a row is a run): the first cap
    # go to lane i % SR of the row's own slice at position rank; the rest past the cap, to
    # the row's lane of a many-row slice, or over the lanes of its one-row slice
    rank = torch.arange(idx.numel(), device=device) - (torch.cumsum(counts, 0) - counts
                                                        ).to(device)[rows]
    past = rank - cap
    over = past >= 0
    long_row = (counts >= cap + SLICE_ROWS).to(device)[rows]
    slice_of = torch.where(over, slice_of_row.to(device)[rows], rows // SLICE_ROWS)
    lane = torch.where(over, torch.where(long_row, past % SLICE_ROWS,
                                         lane_of_row.to(device)[rows]), rows % SLICE_ROWS)
    pos = torch.where(over, torch.where(long_row, past // SLICE_ROWS, past), rank)
    widths = widths.to(device)
    sizes = widths * SLICE_ROWS
    offsets = torch.cumsum(sizes, 0) - sizes
    slot = offsets[slice_of] + pos * SLICE_ROWS + lane
    total = int(sizes.sum())
    col_dtype = torch.int16 if n < 2 ** 15 else torch.int32
    packed_cols = torch.full((total,), -1, dtype=col_dtype, device=device)
    packed_cols[slot] = cols.to(col_dtype)
    packed_vals = torch.zeros(total, dtype=res_val.dtype, device=device)
    packed_vals[slot] = res_val.detach()
    return PackedResidual(packed_cols, packed_vals, offsets, widths.to(torch.int32),
                          lane_rows.to(device), long.to(device, torch.int32), m, n)


if triton is not None:

    def _configs():
        if INTERPRET:
            return [triton.Config({"BT": 16}, num_warps=1)]
        # BT · SR = 256 · warps: each thread gathers 16 bytes (8 tokens) of a column per load
        # (tests/test_residual_kernel.py reads that off the PTX); (16, 2): two such loads
        return [triton.Config({"BT": bt}, num_warps=w)
                for bt, w in ((16, 4), (32, 8), (8, 2), (16, 2))][:2 if QUICK else None]

    @triton.jit
    def _slice_products(x_tile, cols_ptr, vals_ptr, off_ptr, width_ptr, s, ri, tok, x_stride,
                        SR: tl.constexpr, KU: tl.constexpr, BT: tl.constexpr):
        """(SR, BT): lane i's entries of slice s times the token tile's columns of x (column
        j at x_tile + j·x_stride)."""
        off = tl.load(off_ptr + s)
        width = tl.load(width_ptr + s)
        acc = tl.zeros((SR, BT), dtype=tl.float32)
        for k0 in range(0, width, KU):
            for j in tl.static_range(KU):
                e = off + (k0 + j) * SR + ri
                inside = ri * 0 + (k0 + j) < width  # past the slice's width: masked
                # the entries stream past L1 (.cg) so as not to evict the xᵀ tile
                c = tl.load(cols_ptr + e, mask=inside, other=-1,
                            cache_modifier=".cg").to(tl.int64)
                v = tl.load(vals_ptr + e, mask=inside, other=0.0, cache_modifier=".cg")
                xg = tl.load(x_tile[None, :] + c[:, None] * x_stride,
                             mask=(c[:, None] >= 0) & tok[None, :], other=0.0)
                acc += v.to(tl.float32)[:, None] * xg.to(tl.float32)
        return acc

    @triton.jit
    def _add_to_y(y_ptr, acc, rows, tokens, tok, M):
        yp = y_ptr + tokens[None, :].to(tl.int64) * M + rows[:, None]
        ym = (rows[:, None] >= 0) & (rows[:, None] < M) & tok[None, :]
        # .cg: y passes once through this SM; L1 keeps the xᵀ tile
        out = tl.load(yp, mask=ym, other=0.0, cache_modifier=".cg").to(tl.float32) + acc
        tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=ym)

    @triton.jit
    def _tile_residual(x_tile, x_stride, cols_ptr, vals_ptr, off_ptr, width_ptr, lane_rows_ptr,
                       slice_rows_ptr, b_ptr, y_ptr, t0, tok, M, N_SLICES, N_REGULAR, N_MULTI,
                       HAS_BIAS: tl.constexpr, SR: tl.constexpr, KU: tl.constexpr,
                       BT: tl.constexpr):
        """y[t0:t0+BT, :] += S xᵀ[:, t0:t0+BT] (+ bias), column j of the token tile at
        x_tile + j·x_stride: the regular slices (rows s·SR…), then the overflow slices of
        many rows (one per lane), then those of one row. The caller owns these tokens' y; a
        barrier orders the two read-modify-writes of a row that overflows."""
        rt = tl.arange(0, BT)
        ri = tl.arange(0, SR)
        for s in range(0, N_REGULAR):
            rows = s * SR + ri
            acc = _slice_products(x_tile, cols_ptr, vals_ptr, off_ptr, width_ptr, s, ri, tok,
                                  x_stride, SR, KU, BT)
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)[:, None]
                _add_to_y(y_ptr, acc, rows, t0 + rt, tok, M)
            else:
                if tl.load(width_ptr + s) > 0:  # a slice without entries leaves y alone
                    _add_to_y(y_ptr, acc, rows, t0 + rt, tok, M)
        tl.debug_barrier()  # the regular slices' writes to y are done before any row's overflow
        for s in range(N_REGULAR, N_REGULAR + N_MULTI):
            # one row per lane (−1: none), each row in one lane of one such slice
            rows = tl.load(lane_rows_ptr + (s - N_REGULAR) * SR + ri)
            acc = _slice_products(x_tile, cols_ptr, vals_ptr, off_ptr, width_ptr, s, ri, tok,
                                  x_stride, SR, KU, BT)
            _add_to_y(y_ptr, acc, rows, t0 + rt, tok, M)
        for s in range(N_REGULAR + N_MULTI, N_SLICES):
            # all lanes belong to one row: their products add up
            row = tl.load(slice_rows_ptr + s - N_REGULAR - N_MULTI)
            acc = _slice_products(x_tile, cols_ptr, vals_ptr, off_ptr, width_ptr, s, ri, tok,
                                  x_stride, SR, KU, BT)
            yp = y_ptr + (t0 + rt).to(tl.int64) * M + row
            out = tl.load(yp, mask=tok, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(yp, (out + tl.sum(acc, axis=0)).to(y_ptr.dtype.element_ty), mask=tok)

    # y is updated in place: the autotuner must restore it after each timed run
    @triton.autotune(configs=_configs(), key=["T_BUCKET", "M", "N"], restore_value=["y_ptr"])
    @triton.jit
    def _entry_residual(xt_ptr, cols_ptr, vals_ptr, off_ptr, width_ptr, lane_rows_ptr,
                        slice_rows_ptr, b_ptr, y_ptr, T, T_BUCKET, M, N, N_SLICES, N_REGULAR,
                        N_MULTI, HAS_BIAS: tl.constexpr, SR: tl.constexpr, KU: tl.constexpr,
                        BT: tl.constexpr, TILED: tl.constexpr = False):
        """One token tile per program, from xᵀ (n × T) made by the caller; ``TILED``: from
        xᵀ by token tiles (T/BT, n, BT), so that a tile is contiguous — each L1 line of it
        is used whole, where xᵀ's rows use 2·BT bytes of each line they touch."""
        t0 = tl.program_id(0) * BT
        rt = tl.arange(0, BT)
        if TILED:
            x_tile = xt_ptr + tl.program_id(0).to(tl.int64) * N * BT + rt
            x_stride = BT
        else:
            x_tile = xt_ptr + t0 + rt
            x_stride = T
        _tile_residual(x_tile, x_stride, cols_ptr, vals_ptr, off_ptr, width_ptr,
                       lane_rows_ptr, slice_rows_ptr, b_ptr, y_ptr, t0, (t0 + rt) < T, M,
                       N_SLICES, N_REGULAR, N_MULTI, HAS_BIAS, SR, KU, BT)

    @triton.autotune(configs=_configs(), key=["T_BUCKET", "M", "N"], restore_value=["y_ptr"])
    @triton.jit
    def _entry_residual_persistent(x_ptr, scratch_ptr, cols_ptr, vals_ptr, off_ptr, width_ptr,
                                   lane_rows_ptr, slice_rows_ptr, b_ptr, y_ptr, T, T_BUCKET, M,
                                   N, N_SLICES, N_REGULAR, N_MULTI, sxt,
                                   HAS_BIAS: tl.constexpr, SR: tl.constexpr, KU: tl.constexpr,
                                   BT: tl.constexpr, NC: tl.constexpr):
        """A persistent program per SM transposes each of its token tiles itself, into its
        own scratch (n × BT, in L2): x is read once, from memory, and no xᵀ is written there."""
        pid = tl.program_id(0)
        rt = tl.arange(0, BT)
        cj = tl.arange(0, NC)
        xs = scratch_ptr + pid.to(tl.int64) * N * BT
        for tile in range(pid, tl.cdiv(T, BT), tl.num_programs(0)):
            t0 = tile * BT
            tok = (t0 + rt) < T
            tl.debug_barrier()  # the previous tile's gathers are done before overwriting
            for j0 in range(0, N, NC):
                cols = j0 + cj
                xt = tl.load(x_ptr + (t0 + rt)[:, None].to(tl.int64) * sxt + cols[None, :],
                             mask=tok[:, None] & (cols[None, :] < N), other=0.0)
                tl.store(xs + cols[None, :] * BT + rt[:, None], xt, mask=cols[None, :] < N)
            tl.debug_barrier()  # the tile is in the scratch for every thread
            _tile_residual(xs + rt, BT, cols_ptr, vals_ptr, off_ptr, width_ptr, lane_rows_ptr,
                           slice_rows_ptr, b_ptr, y_ptr, t0, tok, M, N_SLICES, N_REGULAR,
                           N_MULTI, HAS_BIAS, SR, KU, BT)

    _ENTRIES = LaunchCache(_entry_residual)
    _ENTRIES_PERSISTENT = LaunchCache(_entry_residual_persistent)
    # the persistent kernel's scratch holds the largest token tile of any config
    _MAX_BT = max(c.kwargs["BT"] for c in _entry_residual_persistent.configs)


def add_entry_residual_(y: torch.Tensor, x2: torch.Tensor, packed: PackedResidual,
                        bias: torch.Tensor | None = None, *,
                        persistent: bool = False) -> torch.Tensor:
    """In place: y (T, m) += S x2 (T, n) (+ bias), S packed by :func:`pack_entry_residual`.
    ``persistent``: one program per SM that transposes its token tiles itself, instead of
    xᵀ made by torch first (default: off — not yet measured against it on a GPU). No
    autograd."""
    t, n = x2.shape
    if (n, y.shape[1]) != (packed.n, packed.m) or y.shape[0] != t:
        raise ValueError(f"a residual of shape ({packed.m}, {packed.n}) cannot map x "
                         f"{tuple(x2.shape)} to y {tuple(y.shape)}")
    if not t:
        return y
    shared = (packed.cols, packed.vals, packed.offsets, packed.widths, packed.lane_rows,
              packed.slice_rows, bias if bias is not None else y, y)
    sizes = (t, 1 << max(0, (t - 1).bit_length()), packed.m, n, packed.n_slices,
             packed.n_regular, packed.n_multi)
    meta = {"HAS_BIAS": bias is not None, "SR": SLICE_ROWS, "KU": UNROLL}
    if persistent:
        g = _programs(x2.device)
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        # a config touches g · n · BT of it: 17 MB at n = 4096, BT = 16 on 132 SMs
        scratch = torch.empty(g * n * _MAX_BT, device=x2.device, dtype=x2.dtype)
        _ENTRIES_PERSISTENT(lambda meta: (min(g, cdiv(t, meta["BT"])),), x2, scratch, *shared,
                            *sizes, x2.stride(0), **meta, NC=TRANSPOSE_COLUMNS)
    else:
        xt = x2.t().contiguous()  # column j of a token tile becomes contiguous
        _ENTRIES(lambda meta: (cdiv(t, meta["BT"]),), xt, *shared, *sizes, **meta)
    return y


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index or 0)
    return 3  # the interpreter: a few programs exercise the tile loop
