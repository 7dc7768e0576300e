"""The daemon core every vpnr daemon runs on.

A daemon is a :class:`DaemonApp` (its real work plus thin servicers). This module gives it:
argument parsing with a ``check-config`` mode, strict config loading (exit code 2 on error),
JSON logs, a ``grpc.aio`` server on ``/run/vpnr/<instance>/<daemon>.sock`` with health and
reflection, socket and directory modes that keep non-admin local users out, Prometheus
metrics on loopback, and a graceful stop on SIGTERM/SIGINT that removes the socket.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Gauge, Info, start_http_server

from vpnr import __version__
from vpnr.core import access
from vpnr.core.auditrec import AuditRecorder
from vpnr.core.config import DEFAULT_CONFIG, Config, ConfigError, describe, load_config
from vpnr.core.logs import setup_logging
from vpnr.v1 import audit_pb2, common_pb2

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

SOCKET_DIR_MODE = 0o755   # anyone may enter: the socket files carry the protection
SOCKET_MODE = 0o660       # root and the socket's group (admin or viewer) may connect
STOP_GRACE_SECONDS = 5.0

log = logging.getLogger("vpnr.daemon")

# What every servicer method receives; requests and responses are typed per method.
Context = grpc.aio.ServicerContext[Any, Any]


async def abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    """End an RPC with ``code`` and ``message`` (context.abort raises; this says so)."""
    await context.abort(code, message)
    raise AssertionError("unreachable")


class StartupError(Exception):
    """The daemon cannot start; the message tells the operator what to fix."""


def unix_timestamp(unix: float) -> Timestamp | None:
    """A protobuf Timestamp for a Unix time; None (field unset) for 0."""
    if not unix:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(unix * 1e9))
    return stamp


@dataclass
class Runtime:
    """Facts about this running daemon, shared with its app."""

    daemon: str
    config: Config
    started_monotonic: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    metrics_address: str = ""
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def socket_path(self) -> Path:
        """This daemon's Unix socket."""
        return self.config.router.socket_path(self.daemon)

    def daemon_info(self) -> common_pb2.DaemonInfo:
        """The common part of every Status answer."""
        return common_pb2.DaemonInfo(
            daemon=self.daemon,
            version=__version__,
            instance=self.config.router.instance,
            pid=os.getpid(),
            started_at=unix_timestamp(self.started_wall),
            uptime_seconds=time.monotonic() - self.started_monotonic,
            config_file=self.config.path,
            socket_path=str(self.socket_path),
            metrics_address=self.metrics_address,
        )


class DaemonApp(abc.ABC):
    """One daemon's real work. Subclasses set ``name`` and ``service_names``."""

    name: ClassVar[str]
    service_names: ClassVar[tuple[str, ...]]

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = runtime.config

    @abc.abstractmethod
    async def start(self) -> None:
        """Do the daemon's start-up work; raise :class:`StartupError` to refuse to start."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release what start() acquired that must not outlive the process."""

    @abc.abstractmethod
    def register(self, server: grpc.aio.Server) -> None:
        """Add this daemon's servicers to the server (called once per socket)."""

    def control_recorder(self) -> Callable[[audit_pb2.ControlEvent], None] | None:
        """Where serve() sends the daemon's own control records (access denials); None
        means to auditd's socket. auditd stores them itself."""
        return None


def parse_args(prog: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a daemon's command line (``run`` is the default command)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"vpnr {prog} daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            f"  {prog} --config /etc/vpnr/router.toml              # serve\n"
            f"  {prog} check-config --config /etc/vpnr/router.toml # validate and exit\n"
            f"  {prog} --help-config                               # every config key\n"
            "exit codes: 0 ok, 1 runtime failure, 2 invalid configuration"
        ),
    )
    parser.add_argument("command", nargs="?", choices=("run", "check-config"), default="run")
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="router TOML file")
    parser.add_argument("--help-config", action="store_true", help="list every config key")
    return parser.parse_args(argv)


def run_daemon(app_cls: type[DaemonApp], argv: Sequence[str] | None = None) -> int:
    """Entry point shared by the daemons; returns the process exit code."""
    prog = app_cls.name
    args = parse_args(prog, argv)
    if args.help_config:
        print("\n".join(describe()))
        return EXIT_OK
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{prog}: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(f"{prog}: {config.path}: configuration is valid "
              f"(instance {config.router.instance!r})")
        return EXIT_OK
    setup_logging(prog, config.router.instance, config.router.log_level)
    try:
        return asyncio.run(serve(app_cls, config))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return EXIT_CONFIG
    except Exception:  # a bug: log it whole, exit 1 so a supervisor restarts the daemon
        log.exception("stopped by an unexpected error")
        return EXIT_FAILURE


def group_gid(config: Config, key: str) -> int:
    """The numeric id of the group named by ``router.<key>`` (admin_group, viewer_group)."""
    name = getattr(config.router, key)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError as exc:
        raise ConfigError(
            config.path, f"router.{key}",
            f"group {name!r} does not exist on this host "
            "(deploy/setup-host.sh creates vpnr-admin and vpnr-viewer)") from exc


def clear_stale_socket(runtime: Runtime, path: Path) -> None:
    """Remove a socket nobody listens on; StartupError when a daemon still serves it."""
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            try:
                path.unlink()  # nobody listens: a stale socket from a killed process
            except OSError as exc:
                raise StartupError(f"cannot remove the stale socket {path}: {exc.strerror} "
                                   "(left by a daemon that ran as another user; remove "
                                   "it as root)") from exc
        else:
            raise StartupError(f"another {runtime.daemon} is already serving on {path}")
        finally:
            probe.close()


