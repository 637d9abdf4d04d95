"""Who may talk to the server: allowed Host names, the access token, same-site writes.

`AccessGuard` is an ASGI middleware in front of every route, checking in this order:

1. Host: the `Host` header must name an allowed host (loopback names by default, more with
   `--allow-host`). A web page that rebinds its own DNS name to 127.0.0.1 sends its own name here,
   so it is refused (DNS rebinding).
2. Token (when the policy has one; `duomodal serve` makes one when it listens beyond loopback):
   sent as `Authorization: Bearer TOKEN`, or as the cookie that `GET /?token=TOKEN` sets (the URL
   the server prints at start, as Jupyter does). Compared in constant time.
3. State-changing methods (POST, PUT, PATCH, DELETE) must come from this site: a `Sec-Fetch-Site`
   other than same-origin/none, or an `Origin` whose host is not the request's, is refused; their
   body must be one of the documented content types (JSON, or multipart for uploads), so that a
   foreign page's "simple" cross-site form or text POST never reaches a handler.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
TOKEN_COOKIE = "duomodal_token"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BODY_TYPES = frozenset({"application/json", "multipart/form-data"})
SAME_SITE_FETCH = frozenset({"same-origin", "none"})


def is_loopback(host: str) -> bool:
    """Whether listening on `host` reaches only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def host_name(value: str) -> str:
    """The host of a Host header or URL authority, lower-case, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class AccessPolicy:
    allowed_hosts: frozenset[str] = field(default_factory=lambda: frozenset(LOOPBACK_HOSTS))
    token: str | None = None  # None: no token asked (loopback only)

    @classmethod
    def make(cls, extra_hosts: Iterable[str] = (), token: str | None = None) -> AccessPolicy:
        """Loopback names plus `extra_hosts` ("photos.lan", "192.168.1.5"; "*" allows any)."""
        hosts = set(LOOPBACK_HOSTS)
        for host in extra_hosts:
            name = host_name(host)
            if not name or any(c in host for c in "/ @"):
                raise ValueError(f"allowed host {host!r} is not a host name or address; give e.g. photos.lan")
            hosts.add(name)
        if token is not None and len(token) < 8:
            raise ValueError("the access token must be at least 8 characters long")
        return cls(frozenset(hosts), token)

    def allows_host(self, name: str) -> bool:
        return "*" in self.allowed_hosts or name in self.allowed_hosts or name.endswith(".localhost")


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class AccessGuard:
    def __init__(self, app: ASGIApp, policy: AccessPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        response = self._check(scope, headers)
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    def _check(self, scope: Scope, headers: Headers) -> JSONResponse | RedirectResponse | None:
        host = headers.get("host", "")
        name = host_name(host)
        if not self.policy.allows_host(name):
            return _refuse(
                400,
                f"Host {host!r} is not one this server answers to; open it by an allowed name "
                "(localhost by default) or start it with --allow-host NAME",
            )
        if self.policy.token is not None:
            answer = self._check_token(scope, headers, self.policy.token)
            if answer is not None:
                return answer
        if scope["method"] in STATE_CHANGING:
            return self._check_same_site(scope, headers, host)
        return None

    def _check_token(self, scope: Scope, headers: Headers, token: str) -> JSONResponse | RedirectResponse | None:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        offered = query.get("token", [None])[0]
        if offered is not None and scope["method"] == "GET" and scope["path"] == "/":
            if not hmac.compare_digest(offered.encode(), token.encode()):
                return _refuse(401, "the token in the URL is not this server's; use the URL it printed at start")
            # One-time URL: trade the token for a cookie and drop it from the address bar.
            redirect = RedirectResponse("/", status_code=303)
            redirect.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
            return redirect
        authorization = headers.get("authorization", "")
        sent = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        if sent is None:
            sent = _cookie(headers.get("cookie", ""), TOKEN_COOKIE)
        if sent is not None and hmac.compare_digest(sent.encode(), token.encode()):
            return None
        return _refuse(
            401,
            "this server needs its access token: open the URL it printed at start (/?token=...) "
            "or send the header Authorization: Bearer TOKEN",
        )

    def _check_same_site(self, scope: Scope, headers: Headers, host: str) -> JSONResponse | None:
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in SAME_SITE_FETCH:
            return _refuse(403, f"cross-site request refused (Sec-Fetch-Site: {fetch_site}); use the page itself")
        origin = headers.get("origin")
        if origin is not None:
            authority = urllib.parse.urlsplit(origin).netloc.lower()
            if origin == "null" or authority != host.strip().lower():
                return _refuse(403, f"cross-site request refused (Origin {origin} is not this server)")
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if has_body and media_type not in BODY_TYPES:
            return _refuse(
                415,
                f"content type {media_type or 'none'!r} is not accepted; send application/json, "
                "or multipart/form-data for uploads",
            )
        return None


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
