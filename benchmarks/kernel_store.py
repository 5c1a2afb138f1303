"""The kernel store's writer: tiles per second written one at a time against several at once, on
a local disk and in an emulated bucket whose every request takes --latency_ms.

    python benchmarks/kernel_store.py                    # tile 136: the 50,000-image kernel's on one H100
    python benchmarks/kernel_store.py --tile 472 --latency_ms 50

Each row writes --tiles upper-triangle tiles of random float32 (each with its mirror, then its
marker: `KernelStore.write_tile`) through `TileWriter` with the given concurrency, from the first
tile handed over to the last one stored. The bucket is gcp-storage-emulator on 127.0.0.1 (the test
extra; tests/fake_gcs.py) answering each request after --latency_ms, many at once: a real bucket's
round trip for a small object is tens of milliseconds, which one write at a time pays for every
chunk and marker. `speed-up` is against concurrency 1 at the same place.
"""

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from ntk_scale.ntk.store import KernelStore, TileWriter  # noqa: E402


def write_rate(directory: str, tile: int, num_tiles: int, concurrency: int) -> float:
  """Seconds to write `num_tiles` tiles of `tile` x `tile` into a new store at `directory`."""
  blocks = math.ceil((math.sqrt(8 * num_tiles + 1) - 1) / 2)  # blocks * (blocks + 1) / 2 >= tiles
  n = blocks * tile
  meta = {"shape": [n, n], "tile": tile, "dtype": "float32"}
  store = KernelStore.create_or_resume(directory, meta, ("shape",), np.arange(n), np.zeros(n, int))
  tiles = [(i, j) for i in range(blocks) for j in range(i, blocks)][:num_tiles]
  data = np.random.default_rng(0).standard_normal((tile, tile), np.float32)
  start = time.perf_counter()
  with TileWriter(store, mirror=True, concurrency=concurrency) as write:
    for i, j in tiles:
      write(i, j, data)
  seconds = time.perf_counter() - start
  assert store.done_tiles() == set(tiles)
  i, j = [t for t in tiles if t[0] != t[1]][-1]  # its mirror, written with it
  np.testing.assert_array_equal(store.read(slice(j * tile, (j + 1) * tile),
                                           slice(i * tile, (i + 1) * tile)), data.T)
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tile", type=int, default=136)
  parser.add_argument("--tiles", type=int, default=300,
                      help="upper-triangle tiles written in each row of the table")
  parser.add_argument("--concurrency", default="1,4,16")
  parser.add_argument("--latency_ms", type=float, default=30.0, help="the emulated bucket's round trip")
  args = parser.parse_args()
  levels = [int(c) for c in args.concurrency.split(",")]

  places = [("local disk", None)]
  if importlib.util.find_spec("gcp_storage_emulator") and importlib.util.find_spec("gcsfs"):
    places.append((f"bucket {args.latency_ms:g} ms", args.latency_ms / 1e3))
  else:
    print("bucket rows skipped: the test extra (gcp-storage-emulator, gcsfs) is not installed")

  tile_mib = 2 * args.tile ** 2 * 4 / 2**20  # a tile and its mirror
  print(f"{'where':>16} {'tile':>5} {'concurrency':>11} {'tiles':>6} {'seconds':>8} "
        f"{'tiles/s':>8} {'MiB/s':>7} {'speed-up':>8}")
  print("-" * 77)
  for where, latency in places:
    first = None
    for concurrency in levels:
      if latency is None:
        with tempfile.TemporaryDirectory() as directory:
          seconds = write_rate(os.path.join(directory, "k"), args.tile, args.tiles, concurrency)
      else:
        from fake_gcs import fake_bucket  # pylint: disable=import-outside-toplevel
        with fake_bucket(latency_s=latency) as bucket:
          seconds = write_rate(f"{bucket}/k{concurrency}", args.tile, args.tiles, concurrency)
      first = first or seconds
      print(f"{where:>16} {args.tile:>5} {concurrency:>11} {args.tiles:>6} {seconds:>8.2f} "
            f"{args.tiles / seconds:>8.1f} {args.tiles * tile_mib / seconds:>7.1f} "
            f"{first / seconds:>7.1f}x", flush=True)


if __name__ == "__main__":
  main()
