"""Sparse layers of engine/sparse.py against dense references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.sparse import (
    SparseBatchNorm,
    SparseConvBlock,
    SparseStage,
    Sites,
    SubmanifoldConv3x3,
    attention_entropy,
    budget_count,
    cdf_keep,
    select_sites,
    sparse_max_pool,
)


def kept(row: list[float], threshold: float) -> set[int]:
    keep = cdf_keep(torch.tensor([row]), threshold)[0]
    return set(keep.nonzero().flatten().tolist())


def test_cdf_keeps_smallest_set_reaching_threshold():
    assert kept([0.5, 0.3, 0.1, 0.1], 0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert kept([0.5, 0.3, 0.1, 0.1], 0.81) == {0, 1, 2}
    assert kept([0.1, 0.3, 0.1, 0.5], 0.8) == {3, 1}  # order of positions does not matter
    assert kept([0.05, 0.9, 0.05], 0.8) == {1}  # one dominant position
    assert kept([0.25, 0.25, 0.25, 0.25], 1.0) == {0, 1, 2, 3}


def test_cdf_is_per_row_without_loops():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.4, 0.4, 0.1, 0.1]])
    expected = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(cdf_keep(probs, 0.7), expected)


def test_selection_keeps_candidates_only():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    candidates = torch.tensor([[False, True, True, True], [False, False, False, False]])
    logp, sites = select_sites(logits, candidates, 2, 2, 0.8, None)
    assert sites.flat.tolist() == [1]  # frame 0: position 0 is no candidate; frame 1: none at all
    assert torch.isfinite(logp[1]).all()
    logp, sites = select_sites(logits, candidates, 2, 2, 0.8, 0.5)  # fixed budget: 2 per frame
    assert sites.flat.shape == (4,)
    assert sites.flat[:2].tolist() == [1, 2] or sites.flat[:2].tolist() == [1, 3]
    assert sites.valid.tolist() == [True, True, False, False]


def test_budget_count():
    assert budget_count(0.2, 576) == math.ceil(0.2 * 576)
    assert budget_count(0.001, 36) == 1
    assert budget_count(1.0, 36) == 36


def random_sites(n, h, w, fraction, seed=0, invalid=0.0):
    g = torch.Generator().manual_seed(seed)
    flat = (torch.rand(n * h * w, generator=g) < fraction).nonzero().flatten()
    valid = torch.rand(flat.numel(), generator=g) >= invalid
    return Sites(flat, valid, n, h, w)


def densify(rows: torch.Tensor, sites: Sites) -> torch.Tensor:
    """(K, C) rows -> (N, C, H, W) with zeros at inactive and invalid sites (differentiable)."""
    rows = torch.where(sites.valid[:, None], rows, torch.zeros_like(rows))
    flat = torch.zeros(sites.n * sites.h * sites.w, rows.shape[1]).index_put((sites.flat,), rows)
    return flat.view(sites.n, sites.h, sites.w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("invalid", [0.0, 0.3])
def test_submanifold_conv_equals_dense_conv_at_active_sites(invalid):
    torch.manual_seed(0)
    sites = random_sites(3, 7, 5, 0.4, invalid=invalid)
    conv = SubmanifoldConv3x3(4, 6)
    rows = torch.randn(sites.flat.numel(), 4).requires_grad_(True)  # invalid rows hold values too: never read
    out = conv(rows, sites.neighbour_table())  # (K, 6)
    weight = conv.weight.detach().clone().requires_grad_(True)
    ref_rows = rows.detach().clone().requires_grad_(True)
    ref = F.conv2d(densify(ref_rows, sites), weight, padding=1)  # (N, 6, H, W)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 6)[sites.flat]  # (K, 6)
    valid = sites.valid
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out) * valid[:, None]
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(conv.weight.grad, weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.grad[valid], ref_rows.grad[valid], atol=1e-5, rtol=1e-5)


def test_eval_block_folds_batchnorm_into_the_gathered_conv():
    """Evaluation mode: the BatchNorm folded into the conv and the neighbours gathered by
    index_select (the exported form) give the block's unfolded output; the conv alone
    gives the same rows with and without autograd (the two gathers)."""
    torch.manual_seed(3)
    sites = random_sites(2, 6, 5, 0.5, invalid=0.2)
    table = sites.neighbour_table()
    block = SparseConvBlock(4, 6)
    rows = torch.randn(sites.flat.numel(), 4)
    block(rows, table, sites.valid)  # one training step: running statistics away from 0 / 1
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 2)
        block.norm.bias.uniform_(-1, 1)
    block.eval()
    with torch.no_grad():
        folded = block(rows, table, sites.valid)
        gathered = block.conv(rows, table)
        unfolded = torch.relu(block.norm(gathered, sites.valid))
    valid = sites.valid
    torch.testing.assert_close(folded[valid], unfolded[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered, block.conv(rows, table).detach(), atol=0, rtol=0)


def test_sparse_max_pool_equals_masked_reference():
    torch.manual_seed(1)
    sites = random_sites(2, 6, 4, 0.3, invalid=0.2)
    rows = torch.randn(sites.flat.numel(), 3) - 2.0  # negative values: inactive sites must not count as 0
    pooled, active = sparse_max_pool(rows, sites)
    on = torch.zeros(sites.n * sites.h * sites.w, dtype=torch.bool)
    on[sites.flat[sites.valid]] = True
    on = on.view(2, 6, 4)
    dense = densify(rows, sites)
    for n in range(2):
        for y in range(3):
            for x in range(2):
                window = on[n, 2 * y:2 * y + 2, 2 * x:2 * x + 2]
                assert bool(active[n, y, x]) == bool(window.any())
                if window.any():
                    values = dense[n, :, 2 * y:2 * y + 2, 2 * x:2 * x + 2].reshape(3, 4)[:, window.flatten()]
                    torch.testing.assert_close(pooled[n, :, y, x], values.max(dim=1).values)
                else:
                    assert (pooled[n, :, y, x] == 0).all()


def test_sparse_batchnorm_uses_active_sites_only():
    torch.manual_seed(2)
    rows = torch.randn(20, 5) * 3 + 1
    valid = torch.rand(20) > 0.4
    rows = torch.where(valid[:, None], rows, torch.full_like(rows, 100.0))  # junk at invalid rows
    ours, ref = SparseBatchNorm(5), torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    out = ours(rows, valid)
    torch.testing.assert_close(out[valid], ref(rows[valid]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(rows, valid)[valid], ref(rows[valid]), atol=1e-5, rtol=1e-5)


def test_sparse_batchnorm_with_no_active_site_is_finite():
    bn = SparseBatchNorm(3)
    out = bn(torch.randn(4, 3), torch.zeros(4, dtype=torch.bool))
    assert torch.isfinite(out).all()
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


@pytest.mark.parametrize("budget", [None, 0.25])
def test_stage_trains_attention_and_respects_candidates(budget):
    torch.manual_seed(3)
    stage = SparseStage(4, 8, convs=2, guide_dim=6)
    x = torch.randn(3, 4, 8, 8)
    candidates = torch.rand(3, 8, 8) > 0.5
    candidates[2] = False  # a padded frame
    pooled, active, count = stage(x, candidates, torch.randn(3, 6), 0.8, budget)
    assert pooled.shape == (3, 8, 4, 4) and active.shape == (3, 4, 4)
    assert count[2] == 0 and not active[2].any() and (pooled[2] == 0).all()
    assert (count[:2] <= candidates[:2].flatten(1).sum(1)).all()
    if budget is not None:
        assert (count[:2] <= budget_count(budget, 64)).all()
    pooled.sum().backward()
    grad = stage.attention.score.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_attention_entropy_is_normalised_and_differentiable():
    candidates = torch.tensor([[True, True, True, True, False, False],
                               [True, False, False, False, False, False],  # one candidate: not counted
                               [True, True, False, False, False, False]])
    uniform = torch.where(candidates, torch.zeros(3, 6), torch.full((3, 6), float("-inf")))
    logp = uniform.log_softmax(-1)
    assert attention_entropy(logp, candidates).item() == pytest.approx(1.0)
    logits = torch.tensor([[9.0, -9, -9, -9, 0, 0], [0.0] * 6, [-9.0, 9, 0, 0, 0, 0]], requires_grad=True)
    masked = logits.masked_fill(~candidates, float("-inf")).log_softmax(-1)
    value = attention_entropy(masked, candidates)
    assert value.item() < 0.01  # nearly one-hot on the counted rows
    value.backward()
    assert torch.isfinite(logits.grad).all()  # no NaN from the -inf entries


@pytest.mark.parametrize("budget", [0.25, 0.9])  # 0.9: more sites than candidates, so invalid rows
def test_budget_evaluation_equals_the_stage(budget):
    """``forward_budget`` (channels last, the pooling gathered, what the exported graphs run)
    gives the stage's values, active sites and counts, with and without precomputed keys."""
    torch.manual_seed(4)
    stage = SparseStage(4, 8, convs=2, guide_dim=6)
    for block in stage.blocks:  # a BatchNorm that is not the identity
        block.norm.running_mean.uniform_(-0.5, 0.5)
        block.norm.running_var.uniform_(0.5, 2.0)
    stage.eval()
    x, guide = torch.randn(3, 4, 8, 6), torch.randn(3, 6)
    candidates = torch.rand(3, 8, 6) > 0.5
    candidates[2] = False  # a padded frame
    pooled, active, count = stage(x, candidates, guide, 0.8, budget)
    rows = x.flatten(2).transpose(1, 2)  # (3, 48, 4) channels last
    with torch.no_grad():
        for keys in (None, stage.attention.channel_proj(rows)):
            got, got_active, got_count = stage.forward_budget(rows, candidates.flatten(1), guide, 8, 6, budget, keys)
            assert torch.allclose(got, pooled.detach().flatten(2).transpose(1, 2), atol=1e-6)
            assert torch.equal(got_active, active.flatten(1)) and torch.equal(got_count, count)
        all_sites = stage.forward_budget(rows, None, guide, 8, 6, budget)[0]
        full = stage(x, torch.ones(3, 8, 6, dtype=torch.bool), guide, 0.8, budget)[0]
        assert torch.allclose(all_sites, full.flatten(2).transpose(1, 2), atol=1e-6)


def test_pool_rows_group_each_window():
    """``Sites.pool_rows``: the rows at the four positions of each 2x2 window side by side, K
    where no valid site is (an invalid site sits at the scratch cell, not at its position)."""
    flat = torch.tensor([0, 5, 7, 9, 12])  # on a (2, 4, 2) grid; the last one invalid
    sites = Sites(flat, torch.tensor([True, True, True, True, False]), 2, 4, 2)
    at = sites.pool_rows(sites.row_map())  # (16,)
    row = {f: r for r, f in enumerate([0, 5, 7, 9])}
    want = [row.get(frame * 8 + (2 * y2 + dy) * 2 + dx, 5)
            for frame in range(2) for y2 in range(2) for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert at.tolist() == want
