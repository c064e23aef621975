"""End-to-end training (train/end_to_end.py, pipeline.py, distributed.py) on tiny real runs:
the towers learn, torchrun's two gloo processes reproduce one process, resume continues
the same curve, the image pipeline is deterministic per image."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import UCM_JSON, needs_shared
from rsviewer.archs.registry import create_model
from rsviewer.checkpoint import load_model, read_config
from rsviewer.errors import RsviewerError
from rsviewer.train.distributed import DistInfo, GlobalBatches
from rsviewer.train.pipeline import ImageStore, augment, parse_augment, sample_rng
from rsviewer.train.trainer import TrainConfig, train

LITE = {"hidden": 64, "embed_dim": 32, "image_size": 64}
E2E = dict(batch_size=8, max_train_images=16, max_val_images=8, lr=1e-3, end_to_end=True, ema=0.0)


def _tower_tensors(model) -> dict[str, torch.Tensor]:
    """One tensor from each pretrained tower the model has."""
    out = {}
    if "backbone" in model.bases:
        out["backbone"] = next(p for n, p in model.backbone.named_parameters() if p.ndim == 4).detach().clone()
    if "text" in model.bases:
        out["text"] = model.text.bert.embeddings.word_embeddings.weight.detach().clone()
    return out


@needs_shared()
def test_end_to_end_trains_the_towers_saves_them_and_reloads(tmp_path):
    out = tmp_path / "m"
    res = train("lite", UCM_JSON, out, config=TrainConfig(**E2E, epochs=3, accum=2), model_config=LITE,
                log=lambda m: None)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert all(h["images_per_second"] > 0 for h in res.history)
    fresh = _tower_tensors(create_model("lite", **LITE))
    trained = load_model(out)
    for name, t in _tower_tensors(trained).items():
        assert not torch.allclose(t, fresh[name]), f"the {name} tower did not learn"
    cfg = read_config(out)
    assert {"backbone.", "text."} <= set(cfg["finetuned"])
    # a feature cache keyed on the packaged weights' sha256 would now be wrong: the key follows the tuned towers
    fresh_model = create_model("lite", **LITE)
    for side in ("image", "text"):
        assert trained.feature_signature(side)["bases"] != fresh_model.feature_signature(side)["bases"]
    met = json.loads((out / "metrics.json").read_text())
    assert met["trained"] == "end to end" and met["train_config"]["accum"] == 2 and met["processes"] == 1
    # the saved towers are the ones the model was validated with: the val figure reproduces
    from rsviewer.train.end_to_end import EndToEndRunner
    from rsviewer.train.trainer import _Split, load_splits
    from rsviewer.data import load_dataset

    full = load_dataset(UCM_JSON)
    cfg_t = TrainConfig(**E2E, epochs=3)
    tr_ds, va_ds = load_splits(full, cfg_t)
    labels = sorted({it.label for it in tr_ds.items if it.label})
    runner = EndToEndRunner(trained, _Split(tr_ds, labels), _Split(va_ds, labels), cfg_t, torch.device("cpu"),
                            DistInfo(), log=lambda m: None)
    assert runner.evaluate()["mR"] == pytest.approx(res.val["mR"], abs=1e-6)


@needs_shared()
@pytest.mark.parametrize("arch", ["galr", "mssa", "cmpagl", "cmer"])
def test_every_paper_architecture_trains_end_to_end(arch, tmp_path):
    tiny = dict(importlib.import_module(f"test_{arch}").TINY)
    cfg = TrainConfig(**{**E2E, "max_train_images": 8, "val_split": ""}, epochs=1)  # no val: the towers are the point
    before = _tower_tensors(create_model(arch, **tiny))
    train(arch, UCM_JSON, tmp_path / arch, config=cfg, model_config=tiny, log=lambda m: None)
    after = _tower_tensors(load_model(tmp_path / arch))
    assert before and before.keys() == after.keys()
    for name in before:
        assert not torch.allclose(before[name], after[name]), f"{arch}: the {name} tower did not learn"


def _cli_args(out, extra=()):
    return ["train", "--arch", "lite", "--data", str(UCM_JSON), "--end-to-end", "--epochs", "1", "--batch-size", "8",
            "--max-train-images", "16", "--ema", "0", "--val-split", "", "--out", str(out), "--quiet",
            *[a for k, v in LITE.items() for a in ("--set", f"{k}={v}")], *extra]


def _cli(out, extra=(), nproc=0):
    args = _cli_args(out, extra)
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "rsviewer"]
            if nproc else [sys.executable, "-m", "rsviewer"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(head + args, capture_output=True, text=True, env=env, timeout=300)


@needs_shared()
def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    """The same global batch of 8 split over two gloo ranks (DDP, features gathered with
    gradient) gives the one-process loss and, after two optimizer steps, the same weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    from rsviewer.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): kernels differ by thread count at 1e-5
    try:
        assert main(_cli_args(one)) == 0  # one process: in this one
    finally:
        torch.set_num_threads(threads)
    r2 = _cli(two, nproc=2)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert r2.stdout.count("saved") == 1  # rank 0 speaks for the run
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["processes"] == 2 and m1["processes"] == 1
    np.testing.assert_allclose([h["loss"] for h in m2["history"]], [h["loss"] for h in m1["history"]], rtol=1e-5)
    a, b = load_model(one), load_model(two)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(a.encode_text(["a road"]), b.encode_text(["a road"]), atol=1e-5, rtol=0)


