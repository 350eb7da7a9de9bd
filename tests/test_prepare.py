"""`mmid prepare iemocap` and `mmid prepare clips` on generated corpora."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from engine.cli import main as mmid
from engine.features import decode_audio, read_wav
from training import iemocap

MANIFEST_KEYS = {"id", "person", "session", "dialog", "start", "end", "text", "n_frames",
                 "face_found", "frame_faces", "emotion", "faces", "audio"}


def _manifest(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]


def _split(data: Path, protocol: str) -> dict[str, list[str]]:
    return {s: (data / "splits" / protocol / f"{s}.txt").read_text().split() for s in ("train", "valid", "test")}


# ---------------------------------------------------------------- label rules


def test_person_is_session_plus_last_token_gender():
    assert iemocap.person_of("Ses01F_impro01_M000") == "Ses01M"
    assert iemocap.person_of("Ses03M_script01_1_F012") == "Ses03F"
    assert iemocap.person_of("Ses03M_impro03_MXX0") == "Ses03M"
    assert not iemocap.is_utterance_id("Ses03M_impro03_MXX0")


def test_speaker_side_rule():
    assert iemocap.speaker_side("Ses01F_impro01_F000") == ("left", 0)
    assert iemocap.speaker_side("Ses01F_impro01_M000") == ("right", 1)
    assert iemocap.speaker_side("Ses02M_script01_1_M003") == ("left", 0)
    assert iemocap.speaker_side("Ses02M_script01_1_F003") == ("right", 1)


def test_parsers_count_unknown_lines(tmp_path):
    tr = tmp_path / "t.txt"
    tr.write_text("Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\nM: [BREATHING]\n"
                  "Ses01F_impro01_MXX0 [007.0-008.0]: [LAUGHTER]\n")
    parsed = iemocap.parse_transcription(tr)
    assert [t.id for t in parsed.items] == ["Ses01F_impro01_F000", "Ses01F_impro01_MXX0"]
    assert parsed.unknown_lines == ["M: [BREATHING]"]
    emo = tmp_path / "e.txt"
    emo.write_text("% header\n\n[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5, 2.5, 2.5]\n"
                   "C-E2:\tNeutral;\t()\n\ngarbage block\nC-E1:\tx\n")
    parsed = iemocap.parse_emo_evaluation(emo)
    assert [(e.id, e.start, e.emotion) for e in parsed.items] == [("Ses01F_impro01_F000", 6.2901, "neu")]
    assert parsed.unknown_lines == ["garbage block"]


# ---------------------------------------------------------------- prepared tiny corpus


def test_manifest_persons_follow_rule_and_truth(prepared_tiny, tiny_corpus):
    rows = _manifest(prepared_tiny)
    truth = json.loads((tiny_corpus / "persons.json").read_text())["utterances"]
    assert rows and all(set(r) == MANIFEST_KEYS for r in rows)
    for r in rows:
        assert r["person"] == r["id"][:5] + r["id"].split("_")[-1][0]
        assert r["person"] == truth[r["id"]]["person"]
    persons = json.loads((prepared_tiny / "persons.json").read_text())["persons"]
    assert persons == sorted({r["person"] for r in rows}) and len(persons) == 10


def test_files_have_contract_shapes(prepared_tiny):
    rows = _manifest(prepared_tiny)
    for r in rows[:10]:
        crops = np.load(prepared_tiny / r["faces"], allow_pickle=False)
        assert crops.dtype == np.uint8 and crops.shape == (r["n_frames"], 48, 48, 3)
        assert len(r["frame_faces"]) == r["n_frames"]
        audio = read_wav(prepared_tiny / r["audio"])
        assert abs(len(audio) / 16000 - (r["end"] - r["start"])) < 0.01
    assert np.mean([r["face_found"] for r in rows]) > 0.9


def test_audio_is_the_speakers_channel(prepared_tiny, tiny_corpus):
    """The cut matches the generator's per-utterance wav (sentences/wav) far
    better than the other channel does."""
    rows = _manifest(prepared_tiny)
    for r in [r for r in rows if r["person"][-1] != r["dialog"][5]][:2] + [rows[0]]:
        sentence = tiny_corpus / "IEMOCAP_full_release" / f"Session{int(r['session'][3:])}" / "sentences" / "wav" / r["dialog"] / f"{r['id']}.wav"
        ref = decode_audio(sentence)[0]
        ours = read_wav(prepared_tiny / r["audio"])
        n = min(len(ref), len(ours))
        corr = np.corrcoef(ref[:n], ours[:n])[0, 1]
        assert corr > 0.9, (r["id"], corr)


def test_splits_disjoint_and_cover_every_person(prepared_tiny):
    rows = {r["id"]: r for r in _manifest(prepared_tiny)}
    persons = {r["person"] for r in rows.values()}
    for protocol in ("utterance", "dialog"):
        split = _split(prepared_tiny, protocol)
        ids = [i for s in split.values() for i in s]
        assert len(ids) == len(set(ids)) and set(ids) == set(rows), protocol
        for name, members in split.items():
            assert {rows[i]["person"] for i in members} == persons, (protocol, name)
    dialogs = {name: {rows[i]["dialog"] for i in members} for name, members in _split(prepared_tiny, "dialog").items()}
    assert not (dialogs["train"] & dialogs["valid"] or dialogs["train"] & dialogs["test"] or dialogs["valid"] & dialogs["test"])


def test_report_explains_every_skipped_utterance(prepared_tiny, tiny_corpus):
    report = json.loads((prepared_tiny / "report.json").read_text())
    truth = json.loads((tiny_corpus / "persons.json").read_text())["utterances"]
    kept = {r["id"] for r in _manifest(prepared_tiny)}
    skipped = {e["utterance"]: e["reason"] for e in report["events"] if e["action"] == "skip"}
    missing = set(truth) - kept
    assert missing and missing <= set(skipped)
    assert all(skipped[u] == "unannotated_turn" for u in missing if "XX" in u)
    assert report["utterances"] == len(kept) and sum(report["per_person"].values()) == len(kept)
    assert report["skipped"]["unannotated_turn"] == sum("XX" in u for u in truth)


def test_resume_skips_finished_dialogs(prepared_tiny, tiny_corpus):
    before = (prepared_tiny / "manifest.jsonl").read_text()
    src = tiny_corpus / "IEMOCAP_full_release"
    assert mmid(["prepare", "iemocap", "--src", str(src), "--out", str(prepared_tiny), "--workers", "1"]) == 0
    report = json.loads((prepared_tiny / "report.json").read_text())
    assert report["dialogs_prepared"] == 0 and report["dialogs_resumed"] == 15
    assert (prepared_tiny / "manifest.jsonl").read_text() == before


def test_damaged_corpus_prepares_to_completion(tiny_corpus, tmp_path):
    src = tmp_path / "IEMOCAP_full_release"
    shutil.copytree(tiny_corpus / "IEMOCAP_full_release" / "Session1", src / "Session1")
    dialog_dir = src / "Session1" / "dialog"
    avis = sorted((dialog_dir / "avi" / "DivX").glob("*.avi"))
    truncated, no_wav = avis[0].stem, avis[1].stem
    data = avis[0].read_bytes()
    avis[0].write_bytes(data[: len(data) * 2 // 5])
    (dialog_dir / "wav" / f"{no_wav}.wav").unlink()
    out = tmp_path / "data"
    fast = ["--set", "prepare.img_interval_ms=1000"]
    assert mmid(["prepare", "iemocap", "--src", str(src), "--out", str(out), "--workers", "1", *fast]) == 0
    report = json.loads((out / "report.json").read_text())
    reasons = {(e["dialog"], e["reason"]) for e in report["events"]}
    assert (no_wav, "wav_missing") in reasons
    assert {(truncated, "video_truncated"), (truncated, "video_unreadable")} & reasons
    rows = _manifest(out)
    assert {r["dialog"] for r in rows} == {a.stem for a in avis}
    assert all(len(read_wav(out / r["audio"])) == 0 for r in rows if r["dialog"] == no_wav)
    assert any(r["n_frames"] == 0 for r in rows if r["dialog"] == truncated)


# ---------------------------------------------------------------- own clips


def _make_clip(corpus: Path, dialog: str, person: str, out: Path, start: float, end: float) -> None:
    """The person's half of a dialog's video with the person's channel, as an mp4."""
    session = corpus / "IEMOCAP_full_release" / f"Session{int(dialog[3:5])}" / "dialog"
    half, channel = iemocap.speaker_side(f"{dialog}_{person[-1]}000")
    x = 0 if half == "left" else 360
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-ss", str(start), "-to", str(end),
         "-i", str(session / "avi" / "DivX" / f"{dialog}.avi"), "-ss", str(start), "-to", str(end),
         "-i", str(session / "wav" / f"{dialog}.wav"),
         "-filter_complex", f"[0:v]crop=360:480:{x}:0[v];[1:a]pan=mono|c0=c{channel}[a]",
         "-map", "[v]", "-map", "[a]", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(out)],
        check=True,
    )


