"""Synthetic on-camera persons: a head-and-shoulders sprite per person, drawn
into a half-frame with per-frame jitter, lighting, noise and a moving mouth.

Each face is a real photograph from ``skimage.data.lfw_subset()`` (small
grey Labeled-Faces-in-the-Wild crops that ship inside scikit-image, so they
work offline), coloured with the person's skin tone and set into a head with
hair, neck and shirt in the person's colours. The candidate photographs below
were checked by eye to be different people, and MTCNN finds their composited
heads in nearly every frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Indices into lfw_subset() (the first 100 images are faces), grouped by the
# apparent gender of the photograph, so that female actors get female faces.
FEMALE_FACES = (18, 31, 46, 52, 53, 57, 91, 93, 94, 99)
MALE_FACES = (1, 2, 3, 7, 11, 13, 15, 21, 22, 24, 33, 41, 43, 54, 61, 72, 79, 80)

FACE_PX = 104  # side of the photograph once upscaled, in pixels at scale 1
SPRITE_W, SPRITE_H = 176, 250  # sprite canvas in pixels (head, neck, shoulders)
FACE_TOP = 42  # row of the photograph's top edge in the sprite
MOUTH_LEVELS = 6  # precomputed mouth openings, 0 = closed
SCALES = (0.9, 0.95, 1.0, 1.05, 1.1)  # precomputed sprite scales


@dataclass(frozen=True)
class FaceParams:
    """How one person looks; stored in persons.json."""

    lfw_index: int
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    hair_height: int  # pixels of hair above the forehead
    head_width: int  # width of the head ellipse in pixels

    def to_json(self) -> dict:
        return {
            "lfw_index": self.lfw_index,
            "skin": list(self.skin),
            "hair": list(self.hair),
            "shirt": list(self.shirt),
            "hair_height": self.hair_height,
            "head_width": self.head_width,
        }


def choose_faces(rng: np.random.Generator, genders: list[str]) -> list[FaceParams]:
    """One distinct face per person, in the order of ``genders`` ("F"/"M")."""
    female = list(rng.permutation(FEMALE_FACES))
    male = list(rng.permutation(MALE_FACES))
    faces = []
    for gender in genders:
        index = int(female.pop() if gender == "F" else male.pop())
        skin = tuple(int(v) for v in np.clip(np.array([225, 180, 150]) * rng.uniform(0.55, 1.1), 40, 255))
        hair = tuple(int(v) for v in rng.integers(10, 200, size=3))
        shirt = tuple(int(v) for v in rng.integers(20, 235, size=3))
        faces.append(
            FaceParams(index, skin, hair, shirt, int(rng.integers(14, 34)), int(rng.integers(112, 128)))
        )
    return faces


@functools.lru_cache(maxsize=1)
def _lfw() -> np.ndarray:
    from skimage.data import lfw_subset

    return lfw_subset()  # (200, 25, 25) float in 0..1


def _base_sprite(p: FaceParams) -> tuple[np.ndarray, np.ndarray]:
    """RGB (H, W, 3) float32 and alpha (H, W) float32 of a person at scale 1."""
    rgb = Image.new("RGB", (SPRITE_W, SPRITE_H), (0, 0, 0))
    alpha = Image.new("L", (SPRITE_W, SPRITE_H), 0)
    cx = SPRITE_W // 2
    head_top, head_bottom = FACE_TOP - 8, FACE_TOP + FACE_PX + 8
    for img, colour in ((rgb, None), (alpha, 255)):
        d = ImageDraw.Draw(img)
        d.ellipse((4, 188, SPRITE_W - 4, SPRITE_H + 80), fill=colour or p.shirt)
        d.rectangle((cx - 22, head_bottom - 20, cx + 22, 200), fill=colour or p.skin)
        d.ellipse(
            (cx - p.head_width // 2 - 4, head_top - p.hair_height, cx + p.head_width // 2 + 4, head_bottom - 30),
            fill=colour or p.hair,
        )
        d.ellipse((cx - p.head_width // 2, head_top, cx + p.head_width // 2, head_bottom), fill=colour or p.skin)
    grey = Image.fromarray((_lfw()[p.lfw_index] * 255).astype(np.uint8)).resize((FACE_PX, FACE_PX), Image.BICUBIC)
    g = np.asarray(grey, np.float32)[..., None] / 255.0
    photo = np.clip(g * np.array(p.skin, np.float32) * 1.35, 0, 255)
    feather = Image.new("L", (FACE_PX, FACE_PX), 0)
    ImageDraw.Draw(feather).ellipse((6, 2, FACE_PX - 6, FACE_PX - 1), fill=255)
    feather = np.asarray(feather.filter(ImageFilter.GaussianBlur(6)), np.float32)[..., None] / 255.0
    out = np.asarray(rgb, np.float32).copy()
    x0 = cx - FACE_PX // 2
    region = out[FACE_TOP : FACE_TOP + FACE_PX, x0 : x0 + FACE_PX]
    out[FACE_TOP : FACE_TOP + FACE_PX, x0 : x0 + FACE_PX] = region * (1 - feather) + photo * feather
    a = np.asarray(alpha.filter(ImageFilter.GaussianBlur(1.5)), np.float32) / 255.0
    return out, a


def _mouth_masks(height: int, width: int) -> np.ndarray:
    """(MOUTH_LEVELS, H, W) float32 darkening masks for increasingly open mouths."""
    cx, cy = width // 2, FACE_TOP + int(FACE_PX * 0.8)
    masks = np.zeros((MOUTH_LEVELS, height, width), np.float32)
    for level in range(1, MOUTH_LEVELS):
        m = Image.new("L", (width, height), 0)
        half_h = 1 + level * 2
        ImageDraw.Draw(m).ellipse((cx - 12, cy - half_h, cx + 12, cy + half_h), fill=200)
        masks[level] = np.asarray(m.filter(ImageFilter.GaussianBlur(1.2)), np.float32) / 255.0
    return masks


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB 0..255 -> (..., 3) float32 YUV, BT.601 limited range (FFmpeg's default)."""
    m = np.array(
        [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], np.float32
    )
    return np.asarray(rgb, np.float32) / 255.0 @ m.T + np.array([16.0, 128.0, 128.0], np.float32)


