"""What one kernel launch compiles to: the record the kernel modules list and model/kernels/aot.py compiles.

A leaf module, so that the kernel modules and the compiler driver do not import each other.
"""
from __future__ import annotations

from typing import NamedTuple


class KernelSpec(NamedTuple):
    """One compilation: a @triton.jit function, its constexprs, the element type of each pointer argument
    (by name; the others are fp32 or i32 scalars as listed in `floats`) and the launch options."""

    label: str
    fn: object
    constexprs: dict
    pointers: dict  # argument name -> torch dtype it points to
    floats: tuple  # names of fp32 scalar arguments
    num_warps: int
    num_stages: int
