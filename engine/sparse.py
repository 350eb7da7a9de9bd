"""Sparse layers of MME2ESparse, in plain torch (CPU, CUDA, autograd, torch.export).

A sparse feature map is kept as ``rows`` (K, C), one row per active site, plus a
``Sites`` record of where each row sits on an (N, H, W) grid. A submanifold 3x3
convolution gathers the 9 neighbours of every active site through a rulebook
(``Sites.neighbour_table``: each site's neighbour rows, found once per stage by
index arithmetic on a padded grid) and does one (K, 9*Cin) @ (9*Cin, Cout)
matmul: outputs only at active sites, inputs only from active sites (inactive
sites read as zero). In evaluation mode a conv block folds its BatchNorm into
that matmul's weight and a shift, and gathers with ``index_select``: exported,
each convolution is a Gather and a Gemm, which a static int8 graph runs on
uint8 rows as one quantized Gemm.

Two ways to choose sites (``select_sites``):
- CDF rule (the paper): per frame, sort attention descending and keep the
  smallest set whose mass reaches ``threshold``; K varies (uses nonzero).
- fixed budget: top-k per frame with a fixed k; K = N * k is static, which is
  what graph export needs. A chosen site that is not a candidate is carried
  as an invalid row: its convolutions read and write a scratch cell of an extra
  grid frame that no valid site reads, and it is left out of BatchNorm
  statistics and pooling, so its values never reach a valid output.

In evaluation with a fixed budget ``SparseStage.forward_budget`` computes the same
values channels last with fewer graph ops (what the exported graphs run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Sites:
    """Active sites on an (N, H, W) grid: ``flat`` (K,) indices into N*H*W and
    ``valid`` (K,) bool (all True in CDF mode)."""

    flat: Tensor
    valid: Tensor
    n: int
    h: int
    w: int

    def padded_index(self, chosen: Tensor | None = None) -> Tensor:
        """(K,) indices into the flattened zero-padded (N+1, H+2, W+2) grid; an invalid site's
        row goes to the centre of the extra frame N (a scratch cell that no valid site reads).
        ``chosen`` (N, k): the sites' positions within their frames when they are k per frame
        (fixed budget, flat = frame * H*W + chosen), found then by a table lookup instead of
        integer division (exported, a division runs through float32, inexact past 2**24)."""
        hw, side = self.h * self.w, (self.h + 2) * (self.w + 2)
        inner = self.padded_cells(self.flat.device).reshape(-1)  # (H*W,)
        if chosen is None:
            index = (self.flat // hw) * side + inner.index_select(0, self.flat % hw)
        else:
            frame = torch.arange(chosen.shape[0], device=chosen.device)[:, None] * side  # (N, 1)
            index = (frame + inner.index_select(0, chosen.reshape(-1)).view(chosen.shape)).reshape(-1)
        scratch = self.n * side + (self.w + 2) + 1
        return torch.where(self.valid, index, torch.full_like(index, scratch))

    def neighbour_table(self, index: Tensor | None = None, slot: Tensor | None = None) -> Tensor:
        """(K, 9) the row of each site's 3x3 neighbours (dy, dx in -1..1, row-major), K
        where the neighbour is not an active site: a submanifold convolution's rulebook,
        made once per stage and used by each of its convolutions. Invalid sites see only
        each other (all share the scratch cell)."""
        index = self.padded_index() if index is None else index  # (K,)
        K, w2 = index.shape[0], self.w + 2
        slot = self.row_map(index) if slot is None else slot  # ((N+1)*(H+2)*(W+2),)
        step = torch.arange(-1, 2, device=index.device)  # (3,) built on the device: no host copy (CUDA graphs)
        offsets = (step[:, None] * w2 + step[None, :]).reshape(9)  # (9,) dy * (W+2) + dx
        return slot.index_select(0, (index[:, None] + offsets[None, :]).reshape(-1)).view(K, 9)  # (K, 9)

    def row_map(self, index: Tensor | None = None) -> Tensor:
        """((N+1)*(H+2)*(W+2),) the row of the site at each cell of the padded grid, K where there
        is none (``index``: ``padded_index()`` when the caller has it)."""
        index = self.padded_index() if index is None else index
        K = index.shape[0]
        row = torch.arange(K, device=index.device)
        slot = torch.full(((self.n + 1) * (self.h + 2) * (self.w + 2),), K, dtype=row.dtype, device=index.device)
        return slot.index_put((index,), row)

    def pool_rows(self, slot: Tensor) -> Tensor:
        """slot = ``row_map()`` -> (N*H*W,) the row of the site at each grid position, K where
        there is none (an invalid site, at the scratch cell, is at none), positions in pooling
        order: frame, then the 2x2 windows in raster order, then the window's four positions
        (raster order), so that a max over each group of four is the 2x2 stride-2 max-pool."""
        cells = self.padded_cells(slot.device).view(self.h // 2, 2, self.w // 2, 2)  # (y2, dy, x2, dx)
        inner = cells.permute(0, 2, 1, 3).reshape(-1)  # (H*W,) in (y2, x2, dy, dx) order
        frame = torch.arange(self.n, device=slot.device)[:, None] * ((self.h + 2) * (self.w + 2))  # (N, 1)
        return slot.index_select(0, (frame + inner[None, :]).reshape(-1))

    def padded_cells(self, device: torch.device) -> Tensor:
        """(H, W) each grid position's cell in a frame of the zero-padded (H+2, W+2) grid."""
        return ((torch.arange(self.h, device=device)[:, None] + 1) * (self.w + 2)
                + torch.arange(self.w, device=device)[None, :] + 1)

    def scratch_flat(self) -> Tensor:
        """(K,) indices into a flattened (N*H*W + 1) map: the site's own, N*H*W for an invalid site."""
        return torch.where(self.valid, self.flat, torch.full_like(self.flat, self.n * self.h * self.w))

    def per_frame(self) -> Tensor:
        """(N,) number of valid sites of each frame."""
        counts = torch.zeros(self.n, dtype=torch.float32, device=self.flat.device)
        return counts.index_add(0, self.flat // (self.h * self.w), self.valid.float())


def cdf_keep(probs: Tensor, threshold: float) -> Tensor:
    """probs (N, P), rows summing to 1 -> (N, P) bool: per row, the smallest set of
    largest entries whose mass reaches ``threshold`` (ties broken by sort order)."""
    ordered, order = probs.sort(dim=-1, descending=True)  # (N, P)
    mass_before = ordered.cumsum(dim=-1) - ordered  # (N, P) mass of the larger entries
    keep_sorted = mass_before < threshold
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def select_sites(logits: Tensor, candidates: Tensor, h: int, w: int, threshold: float,
                 budget: float | None) -> tuple[Tensor, Sites]:
    """Choose active sites from attention logits.

    logits (N, H*W) float32, candidates (N, H*W) bool -> (log-probabilities (N, H*W)
    over candidates, Sites). ``budget`` None: CDF rule; a fraction: top-k per frame.
    """
    N, P = logits.shape
    has_any = candidates.any(dim=-1, keepdim=True)  # (N, 1)
    masked = logits.masked_fill(~candidates, float("-inf"))
    masked = torch.where(has_any, masked, torch.zeros_like(logits))  # a frame without candidates: uniform, never kept
    logp = masked.log_softmax(dim=-1)  # (N, P)
    base = torch.arange(N, device=logits.device)[:, None] * P  # (N, 1)
    if budget is None:
        keep = cdf_keep(logp.exp().detach(), threshold) & candidates  # (N, P)
        flat = keep.flatten().nonzero().squeeze(-1)  # (K,)
        valid = torch.ones_like(flat, dtype=torch.bool)
    else:
        k = budget_count(budget, P)
        chosen = masked.detach().topk(k, dim=-1).indices  # (N, k)
        valid = candidates.gather(1, chosen).flatten()  # (N*k,)
        flat = (base + chosen).flatten()  # (N*k,)
    return logp, Sites(flat, valid, N, h, w)


def budget_count(fraction: float, positions: int) -> int:
    """Sites per frame kept by a fixed budget (at least one)."""
    return max(1, min(positions, math.ceil(fraction * positions)))


def attention_entropy(logp: Tensor, candidates: Tensor) -> Tensor:
    """Mean normalised entropy of the attention over candidate sites: logp (N, P),
    candidates (N, P) bool -> scalar in [0, 1] (1 = uniform over the candidates),
    averaged over frames with at least two candidates. Differentiable; training can
    penalise it so that the CDF rule keeps fewer sites."""
    safe = torch.where(candidates, logp, torch.zeros_like(logp))  # -inf off candidates would give NaN gradients
    h = -(safe.exp() * safe * candidates).sum(-1)  # (N,)
    n = candidates.sum(-1).float()  # (N,)
    counted = n > 1
    normalised = torch.where(counted, h / n.clamp(min=2.0).log(), torch.zeros_like(h))
    return normalised.sum() / counted.float().sum().clamp(min=1.0)


class SubmanifoldConv3x3(nn.Module):
    """3x3 convolution, stride 1, evaluated only at active sites from active inputs.
    The weight has nn.Conv2d's layout (Cout, Cin, 3, 3); no bias (BatchNorm follows)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, rows: Tensor, table: Tensor, scale: Tensor | None = None) -> Tensor:
        """rows (K, Cin), table = sites.neighbour_table() (K, 9) -> (K, Cout): each site's
        neighbours gathered (a zero row where there is none), one matmul. ``scale`` (Cout,):
        multiplies the output channels through the weight (a folded BatchNorm)."""
        K, cin = rows.shape
        padded = torch.cat([rows, rows.new_zeros(1, cin)])  # (K+1, Cin): row K reads as zero
        if torch.is_grad_enabled():
            neighbours = padded[table]  # (K, 9, Cin); its backward is what the recorded trainings used
        else:  # exports as Gather, which ONNX Runtime runs on uint8 rows in a static int8 graph
            neighbours = padded.index_select(0, table.reshape(-1))  # (K*9, Cin)
        weight = self.weight.permute(2, 3, 1, 0).reshape(9 * cin, -1)  # (9*Cin, Cout)
        if scale is not None:
            weight = weight * scale.type(weight.dtype)
        return neighbours.reshape(K, 9 * cin) @ weight  # (K, Cout)


class SparseBatchNorm(nn.BatchNorm1d):
    """BatchNorm over rows (K, C) whose statistics use valid rows only. Same
    parameters and buffers as nn.BatchNorm1d."""

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """Evaluation mode as y = x * scale + shift: (scale (C,), shift (C,)), in the buffers' dtype."""
        scale = torch.rsqrt(self.running_var + self.eps) * self.weight
        return scale, self.bias - self.running_mean * scale

    def forward(self, rows: Tensor, valid: Tensor) -> Tensor:
        if not self.training:  # written out: F.batch_norm guards on K, which breaks export in CDF mode
            scale, shift = self.scale_shift()
            return (rows.float() * scale + shift).type(rows.dtype)
        x = rows.float()
        weight = valid.float()[:, None]  # (K, 1)
        count = weight.sum()
        mean = (x * weight).sum(0) / count.clamp(min=1.0)  # (C,)
        var = ((x - mean) ** 2 * weight).sum(0) / count.clamp(min=1.0)  # (C,) biased, for normalising
        with torch.no_grad():
            # momentum None: cumulative average over batches, as nn.BatchNorm1d does
            m = self.momentum if self.momentum is not None else 1.0 / (self.num_batches_tracked + 1).float()
            unbiased = var * count / (count - 1.0).clamp(min=1.0)
            enough = count > 1
            self.running_mean.copy_(torch.where(enough, (1 - m) * self.running_mean + m * mean, self.running_mean))
            self.running_var.copy_(torch.where(enough, (1 - m) * self.running_var + m * unbiased, self.running_var))
            self.num_batches_tracked.add_(1)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.type(rows.dtype)


class SparseConvBlock(nn.Module):
    """Submanifold conv -> sparse BatchNorm -> ReLU, on active sites only."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = SubmanifoldConv3x3(cin, cout)
        self.norm = SparseBatchNorm(cout)

    def forward(self, rows: Tensor, table: Tensor, valid: Tensor) -> Tensor:
        """rows (K, Cin), table (K, 9), valid (K,) -> (K, Cout)."""
        if self.training:
            return torch.relu(self.norm(self.conv(rows, table), valid))
        # evaluation: the BatchNorm folded into the convolution (exports as one Gemm, which a
        # static int8 graph runs as one quantized Gemm with its requantisation)
        scale, shift = self.norm.scale_shift()
        return torch.relu(self.conv(rows, table, scale) + shift.type(rows.dtype))


def sparse_max_pool(rows: Tensor, sites: Sites) -> tuple[Tensor, Tensor]:
    """2x2 stride-2 max-pool of a sparse map -> (dense map (N, C, H/2, W/2) with zeros
    at inactive outputs, active (N, H/2, W/2) bool). An output is active when any of
    its inputs is; its value is the max over its active inputs only."""
    C = rows.shape[1]
    size = sites.n * sites.h * sites.w
    flat = sites.scratch_flat()  # (K,) invalid rows -> the extra last row, dropped below
    dense = rows.new_full((size + 1, C), float("-inf")).index_put((flat,), rows)[:size]
    dense = dense.view(sites.n, sites.h, sites.w, C).permute(0, 3, 1, 2)  # (N, C, H, W)
    pooled = F.max_pool2d(dense, 2)  # (N, C, H/2, W/2)
    # (N, H/2, W/2): rows are finite, so only a window without active inputs keeps the fill (-inf
    # here; ONNX Runtime's MaxPool starts from the lowest finite float and returns that)
    active = pooled[:, 0] > torch.finfo(pooled.dtype).min
    return torch.where(active[:, None], pooled, torch.zeros_like(pooled)), active


class CrossModalAttention(nn.Module):
    """Text-guided attention logits over the positions of a feature map:
    score = v . tanh(W_x x + W_q q) + b (the paper's cross-modal attention)."""

    def __init__(self, channels: int, guide_dim: int, attn_dim: int):
        super().__init__()
        self.channel_proj = nn.Linear(channels, attn_dim)
        self.guide_proj = nn.Linear(guide_dim, attn_dim, bias=False)
        self.score = nn.Linear(attn_dim, 1)

    def forward(self, x: Tensor, guide: Tensor) -> Tensor:
        """x (N, C, H, W), guide (N, G) -> logits (N, H*W) float32."""
        keys = self.channel_proj(x.flatten(2).transpose(1, 2))  # (N, H*W, A)
        query = self.guide_proj(guide)[:, None, :]  # (N, 1, A)
        return self.score(torch.tanh(keys + query)).squeeze(-1).float()  # (N, H*W)


class SparseStage(nn.Module):
    """Attention-based site selection, then submanifold conv blocks, then sparse max-pool.

    The selected rows are multiplied by exp(logp - stopgrad(logp)): exactly 1 in the
    forward pass (the features enter unweighted, as in the reference code), but the
    attention layers get the gradient of a log-probability weighting. The reference
    code detaches the selection and never uses the scores otherwise, so its attention
    layers receive no gradient at all.
    """

    def __init__(self, cin: int, cout: int, convs: int, guide_dim: int):
        super().__init__()
        self.attention = CrossModalAttention(cin, guide_dim, cin)
        self.last_entropy: Tensor | None = None  # set by each training forward (attention_entropy)
        self.blocks = nn.ModuleList(SparseConvBlock(cin if i == 0 else cout, cout) for i in range(convs))

    def forward(self, x: Tensor, candidates: Tensor, guide: Tensor, threshold: float,
                budget: float | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, C, H, W) dense map, candidates (N, H, W) bool, guide (N, G) ->
        (pooled map (N, Cout, H/2, W/2), its active sites (N, H/2, W/2), kept sites per frame (N,))."""
        N, C, H, W = x.shape
        logp, sites = select_sites(self.attention(x, guide), candidates.flatten(1), H, W, threshold, budget)
        if self.training:
            self.last_entropy = attention_entropy(logp, candidates.flatten(1))
        rows = x.permute(0, 2, 3, 1).reshape(N * H * W, C)[sites.flat]  # (K, C)
        if torch.is_grad_enabled():  # the gate is exactly 1: only its gradient matters
            chosen = logp.flatten()[sites.flat]  # (K,)
            chosen = torch.where(sites.valid, chosen, torch.zeros_like(chosen))  # invalid sites may be -inf
            gate = torch.exp(chosen - chosen.detach())  # (K,) all ones
            rows = rows * gate[:, None].type(rows.dtype)
        table = sites.neighbour_table()  # (K, 9)
        for block in self.blocks:
            rows = block(rows, table, sites.valid)
        pooled, active = sparse_max_pool(rows, sites)
        return pooled, active, sites.per_frame()

    def forward_budget(self, x: Tensor, candidates: Tensor | None, guide: Tensor, h: int, w: int, budget: float,
                       keys: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Evaluation with a fixed budget, channels last: the same values as ``forward`` with
        fewer, cheaper graph ops (what the exported and int8 graphs run).

        x (N, h*w, C) channels last, candidates (N, h*w) bool (None: every site), guide (N, G),
        keys (N, h*w, A): ``attention.channel_proj(x)`` when the caller has it (it depends on x
        alone) -> (pooled map (N, h*w/4, Cout) channels last, its active sites (N, h*w/4) bool,
        kept sites per frame (N,)).

        The pooling gathers the rows onto the grid in pooling order (a zero row where no valid
        site is) and takes the max over each window's four: the rows are ReLU outputs (>= 0),
        so the zeros of inactive sites never exceed an active input and a window without one
        pools to zero, as ``sparse_max_pool`` gives. No -inf fill, no scatter of rows and no
        transposes; in a static int8 graph the gather runs on uint8."""
        N, P, C = x.shape
        att = self.attention
        keys = att.channel_proj(x) if keys is None else keys  # (N, P, A)
        logits = att.score(torch.tanh(keys + att.guide_proj(guide)[:, None, :])).squeeze(-1).float()  # (N, P)
        if candidates is not None:
            logits = logits.masked_fill(~candidates, float("-inf"))
        chosen = logits.topk(budget_count(budget, P), dim=-1, sorted=False).indices  # (N, k) in any order
        base = torch.arange(N, device=x.device)[:, None] * P  # (N, 1)
        flat = (base + chosen).flatten()  # (K,) K = N*k
        valid = torch.ones_like(flat, dtype=torch.bool) if candidates is None else candidates.gather(1, chosen).flatten()
        sites = Sites(flat, valid, N, h, w)
        rows = x.reshape(N * P, C).index_select(0, flat)  # (K, C)
        index = sites.padded_index(chosen)  # (K,)
        slot = sites.row_map(index)  # the rulebook's map, used again by the pooling
        table = sites.neighbour_table(index, slot)  # (K, 9)
        for block in self.blocks:
            rows = block(rows, table, valid)
        at = sites.pool_rows(slot)  # (N*P,) row at each position in pooling order, K where none
        padded = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # (K+1, Cout): row K reads as zero
        pooled = padded.index_select(0, at).view(N, P // 4, 4, padded.shape[1]).amax(2)  # (N, P/4, Cout)
        active = (at < flat.shape[0]).view(N, P // 4, 4).any(-1)  # (N, P/4) windows with a valid site
        return pooled, active, valid.view(N, chosen.shape[1]).float().sum(1)
