"""Face tracking (engine/face_track.py) against full MTCNN detection on every frame.

    .venv/bin/python benchmarks/face_track_check.py --corpus CORPUS --data DATA --run RUN
        [--out DIR] [--videos 6] [--write]

CORPUS: a synthetic IEMOCAP-layout corpus (or its IEMOCAP_full_release folder); DATA:
that corpus prepared by ``mmid prepare iemocap`` (faces by ``crop_faces`` on every
sampled frame); RUN: a run trained on DATA.

1. Boxes: over the first --videos dialog videos, each speaker's 224x224 centre crop
   every 0.5 s of the whole video goes through ``FaceTracker`` (default settings, one
   source per video and half) and through ``crop_faces``: agreement of found/not
   found, IoU of the two boxes (mean, 5th percentile, min), the tracker's full /
   tracked / searched-again / lost counts, and for scale the IoU of consecutive full-detection boxes
   (how far a face moves in 500 ms). Also the time per frame (2 torch threads,
   median of 30 calls): the tracker following one frame vs ``crop_faces`` on one.
2. Identification: CORPUS is prepared again into --out (default a temporary folder)
   with ``FaceQueue.flush`` replaced, in this process only, by one that hands the
   frames to a single ``FaceTracker`` (source "<dialog>:<half>", time = frame time).
   Preparation runs with workers=1 (in process: a spawned pool worker would not see
   the replacement). RUN is evaluated on both folders' test split (the run's split
   protocol): accuracy, macro-F1, visual-branch accuracy; plus, over the test
   utterances, frames whose found flag differs and the mean absolute pixel
   difference of the two folders' crops.

--write replaces the "## Face tracking" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.bench import machine, replace_section, time_calls  # noqa: E402
from engine.config import Config, load_config  # noqa: E402
from engine.face_track import FaceTracker, TrackStats  # noqa: E402
from engine.faces import crop_faces  # noqa: E402
from training import iemocap, prepare  # noqa: E402
from training.dataset import read_split  # noqa: E402
from training.evaluate import evaluate_run  # noqa: E402

SECTION = "## Face tracking"
EVERY_S = 0.5
HALVES = ("left", "right")
TIMED_CALLS = 30


def release_root(corpus: Path) -> Path:
    return corpus / "IEMOCAP_full_release" if (corpus / "IEMOCAP_full_release").is_dir() else corpus


def video_frames(path: Path, every_s: float) -> list[tuple[float, np.ndarray]]:
    """(time, RGB frame) every ``every_s`` seconds of the whole video."""
    import av

    out: list[tuple[float, np.ndarray]] = []
    with av.open(str(path)) as container:
        for n, frame in enumerate(container.decode(video=0)):
            t = frame.time if frame.time is not None else n / 30.0
            if t + 1e-6 >= len(out) * every_s:
                out.append((len(out) * every_s, frame.to_ndarray(format="rgb24")))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of boxes (n, 4) x1, y1, x2, y2."""
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def median_ms(fn, calls: int = TIMED_CALLS) -> float:
    return 1000 * float(np.median(time_calls(fn, calls, "cpu", warmup=1)))


