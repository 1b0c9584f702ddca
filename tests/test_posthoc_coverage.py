"""NAC (equal to pytorch-ood 0.4.0's NACUE), VRA, Relation and iODIN on a tiny model and images, each against its
reference, plus each method's defining property."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from oodbench.data import ImageSet
from oodbench.detectors import method
from oodbench.errors import OODBenchError
from oodbench.models import wrap

K, D = 5, 16


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, D, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(D, K)

    def forward(self, x):
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))))


MEAN, STD = [0.5] * 3, [0.25] * 3


@pytest.fixture(scope="module")
def conv(tiny_images):
    torch.manual_seed(0)
    net = ConvNet().eval()
    model = wrap(net, mean=MEAN, std=STD, layers=["act1", "act2"])
    x_train, x = tiny_images(120, 4), tiny_images(40, 5)
    return dict(model=model, net=net, train=ImageSet(x_train, None, "train"), x_train=x_train, x=x)


def normalise(x):
    return (x.float() / 255 - 0.5) / 0.25


def close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol)


# -- NAC -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, dict(alpha=[10.0, 1000.0], m_bins=[7, 20], o_star=[3, 10])])
def test_nac_equals_pytorch_ood_nacue(conv, options):
    from pytorch_ood.detector import NACUE

    net = conv["net"]
    ref = NACUE(net, layers=[net.act1, net.act2], **options)
    loader = torch.utils.data.DataLoader(normalise(conv["x_train"]), batch_size=32)
    ref.fit(loader)
    expected = ref.predict(normalise(conv["x"]))
    m = method("nac", **options).fit(conv["model"], conv["train"])
    close(m.score(conv["x"]), expected)
    # the fitted counts are NACUE's, layer by layer
    for (name, *_), stats in zip(m.settings(), ref._stats):
        assert torch.equal(m.stats_[name].cpu(), stats.counts)


def authors_nac(net, layers, x_train, x, alpha, m, o):
    """The authors' code (BierOne/ood_coverage: nac/coverage.py KMNC and Estimator, instr_state.kl_grad,
    utils.get_state_func('sigmoid(o*g_kl)') and avg_pooling), per layer module with its α, M, O."""
    def states(inp):
        kept = []
        hooks = [mod.register_forward_hook(lambda _m, _i, out: kept.append(out)) for mod in layers]
        p = net(inp)
        for h in hooks:
            h.remove()
        targets = torch.ones_like(p) / p.shape[-1]
        loss = torch.sum(-targets * torch.nn.LogSoftmax(dim=-1)(p), dim=-1)
        result = []
        for b_state in kept:
            grad = torch.autograd.grad(loss.sum(), b_state, retain_graph=True)[0]
            s_, g_ = (b_state.sum(dim=[2, 3]), grad.sum(dim=[2, 3])) if b_state.dim() > 2 else (b_state, grad)
            result.append(s_.detach() * g_.detach())
        return result

    def logspace(base, num):
        num = int(num / 2)
        t = np.emath.logn(base, np.linspace(1, np.sqrt(base), num=num))
        t = np.concatenate([t[:-1], (1 - t)[::-1]])
        t[-1] += 1e-2
        return torch.from_numpy(np.append(t, 1.2))

    def active(st, thresh, mm):
        return (st.unsqueeze(1) >= thresh[:mm - 1].unsqueeze(0)) & (st.unsqueeze(1) < thresh[1:mm].unsqueeze(0))

    scores = torch.zeros(len(x), dtype=torch.float64)
    for st_train, st, a, mm, oo in zip(states(x_train), states(x), alpha, m, o):
        sig = lambda v: 1 / (1 + torch.exp(-a * v))
        thresh = logspace(1e3, mm).view(mm, -1).repeat(1, st.shape[1])
        t_act = active(sig(st_train), thresh, mm).sum(dim=0)
        t_score = torch.min(t_act / oo, torch.ones_like(t_act, dtype=torch.float64))
        scores += (active(sig(st), thresh, mm) * t_score.unsqueeze(0)).sum(dim=1).mean(dim=1) / len(layers)
    return scores


@pytest.mark.parametrize("alpha,m,o", [([100.0] * 3, [50] * 3, [50] * 3), ([1000.0, 10.0, 3000.0], [10, 500, 20],
                                                                           [3, 10, 1])])
def test_nac_authors_variant_equals_the_authors_code(conv, alpha, m, o):
    net = conv["net"]
    model = wrap(net, mean=MEAN, std=STD, layers=["act1", "act2", "pool.0"])
    expected = authors_nac(net, [net.act1, net.act2, net.pool[0]], normalise(conv["x_train"]), normalise(conv["x"]),
                           alpha, m, o)
    got = method("nac", variant="authors", alpha=alpha, m_bins=m, o_star=o).fit(model, conv["train"])
    close(got.score(conv["x"]), -expected)
    assert len(set(expected.tolist())) > 5                      # the scores are spread, not all one value


def test_nac_coverage_of_the_fit_images_is_full_with_o_star_one(conv):
    """Every neuron state of a fit image lies in a bin the fit saw: with O* = 1 each layer's coverage is 1, so a fit
    image scores −(number of layers); images outside the fit set cover less."""
    m = method("nac", o_star=1).fit(conv["model"], conv["train"])
    close(m.score(conv["x_train"][:30]), torch.full((30,), -2.0))
    authors = method("nac", o_star=1, variant="authors").fit(conv["model"], conv["train"])
    close(authors.score(conv["x_train"][:30]), torch.full((30,), -1.0))      # the authors average the layers
    other = m.score(conv["x"])
    assert (other >= -2.0).all() and (other <= 0).all()
    # coverage grows with the counts: refitting on the fit set twice (counts doubled) with O* doubled is the same
    twice = method("nac", o_star=100).fit(conv["model"], ImageSet(torch.cat([conv["x_train"]] * 2), None, "2x"))
    once = method("nac", o_star=50).fit(conv["model"], conv["train"])
    close(twice.score(conv["x"]), once.score(conv["x"]))


def test_nac_counts_in_blocks_equal_the_counts_at_once(conv, monkeypatch):
    from oodbench.detectors import nac

    whole = method("nac").fit(conv["model"], conv["train"]).stats_
    monkeypatch.setattr(nac, "FIT_BLOCK", 100)    # a few rows at a time
    blocks = method("nac").fit(conv["model"], conv["train"]).stats_
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)


def test_nac_geometric_bins_are_dense_near_0_and_1():
    from oodbench.detectors.nac import geometric_bins

    z = torch.tensor([1e-7, 1e-4, 0.49, 0.51, 1 - 1e-4, 1 - 1e-7])
    idx = geometric_bins(z, 10)
    assert idx.tolist()[0] == 0 and idx.tolist()[-1] == 9
    assert idx[2] == 4 and idx[3] == 5          # the two middle bins meet at 0.5
    assert 0 < idx[1] < 4 and 5 < idx[4] < 9


def test_nac_options_and_state(conv):
    m = method("nac").fit(conv["model"], conv["train"])
    m2 = method("nac").use_model(conv["model"]).load_state_dict(m.state_dict())
    close(m2.score(conv["x"]), m.score(conv["x"]))
    with pytest.raises(OODBenchError, match="nac.m_bins"):
        method("nac", m_bins=[5]).fit(conv["model"], conv["train"])
    with pytest.raises(OODBenchError, match="nac.alpha"):
        method("nac", alpha=-1.0).fit(conv["model"], conv["train"])
    with pytest.raises(OODBenchError, match="nac.variant"):
        method("nac", variant="openood").fit(conv["model"], conv["train"])
    with pytest.raises(OODBenchError, match="even nac.m_bins"):
        method("nac", variant="authors", m_bins=7).fit(conv["model"], conv["train"])
    counts = m.stats_
    m.set_params(m_bins=20)                     # drops the fitted counts of 50 bins; put them back by hand
    m.stats_, m.fitted_ = counts, True
    with pytest.raises(OODBenchError, match="fit again"):
        m.score(conv["x"])


# -- VRA -------------------------------------------------------------------------------------------------------------
def openood_features(net, data):
    """(logits, feature) of an OpenOOD backbone's forward(x, return_feature=True)."""
    feature = net.pool(net.act2(net.conv2(net.act1(net.conv1(data)))))
    return net.fc(feature), feature


