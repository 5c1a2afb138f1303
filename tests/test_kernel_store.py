"""The kernel store's background writer: tiles reach the disk whole, several at once, within a
bound on the bytes waiting, and a failed write stops it so that a resumed job recomputes what is
lost."""

import json
import os
import threading

import numpy as np
import pytest
import tensorstore as ts

from ntk_scale.ntk import store as store_module
from ntk_scale.ntk.store import (KernelStore, KernelStoreDamagedError, KernelStoreMismatchError, TileWriter,
                                  agreed_done_tiles)

TILE, BLOCKS = 4, 3


def _store(path) -> KernelStore:
  n = TILE * BLOCKS
  meta = {"shape": [n, n], "tile": TILE, "dtype": "float32"}
  return KernelStore.create_or_resume(str(path), meta, ("shape",), np.arange(n), np.zeros(n, int))


def _tiles(kernel: np.ndarray):
  for i in range(BLOCKS):
    for j in range(i, BLOCKS):
      yield i, j, kernel[i * TILE:(i + 1) * TILE, j * TILE:(j + 1) * TILE]


def _symmetric_kernel() -> np.ndarray:
  a = np.random.RandomState(0).randn(TILE * BLOCKS, 5).astype(np.float32)
  return a @ a.T


class _Failed(Exception):
  pass


def test_written_in_the_background_equals_written_in_place(tmp_path, monkeypatch):
  kernel = _symmetric_kernel()
  direct = _store(tmp_path / "direct")
  for i, j, tile in _tiles(kernel):
    direct.write_tile(i, j, tile, mirror=True)

  background = _store(tmp_path / "background")
  order, threads, pending = [], set(), []
  write, writer = KernelStore.write_tile, None

  def recorded(self, i, j, tile, mirror):
    order.append((i, j))
    threads.add(threading.current_thread().name)
    pending.append(writer._pending)
    write(self, i, j, tile, mirror)

  monkeypatch.setattr(KernelStore, "write_tile", recorded)
  # Room for one tile at a time: each call waits for the previous write.
  with TileWriter(background, mirror=True, max_pending_bytes=TILE * TILE * 4) as writer:
    for i, j, tile in _tiles(kernel):
      writer(i, j, tile)
  assert order == [(i, j) for i, j, _ in _tiles(kernel)]
  assert threads and threading.current_thread().name not in threads
  assert max(pending) == TILE * TILE * 4
  assert background.done_tiles() == direct.done_tiles() == set(order)
  np.testing.assert_array_equal(background.read(), direct.read())
  np.testing.assert_array_equal(background.read(), kernel)


def test_a_failed_write_stops_the_writer_and_is_raised(tmp_path, monkeypatch):
  kernel = _symmetric_kernel()
  store = _store(tmp_path / "k")
  write, calls = KernelStore.write_tile, []

  def fails_third(self, i, j, tile, mirror):
    calls.append((i, j))
    if len(calls) == 3:
      raise _Failed()
    write(self, i, j, tile, mirror)

  monkeypatch.setattr(KernelStore, "write_tile", fails_third)
  given = list(_tiles(kernel))
  with pytest.raises(_Failed):
    with TileWriter(store, mirror=True, concurrency=1) as writer:
      for i, j, tile in given:
        writer(i, j, tile)
      writer.close()
  # One at a time: the tiles before the failure are on disk, the failed one and every later one
  # are not.
  assert store.done_tiles() == {(i, j) for i, j, _ in given[:2]}
  assert calls == [(i, j) for i, j, _ in given[:3]]


