"""Siamese methods: MixMask's soft loss against the official formula, λ = 1 reductions, stop-gradients, the MoCo
queue, AMP, the registry, and a few training steps of every method × branch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixmask.batches import MixedBatch
from mixmask.core.backbones import SplitBatchNorm2d
from mixmask.core.losses import byol_regression, info_nce, negative_cosine
from mixmask.core.methods import BRANCH_KINDS, METHODS, RunShape, build_method, build_method_from_params
from mixmask.errors import UserError

HPARAMS = {
    "moco": {"queue_size": 32, "dim": 16, "mlp_hidden_dim": 32},
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16},
    "simsiam": {"proj_dim": 32, "pred_hidden_dim": 8, "proj_layers": 2},
}


def tiny_backbone(width: int = 16) -> tuple[nn.Module, int]:
    """A small BN ConvNet standing in for a ResNet (same contract: images → (B, width))."""
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return net, width


def make_method(name: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    backbone, dim = tiny_backbone()
    return build_method(name, backbone=backbone, feature_dim=dim, **{**HPARAMS[name], **overrides})


def views(batch: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 3, size, size, generator=g)
    return base + 0.3 * torch.randn(base.shape, generator=g), base + 0.3 * torch.randn(base.shape, generator=g)


def cell_keep(images: torch.Tensor, grid: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random keep-mask per sample on a grid×grid board, nearest-upsampled to the images, and its mean λ."""
    b, _, h, w = images.shape
    keep = torch.rand(b, grid, grid, generator=torch.Generator().manual_seed(seed)) < 0.5
    up = keep.repeat_interleave(h // grid, 1).repeat_interleave(w // grid, 2)[:, None]
    return up, keep.float().mean((1, 2))


def mixed_batches(branch: str, view1: torch.Tensor, seed: int) -> list[MixedBatch]:
    """The MixedBatch values each branch feeds, built here by hand (independent of the operator module)."""
    b = view1.shape[0]
    out = []
    for j, kind in enumerate(BRANCH_KINDS[branch]):
        g = torch.Generator().manual_seed(seed + 100 * j)
        if kind == "erase":  # erased cells are zero, identity permutation
            up, lam = cell_keep(view1, 4, seed)
            perm, images = torch.arange(b), view1 * up
        elif kind == "mixmask":  # reverse permutation, as the official code
            up, lam = cell_keep(view1, 4, seed)
            perm = torch.arange(b - 1, -1, -1)
            images = torch.where(up, view1, view1[perm])
        else:  # unmix: global mixup with one λ and a different (random) permutation
            perm = torch.randperm(b, generator=g)
            lam_value = float(torch.rand((), generator=g))
            images, lam = lam_value * view1 + (1 - lam_value) * view1[perm], torch.full((b,), lam_value)
        out.append(MixedBatch(kind, images, lam, perm))
    return out


def test_moco_loss_equals_official_mixmask_loss():
    # One mask for the whole batch and the reverse permutation: the official setting.
    method = make_method("moco", temperature=0.2)
    v1, v2 = views()
    up, lam = cell_keep(v1[:1], 4, seed=3)
    perm = torch.arange(7, -1, -1)
    mixed = torch.where(up, v1, v1[perm])
    queue = method.queue.clone()
    out = method(v1, v2, [MixedBatch("mixmask", mixed, lam.expand(8), perm)])

    with torch.no_grad():  # same encoders, BN in training mode: the same embeddings as inside forward
        q = F.normalize(method.head(method.backbone(v1)), dim=1)
        q_m = F.normalize(method.head(method.backbone(mixed)), dim=1)
        k = F.normalize(method.head_k(method.backbone_k(v2)), dim=1)
    lam_value, labels = lam.item(), torch.zeros(8, dtype=torch.long)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.2
    logits_m = torch.cat([(q_m * k).sum(1, keepdim=True), q_m @ queue.T], 1) / 0.2
    logits_m_flip = torch.cat([(q_m * k.flip(0)).sum(1, keepdim=True), q_m @ queue.T], 1) / 0.2
    loss_o = F.cross_entropy(logits, labels)
    official = loss_o + lam_value * F.cross_entropy(logits_m, labels)
    official = official + (1 - lam_value) * F.cross_entropy(logits_m_flip, labels)
    assert out["loss_orig"].item() == pytest.approx(loss_o.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(official.item(), rel=1e-5)
    assert out["lam_mean_mixmask"].item() == pytest.approx(lam_value)


def _simclr_row_reference(q: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent row of query i (standing in for z1_i): positive z2_i, negatives z1_j and z2_j for j != i."""
    losses = []
    for i in range(q.shape[0]):
        negs = [z[j] for z in (z1, z2) for j in range(q.shape[0]) if j != i]
        logits = torch.stack([q[i] @ z2[i]] + [q[i] @ n for n in negs]) / t
        losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


def _vanilla_loss_of_mixed_query(name: str, method, v1, v2, images, queue, target_perm) -> torch.Tensor:
    """The base method's one-direction loss of the mixed query against the targets of images `target_perm`."""
    with torch.no_grad():
        if name == "moco":
            k = F.normalize(method.head_k(method.backbone_k(v2)), dim=1)
            return info_nce(method.head(method.backbone(images)), k[target_perm], queue, method.temperature).mean()
        if name == "byol":
            return byol_regression(method.predict(images), method.target(v2)[target_perm]).mean()
        if name == "simsiam":
            z2 = method.projector(method.backbone(v2))
            return negative_cosine(method.predictor(method.projector(method.backbone(images))), z2[target_perm]).mean()
        q, z1, z2 = method.embed(images), method.embed(v1), method.embed(v2)
        return _simclr_row_reference(q, z1, z2, method.temperature)


@pytest.mark.parametrize("kind", ["mixmask", "unmix", "erase"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_lambda_one_and_zero_reduce_to_vanilla_loss_of_the_mixed_query(name, kind):
    v1, v2 = views(seed=1)
    (batch,) = mixed_batches(kind if kind != "unmix" else "unmix", v1, seed=4)
    # SimCLR's mixed query drops both images of the mix from its negatives; with π = identity that is NT-Xent.
    perm = torch.arange(8) if name == "simclr" else batch.perm
    for lam_value, target_perm in ((1.0, torch.arange(8)), (0.0, perm)):
        method = make_method(name, seed=2)
        queue = method.queue.clone() if name == "moco" else None
        out = method(v1, v2, [MixedBatch(kind, batch.images, torch.full((8,), lam_value), perm)])
        want = _vanilla_loss_of_mixed_query(name, method, v1, v2, batch.images, queue, target_perm)
        assert out[f"loss_{kind}"].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_gradient_reaches_momentum_encoders_queue_or_stop_gradient_targets(name):
    method = make_method(name)
    v1, v2 = views(seed=5)
    v2 = v2.clone().requires_grad_(True)
    out = method(v1, v2, mixed_batches("mixmask-unmix", v1, seed=6))
    for kind in ("mixmask", "unmix"):
        # The mixed terms see view 2 only through its targets: keys, EMA targets or stop-gradient projections.
        (grad,) = torch.autograd.grad(out[f"loss_{kind}"], v2, retain_graph=True, allow_unused=True)
        if name == "simclr":  # no stop-gradient in SimCLR: the positives are trained too
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None or torch.count_nonzero(grad) == 0
    out["loss"].backward()
    frozen = {"moco": ("backbone_k", "head_k"), "byol": ("backbone_t", "projector_t")}.get(name, ())
    for attr in frozen:
        assert all(p.grad is None and not p.requires_grad for p in getattr(method, attr).parameters())
    if name == "moco":
        assert not method.queue.requires_grad
    if name in ("simsiam", "byol"):  # sanity: the symmetrised original loss does train through view 2
        assert v2.grad is not None and v2.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.backbone.parameters())


def test_moco_queue_enqueues_keys_in_order_and_wraps():
    method = make_method("moco")
    v1, v2 = views(seed=7)
    before = method.queue.clone()
    method(v1, v2)
    with torch.no_grad():
        k = F.normalize(method.head_k(method.backbone_k(v2)), dim=1)
    assert torch.allclose(method.queue[:8], k, atol=1e-6)
    assert torch.equal(method.queue[8:], before[8:])
    assert int(method.queue_ptr) == 8
    for _ in range(3):
        method(v1, v2)
    assert int(method.queue_ptr) == 0


def test_moco_queue_size_must_divide_by_global_batch():
    method = make_method("moco", queue_size=30)
    with pytest.raises(ValueError, match="multiple of the global batch 8"):
        method(*views())


def test_moco_v1_has_a_linear_head():
    assert isinstance(make_method("moco", version=1).head, nn.Linear)
    with pytest.raises(ValueError, match="version"):
        make_method("moco", version=3)


def test_moco_split_bn_makes_both_encoders_split_and_shuffles_keys_across_splits():
    method = make_method("moco", bn_splits=2)
    split = [m for m in method.modules() if isinstance(m, SplitBatchNorm2d)]
    assert len(split) == 4 and all(m.num_splits == 2 for m in split)  # 2 in the query encoder, 2 in the key one
    assert method.backbone.state_dict().keys() == tiny_backbone()[0].state_dict().keys()
    x1, x2 = views(batch=8)
    twin = copy.deepcopy(method)
    torch.manual_seed(5)
    keys = method.encode_key(x2)
    # reference: the single-GPU shuffle of the MoCo CIFAR demo, keys of the permuted batch, then unpermuted
    torch.manual_seed(5)
    perm = torch.randperm(8)
    with torch.no_grad():
        expected = F.normalize(twin.head_k(twin.backbone_k(x2[perm])), dim=1)[torch.argsort(perm)]
        unshuffled = F.normalize(twin.head_k(twin.backbone_k(x2)), dim=1)
    torch.testing.assert_close(keys, expected)
    assert not torch.allclose(keys, unshuffled, atol=1e-4)  # with split BN the order of the batch matters
    out = method(x1, x2)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="exclusive"):
        make_method("moco", bn_splits=2, sync_bn=True)


def test_byol_after_step_moves_target_by_cosine_tau():
    method = make_method("byol", base_tau=0.9)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    online, target = method.backbone[0].weight.clone(), method.backbone_t[0].weight.clone()
    method.after_step(0.5)  # τ = 1 − 0.1·(cos(π/2) + 1)/2 = 0.95
    assert torch.allclose(method.backbone_t[0].weight, 0.95 * target + 0.05 * online, atol=1e-6)
    assert method.tau == pytest.approx(0.95)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_losses_are_fp32_and_close_under_bf16_autocast(name):
    v1, v2 = views(seed=8)
    batches = mixed_batches("mixmask", v1, seed=9)
    method = make_method(name)
    twin = copy.deepcopy(method)
    ref = method(v1, v2, batches)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = twin(v1, v2, batches)
    for key in ("loss_orig", "loss_mixmask", "loss"):
        assert low[key].dtype == torch.float32
        assert low[key].item() == pytest.approx(ref[key].item(), rel=5e-2, abs=3e-2)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_builds_every_method_from_its_settings_whose_defaults_are_the_constructors(name):
    import dataclasses
    import inspect

    cls = METHODS[name]
    params = cls.Params()
    signature = inspect.signature(cls.__init__).parameters
    for f in dataclasses.fields(params):
        if f.name in signature:  # one source of defaults: the settings dataclass
            assert signature[f.name].default == getattr(params, f.name), f"{name}.{f.name}"
    backbone, width = tiny_backbone()
    method = build_method_from_params(name, params, backbone=backbone, feature_dim=width)
    assert type(method) is cls and method.backbone is not None
    reference = build_method(name, backbone=tiny_backbone()[0], feature_dim=width)
    assert {k: v.shape for k, v in method.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    with pytest.raises(TypeError, match="takes"):
        other = next(n for n in METHODS if n != name)
        build_method_from_params(name, METHODS[other].Params(), backbone=backbone, feature_dim=width)


def test_moco_settings_map_onto_its_constructor_and_are_checked():
    from mixmask.core.methods.moco import MoCoParams

    backbone, width = tiny_backbone()
    params = MoCoParams(mlp_head=False, dim=8, queue_size=32, momentum=0.9, temperature=0.3, bn_splits=2)
    method = build_method_from_params("moco", params, backbone=backbone, feature_dim=width)
    assert isinstance(method.head, nn.Linear) and method.head.out_features == 8 and method.queue.shape == (32, 8)
    assert (method.momentum, method.temperature, method.bn_splits, method.shuffle_bn) == (0.9, 0.3, 2, True)
    several = build_method_from_params("moco", params, backbone=tiny_backbone()[0], feature_dim=width,
                                       world_size=2, sync_bn=True)
    assert (several.bn_splits, several.shuffle_bn) == (1, False)  # split BN is for one process; SyncBN: no shuffle
    assert MoCoParams().mlp_head and isinstance(make_method("moco").head, nn.Sequential)
    params.check(RunShape(global_batch=16, prefix="method.moco"))
    with pytest.raises(UserError, match=r"method.moco.queue_size=32 must be a multiple of the global batch 24"):
        params.check(RunShape(global_batch=24, prefix="method.moco"))
    with pytest.raises(UserError, match=r"x.bn_splits=2 must divide the batch per process 3"):
        MoCoParams(queue_size=48, bn_splits=2).check(RunShape(global_batch=3, world_size=1, prefix="x"))
    MoCoParams(queue_size=48, bn_splits=2).check(RunShape(global_batch=6, world_size=2))  # off on 2 processes
    assert MoCoParams(bn_splits=8).derived(2) == {"bn_splits": 1}
    note = MoCoParams(bn_splits=8).launch_note(RunShape(global_batch=16, world_size=2, prefix="method.moco"))
    assert note and note.startswith("method.moco.bn_splits=8 is for one process")


@pytest.mark.parametrize("name", ["simclr", "byol", "simsiam"])
def test_heads_with_batchnorm_need_two_samples_per_process(name):
    params = METHODS[name].Params()
    with pytest.raises(UserError, match="data.batch_size=8 on 8 processes leaves 1 sample per process"):
        params.check(RunShape(global_batch=8, world_size=8))
    params.check(RunShape(global_batch=8, world_size=8, sync_bn=True))  # SyncBN pools the processes
    params.check(RunShape(global_batch=16, world_size=8))
    params.check(RunShape(global_batch=2))  # config time: the processes are not known yet
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what the check stands in for
        method = make_method(name)
        method(*views(batch=1))


def test_registry_and_batch_validation():
    with pytest.raises(UserError, match="did you mean 'moco'.*valid: byol, moco, simclr, simsiam"):
        build_method("mocco", backbone=nn.Identity(), feature_dim=4)
    method = make_method("simsiam")
    v1, v2 = views()
    twice = mixed_batches("mixmask", v1, seed=0) * 2
    with pytest.raises(ValueError, match="distinct kinds"):
        method(v1, v2, twice)
    out = method(v1, v2, mixed_batches("mixmask-unmix", v1, seed=0))
    assert {"loss", "loss_orig", "loss_mixmask", "loss_unmix", "lam_mean_unmix", "lam_std_mixmask"} <= set(out)
    assert out["loss"].item() == pytest.approx((out["loss_orig"] + out["loss_mixmask"] + out["loss_unmix"]).item())


@pytest.mark.parametrize("branch", sorted(BRANCH_KINDS))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_and_branch_trains(name, branch):
    method = make_method(name, seed=10)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(11)
    pool = torch.randn(32, 3, 16, 16, generator=g)  # a small "dataset"; views are noisy copies
    if name == "moco":
        # A fresh queue holds random unit vectors, easy negatives that make the first losses artificially low:
        # fill it with keys of the data first, as it is after the first K / batch steps of a real run.
        with torch.no_grad():
            for chunk in pool.split(8):
                method(chunk, chunk)
    losses, steps = [], 12
    for step in range(steps):
        base = pool[torch.randperm(32, generator=g)[:8]]
        v1 = base + 0.2 * torch.randn(base.shape, generator=g)
        v2 = base + 0.2 * torch.randn(base.shape, generator=g)
        out = method(v1, v2, mixed_batches(branch, v1, seed=step))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.after_step((step + 1) / steps)
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


def test_step_bench_cost_model_and_rows():
    from mixmask.benchmarking.step import forward_equivalents, run_step_bench

    # forward = 1, backward = 2 per trained view; momentum / EMA views cost 1 (DESIGN.md: MixMask ≈ 7, MixMask* ≈ 10).
    assert [forward_equivalents("moco", b) for b in ("vanilla", "mixmask", "mixmask-unmix")] == [4, 7, 10]
    assert [forward_equivalents("byol", b) for b in ("vanilla", "erase")] == [8, 11]
    assert forward_equivalents("simclr", "unmix") == forward_equivalents("simsiam", "mixmask") == 9
    rows = run_step_bench(["moco"], ["vanilla", "mixmask-unmix"], arch="resnet18", cifar_stem=True, resolution=8,
                          batch_size=4, device="cpu", dtype=torch.float32, warmup=0, repeats=1,
                          method_kwargs={"moco": {"queue_size": 8}})  # fmt: skip
    assert [r["name"] for r in rows] == ["moco/vanilla", "moco/mixmask-unmix"]
    # ResNet-18 with the CIFAR stem: ≈ 0.56 GMAC at 32 px, so ≈ 1.1 GFLOP / 16 at 8 px.
    assert rows[0]["backbone_gflops_per_image"] == pytest.approx(1.11 / 16, rel=0.05)
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
