"""The synthetic corpus has the IEMOCAP release layout and identifiable persons.

The parsers here are written from shared/IEMOCAP_FORMAT.md, independently of
the generator, so a generator that drifts from the format fails them.
"""

from __future__ import annotations

import hashlib
import json
import re
import wave
from collections import Counter, defaultdict
from pathlib import Path

import av
import numpy as np
import pytest

RELEASE = "IEMOCAP_full_release"
DIALOG_RE = re.compile(r"^Ses0([1-5])([FM])_(impro\d{2}[ab]?|script\d{2}_\d)$")
UTT_RE = re.compile(r"^(Ses0[1-5][FM]_(?:impro\d{2}[ab]?|script\d{2}_\d))_([FM])(\d{3}|XX\d)$")
TRANSCRIPT_RE = re.compile(r"^(\S+) \[(\d{3}\.\d{4})-(\d{3}\.\d{4})\]: (.*)$")
EMO_HEAD_RE = re.compile(
    r"^\[(\d+\.\d{4}) - (\d+\.\d{4})\]\t(\S+)\t([a-z]{3})\t\[(\d+\.\d{4}), (\d+\.\d{4}), (\d+\.\d{4})\]$"
)
EVALUATOR_RE = re.compile(r"^[A-Z]-[EF]\d:\t.+;\t\(.*\)$")
EMOTIONS = {"neu", "ang", "hap", "exc", "sad", "fru", "fea", "sur", "dis", "oth", "xxx"}
PERSONS = [f"Ses0{s}{g}" for s in range(1, 6) for g in "FM"]
MTCNN_MIN_RATE = 0.85  # measured 0.995 on 630 crops of tiny seed 3 (every 15th frame, both halves)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(samples as (N, channels) int16, sample rate); asserts PCM16."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2, path
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
        return data, w.getframerate()


def _parse_transcript(path: Path) -> tuple[dict[str, tuple[float, float, str]], list[str]]:
    """Utterance id -> (start, end, text), and the lines that are not utterances."""
    utts, other = {}, []
    for line in path.read_text().splitlines():
        m = TRANSCRIPT_RE.match(line)
        if m and UTT_RE.match(m.group(1)):
            utts[m.group(1)] = (float(m.group(2)), float(m.group(3)), m.group(4))
        else:
            other.append(line)
    return utts, other


def _parse_emo(path: Path) -> dict[str, tuple[float, float, str]]:
    """Utterance id -> (start, end, emotion); asserts the block format."""
    text = path.read_text()
    assert text.startswith("%"), path
    entries = {}
    for block in text.split("\n\n")[1:]:
        lines = [line for line in block.splitlines() if line]
        if not lines:
            continue
        m = EMO_HEAD_RE.match(lines[0])
        assert m, (path, lines[0])
        assert all(EVALUATOR_RE.match(line) for line in lines[1:]), (path, lines)
        assert m.group(4) in EMOTIONS
        entries[m.group(3)] = (float(m.group(1)), float(m.group(2)), m.group(4))
    return entries


def _dialogs(corpus: Path) -> dict[str, Path]:
    """Dialog name -> its Session folder, from the transcription files."""
    return {p.stem: p.parents[2] for p in sorted((corpus / RELEASE).glob("Session*/dialog/transcriptions/*.txt"))}


@pytest.fixture(scope="module")
def parsed(tiny_corpus):
    """Per dialog: transcript utterances, non-utterance lines, EmoEvaluation entries, wav."""
    out = {}
    for name, session in _dialogs(tiny_corpus).items():
        utts, other = _parse_transcript(session / "dialog" / "transcriptions" / f"{name}.txt")
        emo = _parse_emo(session / "dialog" / "EmoEvaluation" / f"{name}.txt")
        wav, rate = _read_wav(session / "dialog" / "wav" / f"{name}.wav")
        out[name] = {"session": session, "utts": utts, "other": other, "emo": emo, "wav": wav, "rate": rate}
    return out


def _truth(corpus: Path) -> dict:
    return json.loads((corpus / "persons.json").read_text())


