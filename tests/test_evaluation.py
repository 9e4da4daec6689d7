"""Evaluation library: weighted kNN against a brute-force reference, unsharding, checkpoint → backbone loading,
the linear probe and its frozen-backbone check, semi-supervised subsets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixmask.core.backbones import build_backbone
from mixmask.core.schedule import lr_at
from mixmask.errors import UserError
from mixmask.evaluation.features import (
    backbone_state,
    check_labels,
    eval_batch_per_rank,
    find_checkpoint,
    knn_predict,
    knn_scores,
    load_backbone,
    run_dir_of,
    unshard,
)
from mixmask.evaluation.linear_probe import (
    assert_unchanged,
    changed_keys,
    evaluate_logits,
    freeze,
    linear_head,
    train_on_features,
    train_on_images,
)
from mixmask.evaluation.semisup import SubsetDataset, balanced_subset, read_subset_file, subset_loader

# ---- kNN


def brute_force_knn(train: list[list[float]], labels: list[int], test: list[list[float]], k: int, t: float,
                    num_classes: int) -> tuple[list[int], list[list[float]]]:
    """Independent reference: explicit loops, cosine by hand, sort, weighted vote exp(sim / t)."""

    def norm(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    train_n = [norm(v) for v in train]
    preds, all_votes = [], []
    for q in test:
        qn = norm(q)
        sims = [(sum(a * b for a, b in zip(qn, tv)), j) for j, tv in enumerate(train_n)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, j in sims[:k]:
            votes[labels[j]] += math.exp(sim / t)
        all_votes.append(votes)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds, all_votes


@pytest.mark.parametrize("k,t", [(1, 0.1), (5, 0.1), (17, 0.5), (200, 0.07)])
def test_knn_matches_brute_force(k, t):
    g = torch.Generator().manual_seed(k)
    train = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    test = torch.randn(25, 8, generator=g)
    ref_pred, ref_votes = brute_force_knn(train.tolist(), labels.tolist(), test.tolist(), k, t, 4)
    pred = knn_predict(train, labels, test, k=k, temperature=t, num_classes=4)
    assert pred.tolist() == ref_pred
    votes = knn_scores(train, labels, test, k=k, temperature=t, num_classes=4)
    assert torch.allclose(votes.double(), torch.tensor(ref_votes, dtype=torch.float64), rtol=1e-4)


def test_knn_is_invariant_to_chunking_and_feature_scale():
    g = torch.Generator().manual_seed(1)
    train, labels, test = torch.randn(100, 16, generator=g), torch.randint(0, 7, (100,), generator=g), \
        torch.randn(53, 16, generator=g)
    full = knn_scores(train, labels, test, k=10, num_classes=7, chunk_size=1000)
    for chunk in (1, 7, 53):
        assert torch.allclose(knn_scores(train, labels, test, k=10, num_classes=7, chunk_size=chunk), full)
    scaled = knn_predict(train * 3.0, labels, test * 0.2, k=10, num_classes=7)  # normalised inside
    assert torch.equal(scaled, full.argmax(1))


def test_knn_k_larger_than_bank_uses_every_sample():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    ref_pred, ref_votes = brute_force_knn(train.tolist(), labels.tolist(), test.tolist(), 3, 1.0, 2)
    votes = knn_scores(train, labels, test, k=200, temperature=1.0, num_classes=2)
    assert torch.allclose(votes.double(), torch.tensor(ref_votes, dtype=torch.float64), rtol=1e-5)
    # Class 1's two neighbours together outvote class 0's nearer one; with k=1 class 0 would win.
    assert knn_predict(train, labels, test, k=200, temperature=1.0, num_classes=2).tolist() == ref_pred == [1]
    assert knn_predict(train, labels, test, k=1, temperature=1.0, num_classes=2).tolist() == [0]
    assert knn_predict(train, labels, torch.empty(0, 2), num_classes=2).shape == (0,)


def test_unshard_restores_dataset_order_and_drops_padding():
    n, world = 10, 4  # per rank ceil(10/4)=3, padded with positions 0, 1
    order = np.concatenate([np.arange(n), np.arange(2)])
    shards = [order[r::world] for r in range(world)]
    gathered = torch.from_numpy(np.concatenate(shards))
    assert unshard(gathered, world, n).tolist() == list(range(n))
    assert unshard(torch.arange(n), 1, n).tolist() == list(range(n))
    with pytest.raises(RuntimeError, match="expected 12"):  # a layout that is not the padded one: never guess
        unshard(gathered[:11], world, n)
    # Contiguous shares [0, 2), [2, 5), [5, 7), [7, 10), each padded at its end to 3 rows (webdataset shards).
    spans = [(0, 2), (2, 5), (5, 7), (7, 10)]
    padded = torch.cat([torch.tensor([*range(lo, hi)] + [hi - 1] * (3 - (hi - lo))) for lo, hi in spans])
    assert unshard(padded, world, n, "contiguous").tolist() == list(range(n))


def test_eval_batch_per_rank_splits_the_global_batch_and_never_empties_a_rank():
    assert eval_batch_per_rank(256, 8) == 32 and eval_batch_per_rank(100, 3) == 33
    assert eval_batch_per_rank(4, 8) == 1 and eval_batch_per_rank(4, 8, minimum=2) == 2


def test_check_labels():
    check_labels(torch.tensor([0, 4]), 5, "val")
    with pytest.raises(UserError, match="labels up to 5 but 5 classes"):
        check_labels(torch.tensor([0, 5]), 5, "val")


# ---- checkpoint → backbone


def test_load_backbone_roundtrip_and_arch_mismatch():
    torch.manual_seed(0)
    src, _ = build_backbone("resnet18", cifar_stem=True)
    method_state = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    method_state["head.0.weight"] = torch.zeros(2, 2)
    state = backbone_state(method_state)
    assert set(state) == set(src.state_dict())
    loaded, dim = load_backbone(state, "resnet18", cifar_stem=True, source="ckpt")
    assert dim == 512 and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                   src.state_dict().values()))
    with pytest.raises(UserError, match=r"resnet18 \(CIFAR stem\) backbone but method.arch=resnet50"):
        load_backbone(state, "resnet50", cifar_stem=True, source="ckpt")
    with pytest.raises(UserError, match="ImageNet stem"):
        load_backbone(state, "resnet18", cifar_stem=False, source="ckpt")
    partial = {k: v for k, v in state.items() if not k.startswith("layer4")}
    with pytest.raises(UserError, match="a small ResNet"):
        load_backbone(partial, "resnet18", cifar_stem=True, source="ckpt")


def test_find_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="no checkpoints/last.pt"):
        find_checkpoint(tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert find_checkpoint(tmp_path) == last
    assert run_dir_of(last) == tmp_path


# ---- linear probe


def test_linear_lr_schedules():
    def linear_lr(epoch, epochs, base_lr, schedule):  # the probe's schedule: no warm-up (MoCo's main_lincls.py)
        return lr_at(epoch, total_steps=epochs, warmup_steps=0, peak_lr=base_lr, schedule=schedule)

    assert linear_lr(0, 100, 30.0, "step") == 30.0
    assert linear_lr(59.9, 100, 30.0, "step") == 30.0
    assert linear_lr(60, 100, 30.0, "step") == pytest.approx(3.0)
    assert linear_lr(85, 100, 30.0, "step") == pytest.approx(0.3)
    assert linear_lr(50, 100, 30.0, "cosine") == pytest.approx(15.0)
    assert linear_lr(100, 100, 30.0, "cosine") == pytest.approx(0.0, abs=1e-12)


def _separable(n: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(n) % classes
    return centres[y] + 0.5 * torch.randn(n, dim, generator=g), y


def test_linear_probe_on_separable_features_reaches_high_accuracy():
    x, y = _separable(400, 5, 16, seed=0)
    xv, yv = _separable(200, 5, 16, seed=0)  # same centres (same seed), fresh noise below
    xv = xv + 0.3 * torch.randn(xv.shape, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    head = linear_head(16, 5)
    chance = evaluate_logits(head(xv).detach(), yv)["top1"]
    losses = train_on_features(x, y, head, epochs=10, lr=1.0, schedule="step", batch_size=64,
                               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        res = evaluate_logits(head(xv), yv)
    assert res["top1"] >= 95.0 > chance and res["top5"] == 100.0
    assert losses[-1] < losses[0]


def test_frozen_backbone_check_catches_changes():
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    reference = freeze(backbone)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    head = linear_head(512, 3)
    loader = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    train_on_images(backbone, head, loader, epochs=1, lr=0.1, schedule="step", device=torch.device("cpu"))
    assert_unchanged(backbone, reference)  # BN in eval mode: running stats untouched

    backbone.train()  # a protocol bug: BN in train mode updates its running statistics
    backbone(torch.randn(4, 3, 16, 16))
    assert "bn1.running_mean" in changed_keys(backbone, reference)
    with pytest.raises(AssertionError, match="frozen backbone changed"):
        assert_unchanged(backbone, reference)
    backbone.load_state_dict(reference)
    assert_unchanged(backbone, reference)
    with torch.no_grad():
        backbone.layer1[0].conv1.weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(AssertionError, match="layer1.0.conv1.weight"):
        assert_unchanged(backbone, reference)


# ---- semi-supervised subsets


def test_balanced_subset_is_balanced_seeded_and_nonempty_per_class():
    labels = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 100, 100, 100, 100, 7])
    a = balanced_subset(labels, 0.1, seed=3)
    assert np.array_equal(a, balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(a, balanced_subset(labels, 0.1, seed=4))
    counts = np.bincount(labels[a], minlength=10)
    assert counts[:9].tolist() == [10] * 9 and counts[9] == 1  # round(0.7) = 1
    assert len(np.unique(a)) == len(a) and np.all(np.diff(a) > 0)
    tiny = balanced_subset(labels, 0.001, seed=0)
    assert np.bincount(labels[tiny], minlength=10).tolist() == [1] * 10  # at least one per class
    with pytest.raises(UserError):
        balanced_subset(labels, 0.0, seed=0)


def test_read_subset_file_indices_and_names(tmp_path):
    names = [f"/data/train/n01/n01_{i}.JPEG" for i in range(20)]
    f = tmp_path / "1percent.txt"
    f.write_text("# SimCLR split\nn01_3.JPEG\n\n7\nn01_3.JPEG\nn01_12.JPEG  # trailing comment\n")
    assert read_subset_file(f, 20, names).tolist() == [3, 7, 12]
    f.write_text("5\n25\n")
    with pytest.raises(UserError, match="index 25 is out of range"):
        read_subset_file(f, 20, names)
    f.write_text("missing.JPEG\n")
    with pytest.raises(UserError, match="'missing.JPEG' .* is not an image"):
        read_subset_file(f, 20, names)
    with pytest.raises(UserError, match="list image indices instead"):
        read_subset_file(f, 20, [None] * 20)
    with pytest.raises(UserError, match="does not exist"):
        read_subset_file(tmp_path / "none.txt", 20, names)


def test_subset_dataset_and_loader_cover_the_subset():
    from pipelines.sources import open_source

    source = open_source("synthetic", split="train", num_images=40, num_classes=4, resolution=16, seed=0)
    indices = balanced_subset([source.label(i) for i in range(40)], 0.25, seed=0)
    ds = SubsetDataset(source, indices, resolution=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and label == source.label(int(indices[0]))
    seen = []
    for rank in range(2):
        loader = subset_loader(ds, batch_size_per_rank=4, rank=rank, world_size=2, workers=0, seed=0)
        seen += [y for _, ys in loader for y in ys.tolist()]
    assert sorted(seen) == sorted(source.label(int(i)) for i in indices)
