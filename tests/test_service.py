"""The operators' kit: the systemd units (checked with systemd-analyze, and their command
lines run as systemd would run them: credential directory, notify socket, stop command) and
the mount(8) helper behind /etc/fstab lines of type fuse.azregfs."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import blob_names, need

from azregfs import config
from azregfs.demo.azurite import DEV_ACCOUNT, DEV_KEY, Azurite
from azregfs.fs import control
from azregfs.mounthelper import translate

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
TEMPLATE = UNIT_DIR / "azregfs@.service"
DROP_IN = UNIT_DIR / "docker-registry.service.d" / "azregfs.conf"
INSTALLED_BINARY = "/usr/local/bin/azregfs"
VENV_BIN = Path(sys.executable).parent
HELPER_LINK = Path("/sbin/mount.fuse.azregfs")

# Debian's docker-registry.service, for machines where the package is not installed.
DEBIAN_REGISTRY_UNIT = """[Unit]
Description=the Docker toolset to pack, ship, store, and deliver content
After=network.target

[Service]
User=docker-registry
ExecStart=/usr/bin/docker-registry serve /etc/docker/registry/config.yml

[Install]
WantedBy=multi-user.target
"""


def unit_copy(directory: Path) -> Path:
    """The template with the installed binary's path pointing at this checkout's venv
    (systemd-analyze verify insists that ExecStart's binary exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = TEMPLATE.read_text().replace(INSTALLED_BINARY, str(VENV_BIN / "azregfs"))
    target = directory / TEMPLATE.name
    target.write_text(text)
    return target


def verify(unit: Path) -> subprocess.CompletedProcess:
    need("systemd-analyze")
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)


def registry_unit_with_drop_in(directory: Path, drop_in_text: str) -> Path:
    unit_copy(directory)
    installed = Path("/lib/systemd/system/docker-registry.service")
    unit = directory / "docker-registry.service"
    unit.write_text(installed.read_text() if installed.exists() else DEBIAN_REGISTRY_UNIT)
    (directory / "docker-registry.service.d").mkdir()
    (directory / "docker-registry.service.d" / "azregfs.conf").write_text(drop_in_text)
    return unit


def test_mount_unit_verifies(tmp_path: Path) -> None:
    unit = unit_copy(tmp_path)
    instance = tmp_path / "azregfs@registry.service"
    shutil.copy(unit, instance)
    for path in (unit, instance):
        result = verify(path)
        assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_registry_drop_in_verifies_and_is_read(tmp_path: Path) -> None:
    result = verify(registry_unit_with_drop_in(tmp_path / "good", DROP_IN.read_text()))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The same check does see the drop-in: a misspelt key in it is reported.
    broken = DROP_IN.read_text().replace("BindsTo=", "BindsTox=")
    result = verify(registry_unit_with_drop_in(tmp_path / "broken", broken))
    assert "Unknown key 'BindsTox'" in result.stderr


def test_drop_in_binds_the_registry_to_the_mount() -> None:
    lines = DROP_IN.read_text().splitlines()
    for key in ("Requires", "BindsTo", "After"):
        assert f"{key}=azregfs@registry.service" in lines