def _speaker(utt_id: str) -> str:
    m = UTT_RE.match(utt_id)
    return m.group(1)[:5] + m.group(2)


def test_release_layout(tiny_corpus):
    release = tiny_corpus / RELEASE
    assert sorted(p.name for p in release.iterdir()) == [f"Session{i}" for i in range(1, 6)]
    names = _dialogs(tiny_corpus)
    kinds = set()
    for i in range(1, 6):
        session = release / f"Session{i}"
        for sub in ("dialog/lab", "sentences/ForcedAlignment", "dialog/EmoEvaluation/Attribute",
                    "dialog/EmoEvaluation/Categorical", "dialog/EmoEvaluation/Self-evaluation"):
            assert (session / sub).is_dir(), sub
        mine = [n for n, s in names.items() if s == session]
        assert len(mine) >= 3
        assert {DIALOG_RE.match(n).group(2) for n in mine} == {"F", "M"}, mine
        for n in mine:
            m = DIALOG_RE.match(n)
            assert m and m.group(1) == str(i), n
            kinds.add(m.group(3)[:5])
            for path in (f"dialog/avi/DivX/{n}.avi", f"dialog/wav/{n}.wav", f"dialog/EmoEvaluation/{n}.txt"):
                assert (session / path).is_file(), path
            assert (session / "sentences" / "wav" / n).is_dir()
    assert kinds == {"impro", "scrip"}


def test_text_files_parse_and_agree(parsed):
    markers = non_utterance = overlapped = 0
    for name, d in parsed.items():
        duration = len(d["wav"]) / d["rate"]
        assert d["utts"], name
        for uid, (start, end, text) in d["utts"].items():
            assert UTT_RE.match(uid).group(1) == name
            assert 0 <= start < end <= duration, (uid, start, end, duration)
            markers += "[" in text
        annotated = {u for u in d["utts"] if "XX" not in u}
        assert set(d["emo"]) == annotated, name
        for uid, (start, end, _) in d["emo"].items():
            assert d["utts"][uid][:2] == (start, end)
        overlapped += len(d["utts"]) - len(annotated)
        non_utterance += len(d["other"])
    assert markers and non_utterance and overlapped


def test_sentence_wavs_are_the_speakers_channel(parsed):
    for name, d in parsed.items():
        folder = d["session"] / "sentences" / "wav" / name
        assert {p.stem for p in folder.glob("*.wav")} == set(d["emo"]), name
        for uid, (start, end, _) in d["emo"].items():
            mono, rate = _read_wav(folder / f"{uid}.wav")
            assert rate == 16000 and mono.shape[1] == 1
            channel = 0 if _speaker(uid)[-1] == name[5] else 1
            i, j = round(start * rate), round(end * rate)
            assert np.array_equal(mono[:, 0], d["wav"][i:j, channel]), uid


def test_dialog_wav_speaker_louder_on_own_channel(parsed):
    checked = 0
    for name, d in parsed.items():
        assert d["rate"] == 16000 and d["wav"].shape[1] == 2
        spans = [(s, e) for u, (s, e, _) in d["utts"].items() if "XX" in u]
        for uid, (start, end, _) in d["emo"].items():
            if any(s < end and start < e for s, e in spans):
                continue  # overlapped by the other actor
            seg = d["wav"][round(start * 16000) : round(end * 16000)].astype(np.float64)
            rms = np.sqrt((seg**2).mean(axis=0))
            own = 0 if _speaker(uid)[-1] == name[5] else 1
            assert rms[own] > 3 * rms[1 - own], (uid, rms)
            checked += 1
    assert checked > 50


