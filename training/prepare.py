"""``mmid prepare iemocap``: the IEMOCAP release -> a prepared DATA folder.

Per dialog (one process-pool task each): parse the transcript and
EmoEvaluation, decode the video once with PyAV, take one frame every
img_interval ms of each utterance, crop the speaker's half, centre-crop it,
crop the face with MTCNN, cut the speaker's channel of the dialog wav, and
write faces/<dialog>/<utt>.npy, audio/<dialog>/<utt>.wav and, last,
dialogs/<dialog>.json: the dialog's manifest rows and events, whose presence
marks the dialog done (a re-run skips it). The main process then writes
manifest.jsonl, persons.json, splits/ and report.json (``write_dataset``).

Nothing in a dialog is fatal: missing or broken media, unknown lines, bad
times and empty text become events {action, reason, dialog, utterance, detail}
counted in the report, and one warning line per dialog.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from engine.config import Config
from engine.features import clean_text, decode_audio, write_wav
from training import iemocap
from training.splits import SplitError, dialog_split, utterance_split

PARTS = "dialogs"  # DATA/dialogs/<dialog>.json: per-dialog results, the resume marker
FACE_BATCH = 64  # crops collected before one MTCNN call
SAMPLE_RATE = 16000  # Hz, the prepared audio
VIDEO_END_SLACK_S = 1.0  # video may end this much before the audio without a "truncated" event


@dataclass
class DialogResult:
    """What one dialog produced (also its done-marker file)."""

    dialog: str
    rows: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    media_s: float = 0.0  # seconds of source media covered

    def event(self, action: str, reason: str, utterance: str | None = None, detail: str = "") -> None:
        self.events.append({"action": action, "reason": reason, "dialog": self.dialog,
                            "utterance": utterance, "detail": detail})

    def to_json(self) -> dict:
        return {"dialog": self.dialog, "rows": self.rows, "events": self.events, "media_s": self.media_s}


@dataclass
class Planned:
    """An utterance to cut: id, times, text and where its frames and audio are."""

    id: str
    start: float
    end: float
    text: str
    emotion: str | None
    half: str
    channel: int
    times: list[float] = field(default_factory=list)
    crops: dict[int, np.ndarray] = field(default_factory=dict)
    found: dict[int, bool] = field(default_factory=dict)


# ---------------------------------------------------------------- planning


def plan_utterances(files: iemocap.DialogFiles, res: DialogResult) -> list[Planned]:
    """Merge transcript and EmoEvaluation into the utterances to cut (times from
    EmoEvaluation, else from the transcript); skips recorded in ``res``."""
    turns: dict[str, iemocap.Turn] = {}
    emo: dict[str, iemocap.EmoEntry] = {}
    for path, parser, store in ((files.transcription, iemocap.parse_transcription, turns),
                                (files.emo, iemocap.parse_emo_evaluation, emo)):
        if not path.exists():
            res.event("note", f"{path.parent.name}_missing", detail=str(path))
            continue
        parsed = parser(path)
        for line in parsed.unknown_lines:
            res.event("note", "unknown_line", detail=f"{path.parent.name}: {line[:120]}")
        for item in parsed.items:
            if item.id in store:
                res.event("skip", "duplicate_id", item.id, f"second entry in {path.parent.name}")
                continue
            store[item.id] = item
    planned = []
    for utt_id in sorted(set(turns) | set(emo), key=lambda u: (emo.get(u) or turns[u]).start):
        if iemocap.dialog_of(utt_id) != files.name:
            res.event("skip", "foreign_id", utt_id, f"id does not belong to dialog {files.name}")
            continue
        if not iemocap.is_utterance_id(utt_id):
            res.event("skip", "unannotated_turn", utt_id, "overlapped/unannotated turn (no utterance number)")
            continue
        turn, entry = turns.get(utt_id), emo.get(utt_id)
        if turn is None:
            res.event("repair", "missing_transcript", utt_id, "in EmoEvaluation only: text left empty")
        elif entry is None:
            res.event("repair", "times_from_transcription", utt_id, "no EmoEvaluation entry")
        src = entry or turn
        half, channel = iemocap.speaker_side(utt_id)
        planned.append(Planned(utt_id, src.start, src.end, turn.text if turn else "",
                               entry.emotion if entry else None, half, channel))
    return planned


def fit_times(planned: list[Planned], media_end: float, cfg: Config, res: DialogResult) -> list[Planned]:
    """Clip to the media end and max duration, drop too-short or empty spans; set frame times."""
    kept = []
    step = cfg.prepare.img_interval_ms / 1000.0
    for u in planned:
        if u.end <= u.start:
            res.event("skip", "bad_times", u.id, f"end {u.end} <= start {u.start}")
            continue
        if u.start >= media_end:
            res.event("skip", "beyond_media_end", u.id, f"starts at {u.start:.2f} s, media ends at {media_end:.2f} s")
            continue
        if u.end > media_end:
            res.event("repair", "end_clipped_to_media", u.id, f"end {u.end:.2f} s -> {media_end:.2f} s")
            u.end = media_end
        if u.end - u.start < cfg.prepare.min_duration_s:
            res.event("skip", "too_short", u.id, f"{u.end - u.start:.3f} s < {cfg.prepare.min_duration_s} s")
            continue
        if u.end - u.start > cfg.prepare.max_duration_s:
            res.event("repair", "cut_to_max_duration", u.id, f"{u.end - u.start:.1f} s -> {cfg.prepare.max_duration_s} s")
            u.end = u.start + cfg.prepare.max_duration_s
        u.times = list(np.arange(u.start, u.end, step)[: cfg.features.max_frames])
        kept.append(u)
    return kept


# ---------------------------------------------------------------- media


def load_dialog_audio(files: iemocap.DialogFiles, res: DialogResult) -> np.ndarray | None:
    """(channels, N) float32 at 16 kHz, or None (event recorded) when unusable."""
    import av

    if not files.wav.exists():
        res.event("repair", "wav_missing", detail=f"{files.wav}: audio absent for the dialog's utterances")
        return None
    try:
        audio = decode_audio(files.wav, SAMPLE_RATE)
    except (av.error.FFmpegError, ValueError) as exc:
        res.event("repair", "wav_unreadable", detail=f"{files.wav}: {exc}")
        return None
    if audio.shape[0] == 1:
        res.event("note", "mono_wav", detail="one channel: used for both speakers")
    return audio


def video_length(path: Path) -> float:
    """Declared duration of a video in seconds (0 when unknown or unreadable)."""
    import av

    try:
        with av.open(str(path)) as c:
            return float(c.duration / 1e6) if c.duration else 0.0
    except av.error.FFmpegError:
        return 0.0


def speaker_crop(frame: np.ndarray, half: str, side: int) -> np.ndarray:
    """The speaker's half of a split-screen frame, centre-cropped to side x side."""
    h, w = frame.shape[:2]
    part = frame[:, : w // 2] if half == "left" else frame[:, w // 2 :]
    ph, pw = part.shape[:2]
    sh, sw = min(side, ph), min(side, pw)
    top, left = (ph - sh) // 2, (pw - sw) // 2
    return part[top : top + sh, left : left + sw]


class FaceQueue:
    """Collects (utterance, frame index, crop) and runs MTCNN in batches."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.pending: list[tuple[Planned, int, np.ndarray]] = []

    def add(self, u: Planned, k: int, image: np.ndarray) -> None:
        self.pending.append((u, k, image))
        if len(self.pending) >= FACE_BATCH:
            self.flush()

    def flush(self) -> None:
        from engine.faces import crop_faces

        if not self.pending:
            return
        crops, found, _ = crop_faces([p[2] for p in self.pending], self.cfg.prepare.face_size, self.cfg.prepare.face_margin)
        for (u, k, _), crop, ok in zip(self.pending, crops, found):
            u.crops[k], u.found[k] = crop, bool(ok)
        self.pending = []


def sample_frames(video: Path, planned: list[Planned], cfg: Config, res: DialogResult,
                  region: Callable[[np.ndarray, Planned], np.ndarray]) -> float:
    """Decode the video once; fill each utterance's crops from ``region(frame, utterance)``
    (the part of the frame searched for a face). Returns the last frame time."""
    import av

    if not video.exists():
        res.event("repair", "video_missing", detail=f"{video}: no face frames for the dialog's utterances")
        return 0.0
    requests = sorted((t, i, k) for i, u in enumerate(planned) for k, t in enumerate(u.times))
    queue, r, last = FaceQueue(cfg), 0, 0.0
    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            half_period = 0.5 / float(stream.average_rate or 30)
            for n, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else n * 2 * half_period
                last = t
                if r >= len(requests):
                    break
                image = None
                while r < len(requests) and requests[r][0] < t + half_period:
                    _, i, k = requests[r]
                    image = frame.to_ndarray(format="rgb24") if image is None else image
                    queue.add(planned[i], k, region(image, planned[i]))
                    r += 1
    except av.error.FFmpegError as exc:
        res.event("repair", "video_unreadable", detail=f"{video}: {type(exc).__name__}: {exc} (after {last:.2f} s)")
    queue.flush()
    late = [q for q in requests[r:] if q[0] > last + VIDEO_END_SLACK_S]
    if late:
        lost = {planned[i].id for _, i, _ in late}
        res.event("repair", "video_truncated",
                  detail=f"video ends at {last:.2f} s; {len(late)} frames of {len(lost)} utterances missing")
    return last


# ---------------------------------------------------------------- one dialog


def guarded(fn: Callable[..., DialogResult], name: str, *args) -> DialogResult:
    """Run one dialog's preparation; an unexpected error fails that dialog only
    (reported, no done marker, so a re-run retries it)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - any failure is confined to its dialog
        res = DialogResult(name)
        res.event("skip", "dialog_failed", detail=f"{type(exc).__name__}: {exc}")
        return res


def prepare_dialog(files: iemocap.DialogFiles, out: Path, cfg: Config) -> DialogResult:
    """Cut one dialog into utterances; write its files and its done marker."""
    return guarded(_prepare_dialog, files.name, files, out, cfg)


def _prepare_dialog(files: iemocap.DialogFiles, out: Path, cfg: Config) -> DialogResult:
    res = DialogResult(files.name)
    planned = plan_utterances(files, res)
    audio = load_dialog_audio(files, res)
    media_end = audio.shape[1] / SAMPLE_RATE if audio is not None else video_length(files.avi)
    if audio is None and media_end <= 0:
        for u in planned:
            res.event("skip", "no_media", u.id, "neither a readable wav nor a readable video")
        planned = []
    planned = fit_times(planned, media_end, cfg, res)
    side = cfg.prepare.half_crop
    sample_frames(files.avi, planned, cfg, res, lambda image, u: speaker_crop(image, u.half, side))
    res.media_s = media_end
    for u in planned:
        person = iemocap.person_of(u.id)
        res.rows.append(write_utterance(u, person, iemocap.session_of(u.id), audio, out, cfg, res))
    write_part(out, res)
    return res


def write_utterance(u: Planned, person: str, session: str, audio: np.ndarray | None,
                    out: Path, cfg: Config, res: DialogResult) -> dict:
    """Write the utterance's faces .npy and audio .wav; return its manifest row."""
    size = cfg.prepare.face_size
    for kind in ("faces", "audio"):
        (out / kind / res.dialog).mkdir(parents=True, exist_ok=True)
    ks = sorted(u.crops)
    crops = np.stack([u.crops[k] for k in ks]) if ks else np.zeros((0, size, size, 3), np.uint8)
    found = [int(u.found[k]) for k in ks]
    if len(ks) < len(u.times):
        res.event("repair", "frames_missing", u.id, f"{len(ks)} of {len(u.times)} frames (video missing or ended)")
    faces_rel = f"faces/{res.dialog}/{u.id}.npy"
    audio_rel = f"audio/{res.dialog}/{u.id}.wav"
    np.save(out / faces_rel, crops, allow_pickle=False)
    if audio is None:
        clip = np.zeros(0, np.float32)
    else:
        ch = min(u.channel, audio.shape[0] - 1)
        clip = audio[ch, int(round(u.start * SAMPLE_RATE)) : int(round(u.end * SAMPLE_RATE))]
    write_wav(out / audio_rel, clip, SAMPLE_RATE)
    if not clean_text(u.text):
        res.event("repair", "empty_text", u.id, "no words after removing markers: text absent")
    return {
        "id": u.id, "person": person, "session": session, "dialog": res.dialog, "start": round(u.start, 4), "end": round(u.end, 4), "text": u.text,
        "n_frames": len(ks), "face_found": round(sum(found) / len(ks), 4) if ks else 0.0,
        "frame_faces": found, "emotion": u.emotion, "faces": faces_rel, "audio": audio_rel,
    }


def write_part(out: Path, res: DialogResult) -> None:
    """Write DATA/dialogs/<dialog>.json atomically: the dialog is done."""
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    tmp = out / PARTS / f".{res.dialog}.json.tmp"
    tmp.write_text(json.dumps(res.to_json()))
    os.replace(tmp, out / PARTS / f"{res.dialog}.json")


def read_part(out: Path, dialog: str) -> DialogResult | None:
    path = out / PARTS / f"{dialog}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return DialogResult(data["dialog"], data["rows"], data["events"], data.get("media_s", 0.0))


# ---------------------------------------------------------------- many dialogs


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(jobs: list, fn: Callable, workers: int, desc: str) -> Iterable[DialogResult]:
    """fn(*job) over jobs, in a process pool when workers > 1, with a tqdm bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="dialog", file=sys.stderr)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(*job)
                bar.update()
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker) as pool:
            for res in pool.map(fn, *zip(*jobs)):
                yield res
                bar.update()
    finally:
        bar.close()


def warn(res: DialogResult) -> None:
    """One line per dialog that had skips or repairs."""
    counts = Counter(f"{e['action']}:{e['reason']}" for e in res.events if e["action"] != "note")
    if counts:
        from tqdm import tqdm

        tqdm.write(f"mmid prepare: warning: {res.dialog}: " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())),
                   file=sys.stderr)


def prepare_iemocap(src: Path, out: Path, cfg: Config, workers: int | None = None) -> dict:
    """Prepare the release at ``src`` into ``out``; returns the report."""
    src, out = Path(src), Path(out)
    if not any((src / s).is_dir() for s in iemocap.SESSIONS):
        raise FileNotFoundError(f"{src} holds no Session1..Session5 folders: pass .../IEMOCAP_full_release")
    out.mkdir(parents=True, exist_ok=True)
    dialogs, odd = iemocap.find_dialogs(src)
    results, todo = [], []
    for files in dialogs:
        done = read_part(out, files.name)
        (results if done else todo).append(done or files)
    workers = workers if workers is not None else cfg.prepare.workers
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    fresh = []
    for res in run_jobs([(f, out, cfg) for f in todo], prepare_dialog, workers, "prepare"):
        warn(res)
        fresh.append(res)
    wall = time.perf_counter() - t0
    extra = [{"action": "note", "reason": "unknown_file", "dialog": None, "utterance": None, "detail": p} for p in odd]
    timing = {"dialogs_prepared": len(fresh), "dialogs_resumed": len(results), "workers": workers,
              "wall_s": round(wall, 2), "media_s": round(sum(r.media_s for r in fresh), 2)}
    timing["media_s_per_wall_s"] = round(timing["media_s"] / wall, 3) if fresh and wall > 0 else None
    return write_dataset(out, results + fresh, cfg, extra, {"source": str(src), "kind": "iemocap", **timing})


def write_dataset(out: Path, results: list[DialogResult], cfg: Config, extra_events: list[dict], info: dict) -> dict:
    """manifest.jsonl, persons.json, splits/ and report.json from all dialog results."""
    results = sorted(results, key=lambda r: r.dialog)
    rows = [row for r in results for row in r.rows]
    events = extra_events + [e for r in results for e in r.events]
    with open(out / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    persons = sorted({row["person"] for row in rows})
    (out / "persons.json").write_text(json.dumps({"persons": persons}, indent=2) + "\n")
    report = {
        **info, "utterances": len(rows), "persons": len(persons),
        "per_person": dict(sorted(Counter(r["person"] for r in rows).items())),
        "skipped": dict(sorted(Counter(e["reason"] for e in events if e["action"] == "skip").items())),
        "repaired": dict(sorted(Counter(e["reason"] for e in events if e["action"] == "repair").items())),
        "notes": dict(sorted(Counter(e["reason"] for e in events if e["action"] == "note").items())),
        "split_errors": [],
    }
    p = cfg.prepare
    for protocol, fn, kwargs in (("utterance", utterance_split, {}), ("dialog", dialog_split,
                                 {"group_key": info.get("group_key", "session")})):
        try:
            split = fn(rows, p.valid_fraction, p.test_fraction, p.split_seed, **kwargs)
        except SplitError as exc:
            report["split_errors"].append(f"{protocol}: {exc}")
            continue
        folder = out / "splits" / protocol
        folder.mkdir(parents=True, exist_ok=True)
        for name, ids in split.items():
            (folder / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
        report[f"split_{protocol}"] = {name: len(ids) for name, ids in split.items()}
    report["events"] = events
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
