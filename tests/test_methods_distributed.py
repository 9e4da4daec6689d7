"""Two gloo processes give the same losses, gradients and queue as one process on the concatenated batch.

BN is the one thing that legitimately differs (per-rank batch statistics), so the backbone here has no BN and
SimCLR runs with its projector's BN in eval mode; MoCo still goes through shuffle-BN's gather, broadcast
permutation and unshuffle, which must hand every rank back exactly its own keys.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from mixmask.batches import MixedBatch
from mixmask.core import distributed
from mixmask.core.methods import build_method

WORLD, LOCAL_BATCH = 2, 4
HPARAMS = {
    "moco": {"queue_size": 16, "dim": 8, "mlp_hidden_dim": 16},
    "simclr": {"proj_hidden_dim": 16, "proj_dim": 8},
}


def _method(name: str) -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    method = build_method(name, backbone=backbone, feature_dim=8, **HPARAMS[name])
    return method.eval() if name == "simclr" else method


def _global_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the global batch, and a MixMask batch built per rank (local reverse permutation, like the operator)."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    v1, v2 = torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)
    keep = torch.rand(n, 2, 2, generator=g) < 0.5
    up = keep.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    local_perm = torch.arange(LOCAL_BATCH - 1, -1, -1)
    global_perm = torch.cat([r * LOCAL_BATCH + local_perm for r in range(WORLD)])
    mixed = torch.where(up, v1, v1[global_perm])
    return v1, v2, mixed, keep.float().mean((1, 2)), global_perm


def _step(name: str, v1, v2, mixed, lam, perm) -> dict[str, torch.Tensor]:
    method = _method(name)
    out = method(v1, v2, [MixedBatch("mixmask", mixed, lam, perm)])
    out["loss"].backward()
    result = {"loss": out["loss"].detach(), "loss_mixmask": out["loss_mixmask"].detach()}
    result.update({f"grad.{k}": p.grad for k, p in method.named_parameters() if p.grad is not None})
    if name == "moco":
        result["queue"] = method.queue.clone()
    return result


def _worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results: dict[str, torch.Tensor] = {}
    sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)

    x = torch.arange(WORLD * LOCAL_BATCH, dtype=torch.float32)[sl, None] * torch.ones(1, 3)
    shuffled, idx_unshuffle = distributed.batch_shuffle(x)
    results["shuffled"] = distributed.concat_all_gather(shuffled)
    results["roundtrip"] = distributed.batch_unshuffle(shuffled, idx_unshuffle)

    v1, v2, mixed, lam, _ = _global_inputs()
    local_perm = torch.arange(LOCAL_BATCH - 1, -1, -1)
    for name in HPARAMS:
        out = _step(name, v1[sl], v2[sl], mixed[sl], lam[sl], local_perm)
        for key, value in out.items():
            if key.startswith(("grad.", "loss")):  # DDP averages gradients; the global loss is the mean too
                dist.all_reduce(value)
                value /= WORLD
            results[f"{name}.{key}"] = value
    torch.save(results, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    everything = torch.arange(WORLD * LOCAL_BATCH, dtype=torch.float32)
    for rank, res in enumerate(ranks):
        assert sorted(res["shuffled"][:, 0].tolist()) == everything.tolist()  # a permutation of the global batch
        assert torch.equal(res["roundtrip"][:, 0], everything[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH])

    v1, v2, mixed, lam, perm = _global_inputs()
    for name in HPARAMS:
        reference = _step(name, v1, v2, mixed, lam, perm)
        for key, want in reference.items():
            for res in ranks:
                got = res[f"{name}.{key}"]
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (name, key, got, want)
    # The queue got the gathered keys in rank order: the same rows as the single process's concatenated keys.
    assert torch.count_nonzero(ranks[0]["moco.queue"] - ranks[1]["moco.queue"]) == 0


def test_helpers_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and not distributed.is_distributed()
    assert distributed.gather_with_grad(x) is x
    assert torch.equal(distributed.concat_all_gather(x), x)
    shuffled, idx = distributed.batch_shuffle(x)
    assert torch.equal(distributed.batch_unshuffle(shuffled, idx), x)
