"""Loss formulas against references written here with explicit loops, and their fp32 behaviour under autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixmask.core.losses import (
    byol_regression,
    info_nce,
    info_nce_soft,
    negative_cosine,
    nt_xent,
    self_pair_mask,
    soft_mix,
)
from mixmask.core.methods.byol import cosine_tau


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _ce_first(logits: list[float]) -> float:
    """-log softmax(logits)[0] in float64 python."""
    top = max(logits)
    return -(logits[0] - top - math.log(sum(math.exp(x - top) for x in logits)))


def _rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_info_nce_matches_loop_reference_with_mask():
    q, k, negs = _rand(5, 7, seed=1), _rand(5, 7, seed=2), _rand(9, 7, seed=3)
    mask = _rand(5, 9, seed=4) > -0.5
    got = info_nce(q, k, negs, 0.2, mask)
    for i in range(5):
        qi = _unit(q[i].tolist())
        logits = [_dot(qi, _unit(k[i].tolist())) / 0.2]
        logits += [_dot(qi, _unit(negs[j].tolist())) / 0.2 for j in range(9) if mask[i, j]]
        assert got[i].item() == pytest.approx(_ce_first(logits), rel=1e-5)


def test_info_nce_soft_equals_official_mixmask_formula():
    # Official MixMask (MoCo fork): loss = λ·CE(logits_m) + (1−λ)·CE(logits_m_flip), one λ, k_flip = k.flip(0).
    q_m, k = F.normalize(_rand(6, 8, seed=5), dim=1), F.normalize(_rand(6, 8, seed=6), dim=1)
    queue = F.normalize(_rand(8, 16, seed=7), dim=0)  # official layout (dim, K)
    lam, t = 0.3, 0.1
    l_neg = torch.einsum("nc,ck->nk", q_m, queue)
    logits_m = torch.cat([torch.einsum("nc,nc->n", q_m, k)[:, None], l_neg], 1) / t
    logits_m_flip = torch.cat([torch.einsum("nc,nc->n", q_m, k.flip(0))[:, None], l_neg], 1) / t
    labels = torch.zeros(6, dtype=torch.long)
    official = lam * F.cross_entropy(logits_m, labels) + (1 - lam) * F.cross_entropy(logits_m_flip, labels)
    perm = torch.arange(5, -1, -1)
    got = info_nce_soft(q_m, k, k[perm], queue.T, torch.full((6,), lam), t)
    assert got.item() == pytest.approx(official.item(), rel=1e-5)


def test_info_nce_soft_per_sample_lambda_matches_loop():
    q, k, negs = _rand(4, 5, seed=8), _rand(4, 5, seed=9), _rand(6, 5, seed=10)
    lam = torch.tensor([0.0, 0.25, 0.5, 1.0])
    perm = torch.tensor([2, 3, 0, 1])
    got = info_nce_soft(q, k, k[perm], negs, lam, 0.5)
    total = 0.0
    for i in range(4):
        qi = _unit(q[i].tolist())
        neg = [_dot(qi, _unit(n.tolist())) / 0.5 for n in negs]
        own = _ce_first([_dot(qi, _unit(k[i].tolist())) / 0.5] + neg)
        other = _ce_first([_dot(qi, _unit(k[int(perm[i])].tolist())) / 0.5] + neg)
        total += lam[i].item() * own + (1 - lam[i].item()) * other
    assert got.item() == pytest.approx(total / 4, rel=1e-5)


def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR Eq. 1 over the 2N anchors [z1; z2], each positive its other view, denominators over all k != anchor."""
    z = [_unit(v) for v in torch.cat([z1, z2]).tolist()]
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        others = [_dot(z[a], z[j]) / t for j in range(2 * n) if j not in (a, pos)]
        total += _ce_first([_dot(z[a], z[pos]) / t] + others)
    return total / (2 * n)


def test_nt_xent_matches_loop_reference():
    z1, z2 = _rand(5, 6, seed=11), _rand(5, 6, seed=12)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(_nt_xent_loop(z1, z2, 0.5), rel=1e-5)


def test_nt_xent_local_slices_average_to_global_loss():
    # What each rank computes from the gathered batch: its own anchors, `offset` into the gathered views.
    z1, z2 = _rand(8, 6, seed=13), _rand(8, 6, seed=14)
    halves = [nt_xent(z1[s : s + 4], z2[s : s + 4], 0.3, z1_all=z1, z2_all=z2, offset=s) for s in (0, 4)]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(nt_xent(z1, z2, 0.3).item(), rel=1e-6)


