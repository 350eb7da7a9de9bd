"""Sparse 3x3 submanifold convolution: our gather-scatter (engine/sparse.py) vs
spconv 2.3.8 SubMConv2d vs the dense nn.functional.conv2d, forward + backward on CPU.

spconv is measured only (it is not a dependency): pip install spconv==2.3.8.
Run: .venv/bin/python benchmarks/sparse_conv_choice.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from engine.sparse import Sites, SubmanifoldConv3x3

LAYERS = [  # (frames N, H, W, Cin, Cout): the first two sparse stages of the paper-size face CNN
    (32, 24, 24, 64, 128),
    (32, 12, 12, 128, 256),
]
ACTIVE = 0.2  # fraction of active sites
REPEATS = 15


def timed(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def make_case(n, h, w, cin, cout, pattern="random", seed=0):
    """Active sites: scattered at random, or the top ACTIVE fraction of a smooth random
    field per frame (clustered, like attention-chosen face regions)."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "random":
        active = torch.rand(n * h * w, generator=g) < ACTIVE
    else:
        field = F.avg_pool2d(torch.rand(n, 1, h, w, generator=g), 7, stride=1, padding=3).flatten(1)  # (N, H*W)
        k = int(ACTIVE * h * w)
        active = torch.zeros_like(field, dtype=torch.bool).scatter(1, field.topk(k, dim=1).indices, True).flatten()
    flat = active.nonzero().squeeze(-1)
    rows = torch.randn(flat.numel(), cin, generator=g)
    sites = Sites(flat, torch.ones_like(flat, dtype=torch.bool), n, h, w)
    return rows, sites, active


def ours(rows, sites, conv):
    table = sites.neighbour_table()
    x = rows.clone().requires_grad_(True)

    def step():
        conv.zero_grad()
        conv(x, table).sum().backward()

    return step


def dense(rows, sites, conv, cin):
    n, h, w = sites.n, sites.h, sites.w
    x = torch.zeros(n * h * w, cin).index_put((sites.flat,), rows).view(n, h, w, cin).permute(0, 3, 1, 2).contiguous()
    x.requires_grad_(True)

    def step():
        conv.zero_grad()
        F.conv2d(x, conv.weight, padding=1).sum().backward()

    return step


def spconv_step(rows, sites, cin, cout):
    import spconv.pytorch as spconv
    import spconv.pytorch.ops as ops

    ops.get_current_stream = lambda: 0  # its backward asks for a CUDA stream otherwise
    hw = sites.h * sites.w
    frame, rest = sites.flat // hw, sites.flat % hw
    indices = torch.stack([frame, rest // sites.w, rest % sites.w], dim=1).int().contiguous()
    conv = spconv.SubMConv2d(cin, cout, 3, bias=False, indice_key="b")
    x = rows.clone().requires_grad_(True)

    def step():
        conv.zero_grad()
        t = spconv.SparseConvTensor(x, indices, [sites.h, sites.w], sites.n)
        conv(t).features.sum().backward()

    return step, conv


def check_spconv_matches(rows, sites, cin, cout) -> float:
    """Max difference of spconv's forward vs ours with the same weights."""
    import spconv.pytorch as spconv

    step, conv = spconv_step(rows, sites, cin, cout)
    ours_conv = SubmanifoldConv3x3(cin, cout)
    with torch.no_grad():  # spconv 2.x weight layout: (Cout, kH, kW, Cin)
        ours_conv.weight.copy_(conv.weight.permute(0, 3, 1, 2))
        hw = sites.h * sites.w
        frame, rest = sites.flat // hw, sites.flat % hw
        idx = torch.stack([frame, rest // sites.w, rest % sites.w], dim=1).int().contiguous()
        theirs = conv(spconv.SparseConvTensor(rows, idx, [sites.h, sites.w], sites.n)).features
        mine = ours_conv(rows, sites.neighbour_table())
    return (theirs - mine).abs().max().item()


def main() -> None:
    print(f"torch {torch.__version__}, forward+backward, {ACTIVE:.0%} active sites, median of {REPEATS}")
    print("| layer | sites | threads | active sites | ours ms | spconv ms | dense conv ms |")
    print("|---|---|---|---|---|---|---|")
    for (n, h, w, cin, cout), pattern in [(layer, p) for layer in LAYERS for p in ("random", "clustered")]:
        rows, sites, _ = make_case(n, h, w, cin, cout, pattern)
        conv = SubmanifoldConv3x3(cin, cout)
        try:
            diff = check_spconv_matches(rows, sites, cin, cout)
            sp_step, _ = spconv_step(rows, sites, cin, cout)
        except ImportError:
            diff, sp_step = None, None
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t_ours = timed(ours(rows, sites, conv))
            t_sp = timed(sp_step) if sp_step else float("nan")
            t_dense = timed(dense(rows, sites, conv, cin))
            print(f"| {cin}->{cout}, {n}x{h}x{w} | {pattern} | {threads} | {rows.shape[0]} | {t_ours:.2f} | {t_sp:.2f} | {t_dense:.2f} |")
        if diff is not None:
            print(f"spconv vs ours, forward max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
