"""CLIP-family models (issue 11): OpenAI/open_clip checkpoints and Hugging Face dual
encoders opened through ``--model``, checked against an independent reference
implementation (tests/clip_reference.py) and against transformers itself. Tiny random
configurations only: no real weights exist here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from clip_reference import RefCLIP  # noqa: E402

from rsviewer.checkpoint import load_model  # noqa: E402
from rsviewer.cli.main import main  # noqa: E402
from rsviewer.errors import ModelError  # noqa: E402

TEXTS = ["a photo of a cat", "two tennis courts next to a road", "many planes parked at the airport"]


def images(n=2, size=(96, 80), seed=0):
    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def make_ref(kind="vit", act="quick_gelu", seed=0):
    torch.manual_seed(seed)
    if kind == "vit":  # one head per tower: what width/64 gives for these non-published widths
        return RefCLIP(vision="vit", vwidth=64, vheads=1, theads=1, act=act, size=64, patch=16).eval()
    return RefCLIP(vision="rn", vwidth=8, vheads=4, theads=1, act=act, size=64).eval()


@torch.no_grad()
def ref_embeddings(ref, model, imgs, texts):
    px = model.preprocess(imgs)
    ids, _ = model.clip_tokenizer([model.cfg.caption_prefix + t for t in texts])  # all 77 positions, as OpenAI
    return F.normalize(ref.encode_image(px), dim=-1), F.normalize(ref.encode_text(ids), dim=-1)


def save_as(sd, path: Path, wrap: str):
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif wrap == "state_dict+module":  # SkyCLIP's open_clip training checkpoints
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, str(path))
    else:
        torch.save(sd, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory):
    ref = make_ref("vit")
    p = save_as(ref.state_dict(), tmp_path_factory.mktemp("vit") / "RemoteCLIP-tiny-ViT.pt", "plain")
    return ref, p


@pytest.fixture(scope="module")
def tiny_vit(tiny_vit_file):
    return load_model(tiny_vit_file[1])


# ---- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_reference_ids_and_truncation():
    from rsviewer.nets.clip.tokenizer import get_tokenizer

    tok = get_tokenizer()
    assert len(tok.encoder) == 49408
    ids, trunc = tok(["a photo of a cat", "word " * 100])
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert ids.shape == (2, 77) and trunc == [False, True]
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407  # truncation keeps the end token


def test_tokenizer_agrees_with_transformers(tmp_path):
    from transformers import CLIPTokenizer

    from rsviewer.nets.clip.tokenizer import get_tokenizer, write_hf_files

    hf = CLIPTokenizer(*map(str, write_hf_files(tmp_path)))
    text = ["Two tennis courts, 3 cars & it's naïve", "a photo of a cat"]
    ours = get_tokenizer()(text)[0]
    for row, t in zip(ours, text):
        ids = hf(t)["input_ids"]
        assert row[: len(ids)].tolist() == ids


# ---- OpenAI / open_clip layout -----------------------------------------------------------------------
@pytest.mark.parametrize("name,act,wrap", [
    ("RemoteCLIP-ViT-tiny.pt", "quick_gelu", "plain"),
    ("SkyCLIP-ViT-B-tiny.pt", "gelu", "state_dict+module"),  # SkyCLIP B-32 is LAION-initialised → GELU
    ("laion-tiny.safetensors", "gelu", "safetensors"),
])
def test_openai_vit_reproduces_reference(tmp_path, name, act, wrap):
    ref = make_ref("vit", act)
    path = save_as(ref.state_dict(), tmp_path / name, wrap)
    model = load_model(path)
    assert model.arch == "clip" and model.cfg.model["activation"] == act
    imgs = images()
    ri, rt = ref_embeddings(ref, model, imgs, TEXTS)
    with torch.no_grad():
        mi, mt = model.encode_image(model.preprocess(imgs)), model.encode_text(TEXTS)
    assert torch.allclose(mi, ri, atol=1e-5) and torch.allclose(mt, rt, atol=1e-5)
    # the other activation gives measurably other embeddings: the choice matters
    other = "gelu" if act == "quick_gelu" else "quick_gelu"
    wrong = load_model(path, overrides={"activation": other})
    with torch.no_grad():
        assert (wrong.encode_image(model.preprocess(imgs)) - ri).abs().max() > 1e-4


def test_openai_rn_reproduces_reference(tmp_path):
    ref = make_ref("rn")
    path = save_as(ref.state_dict(), tmp_path / "RemoteCLIP-RN-tiny.bin", "plain")
    model = load_model(path)
    assert model.kind == "resnet" and model.cfg.model["vision_heads"] == 4  # 8·32/64
    imgs = images(3)
    ri, rt = ref_embeddings(ref, model, imgs, TEXTS)
    with torch.no_grad():
        mi, mt = model.encode_image(model.preprocess(imgs)), model.encode_text(TEXTS)
    assert torch.allclose(mi, ri, atol=1e-5) and torch.allclose(mt, rt, atol=1e-5)


def _shapes_vit(vw, vl, patch, grid, tw, tl, embed):
    m = "meta"
    sd = {"visual.conv1.weight": torch.empty(vw, 3, patch, patch, device=m),
          "visual.positional_embedding": torch.empty(grid * grid + 1, vw, device=m),
          "visual.proj": torch.empty(vw, embed, device=m), "token_embedding.weight": torch.empty(49408, tw, device=m),
          "positional_embedding": torch.empty(77, tw, device=m), "ln_final.weight": torch.empty(tw, device=m),
          "text_projection": torch.empty(tw, embed, device=m)}
    for i in range(vl):
        sd[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"] = torch.empty(3 * vw, vw, device=m)
        sd[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.empty(4 * vw, vw, device=m)
    for i in range(tl):
        sd[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.empty(4 * tw, tw, device=m)
    return sd


def test_published_configs_from_shapes():
    from rsviewer.nets.clip.openai import infer_config

    h14 = infer_config(_shapes_vit(1280, 32, 14, 16, 1024, 24, 1024), "GeoRSCLIP-ViT-H-14.pt")
    assert (h14["vision_heads"], h14["text_heads"], h14["image_size"], h14["activation"]) == (16, 16, 224, "gelu")
    b32 = infer_config(_shapes_vit(768, 12, 32, 7, 512, 12, 512), "RemoteCLIP-ViT-B-32.pt")
    assert (b32["vision_heads"], b32["text_heads"], b32["patch_size"], b32["activation"]) == (12, 8, 32, "quick_gelu")
    sky = infer_config(_shapes_vit(768, 12, 32, 7, 512, 12, 512), "SkyCLIP_ViT_B32_top50pct.pt")
    assert sky["activation"] == "gelu"
    l14 = infer_config(_shapes_vit(1024, 24, 14, 16, 768, 12, 768), "RemoteCLIP-ViT-L-14.pt", {"activation": "gelu"})
    assert (l14["vision_heads"], l14["text_heads"], l14["activation"], l14["why"]["activation"]) == (16, 12, "gelu", "--set")


# ---- Hugging Face folders -------------------------------------------------------------------------
def _hf_folder(tmp_path: Path, kind: str) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, SiglipConfig, SiglipModel

    from rsviewer.nets.clip.tokenizer import write_hf_files

    torch.manual_seed(1)
    folder = tmp_path / kind
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77 if kind == "clip" else 16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16)
    if kind == "clip":
        from transformers import CLIPImageProcessor

        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        proc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    else:
        from transformers import SiglipImageProcessor

        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        proc = SiglipImageProcessor(size={"height": 64, "width": 64}, resample=2)
    model.save_pretrained(folder)
    v, m = write_hf_files(tmp_path / f"{kind}-vocab")
    CLIPTokenizer(str(v), str(m), model_max_length=text["max_position_embeddings"]).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_dual_encoder_matches_transformers(tmp_path, kind):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    folder = _hf_folder(tmp_path, kind)
    model = load_model(folder)
    assert model.arch == "clip" and model.kind == "hf"
    hf = AutoModel.from_pretrained(folder).eval()
    tok, proc = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    imgs = images(2, size=(96, 64))
    with torch.no_grad():
        px = proc(images=imgs, return_tensors="pt")["pixel_values"]
        feats = hf.get_image_features(pixel_values=px)
        ri = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
        t = tok(TEXTS, padding="max_length", max_length=model.cfg.max_tokens, truncation=True, return_tensors="pt")
        tf = hf.get_text_features(input_ids=t["input_ids"], **({"attention_mask": t["attention_mask"]} if kind == "clip" else {}))
        rt = F.normalize(getattr(tf, "pooler_output", tf), dim=-1)
        mi, mt = model.encode_image(model.preprocess(imgs)), model.encode_text(TEXTS)
        assert torch.allclose(mi, ri, atol=1e-5) and torch.allclose(mt, rt, atol=1e-5)
        if kind == "siglip":  # calibrated scores: SigLIP's own sigmoid(scale·cos + bias)
            logits = hf(input_ids=t["input_ids"], pixel_values=px).logits_per_image
            assert torch.allclose(model.calibrate(mi @ mt.T), torch.sigmoid(logits), atol=1e-5)


# ---- explanations --------------------------------------------------------------------------------
def test_every_method_on_tiny_vit(tiny_vit):
    from rsviewer.explain import available_methods, explain

    methods = available_methods(tiny_vit)
    for m in ("gradcam", "rollout", "chefer", "maskclip", "surgery"):
        assert m in methods
    img = images(1, size=(120, 96), seed=3)[0]
    for m in methods:
        a = explain(tiny_vit, img, "two tennis courts", m)
        b = explain(tiny_vit, img, "a river between green fields", m)
        if m == "words":
            assert a.words == ["two", "tennis", "courts"]
            continue
        assert a.heatmap.shape == (96, 120) and np.isfinite(a.heatmap).all()
        diff = float(np.abs(a.heatmap - b.heatmap).max())
        if m == "rollout":  # attention rollout does not look at the query, by construction
            assert diff == 0.0
        else:
            assert diff > 1e-3, m
    assert explain(tiny_vit, img, "two tennis courts").layer.endswith("encoder.layers.0")  # the block before the last


def test_rn_explanations(tmp_path):
    from rsviewer.explain import available_methods, explain

    path = save_as(make_ref("rn").state_dict(), tmp_path / "rn.pt", "plain")
    model = load_model(path)
    methods = available_methods(model)
    assert {"gradcam", "attention", "maskclip"} <= set(methods)
    img = images(1, size=(128, 128), seed=4)[0]
    ex = explain(model, img, "a tennis court", "attention", map="attnpool")
    assert ex.heatmap.shape == (128, 128) and ex.info["map"] == "attnpool"
    assert explain(model, img, "a tennis court", "gradcam").layer == "tower.visual.layer4"


# ---- import and the CLI -------------------------------------------------------------------------------
def test_import_references_weights_and_refuses_a_changed_file(tmp_path, capsys, tiny_vit_file, monkeypatch):
    ref, src = tiny_vit_file
    f = tmp_path / "RemoteCLIP-tiny.pt"
    f.write_bytes(src.read_bytes())
    monkeypatch.setenv("RSVIEWER_MODELS", str(tmp_path / "models"))
    assert main(["import", str(f), "--name", "rc-tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    folder = Path(out["path"])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["arch"] == "clip" and cfg["config"]["weights"] == str(f.resolve())
    assert cfg["config"]["sha256"] == out["sha256"] and cfg["preprocess"]["image_size"] == 64
    assert (folder / "model.safetensors").stat().st_size < 1000  # referenced, not copied
    m = load_model("rc-tiny")
    imgs = images(1)
    ri, _ = ref_embeddings(ref, m, imgs, TEXTS[:1])
    with torch.no_grad():
        assert torch.allclose(m.encode_image(m.preprocess(imgs)), ri, atol=1e-5)
    assert main(["models"]) == 0 and "rc-tiny" in capsys.readouterr().out
    sd = torch.load(f, weights_only=True)
    sd["logit_scale"] = sd["logit_scale"] + 1
    torch.save(sd, f)
    with pytest.raises(ModelError, match="changed since it was imported"):
        load_model("rc-tiny")


def test_cli_index_search_explain_with_a_checkpoint_file(tmp_path, capsys, tiny_vit_file, small_gallery):
    data, imgdir = small_gallery
    _, path = tiny_vit_file
    assert main(["index", "--model", str(path), "--data", str(data), "--image-dir", str(imgdir),
                 "--out", str(tmp_path / "idx"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 24
    assert main(["search", "--index", str(tmp_path / "idx"), "--text", "a tennis court", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 3
    assert main(["explain", "--model", str(path), "--image", hits[0]["path"], "--text", "a tennis court",
                 "--method", "chefer", "--out", str(tmp_path / "x.png"), "--json", "--quiet"]) == 0
    assert (tmp_path / "x.png").exists()
    assert main(["explain", "--model", str(path), "--set", "activation=relu", "--image", hits[0]["path"],
                 "--text", "x", "--json", "--quiet"]) == 2
    assert "activation must be one of" in capsys.readouterr().err


# ---- bad input -------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch EVIL_RAN",))


def test_bad_checkpoints_one_line_each(tmp_path, tiny_vit_file, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    ref, good = tiny_vit_file
    save_file({"encoder.layer.0.weight": torch.zeros(2), "head.bias": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match=r"neither the OpenAI/open_clip layout.*encoder\.layer\.0\.weight.*expected visual\.conv1"):
        load_model(tmp_path / "other.safetensors")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.pt")
    sd = dict(ref.state_dict())
    sd["visual.ln_post.weight"] = torch.zeros(63)
    torch.save(sd, tmp_path / "shapes.pt")
    with pytest.raises(ModelError, match=r"post_layernorm\.weight has shape \(63,\)"):
        load_model(tmp_path / "shapes.pt")
    torch.save({"state_dict": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="refused"):
        load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "EVIL_RAN").exists()
    import pickle
    import zipfile

    with zipfile.ZipFile(tmp_path / "ViT-B-32.pt", "w") as z:  # a TorchScript-shaped archive with a hostile data.pkl
        z.writestr("ViT-B-32/data.pkl", pickle.dumps(_Evil()))
        z.writestr("ViT-B-32/code/__torch__/model.py", "")
    with pytest.raises(ModelError, match="TorchScript archive.*does not run.*Convert it once"):
        load_model(tmp_path / "ViT-B-32.pt")
    assert not (tmp_path / "EVIL_RAN").exists()


def test_openai_torchscript_archive_is_read_without_running_it(tmp_path):
    ref = make_ref("vit")
    ref.forward = lambda image, text: (ref.encode_image(image), ref.encode_text(text))
    traced = torch.jit.trace(ref, (torch.randn(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long)), check_trace=False)
    traced.save(str(tmp_path / "RN-free-ViT.pt"))  # OpenAI's original files are such archives
    model = load_model(tmp_path / "RN-free-ViT.pt")
    imgs = images(1)
    ri, rt = ref_embeddings(ref, model, imgs, TEXTS)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(model.preprocess(imgs)), ri, atol=1e-5)
        assert torch.allclose(model.encode_text(TEXTS), rt, atol=1e-5)


def test_hf_folder_that_is_not_a_dual_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="not an image–text dual encoder"):
        load_model(tmp_path / "bert")


def test_long_query_is_truncated_and_said_so(tiny_vit):
    from rsviewer.explain import explain

    ex = explain(tiny_vit, images(1)[0], "a very long description of the scene " * 20, "maskclip")
    assert "cut" in ex.info["truncated"] and tiny_vit.last_truncated == [True]


def test_classify_uses_the_models_own_calibration(tmp_path, tiny_vit):
    from rsviewer.retrieval.classify import classify

    for cls in ("tenniscourt", "river"):
        (tmp_path / cls).mkdir()
        for i, im in enumerate(images(2, seed=len(cls))):
            im.save(tmp_path / cls / f"{i}.png")
    res = classify(tiny_vit, tmp_path)
    assert res["n"] == 4 and res["calibration"].startswith("softmax(")
    assert all(0.5 <= p["probability"] <= 1.0 for p in res["predictions"])  # argmax of a 2-way softmax


def test_train_heads_on_a_frozen_clip(tmp_path, tiny_vit_file):
    from safetensors.torch import load_file

    from conftest import UCM_JSON
    from rsviewer.train.trainer import TrainConfig, train

    if not UCM_JSON.exists():
        pytest.skip("shared UCM data not available")
    ref, path = tiny_vit_file
    out = tmp_path / "clip-mlp"
    cfg = TrainConfig(epochs=3, batch_size=16, max_train_images=48, max_val_images=16, views=1, lr=2e-3)
    res = train("clip", UCM_JSON, out, config=cfg, model_config={"weights": str(path), "head": "mlp", "hidden": 64})
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    saved = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("image_adapter.") for k in saved) and not any(k.startswith("tower.") for k in saved)
    m = load_model(out)
    imgs = images(1)
    ri, _ = ref_embeddings(ref, m, imgs, TEXTS[:1])
    with torch.no_grad():
        mi = m.encode_image(m.preprocess(imgs))
        assert torch.allclose(F.normalize(m.image_features(m.preprocess(imgs))["pooled"], dim=-1), ri, atol=1e-5)
        assert (mi - ri).abs().max() > 1e-4


def test_pads_after_the_last_end_token_are_cut_and_embeddings_do_not_change(tiny_vit_file):
    ref, path = tiny_vit_file
    model = load_model(path)
    texts = ["a photo of a cat", "many planes parked next to a long runway at the airport"]
    full, _ = model.clip_tokenizer([model.cfg.caption_prefix + t for t in texts])  # padded to the context
    ids = model.tokenize(texts)["input_ids"]
    assert set(model.tokenize(texts)) == {"input_ids"}
    assert full.shape[1] == model.cfg.model.get("context_length", full.shape[1]) and ids.shape[1] < full.shape[1]
    assert int(ids[1, -1]) == 49407 and torch.equal(ids, full[:, : ids.shape[1]])  # the longest ends the batch
    with torch.no_grad():
        ref_t = F.normalize(ref.encode_text(full), dim=-1)  # the reference on all 77 positions
        assert torch.allclose(model.encode_text(texts), ref_t, atol=1e-6)


def test_tiny_clip_towers_run_in_onnx_runtime(tiny_vit, monkeypatch, tmp_path):
    """Both towers export and run in ONNX Runtime (the text graph used to fail: an unused
    attention_mask input was dropped by the exporter and then fed by the runtime)."""
    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    from rsviewer.runtime.towers import Towers

    tw = Towers(tiny_vit, "onnx")
    px = tiny_vit.preprocess(images(3))
    with torch.no_grad():
        got_i = tw.image_states(px)["emb"]
        got_t = tw.text_states(TEXTS)["emb"]
        ref_i, ref_t = tiny_vit.encode_image(px), tiny_vit.encode_text(TEXTS)
    info = tw.info()
    assert info["image"] == "onnx" and info["text"] == "onnx", info
    assert F.cosine_similarity(got_i, ref_i).min() >= 0.9999
    assert F.cosine_similarity(got_t, ref_t).min() >= 0.9999


def test_cli_says_what_it_inferred_for_a_foreign_file(tiny_vit_file, tmp_path, capsys):
    """Without --quiet every command that opens a checkpoint file prints one line of what was
    inferred (this line once crashed: cli/common.py lost its sys import)."""
    from rsviewer.cli.main import main

    _, path = tiny_vit_file
    img = Path(__file__).resolve().parents[1] / "assets" / "gallery" / "images" / "91.jpg"
    assert main(["explain", "--model", str(path), "--image", str(img), "--text", "farmland",
                 "--method", "gradcam", "--out", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    assert f"{path.stem}: " in err and "Traceback" not in err and (tmp_path / "x.png").exists()
