"""Placement of parameters over the mesh (ntk_scale/parallel.py), on the 4 emulated devices."""

import jax
import jax.numpy as jnp
import numpy as np

from ntk_scale import parallel


def test_replicate_places_every_leaf_on_every_device_and_keeps_one_already_there():
  """A leaf already replicated over the mesh is taken as it is (a call into device_put per leaf was a
  quarter of a small kernel's host time); one on a single device and a host array are copied to
  every device."""
  mesh = parallel.make_mesh()
  assert mesh.size == 4
  placed = jax.device_put(jnp.arange(6.0).reshape(2, 3), parallel.replicated_sharding(mesh))
  tree = {"placed": placed, "one_device": jnp.ones(3), "host": np.full((2,), 7, np.int32)}
  replicated = parallel.replicate(tree, mesh)
  assert replicated["placed"] is placed
  for name, leaf in replicated.items():
    assert leaf.sharding.is_fully_replicated and leaf.sharding.device_set == set(mesh.devices.flat)
    np.testing.assert_array_equal(leaf, tree[name])
    assert leaf.dtype == tree[name].dtype
