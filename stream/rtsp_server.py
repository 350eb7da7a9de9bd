#!/usr/bin/python3
"""Serve one MP4 file (H.264 video and/or AAC audio) over RTSP on 127.0.0.1.

Run with the system python (GStreamer bindings come from Debian's
python3-gi and gir1.2-gst-rtsp-server-1.0, not from the venv):

    /usr/bin/python3 stream/rtsp_server.py --file clip.mp4 --port 8554 --path /clip

Each client gets its own playback from the start of the file, over TCP or
UDP as it asks. The stream ends at the end of the file. Prints "READY url"
once the server is listening. Started and stopped by stream/servers.py.
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def launch_line(path: str, video: bool, audio: bool) -> str:
    parts = [f'filesrc location="{path}" ! qtdemux name=d']
    if video:
        parts.append("d.video_0 ! queue ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1")
    if audio:
        name = "pay1" if video else "pay0"
        parts.append(f"d.audio_0 ! queue ! aacparse ! rtpmp4gpay name={name} pt=97")
    return "( " + " ".join(parts) + " )"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", required=True, help="MP4 with H.264 video and/or AAC audio")
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--path", default="/clip", help="mount point, e.g. /clip")
    parser.add_argument("--no-audio", action="store_true", help="the file has no audio track")
    parser.add_argument("--no-video", action="store_true", help="the file has no video track")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(args.file, not args.no_video, not args.no_audio))
    factory.set_shared(False)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    print(f"READY rtsp://127.0.0.1:{args.port}{args.path}", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
