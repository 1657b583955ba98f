"""Serialize once, compress once: the representations of one immutable document
(a snapshot or a delta at one version), built on first request and then served
as bytes to every request that asks for the same format and content coding."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

# Bodies smaller than this go out uncompressed: the framing would outweigh the gain.
MIN_COMPRESS_BYTES = 512
# Compress bodies larger than this in a worker thread (zlib and zstd release the
# GIL), so long-poll wake-ups are not held up by a big snapshot.
THREAD_BYTES = 256 * 1024

Observer = Callable[[str, str, str, float, int], None]  # kind, format, encoding, seconds, bytes


@dataclass(frozen=True, slots=True)
class Compression:
    gzip_level: int = 6
    zstd_level: int = 3


def compress(encoding: str, raw: bytes, levels: Compression) -> bytes:
    if encoding == "gzip":
        return gzip.compress(raw, levels.gzip_level, mtime=0)
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=levels.zstd_level).compress(raw)
    raise ValueError(f"unknown content coding {encoding!r}")


class Representations:
    """Bytes of one document per (format, content coding), each built at most once."""

    __slots__ = ("_build", "_done", "_kind", "_levels", "_observe", "_pending")

    def __init__(self, kind: str, build: Callable[[str], bytes], levels: Compression, observe: Observer | None) -> None:
        self._kind = kind
        self._build = build
        self._levels = levels
        self._observe = observe
        self._done: dict[tuple[str, str], bytes] = {}
        self._pending: dict[tuple[str, str], asyncio.Task[bytes]] = {}

    def raw(self, fmt: str) -> bytes:
        body = self._done.get((fmt, "identity"))
        if body is None:
            started = time.perf_counter()
            body = self._build(fmt)
            self._done[(fmt, "identity")] = body
            if self._observe is not None:
                self._observe(self._kind, fmt, "identity", time.perf_counter() - started, len(body))
        return body

    def cached(self, fmt: str, encoding: str) -> tuple[bytes, str] | None:
        """The bytes when already built, without waiting."""
        body = self._done.get((fmt, encoding))
        if body is not None:
            return body, encoding
        if encoding != "identity":
            raw = self._done.get((fmt, "identity"))
            if raw is not None and len(raw) < MIN_COMPRESS_BYTES:
                return raw, "identity"
        return None

    async def get(self, fmt: str, encoding: str) -> tuple[bytes, str]:
        """(body, content coding actually used)."""
        done = self._done.get((fmt, encoding))
        if done is not None:
            return done, encoding
        raw = self.raw(fmt)
        if encoding == "identity" or len(raw) < MIN_COMPRESS_BYTES:
            return raw, "identity"
        key = (fmt, encoding)
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._compress(key, raw))
            self._pending[key] = task
        # Shielded: a client that goes away does not cancel the work others wait for.
        return await asyncio.shield(task), encoding

    async def _compress(self, key: tuple[str, str], raw: bytes) -> bytes:
        try:
            started = time.perf_counter()
            if len(raw) >= THREAD_BYTES:
                body = await asyncio.to_thread(compress, key[1], raw, self._levels)
            else:
                body = compress(key[1], raw, self._levels)
            self._done[key] = body
            if self._observe is not None:
                self._observe(self._kind, key[0], key[1], time.perf_counter() - started, len(body))
            return body
        finally:
            self._pending.pop(key, None)
