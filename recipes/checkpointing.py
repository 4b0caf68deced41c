"""Checkpoints: DeepSpeed's sharded engine state plus our per-rank client state (step, data position, RNG).

DeepSpeed writes `client_state` only from rank 0, but every rank has its own data position and RNG streams, so
each rank also writes `<tag>/client_rank{r}.pt`. Tags are `step_{n}`; DeepSpeed's `latest` file names the newest.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


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


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int = 0) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step})
    rank_file = Path(ckpt_dir, tag, f"client_rank{rank}.pt")
    torch.save({**client_state, "step": step, "rng": rng_state()}, rank_file)
    dist.barrier()
    if keep_last and rank == 0:
        _prune(Path(ckpt_dir), keep_last)
    return tag


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in tags[:-keep_last]:
        for f in sorted(old.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        old.rmdir()


def resolve_tag(ckpt_dir: str, resume: str) -> str:
    """'latest' -> the tag DeepSpeed recorded; anything else is taken as a tag. Errors name the folder."""
    root = Path(ckpt_dir)
    if resume == "latest":
        latest = root / "latest"
        if not latest.is_file():
            raise CheckpointError(f"checkpoint.resume=latest but {root} holds no checkpoint (no 'latest' file)")
        resume = latest.read_text().strip()
    if not (root / resume).is_dir():
        raise CheckpointError(f"checkpoint tag {resume!r} not found in {root}")
    return resume


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Collective: restores engine state (weights, optimizer, LR schedule) and returns this rank's client state."""
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir}")
    rank_file = Path(ckpt_dir, tag, f"client_rank{dist.get_rank()}.pt")
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file} is missing: was the checkpoint written with a different world size?")
    state = torch.load(rank_file, weights_only=False)
    set_rng_state(state["rng"])
    return state
