"""A real GCS JSON API for the gs:// tests: gcp-storage-emulator on 127.0.0.1, started and stopped by a fixture.

Everything that reaches gs:// finds it through the environment, in this process
and in the processes the tests start:
  TensorStore (orbax's checkpoints)  TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  gcsfs (etils.epath, TFDS)           STORAGE_EMULATOR_HOST
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs (2025.x on) otherwise first asks
Google's Storage Control API over gRPC whether a bucket is zonal or hierarchical,
a request the emulator does not serve, and each filesystem waits ~60 s for it to
fail; the flag keeps gcsfs's plain GCSFileSystem, which speaks the JSON API only.

Run as a script, this file starts the emulator with two differences from GCS
mended: it serves one request at a time (http.server.HTTPServer), and gcsfs's
reads, which prefetch with concurrent range requests, then wait on each other
for seconds and end up hanging: a ThreadingHTTPServer serves them, as GCS
serves concurrent requests; and its downloads lack the x-goog-generation header
TensorStore needs for OCDBT (`_serve`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def emulator(bucket: str = BUCKET):
    """Serves an empty in-memory bucket on 127.0.0.1 while inside; yields the environment that reaches it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["start", "--host=127.0.0.1", f"--port={port}", "--in-memory", f"--default-bucket={bucket}", "--quiet"]
    with tempfile.TemporaryFile() as log:  # not a pipe: nobody reads it while the emulator runs
        process = subprocess.Popen([sys.executable, __file__, *command], stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"gcp-storage-emulator did not start: {log.read().decode()[-2000:]}")
                time.sleep(0.2)
            yield {
                "STORAGE_EMULATOR_HOST": url,
                "TENSORSTORE_GCS_HTTP_URL": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            }
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.seek(0)
            if errors := log.read().decode(errors="replace"):  # shown with a failing test's output
                print(f"gcp-storage-emulator's errors:\n{errors[-4000:]}", file=sys.stderr)


@pytest.fixture(scope="module")
def gcs_bucket():
    """gs://bucket on the emulator, reachable from this process and from the processes it starts."""
    with emulator() as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield f"gs://{BUCKET}"
    from etils.epath import backend  # the filesystem epath made for the emulator goes with it

    backend.fsspec_backend._get_filesystem.cache_clear()


def _serve(argv: list[str]) -> int:
    """gcp-storage-emulator's `main`, with two differences from GCS mended (this process only)."""
    from http import server

    from gcp_storage_emulator import server as routes
    from gcp_storage_emulator.__main__ import main
    from gcp_storage_emulator.handlers import objects

    class ThreadingServer(server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    server.HTTPServer = ThreadingServer  # what gcp_storage_emulator.server starts

    # GCS sends an object's generation with its data (x-goog-generation). TensorStore takes it from there for
    # the conditional rewrite of an OCDBT manifest (orbax's checkpoints); the emulator leaves it out, and
    # TensorStore then refuses the write ("Malformed StorageGeneration").
    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # not found: the response says so already
            found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = found["generation"]
            response["x-goog-metageneration"] = found["metageneration"]

    objects.download = download_with_generation  # objects.get (the JSON API's alt=media) calls it by name

    # The storage behind the handlers is plain dicts, rebuilt or serialised whole by some operations; served
    # from several threads at once, an upload finished while another request rewrote them could be lost, and
    # the client's retry of its last chunk then found no upload session ("not found"). One handler at a time,
    # as the original server ran them; the connections (reading requests, writing responses) stay concurrent.
    one_at_a_time = threading.RLock()

    def serialised(handler):
        def locked(*args, **kwargs):
            with one_at_a_time:
                return handler(*args, **kwargs)

        return locked

    objects.insert = serialised(objects.insert)  # the router's fallback for uploads POSTed without /upload
    routes.HANDLERS = tuple(
        (regex, {m: serialised(download_with_generation if h is download else h) for m, h in handlers.items()})
        for regex, handlers in routes.HANDLERS
    )
    return main(argv)


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
