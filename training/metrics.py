"""Classification metrics over person labels (numpy only)."""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: rows are true persons, columns predictions."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where undefined."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro-averaged F1 over the classes that occur in ``y_true``."""
    cm = confusion(y_true, y_pred, n_classes)
    _, _, f1, support = per_class_prf(cm)
    present = support > 0
    return float(f1[present].mean()) if present.any() else 0.0


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true)
    return float((y_true == np.asarray(y_pred)).mean()) if len(y_true) else 0.0


def branch_accuracies(labels: np.ndarray, mod_pred: np.ndarray, present: np.ndarray) -> dict[str, float | None]:
    """labels (N,), per-modality predictions (N, 3) and presence (N, 3), in the order text,
    audio, visual -> each modality's accuracy alone over the windows that have it (None
    where no window has it)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(("text", "audio", "visual")):
        has = present[:, i].astype(bool)
        out[name] = accuracy(labels[has], mod_pred[has, i]) if has.any() else None
    return out
