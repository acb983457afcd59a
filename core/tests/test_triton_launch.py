"""LaunchCache: the replayed launch gives Triton's own result, and a change in anything Triton
specializes on (alignment, dtype, int class, constexpr, autotune key) takes the slow path once.
On the CPU the kernel runs through the interpreter, where the cache always defers to Triton."""

import pytest
import torch

from layerzip import LaunchCache
from layerzip.bench import graphed
from layerzip.testing import triton_test_device
from layerzip.triton_launch import arg_signature, launch_signature

DEVICE = triton_test_device()
ON_GPU = DEVICE == "cuda"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


# the interpreter cannot time configs: one there, two on a GPU (so the autotuner really chooses)
CONFIGS = [triton.Config({"BLOCK": 32}, num_warps=1)] + \
    ([triton.Config({"BLOCK": 64}, num_warps=2)] if ON_GPU else [])


@triton.autotune(configs=CONFIGS, key=["N"])
@triton.jit(do_not_specialize=["N"])
def _axpb(x_ptr, y_ptr, N, scale, stride, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    v = tl.load(x_ptr + offs * stride, mask=m)
    tl.store(y_ptr + offs, (v * scale + SHIFT).to(y_ptr.dtype.element_ty), mask=m)


def _run(launch, x, stride=1, scale=2.0, shift=3):
    n = (x.numel() + stride - 1) // stride
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    launch(lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x, y, n, scale, stride, SHIFT=shift)
    return y


def _expected(x, stride=1, scale=2.0, shift=3):
    return (x[::stride].double() * scale + shift).to(x.dtype)


def test_arg_signature_keeps_what_triton_specializes_on():
    assert arg_signature(17, False) == arg_signature(33, False)        # same class: one binary
    assert arg_signature(16, False) != arg_signature(17, False)        # divisible by 16
    assert arg_signature(1, False) != arg_signature(17, False)         # == 1 is a constant
    assert arg_signature(2 ** 31, False) != arg_signature(17, False)   # 64-bit
    assert arg_signature(17, True) != arg_signature(33, True)          # constexpr: the value
    a = torch.zeros(8)
    assert arg_signature(a, False) == arg_signature(torch.ones(8), False)
    assert arg_signature(a[1:], False) != arg_signature(a, False)      # 16-byte alignment
    assert arg_signature(a.double(), False) != arg_signature(a, False)
    assert arg_signature("ieee", True) != arg_signature("tf32", True)


def test_launch_signature_separates_alignment_divisibility_constexprs_and_tuning_keys():
    # positions: x (tensor), n (int, the tuning key), off (int), MODE (constexpr)
    const, tuning = [False, False, False, True], [(1, "n")]

    def sig(x, n=1000, off=16, mode="a", **kw):
        return launch_signature((x, n, off, mode), kw, const, tuning)

    buf = torch.zeros(2048)
    base = sig(buf[:1000])
    assert sig(buf[4:1004]) == base                  # 16-byte aligned too: same binary
    assert sig(buf[1:1001]) != base                  # misaligned: a different specialization
    assert sig(buf[:1000].double()) != base
    assert sig(buf[:1000], off=32) == base           # same int class
    for off in (17, 1, 2 ** 40):
        assert sig(buf[:1000], off=off) != base      # not divisible by 16 / == 1 / 64-bit
    assert sig(buf[:1000], mode="b") != base         # a constexpr's value
    assert sig(buf[:1000], n=1001) != base           # the autotuner's key, by value
    assert sig(buf[:1000], PRECISION="tf32") != sig(buf[:1000], PRECISION="ieee")


def test_results_match_and_repeat_launches_take_the_fast_path():
    launch = LaunchCache(_axpb)
    x = torch.randn(1000, device=DEVICE)
    for _ in range(3):
        torch.testing.assert_close(_run(launch, x), _expected(x))
    if ON_GPU:
        assert launch.fast_launches == 2
    else:
        assert not launch.enabled and launch.fast_launches == 0


@pytest.mark.skipif(not ON_GPU, reason="the fast path exists only on a GPU")
def test_every_specialization_change_is_a_new_entry_with_correct_results():
    launch = LaunchCache(_axpb)
    x = torch.randn(4096, device=DEVICE)
    cases = [dict(x=x[:4000]), dict(x=x[1:4001]), dict(x=x, stride=3), dict(x=x, stride=16),
             dict(x=x[:4000].half()), dict(x=x[:4000], shift=-1), dict(x=x[:37]),
             dict(x=x[:1])]
    for case in cases:
        for _ in range(2):
            kw = dict(case)
            torch.testing.assert_close(_run(launch, **kw), _expected(**kw))
    # each case differs from the others in something Triton specializes on or in N, the
    # autotune key (x[:4000] and x[1:4001] only in alignment): one slow first call each, then
    # the replay
    assert len(launch._entries) == len(cases)
    assert launch.fast_launches == len(cases)


@triton.jit
def _scale_plain(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2, mask=m)


def test_launch_options_are_keyed_and_replayed():
    """num_warps is a compile option, not a parameter: each value is its own entry, replayed."""
    launch = LaunchCache(_scale_plain)
    x = torch.randn(500, device=DEVICE)
    for warps in (1, 2, 1, 2):
        y = torch.empty_like(x)
        launch((triton.cdiv(500, 64),), x, y, 500, BLOCK=64, num_warps=warps)
        torch.testing.assert_close(y, x * 2)
    if ON_GPU:
        assert len(launch._entries) == 2 and launch.fast_launches == 2


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_fast_launches_are_captured_by_cuda_graphs():
    launch = LaunchCache(_axpb)
    x = torch.randn(3000, device=DEVICE)
    y = torch.empty_like(x)

    def step():
        launch(lambda meta: (triton.cdiv(3000, meta["BLOCK"]),), x, y, 3000, 2.0, 1, SHIFT=3)

    step()
    replay = graphed(step)
    x.copy_(torch.randn(3000, device=DEVICE))
    y.zero_()
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, _expected(x))
