"""fairage.models.losses: Group DRO, Balanced MSE (BMC), DEX and label uncertainty, checked against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fairage.models.losses import (
    BMCLoss,
    GroupDRO,
    StageObjective,
    bmc_loss,
    bmc_loss_per_face,
    dex_expectation,
    dex_loss_per_face,
    dex_target_distribution,
    draw_targets,
    inverse_variance_weights,
    weighted_loss,
)

# --------------------------------------------------------------------------- Group DRO


def test_group_dro_q_update_on_two_groups_by_hand():
    dro = GroupDRO([2, 1], eta=0.5)
    assert dro.q.tolist() == [0.5, 0.5]
    per_face = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    loss = dro(per_face, torch.tensor([0, 0, 1]))
    # group losses 1.5 and 4.0; q ~ 0.5 e^(0.5*1.5), 0.5 e^(0.5*4) -> q1 = 1 / (1 + e^-1.25)
    q1 = 1.0 / (1.0 + math.exp(-1.25))
    assert dro.q.tolist() == pytest.approx([1 - q1, q1], rel=1e-6)
    assert float(loss.detach()) == pytest.approx((1 - q1) * 1.5 + q1 * 4.0, rel=1e-6)
    # the gradient of sum_g q_g mean_{i in g} l_i is q_g / n_g for each face
    loss.backward()
    assert per_face.grad.tolist() == pytest.approx([(1 - q1) / 2, (1 - q1) / 2, q1], rel=1e-6)
    # a batch without group 1: its loss counts as 0, so its weight falls
    dro(torch.tensor([2.0]), torch.tensor([0]))
    a, b = (1 - q1) * math.exp(0.5 * 2.0), q1
    assert dro.q.tolist() == pytest.approx([a / (a + b), b / (a + b)], rel=1e-6)


def _dro_in_process_group(
    rank: int, world: int, store: str, losses: torch.Tensor, groups: torch.Tensor, out: str
) -> None:
    """One process of a gloo group: Group DRO on its half of the batch; saves q and d loss / d losses."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        half = len(losses) // world
        mine = losses[rank * half : (rank + 1) * half].clone().requires_grad_(True)
        dro = GroupDRO([3, 3, 2], eta=0.5)
        dro(mine, groups[rank * half : (rank + 1) * half]).backward()
        torch.save({"q": dro.q.clone(), "grad": mine.grad.clone()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_group_dro_in_two_processes_acts_as_one_on_the_whole_batch(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    losses = torch.tensor([1.0, 3.0, 2.0, 6.0, 5.0, 4.0, 8.0, 7.0])
    groups = torch.tensor([0, 0, 1, 2, 0, 1, 1, 0])  # group 2 only in process 0's half
    mp.spawn(_dro_in_process_group, args=(2, str(tmp_path / "store"), losses, groups, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # by hand on all 8 faces: group means 4 (1, 3, 5, 7), 14/3 (2, 4, 8), 6 (6); q starts at 1/3 each
    means = np.array([4.0, 14.0 / 3.0, 6.0])
    q = np.exp(0.5 * means) / np.exp(0.5 * means).sum()
    for rank in ranks:
        np.testing.assert_allclose(rank["q"].numpy(), q, rtol=1e-6)
    # DDP averages the two processes' gradients: d/d loss_i of sum_g q_g mean_g = q_g(i) / n_g(i)
    sizes = np.array([4.0, 3.0, 1.0])
    averaged = torch.cat([rank["grad"] for rank in ranks]).numpy() / 2
    np.testing.assert_allclose(averaged, q[groups.numpy()] / sizes[groups.numpy()], rtol=1e-6)


def test_group_dro_size_adjustment_and_no_update():
    dro = GroupDRO([4, 1], eta=1.0, size_adjustment=1.0)
    # equal losses: only C / sqrt(n) = 0.5 and 1.0 differ -> q ~ e^0.5, e^1
    dro(torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    q1 = math.exp(1.0) / (math.exp(0.5) + math.exp(1.0))
    assert dro.q.tolist() == pytest.approx([1 - q1, q1], rel=1e-6)
    before = dro.q.clone()
    dro(torch.tensor([9.0, 0.0]), torch.tensor([0, 1]), update=False)
    assert torch.equal(dro.q, before)
    assert "q" in dro.state_dict()  # saved in checkpoints, so a resumed run continues the trajectory
    with pytest.raises(ValueError):
        GroupDRO([3, 0])


# --------------------------------------------------------------------------- Balanced MSE


def numpy_bmc(pred, target, var):
    """Ren et al.'s BMC with numpy: per face -log softmax_j(-(p_i - t_j)^2 / 2var) at j = i, times 2var."""
    logits = -((pred[:, None] - target[None, :]) ** 2) / (2 * var)
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return (lse - np.diag(logits)) * 2 * var


def test_bmc_on_a_three_face_batch():
    pred = np.array([0.1, 0.5, 0.9])
    target = np.array([0.2, 0.4, 1.0])
    var = 0.25
    want = numpy_bmc(pred, target, var)
    got = bmc_loss_per_face(torch.tensor(pred), torch.tensor(target), var)
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    # face 0 by hand: logits -(0.1-t)^2/0.5 = -0.02, -0.18, -1.62
    l0 = 0.02 + math.log(math.exp(-0.02) + math.exp(-0.18) + math.exp(-1.62))
    assert float(got[0]) == pytest.approx(l0 * 0.5, rel=1e-5)
    assert float(bmc_loss(torch.tensor(pred), torch.tensor(target), var)) == pytest.approx(want.mean(), rel=1e-5)


def _bmc_in_process_group(
    rank: int, world: int, store: str, pred: torch.Tensor, target: torch.Tensor, shares: list[int], out: str
) -> None:
    """One process of a gloo group: BMC on its share of the batch; saves the terms and d sum / d sigma."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        start = sum(shares[:rank])
        loss_fn = BMCLoss(init_sigma=0.5)
        terms = loss_fn(pred[start : start + shares[rank]], target[start : start + shares[rank]])
        terms.sum().backward()
        torch.save({"terms": terms.detach(), "sigma_grad": loss_fn.noise_sigma.grad.clone()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bmc_in_two_processes_contrasts_with_the_whole_batch(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    pred = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7], dtype=torch.float64)
    target = torch.tensor([0.2, 0.4, 1.0, 0.3, 0.6], dtype=torch.float64)
    shares = [3, 2]  # unequal, so the gather's padding is exercised
    mp.spawn(_bmc_in_process_group, args=(2, str(tmp_path / "store"), pred, target, shares, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # every face against all 5 targets, as one process on the whole batch
    got = torch.cat([rank["terms"] for rank in ranks]).numpy()
    np.testing.assert_allclose(got, numpy_bmc(pred.numpy(), target.numpy(), 0.25), rtol=1e-5)
    one_process = BMCLoss(init_sigma=0.5)
    one_process(pred, target).sum().backward()
    assert float(sum(rank["sigma_grad"] for rank in ranks)) == pytest.approx(
        float(one_process.noise_sigma.grad), rel=1e-5
    )


def test_bmc_noise_sigma_is_learnable():
    loss_fn = BMCLoss(init_sigma=0.5)
    pred = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    terms = loss_fn(pred, torch.tensor([0.2, 0.4, 1.0]))
    assert terms.tolist() == pytest.approx(
        numpy_bmc(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.4, 1.0]), 0.25).tolist(), rel=1e-5
    )
    terms.mean().backward()
    assert loss_fn.noise_sigma.grad is not None and float(loss_fn.noise_sigma.grad) != 0.0
    assert pred.grad is not None


# --------------------------------------------------------------------------- DEX


def test_dex_expectation():
    logits = torch.full((3, 101), -1e4)
    logits[0, 20] = logits[0, 30] = 0.0  # half 20, half 30 -> 25
    logits[1] = 0.0  # uniform over 0..100 -> 50
    logits[2, 7] = 0.0  # all on 7
    assert dex_expectation(logits).tolist() == pytest.approx([25.0, 50.0, 7.0], abs=1e-4)
    # softmax(log p) = p: probabilities 0.2 at 10 and 0.8 at 60 -> 2 + 48
    p = torch.full((1, 101), 1e-12)
    p[0, 10], p[0, 60] = 0.2, 0.8
    assert float(dex_expectation(p.log())[0]) == pytest.approx(50.0, abs=1e-3)


def test_dex_targets_and_loss():
    one_hot = dex_target_distribution(torch.tensor([49.6, 120.0, -3.0]))
    assert one_hot.argmax(1).tolist() == [50, 100, 0] and one_hot.sum(1).tolist() == [1.0, 1.0, 1.0]
    gauss = dex_target_distribution(torch.tensor([50.0]), sigma=1.0)[0]
    assert float(gauss.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(gauss[50] / gauss[51]) == pytest.approx(math.exp(0.5), rel=1e-5)
    assert float(gauss[49]) == pytest.approx(float(gauss[51]), rel=1e-6)
    logits = torch.randn(2, 101, generator=torch.Generator().manual_seed(0))
    ce = dex_loss_per_face(logits, torch.tensor([30.0, 70.2]))
    log_p = torch.log_softmax(logits, 1)
    assert ce.tolist() == pytest.approx([-float(log_p[0, 30]), -float(log_p[1, 70])], rel=1e-5)


# --------------------------------------------------------------------------- label uncertainty


def test_label_noise_draw_is_seeded_per_epoch():
    ages = torch.full((20000,), 40.0)
    std = torch.full((20000,), 3.0)
    a, b, c = draw_targets(ages, std, 7, 0), draw_targets(ages, std, 7, 0), draw_targets(ages, std, 7, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, draw_targets(ages, std, 8, 0))
    assert float(a.mean()) == pytest.approx(40.0, abs=0.1) and float(a.std()) == pytest.approx(3.0, rel=0.03)
    # no spread: the recorded ages; a draw below 0 is clamped
    assert torch.equal(draw_targets(torch.tensor([5.0, 60.0]), torch.zeros(2), 0, 0), torch.tensor([5.0, 60.0]))
    assert float(draw_targets(torch.zeros(1000), torch.full((1000,), 2.0), 0, 0).min()) == 0.0


def test_inverse_variance_weights():
    # 1/max(std, 1)^2 = 1, 1/4, 1 -> mean 3/4 -> 4/3, 1/3, 4/3
    w = inverse_variance_weights(torch.tensor([1.0, 2.0, 0.5]), floor=1.0)
    assert w.tolist() == pytest.approx([4 / 3, 1 / 3, 4 / 3], rel=1e-6)


# --------------------------------------------------------------------------- stage objective


def test_objective_plain_mse_equals_the_weighted_loss():
    out = torch.tensor([0.3, 0.5, 0.2])
    age = torch.tensor([25.0, 60.0, 18.0])
    w = torch.tensor([0.5, 2.0, 0.5])
    objective = StageObjective("mse", label_scale=100.0)
    assert float(objective(out, age, w)) == pytest.approx(float(weighted_loss(out, age / 100, w, "mse")), rel=1e-6)
    huber = StageObjective("huber", label_scale=100.0, huber_delta=5.0)
    assert float(huber(out, age, None)) == pytest.approx(
        float(weighted_loss(out, age / 100, None, "huber", 0.05)), rel=1e-6
    )


def test_objective_std_weights_and_dro_by_hand():
    # linear output (years): squared errors 4, 1, 9; std 1, 2, 1 -> weights 4/3, 1/3, 4/3 (mean of 1, 1/4, 1)
    out = torch.tensor([12.0, 21.0, 33.0])
    age = torch.tensor([10.0, 20.0, 30.0])
    objective = StageObjective("mse", face_ages=age, face_std=torch.tensor([1.0, 2.0, 1.0]), label_std="weight")
    loss = objective(out, age, None, torch.tensor([0, 1, 2]))
    assert float(loss) == pytest.approx((4 * 4 / 3 + 1 / 3 + 9 * 4 / 3) / 3, rel=1e-6)
    # validation: unweighted mean
    assert float(objective(out, age, None, None, train=False)) == pytest.approx(14 / 3, rel=1e-6)
    # Group DRO over groups {0, 1} and {2}, sample weights 1, 2, 1: group losses (4 + 2) / 2 = 3 and 9
    dro = StageObjective("mse", dro=GroupDRO([2, 1], eta=0.1), face_groups=torch.tensor([0, 0, 1]))
    loss = dro(out, age, torch.tensor([1.0, 2.0, 1.0]), torch.tensor([0, 1, 2]))
    q1 = 1 / (1 + math.exp(-0.1 * 6))
    assert float(loss) == pytest.approx((1 - q1) * 3 + q1 * 9, rel=1e-6)


def test_objective_sample_draws_targets_by_face_index():
    ages = torch.tensor([10.0, 20.0, 30.0, 40.0])
    objective = StageObjective("mae", face_ages=ages, face_std=torch.full((4,), 2.0), label_std="sample", seed=3)
    objective.start_epoch(0)
    targets = draw_targets(ages, torch.full((4,), 2.0), 3, 0)
    index = torch.tensor([2, 0])
    # prediction = the recorded age: the loss is |drawn - recorded|
    loss = objective(ages[index], ages[index], None, index)
    assert float(loss) == pytest.approx(float((targets[index] - ages[index]).abs().mean()), rel=1e-6)
    objective.start_epoch(1)
    assert not torch.equal(objective.epoch_targets, targets)
    with pytest.raises(ValueError, match="index"):
        objective(ages, ages, None, None)
