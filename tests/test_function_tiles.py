"""A kernel given as a function of two blocks (ntk/function_tiles.py), tile by tile over devices,
against the function evaluated once on the whole sets; and its store: killed, then resumed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ntk_scale import parallel
from ntk_scale.ntk import function_tiles
from ntk_scale.ntk import store as store_module
from ntk_scale.ntk.function_tiles import function_kernel, function_kernel_vjp, kernel_tiles
from ntk_scale.ntk.store import KernelStore

from conftest import Killed, write_tile_killed_after
from test_kernel_regression import all_highest


def rbf(a: jax.Array, b: jax.Array) -> jax.Array:
  """A Gaussian kernel of flattened images: cheap, and every entry depends on both images."""
  a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
  distances = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None] - 2 * a @ b.T
  return jnp.exp(-distances / a.shape[1])


def _images(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(n, 3, 3, 2)).astype(dtype)


def test_tiles_on_four_devices_equal_one_device_and_one_call():
  """Tile 3 of 10 and 7 images: padded edge tiles; symmetric (upper tiles mirrored) and cross."""
  x1, x2 = _images(10), _images(7, seed=1)
  one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  assert len(jax.devices()) == 4
  for second in (None, x2):
    whole = np.asarray(rbf(x1, x1 if second is None else second))
    on_four = function_kernel(rbf, x1, second, tile=3)
    np.testing.assert_allclose(on_four, whole, rtol=1e-6)
    np.testing.assert_array_equal(function_kernel(rbf, x1, second, tile=3, mesh=one), on_four)
  with jax.enable_x64(True):
    x64 = _images(10, dtype=np.float64)
    kernel = function_kernel(rbf, x64, tile=4)
    assert kernel.dtype == np.float64
    np.testing.assert_allclose(kernel, np.asarray(rbf(x64, x64)), rtol=1e-13)
  assert kernel_tiles(10, 10, 3, symmetric=True) == [(i, j) for i in range(4) for j in range(i, 4)]


def test_the_tiles_pull_back_a_cotangent_as_the_gradient_of_the_whole_kernel_does():
  """d/dx sum(C * K(x, x)) for an asymmetric C, tiles of 3 of 10 images (padded edge, diagonal
  tiles through both arguments), float64 against jax.grad of one call, 4 devices and 1."""
  one = Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  with jax.enable_x64(True):
    x = _images(10, dtype=np.float64)
    cotangent = np.random.default_rng(2).normal(size=(10, 10))
    whole = np.asarray(jax.grad(lambda v: jnp.sum(cotangent * rbf(v, v)))(jnp.asarray(x)))
    on_four = function_kernel_vjp(rbf, x, cotangent, tile=3)
    assert on_four.shape == x.shape and on_four.dtype == np.float64
    np.testing.assert_allclose(on_four, whole, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(function_kernel_vjp(rbf, x, cotangent, tile=3, mesh=one), on_four,
                               rtol=1e-13)
    with pytest.raises(ValueError, match="10 x 10"):
      function_kernel_vjp(rbf, x, cotangent[:9], tile=3)


def test_tiles_of_a_kernel_function_are_computed_at_highest_precision(monkeypatch):
  """A kernel function's matmuls that ask for no precision (rbf's a @ b.T) run at HIGHEST in the
  tile loop: a kernel solved for regression coefficients wants float32 products, not TF32 or
  bfloat16 ones. Read from each step's program as it is run (on this CPU it changes nothing)."""
  programs, highest = function_tiles.tile_program, []

  def read(kernel_fn, mesh):
    program = programs(kernel_fn, mesh)
    def run(rows, cols):
      highest.append(all_highest(program, rows, cols))
      return program(rows, cols)
    return run

  monkeypatch.setattr(function_tiles, "tile_program", read)
  x = _images(10)
  assert not all_highest(rbf, x, x)  # outside the loop: the default
  np.testing.assert_allclose(function_kernel(rbf, x, tile=3), np.asarray(rbf(x, x)), rtol=1e-6)
  assert highest == [True] * 3  # 10 tiles on and above the diagonal, 4 devices a step


