"""Checkpoints: DeepSpeed's sharded engine state plus our per-rank client state (step, data position, RNG).

The folder layout, the manifest and how a tag is found and verified are in recipes/checkpoint_layout.py.
A save writes into `<tag>.partial`, every rank adds its client file, and only after a barrier do the ranks hash
the files (each its share) and rank 0 record the manifest, rename the folder to `<tag>` and point `latest` at it.
A save killed at any point therefore leaves `latest` and every earlier tag untouched. Loading verifies the
manifest's digests and falls back to the newest intact tag when `latest` names a damaged or incomplete one.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recipes import finite, universal
from recipes.checkpoint_layout import (LATEST, MANIFEST, PARTIAL_SUFFIX, CheckpointError, client_state_name,
                                       complete_tags, file_digests, files_in, manifest, manifest_text,
                                       read_client_state, read_latest, resolve_tag, tag_for)

log = logging.getLogger("hiclip")

# Model fields that may change between a checkpoint and its resume: they shape no tensor in the checkpoint.
MODEL_FIELDS_FREE_ON_RESUME = frozenset({"model.dropout", "model.hier.attn_impl"})
# Fault injection for tests (tests/integration/test_checkpoint_faults.py): "STEP:RANK" SIGKILLs that rank after it
# wrote its shards of that step's save, before the save completed.
KILL_DURING_SAVE_ENV = "HICLIP_TEST_KILL_DURING_SAVE"


def rng_state() -> dict:
    """Every RNG stream as JSON-able lists (restored exactly by set_rng_state)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------- save

def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int = 0) -> str:
    """Collective: every rank calls it. Returns the tag written, complete and named by `latest`."""
    finite.require_finite(engine, step)  # a non-finite state is never written, let alone promoted to `latest`
    root, tag = Path(ckpt_dir), tag_for(step)
    staging = tag + PARTIAL_SUFFIX
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / staging, ignore_errors=True)  # left by a save that was killed
    dist.barrier()
    try:
        engine.save_checkpoint(ckpt_dir, tag=staging, client_state={"step": step}, save_latest=False)
        state = {**client_state, "step": step, "zero_stage": engine.zero_optimization_stage(), "rng": rng_state()}
        _atomic_write_text(root / staging / client_state_name(rank), json.dumps(state))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(io_failure(f"saving checkpoint {root / staging}", root, e)) from e
    _maybe_kill_for_test(step, rank)
    dist.barrier()  # every rank's files are on disk
    digests = _hash_share(root / staging, rank, dist.get_world_size())
    if rank == 0:
        _commit(root, staging, tag, step, dist.get_world_size(), digests)
        if keep_last:
            prune(root, keep_last)
    dist.barrier()  # nobody starts the next step (or a load) before `latest` moved
    return tag


def _hash_share(folder: Path, rank: int, world_size: int) -> dict[str, str]:
    """Collective: every rank hashes every world_size-th file of the tag; rank 0 gets them all."""
    names = files_in(folder)
    mine = file_digests(folder, names[rank::world_size])
    shares = [None] * world_size
    dist.all_gather_object(shares, mine)
    return {name: digest for share in shares for name, digest in share.items()}


def _commit(root: Path, staging: str, tag: str, step: int, world_size: int,
            digests: dict[str, str] | None = None) -> None:
    folder = root / staging
    digests = digests if digests is not None else file_digests(folder, files_in(folder))
    _atomic_write_text(folder / MANIFEST, manifest_text(folder, step, world_size, digests))
    final = root / tag
    if final.exists():  # the same step saved again (e.g. a rerun after a crash): the new one replaces it
        shutil.rmtree(final)
    os.replace(folder, final)
    _fsync_dir(root)
    _atomic_write_text(root / LATEST, tag)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete tags (and always the one `latest` names); drop dead partial saves."""
    complete = complete_tags(root)
    keep = set(complete[-keep_last:]) | {read_latest(root)}
    for tag in complete:
        if tag not in keep:
            shutil.rmtree(root / tag, ignore_errors=True)
    for partial in root.glob(f"step_*{PARTIAL_SUFFIX}"):
        shutil.rmtree(partial, ignore_errors=True)  # only rank 0 prunes, between saves: none is in progress


def io_failure(action: str, where: Path, error: BaseException) -> str:
    """One line for a failed save or load: what, where, and the cause (a full disk named as such: torch's
    writer reports it as "unexpected pos ...")."""
    chain, e = [], error
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) for e in chain)
    if not full and "unexpected pos" in str(error):
        try:
            full = shutil.disk_usage(where if where.exists() else where.parent).free < 2**30
        except OSError:
            pass
    if full:
        return f"{action} failed: no space left on device"
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{action} failed: {type(error).__name__}: {first}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _maybe_kill_for_test(step: int, rank: int) -> None:
    spec = os.environ.get(KILL_DURING_SAVE_ENV)
    if spec and spec == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- load

@dataclass
class ResumePlan:
    ckpt_dir: str
    tag: str
    step: int
    saved_world_size: int
    world_size: int

    @property
    def reshard(self) -> bool:
        """A different world size: DeepSpeed's per-rank shards cannot be read as they are (recipes/universal.py)."""
        return self.saved_world_size != self.world_size