def openood_vra(net, inp_val, inp, percentile_high=90, percentile_low=10):
    """vra_postprocessor.py: one pair of thresholds over every validation activation; clip; energy (its conf)."""
    with torch.no_grad():
        log = openood_features(net, inp_val)[1].numpy()
        high, low = np.percentile(log.flatten(), percentile_high), np.percentile(log.flatten(), percentile_low)
        feature = openood_features(net, inp)[1].clip(min=low, max=high)
        return torch.logsumexp(net.fc(feature.view(len(feature), -1)), dim=1)


@pytest.mark.parametrize("high,low", [(90, 10), (99, 1), (85, 15)])
def test_vra_equals_openood(conv, high, low):
    net = conv["net"]
    m = method("vra", percentile_high=high, percentile_low=low).fit(conv["model"], val=conv["train"])
    close(m.score(conv["x"]), -openood_vra(net, normalise(conv["x_train"]), normalise(conv["x"]), high, low))


@pytest.mark.parametrize("high,low", [(90, 10), (99, 1)])
def test_vra_per_feature_equals_pytorch_ood(conv, high, low):
    from pytorch_ood.detector import VRA

    net = conv["net"]
    ref = VRA(backbone=lambda x: openood_features(net, x)[1], head=net.fc, lower_percentile=low / 100,
              upper_percentile=high / 100)
    data = torch.utils.data.TensorDataset(normalise(conv["x_train"]), torch.zeros(len(conv["x_train"])).long())
    with torch.no_grad():
        ref.fit(torch.utils.data.DataLoader(data, batch_size=32))
        expected = ref.predict(normalise(conv["x"]))
    m = method("vra", percentile_high=high, percentile_low=low, thresholds="per_feature", fit_split="train")
    close(m.fit(conv["model"], conv["train"]).score(conv["x"]), expected)


