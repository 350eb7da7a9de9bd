"""Render one dialog: its timeline, stereo wav, sentence wavs, split-screen
video and text files. Runs in a worker process; everything random comes from
the dialog's own seed, so the files do not depend on worker order.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from training.synth import face as FACE
from training.synth import layout as L
from training.synth.plan import Dialog, Person
from training.synth.text import spoken
from training.synth.voice import SAMPLE_RATE, speak, write_wav

FPS = Fraction(30000, 1001)  # NTSC frame rate of the release videos
WIDTH, HEIGHT = 720, 480  # split-screen frame; each half is 360x480
HALF_W = WIDTH // 2
CROSS_TALK = 0.1  # fraction of the other actor heard on each mic
NOISE_FLOOR = 0.002  # mic noise, in full-scale units
LEAD_S, TAIL_S = (0.4, 0.8), 0.5  # silence before the first turn, after the last
GAP_S = (0.15, 0.45)  # pause between turns
VIDEO_BITRATE = 1_200_000  # bits per second of the mpeg4 stream
NOISE_BANK = 6  # precomputed pixel-noise images drawn from per frame
PIXEL_NOISE = 6  # luma noise on each person, +- grey levels


def _timeline(dialog: Dialog, persons: dict[str, Person], rng: np.random.Generator):
    """Synthesize every turn and place it in time: list of (Utterance, samples)."""
    counts: dict[str, int] = {"F": 0, "M": 0}
    xx: dict[str, int] = {"F": 0, "M": 0}
    placed: list[tuple[L.Utterance, np.ndarray]] = []
    t = rng.uniform(*LEAD_S)
    last_real = None
    for turn in dialog.turns:
        if turn.overlap:
            gender = "M" if last_real.person[-1] == "F" else "F"  # answers the turn it overlaps
            number, xx[gender] = f"XX{xx[gender]}", xx[gender] + 1
        else:
            gender = turn.gender
            number, counts[gender] = f"{counts[gender]:03d}", counts[gender] + 1
        person = persons[f"Ses0{dialog.session}{gender}"]
        audio = speak(spoken(turn.text), person.voice)
        duration = len(audio) / SAMPLE_RATE
        if turn.overlap:
            start = last_real.start + rng.uniform(0.2, 0.6) * (last_real.end - last_real.start)
        else:
            start = t
            t = start + duration + rng.uniform(*GAP_S)
        start = round(start, 4)
        end = round(start + duration, 4)
        emotion = None if turn.overlap else L.pick_emotion(rng)
        u = L.Utterance(f"{dialog.name}_{gender}{number}", person.id, start, end, turn.text, emotion)
        placed.append((u, audio))
        if not turn.overlap:
            last_real = u
    return placed, max(t, max(u.end for u, _ in placed)) + TAIL_S


def _tracks(dialog: Dialog, placed, duration: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each actor's clean voice over the whole dialog, keyed by person id."""
    n = int(round(duration * SAMPLE_RATE))
    tracks = {dialog.left: np.zeros(n, np.float32), dialog.right: np.zeros(n, np.float32)}
    for u, audio in placed:
        i = int(round(u.start * SAMPLE_RATE))
        seg = audio[: n - i]
        tracks[u.person][i : i + len(seg)] += seg * rng.uniform(0.6, 0.9)
    return tracks


def _write_audio(dialog: Dialog, placed, tracks, base: Path, rng: np.random.Generator) -> None:
    left, right = tracks[dialog.left], tracks[dialog.right]
    noise = rng.normal(0, NOISE_FLOOR, size=(len(left), 2)).astype(np.float32)
    stereo = np.stack([left + CROSS_TALK * right, right + CROSS_TALK * left], axis=1) + noise
    write_wav(base / "dialog" / "wav" / f"{dialog.name}.wav", stereo)
    folder = base / "sentences" / "wav" / dialog.name
    folder.mkdir(parents=True, exist_ok=True)
    for u, _ in placed:
        if not u.annotated:
            continue  # overlapped XX turns have no sentence wav
        channel = 0 if u.person == dialog.left else 1
        i, j = int(round(u.start * SAMPLE_RATE)), int(round(u.end * SAMPLE_RATE))
        write_wav(folder / f"{u.id}.wav", stereo[i:j, channel])


def _mouth_levels(track: np.ndarray, n_frames: int) -> np.ndarray:
    """Mouth opening 0..MOUTH_LEVELS-1 per video frame from the actor's voice loudness."""
    edges = (np.arange(n_frames + 1) * SAMPLE_RATE / float(FPS)).astype(int)
    energy = np.array([np.sqrt(np.mean(track[a:b] ** 2)) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])])
    level = np.clip(energy / 0.08, 0, 1) * (FACE.MOUTH_LEVELS - 1)
    return np.round(level).astype(int)


