"""Ahead-of-time compilation of the Triton kernels for real GPU targets, on a machine without a GPU.

`triton.compile` of an `ASTSource` for `GPUTarget("cuda", 80 | 90, 32)` runs the whole NVIDIA pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin) on the CPU. Its metadata gives the shared memory a launch asks for (the limit per
block is checked by the driver at launch: 166,912 B on an A100, 232,448 B on an H100); the `ptxas` inside
Triton's NVIDIA backend, run with `-v` and Triton's own flags, gives registers per thread and spill bytes.

Each kernel module lists what it can launch (`compile_specs()`); tests/unit/test_kernels_aot.py and
`python -m model.kernels.aot` (a table and one JSON line) compile every spec for both targets.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from model.kernels.launch_spec import KernelSpec

SHARED_LIMIT = {80: 166_912, 90: 232_448}  # bytes of shared memory one block may use (A100, H100)
MAX_REGISTERS = 255  # per thread, on both targets

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                 torch.uint8: "u8"}


class Usage(NamedTuple):
    shared: int  # bytes
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes


def signature(spec: KernelSpec) -> tuple[dict, dict]:
    """Triton's signature and attributes. Pointers and int arguments named like strides are marked divisible by
    16, as the launcher specialises them at run time (tensors from the caching allocator are 256-byte aligned)."""
    sig, attrs = {}, {}
    for index, name in enumerate(spec.fn.arg_names):
        if name in spec.constexprs:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = "*" + _TRITON_TYPES[spec.pointers[name]]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in spec.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, attrs


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`, with the flags Triton compiles with."""
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([str(_ptxas()), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                                 str(source), "-o", str(Path(folder) / "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return registers, stores, loads


def compile_for(spec: KernelSpec, capability: int) -> Usage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = signature(spec)
    kernel = triton.compile(ASTSource(spec.fn, sig, constexprs=spec.constexprs, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    return Usage(kernel.metadata.shared, *ptxas_usage(kernel.asm["ptx"], capability))


def all_specs() -> list[KernelSpec]:
    from model.kernels import contrastive_triton, hier_attention_triton
    from model.losses import MASKED_LOGIT

    return [*hier_attention_triton.compile_specs(), *contrastive_triton.compile_specs(MASKED_LOGIT)]


def main(argv=None) -> None:
    """Print shared memory, registers and spills of every spec on sm_80 and sm_90, then one JSON line."""
    import argparse

    parser = argparse.ArgumentParser(description="python -m model.kernels.aot [--skip float16]")
    parser.add_argument("--skip", action="append", default=[], help="leave out specs whose label has this word")
    args = parser.parse_args(argv)
    rows = []
    for spec in (s for s in all_specs() if not set(args.skip) & set(s.label.split())):
        for capability in SHARED_LIMIT:
            usage = compile_for(spec, capability)
            rows.append({"kernel": spec.label, "sm": capability, **usage._asdict()})
            print(f"sm_{capability} {spec.label:70s} shared {usage.shared:7,d} B  regs {usage.registers:3d}  "
                  f"spill {usage.spill_stores:5d}/{usage.spill_loads:5d} B", flush=True)
    summary = {f"sm_{cc}": {"kernels": sum(r["sm"] == cc for r in rows),
                            "max_shared": max(r["shared"] for r in rows if r["sm"] == cc),
                            "max_registers": max(r["registers"] for r in rows if r["sm"] == cc),
                            "max_spill_stores": max(r["spill_stores"] for r in rows if r["sm"] == cc)}
               for cc in SHARED_LIMIT}
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
