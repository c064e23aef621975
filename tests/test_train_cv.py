"""Cross-validated selection (train/cv.py) and the ensemble model type (archs/ensemble.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import GALLERY_JSON, UCM_JSON, needs_shared
from rsviewer.archs.ensemble import build_ensemble
from rsviewer.checkpoint import load_model, read_config, save_model
from rsviewer.data import load_dataset
from rsviewer.errors import ModelError, RsviewerError
from rsviewer.train.cv import cross_validate, ensemble_cv, image_folds, load_cv_sims, train_with_cv
from rsviewer.train.trainer import TrainConfig

TINY_CV = dict(epochs=2, batch_size=12, max_train_images=36, views=2, lr=2e-3, ema=0.9)
TINY_MODEL = {"hidden": 64, "embed_dim": 32}


@needs_shared()
def test_cv_folds_never_share_an_image():
    ds = load_dataset(UCM_JSON)
    union = ds.split("train").items + ds.split("val").items
    from rsviewer.data import Dataset

    u = Dataset(ds.name, ds.source, ds.format, union, ds.images_dir)
    for mode in ("blocked", "random"):
        folds = image_folds(u, 9, seed=0, mode=mode)
        flat = np.concatenate(folds)
        assert len(flat) == len(u) == len(set(flat.tolist()))  # a partition of the images
        files = [{str(u.items[i].image) for i in f} for f in folds]
        for a in range(9):
            for b in range(a + 1, 9):
                assert not files[a] & files[b]
        # 1,890 UCM images, 90 per label: every fold holds 210 images, 10 of each label
        assert {len(f) for f in folds} == {210}
        labels = [sorted(u.items[i].label for i in f) for f in folds]
        assert all(lab.count(lab[0]) == 10 for lab in labels)
    blocked = image_folds(u, 9)
    # blocks of consecutive images per label: the last block is (nearly) the official val split
    assert sum(u.items[i].split == "val" for i in blocked[8]) >= 200
    assert image_folds(u, 9, seed=0, mode="random")[0].tolist() != image_folds(u, 9, seed=1, mode="random")[0].tolist()
    with pytest.raises(RsviewerError, match="at least 2"):
        image_folds(u, 1)


def test_fold_features_are_row_selections_of_the_union_not_copies():
    from rsviewer.train.cache import RowSelection, gather

    union = {"s8": np.arange(10 * 3 * 2, dtype=np.float16).reshape(10, 3, 2)}
    rows = np.array([7, 2, 5, 0])
    fold = {k: RowSelection(v, rows) for k, v in union.items()}
    assert fold["s8"].shape == (4, 3, 2) and len(fold["s8"]) == 4
    assert fold["s8"].array is union["s8"]  # shared, not copied
    batch, views = np.array([3, 1]), np.array([2, 0])
    got = gather(fold, batch, views)["s8"]
    want = torch.from_numpy(union["s8"][rows][batch, views].astype(np.float32))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(gather(fold, batch)["s8"], torch.from_numpy(union["s8"][rows][batch].astype(np.float32)))
    assert np.array_equal(np.asarray(fold["s8"]), union["s8"][rows])

    # what a CV fold does: its subset of the union's split selects rows of the same arrays
    from rsviewer.train.trainer import _Split

    ds = load_dataset(GALLERY_JSON)
    labels = sorted({it.label for it in ds.items if it.label})
    split = _Split(ds, labels)
    split.image_feats = {"s8": np.zeros((len(ds), 3, 2), dtype=np.float16)}
    sub = split.subset(rows, labels)
    assert isinstance(sub.image_feats["s8"], RowSelection) and sub.image_feats["s8"].array is split.image_feats["s8"]
    assert sub.image_feats["s8"].shape == (4, 3, 2)


@needs_shared()
def test_cv_then_final_model_on_train_and_val(tmp_path):
    cfg = TrainConfig(**TINY_CV)
    out = tmp_path / "m"
    report, res = train_with_cv("lite", UCM_JSON, out, 3, model_config=TINY_MODEL, config=cfg, log=lambda m: None)
    assert report["k"] == 3 and len(report["folds"]) == 3
    assert sum(f["n_held_images"] for f in report["folds"]) == 36
    assert all(f["n_train_images"] + f["n_held_images"] == 36 for f in report["folds"])
    assert [r["epoch"] for r in report["curve"]] == [1, 2]
    assert report["chosen_epoch"] in (1, 2)
    vals = report["mR_per_fold"]
    assert report["mR_mean"] == pytest.approx(np.mean(vals), abs=1e-3)
    assert report["mR_se"] == pytest.approx(np.std(vals, ddof=1) / np.sqrt(3), abs=1e-3)
    assert "tta" in report  # dual encoder: held-out TTA measured alongside
    met = json.loads((out / "metrics.json").read_text())
    assert met["saw_val"] is True and met["selected_on"] == "cross-validation"
    assert met["train_split"] == "train+val" and met["epochs_run"] == report["chosen_epoch"]
    assert met["cv"]["mR_mean"] == report["mR_mean"] and met["cv"]["folds_digest"] == report["folds_digest"]
    rep, arrays = load_cv_sims(out)  # held-out scores kept for ensemble weights
    assert arrays["sim0"].shape == (len(arrays["images0"]), len(arrays["cap0"]))
    load_model(out)  # the final model is a normal model folder


def test_ensemble_weights_by_cv_on_stored_scores():
    rng = np.random.default_rng(0)
    k, n = 3, 6
    cap = np.repeat(np.arange(n), 2)
    truth = (np.arange(n)[:, None] == cap[None, :]).astype(np.float32)

    def member(noise):
        arrays = {}
        for f in range(k):
            arrays[f"sim{f}"] = (truth + noise * rng.standard_normal(truth.shape)).astype(np.float16)
            arrays[f"cap{f}"] = cap
        return {"k": k, "folds_digest": "x"}, arrays

    good, bad = member(0.3), member(5.0)
    rep = ensemble_cv([good, bad], step=0.25)
    assert rep["weights"][0] > rep["weights"][1]  # the informative member dominates
    assert rep["mR_mean"] >= rep["members_alone"][1]["mR_mean"]
    assert len(rep["nested"]["mR_per_fold"]) == k
    with pytest.raises(RsviewerError, match="different folds"):
        ensemble_cv([good, ({"k": k, "folds_digest": "y"}, bad[1])])


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    from rsviewer.archs.registry import create_model

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model("lite", **TINY_MODEL)
        paths.append(save_model(m, root / f"m{seed}", overwrite=True))
    return root, paths


def _pixels():
    from PIL import Image

    d = json.loads(GALLERY_JSON.read_text())
    ims = [Image.open(GALLERY_JSON.parent / "images" / d["images"][i]["filename"]) for i in (0, 1)]
    return ims


TEXTS = ["many planes parked at the airport", "a dense forest"]


def test_ensemble_of_one_equals_the_model(two_models):
    root, (a, _) = two_models
    model = load_model(a)
    ens = build_ensemble([str(a)])
    save_model(ens, root / "ens1")
    ens = load_model(root / "ens1")
    assert read_config(root / "ens1")["arch"] == "ensemble"
    ims = _pixels()
    with torch.no_grad():
        s_model = model.score(model.image_states(model.preprocess(ims)), model.text_states(TEXTS))
        s_ens = ens.score(ens.image_states(ens.preprocess(ims)), ens.text_states(TEXTS))
    assert torch.allclose(s_model, s_ens, atol=1e-6)


def test_ensemble_is_the_weighted_mean_and_checks_members(two_models, tmp_path):
    root, (a, b) = two_models
    ma, mb = load_model(a), load_model(b)
    ens = build_ensemble([str(a), str(b)], [0.7, 0.3])
    ims = _pixels()
    with torch.no_grad():
        sa = ma.score(ma.image_states(ma.preprocess(ims)), ma.text_states(TEXTS))
        sb = mb.score(mb.image_states(mb.preprocess(ims)), mb.text_states(TEXTS))
        se = ens.score(ens.image_states(ens.preprocess(ims)), ens.text_states(TEXTS))
        emb = ens.encode_image(ens.preprocess(ims))
    assert torch.allclose(se, 0.7 * sa + 0.3 * sb, atol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)  # a dual encoder like any other
    save_model(ens, tmp_path / "e")
    other = save_model(build_ensemble([str(a), str(b)], [0.5, 0.5]), tmp_path / "e2")
    assert read_config(tmp_path / "e")["fingerprint"] != read_config(other)["fingerprint"]
    # a member that changed since the ensemble was built is refused with one clear line
    torch.manual_seed(5)
    from rsviewer.archs.registry import create_model

    save_model(create_model("lite", **TINY_MODEL), b, overwrite=True)  # the member changes on purpose
    with pytest.raises(ModelError, match="changed since the ensemble was built"):
        load_model(tmp_path / "e")


def test_ensemble_tta_is_the_mean_of_dihedral_views(two_models):
    from rsviewer.train.cache import dihedral

    _, (a, _) = two_models
    model = load_model(a)
    ens = build_ensemble([str(a)], views=8)
    ims = _pixels()
    with torch.no_grad():
        x = model.preprocess(ims)
        mean = torch.stack([model.encode_image(dihedral(x, v)) for v in range(8)]).mean(0)
        got = ens.encode_image(ens.preprocess(ims))
    assert torch.allclose(got, torch.nn.functional.normalize(mean, dim=-1), atol=1e-5)
    # a rotated image gets the same TTA embedding (the views form a group)
    with torch.no_grad():
        rot = ens.encode_image(dihedral(ens.preprocess(ims), 1))
    assert torch.allclose(rot, got, atol=1e-4)


def test_ensemble_runs_in_its_members_onnx_towers(two_models, tmp_path, capfd):
    """No graph of its own (it has no tokenizer): each member's exported towers serve it,
    with the same states as the ensemble in PyTorch and no fallback warning."""
    from rsviewer.archs.registry import create_model
    from rsviewer.runtime import towers
    from rsviewer.runtime.towers import MemberTowers

    _, (a, _) = two_models
    torch.manual_seed(7)
    c = save_model(create_model("lite", **TINY_MODEL), tmp_path / "c")
    ens = build_ensemble([str(a), str(c)], [0.6, 0.4])
    tw = towers(ens, "onnx")
    assert isinstance(tw, MemberTowers)
    x = ens.preprocess(_pixels())
    with torch.no_grad():
        ref_i, ref_t = ens.image_states(x), ens.text_states(TEXTS)
    got_i, got_t = tw.image_states(x), tw.text_states(TEXTS)
    for ref, got in ((ref_i, got_i), (ref_t, got_t)):
        assert float(torch.nn.functional.cosine_similarity(ref["emb"], got["emb"]).min()) >= 0.9999
    info = tw.info()
    assert info["image"].split("; ") == [f"{a.name}: onnx", "c: onnx"], info
    assert info["text"].split("; ") == [f"{a.name}: onnx", "c: onnx"], info
    assert "runs in PyTorch" not in capfd.readouterr().err


@needs_shared()
def test_fold_runs_in_parallel_merge_into_the_same_cv_and_final_model(tmp_path, capsys):
    """Folds run as separate ``--cv-only --cv-folds`` runs (one per core or machine) merge
    into the CV that one run of all folds gives: same curve, same chosen epoch, same held-out
    scores; the final model is then trained from the merge without rerunning a fold."""
    cfg = TrainConfig(**{**TINY_CV, "epochs": 3})
    kw = dict(model_config=TINY_MODEL, config=cfg, log=lambda m: None)
    whole = cross_validate("lite", UCM_JSON, 3, out=tmp_path / "whole", **kw)
    cross_validate("lite", UCM_JSON, 3, out=tmp_path / "a", only_folds=[2], **kw)
    cross_validate("lite", UCM_JSON, 3, out=tmp_path / "b", only_folds=[1, 3], **kw)
    _, part = load_cv_sims(tmp_path / "b")
    assert {f"sim0_e{e}" for e in (1, 2, 3)} <= set(part)  # a partial run keeps every evaluated epoch
    with pytest.raises(RsviewerError, match=r"missing: \[1, 3\]"):
        train_with_cv("lite", UCM_JSON, tmp_path / "m0", 3, merge=[tmp_path / "a"], **kw)
    other = TrainConfig(**{**TINY_CV, "epochs": 3, "lr": 1e-3})
    with pytest.raises(RsviewerError, match="lr 0.001"):
        train_with_cv("lite", UCM_JSON, tmp_path / "m0", 3, model_config=TINY_MODEL, config=other, log=lambda m: None,
                      merge=[tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "m0").exists()  # refused before any training

    report, res = train_with_cv("lite", UCM_JSON, tmp_path / "m", 3, merge=[tmp_path / "a", tmp_path / "b"], **kw)
    assert report["curve"] == whole["curve"] and report["chosen_epoch"] == whole["chosen_epoch"]
    assert report["mR_per_fold"] == whole["mR_per_fold"] and report["complete"] is True
    _, merged = load_cv_sims(tmp_path / "m")
    _, ref = load_cv_sims(tmp_path / "whole")
    assert sorted(merged) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(merged[key], ref[key])
    met = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert met["epochs_run"] == whole["chosen_epoch"] and len(met["cv"]["commands"]) == 2
    load_model(tmp_path / "m")

    from rsviewer.cli.main import main

    rc = main(["train", "--arch", "lite", "--data", str(UCM_JSON), "--out", str(tmp_path / "m2"), "--cv", "3",
               "--cv-only", "--cv-merge", str(tmp_path / "a")])
    assert rc == 2 and "error: --cv-merge trains the final model" in capsys.readouterr().err
