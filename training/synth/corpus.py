"""Generate the whole corpus: plan in this process, render dialogs in worker
processes, then write ``persons.json`` (the ground truth).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from training.synth import layout as L
from training.synth.plan import Plan, make_plan
from training.synth.render import render_dialog
from training.synth.voice import require_espeak

TRUTH_FILE = "persons.json"
TRUTH_FORMAT = 1  # version of the persons.json schema


def _render_job(job: tuple) -> dict:
    dialog, persons, root = job
    return render_dialog(dialog, persons, root)


def _render_all(plan: Plan, names: set[str], root: Path, workers: int, progress: bool) -> list[dict]:
    persons = {p.id: p for p in plan.persons}
    jobs = [(d, persons, root) for d in plan.dialogs if d.name in names]
    jobs.sort(key=lambda job: -len(job[0].turns))  # longest first, for balance
    bar = tqdm(total=len(jobs), desc="synth dialogs", unit="dialog", file=sys.stderr, disable=not progress)
    results = []
    with bar:
        if workers <= 1:
            for job in jobs:
                results.append(_render_job(job))
                bar.update()
        else:
            # spawn, not fork: the caller may hold threads (torch, pytest plugins).
            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(_render_job, jobs):
                    results.append(result)
                    bar.update()
    return sorted(results, key=lambda r: r["name"])


def _truth(plan: Plan, rendered: list[dict]) -> dict:
    utterances = {}
    for dialog in rendered:
        for u in dialog["utterances"]:
            utterances[u["id"]] = {"dialog": dialog["name"], **{k: v for k, v in u.items() if k != "id"}}
    return {
        "format": TRUTH_FORMAT,
        "seed": plan.seed,
        "size": plan.size,
        "persons": {p.id: p.to_json() for p in plan.persons},
        "dialogs": {d["name"]: {k: v for k, v in d.items() if k not in ("name", "utterances")} for d in rendered},
        "utterances": utterances,
    }


def generate(
    out: str | Path,
    seed: int = 0,
    size: str = "tiny",
    workers: int = 0,
    progress: bool = True,
    only: Iterable[str] | None = None,
) -> Path:
    """Write ``out/IEMOCAP_full_release/`` and ``out/persons.json``; return ``out``.

    ``only`` limits rendering to some dialog names (tests use it to check
    determinism quickly); their files are identical to a full run's.
    """
    require_espeak()
    root = Path(out)
    plan = make_plan(seed, size)
    names = {d.name for d in plan.dialogs}
    chosen = set(only) if only is not None else names
    if chosen - names:
        raise ValueError(f"no such dialogs in the {size} plan: {', '.join(sorted(chosen - names))}")
    for session in sorted({d.session for d in plan.dialogs if d.name in chosen}):
        L.make_session_dirs(root, session)
    rendered = _render_all(plan, chosen, root, workers or os.cpu_count() or 1, progress)
    (root / TRUTH_FILE).write_text(json.dumps(_truth(plan, rendered), indent=1, sort_keys=True) + "\n")
    return root
