"""Exponential moving average of a model's weights, validated and kept instead of the
raw weights when ``train.ema_decay`` > 0.

The sparse model's validation accuracy swings from epoch to epoch (0.79 to 1.0 on
the ``small`` corpus, BENCHMARKS.md) while its training loss falls steadily: its
selected sites, and so its later layers' inputs and BatchNorm statistics, move
with the attention. An average of the weights over the last few hundred steps is
a steadier model to validate and keep. Buffers (BatchNorm statistics) are averaged
the same way; integer buffers (batch counters) are copied.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """``model`` is the averaged copy of ``live``; call ``update(step)`` after each optimizer step."""

    def __init__(self, live: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay {decay}: expected a value in (0, 1)")
        self.decay = decay
        self.model = copy.deepcopy(live).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), live.state_dict().values()))
        self._averaged = [a for a, b in pairs if a.dtype.is_floating_point]
        self._live = [b for a, b in pairs if a.dtype.is_floating_point]
        self._copied = [(a, b) for a, b in pairs if not a.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the live weights; early steps weigh more (the decay
        ramps up as (1 + step) / (10 + step) until it reaches ``decay``)."""
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - d)
        for a, b in self._copied:
            a.copy_(b)
