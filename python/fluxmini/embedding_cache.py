"""The prompt-embedding cache: a prompt's CLIP-L pooled vector and T5 sequence, kept so that a
repeated prompt skips text encoding (and never loads the text encoders).

One cache per model (``FluxMini.embedding_cache``), used by :func:`fluxmini.pipeline.encode_prompt`
alone, so the CLI, the server and the batch worker share it. Two levels:

* in memory, for the model's life: LRU, bounded in entries and bytes (a T5 sequence of 512 tokens
  is 8 MiB in float32);
* on disk when ``cache_dir`` is given: one file per entry, LRU by modification time, bounded in
  bytes. Several processes may share a folder: entries are written to a temporary file and
  renamed into place, eviction runs under an exclusive ``flock`` of ``.lock`` and tolerates files
  that vanish, and every read checks a header (magic, the full key, shapes, exact length) and a
  SHA-256 of the payload, so a damaged, truncated or foreign file is a miss, never a crash or a
  wrong result.

The key is a SHA-256 of everything the embeddings depend on: the model's text identity
(:func:`weights_fingerprint` of the CLIP-L and T5 tensors, the text-encoder LoRAs, the backend,
kernels and fluxmini version), the compat mode and the token ids themselves (which carry the
prompt and the T5 length). docs/ARCHITECTURE.md (§3, "Prompt-embedding cache") says why the
fingerprint is sound and cheap.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
import time
import warnings
from collections import OrderedDict
from typing import Iterable, Optional, Tuple

import numpy as np

from .errors import FluxMiniFileError, FluxMiniValueError

__all__ = ["EmbeddingCache", "entry_key", "weights_fingerprint", "DEFAULT_DISK_BYTES", "DEFAULT_MEMORY_BYTES",
           "DEFAULT_MEMORY_ENTRIES"]

#: bumped when the key's recipe or the file layout changes: older entries then simply miss
FORMAT = 1
MAGIC = b"FMEMB\x00\x01\n"
#: magic, key (32), t5 rows, t5 width, pooled length, reserved (4 x u32), SHA-256 of the payload
_HEADER = struct.Struct("<8s32sIIII32s")
#: the largest payload a file may declare (a T5 sequence of 4096 tokens x 4096 plus pooled):
#: a foreign header cannot make a read allocate more
_MAX_FLOATS = 4096 * 4096 + 65536

DEFAULT_MEMORY_BYTES = 128 << 20  # 16 T5 sequences of 512 tokens
DEFAULT_MEMORY_ENTRIES = 64
DEFAULT_DISK_BYTES = 1 << 30      # 128 of them

_ENTRY = re.compile(r"^[0-9a-f]{64}\.emb$")
_TEMP = re.compile(r"^\.[0-9a-f]{64}\.[0-9]+\.[0-9a-f]+\.tmp$")
_STALE_TEMP_SECONDS = 3600.0  # a temporary file this old belongs to a writer that died

# Data sampled per tensor by the fingerprint: one window inside one page, at the tensor's middle.
_SAMPLE = 512


def weights_fingerprint(tensors: Iterable[tuple]) -> bytes:
    """SHA-256 of a set of tensors as stored in their files, without reading them whole.

    tensors: (name, type, shape, path, offset, nbytes) rows (``_core.Model.tensor_table``'s,
    without the file's own name). Hashed: each file's size; each tensor's name, type, shape,
    offset and size; and ``_SAMPLE`` bytes of its data from the middle of the tensor, read with
    ``pread`` under ``POSIX_FADV_RANDOM`` so only those pages are read (about one 4 KiB page per
    tensor: ~1.7 MB for CLIP-L + T5-XXL, where hashing T5 whole would read 2.5 GB). A different
    file (another quantisation, fine-tune, seed or merged LoRA) changes the table or the data of
    every tensor it touches and so the hash; the path is not hashed, so a copy of the same file
    hits. Not detected: an edit that changes bytes of no sampled window, which no tool producing
    weights makes.
    """
    by_file: dict = {}
    for row in tensors:
        name, type_name, shape, path, offset, nbytes = row
        by_file.setdefault(path, []).append((str(name), str(type_name), tuple(int(x) for x in shape), int(offset),
                                             int(nbytes)))
    h = hashlib.sha256(b"fluxmini text weights %d\0" % FORMAT)
    # files in the order of their contents, not their paths: a copy elsewhere gives the same hash
    for path, rows in sorted(((p, sorted(r)) for p, r in by_file.items()), key=lambda pr: pr[1]):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise FluxMiniFileError(f"cannot read the model file {path} to identify its text encoders: "
                                    f"{e.strerror or e}") from e
        try:
            size = os.fstat(fd).st_size
            h.update(b"file %d\0" % size)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around the samples
            for name, type_name, shape, offset, nbytes in rows:
                h.update(repr((name, type_name, shape, offset, nbytes)).encode() + b"\0")
                start = offset + nbytes // 2
                start = max(offset, start - start % _SAMPLE)  # inside one page
                n = min(_SAMPLE, offset + nbytes - start)
                data = os.pread(fd, n, start) if n > 0 else b""
                if len(data) != max(n, 0):
                    raise FluxMiniFileError(f"{path}: the file is shorter than its tensor table says "
                                            f"({name}); the file is damaged")
                h.update(data)
        finally:
            os.close(fd)
    return h.digest()


def entry_key(identity: bytes, compat: Optional[str], clip_ids, t5_ids) -> bytes:
    """The key of one prompt's embeddings (32 bytes)."""
    h = hashlib.sha256(b"fluxmini prompt embeddings %d\0" % FORMAT)
    for part in (identity, (compat or "").encode()):
        h.update(struct.pack("<Q", len(part)) + part)
    for ids in (clip_ids, t5_ids):
        a = np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).astype("<i8", copy=False)
        h.update(repr(a.shape).encode() + b"\0" + a.tobytes())
    return h.digest()


