"""Object-store emulators and a token endpoint, run as real servers on 127.0.0.1 for the tests.

- GCS: ``gcp-storage-emulator`` (in memory), reached by gcsfs and by Beam's GCS filesystem
  through ``STORAGE_EMULATOR_HOST``.
- OAuth token endpoint: a tiny HTTP server that answers token grants, so the standard credential
  chain (``google.auth.default()`` with a service-account file of a throwaway key) works offline;
  no credential ever leaves the machine.
- S3: ``moto`` in server mode.

Each server runs in its own process group (or thread) on a free port and is stopped at the end.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@contextlib.contextmanager
def server_process(command: list[str], port: int, log: Path) -> Iterator[None]:
    """Runs ``command`` in a new process group until the block ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def token_server() -> Iterator[str]:
    """An OAuth token endpoint on 127.0.0.1; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()


def _service_account(token_uri: str) -> dict:
    """A service-account key file for a throwaway RSA key, whose token endpoint is ``token_uri``.

    (Authorized-user files always refresh against Google's endpoint; service-account files honour
    their ``token_uri``, so the standard credential chain can run offline.)
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "soundshard-test",
        "private_key_id": "test-key",
        "private_key": pem,
        "client_email": "tester@soundshard-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }


def _bin(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


@contextlib.contextmanager
def gcs_emulator(workdir: Path) -> Iterator[dict[str, str]]:
    """Starts the GCS emulator and a token endpoint; yields the environment that points at them."""
    port = free_port()
    with token_server() as token_uri:
        credentials = workdir / "service_account.json"
        credentials.write_text(json.dumps(_service_account(token_uri)))
        command = [_bin("gcp-storage-emulator"), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"]
        with server_process(command, port, workdir / "gcs-emulator.log"):
            yield {
                "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
                "GOOGLE_CLOUD_PROJECT": "soundshard-test",
                "NO_GCE_CHECK": "true",
                "GCE_METADATA_HOST": "127.0.0.1:1",
                "GCE_METADATA_IP": "127.0.0.1:1",
            }


@contextlib.contextmanager
def s3_emulator(workdir: Path) -> Iterator[dict[str, str]]:
    """Starts moto's S3 server; yields the environment (endpoint and test keys) for s3fs/boto3."""
    port = free_port()
    command = [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with server_process(command, port, workdir / "s3-emulator.log"):
        yield {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            # Beam's S3 multipart upload lists parts without the checksums that boto3 adds by
            # default since 1.36; compute checksums only where the service requires them.
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }
