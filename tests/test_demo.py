"""The demo's steps at the smallest size: its summary must come from events received from Redis."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from engine.cli import main as mmid
from engine.config import load_config
from stream.demo import SHIPPED_ENGINE, run_demo, truth_lookup


@pytest.fixture(scope="module")
def demo_engine(tiny_runs, prepared_tiny, tmp_path_factory) -> Path:
    """An ONNX engine exported from the session's tiny dense run, with the demo's demo.json."""
    out = tmp_path_factory.mktemp("demo_engine") / "engine"
    assert mmid(["export", "--run", str(tiny_runs["mme2e"]), "--backend", "onnx", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (prepared_tiny / "manifest.jsonl").read_text().splitlines()]
    test_ids = set((prepared_tiny / "splits" / "dialog" / "test.txt").read_text().split())
    dialogs = sorted({r["dialog"] for r in rows if r["id"] in test_ids})
    (out / "demo.json").write_text(json.dumps({"seed": 0, "size": "tiny", "test_dialogs": dialogs}))
    return out


def test_demo_summary_is_computed_from_received_events(demo_engine, tiny_corpus, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tiny_corpus, work / "corpus-tiny-0")  # the demo's own cache name for the seed-0 tiny corpus
    args = argparse.Namespace(workdir=work, engine=demo_engine, dialog=None, no_rtsp=False, quiet=False)
    summary, received, timeline = run_demo(args, load_config())
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[") and "#" in line]
    events = [r.event for r in received]
    assert summary["windows"] == len(events) == len(printed) > 5
    assert all(e["schema"] == 1 and e["kind"] == "identity" and e["stream_id"] == "demo" for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(len(seqs))), "events arrive in order without gaps"
    truth_at = truth_lookup(timeline)
    judged = [(e["person"], truth_at(e["start"], e["end"])) for e in events]
    judged = [(p, t) for p, t in judged if t is not None]
    assert summary["accuracy"] == pytest.approx(sum(p == t for p, t in judged) / len(judged))
    assert summary["persons_true"] == sorted({p for _, _, p in timeline})
    assert summary["accuracy"] >= 0.6, summary  # a tiny model on 3 s windows that straddle turns
    assert summary["latency_ms_p95"] is not None and summary["real_time_factor"] > 0


def test_shipped_demo_engine_matches_its_corpus():
    """models/demo-tiny was made by training.demo_engine: it names the corpus and the commands."""
    demo = json.loads((SHIPPED_ENGINE / "demo.json").read_text())
    assert demo["seed"] == 0 and demo["size"] == "tiny" and demo["test_dialogs"]
    assert any(c.startswith("mmid train") for c in demo["commands"])
    engine = json.loads((SHIPPED_ENGINE / "engine.json").read_text())
    assert engine["persons"] == [f"Ses0{s}{g}" for s in range(1, 6) for g in "FM"]
