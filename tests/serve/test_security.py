"""Who may use the server (security.py): allowed Host names against DNS rebinding, the access
token (header, or a cookie from the one-time URL), and the refusal of cross-site writes and of
body types a foreign page can send without a preflight."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from duomodal.serve.app import create_app
from duomodal.serve.config import ServeConfig
from duomodal.serve.security import AccessPolicy, host_name, is_loopback

TOKEN = "s3cret-token-for-tests"


def make_client(fake_index, fake_clip, base_url="http://localhost", **policy) -> TestClient:
    app = create_app(fake_index, fake_clip, config=ServeConfig(access=AccessPolicy.make(**policy)))
    return TestClient(app, base_url=base_url, follow_redirects=False)


def test_host_header_must_be_an_allowed_name(fake_index, fake_clip):
    with make_client(fake_index, fake_clip, base_url="http://attacker.example") as client:
        response = client.get("/api/search", params={"q": "red"})
        assert response.status_code == 400
        assert response.json() == {
            "detail": "Host 'attacker.example' is not one this server answers to; open it by an allowed name "
            "(localhost by default) or start it with --allow-host NAME"
        }
        assert response.headers["x-content-type-options"] == "nosniff"  # refusals get the headers too
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "app.localhost"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        assert client.get("/health", headers={"host": "127.0.0.2"}).status_code == 400
    with make_client(fake_index, fake_clip, extra_hosts=["photos.lan"]) as client:
        assert client.get("/health", headers={"host": "photos.lan:8000"}).status_code == 200


def test_host_name_parsing_and_loopback():
    assert host_name("Example.COM:80") == "example.com" and host_name("[::1]:8000") == "::1"
    assert host_name("::1") == "::1" and host_name("127.0.0.1") == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("photos.lan")
    with pytest.raises(ValueError, match=r"^allowed host 'http://x/y' is not a host name or address"):
        AccessPolicy.make(["http://x/y"])
    with pytest.raises(ValueError, match=r"^the access token must be at least 8 characters long$"):
        AccessPolicy.make(token="short")


def test_token_by_header_or_by_the_cookie_of_the_one_time_url(fake_index, fake_clip):
    with make_client(fake_index, fake_clip, token=TOKEN) as client:
        refused = client.get("/api/search", params={"q": "red"})
        assert refused.status_code == 401
        assert refused.json()["detail"].startswith("this server needs its access token: open the URL")
        assert client.get("/", params={}).status_code == 401
        assert client.get("/health", headers={"authorization": "Bearer wrong-token-123"}).status_code == 401
        assert client.get("/health", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get("/", params={"token": "wrong-token-123"}).status_code == 401
        # The URL printed at start: the token becomes a strict, HttpOnly cookie, and leaves the address.
        visit = client.get("/", params={"token": TOKEN})
        assert visit.status_code == 303 and visit.headers["location"] == "/"
        cookie = visit.headers["set-cookie"]
        assert cookie.startswith(f"duomodal_token={TOKEN};") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert client.get("/").status_code == 200  # the client keeps the cookie
        assert client.get("/api/search", params={"q": "red"}).status_code == 200
        assert client.post("/api/search", json={"query": "red"}).status_code == 200


def test_cross_site_writes_are_refused(fake_index, fake_clip):
    with make_client(fake_index, fake_clip) as client:
        body = {"query": "red circle"}
        response = client.post("/api/search", json=body, headers={"origin": "http://attacker.example"})
        assert response.status_code == 403
        assert response.json() == {
            "detail": "cross-site request refused (Origin http://attacker.example is not this server)"
        }
        assert client.post("/api/search", json=body, headers={"origin": "null"}).status_code == 403
        # A page on another port of localhost is another origin too.
        assert client.post("/api/search", json=body, headers={"origin": "http://localhost:9999"}).status_code == 403
        response = client.post("/api/search", json=body, headers={"sec-fetch-site": "cross-site"})
        assert response.status_code == 403
        assert response.json() == {"detail": "cross-site request refused (Sec-Fetch-Site: cross-site); use the page itself"}
        assert client.post("/api/search", json=body, headers={"sec-fetch-site": "same-site"}).status_code == 403
        # What the page itself sends, and what a script or curl sends.
        page = {"origin": "http://localhost", "sec-fetch-site": "same-origin"}
        assert client.post("/api/search", json=body, headers=page).status_code == 200
        assert client.post("/api/search", json=body).status_code == 200
        # Reads stay open to a link from elsewhere (a browser shows, but never lets a page read, them).
        assert client.get("/api/search", params={"q": "red"}, headers={"sec-fetch-site": "cross-site"}).status_code == 200


def test_only_documented_body_types_are_accepted(fake_index, fake_clip, shape_dataset):
    with make_client(fake_index, fake_clip) as client:
        # Bodies a foreign page can send without a preflight: text/plain, a url-encoded form.
        response = client.post("/api/search", content=b'{"query": "red"}', headers={"content-type": "text/plain"})
        assert response.status_code == 415
        assert response.json() == {
            "detail": "content type 'text/plain' is not accepted; send application/json, "
            "or multipart/form-data for uploads"
        }
        assert client.post("/api/search/image", data={"k": "3"}).status_code == 415
        assert client.post("/api/search", content=b"{}", headers={"content-type": ""}).status_code == 415
        upload = (shape_dataset / "red_circle_0.png").read_bytes()
        assert client.post("/api/search/image", files={"file": ("a.png", upload, "image/png")}).status_code == 200
