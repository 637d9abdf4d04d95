"""A Milvus standalone server on this machine, from the `milvus` package.

For the test suite, the benchmarks, and trying the server store on one machine: the server listens
on free ports of 127.0.0.1 and keeps everything (its etcd, message log, segments, logs) under one
data directory, so a stop and a start on the same directory is a restart that keeps the data.

The package's own launcher, `milvus-server`, moves any port it cannot bind at once to the next
free one; after a crash the old ports stay in TIME_WAIT for a minute, so a restarted server came
back on another port and the indexes that named the old one lost it. So this module does what
`milvus-server` does, with the ports kept: it writes the package's configuration template with
them (plus the embedded etcd's own two, which `milvus-server` cannot set) and starts the package's
binary (`milvus run standalone`).

The server runs in a process group of its own with a watchdog: if the process that started it dies
without stopping it (a killed test run), the watchdog stops the server within a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

# the configuration template's ports, each given a free one, and the embedded etcd's peer port and
# the metrics/health port, which the template does not hold
PORTS = (
    "proxy_port", "proxy_internal_port", "etcd_port", "root_coord_port", "query_coord_port",
    "query_node_port", "index_coord_port", "index_node_port", "data_coord_port", "data_node_port",
)
ETCD_PEER_PORT, METRICS_PORT = "etcd_peer_port", "metrics_port"
# Components that would otherwise announce the machine's first network address to each other
_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
# The watchdog: start the server in the background, then wait while the starting process (the
# shell's parent) lives; when it is gone, stop the whole group.
_WATCHDOG = 'parent=$PPID; "$@" & while kill -0 "$parent" 2>/dev/null; do sleep 1; done; kill -TERM -- -$$'


class MilvusServerError(RuntimeError):
    """The local Milvus server could not be started (the message says why and names its log)."""


def milvus_server_installed() -> bool:
    """Whether the `milvus` package (the server binary) is installed."""
    return importlib.util.find_spec("milvus") is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalMilvusServer:
    """One Milvus standalone process (group) with its data under `data_dir`.

    ``start()`` waits until it answers; ``stop()`` asks it to stop and waits (SIGKILL after
    `timeout`); ``kill()`` is a crash (SIGKILL, no shutdown); a later ``start()`` reuses the data
    and the ports.
    """

    def __init__(self, data_dir: str | os.PathLike, settings: dict[str, str | int] | None = None,
                 client_options: dict | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.settings = dict(settings or {})  # milvus.yaml values by dotted key, e.g. "proxy.timeTickInterval"
        # MilvusClient options for the readiness check (token, secure, server_pem_path...) when the
        # settings turn on authentication or TLS
        self.client_options = dict(client_options or {})
        self._process: subprocess.Popen | None = None
        self._ports: dict[str, int] = {}

    @property
    def port(self) -> int | None:
        """The proxy's port (what clients connect to), once started."""
        return self._ports.get("proxy_port")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spec(self, collection: str) -> str:
        """The ``--store`` spec of `collection` on this server."""
        return f"milvus://127.0.0.1:{self.port}/{collection}"

    @property
    def log(self) -> Path:
        return self.data_dir / "logs" / "milvus-stdout.log"

    @property
    def running(self) -> bool:
        return self._process is not None and bool(self.pids())

    def start(self, timeout: float = 180.0) -> LocalMilvusServer:
        if not milvus_server_installed():
            raise MilvusServerError("the Milvus server is not installed: pip install milvus (or duomodal[dev])")
        if self._process is not None:
            raise MilvusServerError(f"the Milvus server in {self.data_dir} is already running")
        for name in (*PORTS, ETCD_PEER_PORT, METRICS_PORT):
            self._ports.setdefault(name, free_port())  # kept across restarts: clients know them
        binary, env = self._prepare()
        logs = self.data_dir / "logs"
        with open(logs / "milvus-stdout.log", "ab") as out, open(logs / "milvus-stderr.log", "ab") as err:
            self._process = subprocess.Popen(
                ["sh", "-c", _WATCHDOG, "milvus-watchdog", binary, "run", "standalone"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True, cwd=self.data_dir, env=env,
            )
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _prepare(self) -> tuple[str, dict[str, str]]:
        """Write the configuration (the package's template, as milvus-server fills it) and unpack
        the binary; (the binary, its environment)."""
        import milvus  # lazily (an optional dev extra): the package with its binary, libraries and config template

        config = milvus.MilvusServerConfig(data_dir=str(self.data_dir))
        config.resolve_storage()  # data, logs and configs under data_dir
        for name in PORTS:
            config.set(name, self._ports[name])
        settings = {**{f"{component}.ip": "127.0.0.1" for component in _COMPONENTS}, **self.settings}
        for key, value in settings.items():  # the components' ips: all traffic stays on the loopback interface
            config.set(key, value)
        config.write_config()
        milvus._initialize_data_files(str(self.data_dir))  # unpacks bin/ once (checked by hash after)
        # the embedded etcd's ports are not in the template; Milvus reads its etcd config from here
        etcd_config = self.data_dir / "configs" / "embedded-etcd.yaml"
        client = f"http://127.0.0.1:{self._ports['etcd_port']}"
        peer = f"http://127.0.0.1:{self._ports[ETCD_PEER_PORT]}"
        etcd_config.write_text(f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
                               f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                               f"initial-cluster: default={peer}\n")
        bin_dir = self.data_dir / "bin"
        env = {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self._ports[METRICS_PORT]),
            "MILVUS_RUN_DIR": str(self.data_dir / "run"),
            "LD_LIBRARY_PATH": ":".join(filter(None, [str(bin_dir), os.environ.get("LD_LIBRARY_PATH", "")])),
            "ETCD_CONFIG_PATH": str(etcd_config),
        }
        return str(bin_dir / "milvus"), env

    def _wait_until_ready(self, timeout: float) -> None:
        from pymilvus import MilvusClient  # lazily: pymilvus is an optional extra

        deadline = time.monotonic() + timeout
        seen = False  # the binary, once the watchdog shell has started it
        while True:
            running = self._binary_running()
            seen |= running
            if not self.pids() or (seen and not running):
                raise MilvusServerError(f"the Milvus server stopped while starting; see {self.log}")
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

    def _binary_running(self) -> bool:
        binary = str(self.data_dir / "bin" / "milvus")
        for pid in self.pids():
            try:
                if os.readlink(f"/proc/{pid}/exe") == binary:
                    return True
            except OSError:
                continue
        return False

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