def plan_resume(ckpt_dir: str, resume: str, run_config: dict, world_size: int) -> ResumePlan | None:
    """Pick the tag and check it fits this run, before the engine exists (a reshard changes the engine's config).
    Collective when a process group exists: rank 0 verifies the candidates' digests, every rank gets its choice."""
    if not resume:
        return None
    tag = _on_rank0(lambda: resolve_tag(ckpt_dir, resume))
    if tag is None:
        log.info("checkpoint.resume=auto: no checkpoint in %s yet, starting fresh", ckpt_dir)
        return None
    root = Path(ckpt_dir)
    saved = read_client_state(root, tag, 0)
    check_compatible(saved["config"], run_config, where=str(root / tag))
    return ResumePlan(ckpt_dir, tag, saved["step"], manifest(root, tag)["world_size"], world_size)


def _on_rank0(fn):
    """fn() on rank 0 only, its result (or its CheckpointError, re-raised) on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except CheckpointError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def check_compatible(saved: dict, current: dict, where: str) -> None:
    """Refuse a checkpoint whose model differs from this run's, naming the first fields that differ."""
    old, new = _flatten(saved.get("model", {}), "model"), _flatten(current.get("model", {}), "model")
    differ = [k for k in sorted(old.keys() | new.keys())
              if k not in MODEL_FIELDS_FREE_ON_RESUME and old.get(k, "<absent>") != new.get(k, "<absent>")]
    if differ:
        details = "; ".join(f"{k}={old.get(k, '<absent>')!r} in the checkpoint, {new.get(k, '<absent>')!r} here"
                            for k in differ[:5])
        raise CheckpointError(f"checkpoint {where} was trained with a different model config: {details}")


def _flatten(tree: dict, prefix: str) -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: _comparable(value)})
    return flat


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value  # a YAML list and a tuple default are the same


def load(engine, plan: ResumePlan) -> dict:
    """Collective: restores engine state (weights, optimizer, LR schedule) and returns this rank's client state.

    At the saved world size the client state is this rank's own file (data position, RNG). After a reshard
    there is no per-rank state to carry over: `data` is None and the caller restarts its stream.
    """
    if plan.reshard:
        universal.load_universal(engine, plan.ckpt_dir, plan.tag)
        log.warning("resumed %s saved by %d ranks on %d ranks: data positions and RNG streams start afresh",
                    plan.tag, plan.saved_world_size, plan.world_size)
        return {"step": plan.step, "data": None}
    folder = Path(plan.ckpt_dir, plan.tag)
    state = read_client_state(Path(plan.ckpt_dir), plan.tag, dist.get_rank())
    if state.get("zero_stage") != engine.zero_optimization_stage():
        raise CheckpointError(f"checkpoint {folder} was saved with ZeRO stage {state.get('zero_stage')}, this run "
                              f"uses stage {engine.zero_optimization_stage()}: resume with the same train.ds_config")
    try:
        path, _ = engine.load_checkpoint(plan.ckpt_dir, tag=plan.tag)
    except Exception as e:  # DeepSpeed's own failures (torch.load, shapes, versions): one line naming the folder
        raise CheckpointError(io_failure(f"loading checkpoint {folder}", folder, e)) from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {plan.tag!r} from {plan.ckpt_dir}")
    set_rng_state(state["rng"])
    return state
