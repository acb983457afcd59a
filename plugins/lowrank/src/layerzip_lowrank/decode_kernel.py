"""Low-rank forward for decode (a few rows): y = (x V) Uᵀ + b in one persistent Triton launch.

At T ≤ 64 rows both GEMMs are pure weight streaming: V (n × r) and U (m × r) must be read at
full bandwidth, and launches cost as much as the reads (cuBLAS's first GEMM, N = r, gets a
handful of CTAs; two launches in a CUDA graph take 13–18 µs where the bytes need 3–5 µs).

One program per SM, two phases separated by a grid-wide barrier:
1. split-K over the input: work units (K chunk × r block) are spread over all programs; each
   computes its partial h = x[:, chunk] V[chunk, rblock] in fp32 and adds it atomically into an
   fp32 scratch h (T × r, in L2);
2. after the barrier, output tiles of TW = ⌈m / G⌉ columns (one per program, so every SM
   streams an equal share of U) are spread over all programs: each reads h (from L2, bypassing
   L1) and its U tile, adds the bias and writes y once.

The barrier is an arrival counter that only grows (int64), so nothing needs resetting between
calls and the kernel can be captured in a CUDA graph. Scratch is per (device, stream), so two
streams never share it. How calls share h (``hbuf``):
- 2, the default: the scratch holds two h, used by alternate calls, and a call adds G to the
  counter (the barrier's arrivals). Its epoch, counter // G, is read after waiting for the
  previous kernel; each program adds into h[epoch % 2], waits for (epoch + 1)·G arrivals (its
  ticket // G + 1 times G), and zeroes its share of the other h, the previous call's, as it
  starts. A call thus ends with its stores. The previous call on a scratch must have used the
  same h size, so this scratch is per (bt, rp) as well.
- 1: one h shared by every layer, and a call adds 2·G: after phase 2 every program arrives once
  more without waiting, and the last one (ticket ≡ G − 1 mod G) zeroes h for the next call,
  which by stream order starts after this one has finished. The next layer waits for that
  second arrival and the zeroing: 1.3-1.5 µs between a layer's stores and the next one's wait,
  against 0.26 with two h; 5.3 instead of 4.4 µs a layer at 4096², r = 256, T = 16 on the H100
  (benchmarks/results/lowrank_decode_tune_hbuf.md, lowrank_decode_timeline.md).

On compute capability ≥ 9 the kernel is a programmatic dependent launch (``pdl``, default on):
it may start while the previous kernel on the stream still runs, reads only weights — its first
V tile and (``prefetch``) its first U tile and that tile's bias — then waits for that kernel
(griddepcontrol.wait: x may be its output, h and the counter are shared with it) and lets the
next kernel start likewise. Only a previous kernel that allows it overlaps (ours do; torch's
elementwise kernels do not): back to back, a layer takes 7.2 instead of 9.1 µs at 4096→11008
on the H100; after an elementwise op, no change
(benchmarks/results/history/lowrank_decode_tune_session6_pdl.md).
Phase 2 may also run as its own dependent launch (``split``, a tuning option: measured no
faster). Issuing the first V tile's reads before the prefetched U tile's (phase 1 needs V
first) measured 0.1-0.7 µs slower and was dropped (commit 5e9c9c3 has it;
benchmarks/results/lowrank_decode_tune_vfirst.md). The next kernel can only start once every
program of this one has started, so the barrier still finds all of them resident.

All programs must be resident at once for the barrier: G = number of SMs, one small program each.
Triton's CPU interpreter runs programs one after another, so there (and on request) the two
phases run as two launches of the same kernel with h zeroed in between; the arithmetic is the
same code and is tested against the torch reference in CI, the fused path on the GPU.

Inference only (no autograd); bf16/fp16 inputs with T ≤ 64 rows.
"""

from __future__ import annotations

import functools
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

from layerzip import LaunchCache, cdiv, triton_interpreted

from .triton_kernel import _next_pow2

MAX_ROWS = 64