def test_a_killed_kernel_resumes_from_its_store(tmp_path, monkeypatch):
  x = _images(11)
  meta = {"shape": [11, 11], "tile": 3, "dtype": "float32"}
  create = lambda: KernelStore.create_or_resume(str(tmp_path / "k"), meta, ("shape",), np.arange(11),
                                                np.zeros(11, np.int32))
  write = KernelStore.write_tile
  killed_after_four, written = write_tile_killed_after(4)
  monkeypatch.setattr(KernelStore, "write_tile", killed_after_four)
  monkeypatch.setattr(store_module, "SECONDS_KEPT_EVERY_S", 0.0)  # seconds kept after every step
  with pytest.raises(Killed):
    function_kernel(rbf, x, tile=3, store=create())
  monkeypatch.setattr(KernelStore, "write_tile", write)
  store = create()
  assert len(store.done_tiles()) == 4
  # The killed attempt's seconds were kept as it ran (a job killed outright never reaches its end).
  killed_seconds = store.meta["seconds"]
  assert killed_seconds > 0 and not store.meta.get("complete")
  counted = []
  monkeypatch.setattr(KernelStore, "write_tile",
                      lambda self, i, j, tile, mirror: (counted.append((i, j)), write(self, i, j, tile, mirror)))
  resumed = function_kernel(rbf, x, tile=3, store=store)
  assert len(counted) == 10 - 4 and not set(counted) & set(written)
  np.testing.assert_array_equal(resumed, function_kernel(rbf, x, tile=3))
  assert KernelStore.open(store.directory).meta["seconds"] > killed_seconds  # both attempts'
  with pytest.raises(ValueError, match="holds a kernel of shape .* not 11 x 11 in tiles of 4"):
    function_kernel(rbf, x, tile=4, store=store)


def test_the_tiles_pull_back_at_highest_precision(monkeypatch):
  """The vector-Jacobian products of a kernel function's tiles, whose matmuls ask for no
  precision, run at HIGHEST as its tiles do: dataset optimisation follows this gradient, which
  TF32 or bfloat16 passes would round to 1e-3. Read from each step's program as it is run (on
  this CPU it changes nothing)."""
  programs, highest = function_tiles.tile_vjp_program, []

  def read(kernel_fn, mesh):
    program = programs(kernel_fn, mesh)
    def run(rows, cols, cotangent):
      highest.append(all_highest(program, rows, cols, cotangent))
      return program(rows, cols, cotangent)
    return run

  monkeypatch.setattr(function_tiles, "tile_vjp_program", read)
  x = _images(10)
  cotangent = np.random.default_rng(3).normal(size=(10, 10)).astype(np.float32)
  whole = lambda v: jnp.sum(cotangent * rbf(v, v))
  assert not all_highest(jax.grad(whole), x)  # outside the loop: the default
  np.testing.assert_allclose(function_kernel_vjp(rbf, x, cotangent, tile=3),
                             np.asarray(jax.grad(whole)(jnp.asarray(x))), rtol=1e-4, atol=1e-5)
  assert highest == [True] * 3  # 10 tiles on and above the diagonal, 4 devices a step


def test_a_store_is_refused_for_another_kernel_and_marked_complete_by_a_finished_one(tmp_path):
  """A store made for 11 images in tiles of 3 holds no tile of a kernel of 10 images (or of 11 x
  7) in tiles of 3: refused, not read as theirs. A finished kernel marks its store complete
  (readers such as the spectrum job refuse an unfinished kernel), with the seconds it took."""
  x = _images(11)
  meta = {"shape": [11, 11], "tile": 3, "dtype": "float32"}
  store = KernelStore.create_or_resume(str(tmp_path / "k"), meta, ("shape",), np.arange(11),
                                       np.zeros(11, np.int32))
  with pytest.raises(ValueError, match="holds a kernel of shape .* not 10 x 10 in tiles of 3"):
    function_kernel(rbf, x[:10], tile=3, store=store)
  with pytest.raises(ValueError, match="holds a kernel of shape .* not 11 x 7 in tiles of 3"):
    function_kernel(rbf, x, _images(7, seed=1), tile=3, store=store)
  assert not KernelStore.open(str(tmp_path / "k")).meta.get("complete")
  np.testing.assert_allclose(function_kernel(rbf, x, tile=3, store=store), np.asarray(rbf(x, x)),
                             rtol=1e-6)
  reopened = KernelStore.open(str(tmp_path / "k"))
  assert reopened.meta["complete"] is True and reopened.meta["seconds"] > 0


def test_long_tile_loops_log_their_step_and_the_time_left(caplog):
  from ntk_scale.ntk.engine import StepProgress

  clock = iter([100.0, 160.0, 170.0, 220.0])
  progress = StepProgress(num_steps=10, num_tiles=40, num_devices=4, every_s=30.0,
                          clock=lambda: next(clock))
  with caplog.at_level("INFO"):
    progress.step_done(1)  # 60 s after the start: logged
    progress.step_done(2)  # 10 s after the last line: not
    progress.step_done(4)  # 60 s after it
  assert [r.getMessage() for r in caplog.records] == [
      "kernel step 2/10 (40 tiles on 4 devices), 60.0 s, about 240 s to go",
      "kernel step 5/10 (40 tiles on 4 devices), 120.0 s, about 120 s to go"]
