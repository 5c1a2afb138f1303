"""A Google Cloud Storage bucket on 127.0.0.1 for tests of gs:// workdirs: gcp-storage-emulator
(the GCS JSON API, objects in memory), reached by tensorstore (TENSORSTORE_GCS_HTTP_URL) and by
etils.epath through gcsfs (STORAGE_EMULATOR_HOST). In production epath reaches gs:// through
TensorFlow's GFile, whose endpoint cannot be redirected; here epath is made to pick gcsfs, its
other gs:// backend.

Two of the emulator's gaps are mended here (`_mended`), each of which broke what real GCS
does: listings ignored `startOffset`/`endOffset`, so tensorstore's delete of one key range (a new
kernel store's `delete_existing`) deleted every object of the bucket, other workdirs included; and
downloads sent no `x-goog-generation`, so tensorstore read generation 0 and refused OCDBT's
conditional write of its manifest (Orbax's checkpoints). The emulator still accepts every
conditional write: races between writers are not exercised. TensorBoard's event files go through
TensorFlow's GFile, whose gs:// endpoint cannot be redirected: tests log to the bucket without
them (`no_event_files`).
"""

import contextlib
import http.server
import json
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


def _bounded_listing(ls):
  def handler(request, response, storage, *args, **kwargs):
    ls(request, response, storage, *args, **kwargs)
    start = request.query.get("startOffset", [""])[0]
    end = request.query.get("endOffset", [None])[0]
    if (start or end) and response._content:  # pylint: disable=protected-access
      listing = json.loads(response._content)  # pylint: disable=protected-access
      listing["items"] = [item for item in listing.get("items", [])
                          if start <= item["name"] and (end is None or item["name"] < end)]
      response.json(listing)
  return handler


def _with_generation(download):
  def handler(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  (not found: download said so)
      return
    response["x-goog-generation"] = str(found["generation"])
    response["x-goog-metageneration"] = str(found.get("metageneration", 1))
  return handler


@contextlib.contextmanager
def _mended(server_module) -> Iterator[None]:
  """The emulator with its listing and download mended (see the module's docstring): in its
  routes, and where a metadata request with alt=media calls the download itself."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  mended = {objects.ls: _bounded_listing(objects.ls), objects.download: _with_generation(objects.download)}
  routes = tuple((route, {method: mended.get(handler, handler) for method, handler in handlers.items()})
                 for route, handlers in server_module.HANDLERS)
  with mock.patch.object(server_module, "HANDLERS", routes), \
      mock.patch.object(objects, "download", mended[objects.download]):
    yield


@contextlib.contextmanager
def no_event_files() -> Iterator[None]:
  """clu's writers without TensorBoard's event files (which only TensorFlow's GFile writes, and it
  cannot reach the emulator): logging and metrics.jsonl only, as the jobs' other processes."""
  from clu import metric_writers  # pylint: disable=import-outside-toplevel

  create = metric_writers.create_default_writer
  with mock.patch.object(metric_writers, "create_default_writer",
                         lambda logdir, **kwargs: create(logdir, **{**kwargs, "just_logging": True})):
    yield


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
    with mock.patch.dict(os.environ, env), mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
        _mended(server_module):
      gcsfs.GCSFileSystem.clear_instance_cache()  # an instance made before would keep its endpoint
      yield f"gs://{BUCKET}"
  finally:
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()
