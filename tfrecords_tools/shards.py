"""Shard stage: atomic writing of per-video record chunks, and their assembly into named shards.

Each video is written to its own uncompressed TFRecord chunk (temporary
name, renamed when complete), so a killed conversion loses at most the
videos in flight. Assembly then copies the chunks' bytes, in a fixed order,
into shards `{split}-{i:05d}-of-{n:05d}.tfrecord[.gz|.zz]` of about
`shard_size` bytes, cut at record boundaries, compressing on the way
(TFRecord GZIP/ZLIB files are the plain record stream, compressed). Every
shard is written under a temporary name, hashed, then renamed. The same
chunks give byte-identical shards, whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import os
import re
import struct
import zlib
from typing import Iterator, List, Optional, Sequence, Tuple

SUFFIX = {"none": ".tfrecord", "gzip": ".tfrecord.gz", "zlib": ".tfrecord.zz"}
SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord(\.gz|\.zz)?$")
RECORD_OVERHEAD = 16  # length (8) + length CRC (4) + data CRC (4)
_COPY = 1 << 20


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


def shard_name(split: str, i: int, n: int, compression: str) -> str:
    return f"{split}-{i:05d}-of-{n:05d}{SUFFIX[compression]}"


def _masked_crc(data) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant (tensorflow/core/lib/hash/crc32c.h)."""
    crc = _crc32c().value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(record) -> List[bytes]:
    """The pieces of one framed TFRecord record: length, length CRC, data, data CRC (all little-endian)."""
    length = struct.pack("<Q", len(record))
    return [length, struct.pack("<I", _masked_crc(length)), record, struct.pack("<I", _masked_crc(record))]


@functools.lru_cache(maxsize=None)
def _crc32c():
    """google-crc32c when its C extension is there (the record framing then needs no TensorFlow), else None."""
    try:
        import google_crc32c
    except ImportError:
        return None
    return google_crc32c if google_crc32c.implementation == "c" else None


class _TFWriter:
    """TensorFlow's record writer, for when google-crc32c's C extension is missing (its pure-Python CRC is slow)."""

    def __init__(self, path: str):
        import tensorflow as tf

        self._writer = tf.io.TFRecordWriter(path)

    def write(self, record: bytes) -> None:
        self._writer.write(record)

    def close(self) -> None:
        self._writer.close()


class _PlainWriter:
    """TFRecord framing with plain file writes and google-crc32c: the same bytes as `tf.io.TFRecordWriter`.

    Conversion workers then never import TensorFlow (about 2 s of CPU for each
    spawned worker) and skip a copy of every record into TensorFlow.
    """

    def __init__(self, path: str):
        self._f = open(path, "wb")

    def write(self, record: bytes) -> None:
        self._f.writelines(frame_record(record))

    def close(self) -> None:
        self._f.close()


def record_writer(path: str):
    """A TFRecord writer for a local, uncompressed file: `write(record)`, `close()`."""
    return _PlainWriter(path) if _crc32c() is not None else _TFWriter(path)


class ChunkWriter:
    """Writes one video's records to `path` (a local file) atomically; tracks each framed record's size."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = path + ".tmp"
        self.sizes: List[int] = []
        self._writer = record_writer(self.tmp)

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.sizes.append(len(record) + RECORD_OVERHEAD)

    def reset(self) -> None:
        """Drops everything written so far (the video is being read again)."""
        self._writer.close()
        self.sizes = []
        self._writer = record_writer(self.tmp)

    def commit(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A committed chunk: its file and the framed size of each record in it, in order."""

    path: str
    sizes: Tuple[int, ...]


