"""Face tracking between sampled frames (engine/face_track.py) on real corpus video."""

from __future__ import annotations

import glob

import av
import numpy as np
import pytest

from engine.face_track import FaceTracker
from engine.faces import crop_faces
from training.prepare import speaker_crop


def _speaker_frames(corpus, every_s: float = 0.5, limit: int = 16) -> list[tuple[float, np.ndarray]]:
    """(time, the left speaker's 224x224 centre crop) every ``every_s`` seconds of the first dialog."""
    path = sorted(glob.glob(str(corpus / "IEMOCAP_full_release" / "Session*" / "dialog" / "avi" / "DivX" / "*.avi")))[0]
    out, next_t = [], 0.0
    with av.open(path) as container:
        for frame in container.decode(video=0):
            if frame.time + 1e-6 >= next_t:
                out.append((float(frame.time), np.ascontiguousarray(speaker_crop(frame.to_ndarray(format="rgb24"),
                                                                                  "left", 224))))
                next_t = frame.time + every_s
                if len(out) == limit:
                    break
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    return inter / (float(np.prod(a[2:] - a[:2])) + float(np.prod(b[2:] - b[:2])) - inter)


@pytest.fixture(scope="module")
def speaker(tiny_corpus):
    frames = _speaker_frames(tiny_corpus)
    crops, found, boxes = crop_faces([f for _, f in frames])
    assert found.all()  # the synthetic speaker is always in view
    return frames, crops, boxes


def test_tracked_boxes_follow_the_face_the_cascade_finds(speaker):
    frames, _, full_boxes = speaker
    tracker = FaceTracker(redetect_s=1e9)
    crops, found, boxes = tracker.crop([("a", t, f) for t, f in frames])
    assert tracker.stats.full == 1 and tracker.stats.tracked == len(frames) - 1 and found.all()
    ious = [_iou(b, ref) for b, ref in zip(boxes, full_boxes)]
    assert ious[0] == pytest.approx(1.0) and min(ious) > 0.75, ious
    assert crops.shape == (len(frames), 48, 48, 3) and crops.dtype == np.uint8


def test_one_frame_per_call_equals_all_frames_in_one_call(speaker):
    frames = speaker[0][:6]
    one, each = FaceTracker(), FaceTracker()
    together = one.crop([("a", t, f) for t, f in reversed(frames)])  # taken in time order whatever the order given
    apart = [each.crop([("a", t, f)]) for t, f in frames]
    np.testing.assert_array_equal(together[2][::-1], np.concatenate([b for _, _, b in apart]))
    np.testing.assert_array_equal(together[0][::-1], np.concatenate([c for c, _, _ in apart]))


def test_without_tracking_crops_equal_the_full_cascade(speaker):
    frames, crops, boxes = speaker
    tracker = FaceTracker(redetect_s=0)
    got = tracker.crop([("a", t, f) for t, f in frames])
    np.testing.assert_array_equal(got[0], crops)
    np.testing.assert_array_equal(got[2], boxes)
    assert tracker.stats.full == len(frames) and tracker.stats.tracked == 0
    # no frame waits for another's box: one cascade call for all (a GPU detects thousands a call)
    assert tracker.stats.cascade_calls == 1


def test_steps_is_the_number_of_onet_passes_per_followed_frame(speaker):
    from engine.faces import load_detector

    frames = speaker[0][:5]
    detector = load_detector("cpu", 1)  # the tracker's (one thread)
    onet, calls = detector.onet, []
    detector.onet = lambda x: (calls.append(len(x)), onet(x))[1]
    try:
        for steps in (1, 2, 3):
            tracker = FaceTracker(redetect_s=1e9, steps=steps)
            tracker.crop([("a", *frames[0])])  # the full cascade
            calls.clear()
            _, found, _ = tracker.crop([("a", t, f) for t, f in frames[1:]])
            assert found.all() and tracker.stats.tracked == 4 and calls == [1] * (4 * steps), (steps, calls)
    finally:
        detector.onet = onet
    with pytest.raises(ValueError, match="at least one O-Net pass"):
        FaceTracker(steps=0)