def _frozen(a) -> np.ndarray:
    """The array as C-contiguous float32 (copied only if it is not), marked read-only."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.setflags(write=False)
    return a


class EmbeddingCache:
    """Prompt embeddings by key, in memory and optionally in a folder.

    directory: the disk level's folder (created if needed), or None for memory only.
    max_bytes: the folder's bound (entries only; other files there are left alone).
    memory_bytes / memory_entries: the memory level's bounds (0 turns it off).

    Entries are shared, not copied: ``put`` marks the arrays it is given read-only and ``get``
    returns read-only arrays (copy one to change it). ``stats`` counts hits per level, misses and
    files written.
    """

    def __init__(self, directory=None, *, max_bytes: Optional[int] = None, memory_bytes: Optional[int] = None,
                 memory_entries: Optional[int] = None):
        self.max_bytes = _size_arg(max_bytes, DEFAULT_DISK_BYTES, "cache_max_bytes")
        self.memory_bytes = _size_arg(memory_bytes, DEFAULT_MEMORY_BYTES, "cache_memory_bytes")
        self.memory_entries = _size_arg(memory_entries, DEFAULT_MEMORY_ENTRIES, "cache_memory_entries")
        self.directory = None
        if directory is not None:
            if not isinstance(directory, (str, os.PathLike)):
                raise FluxMiniValueError(f"cache_dir must be a folder path, got {type(directory).__name__}")
            self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as e:
                raise FluxMiniFileError(f"cannot create the embedding cache folder {self.directory}: "
                                        f"{e.strerror or e} (pass another cache_dir / --cache-dir)") from e
            if not os.path.isdir(self.directory):
                raise FluxMiniFileError(f"the embedding cache folder {self.directory} is not a folder")
        self._mem: "OrderedDict[bytes, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self._mem_bytes = 0
        self._lock = threading.Lock()
        self._warned = False
        self.stats = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "disk_writes": 0}

    # ------------------------------------------------------------------ lookups
    def get(self, key: bytes) -> Optional[Tuple[str, np.ndarray, np.ndarray]]:
        """("memory" or "disk", t5, pooled) for the key, or None."""
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None:
                self._mem.move_to_end(key)
                self.stats["memory_hits"] += 1
                return "memory", hit[0], hit[1]
        if self.directory is not None:
            found = self._read(key)
            if found is not None:
                t5, pooled = found = self._remember(key, *found)
                with self._lock:
                    self.stats["disk_hits"] += 1
                return "disk", t5, pooled
        with self._lock:
            self.stats["misses"] += 1
        return None

    def put(self, key: bytes, t5: np.ndarray, pooled: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Keep an entry in memory and, with a folder, on disk (a write that fails warns once).
        Returns the arrays as kept: float32, read-only."""
        t5, pooled = self._remember(key, t5, pooled)
        if self.directory is not None:
            self._write(key, t5, pooled)
        return t5, pooled

    def clear(self, *, disk: bool = True) -> None:
        """Forget every entry: in memory, and with ``disk`` every entry file of the folder."""
        with self._lock:
            self._mem.clear()
            self._mem_bytes = 0
        if disk and self.directory is not None:
            with self._folder_lock():
                for name, _, _ in self._entries():
                    _unlink(os.path.join(self.directory, name))

    def __len__(self) -> int:
        return len(self._mem)

    def disk_bytes(self) -> int:
        """Bytes of the entry files in the folder now (0 without a folder)."""
        return sum(size for _, size, _ in self._entries()) if self.directory is not None else 0

    # ------------------------------------------------------------------ memory level
    def _remember(self, key: bytes, t5, pooled) -> Tuple[np.ndarray, np.ndarray]:
        t5, pooled = _frozen(t5), _frozen(pooled)
        size = t5.nbytes + pooled.nbytes
        if self.memory_entries == 0 or size > self.memory_bytes:
            return t5, pooled
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._mem_bytes -= old[0].nbytes + old[1].nbytes
            self._mem[key] = (t5, pooled)
            self._mem_bytes += size
            while len(self._mem) > self.memory_entries or self._mem_bytes > self.memory_bytes:
                _, (a, b) = self._mem.popitem(last=False)
                self._mem_bytes -= a.nbytes + b.nbytes
        return t5, pooled

    # ------------------------------------------------------------------ disk level
    def _path(self, key: bytes) -> str:
        return os.path.join(self.directory, key.hex() + ".emb")

    def _read(self, key: bytes) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """The entry's arrays if its file is whole and is this key's; anything else is a miss."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
                if len(head) != _HEADER.size:
                    return None
                magic, file_key, rows, width, n_pooled, _reserved, digest = _HEADER.unpack(head)
                n_t5 = rows * width
                if magic != MAGIC or file_key != key or n_t5 + n_pooled > _MAX_FLOATS or n_pooled == 0:
                    return None
                payload_bytes = 4 * (n_t5 + n_pooled)
                if os.fstat(f.fileno()).st_size != _HEADER.size + payload_bytes:
                    return None
                payload = f.read(payload_bytes + 1)
        except (OSError, ValueError):  # vanished, a folder in its place, unreadable: a miss
            return None
        if len(payload) != payload_bytes or hashlib.sha256(payload).digest() != digest:
            return None
        values = np.frombuffer(payload, dtype="<f4").astype(np.float32, copy=False)  # read-only views
        t5 = values[:n_t5].reshape(rows, width)
        pooled = values[n_t5:]
        _touch(path)
        return t5, pooled

    def _write(self, key: bytes, t5: np.ndarray, pooled: np.ndarray) -> None:
        if t5.ndim != 2 or pooled.ndim != 1:
            return
        payload = np.ascontiguousarray(t5, "<f4").tobytes() + np.ascontiguousarray(pooled, "<f4").tobytes()
        if _HEADER.size + len(payload) > self.max_bytes:
            return  # would evict everything and still not fit
        head = _HEADER.pack(MAGIC, key, t5.shape[0], t5.shape[1], pooled.shape[0], 0,
                            hashlib.sha256(payload).digest())
        final = self._path(key)
        tmp = os.path.join(self.directory, f".{key.hex()}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(payload)
            os.replace(tmp, final)  # atomic: readers see the old file or the whole new one
            _touch(final)
        except OSError as e:
            _unlink(tmp)
            self._warn(f"fluxmini: cannot write to the embedding cache folder {self.directory}: "
                       f"{e.strerror or e}; prompts are still cached in memory")
            return
        with self._lock:
            self.stats["disk_writes"] += 1
        self._evict()

    def _entries(self):
        """(name, bytes, mtime_ns) of each entry file; files that vanish meanwhile are skipped."""
        out = []
        try:
            it = os.scandir(self.directory)
        except OSError:
            return out
        with it:
            for e in it:
                if not _ENTRY.match(e.name):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                out.append((e.name, st.st_size, st.st_mtime_ns))
        return out

    def _evict(self) -> None:
        """Remove the least recently used entries until the folder is within max_bytes."""
        if sum(size for _, size, _ in self._entries()) <= self.max_bytes:
            return
        with self._folder_lock():
            entries = sorted(self._entries(), key=lambda e: (e[2], e[0]))  # oldest first
            total = sum(size for _, size, _ in entries)
            for name, size, _ in entries:
                if total <= self.max_bytes:
                    break
                _unlink(os.path.join(self.directory, name))
                total -= size
            self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        now = time.time()
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    if _TEMP.match(e.name):
                        try:
                            if now - e.stat(follow_symlinks=False).st_mtime > _STALE_TEMP_SECONDS:
                                _unlink(e.path)
                        except OSError:
                            pass
        except OSError:
            pass

    def _folder_lock(self):
        return _FileLock(os.path.join(self.directory, ".lock"))

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=4)


class _FileLock:
    """An exclusive flock of a file for a with-block; a no-op where flock or the file is missing
    (eviction then races harmlessly: unlinking a vanished file is ignored)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            import fcntl

            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
        return False


def _touch(path: str) -> None:
    """Mark an entry used now (LRU order), with the clock's full resolution."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _size_arg(value, default: int, what: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FluxMiniValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value