def test_truth_matches_files_and_persons_are_distinct(tiny_corpus, parsed):
    truth = _truth(tiny_corpus)
    assert sorted(truth["persons"]) == PERSONS
    assert len({p["voice"] for p in truth["persons"].values()}) == 10
    assert all(p["voice"][-2] == p["gender"].lower() for p in truth["persons"].values())
    assert len({p["face"]["lfw_index"] for p in truth["persons"].values()}) == 10
    files = {uid: (name, *v) for name, d in parsed.items() for uid, v in d["utts"].items()}
    assert set(truth["utterances"]) == set(files)
    per_person, dialogs_of = Counter(), defaultdict(set)
    for uid, u in truth["utterances"].items():
        assert u["person"] == _speaker(uid)
        assert (u["dialog"], u["start"], u["end"], u["text"]) == files[uid]
        assert u["sentence_wav"] == ("XX" not in uid)
        if u["sentence_wav"]:
            per_person[u["person"]] += 1
            dialogs_of[u["person"]].add(u["dialog"])
    assert min(per_person[p] for p in PERSONS) >= 8
    assert min(len(dialogs_of[p]) for p in PERSONS) >= 3  # room for a dialog-disjoint train/valid/test


def test_scripted_lines_are_shared_across_sessions(parsed):
    scripts = defaultdict(set)
    for name, d in parsed.items():
        if "script" in name:
            turns = sorted((s, t) for u, (s, e, t) in d["utts"].items() if "XX" not in u)
            lines = tuple(re.sub(r" ?\[[A-Z]+\]", "", t) for _, t in turns)  # markers vary per take
            scripts[name.split("_", 1)[1]].add(lines)
    assert scripts and all(len(v) == 1 for v in scripts.values())


def test_video_is_split_screen_ntsc(parsed):
    for name in list(parsed)[:3]:
        d = parsed[name]
        with av.open(str(d["session"] / "dialog" / "avi" / "DivX" / f"{name}.avi")) as container:
            stream = container.streams.video[0]
            assert abs(float(stream.average_rate) - 30000 / 1001) < 0.01
            frames = [f for f in container.decode(video=0)]
        assert (frames[0].width, frames[0].height) == (720, 480)
        assert abs(len(frames) / (30000 / 1001) - len(d["wav"]) / 16000) < 0.1


def test_mtcnn_finds_the_speakers_face(parsed):
    from facenet_pytorch import MTCNN
    from PIL import Image

    mtcnn = MTCNN(image_size=48, margin=2, post_process=False)
    crops = []
    for name in list(parsed)[::4]:
        d = parsed[name]
        mids = {round((s + e) / 2 * 30000 / 1001): uid for uid, (s, e, _) in d["emo"].items()}
        with av.open(str(d["session"] / "dialog" / "avi" / "DivX" / f"{name}.avi")) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in mids:
                    x = 0 if _speaker(mids[i])[-1] == name[5] else 360
                    half = frame.to_ndarray(format="rgb24")[:, x : x + 360]
                    crops.append(Image.fromarray(half[128:352, 68:292]))  # centre 224x224
    boxes, _ = mtcnn.detect(crops)
    rate = np.mean([b is not None for b in boxes])
    assert len(crops) >= 20 and rate >= MTCNN_MIN_RATE, (len(crops), rate)


def _hashes(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_same_files_other_seed_other_files(tiny_corpus, tmp_path):
    from training.synth import generate

    # One dialog alone, in another worker layout, must equal the full run's files.
    name = sorted(_dialogs(tiny_corpus))[0]
    session = tiny_corpus / RELEASE / "Session1"
    expected = {k: v for k, v in _hashes(session).items() if name in k}
    assert len(expected) >= 8  # avi, wav, two texts, sentence wavs
    again = generate(tmp_path / "again", seed=0, size="tiny", workers=1, progress=False, only=[name])
    assert _hashes(again / RELEASE / "Session1") == expected
    other = generate(tmp_path / "other", seed=1, size="tiny", workers=1, progress=False, only=[name])
    theirs = _hashes(other / RELEASE / "Session1")
    for kind in ("avi", "dialog/wav/", "transcriptions"):
        assert {v for k, v in expected.items() if kind in k}.isdisjoint(v for k, v in theirs.items() if kind in k), kind


def test_cli_rejects_unknown_size(capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", "/nonexistent", "--size", "huge"])
    assert exc.value.code == 2
