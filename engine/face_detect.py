"""MTCNN face detection batched end to end (P-Net, R-Net and O-Net weights of
facenet-pytorch, our own cascade).

facenet-pytorch's ``detect_face`` runs the three networks batched but cuts the
R-Net and O-Net inputs one box at a time (one ``interpolate`` per candidate,
hundreds per frame) and runs the last non-maximum suppression in NumPy; on a GPU
it detects ~320 frames/s (BENCHMARKS.md). Here every step is a tensor operation
over all candidates of all frames at once:

- the box crops are area-resampled through an integral image: each output pixel
  of an ``S x S`` crop is the mean of its adaptive-average-pool bin (the bins of
  ``F.interpolate(mode="area")``), four integral-image lookups per pixel, for all
  boxes in one gather;
- suppression uses torchvision's ``batched_nms`` (IoU) per frame, and the final
  "Min" suppression (intersection over the smaller box) a greedy pass vectorised
  over frames.

The constants (pyramid factor 0.709, minimum face 20 px, thresholds 0.6/0.7/0.7,
NMS 0.5/0.7/0.7, box regression and squaring rules) are those of the MTCNN paper
as facenet-pytorch applies them, so boxes agree with ``MTCNN.detect`` to float
rounding (tests/test_face_detect.py).

On the CPU the three networks run on ONNX Runtime when it is installed (exported
from the same weights when the detector is made): with 2 threads R-Net on 600
crops took 55 ms there against 145 ms in eager PyTorch (outputs equal to 2e-6),
and the whole detector became 20-25% faster (BENCHMARKS.md, Engine against the
issue 5 targets).
"""

from __future__ import annotations

import functools
import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MIN_FACE = 20  # pixels, smallest face searched for
FACTOR = 0.709  # image pyramid scale step
THRESHOLDS = (0.6, 0.7, 0.7)  # P-Net, R-Net, O-Net face probability
PNET_STRIDE, PNET_CELL = 2, 12
CPU_CHUNK = 512  # crops per R-Net/O-Net call on the CPU


