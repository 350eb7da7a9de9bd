"""The batched MTCNN cascade against facenet-pytorch's MTCNN.detect, and its parts."""

from __future__ import annotations

import glob

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.face_detect import BatchedMTCNN, area_crops, integral_image, largest_per_image, nms_min


def _facenet_largest(frames: np.ndarray) -> list[np.ndarray | None]:
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(select_largest=True, keep_all=False, post_process=False, device="cpu")
    out = []
    for boxes in mtcnn.detect(frames)[0]:
        if boxes is None or len(boxes) == 0:
            out.append(None)
            continue
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        out.append(boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))])
    return out


def _corpus_frames(corpus, every: int = 20, limit: int = 6) -> np.ndarray:
    """Frames of the tiny corpus's split-screen dialog videos, cut to 224x224 around each speaker."""
    frames = []
    for path in sorted(glob.glob(str(corpus / "IEMOCAP_full_release" / "Session*" / "dialog" / "avi" / "DivX" / "*.avi")))[:2]:
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i % every == 0:
                    rgb = frame.to_ndarray(format="rgb24")
                    h, w = rgb.shape[:2]
                    top = max(0, (h - 224) // 2)
                    frames += [rgb[top : top + 224, : 224], rgb[top : top + 224, w // 2 : w // 2 + 224]]
                if len(frames) >= limit:
                    break
    return np.stack(frames)


def test_boxes_match_facenet_mtcnn(tiny_corpus):
    from skimage import data

    corpus = _corpus_frames(tiny_corpus)
    detector = BatchedMTCNN("cpu")
    astronaut = data.astronaut()
    for frames in (corpus, np.stack([astronaut, np.zeros_like(astronaut), astronaut[:, ::-1].copy()])):
        ours = detector.largest_boxes(torch.from_numpy(frames)).numpy()
        theirs = _facenet_largest(frames)
        assert [b is not None for b in theirs] == [bool(np.isfinite(b).all()) for b in ours]
        for a, b in zip(ours, theirs):
            if b is not None:
                assert np.abs(a - b).max() < 0.05, (a, b)
    assert np.isfinite(ours[0]).all() and np.isnan(ours[1]).all()  # astronaut found, black frame not


def test_area_crops_equal_interpolate_area():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 40, 50, 3), generator=gen, dtype=torch.uint8)
    boxes = [(0, 3, 17, 9, 40), (1, 0, 40, 0, 50), (1, 12, 14, 30, 31)]  # frame, y0, y1, x0, x1
    image, y0, y1, x0, x1 = (torch.tensor(v) for v in zip(*boxes))
    got = area_crops(integral_image(frames), image, y0, y1, x0, x1, 24)
    imgs = frames.permute(0, 3, 1, 2).float()
    for k, (i, a, b, c, d) in enumerate(boxes):
        want = F.interpolate(imgs[i : i + 1, :, a:b, c:d], size=(24, 24), mode="area")[0]
        assert torch.allclose(got[k], want, atol=1e-4)


def _greedy_min_nms(boxes: np.ndarray, scores: np.ndarray, image: np.ndarray, threshold: float) -> list[int]:
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        ok = True
        for j in kept:
            if image[j] != image[i]:
                continue
            lt = np.maximum(boxes[i, :2], boxes[j, :2])
            rb = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = np.clip(rb - lt + 1, 0, None).prod()
            area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)  # noqa: E731
            if inter / min(area(boxes[i]), area(boxes[j])) > threshold:
                ok = False
                break
        if ok:
            kept.append(int(i))
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_nms_equals_the_greedy_rule(seed):
    rng = np.random.default_rng(seed)
    n = 40
    xy = rng.uniform(0, 60, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32)
    image = rng.integers(0, 3, n)
    got = nms_min(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(image), 0.7).tolist()
    assert got == _greedy_min_nms(boxes, scores, image, 0.7)
    assert len(got) < n  # the random boxes do overlap: something was suppressed


def test_largest_per_image():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 6, 6.0]])
    out = largest_per_image(boxes, torch.tensor([0, 0, 2]), 3)
    assert out[0].tolist() == [0, 0, 20, 20] and torch.isnan(out[1]).all() and out[2].tolist() == [5, 5, 6, 6]


def test_crop_faces_equal_area_resize_of_their_regions():
    from skimage import data

    from engine.faces import centre_region, crop_faces, crop_region

    photo = data.astronaut()
    frames = [photo, np.zeros((100, 80, 3), np.uint8), photo[40:300, 100:420].copy()]
    crops, found, boxes = crop_faces(frames)
    assert found.tolist() == [True, False, True]
    for frame, crop, ok, box in zip(frames, crops, found, boxes):
        h, w = frame.shape[:2]
        y0, y1, x0, x1 = crop_region(box, h, w) if ok else centre_region(h, w)
        region = torch.from_numpy(frame[y0:y1, x0:x1]).permute(2, 0, 1)[None].float()
        want = F.interpolate(region, size=(48, 48), mode="area")[0].round().clamp(0, 255).to(torch.uint8)
        diff = (torch.from_numpy(crop).permute(2, 0, 1).int() - want.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # only .5 roundings may differ


def test_area_crop_np_equals_area_crops():
    """The tracker's NumPy crop: the same float32 numbers as the batched gather, any region."""
    from engine.face_detect import area_crop_np

    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(20, 200, 2))
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        size = int(rng.choice([12, 24, 48, 64]))
        table = integral_image(torch.from_numpy(frame)[None])
        want = area_crops(table, torch.zeros(1, dtype=torch.long), *(torch.tensor([v]) for v in (y0, y1, x0, x1)), size)
        got = area_crop_np(frame, y0, y1, x0, x1, size)
        assert got.dtype == np.float32 and np.array_equal(got, want[0].numpy())


def test_prelu_rewrite_keeps_the_networks_outputs():
    """MTCNN's networks as exported for ONNX Runtime (PReLU as max/min terms) give eager
    facenet-pytorch's outputs."""
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    from engine.face_detect import OrtNet

    torch.manual_seed(0)
    for net, size in ((PNet().eval(), 12), (RNet().eval(), 24), (ONet().eval(), 48)):
        x = torch.randn(5, 3, 30 if size == 12 else size, 30 if size == 12 else size)
        with torch.no_grad():
            want = net(x)
        for a, b in zip(OrtNet(net, size, threads=1)(x), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_detector_calls_group_frames_by_size_within_the_device_limits():
    """crop_faces sends same-sized frames to the detector in runs bounded by frame count and
    pixels, larger on a CUDA GPU (where a call's cost is mostly fixed)."""
    from engine.faces import DETECT_BATCH, DETECT_BATCH_CUDA, DETECT_PIXELS_CUDA, _groups

    small = [np.zeros((224, 224, 3), np.uint8)] * 300
    assert _groups(small) == [(0, DETECT_BATCH), (64, 128), (128, 192), (192, 256), (256, 300)]
    assert _groups(small, "cuda") == [(0, DETECT_BATCH_CUDA), (256, 300)]
    hd = [np.zeros((720, 1280, 3), np.uint8)] * 40
    per_call = DETECT_PIXELS_CUDA // (720 * 1280)
    assert [j - i for i, j in _groups(hd, "cuda:0")] == [per_call, per_call, 40 - 2 * per_call]
    mixed = small[:3] + hd[:2] + small[:1]
    assert _groups(mixed, "cuda") == [(0, 3), (3, 5), (5, 6)]