def box_agreement(root: Path, n_videos: int) -> dict:
    """Tracker vs full detection on every 0.5 s of the first ``n_videos`` videos, both halves."""
    videos = [d for d in iemocap.find_dialogs(root)[0] if d.avi.exists()][:n_videos]
    tracker = FaceTracker()
    found_agree, ious, moves, frames = [], [], [], 0
    for files in videos:
        sampled = video_frames(files.avi, EVERY_S)
        for half in HALVES:
            images = [np.ascontiguousarray(prepare.speaker_crop(f, half, 224)) for _, f in sampled]
            _, full_found, full_boxes = crop_faces(images)
            _, track_found, track_boxes = tracker.crop([(f"{files.name}:{half}", t, im)
                                                         for (t, _), im in zip(sampled, images)])
            frames += len(images)
            found_agree.append(full_found == track_found)
            both = full_found & track_found
            ious.append(iou(full_boxes[both], track_boxes[both]))
            step = full_found[1:] & full_found[:-1]
            moves.append(iou(full_boxes[1:][step], full_boxes[:-1][step]))
    agree, box_iou, move_iou = (np.concatenate(x) for x in (found_agree, ious, moves))
    # time per frame: one followed frame (stream time advancing 10 ms a call) vs the full cascade
    image = np.ascontiguousarray(prepare.speaker_crop(video_frames(videos[0].avi, EVERY_S)[4][1], "left", 224))
    timer = FaceTracker()
    clock = iter(np.arange(0.0, 1.0, 0.01))
    timer.crop([("timed", next(clock), image)])
    track_ms = median_ms(lambda: timer.crop([("timed", float(next(clock)), image)]))
    full_ms = median_ms(lambda: crop_faces([image]))
    return {"videos": len(videos), "frames": frames, "found_agree": float(agree.mean()),
            "iou_mean": float(box_iou.mean()), "iou_p5": float(np.percentile(box_iou, 5)),
            "iou_min": float(box_iou.min()), "n_iou": int(box_iou.size), "stats": vars(tracker.stats),
            "move_iou_mean": float(move_iou.mean()), "move_iou_p5": float(np.percentile(move_iou, 5)),
            "track_ms": track_ms, "full_ms": full_ms, "timed_followed": timer.stats.tracked}


def prepare_tracked(root: Path, out: Path, cfg: Config) -> TrackStats:
    """Prepare ``root`` into ``out`` with each dialog's frames cropped by one FaceTracker."""
    tracker = FaceTracker(size=cfg.prepare.face_size, margin=cfg.prepare.face_margin)

    def tracked_flush(queue: prepare.FaceQueue) -> None:
        if not queue.pending:
            return
        items = [(f"{iemocap.dialog_of(u.id)}:{u.half}", float(u.times[k]), image) for u, k, image in queue.pending]
        crops, found, _ = tracker.crop(items)
        for (u, k, _), crop, ok in zip(queue.pending, crops, found):
            u.crops[k], u.found[k] = crop, bool(ok)
        queue.pending = []

    original = prepare.FaceQueue.flush
    prepare.FaceQueue.flush = tracked_flush  # type: ignore[method-assign]
    try:
        report = prepare.prepare_iemocap(root, out, cfg, workers=1)  # in process: the patch applies
    finally:
        prepare.FaceQueue.flush = original  # type: ignore[method-assign]
    failed = [e for e in report["events"] if e["reason"] == "dialog_failed"]
    if failed:
        raise RuntimeError(f"prepare failed for {len(failed)} dialogs: {failed[0]['detail']}")
    return tracker.stats


def crop_difference(full: Path, tracked: Path, protocol: str) -> dict:
    """Found-flag disagreements and mean |pixel difference| over the test utterances' frames."""
    rows = [{r["id"]: r for r in map(json.loads, (d / "manifest.jsonl").read_text().splitlines())}
            for d in (full, tracked)]
    ids = read_split(full, protocol, "test")
    frames = found_differ = identical = 0
    abs_diff = 0.0
    for utt in ids:
        a, b = (np.load(d / r[utt]["faces"]).astype(np.int16) for d, r in zip((full, tracked), rows))
        if a.shape != b.shape:
            raise RuntimeError(f"{utt}: {a.shape} frames in DATA, {b.shape} in OUT")
        frames += len(a)
        found_differ += sum(x != y for x, y in zip(rows[0][utt]["frame_faces"], rows[1][utt]["frame_faces"]))
        identical += int((a == b).all(axis=(1, 2, 3)).sum())
        abs_diff += float(np.abs(a - b).sum()) / (a[0].size if len(a) else 1)
    return {"utterances": len(ids), "frames": frames, "found_differ": found_differ, "identical": identical,
            "mean_abs_diff": abs_diff / max(frames, 1), "same_split": ids == read_split(tracked, protocol, "test")}


