"""Relaunching a Triton kernel without Triton's per-call Python dispatch.

``kernel[grid](...)`` binds the arguments, computes their specialization, looks up the compiled
binary and, for an autotuned kernel, the chosen config — all in Python, on every call. On a GPU
host that is tens of µs, more than a small layer's kernel takes, so in eager mode a one-launch
kernel loses to torch's three. :class:`LaunchCache` does that work once per *launch signature*
(everything Triton specializes on, plus the autotuner's key) and afterwards calls the compiled
kernel's own launcher with the arguments in order.

The first call of a signature always goes through Triton (autotuning, compiling); so does every
call under Triton's CPU interpreter, and on a Triton older than 3.4 (before 3.3 the launcher
takes different arguments; the replay is verified on the GPU with Triton 3.6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .backends import triton_interpreted

_I32 = (-(2 ** 31), 2 ** 31 - 1)
# keywords of a launch that are compile options, not kernel parameters: keyed by value (the
# first call compiles the variant they ask for, the replay runs that variant)
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl"})


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host code (grids, tile counts). ``triton.cdiv`` is a constexpr function
    since Triton 3.5, and calling one from Python costs µs: too much per launch."""
    return -(-a // b)


@functools.cache
def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _fast_launch_supported() -> bool:
    try:
        import triton
        from triton import knobs  # noqa: F401  (where the launch hooks live)
    except ImportError:
        return False
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 4) and not triton_interpreted() and torch.cuda.is_available()


