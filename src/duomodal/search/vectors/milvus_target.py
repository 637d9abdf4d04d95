"""Where a Milvus store lives and how to reach it: the ``--store`` spec, connection settings, connect.

Store specs::

    milvus:PATH.db                                  milvus-lite, a local file (one process at a time)
    milvus://HOST:PORT/COLLECTION                   a Milvus server or cluster, the default database
    milvus://HOST:PORT/DB/COLLECTION                the same, in database DB
    milvus://HOST:PORT/COLLECTION?tls=1&ca=PATH&cert=PATH&key=PATH&server_name=NAME&timeout=S&wait_timeout=S

The query parameters are how to connect, not secrets; they are recorded with the spec. The same
settings come from the environment when the spec does not give them (the spec wins): ``MILVUS_TLS``
(1/0), ``MILVUS_CA_CERT``, ``MILVUS_CLIENT_CERT``, ``MILVUS_CLIENT_KEY``, ``MILVUS_SERVER_NAME``,
``MILVUS_TIMEOUT``, ``MILVUS_WAIT_TIMEOUT``.

Credentials come from ``MILVUS_TOKEN`` (``USER:PASSWORD`` or an API key) or ``MILVUS_USER`` and
``MILVUS_PASSWORD``, or from the spec's ``USER:PASSWORD@`` for the run that was given it. They are
never part of the canonical spec, so they are never written to the index's meta nor shown in a
message; a later run (search, serve, update) takes them from the environment.
"""

from __future__ import annotations

import math
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from duomodal.search.store import IndexStoreError

LITE_COLLECTION = "duomodal_images"
DEFAULT_TIMEOUT = 30.0  # seconds for connecting and for each request to a server
DEFAULT_WAIT_TIMEOUT = 3600.0  # seconds for a flush, a load or an index build to finish
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_SERVER = re.compile(r"milvus://(?:(?P<userinfo>[^@/]*)@)?(?P<host>[^/:@?]+):(?P<port>\d{1,5})/(?P<path>[^?]+)"
                     r"(?:\?(?P<query>.*))?")
_PARAMS = ("tls", "ca", "cert", "key", "server_name", "timeout", "wait_timeout")
_ENV = {"tls": "MILVUS_TLS", "ca": "MILVUS_CA_CERT", "cert": "MILVUS_CLIENT_CERT", "key": "MILVUS_CLIENT_KEY",
        "server_name": "MILVUS_SERVER_NAME", "timeout": "MILVUS_TIMEOUT", "wait_timeout": "MILVUS_WAIT_TIMEOUT"}
# Credentials given in a spec's USER:PASSWORD@, by location, for this process only (never recorded).
_SPEC_CREDENTIALS: dict[str, str] = {}
_CREDENTIALS_LOCK = threading.Lock()


def redact(spec: str) -> str:
    """`spec` with any ``USER:PASSWORD@`` replaced by ``***@``: safe to show."""
    return re.sub(r"^(milvus://)[^@/]*@", r"\1***@", spec)


