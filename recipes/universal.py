"""Resume a ZeRO checkpoint on a different number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO shard file holds one rank's flat slice of every parameter group, so it can only be read back by the same
world size. `ds_to_universal` rewrites a tag as one folder per parameter (fp32 weights, Adam moments), which
any world size can partition again. The recipe does this by itself: resuming a tag saved by another world
size converts it once (into `<tag>/universal/`, kept beside the shards) and loads it.

    python -m recipes.universal --checkpoint runs/demo/checkpoints [--tag step_300] [--workers 4]

converts ahead of time (e.g. on a CPU node before a large job starts), so the job itself only loads.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from recipes import ds_patches
from recipes.checkpoint_layout import PARTIAL_SUFFIX, UNIVERSAL_DIR, CheckpointError, resolve_tag

log = logging.getLogger("hiclip")


def enable(ds_config: dict) -> dict:
    """The engine must know before it is built that it will read a universal checkpoint."""
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config


def convert(ckpt_dir: str, tag: str, workers: int = 1) -> Path:
    """Write `<tag>/universal/` (atomically: a killed conversion leaves nothing that looks finished)."""
    tag_dir = Path(ckpt_dir, tag)
    out = tag_dir / UNIVERSAL_DIR
    if (out / "zero" / "optimizer_state.pt").is_file():
        return out
    staging = tag_dir / (UNIVERSAL_DIR + PARTIAL_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    # A child process: the conversion holds whole parameters in memory and forks its own workers, neither of
    # which belongs inside a training rank.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(staging), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2)), "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise CheckpointError(f"universal conversion of {tag_dir} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    os.replace(staging, out)
    log.info("converted %s to a universal checkpoint in %s", tag_dir, out)
    return out


def load_universal(engine, ckpt_dir: str, tag: str) -> None:
    """Collective: rank 0 converts the tag if needed, then every rank loads its new partition of it."""
    if dist.get_rank() == 0:
        convert(ckpt_dir, tag)
    dist.barrier()
    if not engine.load_universal_checkpoint():
        raise CheckpointError("the engine was built without checkpoint.load_universal (call universal.enable)")
    path, _ = engine.load_checkpoint(str(Path(ckpt_dir, tag)), tag=UNIVERSAL_DIR)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint in {Path(ckpt_dir, tag)}")
    _repair_optimizer(engine.optimizer.optimizer, Path(ckpt_dir, tag, UNIVERSAL_DIR))


def _repair_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Undo two slips of DeepSpeed's universal ZeRO-3 load (0.19.8), each of which changes the next steps:
    it copies the first parameter group's hyperparameters into every group (our no-decay group gets weight
    decay), and it hands all parameters one shared `step` tensor, which Adam then advances once per group.
    Harmless where the load got them right; ZeRO-2 saves the groups at the top level of the file."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ds_patches.check_version()  # a repair of DeepSpeed's own load: announced on a version it was not tested with
    path = folder / "zero" / "optimizer_state.pt"
    try:  # tensors, plain containers and the two DeepSpeed classes this file holds: a pickle that would run code is refused
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
            saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable optimizer state ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200]})") from e
    saved = saved.get("optimizer_state_dict", saved)
    if not isinstance(saved, dict) or "param_groups" not in saved:
        raise CheckpointError(f"{path}: no optimizer 'param_groups' where DeepSpeed 0.19.8 writes them; the universal "
                              f"load's repair cannot apply (recipes/universal.py, recipes/ds_patches.py)")
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"{folder}: {len(saved['param_groups'])} optimizer parameter groups saved, "
                              f"{len(optimizer.param_groups)} in this run")
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (holds the tags and 'latest')")
    p.add_argument("--tag", default="latest")
    p.add_argument("--workers", type=int, default=4, help="conversion processes")
    args = p.parse_args(argv)
    try:
        out = convert(args.checkpoint, resolve_tag(args.checkpoint, args.tag, skip_damaged=False), args.workers)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