def unit_settings(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


class FakeSystemd:
    """Runs the unit's ExecStart/ExecStop for one instance as systemd would: specifiers
    expanded, LoadCredential= copied into $CREDENTIALS_DIRECTORY, a NOTIFY_SOCKET to hear
    READY=1 on, and an environment holding no Azure settings."""

    def __init__(self, root: Path, instance: str) -> None:
        self.root = root
        self.instance = instance
        self.etc = root / "etc-azregfs"
        self.etc.mkdir()
        self.settings = unit_settings(TEMPLATE)
        self.process: subprocess.Popen | None = None
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(root / "notify.sock"))

    def expand(self, value: str) -> list[str]:
        value = value.lstrip("-")  # '-': failure is ignored
        value = value.replace("%i", self.instance).replace("/etc/azregfs/", f"{self.etc}/")
        value = value.replace(INSTALLED_BINARY, str(VENV_BIN / "azregfs"))
        return shlex.split(value)

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("AZURE_")}
        credentials = self.root / "credentials"
        credentials.mkdir(exist_ok=True)
        for setting in self.settings.get("LoadCredential", []):
            name, _, source = setting.partition(":")
            target = credentials / name
            if not target.exists():  # systemd fails the start when the source is missing
                shutil.copy(self.expand(source)[0], target)
                os.chmod(target, 0o400)
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
        env["NOTIFY_SOCKET"] = str(self.root / "notify.sock")
        return env

    def start(self, timeout: float = 30) -> str:
        """ExecStart; returns the first message the daemon sends."""
        (command,) = self.settings["ExecStart"]
        log = open(self.root / f"{self.instance}.log", "ab")  # noqa: SIM115 - child's output
        self.process = subprocess.Popen(self.expand(command), env=self.environment(),
                                        stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        self.notify.settimeout(timeout)
        try:
            return self.notify.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no notification: {self.log()}") from None

    def stop(self) -> int:
        (command,) = self.settings["ExecStop"]
        stopper = subprocess.Popen(self.expand(command), env=self.environment(),
                                   stderr=subprocess.PIPE, text=True)
        assert self.process is not None
        # Reap the daemon as systemd would: the stop command waits for it to be gone.
        code = self.process.wait(timeout=120)
        _, errors = stopper.communicate(timeout=120)
        assert stopper.returncode == 0, errors
        return code

    def log(self) -> str:
        return (self.root / f"{self.instance}.log").read_text(errors="replace")

    def cleanup(self, mountpoint: Path) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        if os.path.ismount(mountpoint) or _stale(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        self.notify.close()


def _stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True
    return False


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    manager = FakeSystemd(tmp_path, "registry")
    yield manager
    manager.cleanup(tmp_path / "mnt")


def write_instance_config(manager: FakeSystemd, azurite: Azurite, container: str,
                          mountpoint: Path) -> None:
    # The key lives in a root-only file; the YAML points into the credential directory.
    key_file = manager.etc / f"{manager.instance}.key"
    key_file.write_text(DEV_KEY + "\n")
    os.chmod(key_file, 0o600)
    (manager.etc / f"{manager.instance}.yml").write_text(
        f"accountname: {DEV_ACCOUNT}\n"
        f"endpoint: {azurite.endpoint}\n"
        f"container: {container}\n"
        "accountkey_file: ${CREDENTIALS_DIRECTORY}/accountkey\n"
        f"mountpoint: {mountpoint}\n"
    )


def test_unit_command_lines_mount_notify_and_stop(
        fake_systemd: FakeSystemd, azurite: Azurite, container, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    write_instance_config(fake_systemd, azurite, container.container_name, mountpoint)

    message = fake_systemd.start()
    assert "READY=1" in message.split("\n"), fake_systemd.log()
    assert os.path.ismount(mountpoint)  # READY=1 came after the mount was live
    assert fake_systemd.process is not None
    command_line = Path(f"/proc/{fake_systemd.process.pid}/cmdline").read_bytes()
    assert DEV_KEY.encode() not in command_line

    (mountpoint / "docker").mkdir()
    (mountpoint / "docker" / "hello").write_bytes(b"through systemd")
    assert fake_systemd.stop() == 0, fake_systemd.log()
    assert not os.path.ismount(mountpoint)
    assert blob_names(container) == ["docker/hello"]


def test_unit_restarts_over_a_crashed_mount(
        fake_systemd: FakeSystemd, azurite: Azurite, container, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    write_instance_config(fake_systemd, azurite, container.container_name, mountpoint)
    assert "READY=1" in fake_systemd.start()
    (mountpoint / "kept").write_bytes(b"committed on close")
    assert fake_systemd.process is not None
    fake_systemd.process.kill()  # what Restart=on-failure recovers from
    fake_systemd.process.wait()
    with pytest.raises(OSError):
        os.listdir(mountpoint)  # the kernel still holds the dead mount

    assert "READY=1" in fake_systemd.start(), fake_systemd.log()
    assert os.listdir(mountpoint) == ["kept"]
    assert fake_systemd.stop() == 0


def test_accountkey_file_without_credentials_directory_is_explained(tmp_path: Path) -> None:
    config_file = tmp_path / "x.yml"
    config_file.write_text("accountname: acct\ncontainer: registry\n"
                           "accountkey_file: ${CREDENTIALS_DIRECTORY}/accountkey\n"
                           f"mountpoint: {tmp_path}\n")
    env = {k: v for k, v in os.environ.items()
           if k != "CREDENTIALS_DIRECTORY" and not k.startswith("AZURE_")}
    result = subprocess.run([str(VENV_BIN / "azregfs"), "mount", "--config", str(config_file)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "CREDENTIALS_DIRECTORY" in result.stderr


# -- mount(8) and /etc/fstab -----------------------------------------------------------------

def test_helper_translates_mount_arguments() -> None:
    assert translate(["registry", "/var/lib/r", "-o", "rw,_netdev,config=/etc/a.yml"]) == [
        "mount", "-o", "rw,_netdev,config=/etc/a.yml", "registry", "/var/lib/r"]
    assert translate(["none", "/m", "-n", "-ouid=5", "-t", "fuse.azregfs"]) == [
        "mount", "-o", "uid=5", "/m"]
    assert translate(["c", "/m", "-fv", "-o", "ro"]) is None  # mount -f: pretend
    with pytest.raises(SystemExit):
        translate(["only-one"])


@pytest.fixture
def helper_link() -> Iterator[Path]:
    """/sbin/mount.fuse.azregfs, where mount(8) looks, pointing at this checkout's entry
    point for the test (another checkout's link may be there); restored afterwards."""
    ours = VENV_BIN / "mount.fuse.azregfs"
    if HELPER_LINK.exists() and not HELPER_LINK.is_symlink():
        pytest.skip(f"{HELPER_LINK} is an installed file, not a link this test may redirect")
    previous = os.readlink(HELPER_LINK) if HELPER_LINK.is_symlink() else None
    try:
        temporary = HELPER_LINK.with_name(HELPER_LINK.name + ".test")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(ours)
        temporary.replace(HELPER_LINK)
    except OSError as exc:
        pytest.skip(f"cannot link {HELPER_LINK}: {exc.strerror}")
    yield HELPER_LINK
    if previous is None:
        HELPER_LINK.unlink()
    elif previous != str(ours):
        HELPER_LINK.unlink()
        HELPER_LINK.symlink_to(previous)


def _unmount_and_wait(mountpoint: Path) -> None:
    if not os.path.ismount(mountpoint):
        return
    pid = int(control.read(mountpoint, "pid"))
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def test_mount_command_with_fstab_options(
        helper_link: Path, azurite: Azurite, container, tmp_path: Path) -> None:
    mountpoint = tmp_path / "registry"
    mountpoint.mkdir()
    config_file = tmp_path / "registry.yml"
    config_file.write_text(f"connection_string: '{azurite.connection_string}'\n")
    os.chmod(config_file, 0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    try:
        result = subprocess.run(
            ["mount", "-t", "fuse.azregfs", "-o", f"_netdev,config={config_file}",
             container.container_name, str(mountpoint)],
            env=env, capture_output=True, text=True, timeout=60)
        # mount(8) returns once the helper's daemon has the mount live.
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mountpoint)
        found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", str(mountpoint)],
                               capture_output=True, text=True, check=True).stdout.split()
        assert found == ["fuse.azregfs", f"azregfs:{container.container_name}"]
        (mountpoint / "from-fstab").write_bytes(b"x")
        assert blob_names(container) == ["from-fstab"]
    finally:
        _unmount_and_wait(mountpoint)
    assert not os.path.ismount(mountpoint)


def test_mount_command_reports_a_failure(
        helper_link: Path, azurite: Azurite, tmp_path: Path) -> None:
    mountpoint = tmp_path / "registry"
    mountpoint.mkdir()
    config_file = tmp_path / "registry.yml"
    config_file.write_text(f"connection_string: '{azurite.connection_string}'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    try:
        result = subprocess.run(
            ["mount", "-t", "fuse.azregfs", "-o", f"config={config_file}", "no-such-container",
             str(mountpoint)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert "no-such-container" in result.stderr
        assert not os.path.ismount(mountpoint)
    finally:
        _unmount_and_wait(mountpoint)


def test_example_instance_config_is_valid(tmp_path: Path, monkeypatch) -> None:
    try:
        registry_user = pwd.getpwnam("docker-registry")
    except KeyError:
        pytest.skip("no docker-registry user (the docker-registry package creates it)")
    (tmp_path / "accountkey").write_text(DEV_KEY + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = config.build(str(UNIT_DIR / "registry.yml.example"), {}, {}, {})
    assert cfg.accountkey == DEV_KEY
    assert (cfg.mountpoint, cfg.uid, cfg.allow_other) == (
        "/var/lib/docker-registry", registry_user.pw_uid, True)