if triton is not None:

    @triton.jit
    def _stamp(trace_ptr, pid, slot: tl.constexpr, TRACE: tl.constexpr):
        """With TRACE (a diagnostic: benchmarks/lowrank_decode_timeline.py), this program's
        SM cycle counter into its row of 8 int64 at ``slot``."""
        if TRACE:
            now = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64,
                                            is_pure=False, pack=1)
            tl.store(trace_ptr + pid * 8 + slot, now)

    @triton.jit
    def _h_of_call(h_ptr, sync_ptr, pid, G, HSIZE: tl.constexpr, HBUF: tl.constexpr,
                   ZB: tl.constexpr, ZERO_OTHER: tl.constexpr):
        """This call's h. With HBUF = 2 the scratch holds two h of HSIZE elements, used by
        alternate calls: the call's epoch is the counter (G arrivals a call) over G, read once
        the previous call has finished; with ZERO_OTHER this program zeroes its ZB-element
        share of the other h, the previous call's, for the next call."""
        hc = h_ptr
        if HBUF == 2:
            half = (tl.load(sync_ptr, volatile=True) // G) % 2
            if ZERO_OTHER:
                zs = pid * ZB + tl.arange(0, ZB)
                tl.store(h_ptr + (1 - half) * HSIZE + zs, tl.zeros((ZB,), dtype=tl.float32),
                         mask=zs < HSIZE)
            hc = h_ptr + half * HSIZE
        return hc

    @triton.jit
    def _decode_kernel(
        x_ptr, v_ptr, u_ptr, b_ptr, h_ptr, y_ptr, sync_ptr, trace_ptr,
        T, N_IN, M_OUT, R, N_RB, N_UNITS, N_TILES, TW, G,
        sxt, sxn, svn, svr, sum_, sur, syt, sym,
        HAS_BIAS: tl.constexpr, PHASE: tl.constexpr, BT: tl.constexpr, KC: tl.constexpr,
        BR: tl.constexpr, BN: tl.constexpr, BK2: tl.constexpr, RP: tl.constexpr,
        PREFETCH: tl.constexpr, PDL: tl.constexpr, ENDS_CALL: tl.constexpr, HBUF: tl.constexpr,
        ZB: tl.constexpr, TRACE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        HSIZE: tl.constexpr = BT * RP
        if TRACE:  # the SM and the global clock (ns) place the program; cycles time its steps
            tl.store(trace_ptr + pid * 8, tl.extra.cuda.smid().to(tl.int64))
            tl.store(trace_ptr + pid * 8 + 1, tl.extra.cuda.globaltimer())
        _stamp(trace_ptr, pid, 2, TRACE)
        if not PDL:
            _stamp(trace_ptr, pid, 3, TRACE)  # nothing to wait for inside the kernel
        rows = tl.arange(0, BT)
        rmask = rows < T
        # this program's first output tile of U does not depend on h: with PREFETCH it is
        # loaded before phase 1, so its reads overlap phase 1 and the barrier instead of
        # following them (a program without a tile masks every lane and loads nothing);
        # PREFETCH = 2 reads that tile's bias there too
        rk = tl.arange(0, RP)
        cols0 = pid * TW + tl.arange(0, BN)
        cmask0 = (tl.arange(0, BN) < TW) & (cols0 < M_OUT)
        if PREFETCH:
            u0 = tl.load(u_ptr + cols0[None, :] * sum_ + rk[:, None] * sur,
                         mask=cmask0[None, :] & (rk[:, None] < R), other=0.0)
            if PREFETCH == 2 and HAS_BIAS:  # a weight too: read now, not after the barrier
                b0 = tl.load(b_ptr + cols0, mask=cmask0, other=0.0).to(tl.float32)
        if PHASE != 2:
            # phase 1: h += x[:, chunk] @ V[chunk, rblock], one work unit at a time
            first_unit = pid
            if PDL:
                # launched while the previous kernel on the stream may still run (programmatic
                # dependent launch): read weights only — this program's first V tile — then
                # wait for that kernel to finish (x may be its output; h and the counter are
                # shared with it) and let the next one start its own weight reads
                kc0 = pid // N_RB
                ks0 = kc0 * KC + tl.arange(0, KC)
                rs0 = (pid % N_RB) * BR + tl.arange(0, BR)
                has0 = pid < N_UNITS
                v0 = tl.load(v_ptr + ks0[:, None] * svn + rs0[None, :] * svr,
                             mask=has0 & (ks0[:, None] < N_IN) & (rs0[None, :] < R), other=0.0)
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
                _stamp(trace_ptr, pid, 3, TRACE)
                # x first: its load is in flight while h's epoch (below) is read and divided
                x0 = tl.load(x_ptr + rows[:, None] * sxt + ks0[None, :] * sxn,
                             mask=has0 & rmask[:, None] & (ks0[None, :] < N_IN), other=0.0)
            # (h's epoch is read only now: the previous call has finished)
            hc = _h_of_call(h_ptr, sync_ptr, pid, G, HSIZE, HBUF, ZB, True)
            if PDL:
                tl.atomic_add(hc + rows[:, None] * RP + rs0[None, :], tl.dot(x0, v0),
                              mask=has0 & rmask[:, None] & (rs0[None, :] < R), sem="relaxed")
                first_unit = pid + G
            for unit in range(first_unit, N_UNITS, G):
                kc = unit // N_RB
                rb = unit % N_RB
                ks = kc * KC + tl.arange(0, KC)
                rs = rb * BR + tl.arange(0, BR)
                xt = tl.load(x_ptr + rows[:, None] * sxt + ks[None, :] * sxn,
                             mask=rmask[:, None] & (ks[None, :] < N_IN), other=0.0)
                vt = tl.load(v_ptr + ks[:, None] * svn + rs[None, :] * svr,
                             mask=(ks[:, None] < N_IN) & (rs[None, :] < R), other=0.0)
                part = tl.dot(xt, vt)
                tl.atomic_add(hc + rows[:, None] * RP + rs[None, :], part,
                              mask=rmask[:, None] & (rs[None, :] < R), sem="relaxed")
        if PHASE == 0:
            # grid barrier: arrive (release: this program's atomics above are visible), then
            # wait until all G programs of this call have arrived (acquire)
            # (with two h the call's epoch is known before, but an arrival that waits for no
            # answer measured the same: results/lowrank_decode_tune_ticket.md)
            ticket = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
            _stamp(trace_ptr, pid, 4, TRACE)
            target = (ticket // G + 1) * G
            while tl.atomic_add(sync_ptr, 0, sem="acquire") < target:
                pass
            _stamp(trace_ptr, pid, 5, TRACE)
        if PHASE != 1:
            # phase 2: y[:, tile] = h @ U[tile, :]ᵀ + b[tile]
            if PHASE == 2 and PDL:
                # split launch: the prefetched U tile was read while phase 1 ran; h is complete
                # once that kernel is
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            if PHASE == 2:  # (a launch of its own: which h is this call's)
                hc = _h_of_call(h_ptr, sync_ptr, pid, G, HSIZE, HBUF, ZB, False)
            first = pid
            if PREFETCH:
                # h beyond R is zero (never added to), so the whole RP width is loaded
                hf = tl.load(hc + rows[:, None] * RP + rk[None, :], mask=rmask[:, None],
                             other=0.0, cache_modifier=".cg")
                acc0 = tl.dot(hf.to(u0.dtype), u0)
                if HAS_BIAS:
                    if PREFETCH == 2:
                        acc0 += b0[None, :]
                    else:
                        acc0 += tl.load(b_ptr + cols0, mask=cmask0,
                                        other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + rows[:, None] * syt + cols0[None, :] * sym,
                         acc0.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask0[None, :])
                first = pid + G
            for tile in range(first, N_TILES, G):
                cols = tile * TW + tl.arange(0, BN)
                cmask = (tl.arange(0, BN) < TW) & (cols < M_OUT)
                acc = tl.zeros((BT, BN), dtype=tl.float32)
                for k0 in range(0, R, BK2):
                    ks = k0 + tl.arange(0, BK2)
                    ht = tl.load(hc + rows[:, None] * RP + ks[None, :],
                                 mask=rmask[:, None] & (ks[None, :] < R), other=0.0,
                                 cache_modifier=".cg")  # written by other SMs: skip L1
                    ut = tl.load(u_ptr + cols[None, :] * sum_ + ks[:, None] * sur,
                                 mask=cmask[None, :] & (ks[:, None] < R), other=0.0)
                    acc = tl.dot(ht.to(ut.dtype), ut, acc)
                if HAS_BIAS:
                    acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + rows[:, None] * syt + cols[None, :] * sym,
                         acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        _stamp(trace_ptr, pid, 6, TRACE)
        if TRACE:
            tl.store(trace_ptr + pid * 8 + 7, tl.extra.cuda.globaltimer())
        if ENDS_CALL and HBUF == 1:
            # done reading h: the last program to arrive zeroes it for the next call (no one
            # waits here; kernel completion orders the stores before the next launch)
            done = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
            if done % G == G - 1:
                zs = tl.arange(0, RP)
                for t in range(0, BT):
                    tl.store(h_ptr + t * RP + zs, tl.zeros((RP,), dtype=tl.float32))
        if ENDS_CALL and HBUF == 2 and PHASE == 2:
            # a call's G arrivals (one launch: the barrier's) make its epoch; kernel completion
            # orders this before the next call reads it, so no ordering is asked of it here
            tl.atomic_add(sync_ptr, 1, sem="relaxed")


    # the decode call is host-bound in eager mode: skip Triton's per-call dispatch
    _DECODE = LaunchCache(_decode_kernel)


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(max(1, n))))


def _nearest_pow2(n: int, lo: int, hi: int) -> int:
    """The power of two nearest to n (the larger one on a tie), within [lo, hi]."""
    up = _next_pow2(max(1, n))
    return max(lo, min(hi, up if up - n <= n - up // 2 else up // 2))


_scratch: dict = {}
_retired: list = []


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol) needs compute capability 9.0."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs exercise the grid-stride loops


def _scratch_for(device: torch.device, bt: int, rp: int, g: int, fused: bool, hbuf: int = 1):
    """(h: fp32, counter: int64) for this device and current stream, zeroed once.

    hbuf = 1: one h of at least bt × rp, shared by every layer (each fused call leaves it
    zeroed; the two-launch path zeroes it itself, so it never shares the fused path's).
    hbuf = 2: two h of exactly bt × rp and a counter of their own, for the layers of this
    (bt, rp) only: a call zeroes the h that the previous call on the same scratch used, which
    therefore must have had the same size."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, g, fused) + ((bt, rp) if hbuf == 2 else ())
    h, counter = _scratch.get(key, (None, None))
    if h is None or h.numel() < hbuf * bt * rp:
        if h is not None:  # CUDA graphs captured earlier still point at the old ones
            _retired.append((h, counter))
        h, counter = _zeros(device, (hbuf * bt * rp, torch.float32), (1, torch.int64))
        _scratch[key] = (h, counter)
    return h, counter


def _zeros(device: torch.device, *specs: tuple[int, torch.dtype]) -> list[torch.Tensor]:
    """Zeroed tensors of these (size, dtype)s that no CUDA graph's private memory pool holds.

    While torch.compile(mode="reduce-overhead") warms up a CUDA graph, every allocation made
    by this thread comes from that graph's pool, which must hold only tensors the graph tracks
    as outputs (else: "tensors in the cudagraph pool not tracked as outputs"). The scratch
    outlives every graph, so a helper thread allocates it from the ordinary pool and waits
    for the zeros. Inside a capture (no other thread may allocate then, in torch.cuda.graph's
    default mode) it is allocated here: that capture's pool keeps it, as its graph needs."""
    def make():
        return [torch.zeros(n, device=device, dtype=dt) for n, dt in specs]

    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return make()
    made, failed = [], []

    def work():
        try:
            with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
                made.extend(make())
                torch.cuda.current_stream().synchronize()
        except BaseException as e:  # re-raised in the calling thread
            failed.append(e)

    helper = threading.Thread(target=work, name="layerzip-decode-scratch")
    helper.start()
    helper.join()
    if failed:
        raise failed[0]
    return made


@functools.lru_cache(maxsize=1024)
def plan(t: int, n: int, m: int, r: int, g: int, br: int = 0, kc: int = 0, bn: int = 0,
         bk2: int = 0, warps: int = 4, prefetch: int | None = None, pdl: int = 1,
         split: int = 0, tw: int = 0, hbuf: int = 2) -> dict:
    """Tile sizes for T = t rows: about one phase-1 unit and one phase-2 tile per program.
    Nonzero br/kc/bn/bk2 override the heuristic, prefetch/pdl the defaults
    (benchmarks/lowrank_decode_tune.py). ``prefetch``: 0 reads every U tile in phase 2, 1
    reads each program's first U tile before phase 1, 2 its bias too (the default where the
    tile fits in registers). ``split``: the two phases as two dependent launches
    (the launch boundary replaces the grid barrier; needs pdl). ``tw``: output tiles of tw
    columns inside blocks of the next power of two (default ⌈m / G⌉: one tile per program).
    ``hbuf``: 1, one h that the call's last program zeroes after a second arrival at the
    counter; 2 (the default), two h used by alternate calls, each call zeroing the previous
    call's as it starts, so a call ends with its stores (no end-of-call atomic on the fused
    path; 4.4 instead of 5.3 µs at 4096², results/lowrank_decode_tune_hbuf.md)."""
    if hbuf not in (1, 2):
        raise ValueError(f"hbuf is 1 or 2, got {hbuf}")
    # measured on the H100 (benchmarks/results/lowrank_decode_tune*.md): r blocks of 64 and
    # about one phase-1 unit per program: K chunks of the power of two nearest to n·n_rb / G.
    # At 4096 that is 128 (128 units on 132 SMs); at 11008, 256 (172 units), where the next
    # power of two up (512: 88 units of 64 KB V tiles) took 8.4 instead of 6.8 µs at
    # 11008→4096, T = 16, and 7.9 instead of 5.8 at T = 1 (lowrank_decode_tune_kc.md)
    br = br or _clamp_pow2(r, 16, 64)
    n_rb = cdiv(r, br)
    kc = kc or _nearest_pow2(cdiv(n * n_rb, g), 32, 512)
    # one output tile of ⌈m / G⌉ columns per program, inside a block of the next power of two
    # (masked lanes read nothing): every SM streams an equal share of U. At 4096→11008 that is
    # 84 columns on 132 programs instead of 128-column tiles on 86: 6.6 instead of 7.1 µs at
    # T = 16, 5.9 instead of 6.9 at T = 1 (lowrank_decode_tune_tw.md); 4096² is unchanged.
    # An explicit bn (tuning) gives tiles of exactly bn columns instead.
    if bn:
        tw = tw or bn
    else:
        tw = tw or max(16, cdiv(m, g))  # (at least 16: small layers get a few whole tiles)
    bn = max(16, _next_pow2(tw))
    bk2 = bk2 or min(64, _clamp_pow2(r, 16, 64))
    rp = max(16, _next_pow2(r))
    if prefetch is None:
        # with the dependent launch the prefetched U tile is read before waiting on the
        # previous layer (0.3-1.3 µs faster on the H100: results/history/
        # lowrank_decode_tune_session6_pdl.md); the tile is loaded into registers (then staged
        # in shared memory for the product, as the sm_90 PTX shows), so only up to 32k elements
        # (r = 256 × 128 columns: 128 registers a thread at 4 warps). Its bias with
        # it (2): at 4096→11008, T = 16, 6.0 instead of 6.7 µs, the bias's memory round trip
        # taken out of phase 2 (results/lowrank_decode_tune_bias.md, lowrank_decode_timeline.md)
        prefetch = 2 * int(pdl and rp * bn <= 32768)
    bt = max(16, _next_pow2(t))
    return {"BT": bt, "KC": kc, "BR": br, "BN": bn, "BK2": bk2,
            "RP": rp, "N_RB": n_rb, "N_UNITS": cdiv(n, kc) * n_rb,
            "N_TILES": cdiv(m, tw), "TW": tw, "warps": warps, "PREFETCH": int(prefetch),
            "PDL": bool(pdl), "SPLIT": bool(split and pdl), "HBUF": hbuf,
            # each program's share of the other h to zero (hbuf = 2)
            "ZB": _next_pow2(cdiv(bt * rp, g))}


def lowrank_decode(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor | None, *, fused: bool | None = None,
                   tiles: dict | None = None, trace: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ v) @ uᵀ + bias for x with at most 64 rows (over its last dimension). ``fused``
    (default: on a GPU) runs both phases in one launch with a grid barrier; otherwise two.
    ``tiles`` overrides tile sizes and options ({"br", "kc", "bn", "bk2", "warps", "prefetch",
    "pdl", "split", "tw", "hbuf"}; for tuning: ``plan``). ``pdl``: launch as a
    programmatic dependent launch (compute capability ≥ 9; ignored elsewhere and on the
    two-launch path).
    ``trace`` (a diagnostic, GPU only: an int64 tensor of G × 8): each program writes its SM,
    the global timer (ns) at its start and end, and its SM's cycle counter at its start, after
    waiting for the kernel before it, after arriving at and after leaving the grid barrier,
    and after its stores (benchmarks/lowrank_decode_timeline.py)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    t, n = x2.shape
    m, r = u.shape
    if t > MAX_ROWS:
        raise ValueError(f"lowrank_decode takes at most {MAX_ROWS} rows, got {t}")
    if fused is None:
        fused = x.device.type == "cuda" and not triton_interpreted()
    g = _programs(x.device)
    p = plan(t, n, m, r, g, **(tiles or {}))
    if trace is not None and not (fused and not p["SPLIT"] and trace.dtype == torch.int64
                                  and trace.numel() >= 8 * g and trace.is_contiguous()):
        raise ValueError(f"trace takes a contiguous int64 tensor of at least {8 * g} elements "
                         "and the one-launch GPU path (fused, without split)")
    h, counter = _scratch_for(x.device, p["BT"], p["RP"], g, fused, p["HBUF"])
    y = torch.empty((t, m), device=x.device, dtype=x.dtype)
    args = (x2, v, u, bias if bias is not None else y, h, y, counter,
            trace if trace is not None else counter,
            t, n, m, r, p["N_RB"], p["N_UNITS"], p["N_TILES"], p["TW"], g,
            x2.stride(0), x2.stride(1), v.stride(0), v.stride(1), u.stride(0), u.stride(1),
            y.stride(0), y.stride(1))
    meta = {k: p[k] for k in ("BT", "KC", "BR", "BN", "BK2", "RP", "HBUF", "ZB")}
    meta["TRACE"] = trace is not None
    if fused:
        pdl = {"launch_pdl": True} if p["PDL"] and _pdl_capable(x.device) else {}
        if pdl and p["SPLIT"]:
            # phase 1, then phase 2 as a dependent launch: it reads its U tile while phase 1
            # runs and waits for that kernel instead of a grid barrier; it leaves h zeroed
            _DECODE((g,), *args, HAS_BIAS=bias is not None, PHASE=1, PREFETCH=0,
                    PDL=True, ENDS_CALL=False, **meta, num_warps=p["warps"], **pdl)
            _DECODE((g,), *args, HAS_BIAS=bias is not None, PHASE=2, PREFETCH=p["PREFETCH"],
                    PDL=True, ENDS_CALL=True, **meta, num_warps=p["warps"], **pdl)
        else:
            _DECODE((g,), *args, HAS_BIAS=bias is not None, PHASE=0, PREFETCH=p["PREFETCH"],
                    PDL=bool(pdl), ENDS_CALL=True, **meta, num_warps=p["warps"], **pdl)
    else:
        # two launches: with one h, zeroed here first; with two, as on the fused path (so the
        # interpreter runs the alternation: each call zeroes the previous call's h, the second
        # launch's arrivals count the call)
        hbuf2 = p["HBUF"] == 2
        if not hbuf2:
            h[: p["BT"] * p["RP"]].zero_()
        for phase in (1, 2):
            _DECODE((g,), *args, HAS_BIAS=bias is not None, PHASE=phase,
                    PREFETCH=p["PREFETCH"] if phase == 2 else 0, PDL=False,
                    ENDS_CALL=hbuf2 and phase == 2, **meta, num_warps=p["warps"])
    return y.reshape(*lead, m)