def test_tiles_are_written_several_at_once_and_a_failure_keeps_only_whole_tiles(tmp_path,
                                                                                monkeypatch):
  kernel = _symmetric_kernel()
  given = list(_tiles(kernel))
  write = KernelStore.write_tile
  together = threading.Barrier(3, timeout=30)  # one at a time, the first write would wait here
  failing = given[4][:2]

  def three_at_once(self, i, j, tile, mirror):
    if (i, j) in [t[:2] for t in given[:3]]:
      together.wait()
    if (i, j) == failing:
      raise _Failed()
    write(self, i, j, tile, mirror)

  monkeypatch.setattr(KernelStore, "write_tile", three_at_once)
  complete = _store(tmp_path / "complete")
  with TileWriter(complete, mirror=True, concurrency=3) as writer:
    for i, j, tile in given[:4]:
      writer(i, j, tile)
  np.testing.assert_array_equal(complete.read(rows=slice(0, TILE), cols=slice(None)), kernel[:TILE])
  assert complete.done_tiles() == {t[:2] for t in given[:4]}

  together.reset()
  store = _store(tmp_path / "failed")
  with pytest.raises(_Failed):
    with TileWriter(store, mirror=True, concurrency=3) as writer:
      for i, j, tile in given:
        writer(i, j, tile)
  done = store.done_tiles()
  assert failing not in done and {t[:2] for t in given[:3]} <= done  # the three together finished
  for i, j in done:  # every tile marked done holds its values, mirror included
    rows, cols = slice(i * TILE, (i + 1) * TILE), slice(j * TILE, (j + 1) * TILE)
    np.testing.assert_array_equal(store.read(rows, cols), kernel[rows, cols])
    np.testing.assert_array_equal(store.read(cols, rows), kernel[cols, rows])


def test_a_tiles_marker_is_written_only_once_the_tile_and_its_mirror_are_on_disk(tmp_path,
                                                                                monkeypatch):
  """What resume rests on: a kill between the data and the marker recomputes the tile; the other
  order would count as done a tile that holds the fill value."""
  from ntk_scale import files

  kernel = _symmetric_kernel()
  store = _store(tmp_path / "kernel")
  write, seen = files.write_atomic, []

  def checked(path, *args, **kwargs):
    if "/tiles/" in path:  # a marker: the tiles written so far must be on disk, both halves
      on_disk = KernelStore.open(store.directory)  # a chunk not on disk raises
      block = lambda i, j: on_disk.read(slice(i * TILE, (i + 1) * TILE), slice(j * TILE, (j + 1) * TILE))
      seen.append(all(np.array_equal(block(i, j), t) and np.array_equal(block(j, i), t.T)
                      for i, j, t in list(_tiles(kernel))[:len(seen) + 1]))
    return write(path, *args, **kwargs)

  monkeypatch.setattr(files, "write_atomic", checked)
  for i, j, tile in _tiles(kernel):
    store.write_tile(i, j, tile, mirror=True)
  assert seen == [True] * len(list(_tiles(kernel)))


def test_a_mismatch_names_the_differing_fields_and_the_callers_remedy(tmp_path):
  """The default advice names config.kernel.name, which names the kernel job's stores; a store
  named otherwise (the analytic kernels, named by a digest of their fields) passes its own."""
  _store(tmp_path)
  n = TILE * BLOCKS
  other = {"shape": [n, n + 1], "tile": TILE, "dtype": "float32"}
  with pytest.raises(KernelStoreMismatchError, match=r"shape: \[12, 12\] -> \[12, 13\]\nChoose another "
                     r"config.kernel.name, or delete the directory to recompute.$"):
    KernelStore.create_or_resume(str(tmp_path), other, ("shape",), np.arange(n), np.zeros(n, int))
  with pytest.raises(KernelStoreMismatchError, match=r"-> \[12, 13\]\nDelete it.$"):
    KernelStore.create_or_resume(str(tmp_path), other, ("shape",), np.arange(n), np.zeros(n, int),
                                 remedy="Delete it.")


def test_a_lost_chunk_is_an_error_when_read_and_its_tile_is_computed_again(tmp_path):
  """A chunk of a finished tile deleted (or lost by a file system) read as zeros: a wrong spectrum
  with no word. Now a read names it, and the store forgets the tile so that a kernel job computes
  it again; an all-zero tile is stored like any other, so it is never taken for a lost one."""
  kernel = _symmetric_kernel()
  kernel[:TILE, 2 * TILE:] = kernel[2 * TILE:, :TILE] = 0  # tile 0-2 and its mirror: zeros
  store = _store(tmp_path / "kernel")
  for i, j, tile in _tiles(kernel):
    store.write_tile(i, j, tile, mirror=True)
  store.update_meta(complete=True)
  assert store.stored_chunks() == {(i, j) for i in range(BLOCKS) for j in range(BLOCKS)}
  np.testing.assert_array_equal(store.read(), kernel)
  assert store.drop_tiles_without_chunks(mirror=True) == []
  os.remove(tmp_path / "kernel" / "kernel.zarr" / "c" / "2" / "1")  # the mirror of tile 1-2
  with pytest.raises(KernelStoreDamagedError, match=r"kernel .*kernel: a chunk of kernel.zarr is "
                                                    r"missing .*c/2/1.*Rerun the kernel job"):
    KernelStore.open(store.directory).read()
  np.testing.assert_array_equal(store.read(slice(0, TILE)), kernel[:TILE])  # other rows still read
  assert store.drop_tiles_without_chunks(mirror=True) == [(1, 2)]
  assert (1, 2) not in store.done_tiles() and len(store.done_tiles()) == 5
  assert KernelStore.open(store.directory).meta["complete"] is False
  store.write_tile(1, 2, kernel[TILE:2 * TILE, 2 * TILE:], mirror=True)
  np.testing.assert_array_equal(store.read(), kernel)


