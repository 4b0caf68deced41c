"""The layout of a checkpoint folder, spelled once, and how a tag in it is found and verified.

    step_300/                    one complete checkpoint (a "tag")
        zero_pp_rank_*_*.pt      DeepSpeed's shards, one set per rank (pickles: DeepSpeed unpickles them itself)
        client_rank{r}.json      rank r's step, ZeRO stage, data position, RNG streams and the run config
        complete.json            the manifest, written last: step, world size, every file's size and SHA-256
        universal/               made on demand to resume at another world size (recipes/universal.py)
    step_400.partial/            a save in progress, or one killed half-way: never read, removed later
    latest                       names the newest complete tag; replaced atomically, only after it completed

A tag is *complete* when its manifest is readable and every file it lists is there at its size (cheap: what
pruning and listing use), and *intact* when, in addition, every file's content hashes to the recorded digest
(what resume and conversion check before they read a byte of it). Our own files are JSON: reading one can
run no code. DeepSpeed's shards are pickles that DeepSpeed loads with `weights_only=False`; a checkpoint folder
is therefore trusted input, and the digests only guarantee it is the folder the save wrote.

Only files and JSON here (no torch.distributed, no DeepSpeed): recipes/checkpointing.py, recipes/universal.py and
recipes/convert.py all import it, and it imports none of them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("hiclip")

MANIFEST = "complete.json"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
UNIVERSAL_DIR = "universal"
HASH = "sha256"  # SHA-NI makes it the fastest hashlib digest on x86 servers (bench/checksum.py, docs/lifecycle.md)


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def client_state_name(rank: int) -> str:
    return f"client_rank{rank}.json"


# ------------------------------------------------------------------------------------------------ digests

def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def file_digests(folder: Path, names: list[str]) -> dict[str, str]:
    """Digests of folder/name for every name, several files at once (hashlib releases the GIL while it hashes)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: file_digest(folder / name), names)))


def files_in(folder: Path) -> list[str]:
    """Every file of a tag folder the manifest covers, relative, sorted (the same list on every rank)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def manifest_text(folder: Path, step: int, world_size: int, digests: dict[str, str]) -> str:
    files = {name: {"bytes": (folder / name).stat().st_size, HASH: digest} for name, digest in sorted(digests.items())}
    return json.dumps({"step": step, "world_size": world_size, "hash": HASH, "files": files})


# ------------------------------------------------------------------------------------------------ find

def manifest(root: Path, tag: str) -> dict | None:
    path = root / tag / MANIFEST
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("files"), dict) else None


def incomplete_reason(root: Path, tag: str) -> str | None:
    """None when the tag is complete (manifest present, every listed file there at its size), else why not."""
    info = manifest(root, tag)
    if info is None:
        return f"{root / tag} has no readable {MANIFEST} (a save that did not finish)"
    for name, entry in info["files"].items():
        path, size = root / tag / name, entry["bytes"] if isinstance(entry, dict) else entry
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the save wrote {size}"
    return None


def damage_reason(root: Path, tag: str) -> str | None:
    """None when the tag is intact (complete, and every file's content is what the save wrote), else why not."""
    reason = incomplete_reason(root, tag)
    if reason is not None:
        return reason
    files = manifest(root, tag)["files"]
    unverifiable = sorted(name for name, entry in files.items() if not isinstance(entry, dict) or HASH not in entry)
    if unverifiable:
        return f"{root / tag / unverifiable[0]} has no {HASH} in {MANIFEST} (saved by an older hiclip): cannot verify it"
    actual = file_digests(root / tag, sorted(files))
    for name in sorted(files):
        if actual[name] != files[name][HASH]:
            return f"{root / tag / name} is corrupt (its {HASH} differs from the one the save recorded)"
    return None


def complete_tags(root: Path) -> list[str]:
    """Complete tags, oldest first."""
    tags = [p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX)]
    tags = [t for t in tags if t.removeprefix("step_").isdigit()]
    return [t for t in sorted(tags, key=step_of) if incomplete_reason(root, t) is None]


def read_latest(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def resolve_tag(ckpt_dir: str, resume: str, skip_damaged: bool = True) -> str | None:
    """The tag to resume from (or convert), verified intact.

    'latest': the tag `latest` names if it is intact, else the newest intact tag, naming every tag skipped and
    why; an error if there is none. 'auto': the same, but None (start fresh) when the folder holds no checkpoint;
    what a requeued job uses. Anything else is a tag, which must be intact. `skip_damaged=False` (conversion)
    refuses a damaged tag instead of falling back: a model folder should come from the tag that was asked for.
    """
    root = Path(ckpt_dir)
    if resume not in ("latest", "auto"):
        if not (root / resume).is_dir():
            raise CheckpointError(f"checkpoint tag {resume!r} not found in {root}")
        reason = damage_reason(root, resume)
        if reason:
            raise CheckpointError(f"checkpoint tag {resume!r} is {_kind(reason)}: {reason}")
        return resume
    named = read_latest(root)
    complete = complete_tags(root)
    candidates = ([named] if named is not None and (root / named).is_dir() else []) + \
        [t for t in reversed(complete) if t != named]
    skipped = []
    for tag in candidates:
        reason = damage_reason(root, tag)
        if reason is None:
            if skipped:
                log.warning("resuming from %s, the newest intact checkpoint in %s", tag, root)
            return tag
        if not skip_damaged and incomplete_reason(root, tag) is None:
            raise CheckpointError(f"checkpoint {root / tag} is corrupt, not converting it: {reason}")
        log.warning("skipping checkpoint %s: %s", tag, reason)
        skipped.append(f"{tag}: {reason}")
    if not complete and resume == "auto":
        return None
    if skipped:
        raise CheckpointError(f"checkpoint.resume={resume} but no checkpoint in {root} is intact "
                              f"({'; '.join(skipped)})")
    raise CheckpointError(f"checkpoint.resume={resume} but {root} holds no checkpoint (no complete tag)")


def _kind(reason: str) -> str:
    return "corrupt" if "corrupt" in reason or "cannot verify" in reason else "incomplete"


def read_client_state(root: Path, tag: str, rank: int) -> dict:
    """Rank `rank`'s client state of a tag: JSON, so a tampered file is an error, never code that runs."""
    path = root / tag / client_state_name(rank)
    if not path.is_file():
        old = path.with_suffix(".pt")
        why = f" ({old.name} there: saved by an older hiclip as a pickle, which is never loaded)" if old.is_file() else ""
        raise CheckpointError(f"{path} is missing: not a hiclip checkpoint, or an incomplete one{why}")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON client state ({e})") from e
    if not isinstance(state, dict) or not {"step", "config"} <= state.keys():
        raise CheckpointError(f"{path}: not a hiclip client state (no 'step' and 'config')")
    return state
