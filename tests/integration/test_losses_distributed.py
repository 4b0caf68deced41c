"""Two gloo ranks: the sharded loss sums to the global loss and gives each rank the exact global gradient."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.losses import IMAGE_LEVELS, TEXT_LEVELS, LossConfig, compute_loss

WORLD = 2
LOCAL_BATCH = 24
DIM = 32
CASES = [(impl, alpha) for impl in ("dense", "tiled") for alpha in (0.0, 0.2)]


def _global_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """The same seeded global batch on every process: embeddings per level, masks, and a logit scale."""
    gen = torch.Generator().manual_seed(0)
    total = WORLD * LOCAL_BATCH
    embs = {level: F.normalize(torch.randn(total, DIM, generator=gen, dtype=torch.float64), dim=-1)
            for level in IMAGE_LEVELS + TEXT_LEVELS}
    masks = {level: torch.rand(total, generator=gen) > 0.3 for level in ("region", "summary", "objects")}
    masks["summary"][LOCAL_BATCH:] = False  # rank 1 has no summaries at all: it must still run every collective
    return embs, masks, torch.tensor([12.5], dtype=torch.float64)


def _loss_and_grads(embs, masks, scale, cfg: LossConfig, gather: bool):
    leaves = {level: emb.clone().requires_grad_() for level, emb in embs.items()}
    scale = scale.clone().requires_grad_()
    image = {level: leaves[level] for level in IMAGE_LEVELS}
    text = {level: leaves[level] for level in TEXT_LEVELS}
    loss, _ = compute_loss(cfg, image, text, masks, scale, gather=gather)
    loss.backward()
    return loss.detach(), {level: leaf.grad for level, leaf in leaves.items()}, scale.grad


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        embs, masks, scale = _global_batch()
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local_embs = {level: emb[mine] for level, emb in embs.items()}
        local_masks = {level: mask[mine] for level, mask in masks.items()}
        results = {}
        for impl, alpha in CASES:
            cfg = LossConfig(kind="pyramid", impl=impl, label_smoothing=alpha, tile_size=16)
            results[(impl, alpha)] = _loss_and_grads(local_embs, local_masks, scale, cfg, gather=True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("losses_dist")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("impl,alpha", CASES)
def test_sharded_loss_equals_global_loss(rank_results, impl, alpha):
    embs, masks, scale = _global_batch()
    cfg = LossConfig(kind="pyramid", impl=impl, label_smoothing=alpha, tile_size=16)
    loss, grads, scale_grad = _loss_and_grads(embs, masks, scale, cfg, gather=False)
    per_rank = [results[(impl, alpha)] for results in rank_results]

    torch.testing.assert_close(sum(r[0] for r in per_rank), loss, rtol=1e-12, atol=0)
    # Each rank's partial temperature gradient; their sum is the global one (what world-size scaling of an
    # averaged gradient recovers).
    torch.testing.assert_close(sum(r[2] for r in per_rank), scale_grad, rtol=1e-12, atol=1e-14)
    for rank, (_, rank_grads, _) in enumerate(per_rank):
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for level in IMAGE_LEVELS + TEXT_LEVELS:
            torch.testing.assert_close(rank_grads[level], grads[level][mine], rtol=1e-10, atol=1e-13)
    assert all(grads[level].abs().sum() > 0 for level in IMAGE_LEVELS + TEXT_LEVELS)
