"""Train/valid/test splits in which every person appears in every split.

Two protocols:
- utterance: each person's utterances shuffled and cut by the fractions;
- dialog: whole dialogs go to one split. Dialogs are grouped (IEMOCAP: by
  session, whose two actors share every dialog; own clips: by person), and
  within each group a seeded search picks test and valid dialogs so that
  every person of the group has utterances in train, valid and test.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterable, Mapping

SPLITS = ("train", "valid", "test")
MAX_TRIES = 2000  # seeded shuffles tried per group before giving up


class SplitError(ValueError):
    """No split can put every person into train, valid and test."""


def _counts(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_test = max(1, round(n * test_fraction))
    n_valid = max(1, round(n * valid_fraction))
    while n_test + n_valid > n - 1 and (n_test > 1 or n_valid > 1):
        if n_test >= n_valid:
            n_test -= 1
        else:
            n_valid -= 1
    return n_valid, n_test


def utterance_split(
    rows: Iterable[Mapping], valid_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Stratified by person: each person's utterances cut by the fractions."""
    by_person: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_person[row["person"]].append(row["id"])
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for person in sorted(by_person):
        ids = sorted(by_person[person])
        if len(ids) < 3:
            raise SplitError(
                f"utterance split: person {person} has {len(ids)} utterance(s); "
                "every person needs at least 3 (one each for train, valid and test)"
            )
        random.Random(f"{seed}/{person}").shuffle(ids)
        n_valid, n_test = _counts(len(ids), valid_fraction, test_fraction)
        out["test"] += ids[:n_test]
        out["valid"] += ids[n_test : n_test + n_valid]
        out["train"] += ids[n_test + n_valid :]
    return {s: sorted(v) for s, v in out.items()}


def _covers(assign: dict[str, str], persons_of: Mapping[str, set[str]], persons: set[str]) -> bool:
    seen: dict[str, set[str]] = {s: set() for s in SPLITS}
    for dialog, split in assign.items():
        seen[split] |= persons_of[dialog]
    return all(seen[s] >= persons for s in SPLITS)


def _split_group(
    group: str, dialogs: list[str], persons_of: Mapping[str, set[str]],
    valid_fraction: float, test_fraction: float, seed: int,
) -> dict[str, str]:
    persons = set().union(*(persons_of[d] for d in dialogs))
    if len(dialogs) < 3:
        raise SplitError(
            f"dialog split impossible for {group}: {len(dialogs)} dialog(s) ({', '.join(dialogs)}); "
            "each group needs at least 3 so every person is in train, valid and test"
        )
    n_valid, n_test = _counts(len(dialogs), valid_fraction, test_fraction)
    rng = random.Random(f"{seed}/{group}")
    order = sorted(dialogs)
    for _ in range(MAX_TRIES):
        rng.shuffle(order)
        assign = {d: "test" for d in order[:n_test]}
        assign |= {d: "valid" for d in order[n_test : n_test + n_valid]}
        assign |= {d: "train" for d in order[n_test + n_valid :]}
        if _covers(assign, persons_of, persons):
            return assign
    short = sorted(p for p in persons if sum(p in persons_of[d] for d in dialogs) < 3)
    raise SplitError(
        f"dialog split impossible for {group}: no assignment of its {len(dialogs)} dialogs puts "
        f"every person in train, valid and test (persons in fewer than 3 dialogs: {', '.join(short) or 'none'})"
    )


def dialog_split(
    rows: Iterable[Mapping], valid_fraction: float, test_fraction: float, seed: int, group_key: str = "session"
) -> dict[str, list[str]]:
    """No dialog in two splits; every person in every split. Raises SplitError."""
    rows = list(rows)
    persons_of: dict[str, set[str]] = defaultdict(set)
    groups: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        persons_of[row["dialog"]].add(row["person"])
        groups[row[group_key]].add(row["dialog"])
    assign: dict[str, str] = {}
    for group in sorted(groups):
        assign |= _split_group(group, sorted(groups[group]), persons_of, valid_fraction, test_fraction, seed)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for row in rows:
        out[assign[row["dialog"]]].append(row["id"])
    return {s: sorted(v) for s, v in out.items()}