@dataclass(frozen=True)
class MilvusTarget:
    uri: str  # lite: an absolute .db path; server: http://HOST:PORT
    collection: str
    db: str = ""  # server database; "" = the default one
    tls: bool | None = None  # None: from $MILVUS_TLS (on by itself when a certificate is given)
    ca: str = ""  # PEM of the authority that signed the server's certificate (default: the system's)
    cert: str = ""  # client certificate and its key, for servers that require mutual TLS
    key: str = ""
    server_name: str = ""  # the name the server's certificate holds, when it is not HOST
    timeout: float | None = None  # seconds per request; None: $MILVUS_TIMEOUT or DEFAULT_TIMEOUT
    wait_timeout: float | None = None  # seconds for a flush/load/index build; None: env or default

    @property
    def is_lite(self) -> bool:
        return not self.uri.startswith("http://")

    @property
    def location(self) -> str:
        """What identifies the collection: the spec without connection settings."""
        if self.is_lite:
            return f"milvus:{self.uri}"
        db = f"{self.db}/" if self.db else ""
        return f"milvus://{self.uri.removeprefix('http://')}/{db}{self.collection}"

    @property
    def spec(self) -> str:
        """The canonical store spec, as recorded in the index meta (never with credentials)."""
        given = {name: getattr(self, name) for name in _PARAMS}
        query = {name: _param_text(value) for name, value in given.items() if value not in (None, "")}
        return self.location + (f"?{urllib.parse.urlencode(query, safe='/')}" if query else "")

    @classmethod
    def parse(cls, spec: str) -> MilvusTarget:
        """``milvus:PATH`` (relative paths are resolved now) or ``milvus://HOST:PORT/[DB/]COLLECTION[?...]``.

        Credentials in the spec are kept for this process (see the module docstring), not in the target.
        """
        if spec.startswith("milvus://"):
            return cls._parse_server(spec)
        if spec.startswith("milvus:"):
            path = spec.removeprefix("milvus:")
            if not path.endswith(".db"):
                raise ValueError(f"store {spec!r}: a milvus-lite file name must end in .db, e.g. milvus:./icons.db")
            return cls(str(Path(path).resolve()), LITE_COLLECTION)
        raise ValueError(f"store {redact(spec)!r} is not milvus:PATH.db or milvus://HOST:PORT/COLLECTION")

    @classmethod
    def _parse_server(cls, spec: str) -> MilvusTarget:
        shown = redact(spec)
        match = _SERVER.fullmatch(spec)
        if match is None:
            raise ValueError(f"store {shown!r} is not of the form milvus://HOST:PORT/COLLECTION")
        parts = match["path"].split("/")
        if len(parts) > 2:
            raise ValueError(f"store {shown!r}: give milvus://HOST:PORT/COLLECTION or milvus://HOST:PORT/DB/COLLECTION")
        for name in parts:
            if not _NAME.fullmatch(name):
                what = "database" if len(parts) == 2 and name == parts[0] else "collection"
                raise ValueError(
                    f"Milvus {what} name {name!r} must start with a letter or _ and hold only letters, digits and _"
                )
        db, collection = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
        settings = _query_settings(match["query"] or "", shown)
        target = cls(f"http://{match['host']}:{int(match['port'])}", collection, db, **settings)
        if match["userinfo"] is not None:
            user, _, password = urllib.parse.unquote(match["userinfo"]).partition(":")
            if not user:
                raise ValueError(f"store {shown!r}: credentials before @ must be USER:PASSWORD (or use $MILVUS_TOKEN)")
            with _CREDENTIALS_LOCK:
                _SPEC_CREDENTIALS[target.location] = f"{user}:{password}" if password else user
        return target


def _param_text(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _query_settings(query: str, shown: str) -> dict:
    settings: dict = {}
    for name, values in urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)).items():
        if name not in _PARAMS:
            raise ValueError(f"store {shown!r}: unknown setting {name!r}; the settings are {', '.join(_PARAMS)}")
        settings[name] = _setting(name, values[-1], f"store {shown!r}")
    return settings


def _setting(name: str, text: str, where: str):
    """The value of setting `name` given as `text` (in a spec or an environment variable)."""
    if name == "tls":
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{where}: tls must be 1 or 0, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if name in ("timeout", "wait_timeout"):
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"{where}: {name} must be a number of seconds > 0, got {text!r}")
        return seconds
    if name in ("ca", "cert", "key"):
        return str(Path(text).expanduser().resolve()) if text else ""
    return text


@dataclass(frozen=True)
class ConnectionSettings:
    """A target's settings resolved against the environment (what `connect` uses)."""

    tls: bool
    ca: str
    cert: str
    key: str
    server_name: str
    timeout: float
    wait_timeout: float

    @classmethod
    def resolve(cls, target: MilvusTarget) -> ConnectionSettings:
        values = {}
        for name in _PARAMS:
            value = getattr(target, name)
            text = os.environ.get(_ENV[name], "")
            if value in (None, "") and text:
                value = _setting(name, text, f"${_ENV[name]}")
            values[name] = value
        if bool(values["cert"]) != bool(values["key"]):
            raise IndexStoreError(f"{target.spec}: mutual TLS needs both a client cert and its key "
                                  "(cert= and key=, or $MILVUS_CLIENT_CERT and $MILVUS_CLIENT_KEY)")
        if values["cert"] and not values["ca"]:
            raise IndexStoreError(f"{target.spec}: mutual TLS needs the CA certificate too (ca= or $MILVUS_CA_CERT)")
        tls = values["tls"] if values["tls"] is not None else bool(values["ca"] or values["cert"])
        return cls(tls, values["ca"], values["cert"], values["key"], values["server_name"],
                   values["timeout"] or DEFAULT_TIMEOUT, values["wait_timeout"] or DEFAULT_WAIT_TIMEOUT)


