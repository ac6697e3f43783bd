"""Security of the web UI: path traversal, what is never served, authentication on every route, binding."""

from __future__ import annotations

import base64
import http.client
from urllib.parse import urlsplit

import pytest
from serve_helpers import SECRET_MARKER

from pathchat.serve.catalog import UnknownSlideError
from pathchat.serve.settings import ServeSettings, ServeSettingsError


def _raw_get(url: str, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    """Send `path` byte for byte (no client-side normalisation of `..` or percent escapes)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _attempts(served) -> list[str]:
    sid = served.slide_id("CMU-1-Small-Region")
    secret = str(served.secret)
    secret_svs = str(served.secret.with_name("secret.svs"))
    slide_file = str(served.slides_dir / "CMU-1-Small-Region.svs")
    escape = str(served.slides_dir / "escape.svs")
    paths = [
        # deep-zoom routes: traversal in the id
        "/slides/../../../../etc/passwd.dzi",
        "/slides/..%2F..%2F..%2F..%2Fetc%2Fpasswd.dzi",
        "/slides/%2e%2e%2f%2e%2e%2fetc%2fpasswd.dzi",
        "/slides/%252e%252e%252f%252e%252e%252fetc%252fpasswd.dzi",
        "/slides/%2Fetc%2Fpasswd.dzi",
        "/slides//etc/passwd.dzi",
        "/slides/..\\..\\..\\etc\\passwd.dzi",
        "/slides/..%5C..%5Cetc%5Cpasswd.dzi",
        "/slides/" + sid + "%00.dzi",
        "/slides/" + sid + "%00/../../etc/passwd.dzi",
        "/slides/" + slide_file.replace("/", "%2F") + ".dzi",
        "/slides/" + escape.replace("/", "%2F") + ".dzi",
        "/slides/" + "0" * 16 + ".dzi",
        "/slides/" + sid.upper() + ".dzi",
        "/slides/" + sid,
        "/slides/" + sid + ".xml",
        # tile routes: odd levels and coordinates
        f"/slides/{sid}_files/-1/0_0.jpeg",
        f"/slides/{sid}_files/99999/0_0.jpeg",
        f"/slides/{sid}_files/13/0_0.jpeg",
        f"/slides/{sid}_files/12/-1_0.jpeg",
        f"/slides/{sid}_files/12/0_-1.jpeg",
        f"/slides/{sid}_files/12/99999999999999999999_0.jpeg",
        f"/slides/{sid}_files/12/0_0.png",
        f"/slides/{sid}_files/12/0_0.jpeg%00.txt",
        f"/slides/{sid}_files/1e3/0_0.jpeg",
        f"/slides/{sid}_files/12/0x1_0.jpeg",
        f"/slides/{sid}_files/12/..%2F..%2F..%2Fetc%2Fpasswd",
        f"/slides/{sid}_files/../../../etc/passwd",
        f"/slides/{sid}_files/12/0_0.jpeg/../../../../etc/passwd",
        "/slides/..%2Fsecret_files/0/0_0.jpeg",
        # label, macro and metadata have no route
        f"/slides/{sid}/label", f"/slides/{sid}/macro", f"/slides/{sid}_files/label.jpeg",
        f"/slides/{sid}/properties",
        # the app's static folders
        "/viewer-assets/osd/../../../../etc/passwd",
        "/viewer-assets/osd/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/viewer-assets/osd/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/viewer-assets/osd/%252e%252e/%252e%252e/etc/passwd",
        "/viewer-assets/osd/..\\..\\..\\..\\etc\\passwd",
        "/viewer-assets/app/..%2Fsettings.py",
        "/viewer-assets/app/../settings.py",
        "/viewer-assets/app/%2Fetc%2Fpasswd",
        "/viewer-assets/app/viewer.js%00.py",
        # Gradio's file routes
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=" + secret,
        "/gradio_api/file=" + secret_svs,
        "/gradio_api/file=" + slide_file,
        "/gradio_api/file=" + escape,
        "/gradio_api/file=../../../../etc/passwd",
        "/gradio_api/file=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/file=%2Fetc%2Fpasswd",
        "/gradio_api/file=%252Fetc%252Fpasswd",
        "/gradio_api/file=" + str(served.service.reports_dir) + "/../../secret.txt",
        "/gradio_api/file=" + str(served.service.reports_dir) + "/..%2F..%2Fsecret.txt",
        "/gradio_api/file/etc/passwd",
        "/gradio_api/file/..%2F..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/file=http://127.0.0.1:1/",
        "/file=/etc/passwd",
        "/file=" + secret,
        "/gradio_api/static/../../../../etc/passwd",
        "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/upload_progress?upload_id=../../etc/passwd",
        "/favicon.ico/../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%5C..%5C..%5Cetc%5Cpasswd",
    ]
    return paths


def test_fifty_traversal_attempts_read_nothing_and_never_crash(served):
    paths = _attempts(served)
    assert len(paths) >= 50
    with open("/etc/passwd", "rb") as f:
        passwd = f.read()[:64]
    for path in paths:
        status, body = _raw_get(served.url, path)
        assert status < 500, (path, status, body[:200])
        assert SECRET_MARKER.encode() not in body, path
        assert passwd not in body, path
        assert b"root:x:0:0" not in body, path
        if status == 200:  # only the page itself may answer a mangled path, never a file's bytes
            assert body.lstrip().lower().startswith(b"<!doctype html"), (path, body[:80])
    # the server still serves after all of them
    assert _raw_get(served.url, "/viewer-assets/app/viewer.js")[0] == 200


def test_slide_ids_only_name_catalog_slides(served):
    """Open-slide requests with paths or forged ids are refused without touching the file system."""
    from gradio_client import Client

    client = Client(served.url, verbose=False)
    prepared = served.pipeline.prepared
    for forged in ["../../etc/passwd", str(served.slides_dir / "CMU-1-Small-Region.svs"),
                   str(served.slides_dir / "escape.svs"), "0" * 16, "CMU-1-Small-Region", "%2e%2e%2f"]:
        try:
            out = client.predict(forged, api_name="/open_slide")
        except Exception as e:  # noqa: BLE001 - Gradio's dropdown refuses values outside its choices first
            assert "not in the list of choices" in str(e), forged
        else:
            assert out[3] == "That slide is not available." and out[1] == "", forged
        with pytest.raises(UnknownSlideError):  # and behind it, the catalog knows only its own ids
            served.service.open_slide(forged)
    assert served.pipeline.prepared == prepared  # nothing was opened


def test_dzi_carries_no_metadata(served):
    sid = served.slide_id("CMU-1-Small-Region")
    status, body = _raw_get(served.url, f"/slides/{sid}.dzi")
    assert status == 200
    text = body.decode()
    for word in ("Aperio", "AppMag", "ScanScope", "Filename", "label", "macro"):
        assert word not in text


def _all_route_paths(app, sid: str) -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the app and of the Gradio app mounted in it."""
    from starlette.routing import Mount, Route, WebSocketRoute

    out: list[tuple[str, str]] = []

    def concrete(path: str) -> str:
        return (path.replace("{name}", f"{sid}.dzi").replace("{slide_files}", f"{sid}_files")
                .replace("{level}", "12").replace("{tile}", "0_0.jpeg").replace("{path:path}", "x")
                .replace("{path_or_url:path}", "x").replace("{session_hash}", "x").replace("{event_id}", "x")
                .replace("{fn_index}", "0").replace("{api_name}", "ask"))

    def walk(routes, prefix: str) -> None:
        for r in routes:
            if isinstance(r, Mount):
                if r.routes:
                    walk(r.routes, prefix + r.path)
                else:
                    out.append(("GET", prefix + r.path + "/viewer.js"))
            elif hasattr(r, "original_router"):  # FastAPI's included router (Gradio's /gradio_api/... routes)
                walk(r.original_router.routes, prefix + r.include_context.prefix)
            elif isinstance(r, WebSocketRoute):
                continue
            elif isinstance(r, Route):
                method = "GET" if not r.methods or "GET" in r.methods else sorted(r.methods)[0]
                out.append((method, concrete(prefix + r.path)))

    walk(app.routes, "")
    return out


def test_auth_on_every_route(served_auth):
    import re

    sid = served_auth.slide_id("CMU-1-Small-Region")
    routes = _all_route_paths(served_auth.app, sid)
    assert len(routes) > 70  # ours and Gradio's
    user, password = served_auth.auth
    good = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{user}:nope".encode()).decode()}
    for method, path in routes:
        path = re.sub(r"\{[^}]+\}", "x", path)
        for headers in (None, wrong, {"Authorization": "Bearer abc"}, {"Authorization": "Basic %%%"}):
            status, _ = _raw_get(served_auth.url, path, headers, method)
            assert status == 401, (method, path, headers, status)
    # with the credentials: the page, the tiles and the viewer assets
    for path in ("/", f"/slides/{sid}.dzi", f"/slides/{sid}_files/12/0_0.jpeg", "/viewer-assets/app/viewer.js",
                 "/viewer-assets/osd/openseadragon.min.js"):
        assert _raw_get(served_auth.url, path, good)[0] == 200, path


def test_auth_with_gradio_client(served_auth):
    from gradio_client import Client

    user, password = served_auth.auth
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    client = Client(served_auth.url, verbose=False, headers={"Authorization": f"Basic {token}"})
    client.predict(served_auth.slide_id("small"), api_name="/open_slide")
    chat = client.predict("What is it?", [], api_name="/ask")[0]
    assert chat[-1]["content"][0]["text"] == "Answer 1 about 1 tiles."
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types by version
        Client(served_auth.url, verbose=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_non_loopback_needs_auth(host, tmp_path):
    with pytest.raises(ServeSettingsError, match="--host"):
        ServeSettings(host=host, data_dir=tmp_path).check()
    users = tmp_path / "users"
    users.write_text("a:b\n")
    ServeSettings(host=host, data_dir=tmp_path, auth_file=str(users)).check()


def test_share_needs_auth_and_loopback_is_default(tmp_path, monkeypatch):
    monkeypatch.delenv("PATHCHAT_AUTH_FILE", raising=False)
    settings = ServeSettings(data_dir=tmp_path)
    assert settings.host == "127.0.0.1"
    settings.check()
    with pytest.raises(ServeSettingsError, match="--share"):
        ServeSettings(share=True, data_dir=tmp_path).check()
    users = tmp_path / "users"
    users.write_text("a:b\n")
    monkeypatch.setenv("PATHCHAT_AUTH_FILE", str(users))  # an environment variable naming the file counts
    ServeSettings(share=True, host="0.0.0.0", data_dir=tmp_path).check()
    for host in ("127.0.0.1", "127.5.5.5", "::1", "localhost"):
        monkeypatch.delenv("PATHCHAT_AUTH_FILE")
        ServeSettings(host=host, data_dir=tmp_path).check()
        monkeypatch.setenv("PATHCHAT_AUTH_FILE", str(users))


def test_auth_file_errors_name_the_line(tmp_path):
    from pathchat.serve.auth import AuthFileError, load_auth_file

    bad = tmp_path / "users"
    bad.write_text("# comment\nalice:pw\nbob\n")
    with pytest.raises(AuthFileError, match=r"users:3: expected `user:password`"):
        load_auth_file(bad)
    empty = tmp_path / "empty"
    empty.write_text("# nobody\n")
    with pytest.raises(AuthFileError, match="no `user:password` lines"):
        load_auth_file(empty)
    good = tmp_path / "good"
    good.write_text("alice:pw:with:colons\n")
    assert set(load_auth_file(good)) == {"alice"}


def test_cli_refuses_a_public_address_without_auth(capsys, monkeypatch, tmp_path):
    from pathchat.cli import main

    monkeypatch.delenv("PATHCHAT_AUTH_FILE", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pathchat serve: error: --host 0.0.0.0: refusing to listen beyond this machine without authentication" in err
    assert main(["serve", "--share", "--data-dir", str(tmp_path)]) == 1
    assert "--share: refusing a public link without authentication" in capsys.readouterr().err
    assert not (tmp_path / "demo_slides").exists()  # refused before anything was written
