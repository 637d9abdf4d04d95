"""A Milvus standalone server on this machine, from the `milvus` package (its `milvus-server`).

For the test suite, the benchmarks, and trying the server store on one machine: the server listens
on free ports of 127.0.0.1 and keeps everything (its etcd, message log, segments, logs) under one
data directory, so a stop and a start on the same directory is a restart that keeps the data.

The server runs in a process group of its own with a watchdog: if the process that started it dies
without stopping it (a killed test run), the watchdog stops the server within a second or two.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# milvus-server's port options; each gets a free port of its own
PORT_OPTIONS = (
    "proxy-port", "proxy-internal-port", "etcd-port", "root-coord-port", "query-coord-port",
    "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port",
)
# Components that would otherwise announce the machine's first network address to each other
_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
# The watchdog: start the server in the background, then wait while the starting process (the
# shell's parent) lives; when it is gone, stop the whole group.
_WATCHDOG = 'parent=$PPID; "$@" & while kill -0 "$parent" 2>/dev/null; do sleep 1; done; kill -TERM -- -$$'


class MilvusServerError(RuntimeError):
    """The local Milvus server could not be started (the message says why and names its log)."""


def milvus_server_command() -> str | None:
    """The `milvus-server` command of the `milvus` package, or None when it is not installed."""
    beside = Path(sys.executable).with_name("milvus-server")
    if beside.is_file():
        return str(beside)
    return shutil.which("milvus-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalMilvusServer:
    """One milvus-server process (group) with its data under `data_dir`.

    ``start()`` waits until it answers; ``stop()`` asks it to stop and waits (SIGKILL after
    `timeout`); ``kill()`` is a crash (SIGKILL, no shutdown); a later ``start()`` reuses the data
    and, when they are still free, the ports.
    """

    def __init__(self, data_dir: str | os.PathLike, settings: dict[str, str | int] | None = None,
                 client_options: dict | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.settings = dict(settings or {})  # milvus.yaml values by dotted key (`--extra-config KEY=VALUE`)
        # MilvusClient options for the readiness check (token, secure, server_pem_path...) when the
        # settings turn on authentication or TLS
        self.client_options = dict(client_options or {})
        self._process: subprocess.Popen | None = None
        self._ports: dict[str, int] = {}
        self.port: int | None = None  # the proxy's port (what clients connect to), once started

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spec(self, collection: str) -> str:
        """The ``--store`` spec of `collection` on this server."""
        return f"milvus://127.0.0.1:{self.port}/{collection}"

    @property
    def log(self) -> Path:
        return self.data_dir / "milvus-server.log"

    @property
    def running(self) -> bool:
        return self._process is not None and bool(self.pids())

    def start(self, timeout: float = 180.0) -> LocalMilvusServer:
        command = milvus_server_command()
        if command is None:
            raise MilvusServerError("the Milvus server is not installed: pip install milvus (or duomodal[dev])")
        if self._process is not None:
            raise MilvusServerError(f"the Milvus server in {self.data_dir} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for option in PORT_OPTIONS:
            if option not in self._ports or not _port_is_free(self._ports[option]):
                self._ports[option] = free_port()
        arguments = [command, "--data", str(self.data_dir)]
        for option, port in self._ports.items():
            arguments += [f"--{option}", str(port)]
        settings = {**{f"{component}.ip": "127.0.0.1" for component in _COMPONENTS}, **self.settings}
        for key, value in settings.items():  # the components' ips: all traffic stays on the loopback interface
            arguments += ["--extra-config", f"{key}={value}"]
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                ["sh", "-c", _WATCHDOG, "milvus-watchdog", *arguments],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_until_ready(self, timeout: float) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout
        while True:
            if not self.pids():
                raise MilvusServerError(f"the Milvus server stopped while starting; see {self.log}")
            # milvus-server moves a port it could not bind to the next free one: read what it chose
            self.port = _configured_proxy_port(self.data_dir) or self._ports["proxy-port"]
            try:
                client = MilvusClient(uri=self.uri, timeout=2, dedicated=True, **self.client_options)
                try:
                    client.list_collections(timeout=2)
                    return
                finally:
                    client.close()
            except Exception:  # not up yet: pymilvus raises several kinds
                if time.monotonic() > deadline:
                    raise MilvusServerError(f"the Milvus server did not answer within {timeout:.0f} s; "
                                            f"see {self.log}") from None
                time.sleep(0.5)

    def pids(self) -> list[int]:
        """The live (not zombie) processes of the server's group."""
        if self._process is None:
            return []
        group = self._process.pid
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    def rss_mb(self) -> float:
        """Resident memory of the server's processes together, in MiB."""
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
            total += int(match.group(1)) if match else 0
        return total / 1024

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Milvus shuts down cleanly: 0.1 s when idle, over 30 s with collections loaded),
        SIGKILL whatever is left after `timeout` seconds (what was written is in its log either way)."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """A crash: SIGKILL to every process of the server, no shutdown."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def _signal_and_wait(self, signum: int, timeout: float) -> None:
        if self._process is None:
            return
        group = self._process.pid
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            pass
        self._process.wait()  # the watchdog shell: reaped here so it is not counted below
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.pids():
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while self.pids():
                time.sleep(0.1)
        self._process = None

    def __enter__(self) -> LocalMilvusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _configured_proxy_port(data_dir: Path) -> int | None:
    """The proxy port in the configuration milvus-server wrote (``proxy:`` ... ``port: N``)."""
    try:
        text = (data_dir / "configs" / "milvus.yaml").read_text()
    except OSError:
        return None
    match = re.search(r"^proxy:\n(?:(?:\s.*|)\n)*?  port: (\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None
