"""No credentials in outputs or logs: URL userinfo and signed-URL parameters are redacted."""

import base64
import contextlib
import functools
import http.server
import threading

import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import features
from soundshard.schemas.records import DeadLetter, SourceItem
from soundshard.schemas.uris import redact

from ..emulators import _ThreadingServer
from ..helpers import tone, write_audio

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("https://ann:pw@host/a.wav", "https://host/a.wav"),
        ("tar://n/a.wav::http://u:p@h:8080/x.tar", "tar://n/a.wav::http://h:8080/x.tar"),
        (
            "https://h/a.wav?X-Goog-Signature=abc&X-Goog-Date=2026",
            "https://h/a.wav?X-Goog-Signature=REDACTED&X-Goog-Date=2026",
        ),
        ("https://h/a.wav?se=1&sig=k%2Fz&sp=r", "https://h/a.wav?se=1&sig=REDACTED&sp=r"),
        ("error reading http://u@h/a.wav: 404", "error reading http://h/a.wav: 404"),
        ("/data/a@b.wav", "/data/a@b.wav"),
        ("gs://bucket/x@y/a.wav", "gs://bucket/x@y/a.wav"),
    ],
)
def test_redact(text, want):
    assert redact(text) == want


def test_records_keep_no_credentials():
    item = SourceItem(f"https://ann:{SECRET}@h/a.wav?token={SECRET}", "a")
    assert SECRET not in item.public_uri and SECRET in item.uri  # the reader still has them
    dead = DeadLetter(item.uri, "a", "decode", "decode_error", "E", f"cannot read {item.uri}")
    assert SECRET not in dead.source_uri and SECRET not in dead.message


class _AuthHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder to ``ann:<SECRET>`` only (HTTP basic auth)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        if (
            self.headers.get("Authorization")
            != "Basic " + base64.b64encode(f"ann:{SECRET}".encode()).decode()
        ):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="x"')
            self.end_headers()
            return
        self.path = self.path.split("?", 1)[0]
        super().do_GET()

    do_HEAD = do_GET  # noqa: N815 - http.server's name

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def auth_server(folder):
    server = _ThreadingServer(("127.0.0.1", 0), functools.partial(_AuthHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_in_input_urls_reach_no_output(tmp_path, capsys):
    write_audio(tmp_path / "srv" / "a.wav", tone(duration_s=2.0), 22050)
    out = tmp_path / "out"
    with auth_server(tmp_path / "srv") as port:
        url = f"http://ann:{SECRET}@127.0.0.1:{port}/a.wav?X-Amz-Signature={SECRET}"
        argv = ["--input", url, "--output", str(out), "--incremental", "--run_date", "2026-11-24"]
        assert features.run([*argv, "--verbose"]) == 0
        missing = ["--input", url.replace("a.wav", "gone.wav"), "--output", str(tmp_path / "out2")]
        assert features.run(missing) == 2  # no such input: a config error, quoted without secrets
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    table = pq.read_table(out / "parquet").to_pydict()
    assert len(table["source_uri"]) == 4  # read with the credentials: 2 s, 4 windows
    assert set(table["source_uri"]) == {f"http://127.0.0.1:{port}/a.wav?X-Amz-Signature=REDACTED"}
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
