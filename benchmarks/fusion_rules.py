"""Late-fusion rules compared offline on saved branch logits (BENCHMARKS.md, Training,
"Sparse vs dense" part 9).

Reads the NAME.logits.npz files that benchmarks/gpu_sweep.sh brings back (or the
RUN/branch_logits.npz that benchmarks/sweep_summary.py writes) and prints, per run,
the test accuracy of each branch alone and of the fused answer under four rules:
the run's own fusion weights, weights refitted on its validation split with the
copies that hide a modality (train.fusion_fit = "valid"), on complete validation
windows only ("valid_full"), and one set of weights per presence pattern
(complete windows: the valid_full fit; each pattern with a modality missing: a fit
on the validation copies with that pattern). Then the test utterances the run's
own weights get wrong, with which branches were right.

    python3 benchmarks/fusion_rules.py FILE.npz [FILE.npz ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.model import late_fusion  # noqa: E402
from training.fusion_fit import fit_fusion_logits, with_missing  # noqa: E402

L2 = 0.01  # train.fusion_fit_l2's default
PATTERN_BITS = torch.tensor([1, 2, 4])  # text, audio, visual -> a presence pattern id 0..7


def pattern_ids(present: torch.Tensor) -> torch.Tensor:
    """present (N, 3) bool -> (N,) id of each window's presence pattern."""
    return (present.long() * PATTERN_BITS).sum(1)


def per_pattern_weights(logits: torch.Tensor, present: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Validation branch logits -> fusion logits per presence pattern (8, 3)."""
    full = present.all(1)
    complete = fit_fusion_logits(logits[full], present[full], labels[full], torch.zeros(3), L2)
    table = complete.expand(8, 3).clone()
    all_logits, all_present, all_labels = with_missing(logits, present, labels)
    ids = pattern_ids(all_present)
    for pid in range(1, 7):  # every pattern but none and all three
        chosen = ids == pid
        if int(chosen.sum()) >= 5:
            table[pid] = fit_fusion_logits(all_logits[chosen], all_present[chosen], all_labels[chosen], complete, L2)
    return table


def fused_by_pattern(table: torch.Tensor, logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(8, 3), (N, 3, P), (N, 3) -> fused logits (N, P) with each window's pattern's weights."""
    weights = table[pattern_ids(present)].masked_fill(~present, float("-inf"))  # (N, 3)
    return (weights.softmax(-1)[:, :, None] * logits).sum(1)


def compare(path: Path) -> None:
    z = np.load(path)
    valid = [torch.from_numpy(z[f"valid_{k}"]) for k in ("logits", "present", "labels")]
    logits, present, labels = (torch.from_numpy(z[f"test_{k}"]) for k in ("logits", "present", "labels"))
    fits = {
        "own": torch.from_numpy(z["fusion"]),
        "valid": fit_fusion_logits(*with_missing(*valid), torch.zeros(3), L2),
        "valid_full": fit_fusion_logits(*(x[valid[1].all(1)] for x in valid), torch.zeros(3), L2),
    }
    right = {name: late_fusion(w, logits, present).argmax(1) == labels for name, w in fits.items()}
    right["per_pattern"] = fused_by_pattern(per_pattern_weights(*valid), logits, present).argmax(1) == labels
    branch_right = logits.argmax(2) == labels[:, None]  # (N, 3)
    alone = [float(branch_right[present[:, m], m].float().mean()) for m in range(3)]
    print(f"{path.name}: n={len(labels)}, no face {int((~present[:, 2]).sum())}; alone text/audio/visual "
          + " / ".join(f"{a:.3f}" for a in alone) + "; fused "
          + ", ".join(f"{name} {float(r.float().mean()):.4f}" for name, r in right.items()))
    for i in (~right["own"]).nonzero().flatten().tolist():
        print(f"  wrong #{i}: present {present[i].tolist()}, branches right {branch_right[i].tolist()}")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        compare(Path(name))