class BatchedMTCNN:
    """``largest_boxes(frames)``: the largest face box of each frame, frames of one size."""

    def __init__(self, device: str | torch.device = "cpu", min_face: int = MIN_FACE, onnx_runtime: bool = True,
                 threads: int = 0):
        try:
            from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
        except ImportError as exc:
            raise ImportError(
                "face detection needs facenet-pytorch's MTCNN weights: pip install --no-deps "
                "facenet-pytorch==2.6.0 (see scripts/setup.sh)"
            ) from exc
        self.device = torch.device(device)
        self.min_face = min_face
        self.pnet, self.rnet, self.onet = (net().to(self.device).eval() for net in (PNet, RNet, ONet))
        if self.device.type == "cpu" and onnx_runtime:
            try:
                self.pnet, self.rnet, self.onet = (
                    OrtNet(net, size, threads) for net, size in ((self.pnet, 12), (self.rnet, 24), (self.onet, 48))
                )
            except Exception as exc:  # no onnxruntime, or the export failed: the eager networks (same outputs)
                logging.getLogger(__name__).warning("MTCNN on ONNX Runtime unavailable (%s); using eager PyTorch", exc)

    def scales(self, h: int, w: int, min_face: float | None = None) -> list[float]:
        """Pyramid scales: the minimum face (``self.min_face`` unless given) maps to P-Net's
        12-pixel cell, down to 12 px."""
        m = PNET_CELL / (min_face or self.min_face)
        side = min(h, w) * m
        out, s = [], m
        while side >= PNET_CELL:
            out.append(s)
            s *= FACTOR
            side *= FACTOR
        return out

    @torch.no_grad()
    def largest_boxes(self, frames: Tensor, table: Tensor | None = None, min_face: float | None = None) -> Tensor:
        """uint8 (N, H, W, 3) RGB -> float32 (N, 4) on the CPU: x1, y1, x2, y2 of the largest
        face, NaN where none. ``table``: the frames' ``integral_image`` if already made;
        ``min_face``: the smallest face searched for in pixels (default ``self.min_face``)."""
        frames = frames.to(self.device)
        n, h, w = frames.shape[:3]
        imgs = frames.permute(0, 3, 1, 2).float()  # (N, 3, H, W) 0..255
        boxes, image = self._proposals(imgs, h, w, min_face)  # (K, 4), (K,)
        table = integral_image(frames) if table is None else table  # (N, 3, H+1, W+1) int32
        # R-Net: refine and re-score the proposals
        if len(boxes):
            reg, prob = self._chunked(self.rnet, normalise(area_crops(table, image, *clip_box(boxes, w, h), 24)))
            keep = prob[:, 1] > THRESHOLDS[1]
            boxes, image, reg, score = boxes[keep], image[keep], reg[keep], prob[keep, 1]
            pick = _nms(boxes, score, image, 0.7)
            boxes = square(regress(boxes[pick], reg[pick]))
            image = image[pick]
        # O-Net: final boxes
        if len(boxes):
            reg, _, prob = self._chunked(self.onet, normalise(area_crops(table, image, *clip_box(boxes, w, h), 48)))
            keep = prob[:, 1] > THRESHOLDS[2]
            boxes, image, reg, score = boxes[keep], image[keep], reg[keep], prob[keep, 1]
            boxes = regress(boxes, reg)
            pick = nms_min(boxes, score, image, 0.7)
            boxes, image = boxes[pick], image[pick]
        return largest_per_image(boxes, image, n)

    def _chunked(self, net: torch.nn.Module, crops: Tensor) -> tuple[Tensor, ...]:
        """``net`` over the crops in chunks: on the CPU, batches of 512 crops run R-Net about
        twice as fast as one batch of thousands (measured with 2 threads); a GPU takes them all."""
        step = len(crops) if self.device.type == "cuda" else CPU_CHUNK
        outs = [net(crops[i : i + step]) for i in range(0, len(crops), max(step, 1))]
        return tuple(torch.cat(parts) for parts in zip(*outs))

    def _proposals(self, imgs: Tensor, h: int, w: int, min_face: float | None = None) -> tuple[Tensor, Tensor]:
        """P-Net over the pyramid -> squared candidate boxes (K, 4) and their frame index (K,)."""
        found = [torch.zeros(0, 9, device=imgs.device)]  # (k, 9) x1, y1, x2, y2, score, 4 offsets
        owners = [torch.zeros(0, dtype=torch.long, device=imgs.device)]  # none when no scale fits the frame
        for s in self.scales(h, w, min_face):
            scaled = F.interpolate(imgs, size=(int(h * s + 1), int(w * s + 1)), mode="area")
            reg, prob = self.pnet(normalise(scaled))  # (N, 4, h', w'), (N, 2, h', w')
            hit = (prob[:, 1] >= THRESHOLDS[0]).nonzero()  # (k, 3) frame, row, col
            cells = hit[:, 1:].flip(1).float()  # (k, 2) x, y of each cell
            corner1 = ((PNET_STRIDE * cells + 1) / s).floor()
            corner2 = ((PNET_STRIDE * cells + PNET_CELL) / s).floor()
            score = prob[hit[:, 0], 1, hit[:, 1], hit[:, 2]]
            offsets = reg[hit[:, 0], :, hit[:, 1], hit[:, 2]]  # (k, 4)
            cand = torch.cat([corner1, corner2, score[:, None], offsets], dim=1)  # (k, 9)
            pick = _nms(cand[:, :4], score, hit[:, 0], 0.5)
            found.append(cand[pick])
            owners.append(hit[pick, 0])
        cand, image = torch.cat(found), torch.cat(owners)
        pick = _nms(cand[:, :4], cand[:, 4], image, 0.7)
        cand, image = cand[pick], image[pick]
        size = (cand[:, 2:4] - cand[:, 0:2]).repeat(1, 2)  # P-Net boxes regress on width without +1
        return square(cand[:, :4] + cand[:, 5:9] * size), image


