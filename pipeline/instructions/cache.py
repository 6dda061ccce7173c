"""The reply cache: every reply a model gave, so that no request is ever paid for twice.

An append-only JSONL file (one reply a line, written with a single ``write`` on an ``O_APPEND``
descriptor as soon as the reply arrives, before it is parsed). It is keyed by
``(clip_id, task_family, model, prompt_version)``; the last line for a key wins. A line also keeps
the backend that produced it, the token usage, the cost, and a hash of the request (the clip's
JSON may change while the key stays the same; ``request_sha256`` tells). A line torn by a killed
writer is skipped on reading, and the next writer starts on a fresh line. Only an index (key ->
byte offset) is held in memory; replies are read back on demand. Several runs may share one cache
file (``--cache``): appends from different processes do not interleave.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("llark")
CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheKey:
    clip_id: str
    task_family: str
    model: str
    prompt_version: str

    def text(self) -> str:
        return json.dumps([self.clip_id, self.task_family, self.model, self.prompt_version])


@dataclass
class CachedReply:
    text: str
    finish_reason: str | None
    backend: str
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float
    request_sha256: str
    created: float = 0.0


class ReplyCache:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offsets: dict[str, int] = {}
        self._fd: int | None = None
        self._reader = None
        self.unreadable_lines = 0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            offset = 0
            for raw in fh:
                try:
                    entry = json.loads(raw)
                    self._offsets[json.dumps(entry["key"])] = offset
                except (ValueError, KeyError, TypeError):
                    self.unreadable_lines += 1
                offset += len(raw)
        if self.unreadable_lines:
            log.warning("%s: skipped %d unreadable lines (torn by an interrupted run?)", self.path, self.unreadable_lines)

    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, key: CacheKey) -> bool:
        return key.text() in self._offsets

    def get(self, key: CacheKey) -> CachedReply | None:
        offset = self._offsets.get(key.text())
        if offset is None:
            return None
        if self._reader is None:
            self._reader = open(self.path, "rb")
        self._reader.seek(offset)
        entry = json.loads(self._reader.readline())
        return CachedReply(**entry["reply"])

    def put(self, key: CacheKey, reply: CachedReply) -> CachedReply:
        if not reply.created:
            reply.created = round(time.time(), 3)
        line = (json.dumps({"cache": CACHE_VERSION, "key": json.loads(key.text()), "reply": asdict(reply)},
                           ensure_ascii=False) + "\n").encode("utf-8")
        fd = self._open_for_append()
        written = os.write(fd, line)
        while written < len(line):  # only on a full disk or a signal; a reader skips a torn line
            written += os.write(fd, line[written:])
        # With O_APPEND each write lands at the end of the file, wherever other writers left it,
        # and leaves this descriptor's offset just after it: that tells where this line starts.
        self._offsets[key.text()] = os.lseek(fd, 0, os.SEEK_CUR) - len(line)
        return reply

    def _open_for_append(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size:
                with open(self.path, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        os.write(self._fd, b"\n")  # end a torn line left by a killed writer
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
