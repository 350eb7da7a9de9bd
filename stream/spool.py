"""A bounded, append-only, on-disk queue of events kept while Redis is down.

Layout under the spool folder:

    seg-00000001.jsonl   one JSON object per line, appended in order
    seg-00000002.jsonl   a new segment every SEGMENT_EVENTS lines
    cursor.json          {"segment": "seg-00000001.jsonl", "line": 17}: lines delivered

Durability (fsync policy): every append is flushed and fsync'ed before
``append`` returns, so an event the spool accepted survives a crash of the
process or the machine. The cursor is rewritten atomically (write + fsync +
rename) every CURSOR_EVERY deliveries and at the end of each drain, so a
crash during a drain re-delivers at most CURSOR_EVERY events (at least once,
never lost). A fully delivered segment is deleted. Records are plain JSON
(no pickle). Beyond ``max_events`` pending events new ones are refused and
counted in ``overflow``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEGMENT_EVENTS = 1000  # lines per segment file
CURSOR_EVERY = 64  # deliveries between cursor writes during a drain
CURSOR_FILE = "cursor.json"


class Spool:
    def __init__(self, folder: str | Path, max_events: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_events = max_events
        self.overflow = 0  # events refused because the spool was full
        self._lock = threading.Lock()
        self._cursor = self._read_cursor()
        self._pending = self._count_pending()
        self._tail: tuple[Path, int] | None = None  # last segment and its line count

    # -- state on disk ----------------------------------------------------------
    def _segments(self) -> list[Path]:
        return sorted(self.folder.glob("seg-*.jsonl"))

    def _read_cursor(self) -> dict[str, Any]:
        path = self.folder / CURSOR_FILE
        if path.exists():
            try:
                cursor = json.loads(path.read_text())
                if (self.folder / cursor["segment"]).exists():
                    return cursor
            except (ValueError, KeyError):
                pass
        return {"segment": "", "line": 0}

    def _write_cursor(self) -> None:
        path = self.folder / CURSOR_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self._cursor, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _lines(self, segment: Path) -> list[str]:
        with open(segment) as f:
            return [line for line in f.read().split("\n") if line]

    def _count_pending(self) -> int:
        total = sum(len(self._lines(s)) for s in self._segments())
        return total - (self._cursor["line"] if self._cursor["segment"] else 0)

    # -- API --------------------------------------------------------------------
    def __len__(self) -> int:
        return self._pending

    def append(self, record: dict[str, Any]) -> bool:
        """Store one event durably; False (and overflow counted) when full."""
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            if self._pending >= self.max_events:
                self.overflow += 1
                return False
            last, count = self._tail if self._tail and self._tail[0].exists() else self._find_tail()
            if last is None or count >= SEGMENT_EVENTS:
                number = int(last.stem.split("-")[1]) + 1 if last else 1
                last, count = self.folder / f"seg-{number:08d}.jsonl", 0
            with open(last, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._tail = (last, count + 1)
            self._pending += 1
            return True

    def _find_tail(self) -> tuple[Path | None, int]:
        segments = self._segments()
        return (segments[-1], len(self._lines(segments[-1]))) if segments else (None, 0)

    def drain(self, deliver: Callable[[dict[str, Any]], None]) -> int:
        """Deliver pending events oldest first; stops (re-raising) at the first failure."""
        delivered = 0
        with self._lock:
            try:
                for segment in self._segments():
                    start = self._cursor["line"] if self._cursor["segment"] == segment.name else 0
                    lines = self._lines(segment)
                    for number in range(start, len(lines)):
                        deliver(json.loads(lines[number]))
                        delivered += 1
                        self._pending -= 1
                        self._cursor = {"segment": segment.name, "line": number + 1}
                        if delivered % CURSOR_EVERY == 0:
                            self._write_cursor()
                    if segment != self._segments()[-1] or len(lines) >= SEGMENT_EVENTS:
                        segment.unlink()
                        self._cursor = {"segment": "", "line": 0}
            finally:
                if delivered:
                    self._finish_drain()
        return delivered

    def _finish_drain(self) -> None:
        segments = self._segments()
        if self._pending == 0:  # all delivered: start afresh
            for segment in segments:
                segment.unlink()
            self._cursor = {"segment": "", "line": 0}
        self._write_cursor()