def half_res(x: np.ndarray) -> np.ndarray:
    """Average 2x2 blocks: full-resolution plane -> chroma resolution."""
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    x = x[:h, :w]
    return (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) / 4


@dataclass(frozen=True)
class Sprite:
    """A person's sprite, in YUV 4:2:0 planes, at each precomputed scale and mouth opening.

    Per scale: ``y`` (MOUTH_LEVELS, h, w) int32, ``uv`` (MOUTH_LEVELS, 2, h/2, w/2)
    int32, ``alpha`` (h, w) and ``alpha_uv`` (h/2, w/2) int32 in 0..256; h, w even.
    """

    y: tuple[np.ndarray, ...]
    uv: tuple[np.ndarray, ...]
    alpha: tuple[np.ndarray, ...]
    alpha_uv: tuple[np.ndarray, ...]


@functools.lru_cache(maxsize=16)
def build_sprite(p: FaceParams) -> Sprite:
    rgb, alpha = _base_sprite(p)
    mouths = _mouth_masks(SPRITE_H, SPRITE_W)
    mouth_colour = np.array([60, 20, 25], np.float32)
    ys, uvs, alphas, alphas_uv = [], [], [], []
    for s in SCALES:
        size = (round(SPRITE_W * s / 2) * 2, round(SPRITE_H * s / 2) * 2)
        y_levels, uv_levels = [], []
        for m in mouths:
            opened = rgb * (1 - m[..., None]) + mouth_colour * m[..., None]
            img = np.asarray(Image.fromarray(opened.astype(np.uint8)).resize(size, Image.BILINEAR))
            yuv = rgb_to_yuv(img)
            y_levels.append(yuv[..., 0])
            uv_levels.append(np.stack([half_res(yuv[..., 1]), half_res(yuv[..., 2])]))
        a = np.asarray(Image.fromarray((alpha * 255).astype(np.uint8)).resize(size, Image.BILINEAR), np.float32)
        a = a / 255.0 * 256
        ys.append(np.round(np.stack(y_levels)).astype(np.int32))
        uvs.append(np.round(np.stack(uv_levels)).astype(np.int32))
        alphas.append(np.round(a).astype(np.int32))
        alphas_uv.append(np.round(half_res(a)).astype(np.int32))
    return Sprite(tuple(ys), tuple(uvs), tuple(alphas), tuple(alphas_uv))


def _blend(dst: np.ndarray, src: np.ndarray, a: np.ndarray, x0: int, y0: int) -> None:
    """dst[y0:, x0:] = src over dst with alpha ``a`` in 0..256, clipped to dst, in place."""
    h, w = a.shape
    H, W = dst.shape
    ys, ye, xs, xe = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
    if ys >= ye or xs >= xe:
        return
    aa = a[ys - y0 : ye - y0, xs - x0 : xe - x0]
    region = dst[ys:ye, xs:xe].astype(np.int32)
    region = (region * (256 - aa) + src[ys - y0 : ye - y0, xs - x0 : xe - x0] * aa) >> 8
    dst[ys:ye, xs:xe] = np.clip(region, 0, 255)


def paste(
    planes, sprite: Sprite, cx: int, cy: int, scale_index: int, mouth: int, light: float, noise: np.ndarray
) -> None:
    """Draw ``sprite`` into the YUV 4:2:0 ``planes`` (y, u, v uint8 arrays of one
    half-frame, in place), centred at column ``cx`` with the face centre at row ``cy``.

    ``mouth`` is 0..MOUTH_LEVELS-1; ``light`` scales the person's brightness;
    ``noise`` (at least sprite-sized, int32) is added to the person's luma.
    """
    y_plane, u_plane, v_plane = planes
    a = sprite.alpha[scale_index]
    h, w = a.shape
    s = SCALES[scale_index]
    x0 = (cx - w // 2) & ~1  # even, so chroma lines up
    y0 = (cy - round((FACE_TOP + FACE_PX // 2) * s)) & ~1
    lit = ((sprite.y[scale_index][mouth] - 16) * int(light * 256) >> 8) + 16 + noise[:h, :w]
    _blend(y_plane, lit, a, x0, y0)
    uv = sprite.uv[scale_index][mouth]
    _blend(u_plane, uv[0], sprite.alpha_uv[scale_index], x0 // 2, y0 // 2)
    _blend(v_plane, uv[1], sprite.alpha_uv[scale_index], x0 // 2, y0 // 2)