def test_vra_clips_between_its_percentiles_and_is_energy_when_nothing_is_clipped(conv):
    model, train = conv["model"], conv["train"]
    features, logits = model.features_and_logits(conv["x_train"])
    m = method("vra", percentile_high=80, percentile_low=20).fit(model, val=train)
    shaped = m.shaped(features)
    low, high = m.stats_["low"], m.stats_["high"]
    assert shaped.min() >= low and shaped.max() <= high and low < high
    n = features.numel()   # a linearly interpolated percentile lies between two neighbouring order statistics

    def below(t, strict):
        return int(((features < t) if strict else (features <= t)).sum())

    for t, q in ((low, 0.2), (high, 0.8)):
        assert below(t, True) <= q * (n - 1) + 1 and below(t, False) >= q * (n - 1)
    # thresholds at the extremes of the fit set clip none of its activations: the energy score
    full = method("vra", percentile_high=100, percentile_low=0).fit(model, val=train)
    close(full.score(conv["x_train"]), -torch.logsumexp(logits, 1))
    for t in ("global", "per_feature"):
        f = method("vra", percentile_high=100, percentile_low=0, thresholds=t).fit(model, val=train)
        close(f.score_features(features, logits), -torch.logsumexp(logits, 1))


def test_vra_options_grid_and_state(conv):
    from oodbench.detectors import get

    assert get("vra").sweep() == {"percentile_high": [85, 90, 95, 99], "percentile_low": [1, 5, 10, 15]}
    m = method("vra").fit(conv["model"], val=conv["train"])
    m2 = method("vra").load_state_dict(m.state_dict()).use_model(conv["model"])
    close(m2.score(conv["x"]), m.score(conv["x"]))
    with pytest.raises(OODBenchError, match="percentile_low <= percentile_high"):
        method("vra", percentile_high=10, percentile_low=20).fit(conv["model"], val=conv["train"])
    with pytest.raises(OODBenchError, match="vra.thresholds"):
        method("vra", thresholds="channel").fit(conv["model"], val=conv["train"])
    with pytest.raises(OODBenchError, match="vra.fit_split"):
        method("vra", fit_split="test").fit(conv["model"], conv["train"])


