"""Loss formulas of the Siamese methods and MixMask's λ-weighted soft loss, as pure functions.

Every function casts its inputs to float32 first, so encoders may run in bf16 under autocast while softmax,
normalisation and reductions stay in fp32. Embeddings are L2-normalised inside the functions (idempotent for
inputs that already are, like MoCo's queue).

The soft loss (MixMask, Vishniakov et al. 2022, Eq. 4–5; DESIGN.md): for the embedding z_i of
`mixed_i = M_i ⊙ x_i + (1 − M_i) ⊙ x_π(i)` with λ_i = mean(M_i),
`L_mix = mean_i [ λ_i ℓ(z_i, t_i) + (1 − λ_i) ℓ(z_i, t_π(i)) ]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_mix(loss_own: torch.Tensor, loss_perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """mean_i[λ_i ℓ_own,i + (1 − λ_i) ℓ_perm,i]: the MixMask soft loss from per-sample losses.

    Shape:
        loss_own, loss_perm, lam: (B,) → scalar
    """
    lam = lam.float()
    return (lam * loss_own.float() + (1.0 - lam) * loss_perm.float()).mean()


def info_nce(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query InfoNCE: cross-entropy of the positive among [positive, negatives] at `temperature`.

    MoCo (He et al. 2020, Eq. 1). `neg_mask[i, j]` False drops negative j for query i (SimCLR's in-batch negatives).

    Shape:
        q, k_pos: (B, D); negatives: (M, D); neg_mask: (B, M) bool or None → (B,)
    """
    q = F.normalize(q.float(), dim=-1)
    l_pos = (q * F.normalize(k_pos.float(), dim=-1)).sum(-1, keepdim=True)
    l_neg = _negative_logits(q, negatives, neg_mask)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def info_nce_soft(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    k_pos_perm: torch.Tensor,
    negatives: torch.Tensor,
    lam: torch.Tensor,
    temperature: float,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MixMask's contrastive soft loss: the mixed query has two positives, weighted λ_i and 1 − λ_i, each contrasted
    against the same negatives (the other positive is in neither denominator).

    With one λ per batch and the reverse permutation this is the official `λ·CE(logits_m) + (1−λ)·CE(logits_m_flip)`
    (MixMask code, MoCo builder). The negative logits are computed once and shared by both terms.

    Shape:
        q, k_pos, k_pos_perm: (B, D); negatives: (M, D); lam: (B,); neg_mask: (B, M) bool or None → scalar
    """
    q = F.normalize(q.float(), dim=-1)
    l_own = (q * F.normalize(k_pos.float(), dim=-1)).sum(-1, keepdim=True)
    l_perm = (q * F.normalize(k_pos_perm.float(), dim=-1)).sum(-1, keepdim=True)
    l_neg = _negative_logits(q, negatives, neg_mask) / temperature
    own = torch.cat([l_own / temperature, l_neg], dim=1)
    perm = torch.cat([l_perm / temperature, l_neg], dim=1)
    loss_own = torch.logsumexp(own, dim=1) - own[:, 0]
    loss_perm = torch.logsumexp(perm, dim=1) - perm[:, 0]
    return soft_mix(loss_own, loss_perm, lam)


def _negative_logits(q: torch.Tensor, negatives: torch.Tensor, neg_mask: torch.Tensor | None) -> torch.Tensor:
    """Cosine similarities of normalised queries to every negative, −inf where the mask drops one."""
    l_neg = q @ F.normalize(negatives.float(), dim=-1).T
    if neg_mask is not None:
        l_neg = l_neg.masked_fill(~neg_mask, float("-inf"))
    return l_neg


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    *,
    z1_all: torch.Tensor | None = None,
    z2_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SimCLR's NT-Xent for this process's 2B anchors against the gathered batch (Chen et al. 2020, Eq. 1).

    Anchor z1_i has positive z2_i and as negatives the 2N − 2 other embeddings of both views, N the global batch.
    `z1_all`/`z2_all` are the gathered views (default: the local ones) and `offset` is where this process's
    samples start in them. Averaged over the local anchors, so averaging over processes gives the global loss.

    Shape:
        z1, z2: (B, D); z1_all, z2_all: (N, D) → scalar
    """
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    batch, global_batch = z1.shape[0], z1_all.shape[0]
    candidates = torch.cat([z1_all, z2_all], dim=0)  # (2N, D): view 1 then view 2
    rows = offset + torch.arange(batch, device=z1.device)
    neg_mask = self_pair_mask(rows, rows, global_batch)
    loss1 = info_nce(z1, z2, candidates, temperature, neg_mask)
    loss2 = info_nce(z2, z1, candidates, temperature, neg_mask)
    return torch.cat([loss1, loss2]).mean()


def self_pair_mask(own: torch.Tensor, other: torch.Tensor, global_batch: int) -> torch.Tensor:
    """Negatives mask over the 2N gathered embeddings [view 1; view 2]: False at both views of samples `own[i]`
    and `other[i]`, True elsewhere.

    Used by NT-Xent (own = other: the anchor and its positive are no negatives) and by SimCLR's mixed query (own =
    i, other = π(i): neither image present in the mix is a negative for it).

    Shape:
        own, other: (B,) long global sample indices → (B, 2N) bool
    """
    cols = torch.arange(2 * global_batch, device=own.device) % global_batch  # sample index of each column
    return (cols[None, :] != own[:, None]) & (cols[None, :] != other[:, None])


def byol_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE `‖p̂ − ẑ‖² = 2 − 2·cos(p, z)` per sample (Grill et al. 2020, Eq. 2).

    Shape:
        p, z: (B, D) → (B,)
    """
    return 2.0 - 2.0 * F.cosine_similarity(p.float(), z.float(), dim=-1)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = −cos(p, z) per sample (Chen & He 2021, Eq. 1); the caller detaches z.

    Shape:
        p, z: (B, D) → (B,)
    """
    return -F.cosine_similarity(p.float(), z.float(), dim=-1)
