"""A private RabbitMQ node for the fault tests: restarted, configured for TLS, and
stopped at the end, without touching the shared broker other tests run on.

The node runs as this user from ``/usr/lib/rabbitmq/bin`` (not through the
``/usr/sbin`` wrappers, which switch to the ``rabbitmq`` user and its Erlang cookie),
with a home directory, cookie, data, logs, configuration and plugins file of its own
under a temporary directory, and its ports chosen free below the ephemeral range (so
no client connection can take its AMQP port while the app is stopped). The CLI
tools get their own distribution ports too: by default they use 35672-35682 for every
node, which a second node's tools would fight over.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import certs

__all__ = ["PrivateBroker", "private_broker", "rabbitmq_available"]

_BIN = Path("/usr/lib/rabbitmq/bin")
_DEPLOY_LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local"
RABBITMQ4_SCRIPT = _DEPLOY_LOCAL / "rabbitmq4.sh"


def rabbitmq4_selected() -> bool:
    """Whether private nodes run RabbitMQ 4 from the script's root."""
    return os.environ.get("SESSIONBUS_TEST_RABBITMQ4", "") not in {"", "0"}


@dataclass(frozen=True)
class _Runtime:
    """How to run one RabbitMQ installation's tools: the machine's own, or those of the
    RabbitMQ 4 root (every path the node reads is then seen from inside it)."""

    chroot: Path | None

    @classmethod
    def selected(cls) -> _Runtime:
        if not rabbitmq4_selected():
            return cls(None)
        out = subprocess.run(
            [str(RABBITMQ4_SCRIPT), "root"], capture_output=True, text=True, check=True
        )
        root = Path(out.stdout.strip())
        if not (root / ".sessionbus-recipe").exists():
            raise FileNotFoundError(
                f"no RabbitMQ 4 root at {root}: run `{RABBITMQ4_SCRIPT} build` (as root)"
            )
        return cls(root)

    def command(self, name: str) -> list[str]:
        if self.chroot is not None:
            return [str(RABBITMQ4_SCRIPT), "run", str(_BIN / name)]
        direct = _BIN / name
        if direct.exists():
            return [str(direct)]
        found = shutil.which(name)
        if found is None:
            raise FileNotFoundError(f"{name} is not installed")
        return [found]

    def inside(self, path: Path) -> str:
        """``path`` (on this machine) as the node sees it."""
        if self.chroot is None:
            return str(path)
        return "/" + str(path.relative_to(self.chroot))

    def node_parent(self) -> str | None:
        """Where the node's directory goes (None: the temporary directory)."""
        if self.chroot is None:
            return None
        parent = self.chroot / "var" / "lib" / "sessionbus" / "nodes"
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent)

    def extra_config(self) -> list[str]:
        if self.chroot is None:
            return []
        lines = (_DEPLOY_LOCAL / "refuse-deprecated.conf").read_text().splitlines()
        # All but transient_nonexcl_queues: with it refused, RabbitMQ 4.0.5 at times
        # will not start its app again after stop_app (failed_to_deny_deprecated_features
        # [transient_nonexcl_queues]) though every queue on the node was durable; the
        # broker-restart test does exactly that. A broker bug, not a queue of ours: the
        # check behind it reads the rabbit_queue Mnesia table, which is gone while the
        # app is stopped (the check then exits {aborted,{no_exists,[rabbit_queue,...]}},
        # seen with `rabbitmqctl eval` after stop_app), and RabbitMQ counts a check that
        # fails as the feature in use; so, presumably, start_app at times runs it before
        # the table is back. Before the stop the same check answers false. The same
        # code runs against the shared RabbitMQ 4 node, which refuses it, so a
        # transient queue is still caught there.
        return [
            line
            for line in lines
            if line and not line.startswith("#") and "transient_nonexcl_queues" not in line
        ]


def rabbitmq_available() -> bool:
    """Whether a RabbitMQ server can be started here."""
    try:
        runtime = _Runtime.selected()
        runtime.command("rabbitmq-server")
        runtime.command("rabbitmqctl")
    except (FileNotFoundError, subprocess.CalledProcessError):
        return False
    return True


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> int:
    """A base port with ``count`` consecutive free ports, and the CLI range beside it,
    all below the ephemeral range (32768+) and clear of RabbitMQ's usual ports."""
    reserved = {4369, 5671, 5672, 15672, 25672}
    for _ in range(200):
        base = random.randrange(11000, 14900, 20)
        wanted = [*range(base, base + count), *range(base + 10000, base + 10011)]
        if reserved.isdisjoint(wanted) and all(_free(p) for p in wanted):
            return base
    raise RuntimeError("no free ports for a private RabbitMQ node")