def evaluate(run: Path, data: Path, cfg: Config) -> dict:
    """evaluate_run on the test split, writing its plots into a scratch copy of the run (links)."""
    with tempfile.TemporaryDirectory() as scratch:
        for f in run.iterdir():
            if f.is_file():
                (Path(scratch) / f.name).symlink_to(f.resolve())
        return evaluate_run(Path(scratch), data, "test", cfg)


def summary_lines(a: dict, tracked: TrackStats, d: dict, ev: dict[str, dict], command: str) -> list[str]:
    s, vis = a["stats"], {k: v["per_modality"]["visual"]["accuracy"] for k, v in ev.items()}
    return [
        SECTION, "",
        f"`benchmarks/face_track_check.py` on {time.strftime('%Y-%m-%d %H:%M')}: {machine()}.", "",
        f"Boxes, {a['videos']} videos x 2 speaker halves, every 0.5 s ({a['frames']} frames), FaceTracker "
        f"(defaults) vs crop_faces on each frame: found/not-found agree on {a['found_agree']:.2%}; box IoU "
        f"(n={a['n_iou']}) mean {a['iou_mean']:.3f}, 5th percentile {a['iou_p5']:.3f}, min {a['iou_min']:.3f}; "
        f"tracker frames full {s['full']} / tracked {s['tracked']} / tracked and searched again "
        f"{s.get('refreshed', 0)} / lost {s['lost']}. For scale, IoU of "
        f"consecutive full-detection boxes (500 ms apart): mean {a['move_iou_mean']:.3f}, 5th percentile "
        f"{a['move_iou_p5']:.3f}.", "",
        f"Time per frame (median of {TIMED_CALLS}): tracker following a face (its detector on 1 thread) "
        f"{a['track_ms']:.2f} ms, crop_faces (2 threads) {a['full_ms']:.2f} ms "
        f"({a['full_ms'] / a['track_ms']:.1f}x).", "",
        f"Identification, the run evaluated on the test split ({ev['full']['protocol']} protocol, "
        f"n={ev['full']['n']}) of the corpus prepared with full detection vs with tracking (one tracker, source "
        f"dialog:half; prepare's tracker frames full {tracked.full} / tracked {tracked.tracked} / tracked and "
        f"searched again {tracked.refreshed} / lost {tracked.lost}):",
        "", "| faces | accuracy | macro-F1 | visual branch accuracy |", "|---|---|---|---|",
        *(f"| {name} | {ev[key]['accuracy']:.4f} | {ev[key]['macro_f1']:.4f} | "
          f"{'n/a' if vis[key] is None else f'{vis[key]:.4f}'} |"
          for name, key in (("full detection", "full"), ("tracked", "tracked"))), "",
        f"Test crops ({d['utterances']} utterances, {d['frames']} frames): found differs on {d['found_differ']}, "
        f"byte-identical {d['identical']}, mean absolute pixel difference {d['mean_abs_diff']:.2f} (0-255)"
        + ("" if d["same_split"] else "; WARNING: the two folders' test splits differ") + ".", "",
        f"    {command}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="CORPUS prepared with full detection")
    parser.add_argument("--run", required=True, type=Path, help="a run trained on DATA")
    parser.add_argument("--out", type=Path, help="where the tracked preparation goes (default: a temporary folder)")
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg, root = load_config(), release_root(args.corpus)
    agreement = box_agreement(root, args.videos)
    print(json.dumps(agreement, indent=1), flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="face_track_"))
    try:
        tracked = prepare_tracked(root, out, cfg)
        ev = {"full": evaluate(args.run, args.data, cfg), "tracked": evaluate(args.run, out, cfg)}
        diff = crop_difference(args.data, out, ev["full"]["protocol"])
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = summary_lines(agreement, tracked, diff, ev, command)
    print("\n".join(lines))
    if args.write:
        path = REPO / "BENCHMARKS.md"
        path.write_text(replace_section(path.read_text() if path.exists() else "# Benchmarks\n", SECTION, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
