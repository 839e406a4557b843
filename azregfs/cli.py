"""The command line: ``azregfs mount``, ``unmount``, ``stats``, ``check`` and ``demo``.

``mount`` proves the account and container work before anything is mounted, then either
serves in the foreground or forks a daemon and returns once the mount is live (exit 0) or
has failed (non-zero, with the daemon's one-line reason), as sshfs and s3ql do.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import subprocess
import sys
import time

from . import config
from .config import Config, ConfigError
from .fs import control
from .ops.logs import setup_logging
from .storage.driver import StorageError, check_access

log = logging.getLogger("azregfs")


def _mount_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount a container")
    p.add_argument("container", nargs="?", help="container name (or 'container' in the config)")
    p.add_argument("mountpoint", nargs="?", help="where to mount (or 'mountpoint' in the config)")
    p.add_argument("--config", "-c", help="YAML file: our keys, or a registry config.yml")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options key=value,... (fstab style)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    p.add_argument("--create-container", action="store_true", default=None)
    p.add_argument("--account-name", dest="accountname")
    p.add_argument("--realm")
    p.add_argument("--endpoint", help="blob service URL (Azurite, private endpoint)")
    p.add_argument("--rootdirectory", help="blob-name prefix shown as the mount's root")
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("--umask")
    p.add_argument("--allow-other", dest="allow_other", action="store_true", default=None)
    p.add_argument("--cache-dir", dest="cache_dir")
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--log-file", dest="log_file")
    p.add_argument("--log-format", dest="log_format", choices=("text", "json"))
    p.add_argument("--metrics-addr", dest="metrics_addr",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="azregfs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true",
                        help="print the versions of azregfs and what it runs on")
    sub = parser.add_subparsers(dest="command")
    _mount_parser(sub)
    u = sub.add_parser("unmount", help="flush and unmount")
    u.add_argument("mountpoint", nargs="?")
    u.add_argument("--config", "-c", help="take the mountpoint from this YAML file")
    u.add_argument("--timeout", type=float, default=60.0)
    st = sub.add_parser("stats", help="show what a mount is doing (its counters)")
    st.add_argument("mountpoint", nargs="?")
    st.add_argument("--config", "-c", help="take the mountpoint from this YAML file")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", type=float, metavar="SECONDS",
                    help="every SECONDS, show the rates of the last interval")
    st.add_argument("--count", type=int, help="with --watch: stop after COUNT intervals")
    ck = sub.add_parser("check", help="health check: exit 0 OK, 1 WARNING, 2 CRITICAL")
    ck.add_argument("mountpoint", nargs="?")
    ck.add_argument("--config", "-c", help="take the mountpoint from this YAML file")
    ck.add_argument("--timeout", type=float, default=30.0)
    ck.add_argument("--no-probe", dest="probe", action="store_false",
                    help="judge by the last request instead of making one now")
    d = sub.add_parser("demo", help="mount a demo container (a local Azurite without account)")
    d.add_argument("--mountpoint", default="mnt")
    d.add_argument("--registry", action="store_true",
                   help="also run docker-registry on the mount and push a sample image")
    d.add_argument("--stop", action="store_true", help="unmount the demo and stop its Azurite")
    return parser


def load_config(args: argparse.Namespace) -> tuple[Config, set[str]]:
    mount_options: dict[str, str] = {}
    passthrough: set[str] = set()
    for text in args.options:
        ours, extra = config.parse_mount_options(text)
        mount_options.update(ours)
        passthrough |= extra
    config_file = args.config or mount_options.pop("config", None)
    flags = {
        "container": args.container, "accountname": args.accountname, "realm": args.realm,
        "endpoint": args.endpoint, "rootdirectory": args.rootdirectory, "uid": args.uid,
        "gid": args.gid, "umask": args.umask, "allow_other": args.allow_other,
        "create_container": args.create_container, "cache_dir": args.cache_dir,
        "log_level": args.log_level, "log_file": args.log_file,
        "log_format": args.log_format, "metrics_addr": args.metrics_addr,
    }
    cfg = config.build(config_file, os.environ, mount_options, flags)
    # The daemon runs in '/': relative paths are the caller's.
    cfg.log_file = os.path.abspath(cfg.log_file) if cfg.log_file else ""
    cfg.cache_dir = os.path.abspath(cfg.cache_dir) if cfg.cache_dir else ""
    return cfg, passthrough


def is_stale_mount(path: str) -> bool:
    """A FUSE mount whose daemon died: every access fails with ENOTCONN. statfs, not stat:
    the kernel answers stat from cached attributes for a while without asking the daemon."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_mountpoint(path: str) -> None:
    if is_stale_mount(path):
        # Left by a daemon that was killed; detaching it lets Restart=on-failure mount again.
        log.warning("%s: detaching a stale mount (its daemon is gone)", path)
        subprocess.run(["fusermount3", "-uz", path], check=False, capture_output=True)
    if not os.path.isdir(path):
        raise ConfigError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise ConfigError(f"{path} is already a mount point")


def cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import Daemon  # pyfuse3 is only needed when mounting

    if args.mountpoint is None and args.container is not None:
        args.container, args.mountpoint = None, args.container  # one positional: the mountpoint
    try:
        cfg, passthrough = load_config(args)
        if not (args.mountpoint or cfg.mountpoint):
            raise ConfigError("no mountpoint: name one on the command line or set 'mountpoint' "
                              "in the config file")
        mountpoint = os.path.abspath(args.mountpoint or cfg.mountpoint)
        check_mountpoint(mountpoint)
        setup_logging(cfg, foreground=True)
        check_access(cfg)
    except (ConfigError, StorageError) as exc:
        print(f"azregfs: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    if args.foreground:
        return Daemon(cfg, mountpoint, passthrough).run(on_ready=lambda: None)
    return _daemonize(cfg, mountpoint, passthrough)


def _daemonize(cfg: Config, mountpoint: str, passthrough: set[str]) -> int:
    from .daemon import Daemon

    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "OK":
            return 0
        print(f"azregfs: {message or 'the daemon exited before the mount was live'}",
              file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    os.chdir("/")  # do not keep the caller's directory busy
    setup_logging(cfg, foreground=False)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    def ready() -> None:
        os.write(write_end, b"OK")
        os.close(write_end)

    try:
        code = Daemon(cfg, mountpoint, passthrough).run(on_ready=ready)
    except Exception as exc:  # noqa: BLE001 - reported to the waiting parent
        log.error("mount failed: %s", exc)
        with contextlib.suppress(OSError):
            os.write(write_end, str(exc).encode())
        code = 1
    os._exit(code)


def mountpoint_of(args: argparse.Namespace) -> str | None:
    """The mountpoint named on the command line, or by --config's `mountpoint` (the systemd
    unit's way); None, after a one-line error, when there is none."""
    try:
        mountpoint = args.mountpoint or (
            str(config.read_yaml(args.config).get("mountpoint") or "") if args.config else "")
    except ConfigError as exc:
        print(f"azregfs: {exc}", file=sys.stderr)
        return None
    if not mountpoint:
        print("azregfs: no mountpoint: name one, or a --config that sets 'mountpoint'",
              file=sys.stderr)
        return None
    return os.path.abspath(mountpoint)


def cmd_unmount(args: argparse.Namespace) -> int:
    mountpoint = mountpoint_of(args)
    if mountpoint is None:
        return 2
    if is_stale_mount(mountpoint):
        result = subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)
        return 0 if result.returncode == 0 else 1
    if not os.path.ismount(mountpoint):
        print(f"azregfs: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    try:
        pid = int(control.read(mountpoint, "pid"))
    except OSError:
        pid = 0
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"azregfs: {result.stderr.strip() or 'fusermount3 -u failed'}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while pid and time.monotonic() < deadline:  # the daemon commits, then exits
        try:
            with open(f"/proc/{pid}/stat") as stat:
                # A zombie has exited: its parent (e.g. a script that ran `mount -f &`)
                # may be waiting for us before it reaps.
                if stat.read().rsplit(") ", 1)[1].startswith("Z"):
                    return 0
        except (FileNotFoundError, IndexError):
            return 0
        time.sleep(0.1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .ops.version import version_line

        print(version_line())
        return 0
    if args.command is None:
        parser.error("a command is required")
    if args.command in ("stats", "check"):
        from .ops import monitor

        mountpoint = mountpoint_of(args)
        if mountpoint is None:
            return monitor.UNKNOWN if args.command == "check" else 2
        if args.command == "stats":
            return monitor.show_stats(mountpoint, args.json, args.watch, args.count)
        status, line = monitor.check(mountpoint, args.timeout, args.probe)
        print(line)
        return status
    if args.command == "mount":
        return cmd_mount(args)
    if args.command == "unmount":
        return cmd_unmount(args)
    from .demo.run import run_demo

    return run_demo(args.mountpoint, with_registry=args.registry, stop_demo=args.stop)


if __name__ == "__main__":
    sys.exit(main())