@pytest.mark.parametrize("damage", ["one bit flipped", "cut short"])
def test_a_chunk_damaged_after_it_was_written_is_an_error_when_read_and_computed_again(tmp_path,
                                                                                        damage):
  """Each chunk carries its CRC32C: without it a chunk whose bytes a disk or copy changed read back
  as other numbers with no word. The read names the chunk; deleted, its tile is computed again."""
  kernel = _symmetric_kernel()
  store = _store(tmp_path / "kernel")
  for i, j, tile in _tiles(kernel):
    store.write_tile(i, j, tile, mirror=True)
  chunk = tmp_path / "kernel" / "kernel.zarr" / "c" / "2" / "0"  # the mirror of tile 0-2
  data = bytearray(chunk.read_bytes())
  assert len(data) == TILE * TILE * 4 + 4  # its floats, then their checksum
  if damage == "one bit flipped":
    data[5] ^= 1
  else:
    del data[-10:]
  chunk.write_bytes(bytes(data))
  with pytest.raises(KernelStoreDamagedError, match=r"kernel .*kernel: a chunk of kernel.zarr was "
                                                    r"changed or cut short .*c/2/0.*Delete that chunk"):
    KernelStore.open(store.directory).read()
  np.testing.assert_array_equal(store.read(slice(0, 2 * TILE)), kernel[:2 * TILE])  # the others read
  chunk.unlink()  # as the error advises: the kernel job then computes tile 0-2 again
  assert store.drop_tiles_without_chunks(mirror=True) == [(0, 2)]
  store.write_tile(0, 2, kernel[:TILE, 2 * TILE:], mirror=True)
  np.testing.assert_array_equal(store.read(), kernel)


def test_a_kernel_stored_without_checksums_is_still_read_and_resumed(tmp_path):
  """Stores made before chunks carried a CRC32C: opened with the codecs their zarr.json names."""
  n = TILE * BLOCKS
  directory = tmp_path / "kernel"
  ts.open({**store_module._spec(str(directory)), "metadata": {"codecs": [{"name": "bytes"}]}},
          create=True, dtype="float32", shape=[n, n],
          chunk_layout=ts.ChunkLayout(chunk_shape=[TILE, TILE])).result()
  (directory / "tiles").mkdir()
  for name, array in (("indices.npy", np.arange(n)), ("labels.npy", np.zeros(n, int))):
    np.save(directory / name, array)
  (directory / "kernel.json").write_text(json.dumps({"shape": [n, n], "tile": TILE, "dtype": "float32"}))
  kernel = _symmetric_kernel()
  store = _store(directory)  # resumed, not created again
  for i, j, tile in _tiles(kernel):
    store.write_tile(i, j, tile, mirror=True)
  assert (directory / "kernel.zarr" / "c" / "0" / "1").stat().st_size == TILE * TILE * 4
  np.testing.assert_array_equal(KernelStore.open(str(directory)).read(), kernel)


def test_a_tile_of_nan_is_refused_not_stored(tmp_path):
  store = _store(tmp_path / "kernel")
  tile = np.ones((TILE, TILE), np.float32)
  tile[1, 2] = np.nan
  with pytest.raises(FloatingPointError, match=r"tile 0-1 holds NaN or infinite entries \(not stored\)"):
    store.write_tile(0, 1, tile, mirror=True)
  assert store.done_tiles() == set() and store.stored_chunks() == set()


