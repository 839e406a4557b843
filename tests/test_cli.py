"""The command-line contract: how `azregfs mount` / `unmount` start, stop and fail, and where
the configuration (and the account key) may come from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient
from conftest import Mount, azregfs_command, blob_names

from azregfs.demo.azurite import DEV_ACCOUNT, DEV_KEY, Azurite, free_port
from azregfs.fs import control

# Another key that is valid base64 of the right length, but not the account's.
WRONG_KEY = "A" * 86 + "=="
ERROR_TIMEOUT = 30  # a failing mount must give up by itself well before this


def only_connection_string(azurite: Azurite) -> dict[str, str]:
    """The caller's environment minus any Azure settings, plus one connection string."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    env["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
    return env


def no_azure_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}


def run_cli(*args: str, env: dict[str, str], timeout: float = ERROR_TIMEOUT,
            ) -> subprocess.CompletedProcess:
    return subprocess.run([*azregfs_command(), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def daemon_pid(path: Path) -> int:
    return int(control.read(path, "pid"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """A directory for mounts made by the test itself; never left mounted."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if os.path.ismount(path):
        try:
            pid = daemon_pid(path)
        except OSError:
            pid = 0
        subprocess.run(["fusermount3", "-u", str(path)], check=False)
        if pid and not wait_until(lambda: not pid_alive(pid), 30):
            os.kill(pid, signal.SIGKILL)
        if os.path.ismount(path):
            subprocess.run(["fusermount3", "-uz", str(path)], check=False)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    """Start `azregfs mount --foreground ARGS...` with exactly these arguments and env."""
    mounts: list[Mount] = []

    def start(*args: str, env: dict[str, str], name: str = "fg") -> Mount:
        mountpoint = tmp_path / name
        mountpoint.mkdir()
        log_path = tmp_path / f"{name}.log"
        command = [*azregfs_command(), "mount", "--foreground", "--log-level", "DEBUG", *args,
                   str(mountpoint)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        mount = Mount(mountpoint, process, log_path, command)
        mounts.append(mount)
        wait_until(lambda: os.path.ismount(mountpoint) or process.poll() is not None)
        assert os.path.ismount(mountpoint), mount.log()
        return mount

    yield start
    for mount in mounts:
        mount.unmount()


def assert_one_line_failure(result: subprocess.CompletedProcess, mountpoint: Path,
                            *words: str) -> None:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    assert not os.path.ismount(mountpoint)


# -- starting and stopping -----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_foreground_stops_on_signal(azurite: Azurite, mount_factory, container: ContainerClient,
                                    signum: int) -> None:
    mnt: Mount = mount_factory(container.container_name, env=only_connection_string(azurite))
    (mnt.path / "f").write_bytes(b"x")
    assert mnt.process.poll() is None
    assert_key_not_leaked(mnt.process.pid, mnt.log())
    mnt.process.send_signal(signum)
    assert mnt.process.wait(timeout=60) == 0, mnt.log()
    assert not os.path.ismount(mnt.path)
    assert blob_names(container) == ["f"]


def test_background_mount_and_unmount(azurite: Azurite, container: ContainerClient,
                                      mountpoint: Path) -> None:
    env = only_connection_string(azurite)
    result = run_cli("mount", container.container_name, str(mountpoint), env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mountpoint)  # live as soon as the command returned
    pid = daemon_pid(mountpoint)
    assert pid_alive(pid)
    (mountpoint / "f").write_bytes(b"background")
    unmounted = run_cli("unmount", str(mountpoint), env=env, timeout=90)
    assert unmounted.returncode == 0, unmounted.stderr
    assert not os.path.ismount(mountpoint)
    assert wait_until(lambda: not pid_alive(pid))  # unmount waits; this allows for reaping
    assert container.download_blob("f").readall() == b"background"


def test_background_daemon_stops_on_sigterm(azurite: Azurite, container: ContainerClient,
                                            mountpoint: Path) -> None:
    env = only_connection_string(azurite)
    result = run_cli("mount", container.container_name, str(mountpoint), env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(mountpoint)
    fd = os.open(mountpoint / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"pending")
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not pid_alive(pid), 60)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the mount is gone under the handle
            os.close(fd)
    assert not os.path.ismount(mountpoint)
    assert container.download_blob("f").readall() == b"pending"  # committed on the way out


def test_background_mount_and_fusermount(azurite: Azurite, container: ContainerClient,
                                         mountpoint: Path) -> None:
    env = only_connection_string(azurite)
    result = run_cli("mount", container.container_name, str(mountpoint), env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(mountpoint)
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    assert wait_until(lambda: not pid_alive(pid))
    assert not os.path.ismount(mountpoint)


def test_unmount_of_something_not_mounted(azurite: Azurite, mountpoint: Path) -> None:
    result = run_cli("unmount", str(mountpoint), env=only_connection_string(azurite))
    assert result.returncode != 0
    assert "not mounted" in result.stderr


# -- failures before mounting --------------------------------------------------------------


@pytest.mark.parametrize("foreground", [False, True])
def test_wrong_key(azurite: Azurite, container: ContainerClient, mountpoint: Path,
                   foreground: bool) -> None:
    env = no_azure_env()
    env["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string.replace(DEV_KEY, WRONG_KEY)
    args = ["--foreground"] if foreground else []
    result = run_cli("mount", *args, container.container_name, str(mountpoint), env=env)
    assert_one_line_failure(result, mountpoint, "account key", container.container_name)
    assert WRONG_KEY not in result.stderr


def test_unreachable_endpoint(container: ContainerClient, mountpoint: Path) -> None:
    port = free_port()  # nothing listens there
    env = no_azure_env()
    env["AZURE_STORAGE_CONNECTION_STRING"] = (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{DEV_ACCOUNT};")
    result = run_cli("mount", container.container_name, str(mountpoint), env=env)
    assert_one_line_failure(result, mountpoint, "reach", f"127.0.0.1:{port}")


def test_missing_container(azurite: Azurite, mountpoint: Path) -> None:
    name = "missing" + uuid.uuid4().hex[:10]
    result = run_cli("mount", name, str(mountpoint), env=only_connection_string(azurite))
    assert_one_line_failure(result, mountpoint, name, "does not exist", "--create-container")


def test_bad_container_name(azurite: Azurite, mountpoint: Path) -> None:
    result = run_cli("mount", "Bad_Name", str(mountpoint), env=only_connection_string(azurite))
    assert_one_line_failure(result, mountpoint, "Bad_Name", "container name")


def test_no_account_configured(mountpoint: Path) -> None:
    result = run_cli("mount", "somecontainer", str(mountpoint), env=no_azure_env())
    assert_one_line_failure(result, mountpoint, "account")


def test_mountpoint_must_be_a_directory(azurite: Azurite, container: ContainerClient,
                                        tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run_cli("mount", container.container_name, str(missing),
                     env=only_connection_string(azurite))
    assert_one_line_failure(result, missing, str(missing))


def test_create_container(azurite: Azurite, mount_factory) -> None:
    name = "created" + uuid.uuid4().hex[:10]
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    mnt = mount_factory(name, "--create-container")
    try:
        (mnt.path / "f").write_bytes(b"x")
        assert blob_names(service.get_container_client(name)) == ["f"]
    finally:
        mnt.unmount()
        service.delete_container(name)


# -- configuration sources and the key -----------------------------------------------------


@pytest.mark.parametrize("how", ["--config", "-o"])
def test_own_yaml_config_file(azurite: Azurite, container: ContainerClient, launch,
                              tmp_path: Path, how: str) -> None:
    container.upload_blob("sub/f", b"x")
    config = tmp_path / "azregfs.yml"
    config.write_text(f"connection_string: '{azurite.connection_string}'\n"
                      f"container: {container.container_name}\n"
                      "rootdirectory: sub\numask: '077'\n")
    args = ["--config", str(config)] if how == "--config" else ["-o", f"config={config}"]
    mnt = launch(*args, env=no_azure_env())
    assert os.listdir(mnt.path) == ["f"]
    assert os.stat(mnt.path / "f").st_mode & 0o777 == 0o600
    assert_key_not_leaked(mnt.process.pid, mnt.log())
    assert mnt.unmount() == 0


def registry_config(tmp_path: Path, container: str, key: str = DEV_KEY) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(f"""version: 0.1
log:
  level: info
storage:
  azure:
    accountname: {DEV_ACCOUNT}
    accountkey: "{key}"
    container: {container}
    realm: core.windows.net
http:
  addr: :5000
""")
    return path


def test_registry_config_with_endpoint_option(azurite: Azurite, container: ContainerClient,
                                              launch, tmp_path: Path) -> None:
    container.upload_blob("docker/registry/v2/repositories/x", b"1")
    config = registry_config(tmp_path, container.container_name)
    mnt = launch("--config", str(config), "-o", f"endpoint={azurite.endpoint}",
                 env=no_azure_env())
    assert os.listdir(mnt.path) == ["docker"]
    (mnt.path / "new").write_bytes(b"written")
    assert "new" in blob_names(container)
    assert_key_not_leaked(mnt.process.pid, mnt.log())


def test_registry_config_wrong_key_fails(azurite: Azurite, container: ContainerClient,
                                         mountpoint: Path, tmp_path: Path) -> None:
    config = registry_config(tmp_path, container.container_name, key=WRONG_KEY)
    result = run_cli("mount", "--config", str(config), "-o", f"endpoint={azurite.endpoint}",
                     str(mountpoint), env=no_azure_env())
    assert_one_line_failure(result, mountpoint, "account key")


def test_key_option_on_the_command_line_is_refused(azurite: Azurite, container: ContainerClient,
                                                   mountpoint: Path) -> None:
    result = run_cli("mount", "-o", f"accountkey={DEV_KEY},accountname={DEV_ACCOUNT}",
                     "--endpoint", azurite.endpoint, container.container_name, str(mountpoint),
                     env=no_azure_env())
    assert_one_line_failure(result, mountpoint, "ps")
    assert DEV_KEY not in result.stderr


def assert_key_not_leaked(pid: int, log: str) -> None:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert DEV_KEY not in cmdline
    assert DEV_KEY[:20] not in log and "AccountKey=" not in log
    assert "DEBUG" in log  # the log really was at DEBUG level


def test_key_from_environment_stays_out_of_log_and_cmdline(
        azurite: Azurite, container: ContainerClient, mount_factory) -> None:
    env = {"AZURE_STORAGE_CONNECTION_STRING": "", "AZURE_STORAGE_ACCOUNT": DEV_ACCOUNT,
           "AZURE_STORAGE_KEY": DEV_KEY}
    mnt = mount_factory(container.container_name, "--endpoint", azurite.endpoint, env=env)
    (mnt.path / "d").mkdir()
    (mnt.path / "d" / "f").write_bytes(b"x" * 100_000)
    assert (mnt.path / "d" / "f").read_bytes() == b"x" * 100_000
    os.listdir(mnt.path / "d")
    assert_key_not_leaked(mnt.process.pid, mnt.log())


def test_background_daemon_keeps_the_key_out_of_cmdline(
        azurite: Azurite, container: ContainerClient, mountpoint: Path, tmp_path: Path) -> None:
    config = registry_config(tmp_path, container.container_name)
    log_file = tmp_path / "daemon.log"
    result = run_cli("mount", "--config", str(config), "-o", f"endpoint={azurite.endpoint}",
                     "--log-level", "DEBUG", "--log-file", str(log_file), str(mountpoint),
                     env=no_azure_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    pid = daemon_pid(mountpoint)
    (mountpoint / "f").write_bytes(b"x")
    assert_key_not_leaked(pid, log_file.read_text())
    assert run_cli("unmount", str(mountpoint), env=no_azure_env(), timeout=90).returncode == 0


# -- the environment's HTTP proxy ---------------------------------------------------------


def proxy_env(proxy_url: str, no_proxy: str) -> dict[str, str]:
    """HTTP(S)_PROXY and NO_PROXY in both spellings (the lower case one wins in requests)."""
    env: dict[str, str] = {}
    for name in ("http_proxy", "https_proxy"):
        env[name] = env[name.upper()] = proxy_url
    env["no_proxy"] = env["NO_PROXY"] = no_proxy
    return env


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"])
def test_the_environments_http_proxy_carries_every_request_unless_no_proxy_names_the_endpoint(
        mount_factory, azurite: Azurite, container: ContainerClient, no_proxy: str) -> None:
    """As every HTTP client an operator knows: HTTP_PROXY is used, NO_PROXY is honoured
    (read once at start, not on every request)."""
    from testkit.faultproxy import FaultProxy

    with FaultProxy(azurite.port) as proxy:
        mnt = mount_factory(container.container_name,
                            env=proxy_env(proxy.url, no_proxy))
        (mnt.path / "f").write_bytes(b"through the proxy")
        assert (mnt.path / "f").read_bytes() == b"through the proxy"
        assert container.download_blob("f").readall() == b"through the proxy"
        seen = proxy.counts()
        if no_proxy:
            assert not seen, seen
        else:
            assert seen.get("put", 0) >= 1 and seen.get("list", 0) >= 1, seen
            counted = mnt.stats()["driver"]["requests"]  # (the start's probe is not in it)
            assert all(seen.get(op, 0) >= count for op, count in counted.items()), (seen, counted)
