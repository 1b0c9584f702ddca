"""Zero-shot CLIP models (open_clip: / hf-clip: specs, load_clip, wrap_clip) and MCM, GL-MCM, NegLabel.

No weights ship: the models are open_clip / transformers CLIP architectures with seeded random weights (a tiny ViT
config), and the scores are checked against transcriptions of the papers' code written here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oodbench
from oodbench.errors import OODBenchError

open_clip = pytest.importorskip("open_clip")

TINY = "oodbench-tiny-vit"
SPEC = f"open_clip:{TINY}:none"
TINY_CONFIG = {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TEMPLATES = ["a photo of a {}.", "a sketch of the {}."]


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)


@pytest.fixture(scope="module")
def model():
    return oodbench.load_model(SPEC, in_dataset="fashion_mnist", clip={"templates": TEMPLATES})


def images(n=6, seed=0, channels=1, size=28):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def raw_open_clip(seed=0):
    """The same network as open_clip builds it (the seed load_model uses), for transcriptions."""
    torch.manual_seed(seed)
    return open_clip.create_model(TINY, pretrained=None).eval(), open_clip.get_tokenizer(TINY)


# ------------------------------------------------------------------------------------------------ the model
def test_the_zero_shot_head_is_the_prompt_ensembled_text_embeddings(model):
    net, tokenizer = raw_open_clip()
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    with torch.no_grad():   # CLIP's zero-shot classifier: mean of the normalised prompt embeddings, normalised
        text = torch.stack([F.normalize(F.normalize(net.encode_text(tokenizer([t.format(c) for t in TEMPLATES])),
                                                    dim=-1).mean(0), dim=0) for c in names])
        x = images()
        inp = model.prepare(x)
        image = F.normalize(net.encode_image(inp), dim=-1)
        expected = net.logit_scale.exp() * image @ text.T
    features, logits = model.features_and_logits(x)
    assert model.net.names == names and model.num_classes == 10
    torch.testing.assert_close(features, image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert model.size == (32, 32) and inp.shape == (6, 3, 32, 32)   # 1-channel images to CLIP's 3 channels


def test_every_classifier_method_scores_the_zero_shot_model(model):
    x = images()
    train = images(40, seed=1)
    for name in ("msp", "energy", "maxlogit", "knn", "vim", "mahalanobis"):
        options = {"k": 5} if name == "knn" else {"dim": 8} if name == "vim" else {}
        det = oodbench.method(name, **options)
        det.fit(model, train, labels=torch.arange(40) % 10)
        scores = det.score(x)
        assert scores.shape == (6,) and torch.isfinite(scores).all()


def test_msp_on_the_zero_shot_head_is_mcm_at_the_matching_temperature(model):
    x = images()
    unit = oodbench.load_model(SPEC, in_dataset="fashion_mnist", clip={"templates": TEMPLATES, "logit_scale": 1.0})
    msp = oodbench.method("msp").fit(unit).score(x)
    torch.testing.assert_close(msp, oodbench.method("mcm", temperature=1.0).fit(unit).score(x))
    scale = model.net.logit_scale   # the model's own scale: msp is MCM at tau = 1 / scale
    torch.testing.assert_close(oodbench.method("msp").fit(model).score(x),
                               oodbench.method("mcm", temperature=1 / scale).fit(model).score(x), rtol=1e-5,
                               atol=1e-6)


def test_names_and_templates_make_the_head(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    a = oodbench.load_model(SPEC, clip={"names": str(names)})
    b = oodbench.models.load_clip(SPEC, names=["cat", "dog"], templates="simple")
    assert a.net.names == ["cat", "dog"] and a.net.templates == ["a photo of a {}."]
    torch.testing.assert_close(a.head.weight, b.head.weight)
    c = oodbench.models.load_clip(SPEC, names=["cat", "dog"], templates="imagenet")
    assert len(c.net.templates) == 80 and not torch.allclose(c.head.weight, a.head.weight)
    assert a.digest != c.digest   # the head is in the cache key


def test_wrap_clip_takes_the_users_encoders():
    torch.manual_seed(0)
    image = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    table = torch.nn.Embedding(100, 16)

    def tokenizer(prompts):
        return torch.tensor([sum(map(ord, p)) % 100 for p in prompts])

    model = oodbench.wrap_clip(image, table, tokenizer, ["a", "b", "c"], logit_scale=10.0, size=8)
    x = images(4, channels=3, size=8)
    with torch.no_grad():
        text = F.normalize(table(tokenizer(["a photo of a a.", "a photo of a b.", "a photo of a c."])), dim=-1)
        expected = 10.0 * F.normalize(image(model.prepare(x)), dim=-1) @ text.T
    torch.testing.assert_close(model.logits(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(OODBenchError, match="patch tokens"):
        oodbench.method("glmcm").fit(model)


# ------------------------------------------------------------------------------------------------ MCM
def mcm_reference(image, text, tau):
    """MCM's code (deeplearning-wisc/MCM, get_ood_scores_clip): -max softmax(image @ text.T / T) on normalised
    embeddings, in numpy."""
    image = image / np.linalg.norm(image, axis=-1, keepdims=True)
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    z = image @ text.T / tau
    smax = np.exp(z - z.max(1, keepdims=True))
    smax /= smax.sum(1, keepdims=True)
    return -smax.max(1)


@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_mcm_equals_the_papers_formula(tau):
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(20, 16, generator=g), torch.randn(5, 16, generator=g)
    scale = 37.0
    det = oodbench.method("mcm", temperature=tau).fit_features(image, image @ text.T,
                                                               head=(scale * F.normalize(text, dim=-1), torch.zeros(5)))
    np.testing.assert_allclose(det.score_features(F.normalize(image, dim=-1), torch.zeros(20, 5)).numpy(),
                               mcm_reference(image.double().numpy(), text.double().numpy(), tau), rtol=1e-5, atol=1e-6)


def test_mcm_on_the_model_equals_the_formula_on_its_embeddings(model):
    x = images()
    features, _ = model.features_and_logits(x)
    expected = mcm_reference(features.double().numpy(), model.net.text_embeddings.double().numpy(), 1.0)
    np.testing.assert_allclose(oodbench.method("mcm").fit(model).score(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_mcm_ranks_an_image_on_a_class_prompt_above_one_between_classes():
    text = F.normalize(torch.eye(4, 8), dim=-1)
    on_class = text[1:2]
    between = F.normalize(text[0:1] + text[1:2] + text[2:3], dim=-1)
    det = oodbench.method("mcm", temperature=0.1).fit_features(on_class, on_class @ text.T, head=(text, torch.zeros(4)))
    scores = det.score_features(torch.cat([on_class, between]), torch.zeros(2, 4))
    assert scores[0] < scores[1]   # lower = more ID


# ------------------------------------------------------------------------------------------------ GL-MCM
def glmcm_reference_local(net, inp):
    """GL-MCM's clip/model.py on an open_clip ViT: the last block's input x, then q, k, v = the full in_proj split in
    thirds, each through out_proj; v + x, + mlp(ln_2); ln_post; the class token dropped; @ proj."""
    captured = {}
    block = net.visual.transformer.resblocks[-1]
    handle = block.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        pooled = net.encode_image(inp)
        handle.remove()
        x = captured["x"]
        y = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
        _, _, v = y.chunk(3, dim=-1)
        v = F.linear(v, block.attn.out_proj.weight, block.attn.out_proj.bias) + x
        v = v + block.mlp(block.ln_2(v))
        local = net.visual.ln_post(v)[:, 1:] @ net.visual.proj
    return pooled, local


def glmcm_reference(glob, local, text, tau, lam):
    """GL-MCM's utils/detection_util.py: -max softmax(global) + lambda * -max over patches and classes of the
    per-patch softmax, on normalised embeddings (numpy)."""
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    glob = glob / np.linalg.norm(glob, axis=-1, keepdims=True)
    local = local / np.linalg.norm(local, axis=-1, keepdims=True)
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    return -softmax(glob @ text.T / tau).max(1) + lam * -softmax(local @ text.T / tau).max(axis=(1, 2))


def test_glmcm_patch_features_and_score_equal_the_authors_code(model):
    net, _ = raw_open_clip()
    x = images()
    inp = model.prepare(x)
    pooled, local = glmcm_reference_local(net, inp)
    ours_global, ours_local = model.net.global_and_local(inp)
    torch.testing.assert_close(ours_global, F.normalize(pooled, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_local, F.normalize(local, dim=-1), rtol=1e-4, atol=1e-5)
    for tau, lam in ((1.0, 1.0), (0.1, 0.5)):
        det = oodbench.method("glmcm", temperature=tau, lambda_local=lam).fit(model)
        expected = glmcm_reference(pooled.double().numpy(), local.double().numpy(),
                                   model.net.text_embeddings.double().numpy(), tau, lam)
        np.testing.assert_allclose(det.score(x).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_glmcm_without_its_local_term_is_mcm_and_the_local_term_only_lowers_the_score(model):
    x = images()
    mcm = oodbench.method("mcm").fit(model).score(x)
    torch.testing.assert_close(oodbench.method("glmcm", lambda_local=0.0).fit(model).score(x), mcm)
    assert (oodbench.method("glmcm").fit(model).score(x) < mcm).all()   # + lambda * (a max softmax > 0)


# ------------------------------------------------------------------------------------------------ NegLabel
def neglabel_reference(image, pos, candidates, count, eta, tau, ngroup, perm):
    """NegLabel's code (XueJiang16/NegLabel): the candidates sorted by the eta-quantile of their cosines to the ID
    labels, the `count` lowest kept (multi_modal.py); the remainder of count % ngroup dropped, the rest permuted by
    `perm`, and per group the softmax mass of the ID labels over [ID, group], averaged (clip_ood.py grouping)."""
    sims = np.quantile(candidates @ pos.T, eta, axis=-1)
    neg = candidates[np.argsort(sims, kind="stable")[:count]]
    s_pos, s_neg = image @ pos.T, image @ neg.T
    drop = s_neg.shape[1] % ngroup
    if drop:
        s_neg = s_neg[:, :-drop]
    groups = s_neg[:, perm].reshape(len(image), ngroup, -1)
    scores = []
    for i in range(ngroup):
        full = np.concatenate([s_pos, groups[:, i]], -1) / tau
        full = np.exp(full - full.max(-1, keepdims=True))
        full /= full.sum(-1, keepdims=True)
        scores.append(full[:, :s_pos.shape[1]].sum(-1))
    return np.mean(scores, 0)


def test_neglabel_equals_the_authors_code_on_fixed_tensors():
    from oodbench.detectors.zeroshot import mine_negatives, neglabel_score

    g = torch.Generator().manual_seed(5)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    image, pos, candidates = unit(12, 16), unit(4, 16), unit(203, 16)
    count, eta, tau, ngroup = 150, 0.95, 0.01, 7
    chosen = mine_negatives(pos, candidates, count, eta)
    keep = count - count % ngroup
    perm = torch.randperm(keep, generator=torch.Generator().manual_seed(0)).numpy()
    ours = neglabel_score(image, pos, candidates[chosen], tau, ngroup, seed=0)
    expected = neglabel_reference(image.numpy(), pos.numpy(), candidates.numpy(), count, eta, tau, ngroup, perm)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-12)
    ungrouped = neglabel_score(image, pos, candidates[chosen], tau, 1)
    np.testing.assert_allclose(ungrouped.numpy(), neglabel_reference(image.numpy(), pos.numpy(), candidates.numpy(),
                                                                     count, eta, tau, 1, np.arange(count)),
                               rtol=1e-9, atol=1e-12)


def test_neglabel_mines_the_words_farthest_from_the_id_labels_and_scores_near_negatives_as_ood():
    from oodbench.detectors.zeroshot import mine_negatives, neglabel_score

    pos = F.normalize(torch.eye(3, 6), dim=-1)
    near = F.normalize(pos[0] + 0.1 * torch.eye(6)[3], dim=0)
    far = [F.normalize(torch.eye(6)[i] - 0.2 * pos.sum(0), dim=0) for i in (3, 4, 5)]
    candidates = torch.stack([near, *far])
    chosen = mine_negatives(pos, candidates, 3, 0.95)
    assert sorted(chosen.tolist()) == [1, 2, 3]   # the word close to an ID label is not a negative
    neg = candidates[chosen]
    s = neglabel_score(torch.stack([pos[1], neg[0]]), pos, neg, 0.01, 1)
    assert s[0] > 0.99 and s[1] < 0.01 and (s >= 0).all() and (s <= 1).all()


def test_neglabel_fits_on_the_model_with_a_word_list(model, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(["Trouser", "ocean", "mountain", "violin", "carrot", "bridge", "tiger", "cloud",
                                "engine", "lamp", "river", "ocean"]) + "\n")
    det = oodbench.method("neglabel", words=str(words), count=6, groups=2).fit(model)
    assert det.stats_.shape == (6, 32)   # 10 distinct words other than the ID name, 6 kept
    x = images()
    scores = det.score(x)
    assert scores.shape == (6,) and ((scores < 0) & (scores >= -1)).all()
    state = det.state_dict()
    again = oodbench.method("neglabel", words=str(words)).load_state_dict(state).use_model(model)
    torch.testing.assert_close(again.score(x), scores)
    with pytest.raises(OODBenchError, match="neglabel.words"):
        oodbench.method("neglabel").fit(model)


# ------------------------------------------------------------------------------------------------ hf-clip
def hf_tokenizer_files(folder):
    """CLIP's BPE as transformers' CLIPTokenizer reads it, built from the vocabulary open_clip ships."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in tok.encoder.items()}))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def open_clip_to_hf(net, hf):
    """open_clip's ViT CLIP weights in transformers' CLIPModel layout."""
    state = {}

    def tower(prefix_ours, prefix_hf, blocks):
        for i, _ in enumerate(blocks):
            o, h = f"{prefix_ours}.resblocks.{i}", f"{prefix_hf}.encoder.layers.{i}"
            w, b = net.state_dict()[f"{o}.attn.in_proj_weight"], net.state_dict()[f"{o}.attn.in_proj_bias"]
            for part, (wp, bp) in zip("qkv", zip(w.chunk(3), b.chunk(3))):
                state[f"{h}.self_attn.{part}_proj.weight"], state[f"{h}.self_attn.{part}_proj.bias"] = wp, bp
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for kind in ("weight", "bias"):
                    state[f"{h}.{theirs}.{kind}"] = net.state_dict()[f"{o}.{ours}.{kind}"]

    sd = net.state_dict()
    tower("visual.transformer", "vision_model", net.visual.transformer.resblocks)
    tower("transformer", "text_model", net.transformer.resblocks)
    state.update({"vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
                  "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
                  "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
                  "visual_projection.weight": sd["visual.proj"].T,
                  "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
                  "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
                  "text_projection.weight": sd["text_projection"].T, "logit_scale": sd["logit_scale"]})
    for ours, theirs in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm"), ("ln_final", "text_model.final_layer_norm")):
        for kind in ("weight", "bias"):
            state[f"{theirs}.{kind}"] = sd[f"{ours}.{kind}"]
    own = hf.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    assert not missing, missing
    hf.load_state_dict({k: state.get(k, v) for k, v in own.items()})


