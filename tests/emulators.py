"""Object-store emulators and a token endpoint, run as real servers on 127.0.0.1 for the tests.

- GCS: ``gcp-storage-emulator`` (in memory), reached by gcsfs and by Beam's GCS filesystem
  through ``STORAGE_EMULATOR_HOST``.
- OAuth token endpoint: a tiny HTTP server that answers token grants, so the standard credential
  chain (``google.auth.default()`` with a service-account file of a throwaway key) works offline;
  no credential ever leaves the machine.
- S3: ``moto`` in server mode.
- GCS preconditions: the emulator is started through this file, which makes it refuse a
  create-only upload (``ifGenerationMatch=0``) of an existing object with 412, as GCS does.
- A fault proxy: an HTTP proxy in front of an emulator that answers chosen requests with errors,
  resets their connections or stalls them, by deterministic rules (``FaultProxy``, ``Fault``).

Each server runs in its own process group (or thread) on a free port and is stopped at the end.
Every one listens with a backlog of ``LISTEN_BACKLOG`` connections: ``http.server``'s default of 5
(which ``gcp-storage-emulator`` keeps, answering one HTTP/1.0 request per connection) drops the
connection attempts of more than a few concurrent clients, and each dropped SYN costs the client a
1 s retransmission, a stall no real object store causes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

#: Pending connections each server started here accepts (``http.server``'s default is 5).
LISTEN_BACKLOG = 128


class _ThreadingServer(http.server.ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True


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
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """Stops a process started with ``start_new_session`` and everything it started (SIGTERM,
    then SIGKILL after 10 s)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
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
    server = _ThreadingServer(("127.0.0.1", 0), _TokenHandler)
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
        # Run through this file (see the end): the emulator with a listen backlog of LISTEN_BACKLOG.
        emulator = [sys.executable, str(Path(__file__).resolve()), "gcp-storage-emulator"]
        command = emulator + ["start", "--host=127.0.0.1", f"--port={port}", "--in-memory"]
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


@dataclasses.dataclass
class Fault:
    """A rule of ``FaultProxy``: which requests fail, and how.

    Attributes:
        path_contains: Substrings that must all occur in the request's URL-decoded path and query
            (e.g. ``"/o/in/flaky.wav"`` for an object's metadata and media requests, not listings).
        action: ``"status"``: answer ``status`` with a JSON error body; ``"reset"``: close the
            connection with a TCP reset, no answer; ``"stall"``: answer nothing for ``stall_s``,
            then close.
        times: Fail this many matching requests (``None``: all of them).
        skip: Let this many matching requests through before failing any.
        method: HTTP method to match (``None``: any).
        status: Status of ``"status"`` answers.
        stall_s: How long a ``"stall"`` holds the connection.
        hits: Matching requests seen so far (passed through or failed).
    """

    path_contains: str | tuple[str, ...]
    action: str = "status"
    times: int | None = None
    skip: int = 0
    method: str | None = "GET"
    status: int = 503
    stall_s: float = 60.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        needles = (self.path_contains,) if isinstance(self.path_contains, str) else self.path_contains
        return (self.method is None or method == self.method) and all(n in path for n in needles)

    @property
    def failed(self) -> int:
        """Matching requests this rule failed."""
        done = max(0, self.hits - self.skip)
        return done if self.times is None else min(done, self.times)


_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


class _FaultProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections to a real store

    def handle(self):
        try:
            super().handle()
        except OSError:
            pass  # the client hung up (its timeout, or a request it cancelled)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        import urllib.parse

        proxy: FaultProxy = self.server.proxy
        body = self._read_body()
        fault = proxy.fault_for(self.command, urllib.parse.unquote(self.path))
        if fault is None:
            self._forward(body)
        elif fault.action == "status":
            payload = json.dumps({"error": {"code": fault.status, "message": "injected fault"}}).encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        elif fault.action == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
            self.close_connection = True
        elif fault.action == "stall":
            proxy.stopping.wait(fault.stall_s)
            self.close_connection = True
        else:
            raise ValueError(f"unknown fault action {fault.action!r}")

    def _forward(self, body: bytes) -> None:
        import http.client

        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_HEADERS:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815 - http.server's names

    def log_message(self, *args):
        pass


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an emulator that fails requests by rules.

    Requests that match a ``Fault`` (the first matching rule with failures left) are failed as it
    says; all others are forwarded. Rules can be added and removed while it runs.

    Attributes:
        url: ``http://127.0.0.1:<port>``, to use in place of the emulator's URL.
        faults: The rules, in order.
        requests: ``(method, path, outcome)`` of every request, outcome ``"forwarded"`` or the
            action taken.
        stopping: Set when the proxy stops (ends stalls early).
    """

    def __init__(self, upstream_url: str):
        import urllib.parse

        parsed = urllib.parse.urlsplit(upstream_url)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server = _ThreadingServer(("127.0.0.1", 0), _FaultProxyHandler)
        self._server.proxy = self
        self._server.upstream = (parsed.hostname, parsed.port or 80)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, fault: Fault) -> Fault:
        """Adds a rule; returns it (its ``hits`` and ``failed`` count what it matched)."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def fault_for(self, method: str, path: str) -> Fault | None:
        """The rule that fails this request, if any (counts the hit)."""
        with self._lock:
            chosen = None
            for fault in self.faults:
                if not fault.matches(method, path):
                    continue
                fault.hits += 1
                failing = fault.hits > fault.skip and (
                    fault.times is None or fault.hits - fault.skip <= fault.times
                )
                if failing and chosen is None:
                    chosen = fault
            self.requests.append((method, path, chosen.action if chosen else "forwarded"))
            return chosen

    def start(self) -> None:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def fault_proxy(upstream_url: str) -> Iterator[FaultProxy]:
    """Runs a ``FaultProxy`` in front of ``upstream_url`` until the block ends."""
    proxy = FaultProxy(upstream_url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["gcp-storage-emulator"]:
    # ``python emulators.py gcp-storage-emulator ARGS``: the emulator's own command line, with its
    # (single-threaded) server accepting LISTEN_BACKLOG pending connections instead of 5.
    http.server.HTTPServer.request_queue_size = LISTEN_BACKLOG
    # The emulator ignores ``ifGenerationMatch=0`` (create only if absent), which GCS honours and
    # soundshard's output lock relies on: answer 412 for an existing object, as GCS does.
    from gcp_storage_emulator.handlers import objects

    _insert = objects.insert

    def _insert_if_absent(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch") == ["0"]:
            name = (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("meta") or request.data).get("name")
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
            except Exception:  # noqa: BLE001 - absent: the write goes ahead
                pass
            else:
                response.status = http.HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
        return _insert(request, response, storage, *args, **kwargs)

    objects.insert = _insert_if_absent
    from gcp_storage_emulator.__main__ import main

    main(sys.argv[2:])
