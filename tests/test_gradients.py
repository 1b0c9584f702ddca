"""GradNorm closed form, per-layer gradient norms (torch.func) and the energy outlier-exposure fine-tuning."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.detectors import gradients as G
from oodbench.errors import OODBenchError
from oodbench.nets.classifiers import build_classifier

ARCHS = [("small_cnn", 1, {"width": 8}), ("resnet20", 3, {})]


def _net(arch, channels, kw, seed=0, num_classes=5):
    torch.manual_seed(seed)
    net = build_classifier(arch, channels, num_classes, **kw)
    with torch.no_grad():  # spread the logits so softmax is far from uniform (a sharper test of the formula)
        net.head.weight.mul_(20.0)
        for m in net.modules():  # non-trivial BatchNorm statistics, so eval mode matters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _openood_gradnorm(net, x, temperature):
    """The reference: one backward pass per sample, L1 norm of the head weight's gradient of KL(u || softmax(z/T))."""
    scores = []
    for i in range(len(x)):
        net.zero_grad()
        logits = net(x[i:i + 1])
        targets = torch.full_like(logits, 1.0 / logits.shape[1])
        loss = torch.mean(torch.sum(-targets * F.log_softmax(logits / temperature, dim=-1), dim=-1))
        loss.backward()
        scores.append(net.head.weight.grad.abs().sum())
    return torch.stack(scores)


@pytest.mark.parametrize("arch,channels,kw", ARCHS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_gradnorm_closed_form_equals_autograd_loop(arch, channels, kw, temperature):
    net = _net(arch, channels, kw)
    x = torch.randn(6, channels, 8, 8)
    with torch.no_grad():
        h = net.features(x)
        closed = G.gradnorm_scores(h, net.head(h), temperature)
    reference = _openood_gradnorm(net, x, temperature)
    rel = ((closed - reference).abs() / reference.abs()).max().item()
    assert rel < 1e-5, rel
    assert closed.std() > 0  # not a degenerate constant


def _loop_layer_norms(net, x, layers):
    """The reference: each sample alone, loss CE(f(x), argmax), backward, L2 norm of each weight's gradient."""
    params = dict(net.named_parameters())
    rows = {name: [] for name in layers}
    for i in range(len(x)):
        net.zero_grad()
        logits = net(x[i:i + 1])
        F.cross_entropy(logits, logits.argmax(1)).backward()
        for name in layers:
            rows[name].append(params[name].grad.norm())
    return {name: torch.stack(v) for name, v in rows.items()}


@pytest.mark.parametrize("arch,channels,kw", ARCHS)
def test_vmap_layer_norms_equal_per_sample_loop_for_every_layer(arch, channels, kw):
    net = _net(arch, channels, kw, seed=1)
    x = torch.randn(5, channels, 8, 8)
    fast = G.per_layer_grad_norms(net, x, micro_batch=2)  # 2 does not divide 5: the last micro-batch is short
    layers = G.weight_names(net)
    slow = _loop_layer_norms(net, x, layers)
    assert list(fast) == layers and "head.weight" in layers
    for name in layers:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-7, msg=name)


def test_last_layer_norm_is_residual_times_feature_norm():
    net = _net("small_cnn", 1, {"width": 8}, seed=2)
    x = torch.randn(7, 1, 8, 8)
    norms = G.per_layer_grad_norms(net, x, layers=["head.weight"])
    with torch.no_grad():
        h = net.features(x)
        p = torch.softmax(net.head(h), 1)
    expected = (p - F.one_hot(p.argmax(1), p.shape[1])).norm(dim=1) * h.norm(dim=1)
    torch.testing.assert_close(norms["head.weight"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(G.last_layer_grad_norm(h, net.head(h)), expected)


def test_weight_names_skip_batchnorm_and_biases():
    net = _net("small_cnn", 1, {"width": 8})
    names = G.weight_names(net)
    convs_and_linears = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(names) == len(convs_and_linears) == 4
    assert all(n.endswith(".weight") for n in names)
    bn_names = {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_names and not bn_names & set(names)


def test_batchnorm_runs_in_eval_mode_and_mode_is_restored():
    net = _net("small_cnn", 1, {"width": 8}).train()
    x = torch.randn(4, 1, 8, 8)
    alone = G.per_layer_grad_norms(net, x[:1], micro_batch=1)
    together = G.per_layer_grad_norms(net, x, micro_batch=4)  # batch statistics would couple the samples
    assert net.training
    for name in alone:
        torch.testing.assert_close(together[name][:1], alone[name], rtol=1e-5, atol=1e-7)


def test_auto_micro_batch_follows_the_memory_budget():
    net = _net("small_cnn", 1, {"width": 8})
    x = torch.randn(3, 1, 8, 8)
    layers = G.weight_names(net)
    small, large = (G.auto_micro_batch(net, x, layers, mb) for mb in (0.05, 50))
    assert 1 <= small < large


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).double()
    b = torch.randint(2, 8, (30,), generator=g).double()
    expected = roc_auc_score([0] * 40 + [1] * 30, torch.cat([a, b]).numpy())
    assert abs(G.auroc(a, b) - expected) < 1e-12


def test_select_layer_picks_the_separating_layer():
    id_norms = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([1.0, 1.0, 1.0])}
    ood_norms = {"a": torch.tensor([2.5, 0.5, 1.5]), "b": torch.tensor([2.0, 3.0, 4.0])}
    best, aurocs = G.select_layer(id_norms, ood_norms)
    assert best == "b" and aurocs["b"] == 1.0 and aurocs["a"] < 1.0


def test_bad_network_and_unknown_layer_are_clear_errors():
    with pytest.raises(OODBenchError, match="features/head"):
        G.check_split(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "gradnorm")
    net = _net("small_cnn", 1, {"width": 8})
    with pytest.raises(OODBenchError, match="unknown layer 'body.nope'"):
        G.per_layer_grad_norms(net, torch.randn(2, 1, 8, 8), layers=["body.nope"])
    with pytest.raises(OODBenchError, match="temperature"):
        G.gradnorm_scores(torch.ones(2, 3), torch.ones(2, 4), temperature=0)
