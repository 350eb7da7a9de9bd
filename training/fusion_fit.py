"""Late-fusion weights fitted on the validation split after training.

During training the three fusion weights see training data only, where the text
branch is perfect because it memorises the training transcripts; on held-out
dialogs that branch can be at chance yet stay confident. After the best epoch is
chosen, ``fit_fusion`` refits the fusion logits (the model's ``fusion`` parameter:
a softmax over the modalities present in a window) on the validation split with
the branches frozen: cross-entropy of the fused logits plus an L2 pull towards
uniform weights, so that a validation set that one branch alone separates does
not drive the others' weights to zero. The same weights also serve windows with
a modality missing (no face found, no speech), where the softmax is taken over
the others; validation windows rarely lack one, so ``with_missing`` adds to the
fit a copy of each window with each of its modalities hidden in turn (as long as
another remains). The fit lowers the loss, which is not the same as raising
accuracy: a refit that classifies fewer of those windows correctly than the
learned weights is discarded (``applied`` False). This step is ours, not the
paper's (``train.fusion_fit = "none"`` keeps the weights learned in training;
"valid_full" fits on the complete windows only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.utils.data import DataLoader

from engine.model import late_fusion

MODALITIES = ("text", "audio", "visual")  # order of ModelOutput.modality_logits


@dataclass(frozen=True)
class FusionFit:
    """Outcome of one fit (reported in train_summary.json)."""

    before: tuple[float, ...]  # softmax of the fusion logits before the fit (text, audio, visual)
    after: tuple[float, ...]  # the weights kept: the refit's, or ``before`` when it was discarded
    valid_accuracy_before: float
    valid_accuracy_after: float
    n: int
    applied: bool = True  # False: the refit was less accurate on validation and was discarded

    def as_dict(self) -> dict:
        return {
            "weights_before": dict(zip(MODALITIES, self.before)),
            "weights_after": dict(zip(MODALITIES, self.after)),
            "valid_accuracy_before": self.valid_accuracy_before,
            "valid_accuracy_after": self.valid_accuracy_after,
            "n": self.n,
            "applied": self.applied,
        }


@torch.no_grad()
def collect_branch_logits(model: torch.nn.Module, loader: DataLoader, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> per-modality logits (N, 3, P) float32, presence (N, 3) bool, labels (N,), on the CPU."""
    model.eval()
    logits, present, labels = [], [], []
    for batch, y in loader:
        out = model(*batch.to(device).model_inputs())
        logits.append(out.modality_logits.float().cpu())
        present.append(out.present.cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(present), torch.cat(labels)


def fit_fusion_logits(logits: torch.Tensor, present: torch.Tensor, labels: torch.Tensor,
                      init: torch.Tensor, l2: float, steps: int = 100) -> torch.Tensor:
    """Minimise CE(fused) + l2 * |w - mean(w)|^2 over the three fusion logits w (the softmax
    ignores a common shift, so the pull is towards uniform weights; deterministic L-BFGS)."""
    w = init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nnf.cross_entropy(late_fusion(w, logits, present), labels) + l2 * (w - w.mean()).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def with_missing(logits: torch.Tensor, present: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, P), (N, 3), (N,) -> the N windows, then for each modality a copy of the windows
    that have it and another one, with it hidden (about 3N windows in all)."""
    parts = [(logits, present, labels)]
    for m in range(present.shape[1]):
        has = present[:, m] & (present.sum(1) > 1)  # (N,)
        hidden = present[has].clone()
        hidden[:, m] = False
        parts.append((logits[has], hidden, labels[has]))
    return tuple(torch.cat(x) for x in zip(*parts))  # type: ignore[return-value]


def refit(logits: torch.Tensor, present: torch.Tensor, labels: torch.Tensor, old: torch.Tensor,
          l2: float) -> tuple[torch.Tensor, FusionFit]:
    """-> (fusion logits to keep, report): the refit when it is at least as accurate on
    these windows as ``old``, else ``old``."""
    new = fit_fusion_logits(logits, present, labels, old, l2)

    def acc(w: torch.Tensor) -> float:
        return float((late_fusion(w, logits, present).argmax(1) == labels).float().mean())

    before, after = acc(old), acc(new)
    applied = after >= before
    kept = new if applied else old
    return kept, FusionFit(_weights(old), _weights(kept), before, max(before, after), int(labels.numel()), applied)


def refit_windows(logits: torch.Tensor, present: torch.Tensor, labels: torch.Tensor, old: torch.Tensor, l2: float,
                  missing: bool = True) -> tuple[torch.Tensor, FusionFit]:
    """``refit`` on windows' branch logits (N, 3, P), presence (N, 3) and labels (N,), with
    ``missing`` also on their copies with a modality hidden."""
    if missing:
        logits, present, labels = with_missing(logits, present, labels)
    return refit(logits, present, labels, old, l2)


def fit_fusion(model: torch.nn.Module, loader: DataLoader, device: torch.device, l2: float,
               missing: bool = True) -> FusionFit:
    """Refit ``model.fusion`` in place on the loader's (validation) windows (and, with
    ``missing``, their copies with a modality hidden)."""
    logits, present, labels = collect_branch_logits(model, loader, device)
    kept, report = refit_windows(logits, present, labels, model.fusion.detach().float().cpu().clone(), l2, missing)
    with torch.no_grad():
        model.fusion.copy_(kept.to(model.fusion.device, model.fusion.dtype))
    return report


def _weights(fusion: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(fusion.softmax(0).numpy(), 4))