def test_self_pair_mask_drops_both_views_of_both_samples():
    own, other = torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])
    mask = self_pair_mask(own, other, 3)
    for i in range(3):
        for j in range(6):
            assert bool(mask[i, j]) == (j % 3 not in (int(own[i]), int(other[i])))


def test_regressions_match_definitions():
    p, z = _rand(4, 5, seed=15), _rand(4, 5, seed=16)
    for i in range(4):
        pi, zi = _unit(p[i].tolist()), _unit(z[i].tolist())
        mse = sum((a - b) ** 2 for a, b in zip(pi, zi))
        assert byol_regression(p, z)[i].item() == pytest.approx(mse, rel=1e-5)
        assert negative_cosine(p, z)[i].item() == pytest.approx(-_dot(pi, zi), rel=1e-5)


def test_soft_mix_weights():
    own, other, lam = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0]), torch.tensor([0.25, 1.0])
    assert soft_mix(own, other, lam).item() == pytest.approx((0.25 * 1 + 0.75 * 3 + 2.0) / 2)


def test_cosine_tau_schedule():
    assert cosine_tau(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_tau(0.99, 1.0) == pytest.approx(1.0)
    assert cosine_tau(0.996, 0.5) == pytest.approx(1 - 0.004 / 2)
    assert cosine_tau(0.9, 0.25) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


@pytest.mark.parametrize(
    "fn",
    [
        lambda a, b, c, lam: info_nce_soft(a, b, c, c, lam, 0.2),
        lambda a, b, c, lam: nt_xent(a, b, 0.2),
        lambda a, b, c, lam: soft_mix(byol_regression(a, b), byol_regression(a, c), lam),
        lambda a, b, c, lam: soft_mix(negative_cosine(a, b), negative_cosine(a, c), lam),
    ],
    ids=["info_nce_soft", "nt_xent", "byol", "simsiam"],
)
def test_losses_are_fp32_from_bf16_inputs_under_autocast(fn):
    a, b, c = _rand(16, 32, seed=17), _rand(16, 32, seed=18), _rand(16, 32, seed=19)
    lam = torch.rand(16, generator=torch.Generator().manual_seed(20))
    ref = fn(a, b, c, lam)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fn(a.bfloat16(), b.bfloat16(), c.bfloat16(), lam)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("batch, kind, grid", [(8, "discrete", 2), (9, "block", 5), (8, "discrete", 3)])
def test_operator_with_one_mask_per_batch_gives_the_official_mixmask_loss(batch, kind, grid):
    # mask.share=batch, MixMask alone: the operator's images, λ and partners in our soft loss must give the official
    # `loss_o + λ·loss_m + (1−λ)·loss_m_flip` (λ = mask.sum() / (H·W) of the upsampled mask, keys flipped),
    # also with an odd batch and grids that do not divide the 32 px images.
    from mixmask.core.operator import MixingOperator

    size, t = 32, 0.2
    x, x_k = _rand(batch, 3, size, size, seed=21), _rand(batch, 3, size, size, seed=22)
    op = MixingOperator("mixmask", mask_kind=kind, grid_size=grid, mask_ratio=0.5, share="batch")
    (mixed,) = op(x, torch.Generator().manual_seed(23))
    mask = (mixed.images[0] == x[0]).all(0).double()  # the one mask, read off the first mixed image
    assert torch.equal(mixed.images.double(), mask * x.double() + (1 - mask) * x.flip(0).double())

    weights = _rand(3 * size * size, 16, seed=24)
    def encode(images):
        return F.normalize(images.flatten(1) @ weights, dim=1)

    q, q_m, k = encode(x), encode(mixed.images), encode(x_k)
    queue = F.normalize(_rand(16, 32, seed=25), dim=0)  # official layout (dim, K)
    labels = torch.zeros(batch, dtype=torch.long)

    def logits(query, key):
        return torch.cat([(query * key).sum(1, keepdim=True), query @ queue], 1) / t

    lam = mask.sum() / (size * size)
    loss_o = F.cross_entropy(logits(q, k), labels)
    official = loss_o + lam * F.cross_entropy(logits(q_m, k), labels)
    official = official + (1 - lam) * F.cross_entropy(logits(q_m, k.flip(0)), labels)
    ours = info_nce(q, k, queue.T, t).mean() + info_nce_soft(q_m, k, k[mixed.perm], queue.T, mixed.lam, t)
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)
