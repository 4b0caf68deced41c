"""Claim: the per-file checksum of a checkpoint (recipes/checkpoint_layout.py) costs a fraction of writing it.

    python bench/checksum.py [--preset vit_b16] [--ranks 1] [--bytes-per-param 16]

Files of the byte count a checkpoint of the preset's CLIP has (fp32 Adam under ZeRO-2: fp32 weights in the model
states, fp32 master weights + two moments in the optimizer states = 16 bytes per parameter, split over --ranks
optimizer files) are written with random content (timed, fsync'd: what a save costs at least), then hashed while
they sit in the page cache (what hashing itself costs) by each candidate digest, one thread, side by side, and by
the chosen one through `file_digests` (a thread per file, as resume verifies). Reported:
    checkpoint_mb      bytes hashed
    write_s            writing + fsync of those bytes
    <hash>_mb_s        one-thread throughput of each candidate
    verify_s           recipes.checkpoint_layout.file_digests over all files (the resume-time check, rank 0)
    save_hash_s        the save-time share of one rank: its files only (ranks hash in parallel)
    verify_over_write  verify_s / write_s
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.clip import CLIP  # noqa: E402
from model.config import PRESETS  # noqa: E402
from recipes.checkpoint_layout import HASH, file_digests  # noqa: E402

CHUNK = 64 * 2**20


def write_file(path: Path, nbytes: int) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(left, CHUNK)
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def throughput(paths: list[Path], algorithm: str) -> float:
    total = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            if algorithm == "crc32":
                crc = 0
                while chunk := f.read(CHUNK):
                    crc = zlib.crc32(chunk, crc)
            else:
                hashlib.file_digest(f, algorithm).hexdigest()
    return total / 2**20 / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b16")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--bytes-per-param", type=int, default=16)
    args = p.parse_args()
    with torch.device("meta"):
        params = sum(t.numel() for t in CLIP(PRESETS[args.preset]).parameters())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = {"mp_rank_00_model_states.pt": 4 * params}
        sizes.update({f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": (args.bytes_per_param - 4) * params // args.ranks
                      for r in range(args.ranks)})
        start = time.perf_counter()
        for name, nbytes in sizes.items():
            write_file(folder / name, nbytes)
        write_s = time.perf_counter() - start
        paths = [folder / n for n in sizes]
        for path in paths:  # warm the page cache once, so every candidate reads from memory
            throughput([path], "crc32")
        rates = {f"{a}_mb_s": round(throughput(paths, a), 1) for a in (HASH, "blake2b", "sha1", "md5", "crc32")}
        start = time.perf_counter()
        file_digests(folder, list(sizes))
        verify_s = time.perf_counter() - start
        one_rank = [n for i, n in enumerate(sizes) if i % args.ranks == 0]
        start = time.perf_counter()
        file_digests(folder, one_rank)
        save_hash_s = time.perf_counter() - start
    result = {"preset": args.preset, "params_m": round(params / 1e6, 1), "ranks": args.ranks, "hash": HASH,
              "checkpoint_mb": round(sum(sizes.values()) / 2**20), "write_s": round(write_s, 2), **rates,
              "verify_s": round(verify_s, 2), "save_hash_s": round(save_hash_s, 2),
              "verify_over_write": round(verify_s / write_s, 3), "cpus": os.cpu_count()}
    for key, value in result.items():
        print(f"{key:>20}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
