"""Compile a Triton kernel for a GPU on a machine without one, to check what the interpreter
cannot: that the kernel compiles at all (typing of branches, layouts), and properties of the
code (vector widths, cache operators, no local-memory spills) read off its PTX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# runs in a fresh interpreter: under TRITON_INTERPRET=1 (as the tests run) @triton.jit
# yields interpreter objects that the compiler cannot take
_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    spec = json.loads(sys.argv[1])
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    while not isinstance(fn, JITFunction):  # an autotuned kernel: the jit function under it
        fn = fn.fn
    names = fn.arg_names
    if sorted(names) != sorted(spec["signature"]):
        sys.exit(f"signature names {sorted(spec['signature'])}, the kernel takes {names}")
    signature = {n: spec["signature"][n] for n in names}  # in the kernel's order
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec["divisible"]}
    src = ASTSource(fn=fn, signature=signature, constexprs=spec["constexprs"],
                    attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", spec["capability"], 32),
                       options={"num_warps": spec["num_warps"]})
    sys.stdout.write(k.asm["ptx"])
""")


def compile_ptx(module: str, kernel: str, signature: dict[str, str], constexprs: dict,
                *, num_warps: int = 4, divisible: tuple[str, ...] = (),
                capability: int = 90) -> str:
    """PTX of ``module.kernel`` compiled for compute capability ``capability`` (no GPU needed;
    Triton's own ptxas assembles it). ``signature`` maps every parameter (in any order) to its
    Triton type ("*bf16", "i32", … or "constexpr"), ``constexprs`` gives the constexpr
    values, and ``divisible`` names the parameters to treat as multiples of 16 (pointers and
    sizes, as Triton's launcher specializes them). Raises AssertionError with the compiler's message
    when the kernel does not compile."""
    spec = {"module": module, "kernel": kernel, "signature": signature,
            "constexprs": constexprs, "num_warps": num_warps, "divisible": list(divisible),
            "capability": capability}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise AssertionError(f"{module}.{kernel} does not compile for sm_{capability}:\n"
                             + done.stderr[-3000:])
    return done.stdout