def credentials(target: MilvusTarget) -> str:
    """The token for `target`: from its spec in this process, else $MILVUS_TOKEN, else
    $MILVUS_USER:$MILVUS_PASSWORD, else "" (no authentication)."""
    with _CREDENTIALS_LOCK:
        given = _SPEC_CREDENTIALS.get(target.location)
    if given:
        return given
    token = os.environ.get("MILVUS_TOKEN", "")
    if token:
        return token
    user, password = os.environ.get("MILVUS_USER", ""), os.environ.get("MILVUS_PASSWORD", "")
    if bool(user) != bool(password):
        raise IndexStoreError("set both MILVUS_USER and MILVUS_PASSWORD (or MILVUS_TOKEN=USER:PASSWORD)")
    return f"{user}:{password}" if user else ""


def milvus_error_text(error: Exception) -> str:
    """A pymilvus exception as one line, without the class name noise, with the gRPC status under
    it when there is one (pymilvus says "Fail connecting" for a refused password as for a dead port)."""
    text = str(getattr(error, "message", "") or error)
    cause = error.__cause__
    if cause is not None and callable(getattr(cause, "code", None)) and callable(getattr(cause, "details", None)):
        text += f" ({cause.code().name}: {cause.details()})"
    return " ".join(text.split())


def connect(target: MilvusTarget):
    """A MilvusClient for `target`; IndexStoreError (with what to do) when it cannot be opened."""
    try:
        from pymilvus import MilvusClient  # lazily: pymilvus is an optional extra
    except ImportError:
        raise IndexStoreError(
            "this index keeps its vectors in Milvus; install pymilvus and milvus-lite "
            "(pip install 'duomodal[milvus]')"
        ) from None
    if target.is_lite:
        Path(target.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(uri=target.uri)
        except Exception as e:  # pymilvus raises its own exception types, of several kinds
            raise IndexStoreError(
                f"cannot open Milvus at {target.spec}: {milvus_error_text(e)} (milvus-lite serves one process at "
                "a time: is another duomodal process using this file?)"
            ) from None
    settings = ConnectionSettings.resolve(target)
    token = credentials(target)
    tls_options = {}
    if settings.tls:
        tls_options = {"secure": True, "server_name": settings.server_name}
        if settings.cert:
            tls_options.update(client_pem_path=settings.cert, client_key_path=settings.key, ca_pem_path=settings.ca)
        elif settings.ca:
            tls_options["server_pem_path"] = settings.ca
    try:
        # dedicated: pymilvus shares one channel per address and token otherwise, whatever the
        # database or TLS settings of the next client
        return MilvusClient(uri=target.uri, token=token, db_name=target.db, timeout=settings.timeout,
                            dedicated=True, **tls_options)
    except Exception as e:
        text = milvus_error_text(e)
        hint = "is the server running, and are the host, port and TLS settings right?"
        if re.search(r"UNAUTHENTICATED|PERMISSION_DENIED", text):
            hint = ("set the credentials in MILVUS_TOKEN=USER:PASSWORD (or MILVUS_USER and MILVUS_PASSWORD); "
                    "they are never recorded in the index")
        elif re.search(r"TLS|SSL|handshake", text, re.IGNORECASE) or (not settings.tls and "Socket closed" in text):
            hint = ("check the TLS settings (tls=1, ca=PATH, or $MILVUS_TLS and $MILVUS_CA_CERT) "
                    "against the server's certificate")
        elif re.search(r"database", text, re.IGNORECASE):
            hint = "create the database first, or name another one"
        raise IndexStoreError(f"cannot connect to the Milvus server at {target.spec}: {text}; {hint}") from None