def _jit_function(kernel):
    """The JITFunction under autotune/heuristics wrappers (each keeps the wrapped one in .fn)."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def arg_signature(value: Any, constexpr: bool) -> Any:
    """What a compiled Triton kernel depends on in one argument, refined: a constexpr's value;
    a tensor's dtype and 16-byte alignment; an int's class (== 1, divisible by 16, 32- or
    64-bit) — Triton specializes ints on exactly these, not on their value. (The device a
    kernel runs on is the current one: :func:`launch_signature` keys on it once.)"""
    if constexpr:
        return ("c", value)
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        return ("i", value == 1, value % 16 == 0, _I32[0] <= value <= _I32[1])
    if value is None:
        return None
    return (type(value), value if isinstance(value, str) else None)


def launch_signature(args: tuple, kwargs: dict, constexpr_at: list[bool],
                     tuning_at: list[tuple[int, str]]) -> tuple:
    """The cache key of one launch: per positional argument what :func:`arg_signature` keeps
    (inlined: this runs on every call), keyword arguments and the autotuner's key arguments
    (``tuning_at``: (position, name)) by value, and the current CUDA device."""
    # exact-type tests first: isinstance(v, torch.Tensor) goes through the tensor metaclass's
    # __instancecheck__ (slow); subclasses (nn.Parameter) still reach arg_signature
    sig = tuple([("c", v) if const else
                 (v.dtype, (v.data_ptr() & 15) == 0) if type(v) is _Tensor else
                 ("i", v == 1, (v & 15) == 0, _I32[0] <= v <= _I32[1]) if type(v) is int else
                 arg_signature(v, False)
                 for v, const in zip(args, constexpr_at)])
    tuning = tuple([args[i] if i < len(args) else kwargs.get(n) for i, n in tuning_at])
    device = torch.cuda.current_device() if _has_cuda() else None
    return sig, tuple(kwargs.items()), tuning, device


_Tensor = torch.Tensor


class LaunchCache:
    """Call ``launch(grid, *args, **kwargs)`` as you would ``kernel[grid](*args, **kwargs)``.

    ``kernel`` is a ``@triton.jit`` function or an ``@triton.autotune`` wrapper of one (configs
    without ``pre_hook``); ``grid`` is a tuple or a callable of the named arguments plus the
    chosen config's meta-parameters, as for Triton. Every parameter of the kernel must be passed
    (defaults are not looked up: such calls always go through Triton); launch options
    (num_warps, num_stages, num_ctas, maxnreg, launch_pdl) are part of the key. Results are
    identical to Triton's own launch: the same compiled binary runs with the same arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.enabled = _fast_launch_supported()
        self.arg_names: list[str] = []
        constexpr: set[str] = set()
        if self.enabled:
            jit = _jit_function(kernel)
            self.arg_names = list(jit.arg_names)
            constexpr = {p.name for p in jit.params if p.is_constexpr}
        self._constexpr_at = [n in constexpr for n in self.arg_names]
        self._tuning_at = [(self.arg_names.index(n), n)
                           for n in (getattr(kernel, "keys", None) or []) if n in self.arg_names]
        self._entries: dict[tuple, tuple | None] = {}
        #: how many launches took the fast path (for tests and benchmarks)
        self.fast_launches = 0

    def signature(self, args: tuple, kwargs: dict) -> tuple:
        return launch_signature(args, kwargs, self._constexpr_at, self._tuning_at)

    def __call__(self, grid: tuple | Callable[[dict], tuple], *args, **kwargs):
        if not self.enabled:
            return self.kernel[grid](*args, **kwargs)
        key = self.signature(args, kwargs)
        entry = self._entries.get(key, False)
        if entry is False or entry is None:  # first of its signature, or not replayable
            compiled = self.kernel[grid](*args, **kwargs)
            if entry is False:
                self._entries[key] = self._entry(compiled, args, kwargs)
            return compiled
        compiled, meta, tail = entry
        if callable(grid):
            g = tuple(grid(dict(zip(self.arg_names, args), **kwargs, **meta))) + (1, 1)
        else:
            g = tuple(grid) + (1, 1)
        params = args + tail if tail else args
        stream = _current_stream(key[-1])
        # what JITFunction.run passes since Triton 3.3: grid, stream, function, metadata, launch
        # metadata and the launch hooks (profilers, looked up per call: one may be added any
        # time), then every parameter, constexprs included
        runtime = _runtime_knobs()
        enter, leave = _hook(runtime.launch_enter_hook), _hook(runtime.launch_exit_hook)
        launch_metadata = compiled.launch_metadata(g[:3], stream, *params) if enter else None
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata,
                     launch_metadata, enter, leave, *params)
        self.fast_launches += 1
        return compiled

    def _entry(self, compiled, args: tuple, kwargs: dict) -> tuple | None:
        """(compiled kernel, the config's meta-parameters, the parameters after the positional
        ones in kernel order) — all fixed for a launch signature, which holds the number of
        positional arguments, the keyword values and the autotuner's key."""
        config = getattr(self.kernel, "best_config", None)
        if config is not None and getattr(config, "pre_hook", None) is not None:
            return None
        meta = dict(config.kwargs) if config is not None else {}
        named = dict(zip(self.arg_names, args), **kwargs)
        if compiled is None or any(n not in named and n not in meta for n in self.arg_names) \
                or any(n not in self.arg_names and n not in LAUNCH_OPTIONS for n in kwargs):
            return None  # defaults to look up, or unknown keywords: leave those to Triton
        compiled._init_handles()
        named.update(meta)
        return compiled, meta, tuple(named[n] for n in self.arg_names[len(args):])


_knobs_runtime = None


def _runtime_knobs():
    global _knobs_runtime
    if _knobs_runtime is None:
        from triton import knobs

        _knobs_runtime = knobs.runtime
    return _knobs_runtime


def _hook(chain):
    """A launch hook, or None for none — Triton ≥ 3.4 keeps them in HookChains, empty unless a
    profiler added one (an empty chain then costs a launch-metadata dict per launch)."""
    return None if chain is None or getattr(chain, "calls", None) == [] else chain


_stream_of = None


def _current_stream(device: int) -> int:
    global _stream_of
    if _stream_of is None:
        from triton.runtime import driver

        _stream_of = driver.active.get_current_stream
    return _stream_of(device)


__all__ = ["LaunchCache", "arg_signature", "cdiv", "launch_signature"]
