import sys
import textwrap

import pytest

from layerzip.testing import compile_ptx

pytest.importorskip("triton")

KERNELS = textwrap.dedent("""
    import triton
    import triton.language as tl

    @triton.jit
    def copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)

    @triton.jit
    def broken(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK, BLOCK), dtype=tl.float32))
""")
SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    (tmp_path / "ptx_kernels.py").write_text(KERNELS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + ":" + ":".join(sys.path))
    return "ptx_kernels"


def test_ptx_shows_what_the_launcher_specializes(kernels):
    # with n a multiple of 16 the masked copy is vectorized; without, it is not
    aligned = compile_ptx(kernels, "copy", SIG, {"BLOCK": 1024},
                          divisible=("x_ptr", "y_ptr", "n"))
    plain = compile_ptx(kernels, "copy", SIG, {"BLOCK": 1024})
    assert ".target sm_90" in aligned
    assert "ld.global.v4" in aligned and "ld.global.v4" not in plain


def test_a_kernel_that_does_not_compile_is_named(kernels):
    with pytest.raises(AssertionError, match="ptx_kernels.broken does not compile for sm_90"):
        compile_ptx(kernels, "broken", {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16})


def test_a_signature_that_misses_a_parameter_is_named(kernels):
    with pytest.raises(AssertionError, match="the kernel takes"):
        compile_ptx(kernels, "copy", {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16})
