"""``searchlab ui`` behind a proxy: the check that the local MLflow server answers never goes
through ``http_proxy`` (loopback is never proxied), and the server we start, and MLflow's
own client in this process, are told so too (``no_proxy``)."""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from searchlab import tracking


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def proxied(monkeypatch: pytest.MonkeyPatch) -> str:
    """``http_proxy``/``HTTP_PROXY`` at a port nothing listens on, and no ``no_proxy``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(key, closed)
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
    return closed


class _Running:
    returncode = None

    def poll(self) -> None:
        return None


def test_the_proxy_is_really_in_the_way(server: str, proxied: str) -> None:
    """What the checks below get past: urllib's usual opener sends the request to the proxy."""
    with pytest.raises(OSError):
        urllib.request.build_opener().open(server + "/health", timeout=5)  # env read now


def test_the_ui_check_reaches_a_local_server_behind_a_proxy(server: str, proxied: str) -> None:
    said: list[float] = []
    tracking.wait_for_ui(_Running(), server, timeout=20, progress=said.append)
    assert said == []  # it answered at once
    tracking.check_reachable(server)  # an http --tracking-uri on this machine: direct too
    for host in ("localhost", "127.0.0.1", "[::1]", "127.0.0.2"):
        assert tracking.is_loopback(urllib.request.urlparse(f"http://{host}:5000").hostname)
    assert not tracking.is_loopback("mlflow.example.com")


def test_waiting_for_the_ui_says_so(proxied: str) -> None:
    """A server that does not answer yet: progress every ``every`` seconds, then one line."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    said: list[float] = []
    with pytest.raises(tracking.StoreError, match="did not answer"):
        tracking.wait_for_ui(_Running(), url, timeout=2.5, progress=said.append, every=1.0)
    assert said and all(s >= 1.0 for s in said)


def test_the_ui_server_and_mlflow_skip_the_proxy_for_loopback(
    proxied: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("no_proxy", "corp.example.com")
    _, env = tracking.ui_command("sqlite:///x.db", "127.0.0.1", 5000, None)
    for key in ("no_proxy", "NO_PROXY"):
        listed = env[key].split(",")
        assert {"127.0.0.1", "localhost", "::1"} <= set(listed), env[key]
    assert env["no_proxy"].startswith("corp.example.com,")  # the user's entries stay
    assert env["http_proxy"] == proxied  # for everything else, the proxy stays
