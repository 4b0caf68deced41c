"""Every change we make inside DeepSpeed, each checked before it is made.

A patch into a library's internals silently stops applying when the library renames what it touches: a speed
loss at best, a wrong resume at worst, and nobody notices. So each patch here names its target, checks that the
target exists and that DeepSpeed still uses it, and says loudly when it does not; the DeepSpeed versions they were
tested against are listed, and any other version is announced once. tests/unit/test_ds_patches.py fails when a
patch no longer takes effect.

The patches:
- `fp32_grad_norms`: DeepSpeed's ZeRO optimizers cast every gradient to fp64 before taking its norm, one
  full-size copy of the gradients per step (~4% of a CPU step). Per-tensor norms accumulated in fp32 (what
  torch's clip_grad_norm_ does) are exact enough to clip by; DeepSpeed still combines and all-reduces them.
- `backward_hooks_where_grad_flows`: ZeRO-3 wraps every submodule's outputs and inputs, on every call, in two
  autograd Functions whose backward fetches and releases that module's parameters. Around a tensor no gradient
  will reach (any call under `torch.no_grad()`, or a tensor that does not require grad) that backward never
  runs, yet each wrap costs a Function call (torch binds its arguments through `inspect.signature`). The gradient
  cache's first pass is nothing but such calls, one per submodule per chunk: ~45% of ZeRO-3's per-call overhead
  there (docs/performance.md). The patch leaves those tensors unwrapped; where a gradient can flow, nothing
  changes.
- `no_shm_comm`: on CPU, the shared-memory all-reduce op is JIT-compiled (~35 s) at every start; gloo alone is
  enough for our CPU runs.
- The universal-checkpoint optimizer repair lives with its caller (recipes/universal.py): it calls the
  version check here, refuses a state file without the layout it repairs, and the resharding tests
  (tests/integration/test_world_size_change.py) fail if it stops repairing.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from types import ModuleType

import torch

log = logging.getLogger("hiclip")

TESTED_DEEPSPEED = ("0.19.8",)

_announced: set[str] = set()


def check_version() -> bool:
    """True for a tested DeepSpeed; otherwise one warning (per process) naming the version and the patches."""
    import deepspeed

    version = deepspeed.__version__
    if version in TESTED_DEEPSPEED:
        return True
    if version not in _announced:
        _announced.add(version)
        log.warning("DeepSpeed %s is untested here (tested: %s): our patches into it (recipes/ds_patches.py: "
                    "fp32_grad_norms, backward_hooks_where_grad_flows, no_shm_comm, the universal-checkpoint "
                    "optimizer repair) and the gradient cache's ZeRO-3 gather (recipes/zero3_gather.py) check their "
                    "targets, but rerun tests/unit/test_ds_patches.py, tests/integration/test_grad_cache.py and the "
                    "resume tests before a long run",
                    version, ", ".join(TESTED_DEEPSPEED))
    return False


def fp32_grad_norms() -> bool:
    """Make DeepSpeed's ZeRO-1/2 and ZeRO-3 optimizers take gradient norms in fp32. True when applied."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    check_version()
    modules = (stage_1_and_2, stage3)
    # The name rebound in each module, and the call through which the optimizers reach it.
    if not all(_has(m, "get_norm_dtype", "fp32_grad_norms") and _refers(m, "get_norm_dtype()", "fp32_grad_norms")
               for m in modules):
        return False
    for module in modules:
        module.get_norm_dtype = _fp32
    return True


def _fp32() -> torch.dtype:
    return torch.float32


def backward_hooks_where_grad_flows() -> bool:
    """Make ZeRO-3 attach its backward-hook Functions only to tensors a gradient can reach. True when applied."""
    from deepspeed.runtime.zero import parameter_offload

    check_version()
    # The name rebound, and the two hooks (pre- and post-backward of a submodule) that reach it through it.
    patch = "backward_hooks_where_grad_flows"
    if not (_has(parameter_offload, "apply_to_tensors_only", patch)
            and all(_refers(parameter_offload, f"apply_to_tensors_only(module.{fn}.apply", patch)
                    for fn in ("pre_bwd_fn", "post_bwd_fn"))):
        return False
    parameter_offload.apply_to_tensors_only = _apply_where_grad_flows
    return True


def _apply_where_grad_flows(function, value, warning_msg_fn=None):
    """DeepSpeed's `apply_to_tensors_only`, skipping tensors whose backward-hook Function could never run."""
    from deepspeed.runtime.zero.utils import apply_to_tensors_only

    if not torch.is_grad_enabled():
        return value

    def where_grad_flows(tensor: torch.Tensor):
        return function(tensor) if tensor.requires_grad else tensor

    return apply_to_tensors_only(where_grad_flows, value, warning_msg_fn)


def no_shm_comm() -> bool:
    """Mark DeepSpeed's shared-memory comm op incompatible so it is never JIT-built. True when applied."""
    import deepspeed

    # By its module path: the package attribute `deepspeed.comm.torch` is torch itself.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    check_version()
    # comm/torch.py builds the op only where this table says it is compatible.
    if not _refers(ds_comm_torch, "deepspeed.ops.__compatible_ops__", "no_shm_comm"):
        return False
    ops = deepspeed.ops.__compatible_ops__
    if "deepspeed_shm_comm" not in ops:
        _not_applied("no_shm_comm", "deepspeed.ops.__compatible_ops__ has no 'deepspeed_shm_comm' entry")
        return False
    ops["deepspeed_shm_comm"] = False
    return True


def _has(module: ModuleType, name: str, patch: str) -> bool:
    if not hasattr(module, name):
        _not_applied(patch, f"{module.__name__}.{name} does not exist")
        return False
    return True


def _refers(module: ModuleType, code: str, patch: str) -> bool:
    """`module`'s source still contains `code`: the place that makes the patch take effect."""
    if code not in inspect.getsource(module):
        _not_applied(patch, f"{module.__name__} no longer contains {code!r}")
        return False
    return True


def _not_applied(patch: str, why: str) -> None:
    import deepspeed

    log.warning("DeepSpeed %s: patch %s NOT applied: %s (recipes/ds_patches.py; tested with DeepSpeed %s)",
                deepspeed.__version__, patch, why, ", ".join(TESTED_DEEPSPEED))
