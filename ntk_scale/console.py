"""What a job prints: its own progress and results, not the INFO chatter of the libraries under it."""

import logging as std_logging
import os

# Set before TensorFlow is first imported (through clu or tfds) to drop its C++ start-up banners.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CHATTY_PACKAGES = ("/orbax/", "/jax/_src/", "/tensorflow_datasets/", "/etils/")


class _DropLibraryInfo(std_logging.Filter):
  """Lets warnings and errors through from everywhere, INFO only from outside `_CHATTY_PACKAGES`."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        p in record.pathname for p in _CHATTY_PACKAGES)


def quiet_library_logs() -> None:
  """Installs the filter on the absl handler (idempotent)."""
  from absl import logging

  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