def claim_socket_dir(sock_dir: Path, gid: int) -> None:
    """Create or check the instance's socket directory so this daemon can bind in it.

    It belongs to root and the admin group, sticky and group-writable: a daemon running
    unprivileged as a member of the admin group (idpd under systemd) adds its own sockets,
    and nobody but root removes or renames another's. A daemon that is not root changes
    the owner and modes only of a directory it created itself.
    """
    mode = SOCKET_DIR_MODE | stat.S_IWGRP | stat.S_ISVTX
    euid = os.geteuid()
    try:
        sock_dir.mkdir(mode=mode & 0o777, exist_ok=True)
    except PermissionError as exc:
        raise StartupError(f"cannot create {sock_dir} as uid {euid}: start a vpnr daemon "
                           "that runs as root first (policyd creates it)") from exc
    owner = sock_dir.stat().st_uid
    try:
        if euid in (0, owner):
            os.chown(sock_dir, 0 if euid == 0 else -1, gid)
            os.chmod(sock_dir, mode)
    except PermissionError as exc:
        raise StartupError(f"cannot give {sock_dir} to group {gid}: needs root with "
                           "CAP_CHOWN, or a member of the admin group (systemd: "
                           "SupplementaryGroups=)") from exc
    if not os.access(sock_dir, os.W_OK | os.X_OK):
        raise StartupError(f"{sock_dir} is not writable by uid {euid}: run as root or as a "
                           "member of the admin group")


def prepare_socket(runtime: Runtime, gid: int) -> Path:
    """Create the socket directory with safe modes and clear a stale socket."""
    router = runtime.config.router
    Path(router.run_dir).mkdir(mode=0o755, parents=True, exist_ok=True)
    claim_socket_dir(router.socket_dir, gid)
    path = runtime.socket_path
    clear_stale_socket(runtime, path)
    return path


def start_metrics(runtime: Runtime) -> Any:
    """Serve /metrics on the configured loopback port; returns the HTTP server or None."""
    section = getattr(runtime.config, runtime.daemon)
    Info("vpnr_build", "vpnr build information", registry=runtime.registry).info(
        {"version": __version__, "daemon": runtime.daemon,
         "instance": runtime.config.router.instance})
    Gauge("vpnr_daemon_start_time_seconds", "Unix time the daemon started",
          registry=runtime.registry).set(runtime.started_wall)
    if not section.metrics_port:
        return None
    try:
        server, _thread = start_http_server(section.metrics_port, section.metrics_address,
                                            registry=runtime.registry)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {section.metrics_address}:"
                           f"{section.metrics_port}: {exc.strerror}") from exc
    runtime.metrics_address = f"{section.metrics_address}:{section.metrics_port}"
    return server


async def serve(app_cls: type[DaemonApp], config: Config) -> int:
    """Run one daemon until SIGTERM/SIGINT; returns the exit code."""
    runtime = Runtime(daemon=app_cls.name, config=config)
    gid = group_gid(config, "admin_group")
    path = prepare_socket(runtime, gid)
    viewer_path = config.router.viewer_socket_path(runtime.daemon)
    viewer_group = group_gid(config, "viewer_group")
    clear_stale_socket(runtime, viewer_path)
    app = app_cls(runtime)
    await app.start()
    metrics_server: Any = None
    denials = AuditRecorder(config.router.socket_path("auditd"))
    health_servicer = health.aio.HealthServicer()
    servers: list[tuple[grpc.aio.Server, Path, int]] = []
    stop = asyncio.Event()
    try:
        # Anything failing from here on releases what start() acquired and exits 1:
        # a daemon that cannot serve must not linger (systemd restarts it on failure).
        metrics_server = start_metrics(runtime)
        read_only = access.ReadOnlyInterceptor(runtime.daemon, str(viewer_path),
                                               app.control_recorder() or denials.record)
        names = (*app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
        # Both sockets serve the same servicers; the viewer socket only lets reads through.
        for sock, sock_gid, gate in ((path, gid, []), (viewer_path, viewer_group,
                                                       [read_only])):
            server = grpc.aio.server(
                interceptors=[*gate, access.WriteTimeoutInterceptor()],
                options=access.SERVER_OPTIONS,
                maximum_concurrent_rpcs=access.MAX_CONCURRENT_RPCS)
            app.register(server)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection(names, server)
            servers.append((server, sock, sock_gid))
        for server, sock, sock_gid in servers:
            # The socket is born 0660 (umask), so there is no moment where others may
            # connect.
            old_umask = os.umask(0o117)
            try:
                server.add_insecure_port(f"unix:{sock}")
                await server.start()
            finally:
                os.umask(old_umask)
            try:
                os.chown(sock, -1, sock_gid)  # chgrp only: works for a non-root daemon
                os.chmod(sock, SOCKET_MODE)
            except OSError as exc:
                raise StartupError(f"cannot give {sock} to its group: {exc.strerror}") from exc
        for name in ("", *app.service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"socket": str(path), "viewer_socket": str(viewer_path),
                                   "metrics": runtime.metrics_address, "version": __version__})
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
    finally:
        # The metrics server notices a shutdown only at its next poll (up to 0.5 s): let it
        # wind down while the gRPC servers and the app stop, not after them.
        metrics_stop = None if metrics_server is None else \
            asyncio.ensure_future(asyncio.to_thread(metrics_server.shutdown))
        await health_servicer.enter_graceful_shutdown()
        await asyncio.gather(*(server.stop(STOP_GRACE_SECONDS) for server, _, _ in servers))
        await app.stop()
        await denials.close()
        for _, sock, _ in servers:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        if metrics_stop is not None:
            await metrics_stop
            metrics_server.server_close()
    log.info("stopped")
    return EXIT_OK