def plan_shards(chunks: Sequence[Chunk], shard_bytes: int) -> List[List[Tuple[int, int, int]]]:
    """Splits the records of `chunks` (in order) into shards of about `shard_bytes`.

    Returns per shard a list of (chunk index, first record, end record).
    The shard count is fixed first (ceil(total / shard_bytes)), then records
    are dealt so that each shard's bytes stay close to total / count.
    """
    total = sum(sum(c.sizes) for c in chunks)
    if total == 0:
        return []
    n = max(1, math.ceil(total / max(1, shard_bytes)))
    target = total / n
    shards: List[List[Tuple[int, int, int]]] = [[] for _ in range(n)]
    done = 0
    for ci, chunk in enumerate(chunks):
        first = None
        shard_of_first = None
        for ri, size in enumerate(chunk.sizes):
            # A record goes to the shard its middle byte falls in.
            s = min(n - 1, int((done + size / 2) // target))
            if first is None:
                first, shard_of_first = ri, s
            elif s != shard_of_first:
                shards[shard_of_first].append((ci, first, ri))
                first, shard_of_first = ri, s
            done += size
        if first is not None:
            shards[shard_of_first].append((ci, first, len(chunk.sizes)))
    return [s for s in shards if s] or []


class RecordSink:
    """A file that compresses (as TFRecord's GZIP/ZLIB do) and hashes what is written."""

    def __init__(self, f, compression: str):
        self.f = f
        self.plain = isinstance(f, io.IOBase)  # GFile (remote) takes only `bytes`
        self.hash = hashlib.sha256()
        self.bytes = 0
        if compression == "gzip":
            self.z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        elif compression == "zlib":
            self.z = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
        else:
            self.z = None

    def _out(self, data: bytes):
        if data:
            self.f.write(data if self.plain else bytes(data))
            self.hash.update(data)
            self.bytes += len(data)

    def write(self, data: bytes):
        self._out(self.z.compress(data) if self.z else data)

    def close(self):
        if self.z:
            self._out(self.z.flush())


def copy_range(src, start: int, length: int, sink: RecordSink, buffer: Optional[bytearray] = None) -> None:
    """Copies `length` bytes from `start` of `src` into `sink`, through one reused buffer.

    Reading into the same buffer, not into a new 1 MB `bytes` per read, matters: in a process whose
    heap is busy (the converter, after decoding) every fresh large block costs page faults, and
    assembly took 3x the CPU.
    """
    src.seek(start)
    view = memoryview(buffer if buffer is not None else bytearray(_COPY))
    left = length
    while left > 0:
        n = src.readinto(view[:min(len(view), left)]) if hasattr(src, "readinto") else None
        if n is None:  # a GFile (remote work folder) has no readinto
            data = src.read(min(len(view), left))
            n = len(data)
            view[:n] = data
        if not n:
            raise IOError(f"{src.name if hasattr(src, 'name') else 'chunk'}: ended {left} bytes early")
        sink.write(view[:n])
        left -= n


def _open_chunk(path: str):
    # Chunks sit in a local work folder, and plain reads cost less than GFile's (assembling 82 MB of
    # chunks: 92 -> 80 ms, most of the rest is sha256).
    return open(path, "rb") if "://" not in path else _gfile().GFile(path, "rb")


def _open_output(path: str):
    # A local shard is written with plain file writes, which take the buffer as it is; GFile's
    # write wants `bytes` (one more copy) and is needed only for gs:// and other remote paths.
    return open(path, "wb") if "://" not in path else _gfile().GFile(path, "wb")


def write_shards(out_dir: str, split: str, chunks: Sequence[Chunk], shard_bytes: int,
                 compression: str, threads: int = 2) -> List[dict]:
    """Assembles `chunks` into the shards of `split`; returns their manifest entries.

    Shards are written by `threads` threads at once: copying, compressing and
    hashing release the GIL, so assembly uses that many cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tfrecords_tools.manifest import join

    gfile = _gfile()
    layout = plan_shards(chunks, shard_bytes)
    offsets = [[0] + list(_cumsum(c.sizes)) for c in chunks]
    n = len(layout)

    def write(i: int) -> dict:
        name = shard_name(split, i, n, compression)
        final = join(out_dir, name)
        tmp = join(out_dir, "." + name + ".tmp")
        records = 0
        buffer = bytearray(_COPY)
        try:
            with _open_output(tmp) as f:
                sink = RecordSink(f, compression)
                for ci, first, end in layout[i]:
                    start = offsets[ci][first]
                    with _open_chunk(chunks[ci].path) as src:
                        copy_range(src, start, offsets[ci][end] - start, sink, buffer)
                    records += end - first
                sink.close()
        except OSError as e:
            # A full disk: the half-written shard goes, so its space is free again and nothing reads it.
            if "://" not in tmp and os.path.exists(tmp):
                os.remove(tmp)
            if e.errno is None or e.filename:
                raise
            raise OSError(e.errno, e.strerror, tmp) from e  # a write() error names no file: this shard
        gfile.rename(tmp, final, overwrite=True)
        return {"file": name, "records": records, "bytes": sink.bytes, "sha256": sink.hash.hexdigest()}

    if threads <= 1 or n <= 1:
        return [write(i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=min(threads, n), thread_name_prefix="stp-shard") as pool:
        return list(pool.map(write, range(n)))


def _cumsum(values: Sequence[int]) -> Iterator[int]:
    acc = 0
    for v in values:
        acc += v
        yield acc


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with _gfile().GFile(path, "rb") as f:
        while True:
            data = f.read(_COPY)
            if not data:
                return h.hexdigest()
            h.update(data)


def list_shard_files(out_dir: str) -> List[str]:
    """Names of the shard files (and leftover temporaries) in `out_dir`."""
    gfile = _gfile()
    if not gfile.isdir(out_dir):
        return []
    return sorted(n for n in gfile.listdir(out_dir)
                  if SHARD_RE.match(n) or (n.startswith(".") and n.endswith(".tmp") and ".tfrecord" in n))
