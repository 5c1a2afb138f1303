"""On-device training augmentation, keyed by the step so resumed runs draw the same crops."""

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "crop_flip")


def crop_flip(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop from a zero-padded image and a random horizontal flip (standard CIFAR)."""
  n, h, w, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  images = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def augment(name: str, key: jax.Array, images: jax.Array) -> jax.Array:
  if name == "none":
    return images
  if name == "crop_flip":
    return crop_flip(key, images)
  raise ValueError(f"config.data.augment={name!r}; expected one of {', '.join(AUGMENTATIONS)}.")