# -- Relation --------------------------------------------------------------------------------------------------------
def openood_relation(net, inp_train, inp, pow=1, chunk=7, thres=0.03):
    """relation_postprocessor.py: normalise, kernel = clamp(f·f_t, 0) · (p·p_t), cut at thres, Σ sign·|r|^pow."""
    with torch.no_grad():
        logit_t, feat_t = openood_features(net, inp_train)
        logit, feat = openood_features(net, inp)
        feat_t = feat_t / torch.sqrt((feat_t ** 2).sum(-1) + 1e-10).reshape(-1, 1)
        feat = feat / torch.sqrt((feat ** 2).sum(-1) + 1e-10).reshape(-1, 1)
        prob_t, prob = torch.softmax(logit_t, 1), torch.softmax(logit, 1)
        score = []
        for i in range(0, len(feat), chunk):
            halves = []
            size = -(-len(feat_t) // 2)
            for j in range(2):
                dot = torch.clamp(feat[i:i + chunk] @ feat_t[j * size:(j + 1) * size].T, min=0.0)
                halves.append(dot * (prob[i:i + chunk] @ prob_t[j * size:(j + 1) * size].T))
            rel = torch.cat(halves, -1)
            rel_mask = (rel.abs() > thres) * rel
            score.append((rel_mask.sign() * rel_mask.abs() ** pow).sum(-1))
        return torch.cat(score)


@pytest.mark.parametrize("options", [{}, dict(pow=4), dict(pow=2, thres=0.1, block=100)])
def test_relation_equals_openood(conv, options):
    m = method("relation", **options).fit(conv["model"], conv["train"])
    ref_options = {k: v for k, v in options.items() if k != "block"}
    expected = openood_relation(conv["net"], normalise(conv["x_train"]), normalise(conv["x"]), **ref_options)
    close(m.score(conv["x"]), -expected)


def test_relation_is_the_total_edge_weight_to_the_training_nodes(conv):
    model = conv["model"]
    once = method("relation", thres=0.0).fit(model, conv["train"])
    twice = method("relation", thres=0.0).fit(model, ImageSet(torch.cat([conv["x_train"]] * 2), None, "2x"))
    close(twice.score(conv["x"]), 2 * once.score(conv["x"]))           # every training node adds its edge
    features, logits = model.features_and_logits(conv["x"])
    f_t, p_t = once.stats_["features"], once.stats_["probs"]
    f = features / features.norm(dim=1, keepdim=True)
    edges = (f @ f_t.T).clamp_min(0) * (logits.softmax(1) @ p_t.T)
    close(once.score_features(features, logits), -edges.sum(1), rtol=1e-4, atol=1e-5)
    cut = method("relation", thres=float(edges.max()) * (1 + 1e-4)).fit(model, conv["train"])
    cut_scores = cut.score(conv["x"])
    assert (cut_scores == 0).all()                                     # every edge cut: no relation
    assert "relation.thres" in cut.row_notes({"relation": cut_scores})["relation"][0]
    assert once.row_notes({"relation": once.score(conv["x"])}) == {}


def test_relation_options_grid_and_state(conv):
    from oodbench.detectors import get

    assert get("relation").sweep() == {"pow": [1, 2, 4, 6, 8]}
    m = method("relation").fit(conv["model"], conv["train"])
    m2 = method("relation").load_state_dict(m.state_dict()).use_model(conv["model"])
    close(m2.score(conv["x"]), m.score(conv["x"]))
    for bad in (dict(pow=0), dict(thres=-0.1), dict(block=0)):
        with pytest.raises(OODBenchError, match=f"relation.{next(iter(bad))}"):
            method("relation", **bad).fit(conv["model"], conv["train"])


# -- iODIN -----------------------------------------------------------------------------------------------------------
def openood_iodin(net, data, temperature=1000.0, noise=0.0014, std=STD):
    """iodin_postprocessor.py: CE of z/T against the prediction, one value per image (largest |grad|) moved."""
    data = data.clone().requires_grad_(True)
    output = net(data)
    labels = output.detach().argmax(axis=1)
    loss = nn.CrossEntropyLoss()(output / temperature, labels)
    loss.backward()
    grad = data.grad.detach()
    b = len(grad)
    abs_grad = abs(grad).view(b, -1)
    mask = torch.zeros_like(abs_grad, dtype=torch.uint8).scatter_(1, abs_grad.argmax(1, keepdim=True), 1)
    mask = mask.view_as(grad)
    gradient = (torch.ge(grad, 0).float() - 0.5) * 2
    for c in range(gradient.shape[1]):
        gradient[:, c] = gradient[:, c] / std[c]
    with torch.no_grad():
        out = net(torch.add(data.detach(), gradient * mask, alpha=-noise)) / temperature
    out = out - out.max(dim=1, keepdim=True).values
    return (out.exp() / out.exp().sum(dim=1, keepdim=True)).max(dim=1).values


@pytest.mark.parametrize("options", [{}, dict(temperature=1.0, epsilon=0.0028), dict(temperature=10.0, epsilon=0.05)])
def test_iodin_equals_openood(conv, options):
    m = method("iodin", **options).fit(conv["model"])
    ref = dict(temperature=options.get("temperature", 1000.0), noise=options.get("epsilon", 0.0014))
    close(m.score(conv["x"]), -openood_iodin(conv["net"], normalise(conv["x"]), **ref))


class Recorder(nn.Module):
    """The conv net, keeping every input it is given."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def test_iodin_moves_one_input_value_per_image_and_is_odin_on_one_value_images(conv, tiny_images):
    rec = Recorder(conv["net"])
    method("iodin", epsilon=0.05).fit(wrap(rec, mean=MEAN, std=STD, layers=["net.act1"])).score(conv["x"])
    clean, moved = rec.inputs
    changed = (clean != moved).flatten(1).sum(1)
    assert changed.tolist() == [1] * len(conv["x"])
    odin = method("odin", epsilon=0.05).fit(conv["model"]).score(conv["x"])
    assert not torch.allclose(method("iodin", epsilon=0.05).fit(conv["model"]).score(conv["x"]), odin)
    close((moved - clean).abs().flatten(1).amax(1), torch.full((len(conv["x"]),), 0.05 / STD[0]))
    # an image of one value: the one value moved is the whole image, so iODIN is ODIN
    torch.manual_seed(1)
    one = nn.Sequential(nn.Flatten(), nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, K))
    model = wrap(one, mean=[0.5], std=[0.3])
    x = tiny_images(30, 6)[:, :1, :1, :1]
    for options in ({}, dict(temperature=1.0, epsilon=0.05)):
        close(method("iodin", **options).fit(model).score(x), method("odin", **options).fit(model).score(x))
    # no step: the temperature-scaled MSP
    logits = conv["model"].logits(conv["x"])
    close(method("iodin", epsilon=0.0, temperature=10.0).fit(conv["model"]).score(conv["x"]),
          -(logits / 10.0).softmax(1).amax(1))


def test_iodin_grid_and_errors(conv):
    from oodbench.detectors import get

    assert get("iodin").sweep() == {"temperature": [1.0, 10.0, 100.0, 1000.0], "epsilon": [0.0014, 0.0028]}
    with pytest.raises(OODBenchError, match="iodin.temperature"):
        method("iodin", temperature=0.0).fit(conv["model"]).score(conv["x"])


# -- --tune over the OpenOOD grids -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vra", "relation", "iodin"])
def test_tune_picks_the_grid_point_of_best_validation_auroc(name, monkeypatch):
    import itertools

    from oodbench import metrics, workflow
    from oodbench.detectors.posthoc import SET_OUTPUTS
    from oodbench.workflow import fitting, tuning
    from test_tuning import Data, SmallNet, images

    def prepared(*overrides):
        torch.manual_seed(0)
        SET_OUTPUTS.items.clear()
        data = Data()
        monkeypatch.setattr(fitting, "train_split_loader", lambda cfg, device: data.load)
        run = workflow.ModelRun(wrap(SmallNet(), mean=MEAN, std=STD), None, fit=data.train, val=data.val,
                                runs_dir=False, id_test=ImageSet(images(40, 9), None, "id"))
        return run, run.prepare(name, ["tune.val_ood=some_val_ood", "tune.val_size=100", *overrides], "cpu"), data

    run, scoring, data = prepared()
    chosen = tuning.tune(run, scoring)
    grid = scoring.det.sweep()
    assert grid
    brute = {}
    for point in itertools.product(*grid.values()):
        _, other, _ = prepared(*[f"{name}.{k}={v}" for k, v in zip(grid, point)])
        brute[point] = metrics.evaluate(other.det.score(data.val.images[:100]).numpy(),
                                        other.det.score(data.ood.images[:100]).numpy())["auroc"]
    best = next(p for p, v in brute.items() if v == max(brute.values()))
    assert chosen == {f"{name}.{k}": v for k, v in zip(grid, best)}
