"""A kernel on disk: a chunked zarr v3 array written tile by tile, so it can exceed host memory,
be written by many hosts at once, and resume after a kill.

    <directory>/kernel.zarr/        the kernel [N1, N2] or [N1, N2, C, C]; one chunk per tile
    <directory>/kernel.json         what it is: source checkpoint, logits, dtype, tile, method,
                                    the parameters whose rows were factored, ...
    <directory>/indices.npy         dataset indices of the kernel's rows (and labels.npy)
    <directory>/tiles/<i>-<j>       marker of a finished tile (and its mirror), written last

The directory may be local or in a gs:// bucket (files.py). A tile counts as done only once its
marker exists: a job killed while writing a tile recomputes it, and so does a job that finds a
marked tile's chunk gone (`drop_tiles_without_chunks`; read, a missing chunk is an error, never
zeros). Tensorstore writes each chunk
whole (a local file is written then renamed, a cloud object appears when its upload completes);
markers and metadata are written the same way (files.write_atomic). Each chunk carries a CRC32C
of its bytes (zarr v3's crc32c codec), so a chunk changed or cut short after it was written (a
failing disk) is an error when read, naming it, never wrong numbers; stores made before
2026-12-05 have none and are read as they are. Any zarr v3 reader opens kernel.zarr; symmetric
kernels are stored whole (each off-diagonal tile is written with its mirror), so reads need no
special handling.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils

from ntk_scale import files, parallel
from ntk_scale.ntk.tile_math import mirror_tile

ARRAY_DIR, META_FILE, TILES_DIR = "kernel.zarr", "kernel.json", "tiles"
INDICES_FILE, LABELS_FILE = "indices.npy", "labels.npy"
# What a mismatch advises by default: the kernel job's stores are named by config.kernel.name.
RENAME_KERNEL = "Choose another config.kernel.name, or delete the directory to recompute."


class KernelStoreMismatchError(ValueError):
  """The directory holds a different kernel than the one requested."""


class KernelStoreDamagedError(ValueError):
  """A chunk of a finished tile is gone (lost, deleted) or does not read back as written."""


# Each chunk: its float bytes, then their CRC32C (checked on every read).
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
# Tensorstore's errors for a chunk that exists but does not decode: its checksum differs, or it is
# shorter than its shape (a store without checksums).
_UNREADABLE_CHUNK = ("DATA_LOSS", "Not enough data")


def _spec(directory: str) -> dict:
  """The kernel's zarr array. A missing chunk is an error when read, not the fill value (zeros: a
  deleted chunk gave a wrong spectrum without a word), so every chunk is stored, zeros too."""
  return {"driver": "zarr3", "kvstore": files.tensorstore_kvstore(os.path.join(directory, ARRAY_DIR)),
          "fill_missing_data_reads": False, "store_data_equal_to_fill_value": True}


class KernelStore:
  """Opens or creates the kernel at `directory`; see the module docstring for the layout."""

  def __init__(self, directory: str, array: ts.TensorStore, meta: dict[str, Any]):
    self.directory = directory
    self.meta = meta
    self._array = array

  # ---------------------------------------------------------------- create / open
  @classmethod
  def open(cls, directory: str) -> "KernelStore":
    """An existing kernel (complete or not)."""
    path = os.path.join(directory, META_FILE)
    if not files.exists(path):
      raise FileNotFoundError(f"{directory} holds no kernel ({META_FILE} is missing).")
    meta = files.read_json(path)
    return cls(directory, ts.open(_spec(directory), open=True).result(), meta)

  @classmethod
  def create_or_resume(cls, directory: str, meta: dict[str, Any], identity: tuple[str, ...],
                       indices: np.ndarray, labels: np.ndarray, *, create: bool = True,
                       remedy: str = RENAME_KERNEL) -> "KernelStore":
    """Resumes the kernel at `directory` if its `identity` fields equal `meta`'s (else raises a
    KernelStoreMismatchError naming them, and advising `remedy`); otherwise creates it (when
    `create`: one process does, the others call again with create=False after a barrier).

    `meta` needs "shape", "tile" and "dtype"; an existing kernel keeps its own tile size.
    """
    if files.exists(os.path.join(directory, META_FILE)):
      store = cls.open(directory)
      store.check_same(meta, identity, indices, remedy)
      return store
    if not create:
      raise FileNotFoundError(f"{directory} was not created by process 0.")
    shape, tile = list(meta["shape"]), int(meta["tile"])
    chunk = [tile, tile] + shape[2:]
    array = ts.open({**_spec(directory), "metadata": {"codecs": _CODECS}}, create=True,
                    delete_existing=True, dtype=meta["dtype"], shape=shape,
                    chunk_layout=ts.ChunkLayout(chunk_shape=chunk)).result()
    files.make_dirs(os.path.join(directory, TILES_DIR))
    files.save_array(os.path.join(directory, INDICES_FILE), indices)
    files.save_array(os.path.join(directory, LABELS_FILE), labels)
    # The metadata file is written last: it is what marks the directory as a kernel.
    files.write_json(os.path.join(directory, META_FILE), meta, indent=2, sort_keys=True)
    return cls(directory, array, meta)

  def check_same(self, meta: dict[str, Any], identity: tuple[str, ...], indices: np.ndarray,
                 remedy: str = RENAME_KERNEL) -> None:
    """Raises a KernelStoreMismatchError naming each `identity` field of `meta` (and the example
    subset) that differs from this kernel's, then `remedy`: what the caller's stores can do about
    it (the default names the kernel job's field; a store named otherwise passes its own). A job
    checks it before planning or computing."""
    diffs = [f"{k}: {self.meta.get(k)!r} -> {meta.get(k)!r}" for k in identity
             if self.meta.get(k) != meta.get(k)]
    if not np.array_equal(self.indices(), indices):
      diffs.append("indices: the example subset differs")
    if diffs:
      raise KernelStoreMismatchError(
          f"{self.directory} holds a different kernel:\n  " + "\n  ".join(diffs) + "\n" + remedy)

  # ---------------------------------------------------------------- tiles
  @property
  def tile(self) -> int:
    return int(self.meta["tile"])

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.meta["shape"])

  def _marker(self, i: int, j: int) -> str:
    return os.path.join(self.directory, TILES_DIR, f"{i}-{j}")

  def done_tiles(self) -> set[tuple[int, int]]:
    done = set()
    for name in files.list_dir(os.path.join(self.directory, TILES_DIR)):
      i, j = name.split("-")
      done.add((int(i), int(j)))
    return done

  def stored_chunks(self) -> set[tuple[int, int]]:
    """The (row, column) tile of every chunk in kernel.zarr (one listing of its keys, local or in a
    bucket)."""
    # (its directory with a trailing "/": the keys are then relative to it, as "c/0/1")
    kvstore = ts.KvStore.open(files.tensorstore_kvstore(os.path.join(self.directory, ARRAY_DIR, ""))
                              ).result()
    keys = kvstore.list(ts.KvStore.KeyRange(b"c/", b"c0")).result()  # zarr v3 keys: c/<i>/<j>[/0/0]
    return {(int(parts[1]), int(parts[2])) for parts in (key.decode().split("/") for key in keys)}

  def drop_tiles_without_chunks(self, mirror: bool) -> list[tuple[int, int]]:
    """Forgets the finished tiles whose chunk (or, with `mirror`, its mirror's) is not stored, so
    the kernel job computes them again, and returns them; kernel.json no longer says complete
    where one was. Process 0 calls it, before the tiles to compute are listed."""
    stored = self.stored_chunks()
    lost = sorted((i, j) for i, j in self.done_tiles()
                  if (i, j) not in stored or (mirror and (j, i) not in stored))
    if lost:
      logging.warning("kernel %s: %d finished tiles have no stored chunk (deleted or lost): %s; "
                      "computing them again", self.directory, len(lost),
                      ", ".join(f"{i}-{j}" for i, j in lost[:10]) + (" ..." if len(lost) > 10 else ""))
      for i, j in lost:
        files.remove(self._marker(i, j))
      if self.meta.get("complete"):
        self.update_meta(complete=False)
    return lost

  def write_tile(self, i: int, j: int, tile: np.ndarray, mirror: bool) -> None:
    """Writes tile (i, j), its mirror (j, i) when `mirror` and i != j, then its marker; refuses a
    tile with NaN or infinite entries (a checkpoint whose outputs are not finite), naming it."""
    if not np.isfinite(tile).all():
      raise FloatingPointError(
          f"kernel {self.directory}: tile {i}-{j} holds NaN or infinite entries (not stored): the "
          f"checkpoint's outputs or gradients on these examples are not finite.")
    t = self.tile
    rows, cols = slice(i * t, i * t + tile.shape[0]), slice(j * t, j * t + tile.shape[1])
    writes = [self._array[rows, cols].write(tile)]
    if mirror and i != j:
      writes.append(self._array[cols, rows].write(mirror_tile(tile)))
    for w in writes:
      w.result()
    files.write_atomic(self._marker(i, j), lambda f: None)

  # ---------------------------------------------------------------- reading
  def read(self, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """A block of the kernel (the whole kernel by default) as a numpy array; KernelStoreDamagedError
    where a chunk is missing or does not read back as written."""
    try:
      return self._array[rows, cols].read().result()
    except ValueError as error:
      if "NOT_FOUND" in str(error):
        damage, remedy = "is missing", "Rerun"
      elif any(mark in str(error) for mark in _UNREADABLE_CHUNK):
        damage = "was changed or cut short after it was written"
        remedy = "A disk or copy failed. Delete that chunk and rerun"
      else:
        raise
      raise KernelStoreDamagedError(
          f"kernel {self.directory}: a chunk of kernel.zarr {damage} ({error}). {remedy} the kernel "
          f"job (config.job='kernel', the same config): it finds the tiles whose chunks are gone "
          f"and computes them again.") from error

  def indices(self) -> np.ndarray:
    return files.load_array(os.path.join(self.directory, INDICES_FILE))

  def labels(self) -> np.ndarray:
    return files.load_array(os.path.join(self.directory, LABELS_FILE))

  def identity_digest(self) -> str:
    """What this kernel is of, as a short digest: its examples' indices, source checkpoint, split,
    logits, dtype and precision. Results derived from a kernel record it, so a kernel deleted and
    computed again under the same name (another subset_seed, say) is not taken for the old one."""
    fields = {k: self.meta.get(k) for k in ("source", "split", "logits", "dtype", "precision", "data")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(self.indices(), np.int64).tobytes())
    return digest.hexdigest()[:16]

  def update_meta(self, **fields: Any) -> None:
    """Adds `fields` to kernel.json (process 0 only: a single writer)."""
    self.meta.update(fields)
    files.write_json(os.path.join(self.directory, META_FILE), self.meta, indent=2, sort_keys=True)


# kernel.json's seconds are brought up to date at most this often while tiles are computed, so a
# job killed outright (SIGKILL, a lost host) still counts the time it ran, give or take this.
SECONDS_KEPT_EVERY_S = 60.0


class SecondsKept:
  """The seconds a stored kernel has taken over all its attempts (kernel.json's "seconds"), kept
  current while this attempt computes tiles: `tick` after each step writes them at most every
  SECONDS_KEPT_EVERY_S (process 0), so an attempt that never reaches its end still counts."""

  def __init__(self, store: "KernelStore"):
    self.store = store
    self.started = self.kept = time.time()
    self.earlier = store.meta.get("seconds", 0.0)  # of the attempts before this one

  def tick(self) -> None:
    now = time.time()
    if jax.process_index() == 0 and now - self.kept >= SECONDS_KEPT_EVERY_S:
      self.store.update_meta(seconds=self.earlier + now - self.started)
      self.kept = now

  def total(self, seconds: float) -> float:
    """Every attempt's seconds, this one's being `seconds`."""
    return self.earlier + seconds


def open_on_every_process(directory: str, meta: dict[str, Any], identity: tuple[str, ...],
                          indices: np.ndarray, labels: np.ndarray,
                          remedy: str = RENAME_KERNEL) -> KernelStore:
  """`KernelStore.create_or_resume` on every process: process 0 creates (or checks) the store, the
  others open it once it exists."""
  store = None
  if jax.process_index() == 0:
    store = KernelStore.create_or_resume(directory, meta, identity, indices, labels, remedy=remedy)
  parallel.barrier(f"kernel store {directory}")
  if store is None:
    store = KernelStore.create_or_resume(directory, meta, identity, indices, labels, create=False,
                                         remedy=remedy)
  return store


def agreed_done_tiles(store: KernelStore, tiles: list[tuple[int, int]], mirror: bool
                      ) -> set[tuple[int, int]]:
  """The store's finished tiles among `tiles` as process 0 lists them, on every process: every
  process must plan the same steps, and hosts may list a shared directory differently (file-system
  caches). Tiles marked finished whose chunks are gone are not (`drop_tiles_without_chunks`;
  `mirror`: the store's tiles are written with their mirrors)."""
  if jax.process_index() == 0:
    store.drop_tiles_without_chunks(mirror)
  done = store.done_tiles()
  if jax.process_count() == 1:
    return done
  mask = multihost_utils.broadcast_one_to_all(np.array([t in done for t in tiles], np.int32))
  return {t for t, m in zip(tiles, np.asarray(mask)) if m}


# Tiles that may wait for the disk; a single tile larger than this still goes, alone.
MAX_PENDING_BYTES = 2 * 2**30
# Tiles written at once. A bucket answers each object write after tens of milliseconds, and a
# tile takes two round trips (its chunk and mirror together, then its marker): one tile at a time,
# the 50,000-image kernel's 68k tiles of 136 (README) would take hours to store against minutes
# to compute; 64 at once keep up at ~100 ms a round trip. Local disks gain 1.3-1.7x
# (benchmarks/kernel_store.py); the threads wait on I/O, not on the cores.
WRITE_CONCURRENCY = 64


class TileWriter:
  """`store.write_tile` on background threads: the host hands the devices their next step while
  the last step's tiles go to disk (on an accelerator the host is otherwise idle, and a small
  model's tiles are computed faster than they are written). At most MAX_PENDING_BYTES of tiles
  wait, so a kernel larger than host memory stays so. Tiles start in the order given, up to
  `concurrency` at a time; the first failed write stops the writer: tiles not yet started are
  dropped (their markers never written, so a resumed job computes them), those being written
  finish, and the error is raised by the next call or by `close`.

      with TileWriter(store, mirror=True) as write:
        run_tiles(..., on_tile=write)
  """

  def __init__(self, store: KernelStore, mirror: bool, max_pending_bytes: int = MAX_PENDING_BYTES,
               concurrency: int = WRITE_CONCURRENCY):
    self._store, self._mirror, self._max_pending = store, mirror, max_pending_bytes
    self._thread = concurrent.futures.ThreadPoolExecutor(concurrency,
                                                         thread_name_prefix="kernel-store")
    self._room = threading.Condition()
    self._pending = self._pending_tiles = 0
    self._error: BaseException | None = None

  def __call__(self, i: int, j: int, tile: np.ndarray) -> None:
    with self._room:
      self._room.wait_for(lambda: self._error is not None or self._pending == 0
                          or self._pending + tile.nbytes <= self._max_pending)
      self._raise()
      self._pending += tile.nbytes
      self._pending_tiles += 1
    self._thread.submit(self._write, i, j, tile)

  def _write(self, i: int, j: int, tile: np.ndarray) -> None:
    try:
      if self._error is None:
        self._store.write_tile(i, j, tile, self._mirror)
    except BaseException as error:  # re-raised on the caller's thread
      with self._room:
        self._error = self._error or error
    finally:
      with self._room:
        self._pending -= tile.nbytes
        self._pending_tiles -= 1
        self._room.notify_all()

  def _raise(self) -> None:
    if self._error is not None:
      raise self._error

  def _drain(self) -> None:
    """Waits for every tile given, saying so when some still wait (a bucket's backlog can hold the
    end of a job for minutes after its last step)."""
    with self._room:
      tiles, waiting = self._pending_tiles, self._pending
    if tiles:
      logging.info("kernel store %s: waiting for %d tiles (%.1f MiB) to be written",
                   self._store.directory, tiles, waiting / 2**20)
    self._thread.shutdown(wait=True)

  def close(self) -> None:
    """Waits for every tile given (or the first failure, then raises it)."""
    self._drain()
    self._raise()

  def __enter__(self) -> "TileWriter":
    return self

  def __exit__(self, kind, value, traceback) -> None:
    self._drain()
    if kind is None:
      self._raise()