def test_full_detection_again_after_redetect_s_a_gap_and_a_lost_face(speaker):
    frames = speaker[0][:8]  # 0.0, 0.5, ... 3.5 s
    tracker = FaceTracker(redetect_s=1.0)
    tracker.crop([("a", t, f) for t, f in frames])
    # the cascade at 0 s; followed at 0.5, 1.5, 2.5, 3.5 s; followed and searched again at 1, 2, 3 s
    assert tracker.stats.full == 1 and tracker.stats.tracked == 4 and tracker.stats.refreshed == 3

    tracker = FaceTracker(redetect_s=1e9, max_gap_s=2.0)
    t0, f0 = frames[0]
    tracker.crop([("a", t0, f0), ("a", t0 + 5.0, f0)])  # a 5 s gap: no track across it
    assert tracker.stats.full == 2 and tracker.stats.tracked == 0

    blank = np.zeros_like(f0)
    tracker = FaceTracker(redetect_s=1e9)
    _, found, boxes = tracker.crop([("a", 0.0, f0), ("a", 0.5, blank), ("a", 1.0, f0)])
    assert found.tolist() == [True, False, True] and np.isnan(boxes[1]).all()
    # the blank frame: O-Net rejects the followed square (lost), the cascade finds nothing;
    # the next frame has no track to follow, so the cascade runs again
    assert tracker.stats.lost == 1 and tracker.stats.full == 3 and tracker.stats.tracked == 0


def test_sources_are_tracked_apart(speaker):
    frames = speaker[0][:4]
    flipped = [(t, np.ascontiguousarray(f[:, ::-1])) for t, f in frames]  # a second source, mirrored
    both = FaceTracker()
    items = [x for (t, f), (_, g) in zip(frames, flipped) for x in (("a", t, f), ("b", t, g))]
    crops, _, boxes = both.crop(items)
    alone_a, alone_b = FaceTracker(), FaceTracker()
    ref_a, ref_b = alone_a.crop([("a", t, f) for t, f in frames]), alone_b.crop([("b", t, g) for t, g in flipped])
    np.testing.assert_array_equal(boxes[0::2], ref_a[2])
    np.testing.assert_array_equal(boxes[1::2], ref_b[2])
    np.testing.assert_array_equal(crops[1::2], ref_b[0])
    assert both.stats.full == 2 and both.stats.tracked == 6



def test_a_larger_face_is_picked_up_when_the_search_comes_round(speaker):
    """Every redetect_s the followed frame is searched for faces as large: a larger face that
    came into view replaces the followed one then (the cascade's largest-face rule), and not
    before; the same face found again keeps the followed box's place (drift corrected)."""
    import torch
    import torch.nn.functional as F

    (_, face), (_, face_later) = speaker[0][0], speaker[0][1]
    big = F.interpolate(torch.from_numpy(face_later).permute(2, 0, 1)[None].float(), scale_factor=1.5, mode="area")
    big = big[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()  # (336, 336, 3): the face 1.5 times as large
    alone = np.full((336, 560, 3), 127, np.uint8)
    alone[:224, :224] = face  # the speaker alone, top left
    both = alone.copy()
    both[:, 224:] = big  # a larger face at the right
    followed, searched = FaceTracker(redetect_s=1e9), FaceTracker(redetect_s=1.0)
    for tracker in (followed, searched):
        _, found, boxes = tracker.crop([("a", 0.0, alone), ("a", 0.5, both), ("a", 1.0, both), ("a", 1.5, both)])
        assert found.all() and boxes[0][2] < 224 and boxes[1][2] < 224  # the speaker, followed
    assert searched.stats.refreshed == 1 and boxes[2][0] > 224 and boxes[3][0] > 224  # the larger face from 1 s on
    _, _, kept = followed.crop([("a", 2.0, both)])
    assert kept[0][2] < 224  # following alone keeps the face it follows


def test_numpy_box_rules_equal_the_cascades():
    """The tracker's NumPy copies of the cascade's box rules give the same float32 numbers
    (and clip rows) as face_detect's torch ones, on random boxes in and out of the frame."""
    import torch

    from engine.face_detect import clip_box, regress, square
    from engine.face_track import _clip_box, _regress, _square

    rng = np.random.default_rng(0)
    corner = rng.uniform(-30, 250, (200, 2)).astype(np.float32)
    boxes = np.concatenate([corner, corner + rng.uniform(1, 120, (200, 2)).astype(np.float32)], axis=1)
    reg = rng.normal(0, 0.2, (200, 4)).astype(np.float32)
    np.testing.assert_array_equal(_square(boxes), square(torch.from_numpy(boxes)).numpy())
    np.testing.assert_array_equal(_regress(boxes, reg), regress(torch.from_numpy(boxes), torch.from_numpy(reg)).numpy())
    want = np.stack([v.numpy() for v in clip_box(torch.from_numpy(boxes), 224, 200)], axis=1)
    np.testing.assert_array_equal(np.array([_clip_box(b, 224, 200) for b in boxes]), want)