def _motion(rng: np.random.Generator, n_frames: int) -> dict[str, np.ndarray]:
    """Smooth head position, scale and lighting per frame, plus a little jitter."""
    t = np.arange(n_frames) / float(FPS)
    phase = rng.uniform(0, 2 * np.pi, size=4)
    freq = rng.uniform(0.1, 0.4, size=4)
    dx = 14 * np.sin(2 * np.pi * freq[0] * t + phase[0]) + rng.normal(0, 1.0, n_frames)
    dy = 10 * np.sin(2 * np.pi * freq[1] * t + phase[1]) + rng.normal(0, 1.0, n_frames)
    scale = (len(FACE.SCALES) - 1) / 2 * (1 + np.sin(2 * np.pi * freq[2] * t + phase[2]))
    light = 1 + 0.12 * np.sin(2 * np.pi * freq[3] * t + phase[3]) + rng.normal(0, 0.01, n_frames)
    return {
        "x": np.round(HALF_W / 2 + dx).astype(int),
        "y": np.round(HEIGHT / 2 + dy).astype(int),
        "scale": np.round(scale).astype(int),
        "light": light,
    }


def _background(rng: np.random.Generator) -> np.ndarray:
    """A half-frame room (RGB): a vertical wall gradient and a darker shelf."""
    top, bottom = rng.integers(60, 200, size=3), rng.integers(30, 160, size=3)
    ramp = np.linspace(0, 1, HEIGHT)[:, None, None]
    bg = (top * (1 - ramp) + bottom * ramp) * np.ones((1, HALF_W, 1))
    x0 = int(rng.integers(0, HALF_W - 80))
    bg[60:200, x0 : x0 + 70] *= 0.6
    return bg


def _yuv420(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> one flat uint8 yuv420p buffer (Y plane, then U, then V)."""
    yuv = FACE.rgb_to_yuv(rgb)
    planes = [yuv[..., 0], FACE.half_res(yuv[..., 1]), FACE.half_res(yuv[..., 2])]
    return np.concatenate([np.clip(np.round(p), 0, 255).astype(np.uint8).ravel() for p in planes])


def _plane_views(buf: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(y, u, v) views of the left and right halves of a flat yuv420p buffer."""
    n_y, n_c = HEIGHT * WIDTH, HEIGHT * WIDTH // 4
    y = buf[:n_y].reshape(HEIGHT, WIDTH)
    u = buf[n_y : n_y + n_c].reshape(HEIGHT // 2, WIDTH // 2)
    v = buf[n_y + n_c :].reshape(HEIGHT // 2, WIDTH // 2)
    c = HALF_W // 2
    return [(y[:, :HALF_W], u[:, :c], v[:, :c]), (y[:, HALF_W:], u[:, c:], v[:, c:])]


def _write_video(dialog: Dialog, persons, tracks, duration: float, path: Path, rng: np.random.Generator) -> None:
    """Encode the split-screen video, drawn directly in yuv420p (no colour conversion per frame)."""
    n_frames = int(np.ceil(duration * float(FPS)))
    session_rng = np.random.default_rng([dialog.session, 7])  # the same room for a session's dialogs
    background = _yuv420(np.concatenate([_background(session_rng), _background(session_rng)], axis=1))
    sides = []
    for pid in (dialog.left, dialog.right):
        sprite = FACE.build_sprite(persons[pid].face)
        sides.append((sprite, _motion(rng, n_frames), _mouth_levels(tracks[pid], n_frames)))
    noise = rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, size=(NOISE_BANK, FACE.SPRITE_H * 2, FACE.SPRITE_W * 2))
    noise = noise.astype(np.int32)
    buf = background.copy()
    halves = _plane_views(buf)
    with av.open(str(path), "w", format="avi", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = VIDEO_BITRATE
        stream.thread_count = 1
        # bit-exact: no encoder version strings; zero motion search: ~10% faster, same look.
        stream.codec_context.options = {"flags": "+bitexact", "motion_est": "zero"}
        for i in range(n_frames):
            buf[:] = background
            for planes, (sprite, m, mouth) in zip(halves, sides):
                k = int(rng.integers(NOISE_BANK))
                FACE.paste(planes, sprite, m["x"][i], m["y"][i], m["scale"][i], mouth[i], m["light"][i], noise[k])
            frame = av.VideoFrame.from_ndarray(buf.reshape(HEIGHT * 3 // 2, WIDTH), format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def render_dialog(dialog: Dialog, persons: dict[str, Person], root: Path) -> dict:
    """Write every file of ``dialog`` under ``root``; return its truth for persons.json."""
    rng = np.random.default_rng(dialog.seed)
    base = L.session_dir(root, dialog.session)
    placed, duration = _timeline(dialog, persons, rng)
    tracks = _tracks(dialog, placed, duration, rng)
    _write_audio(dialog, placed, tracks, base, rng)
    utterances = [u for u, _ in placed]
    (base / "dialog" / "transcriptions" / f"{dialog.name}.txt").write_text(
        L.transcript_text(dialog.name, utterances, rng)
    )
    (base / "dialog" / "EmoEvaluation" / f"{dialog.name}.txt").write_text(L.emo_text(utterances, rng))
    _write_video(dialog, persons, tracks, duration, base / "dialog" / "avi" / "DivX" / f"{dialog.name}.avi", rng)
    return {
        "name": dialog.name,
        "session": dialog.session,
        "kind": dialog.kind,
        "left": dialog.left,
        "right": dialog.right,
        "duration": round(duration, 4),
        "utterances": [
            {
                "id": u.id, "person": u.person, "start": u.start, "end": u.end, "text": u.text,
                "emotion": u.emotion, "sentence_wav": u.annotated,
            }
            for u in utterances
        ],
    }