def test_a_float64_kernel_is_stored_and_read_back_in_float64(tmp_path):
  """The array takes the dtype of the kernel's meta: stored as float32, a float64 kernel lost its
  last 29 bits (1 + 1e-12 read back as 1.0) with no word."""
  n = TILE * BLOCKS
  meta = {"shape": [n, n], "tile": TILE, "dtype": "float64"}
  store = KernelStore.create_or_resume(str(tmp_path / "kernel"), meta, ("shape",), np.arange(n),
                                       np.zeros(n, int))
  tile = np.full((TILE, TILE), 1 + 1e-12)
  tile[0, 1] = np.pi
  store.write_tile(0, 1, tile, mirror=True)
  for kernel in (store, KernelStore.open(store.directory)):
    for block in (kernel.read(slice(0, TILE), slice(TILE, 2 * TILE)),
                  kernel.read(slice(TILE, 2 * TILE), slice(0, TILE)).T):
      assert block.dtype == np.float64
      np.testing.assert_array_equal(block, tile)


def test_tiles_listed_as_done_leave_out_those_whose_chunk_is_gone(tmp_path):
  """An unfinished kernel (no "complete" to clear) whose tile 0-2 lost its chunk: the tiles a job
  resumes from are listed without it, so it is computed again instead of read as missing."""
  kernel = _symmetric_kernel()
  store = _store(tmp_path / "kernel")
  for i, j, tile in _tiles(kernel):
    store.write_tile(i, j, tile, mirror=True)
  os.remove(tmp_path / "kernel" / "kernel.zarr" / "c" / "0" / "2")
  tiles = [(i, j) for i, j, _ in _tiles(kernel)]
  assert agreed_done_tiles(store, tiles, mirror=True) == set(tiles) - {(0, 2)}


def test_a_cross_kernels_chunks_are_known_by_row_and_column(tmp_path):
  """A cross kernel [8, 12] stores each tile once (no mirror): its chunks are named (row, column)."""
  meta = {"shape": [2 * TILE, 3 * TILE], "tile": TILE, "dtype": "float32"}
  store = KernelStore.create_or_resume(str(tmp_path / "cross"), meta, ("shape",), np.arange(2 * TILE),
                                       np.zeros(2 * TILE, int))
  tile = np.arange(TILE * TILE, dtype=np.float32).reshape(TILE, TILE)
  store.write_tile(0, 2, tile, mirror=False)
  store.write_tile(1, 0, tile + 1, mirror=False)
  assert store.stored_chunks() == {(0, 2), (1, 0)}
  assert store.drop_tiles_without_chunks(mirror=False) == []
  os.remove(tmp_path / "cross" / "kernel.zarr" / "c" / "0" / "2")
  assert store.drop_tiles_without_chunks(mirror=False) == [(0, 2)]
  assert store.done_tiles() == {(1, 0)}


def test_a_tile_larger_than_the_bound_on_waiting_bytes_is_written_alone(tmp_path):
  """MAX_PENDING_BYTES bounds the tiles waiting; a tile larger than the bound still goes, alone
  (it waited forever)."""
  kernel = _symmetric_kernel()
  store, finished = _store(tmp_path / "kernel"), threading.Event()

  def write_every_tile():
    with TileWriter(store, mirror=True, max_pending_bytes=1) as writer:
      for i, j, tile in _tiles(kernel):
        writer(i, j, tile)
    finished.set()

  threading.Thread(target=write_every_tile, daemon=True).start()
  assert finished.wait(timeout=20), "the writer waits for room that one tile never has"
  np.testing.assert_array_equal(store.read(), kernel)


def test_the_identity_digest_follows_what_the_kernel_is_of_not_how_it_was_computed(tmp_path):
  store = _store(tmp_path / "kernel")
  what = {"source": {"epoch": 1.0}, "split": "train", "logits": "trace", "dtype": "float32",
          "precision": "highest", "data": "digits"}
  store.update_meta(**what)
  digest = store.identity_digest()
  store.update_meta(tile=2 * TILE, method="ntvp", seconds=3.0)
  assert store.identity_digest() == digest
  for field, other in (("source", {"epoch": 2.0}), ("split", "test"), ("logits", "class 1"),
                       ("dtype", "float64"), ("precision", "high"), ("data", "cifar10")):
    store.update_meta(**{**what, field: other})
    assert store.identity_digest() != digest, field