class OrtNet:
    """One MTCNN network exported to ONNX in memory and run by ONNX Runtime on the CPU
    (batch and, for P-Net, image size dynamic); called like the torch module."""

    def __init__(self, net: torch.nn.Module, size: int, threads: int = 0):
        import io

        import onnxruntime as ort

        example = torch.zeros(2, 3, size, size)
        axes = {0: "n", 2: "h", 3: "w"} if size == PNET_CELL else {0: "n"}
        buffer = io.BytesIO()
        net = _without_prelu(net)
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter: ~0.1 s for these small fixed networks (the dynamo one takes seconds)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, (example,), buffer, input_names=["x"], dynamic_axes={"x": axes},
                              opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (N >= 1, 3, H, W): the cascade calls R-Net and O-Net only when there are boxes."""
        return tuple(torch.from_numpy(o) for o in self.session.run(None, {"x": x.contiguous().numpy()}))


class _PReLU(torch.nn.Module):
    """PReLU as max(x, 0) + a * min(x, 0): the same numbers (one of the two terms is an exact
    zero), exported as elementwise operations, which ONNX Runtime runs about ten times
    faster than its PRelu with a per-channel slope (measured on O-Net's first layer, 1 thread:
    3.3 ms of the network's 7.7 ms for 10 crops)."""

    def __init__(self, slope: Tensor):
        super().__init__()
        self.register_buffer("slope", slope.detach().reshape(-1))  # (C,)

    def forward(self, x: Tensor) -> Tensor:  # x (N, C) or (N, C, H, W)
        slope = self.slope.reshape(-1, *[1] * (x.ndim - 2))
        return torch.clamp(x, min=0) + slope * torch.clamp(x, max=0)


def _without_prelu(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` with every nn.PReLU replaced by ``_PReLU``."""
    import copy

    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, torch.nn.PReLU):
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            setattr(parent, name.rpartition(".")[2], _PReLU(module.weight))
    return net


def normalise(x: Tensor) -> Tensor:
    """0..255 -> about -1..1, MTCNN's input scaling."""
    return (x - 127.5) * 0.0078125


def regress(boxes: Tensor, reg: Tensor) -> Tensor:
    """Apply R-Net/O-Net box offsets (fractions of the inclusive width/height)."""
    size = (boxes[:, 2:4] - boxes[:, 0:2] + 1).repeat(1, 2)  # (K, 4) w, h, w, h
    return boxes + reg * size


def square(boxes: Tensor) -> Tensor:
    """Grow each box to a square around its centre (side = the longer side)."""
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = wh.max(dim=1, keepdim=True).values
    top_left = boxes[:, 0:2] + wh * 0.5 - side * 0.5
    return torch.cat([top_left, top_left + side], dim=1)


def clip_box(boxes: Tensor, w: int, h: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Truncated, clipped crop rows [y0, y1) and columns [x0, x1) of each box (0-based, end exclusive)."""
    b = boxes.trunc().long()
    x0 = b[:, 0].clamp(min=1, max=w) - 1
    y0 = b[:, 1].clamp(min=1, max=h) - 1
    x1 = b[:, 2].clamp(max=w)
    y1 = b[:, 3].clamp(max=h)
    return y0, y1.clamp(min=y0 + 1), x0, x1.clamp(min=x0 + 1)


def integral_image(frames: Tensor) -> Tensor:
    """uint8 (N, H, W, C) -> int32 (N, C, H+1, W+1) with table[..., r, c] = sum of rows < r,
    cols < c (exact up to 255 x H x W < 2^31: frames up to 8.4 megapixels)."""
    x = frames.permute(0, 3, 1, 2).int()
    table = x.cumsum(2, dtype=torch.int32).cumsum(3, dtype=torch.int32)
    return F.pad(table, (1, 0, 1, 0))


def _bins(start: Tensor, stop: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool bins of [start, stop) into ``size`` cells: (K, size) first and end."""
    length = (stop - start)[:, None]  # (K, 1)
    i = torch.arange(size, device=start.device)[None, :]  # (1, S)
    first = start[:, None] + (i * length) // size
    end = start[:, None] + ((i + 1) * length + size - 1) // size
    return first, end


def area_crops(table: Tensor, image: Tensor, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor,
               size: int) -> Tensor:
    """Area-resample the crops rows [y0, y1) x cols [x0, x1) of frame ``image`` to
    float (K, C, size, size): each pixel the mean of its bin, as F.interpolate(mode="area")."""
    n, c, hp, wp = table.shape
    r0, r1 = _bins(y0, y1, size)  # (K, S)
    c0, c1 = _bins(x0, x1, size)
    flat = table.reshape(-1)
    base = (image[:, None] * c + torch.arange(c, device=table.device)[None, :]) * (hp * wp)  # (K, C) channel offsets

    def corner(r: Tensor, col: Tensor) -> Tensor:  # (K, S), (K, S) -> (K, C, S, S)
        at = base[:, :, None, None] + (r[:, :, None] * wp + col[:, None, :])[:, None]  # (K, C, S, S)
        return flat.index_select(0, at.reshape(-1)).view(at.shape)  # one 1-D gather: 2-4x faster than 2-D indexing

    total = corner(r1, c1) - corner(r0, c1) - corner(r1, c0) + corner(r0, c0)
    count = (r1 - r0)[:, :, None] * (c1 - c0)[:, None, :]  # (K, S, S)
    return total.float() / count[:, None].float()


def area_crop_np(frame: np.ndarray, y0: int, y1: int, x0: int, x1: int, size: int) -> np.ndarray:
    """``area_crops`` of one region of one NumPy uint8 (H, W, C) frame -> NumPy float32 (C,
    size, size), the same numbers (the same bins, the same integer sums, one float32 division).
    For the tracker's few crops per frame, where the integral image of the whole frame and a
    dozen small torch operations cost more than the crop. The sums are separable, and each
    half is a product with a 0/1 matrix of bin membership (``_bin_members``): the rows of
    every row bin first, then the columns of every column bin of those. The products add
    integers, exact in float32 while every sum stays below 2**24 (a bin of up to 65,793
    pixels; larger bins go through float64), so the order in which they are added does not
    matter. The products run in torch, on the calling thread's torch threads (NumPy's
    OpenBLAS would start its own threads for them, which spin on the cores the model
    uses)."""
    region = frame[y0:y1, x0:x1]  # (h, w, C)
    h, w, c = region.shape
    in_row_bin, in_col_bin = _bin_members(h, size), _bin_members(w, size)  # (S, h), (S, w)
    count = in_row_bin.sum(1)[:, None] * in_col_bin.sum(1)[None, :]  # (S, S) pixels per bin
    dtype = torch.float32 if float(count.max()) * 255 < 1 << 24 else torch.float64
    pixels = torch.from_numpy(np.ascontiguousarray(region)).reshape(h, w * c).to(dtype)
    rows = in_row_bin.to(dtype) @ pixels  # (S, w*C) each row bin's sums
    rows = rows.view(size, w, c).transpose(1, 2).reshape(size * c, w)  # (S*C, w)
    total = rows @ in_col_bin.to(dtype).T  # (S*C, S) each bin's sum
    return (total.view(size, c, size).float() / count[:, None, :]).transpose(0, 1).numpy()


@functools.lru_cache(maxsize=32)  # a tracked face's few region sizes (a 224 x 500 matrix is 0.45 MB)
def _bin_members(n: int, size: int) -> Tensor:
    """float32 (size, n) 0/1 matrix, shared (not to be written): row i marks the pixels of
    ``_bins``' bin i of [0, n) (adaptive average pooling's bins, which overlap when size > n)."""
    first, end = _bins(torch.zeros(1, dtype=torch.long), torch.tensor([n]), size)  # (1, S)
    at = torch.arange(n)[None, :]  # (1, n)
    return ((at >= first[0][:, None]) & (at < end[0][:, None])).float()


def _nms(boxes: Tensor, scores: Tensor, image: Tensor, iou: float) -> Tensor:
    from torchvision.ops import batched_nms

    return batched_nms(boxes, scores, image, iou)


def nms_min(boxes: Tensor, scores: Tensor, image: Tensor, threshold: float) -> Tensor:
    """Greedy suppression per frame by intersection over the smaller box ("Min" overlap,
    inclusive pixel sizes); kept indices in descending score order."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    b, img = boxes[order], image[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt + 1).clamp(min=0).prod(dim=2)  # (K, K)
    overlap = inter / torch.minimum(area[:, None], area[None, :])
    clash = (overlap > threshold) & (img[:, None] == img[None, :])  # (K, K) same frame, too close
    later = torch.ones_like(clash).triu(diagonal=1)  # (K, K) j after i in score order
    clash &= later
    # Greedy rule: a box survives if no surviving higher-scored box clashes with it. Iterating
    # the rule from "all survive" fixes one more box per pass in score order, and in practice
    # stops after as many passes as the longest suppression chain (two or three).
    alive = torch.ones(len(b), dtype=torch.bool, device=b.device)
    for _ in range(len(b)):
        new = ~(clash & alive[:, None]).any(dim=0)
        if torch.equal(new, alive):
            break
        alive = new
    return order[alive]


def largest_per_image(boxes: Tensor, image: Tensor, n: int) -> Tensor:
    """(K, 4) boxes of frames ``image`` -> (n, 4) the largest box per frame, NaN where none."""
    out = torch.full((n, 4), float("nan"), device=boxes.device)
    if len(boxes) == 0:
        return out.cpu()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = torch.full((n,), -float("inf"), device=boxes.device).scatter_reduce(0, image, area, "amax")
    winner = (area == best[image]).nonzero().reshape(-1).flip(0)  # ties: the first box is written last
    out[image[winner]] = boxes[winner, :4]
    return out.cpu()


def load_detector(device: str = "cpu", threads: int = 0) -> BatchedMTCNN:
    """One detector per process, device and, on the CPU, thread count (0: torch's when
    first made; the count means nothing to a CUDA detector, so it gets one whatever is asked)."""
    return _detector(str(device), threads if torch.device(device).type == "cpu" else 0)


@functools.lru_cache(maxsize=8)
def _detector(device: str, threads: int) -> BatchedMTCNN:
    return BatchedMTCNN(device, threads=threads)