@needs_shared()
def test_resume_after_a_kill_continues_the_same_curve(tmp_path, monkeypatch):
    cfg = TrainConfig(**E2E, epochs=2)
    straight = train("lite", UCM_JSON, tmp_path / "a", config=cfg, model_config=LITE, log=lambda m: None)

    from rsviewer.train import end_to_end

    orig = end_to_end.EndToEndRunner.train_epoch

    def killed_in_epoch_2(self, epoch, *a, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        return orig(self, epoch, *a, **k)

    monkeypatch.setattr(end_to_end.EndToEndRunner, "train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train("lite", UCM_JSON, tmp_path / "b", config=cfg, model_config=LITE, log=lambda m: None)
    monkeypatch.setattr(end_to_end.EndToEndRunner, "train_epoch", orig)
    resumed = train("lite", UCM_JSON, tmp_path / "b", config=cfg, resume=True, log=lambda m: None)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in straight.history], rtol=1e-6)
    assert [h["val_mR"] for h in resumed.history] == pytest.approx([h["val_mR"] for h in straight.history], abs=1e-6)


def test_augmentations_are_keyed_by_image_and_epoch():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ops = parse_augment("crop,dihedral,jitter")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    a = augment(x, [sample_rng(0, 3, 7, 1), sample_rng(0, 3, 9, 1)], ops, mean, std)
    b = augment(x, [sample_rng(0, 3, 7, 1), sample_rng(0, 3, 9, 1)], ops, mean, std)
    c = augment(x, [sample_rng(0, 4, 7, 1), sample_rng(0, 4, 9, 1)], ops, mean, std)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    plain = augment(x, [sample_rng(0, 3, 7, 1), sample_rng(0, 3, 9, 1)], parse_augment("none"), mean, std)
    torch.testing.assert_close(plain, x.float() / 127.5 - 1.0)
    with pytest.raises(RsviewerError, match="unknown blur"):
        parse_augment("crop,blur")


def test_global_batches_shard_one_schedule_over_any_number_of_ranks():
    one = GlobalBatches(20, 8, DistInfo(0, 1, 0), seed=3)
    shards = [GlobalBatches(20, 8, DistInfo(r, 4, r), seed=3) for r in range(4)]
    assert len(one) == 2  # the remainder of 20 / 8 is dropped
    for e in range(2):
        rows = one.epoch(e)
        assert np.array_equal(rows, shards[0].epoch(e))
        for step in rows:
            np.testing.assert_array_equal(np.concatenate([s.local(step) for s in shards]), step)
    assert not np.array_equal(one.epoch(0), one.epoch(1))
    with pytest.raises(RsviewerError, match="divisible"):
        GlobalBatches(20, 6, DistInfo(0, 4, 0), seed=0)


@needs_shared()
def test_images_decoded_by_workers_equal_the_in_memory_store():
    from rsviewer.data import load_dataset

    paths = [it.image for it in load_dataset(UCM_JSON).split("val").items[:6]]
    mem = ImageStore(paths, 48, ram_gb=1.0, workers=1)
    disk = ImageStore(paths, 48, ram_gb=0.0, workers=1)  # over budget: DataLoader workers decode per batch
    assert mem.in_memory and not disk.in_memory
    rows = [np.array([4, 0, 2]), np.array([5, 1, 3])]
    for a, b in zip(mem.batches(rows), disk.batches(rows)):
        assert a.dtype == torch.uint8 and torch.equal(a, b)


@needs_shared()
def test_cli_end_to_end_flags_are_one_line_errors(tmp_path, capsys):
    from rsviewer.cli.main import main

    for argv, msg in (
        (["--image-from", "s16"], "apply to --end-to-end"),
        (["--end-to-end", "--cv", "3"], "--cv runs on cached features"),
        (["--end-to-end", "--augment", "blur"], "unknown blur"),
        (["--end-to-end", "--text-from", "9"], "layer number 0..5"),
    ):
        code = main(["train", "--arch", "lite", "--data", str(UCM_JSON), "--out", str(tmp_path / "x"),
                     "--max-train-images", "8", "--quiet", *argv])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, (argv, err)
    assert not (tmp_path / "x").exists()  # nothing claimed before the settings were known to be good


@needs_shared()
@pytest.mark.parametrize("head", ["none", "mlp"])
def test_a_clip_checkpoint_fine_tunes_end_to_end(head, tmp_path):
    """RemoteCLIP-style fine-tuning of an OpenAI-layout ViT (tiny, random): both towers
    learn (without adapters, with CLIP's own temperature), the checkpoint carries them,
    and the foreign file is still only referenced."""
    from test_clip import make_ref, save_as

    path = save_as(make_ref("vit").state_dict(), tmp_path / "RemoteCLIP-tiny-ViT.pt", "plain")
    cfg = TrainConfig(**{**E2E, "max_train_images": 8, "max_val_images": 4}, epochs=2)
    res = train("clip", UCM_JSON, tmp_path / "ft", config=cfg, model_config={"weights": str(path), "head": head, "hidden": 32},
                log=lambda m: None)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    before, after = load_model(path), load_model(tmp_path / "ft")
    for prefix in ("tower.clip.vision_model.embeddings.patch_embedding.weight", "tower.clip.text_model.embeddings.token_embedding.weight"):
        assert not torch.allclose(before.get_parameter(prefix), after.get_parameter(prefix)), prefix
    scale = "tower.clip.logit_scale"
    assert torch.equal(before.get_parameter(scale), after.get_parameter(scale)) == (head != "none")
    assert read_config(tmp_path / "ft")["config"]["weights"] == str(path.resolve())
