"""Checkpoints: DeepSpeed's sharded engine state plus our per-rank client state (step, data position, RNG).

Layout of `checkpoint.dir`:

    step_300/                    one complete checkpoint (a "tag")
        zero_pp_rank_*_*.pt      DeepSpeed's shards, one set per rank
        client_rank{r}.pt        rank r's step, data position, RNG streams and the run config
        complete.json            written last: world size, step, every file's size
        universal/               made on demand to resume at another world size (recipes/universal.py)
    step_400.partial/            a save in progress, or one killed half-way: never read, removed later
    latest                       names the newest complete tag; replaced atomically, only after it completed

A save writes into `<tag>.partial`, every rank adds its client file, and only after a barrier does rank 0
record the manifest, rename the folder to `<tag>` and point `latest` at it. A save killed at any point
therefore leaves `latest` and every earlier tag untouched. Loading verifies the manifest and falls back to
the newest complete tag when `latest` is unreadable or names an incomplete one.
"""
from __future__ import annotations

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

from recipes import finite

log = logging.getLogger("hiclip")

MANIFEST = "complete.json"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
# Model fields that may change between a checkpoint and its resume: they shape no tensor in the checkpoint.
MODEL_FIELDS_FREE_ON_RESUME = frozenset({"model.dropout", "model.hier.attn_impl"})
# Fault injection for tests (tests/integration/test_checkpoint_faults.py): "STEP:RANK" SIGKILLs that rank after it
# wrote its shards of that step's save, before the save completed.
KILL_DURING_SAVE_ENV = "HICLIP_TEST_KILL_DURING_SAVE"


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"step_{step}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


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
    engine.save_checkpoint(ckpt_dir, tag=staging, client_state={"step": step}, save_latest=False)
    _atomic_torch_save({**client_state, "step": step, "rng": rng_state()}, root / staging / f"client_rank{rank}.pt")
    _maybe_kill_for_test(step, rank)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        _commit(root, staging, tag, step, dist.get_world_size())
        if keep_last:
            prune(root, keep_last)
    dist.barrier()  # nobody starts the next step (or a load) before `latest` moved
    return tag


def _commit(root: Path, staging: str, tag: str, step: int, world_size: int) -> None:
    folder = root / staging
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    _atomic_write_text(folder / MANIFEST, json.dumps({"step": step, "world_size": world_size, "files": files}))
    final = root / tag
    if final.exists():  # the same step saved again (e.g. a rerun after a crash): the new one replaces it
        shutil.rmtree(final)
    os.replace(folder, final)
    _fsync_dir(root)
    _atomic_write_text(root / LATEST, tag)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete tags (and always the one `latest` names); drop dead partial saves."""
    complete = complete_tags(root)
    keep = set(complete[-keep_last:]) | {_read_latest(root)}
    for tag in complete:
        if tag not in keep:
            shutil.rmtree(root / tag, ignore_errors=True)
    for partial in root.glob(f"step_*{PARTIAL_SUFFIX}"):
        shutil.rmtree(partial, ignore_errors=True)  # only rank 0 prunes, between saves: none is in progress


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


# ---------------------------------------------------------------------------------------------------- find

def manifest(root: Path, tag: str) -> dict | None:
    path = root / tag / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def incomplete_reason(root: Path, tag: str) -> str | None:
    """None when the tag is complete (manifest present, every listed file there at its size), else why not."""
    info = manifest(root, tag)
    if info is None:
        return f"{root / tag} has no readable {MANIFEST} (a save that did not finish)"
    for name, size in info["files"].items():
        path = root / tag / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the save wrote {size}"
    return None


def complete_tags(root: Path) -> list[str]:
    """Complete tags, oldest first."""
    tags = [p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX)]
    tags = [t for t in tags if t.removeprefix("step_").isdigit()]
    return [t for t in sorted(tags, key=step_of) if incomplete_reason(root, t) is None]


def _read_latest(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def resolve_tag(ckpt_dir: str, resume: str) -> str | None:
    """The tag to resume from.

    'latest': the tag `latest` names if it is complete, else the newest complete tag (with a warning); an
    error if there is none. 'auto': the same, but None (start fresh) when the folder holds no checkpoint;
    what a requeued job uses. Anything else is a tag, which must be complete.
    """
    root = Path(ckpt_dir)
    if resume not in ("latest", "auto"):
        if not (root / resume).is_dir():
            raise CheckpointError(f"checkpoint tag {resume!r} not found in {root}")
        reason = incomplete_reason(root, resume)
        if reason:
            raise CheckpointError(f"checkpoint tag {resume!r} is incomplete: {reason}")
        return resume
    named = _read_latest(root)
    if named is not None:
        reason = incomplete_reason(root, named)
        if reason is None:
            return named
        log.warning("'latest' names %s, which is incomplete (%s): falling back", named, reason)
    complete = complete_tags(root)
    if complete:
        if named is not None:
            log.warning("resuming from %s, the newest complete checkpoint in %s", complete[-1], root)
        return complete[-1]
    if resume == "auto":
        return None
    raise CheckpointError(f"checkpoint.resume=latest but {root} holds no checkpoint (no complete tag)")


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
    """Pick the tag and check it fits this run, before the engine exists (a reshard changes the engine's config)."""
    if not resume:
        return None
    tag = resolve_tag(ckpt_dir, resume)
    if tag is None:
        log.info("checkpoint.resume=auto: no checkpoint in %s yet, starting fresh", ckpt_dir)
        return None
    root = Path(ckpt_dir)
    saved = torch.load(root / tag / "client_rank0.pt", weights_only=False, map_location="cpu")
    check_compatible(saved["config"], run_config, where=str(root / tag))
    return ResumePlan(ckpt_dir, tag, saved["step"], manifest(root, tag)["world_size"], world_size)


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
        from recipes.universal import load_universal

        load_universal(engine, plan.ckpt_dir, plan.tag)
        log.warning("resumed %s saved by %d ranks on %d ranks: data positions and RNG streams start afresh",
                    plan.tag, plan.saved_world_size, plan.world_size)
        return {"step": plan.step, "data": None}
    path, _ = engine.load_checkpoint(plan.ckpt_dir, tag=plan.tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {plan.tag!r} from {plan.ckpt_dir}")
    state = torch.load(Path(plan.ckpt_dir, plan.tag, f"client_rank{dist.get_rank()}.pt"), weights_only=False)
    set_rng_state(state["rng"])
    return state