def test_an_hf_clip_folder_gives_the_embeddings_of_the_equal_open_clip_build(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    net, _ = raw_open_clip()
    text, vision = TINY_CONFIG["text_cfg"], TINY_CONFIG["vision_cfg"]
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=text["width"], intermediate_size=4 * text["width"],
                         num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
                         vocab_size=text["vocab_size"], max_position_embeddings=text["context_length"],
                         hidden_act="gelu", eos_token_id=49407, bos_token_id=49406, pad_token_id=1),
        vision_config=dict(hidden_size=vision["width"], intermediate_size=4 * vision["width"],
                           num_hidden_layers=vision["layers"],
                           num_attention_heads=vision["width"] // vision["head_width"],
                           image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act="gelu"),
        projection_dim=TINY_CONFIG["embed_dim"])
    hf = transformers.CLIPModel(config).eval()
    open_clip_to_hf(net, hf)
    hf.save_pretrained(tmp_path)
    hf_tokenizer_files(tmp_path)
    transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path)
    ours = oodbench.load_model(f"hf-clip:{tmp_path}", in_dataset="fashion_mnist", clip={"templates": TEMPLATES},
                               size=32)
    x = images()
    torch.testing.assert_close(ours.head.weight, model.head.weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.logits(x), model.logits(x), rtol=1e-4, atol=1e-4)
    inp = model.prepare(x)
    for a, b in zip(ours.net.global_and_local(inp), model.net.global_and_local(inp)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(oodbench.method("glmcm").fit(ours).score(x).numpy(),
                               oodbench.method("glmcm").fit(model).score(x).numpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ end to end
def test_the_pipeline_end_to_end_on_fashion_mnist(tmp_path, capsys):
    from oodbench.cli import main

    words = tmp_path / "words.txt"
    words.write_text("ocean\nmountain\nviolin\ncarrot\nbridge\ntiger\ncloud\nengine\n")
    methods = "mcm,glmcm,neglabel,msp,knn"
    assert main(["eval", "--model", SPEC, "--method", methods, "--in", "fashion_mnist", "--out", "noise:gaussian",
                 "--fit-limit", "60", "--limit", "40", "--format", "json", "--runs-dir", str(tmp_path),
                 "--set", "knn.k=5", "--set", "clip.templates=a photo of a {}, a type of clothing.",
                 "--set", f"neglabel.words={words}", "--set", "neglabel.count=6", "--set", "neglabel.groups=2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == methods.split(",")
    assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    ev = oodbench.Evaluator(SPEC, methods=["mcm"], in_dataset="fashion_mnist", fit_limit=60, device="cpu",
                            overrides=["clip.templates=a photo of a {}, a type of clothing."])
    assert ev.evaluate(["noise:gaussian"], limit=40)[0]["auroc"] == rows[0]["auroc"]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_one_line_error_before_any_work(tmp_path, capsys):
    from oodbench.cli import main

    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    unnamed = tmp_path / "flat"
    unnamed.mkdir()
    other = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3)}, other)
    cases = [
        (dict(clip={"names": str(three)}, in_dataset="fashion_mnist"), "has 3 names but the set has 10 classes"),
        (dict(in_dataset=f"folder:{unnamed}"), "no class sub-folders"),
        (dict(), "needs class names"),
        (dict(in_dataset="npz:/nowhere.npz"), "no class names known"),
    ]
    for options, match in cases:
        with pytest.raises(OODBenchError, match=match):
            oodbench.load_model(SPEC, **options)
    for spec, match in [(f"open_clip:{TINY}:{other}", "not a checkpoint of this architecture"),
                        ("open_clip:NoSuchNet:none", "no model config"), (f"open_clip:{TINY}", "ARCH:WEIGHTS"),
                        (f"open_clip:{TINY}:nosuchtag", "neither a weights file nor"),
                        (f"hf-clip:{tmp_path}", "no config.json")]:
        with pytest.raises(OODBenchError, match=match):
            oodbench.load_model(spec, in_dataset="fashion_mnist")
    with pytest.raises(OODBenchError, match="applies to open_clip"):
        oodbench.load_model("torchvision:resnet18:none", clip={"names": ["a"]})
    with pytest.raises(OODBenchError, match="mcm scores a zero-shot CLIP|glmcm scores a zero-shot CLIP"):
        oodbench.method("glmcm").fit(oodbench.load_model("torchvision:resnet18:none"))
    with pytest.raises(OODBenchError, match="exactly one"):
        oodbench.models.load_clip(SPEC, names=["a"], templates=["no slot"])
    code = main(["eval", "--model", SPEC, "--method", "mcm", "--in", "fashion_mnist", "--out", "noise:gaussian",
                 "--set", f"clip.names={three}", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "3 names" in err


def test_class_names_follow_the_dataset_spec(tmp_path):
    from oodbench.data.classnames import class_names

    for split in ("train", "test"):
        for name in ("red_fox", "cat"):
            (tmp_path / "set" / split / name).mkdir(parents=True)
    assert class_names(f"folder:{tmp_path / 'set'}") == ["cat", "red fox"]   # sorted sub-folders, as the labels
    assert class_names("classes:8,0:fashion_mnist") == ["Bag", "T-shirt/top"]
    assert class_names("corrupt:gaussian_noise:3:cifar10") == class_names("cifar10")
    assert class_names("mnist")[:2] == ["zero", "one"] and class_names("digits") == [str(i) for i in range(10)]
    names = class_names("imagenet")
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]
    with pytest.raises(OODBenchError, match="not among"):
        class_names("classes:0,12:cifar10")


def test_clip_options_reach_the_model_from_the_cli_and_the_bench(tmp_path):
    from oodbench import workflow
    from oodbench.bench import plan

    options, rest = workflow.split_model_overrides(["clip.templates=x {}", "knn.k=3", "model.size=32"])
    assert options == {"clip": {"templates": "x {}"}, "size": 32} and rest == ["knn.k=3"]
    with pytest.raises(OODBenchError, match="clip options are"):
        workflow.split_model_overrides(["clip.prompt=x {}"])
    path = tmp_path / "grid.yaml"
    path.write_text(f"name: g\nin: [fashion_mnist]\nout: [noise:gaussian]\nmethods:\n"
                    f"  - {{method: mcm, model: '{SPEC}',\n"
                    f"     overrides: ['clip.templates=x {{}}', 'mcm.temperature=0.5']}}\n")
    entry = plan.load_bench(path).entries[0]
    assert entry.model_overrides == ["clip.templates=x {}"]
    imagenet = [e for e in plan.load_bench("imagenet").entries if (e.model or "").startswith("open_clip:")]
    assert {e.method for e in imagenet} >= {"mcm", "glmcm", "msp", "knn"}