def test_prepare_clips_same_format(tiny_corpus, tmp_path):
    truth = json.loads((tiny_corpus / "persons.json").read_text())
    src = tmp_path / "clips"
    persons = ["Ses01F", "Ses02M"]
    for person in persons:
        (src / person).mkdir(parents=True)
        dialogs = [d for d, info in truth["dialogs"].items() if person in (info["left"], info["right"])][:3]
        for k, dialog in enumerate(dialogs):
            utts = [u for u in truth["utterances"].values() if u["dialog"] == dialog and u["person"] == person and u["emotion"]]
            first, last = utts[0], utts[-1]
            clip = src / person / f"talk{k}.mp4"
            _make_clip(tiny_corpus, dialog, person, clip, first["start"] - 0.2, last["end"] + 0.2)
            if k == 0:  # timed sidecar
                clip.with_suffix(".txt").write_text("".join(
                    f"[{u['start'] - first['start'] + 0.2:.2f}-{u['end'] - first['start'] + 0.2:.2f}] {u['text']}\n" for u in utts))
            elif k == 1 and person == persons[0]:  # plain sidecar: one utterance
                clip.with_suffix(".txt").write_text(" ".join(u["text"] for u in utts) + "\n")
            # otherwise no sidecar: tiny.en transcribes
    out = tmp_path / "data"
    fast = ["--set", "prepare.img_interval_ms=1000"]
    assert mmid(["prepare", "clips", "--src", str(src), "--out", str(out), "--workers", "2", *fast]) == 0
    rows = _manifest(out)
    assert rows and all(set(r) == MANIFEST_KEYS for r in rows)
    assert json.loads((out / "persons.json").read_text())["persons"] == persons
    assert {r["person"] for r in rows} == set(persons)
    whispered = [r for r in rows if r["dialog"].endswith("talk2")]
    assert whispered and any(r["text"].strip() for r in whispered)
    assert all(np.load(out / r["faces"], allow_pickle=False).shape[1:] == (48, 48, 3) for r in rows)
    assert np.mean([r["face_found"] for r in rows]) > 0.8
    split = _split(out, "dialog")
    by_id = {r["id"]: r["dialog"] for r in rows}
    dialogs = [{by_id[i] for i in ids} for ids in split.values()]
    assert not (dialogs[0] & dialogs[1] or dialogs[0] & dialogs[2] or dialogs[1] & dialogs[2])
    report = json.loads((out / "report.json").read_text())
    assert report["notes"].get("transcribed", 0) >= 2