def node_environment(
    inside: Callable[[Path], str], root: Path, node: str, port: int
) -> dict[str, str]:
    """The environment of RabbitMQ's scripts for a node of our own under ``root``: its
    name, AMQP port, distribution port (``port + 1``) and CLI distribution ports
    (``port + 10000`` on), and every file and directory of its own, as seen from inside
    the root the node runs in (``inside``); none of the caller's RABBITMQ_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
    env.update(
        {
            "HOME": inside(root / "home"),
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(port + 1),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(port + 10000),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(port + 10010),
            "RABBITMQ_MNESIA_BASE": inside(root / "mnesia"),
            "RABBITMQ_LOG_BASE": inside(root / "log"),
            "RABBITMQ_CONFIG_FILE": inside(root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": inside(root / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": inside(root / "rabbitmq-env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": inside(root / "advanced.config"),
        }
    )
    return env


@dataclass
class PrivateBroker:
    """A running private node. ``url`` is its plain AMQP listener, ``tls_url`` its
    TLS listener (verified against ``ca_file``)."""

    node: str
    root: Path
    port: int
    tls_port: int
    ca_file: Path
    runtime: _Runtime = field(default_factory=lambda: _Runtime(None))

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def tls_url(self, user: str = "guest", password: str = "guest") -> str:  # noqa: S107
        """amqps URL whose query names the CA file (aiormq reads ``cafile`` from it)."""
        return f"amqps://{user}:{password}@localhost:{self.tls_port}/?cafile={self.ca_file}"

    def env(self) -> dict[str, str]:
        return node_environment(self.runtime.inside, self.root, self.node, self.port)

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """``rabbitmqctl -n NODE ARGS``; its output."""
        return self._run("rabbitmqctl", args, timeout=timeout, check=check)

    def _run(self, tool: str, args: tuple[str, ...], *, timeout: float, check: bool) -> str:
        result = subprocess.run(
            [*self.runtime.command(tool), "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def running(self) -> bool:
        """Whether the RabbitMQ app answers (not just the Erlang node)."""
        try:
            out = subprocess.run(
                [
                    *self.runtime.command("rabbitmq-diagnostics"),
                    "-n",
                    self.node,
                    "-q",
                    "check_running",
                ],
                env=self.env(),
                capture_output=True,
                timeout=30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0

    def wait_running(self, timeout: float = 90.0) -> float:
        """Wait until the app runs; the ``time.monotonic()`` its AMQP listener was
        first seen accepting."""
        deadline = time.monotonic() + timeout
        listening: float | None = None
        # The AMQP listener opens last in the boot: probe it (cheap) before asking the
        # CLI (an Erlang VM start of its own, most of a second) for the verdict.
        while True:
            if _free(self.port):
                listening = None
            else:
                listening = listening or time.monotonic()
                if self.running():
                    return listening
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node} not running after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def health(self) -> str | None:
        """``None`` if the app runs and both listeners accept; else what is wrong."""
        problems = []
        if not self.running():
            problems.append("the RabbitMQ app is not running")
        for name, port in (("AMQP", self.port), ("TLS", self.tls_port)):
            if _free(port):
                problems.append(f"nothing listens on the {name} port {port}")
        return "; ".join(problems) or None

    def log_tail(self, lines: int = 40) -> str:
        log = self.root / "log" / f"{self.node}.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def stop_app(self) -> None:
        """Stop the RabbitMQ application (the node stays up): every client connection
        is closed, the listeners go away."""
        self.ctl("stop_app")

    def start_app(self) -> float:
        """Start the application again and wait until it runs; the moment its AMQP
        listener accepted again (the end of the outage, as clients see it)."""
        command = subprocess.Popen(  # watched while it runs: the listener opens before it returns
            [*self.runtime.command("rabbitmqctl"), "-n", self.node, "start_app"],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        listening: float | None = None
        while command.poll() is None:
            if listening is None and not _free(self.port):
                listening = time.monotonic()
            time.sleep(0.02)
        out, _ = command.communicate()
        if command.returncode != 0:
            raise RuntimeError(f"start_app failed ({command.returncode}):\n{out}")
        running = self.wait_running()
        return listening or running

    def add_user(self, user: str, password: str, *, configure: str, write: str, read: str) -> None:
        self.ctl("add_user", user, password)
        self.ctl("set_permissions", "-p", "/", user, configure, write, read)

    def start(self) -> None:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        for name in ("mnesia", "log"):
            (self.root / name).mkdir(exist_ok=True)
        cookie = self.root / "home" / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        tls = certs.make_tls_files(self.root / "tls")
        inside = self.runtime.inside
        (self.root / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.1 = 127.0.0.1:{self.port}",
                    f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                    f"ssl_options.cacertfile = {inside(tls.ca)}",
                    f"ssl_options.certfile = {inside(tls.cert)}",
                    f"ssl_options.keyfile = {inside(tls.key)}",
                    "ssl_options.verify = verify_none",
                    "ssl_options.fail_if_no_peer_cert = false",
                    "log.console = false",
                    "log.file.level = warning",
                    *self.runtime.extra_config(),
                    "",
                ]
            )
        )
        (self.root / "advanced.config").write_text("[].\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")
        self.ca_file = tls.ca
        subprocess.run(
            [*self.runtime.command("rabbitmq-server"), "-detached"],
            env=self.env(),
            capture_output=True,
            timeout=60,
            check=True,
        )
        self.wait_running()

    def stop(self) -> None:
        """Stop the node (the Erlang VM too); kill it if it does not stop."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60, check=False)
        pid_file = self.root / "mnesia" / f"{self.node}.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # raises once the process is gone
                time.sleep(0.2)
            os.kill(pid, 9)


@contextlib.contextmanager
def private_broker() -> Iterator[PrivateBroker]:
    """A private node for the block; always stopped and removed afterwards."""
    runtime = _Runtime.selected()
    root = Path(tempfile.mkdtemp(prefix="sessionbus-faults-broker-", dir=runtime.node_parent()))
    base = _ports(3)
    broker = PrivateBroker(
        node=f"sbfault{uuid.uuid4().hex[:6]}@localhost",
        root=root,
        port=base,
        tls_port=base + 2,
        ca_file=root / "tls" / "ca.pem",
        runtime=runtime,
    )
    try:
        broker.start()
        yield broker
    finally:
        try:
            broker.stop()
        finally:
            log = root / "log" / f"{broker.node}.log"
            if log.exists():  # kept for a post-mortem; the node's data goes
                shutil.copy(log, Path(tempfile.gettempdir()) / f"{broker.node}.log")
            shutil.rmtree(root, ignore_errors=True)
