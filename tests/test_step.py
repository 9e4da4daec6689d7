"""One training step: train.py, `bench.py step` and `bench.py e2e` run `mixmask.run.step.train_step` on a model from
`prepare_model`, so a benchmark times what trains (compile, autocast, channels_last included)."""

from __future__ import annotations

import pytest
import torch

from mixmask.core.backbones import build_backbone
from mixmask.core.methods import build_method
from mixmask.core.operator import MixingOperator
from mixmask.run import checkpoint as ckpt_io
from mixmask.run import step


def tiny_moco() -> torch.nn.Module:
    backbone, feature_dim = build_backbone("resnet18", cifar_stem=True)
    return build_method("moco", backbone=backbone, feature_dim=feature_dim, queue_size=8, dim=16)


def test_train_py_and_both_bench_modes_call_the_one_train_step():
    import bench
    import train
    from mixmask.benchmarking import step as bench_step

    for module in (train, bench, bench_step):
        assert module.train_step is step.train_step, module.__name__
        assert module.prepare_model is step.prepare_model, module.__name__


@pytest.mark.parametrize(("precision", "device", "expected"), [
    ("auto", "cpu", None), ("auto", "cuda", torch.bfloat16), ("bf16", "cpu", torch.bfloat16),
    ("bf16", "cuda", torch.bfloat16), ("fp32", "cpu", None), ("fp32", "cuda", None)])
def test_autocast_dtype_is_bf16_when_asked_or_auto_on_cuda(precision, device, expected):
    assert step.autocast_dtype(precision, torch.device(device)) == expected


def test_autocast_dtype_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="fp16"):
        step.autocast_dtype("fp16", torch.device("cpu"))


def test_train_step_updates_the_method_and_returns_finite_detached_terms():
    torch.manual_seed(0)
    model = step.prepare_model(tiny_moco(), torch.device("cpu"), channels_last=True)
    assert model.module is model.method  # eager, one process: nothing wraps the method
    optimizer = torch.optim.SGD(model.method.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    view1, view2 = (torch.randn(4, 3, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
                    for _ in range(2))
    mixed = MixingOperator("mixmask", grid_size=4, mask_kind="discrete")(view1, gen)
    before = {k: v.clone() for k, v in model.method.state_dict().items()}

    terms = step.train_step(model, optimizer, view1, view2, mixed, autocast=None, progress=0.5)

    assert {"loss", "loss_orig", "loss_mixmask"} <= terms.keys()
    assert all(not t.requires_grad and t.grad_fn is None for t in terms.values())
    assert all(torch.isfinite(t).all() for t in terms.values())
    assert terms["loss"] == pytest.approx(float(terms["loss_orig"] + terms["loss_mixmask"]), rel=1e-5)
    after = model.method.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "backbone.conv1.weight" in changed  # the optimizer stepped
    assert "backbone_k.conv1.weight" in changed  # MoCo's momentum encoder follows


def test_train_step_passes_the_progress_to_after_step():
    from mixmask.core.methods.byol import cosine_tau

    backbone, feature_dim = build_backbone("resnet18", cifar_stem=True)
    byol = build_method("byol", backbone=backbone, feature_dim=feature_dim, proj_hidden_dim=32, proj_dim=16,
                        pred_hidden_dim=32, base_tau=0.99)
    model = step.prepare_model(byol, torch.device("cpu"), channels_last=False)
    optimizer = torch.optim.SGD(byol.parameters(), lr=0.1)
    views = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    step.train_step(model, optimizer, views[0], views[1], [], autocast=None, progress=0.25)
    assert byol.tau == pytest.approx(cosine_tau(0.99, 0.25))  # BYOL's target decay follows the schedule


def test_prepare_model_compiles_and_keeps_the_plain_module_for_checkpoints():
    model = step.prepare_model(tiny_moco(), torch.device("cpu"), channels_last=True, compile_backend="eager")
    assert isinstance(model.module, torch._dynamo.eval_frame.OptimizedModule)
    assert model.module._orig_mod is model.method
    assert not any(k.startswith("_orig_mod.") for k in model.method.state_dict())
    conv = model.method.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_checkpoints_hold_no_scaler_and_old_ones_with_one_still_resume(tmp_path):
    method = tiny_moco()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    saver = ckpt_io.Checkpointer(tmp_path, method=method, optimizer=optimizer, mask_generator=None, loader=None,
                                 config={"method": {}}, computed={}, keep=1)
    last = saver.save(2, 12, 0, periodic=True)
    state = torch.load(last, weights_only=False)
    assert "scaler" not in state and (tmp_path / "epoch_0002.pt").is_file()
    ckpt_io.save_atomic({**state, "scaler": None}, tmp_path / "old.pt")  # as checkpoints written before
    position = ckpt_io.resume_from(tmp_path / "old.pt", method=tiny_moco(), optimizer=optimizer,
                                   mask_generator=None, rank=0)
    assert position == (2, 12, 0, None)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba's finalizer at ffcv teardown
def test_bench_e2e_compiles_when_the_config_says_run_compile(repo_root):
    """The e2e mode follows run.compile as train.py does (it used to ignore it): dynamo compiles the method.

    The `eager` backend traces with dynamo without inductor's code generation, to keep the test short on a CPU;
    `bench.py e2e` without run.compile (no graphs) is test_bench.py's e2e test.
    """
    from torch._dynamo.utils import counters

    import bench

    args = bench.build_parser().parse_args([
        "e2e", "--steps", "1", "--warmup", "0", "--repeats", "1", "--compile-backend", "eager",
        "--preset", "demo", "data.synthetic_images=64", "data.resolution=16", "data.batch_size=16",
        "data.workers=1", "method.moco.queue_size=64", f"data.data_dir={repo_root / 'data' / 'test-cache'}",
        "run.compile=true"])
    torch._dynamo.reset()
    counters.clear()
    rows, _ = bench.run_e2e(args, torch.device("cpu"))
    assert counters["stats"]["unique_graphs"] > 0
    assert rows[0]["compiled"] is True and rows[0]["images_per_s"] > 0
