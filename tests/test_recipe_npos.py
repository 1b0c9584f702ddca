"""The NPOS recipe (recipes.NPOS): its outlier synthesis and loss equal a transcription of OpenOOD v1.5's
npos_trainer.py written here (generate_outliers with faiss, the BCE of the MLP, CIDER's two losses) fed the same
noise and picks; defining properties; a tiny CLI run; one-line errors."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodbench import config as configs
from oodbench.cli import main
from oodbench.detectors import recipes
from oodbench.engine import checkpoint
from oodbench.nets.classifiers import build_classifier

from conftest import fails
from test_recipes import TINY, openood_cider_losses, train_cli


# -- transcription of OpenOOD v1.5 openood/trainers/npos_trainer.py (faiss's CPU IndexFlatL2 for its GPU one) -----
def openood_knn_decrease(target, index, K, select):
    normed_target = target / torch.norm(target, p=2, dim=1, keepdim=True)
    distance, _ = index.search(normed_target.numpy(), K)
    k_th_distance = torch.from_numpy(distance[:, -1])
    k_th_distance, minD_idx = torch.topk(k_th_distance, select)
    return minD_idx, k_th_distance


def openood_knn_distance(target, index, K, num_points, length):
    normed_target = target / torch.norm(target, p=2, dim=1, keepdim=True)
    distance, _ = index.search(normed_target.numpy(), K)
    k_th = torch.from_numpy(distance[:, -1]).view(length, -1)
    k_th_distance, minD_idx = torch.topk(k_th, num_points, dim=0)
    minD_idx = minD_idx.squeeze()
    point_list = []
    for i in range(minD_idx.shape[1]):
        point_list.append(i * length + minD_idx[:, i])
    return target[torch.cat(point_list)]


def openood_generate_outliers(ID, negative_samples, picks, ID_points_num, K, select, cov_mat, pic_nums):
    """generate_outliers with np.random.choice(select, pic_nums, replace=False) given as `picks`."""
    import faiss

    length = negative_samples.shape[0]
    normed_data = ID / torch.norm(ID, p=2, dim=1, keepdim=True)
    rand_ind = np.random.default_rng(0).choice(normed_data.shape[0], normed_data.shape[0], replace=False)
    index = faiss.IndexFlatL2(ID.shape[1])
    index.add(normed_data[rand_ind].numpy())
    minD_idx, _ = openood_knn_decrease(ID, index, K, select)
    minD_idx = minD_idx[picks]
    data_point_list = torch.cat([ID[i:i + 1].repeat(length, 1) for i in minD_idx])
    negative_sample_cov = cov_mat * negative_samples.repeat(pic_nums, 1)
    negative_sample_list = negative_sample_cov + data_point_list
    return openood_knn_distance(negative_sample_list, index, K, ID_points_num, length)


def openood_fifo(data_dict, penultimate, target):
    """The queue update once every class is full: per sample, drop the oldest row and append."""
    data_dict = data_dict.clone()
    for index in range(len(target)):
        key = int(target[index])
        data_dict[key] = torch.cat((data_dict[key][1:], penultimate[index].detach().view(1, -1)), 0)
    return data_dict


def openood_bce(energy_score_for_fg, energy_score_for_bg):
    input_for_lr = torch.cat((energy_score_for_fg, energy_score_for_bg), 0).squeeze()
    labels_for_lr = torch.cat((torch.ones(len(energy_score_for_fg)), torch.zeros(len(energy_score_for_bg))), -1)
    return torch.nn.BCEWithLogitsLoss()(input_for_lr.view(-1), labels_for_lr)


SMALL = dict(sample_number=24, sample_from=30, k=5, select=8, pick_nums=2, id_points_num=6, start_epoch=0)


def queue_features(c=3, s=24, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, s, d, generator=g) + 1.0).relu()          # non-negative, as penultimate ReLU features


def test_npos_outliers_equal_openood_with_the_same_noise_and_picks():
    queue = queue_features()[0]
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(30, 10, generator=g)
    for picks in (torch.tensor([3, 0]), torch.tensor([7, 5])):
        ref = openood_generate_outliers(queue, noise, picks, 6, 5, 8, 0.1, 2)
        ours = recipes.npos_outliers(queue, noise, picks, 5, 8, 6, 0.1, "released")
        torch.testing.assert_close(ours, ref)
        assert ours.shape == (12, 10)


def test_npos_knn_without_faiss_gives_the_same_outliers(monkeypatch):
    queue, noise = queue_features()[1], torch.randn(30, 10, generator=torch.Generator().manual_seed(2))
    picks = torch.tensor([1, 4])
    with_faiss = recipes.npos_outliers(queue, noise, picks, 5, 8, 6, 0.1, "per_point")
    d_faiss = recipes.kth_sq_distance(noise.abs(), queue, 5)
    monkeypatch.setitem(sys.modules, "faiss", None)             # import faiss raises ImportError
    torch.testing.assert_close(recipes.kth_sq_distance(noise.abs(), queue, 5), d_faiss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(recipes.npos_outliers(queue, noise, picks, 5, 8, 6, 0.1, "per_point"), with_faiss)


@pytest.mark.parametrize("selection", ["released", "per_point"])
def test_npos_outliers_lie_farther_from_the_id_features_than_their_boundary_points(selection):
    """By k-NN distance to the class queue (normalised): the boundary points are the farthest ID points, and the
    kept candidates around each lie farther still, on average; per_point: each point's kept candidates are its
    farthest ones."""
    queue = queue_features(c=1, s=200, d=8, seed=3)[0]
    noise = torch.randn(300, 8, generator=torch.Generator().manual_seed(4))
    k, select = 20, 40
    id_distance = recipes.kth_sq_distance(queue, queue, k)
    boundary = recipes.npos_boundary(queue, k, select)
    assert set(boundary.tolist()) == set(id_distance.topk(select).indices.tolist())
    picks = torch.tensor([0, 1, 2, 3])
    out = recipes.npos_outliers(queue, noise, picks, k, select, 30, 0.5, selection)
    d_out = recipes.kth_sq_distance(out, queue, k).view(4, 30)
    d_points = id_distance[boundary[picks]]
    assert (d_out.mean(1) > d_points).all()
    assert d_out.mean() > id_distance[boundary].mean() > id_distance.mean()
    if selection == "per_point":
        cands = (queue[boundary[picks]][:, None] + 0.5 * noise[None]).reshape(-1, 8)
        d_all = recipes.kth_sq_distance(cands, queue, k).view(4, 300)
        torch.testing.assert_close(d_out, d_all.topk(30, dim=1).values)


def small_model(seed=0, **options):
    torch.manual_seed(seed)
    recipe = recipes.NPOS(embed_dim=6, **{**SMALL, **options})
    model = recipes.RecipeNet(build_classifier("small_cnn", 1, 3, width=4), recipe)
    return recipe, model


def test_npos_loss_equals_openood_pieces_on_the_same_draws():
    recipe, model = small_model()
    state = model.extra["npos"]
    images = torch.rand(24, 1, 8, 8)
    labels = torch.arange(24) % 3
    recipe.initialise(model, images, labels, lambda x: x)
    d = state.queue.shape[-1]
    state.queue.copy_(queue_features(c=3, s=24, d=d, seed=5))
    state.count.fill_(24)
    model.train()
    x, y = images[:12], labels[:12]
    views = torch.cat([x, x.flip(3)])
    queue0, protos0 = state.queue.clone(), state.prototypes.clone()
    torch.manual_seed(11)
    loss, stats = recipe.loss(model, views, y)
    after = torch.rand(())
    # the reference: OpenOOD's step on the same network, queue, prototypes and draws
    torch.manual_seed(11)
    target = y.repeat(2)
    penultimate = model.net.features(views)
    data_dict = openood_fifo(queue0, penultimate, target)
    negative_samples = torch.randn(30, d)
    ood = torch.cat([openood_generate_outliers(data_dict[c], negative_samples, torch.randperm(8)[:2], 6, 5, 8, 0.1, 2)
                     for c in range(3)])
    assert torch.rand(()) == after                              # the same draws, in the same order
    lr_reg = openood_bce(state.mlp(penultimate), state.mlp(ood))
    normed = F.normalize(state.head(penultimate), dim=1)
    sphere, ref_protos = openood_cider_losses(normed, target, protos0, 0.95, 0.1, 1.0 / 0.5)   # w_comp / w_disp
    ref = 0.5 * sphere + 0.1 * lr_reg
    torch.testing.assert_close(state.queue, data_dict)
    torch.testing.assert_close(state.prototypes, ref_protos)
    torch.testing.assert_close(stats["npos_reg"], lr_reg.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for p, name in ((state.mlp[0].weight, "mlp"), (state.head[0].weight, "head")):
        (g_ours,) = torch.autograd.grad(loss, p, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, p, retain_graph=True)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6, msg=name)


def test_npos_embeddings_are_unit_norm_and_the_uncertainty_loss_waits_for_full_queues_and_its_epoch():
    recipe, model = small_model(start_epoch=3)
    recipe.set_epoch_length(2)
    state = model.extra["npos"]
    model.train()
    x, y = torch.rand(24, 1, 8, 8), torch.arange(24) % 3
    regs = []
    for step in range(6):
        loss, stats = recipe.loss(model, torch.cat([x, x]), y)
        regs.append(float(stats["npos_reg"]))
        assert torch.isfinite(loss)
    # 16 features per class a step: the queues (24) are full after step 2; epoch 3 (from 1) starts at step 5
    assert regs[:4] == [0.0] * 4 and regs[4] > 0 and regs[5] > 0
    with torch.no_grad():
        z = state(model(x)[0])
    torch.testing.assert_close(z.norm(dim=1), torch.ones(24))
    torch.testing.assert_close(state.prototypes.norm(dim=1), torch.ones(3))


def test_npos_mlp_learns_at_a_tenth_of_the_rate(tmp_path):
    runs = tmp_path / "runs"
    run = train_cli(runs, "npos", 2, "npos", *TINY_NPOS, "--set", "train.ckpt_every=1")
    saved = checkpoint.load(run / "checkpoints" / "classifier" / "step_00000002.pt")
    groups = saved["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr_scale"] == 0.1
    assert groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"])


TINY_NPOS = ["--set", "npos.embed_dim=8", "--set", "npos.sample_number=2", "--set", "npos.sample_from=10",
             "--set", "npos.k=2", "--set", "npos.select=2", "--set", "npos.pick_nums=2",
             "--set", "npos.id_points_num=3", "--set", "npos.start_epoch=0"]


def test_cli_npos_run_synthesises_outliers_and_is_scored_with_knn(tmp_path):
    runs = tmp_path / "runs"
    run = train_cli(runs, "npos", 6, "npos", *TINY_NPOS)
    cfg = configs.read_yaml(run / "config.yaml")
    assert cfg["train"]["recipe"] == "npos" and cfg["npos"]["k"] == 2 and cfg["npos"]["w_disp"] == 0.5
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "step" in line]
    assert lines[0]["npos_reg"] == 0.0                 # queues still filling
    assert any(r["npos_reg"] > 0 for r in lines)       # then the uncertainty loss is on
    for r in lines:
        assert r["loss"] == pytest.approx(0.5 * r["dis"] + r["comp"] + 0.1 * r["npos_reg"], rel=1e-5)
    assert main(["eval", "--method", "knn", "--in", "digits", "--runs-dir", str(runs), "--run-name", "npos",
                 "--out", "noise:gaussian", "--limit", "60", "--device", "cpu", "--set", "knn.k=5"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--set", "npos.k=2000"], "npos.k (2000) must be at most npos.sample_number (1000)"),
    (["--set", "npos.pick_nums=300"], "npos.pick_nums (300) must be at most npos.select (200)"),
    (["--set", "npos.id_points_num=700"], "npos.id_points_num (700) must be at most npos.sample_from (600)"),
    (["--set", "npos.select=0"], "npos.select must be a whole number >= 1"),
    (["--set", "npos.selection=random"], "npos.selection 'random': use released or per_point"),
    (["--set", "npos.proto_m=1"], "npos.proto_m must be in [0, 1)"),
    (["--set", "npos.mlp_decay_rate=0"], "npos.mlp_decay_rate must be a number > 0"),
    (["--set", "npos.K=3"], "unknown config key 'npos.K'"),
])
def test_bad_npos_input_is_one_line_and_writes_nothing(extra, message, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert message in fails(capsys, ["train", "--method", "npos", *extra, "--runs-dir", str(runs), *TINY,
                                     "--set", "train.steps=1"])
    assert not runs.exists()
