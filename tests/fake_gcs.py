"""A Google Cloud Storage bucket on 127.0.0.1 for tests of gs:// workdirs: gcp-storage-emulator
(the GCS JSON API, objects in memory), reached by tensorstore (TENSORSTORE_GCS_HTTP_URL) and by
etils.epath through gcsfs (STORAGE_EMULATOR_HOST). In production epath reaches gs:// through
TensorFlow's GFile, whose endpoint cannot be redirected; here epath is made to pick gcsfs, its
other gs:// backend. The emulator does not implement conditional writes (ifGenerationMatch), which
Orbax's OCDBT checkpoints need, so checkpoints cannot be tested against it.
"""

import contextlib
import http.server
import os
import socket
import threading
import time
import types
from typing import Iterator
from unittest import mock

import pytest

BUCKET = "bucket"


def _slow_server(server_module, latency_s: float) -> contextlib.AbstractContextManager:
  """The emulator answering each request after `latency_s`, the waits of many requests at once
  (a bucket's round trip; the emulator itself answers at once, and its storage serves one request
  at a time: it is not thread-safe)."""
  serving = threading.Lock()

  class SlowHandler(server_module.RequestHandler):
    def handle_one_request(self):
      time.sleep(latency_s)
      with serving:
        super().handle_one_request()

  threaded = types.SimpleNamespace(HTTPServer=http.server.ThreadingHTTPServer)
  stack = contextlib.ExitStack()
  stack.enter_context(mock.patch.object(server_module, "RequestHandler", SlowHandler))
  stack.enter_context(mock.patch.object(server_module, "server", threaded))
  return stack


@contextlib.contextmanager
def fake_bucket(latency_s: float = 0.0) -> Iterator[str]:
  """Yields "gs://bucket", served by an emulator for as long as the context lasts; with
  `latency_s`, each request is answered after that long (benchmarks/kernel_store.py)."""
  server_module = pytest.importorskip(
      "gcp_storage_emulator.server", reason="the gcs test extra (gcp-storage-emulator) is not installed")
  pytest.importorskip("gcsfs", reason="the gcs test extra (gcsfs) is not installed")
  import gcsfs  # pylint: disable=import-outside-toplevel
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  with _slow_server(server_module, latency_s) if latency_s else contextlib.nullcontext():
    server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"TENSORSTORE_GCS_HTTP_URL": url, "STORAGE_EMULATOR_HOST": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}
  try:
    with mock.patch.dict(os.environ, env), mock.patch.object(gpath, "_is_tf_installed", lambda: False):
      gcsfs.GCSFileSystem.clear_instance_cache()  # an instance made before would keep its endpoint
      yield f"gs://{BUCKET}"
  finally:
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()
