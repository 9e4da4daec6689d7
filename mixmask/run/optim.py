"""Optimizers (SGD, Adam, AdamW, LARS) with biases and norms optionally excluded from weight decay, and setting the
learning rate (the schedule itself, `lr_at`, is config-free and lives in `mixmask.core.schedule`, which the
evaluation protocols share)."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False) -> list[dict]:
    """Two groups: weights, and biases / norm parameters (1-d tensors).

    The second group decays only with `decay_norm_and_bias=True` (the official MixMask, MoCo and Un-Mix code decay
    every parameter: `SGD(model.parameters(), weight_decay=...)`); excluding them is the SimCLR / BYOL habit. It
    always carries `lars_exclude=True`, which LARS reads to skip its trust ratio (as in BYOL / SimCLR).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": weight_decay if decay_norm_and_bias else 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio ‖w‖ / ‖g + wd·w‖ (You et al., 2017), skipped where excluded."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    # torch.where keeps this free of host syncs (no `if norm > 0` on a device value).
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm))
                    grad = grad.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float, momentum: float = 0.9,
                    decay_norm_and_bias: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by `optim.name`, over `param_groups(model)`."""
    groups = param_groups(model, weight_decay, decay_norm_and_bias=decay_norm_and_bias)
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name in ("adam", "adamw"):
        for g in groups:
            g.pop("lars_exclude")
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam, adamw, lars")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
