"""Configuration: every option, where it comes from, and how it is validated.

Sources, later ones winning: a YAML file (our own flat keys, or a registry's ``config.yml``
whose ``storage.azure`` section is read), the environment, ``-o key=value,...`` mount
options, command-line flags. The account key never needs a command line: it comes from a
file, a key file, or the environment, and ``repr`` of a Config never shows it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

log = logging.getLogger(__name__)
MiB = 1024 * 1024

SECRET_KEYS = frozenset({"accountkey", "connection_string", "sas_token", "secret"})
# Keys whose value must never be given on a command line, where `ps` would show it.
COMMAND_LINE_FORBIDDEN = SECRET_KEYS

CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")


class ConfigError(ValueError):
    """A configuration problem, described in one line an operator can act on."""


@dataclass
class Credentials:
    type: str = ""  # shared_key | client_secret | default_credentials ("" = infer)
    clientid: str = ""
    tenantid: str = ""
    secret: str = field(default="", repr=False)


@dataclass
class Config:
    # The registry azure driver's parameters, same names and meaning.
    accountname: str = ""
    accountkey: str = field(default="", repr=False)
    container: str = ""
    realm: str = "core.windows.net"
    rootdirectory: str = ""
    # Beyond the driver.
    endpoint: str = ""  # explicit service URL (Azurite, private endpoints)
    connection_string: str = field(default="", repr=False)
    sas_token: str = field(default="", repr=False)
    accountkey_file: str = ""
    credentials: Credentials = field(default_factory=Credentials)
    create_container: bool = False
    # Presentation.
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int = 0o022
    allow_other: bool = False
    # Caching and consistency (seconds).
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    dir_timeout: float = 1.0
    dir_entry_timeout: float = 10.0  # a directory's own entry; its listing has dir_timeout
    revalidate_window: float = 1.0
    # FUSE's writeback cache: small writes are gathered by the kernel (32 KiB writes as fast
    # as 1 MiB ones), but a descriptor opened before another host changed the file keeps
    # its old size (README, "Writeback cache").
    writeback_cache: bool = False
    marker_delay: float = 2.0  # an empty directory's marker blob is written this late
    # Data path.
    listing_cache_size: int = 32 * MiB  # directory listings kept for dir_timeout
    max_inodes: int = 250_000  # past it, the kernel is asked to drop its oldest entries
    block_size: int = 8 * MiB
    read_block_size: int = 1 * MiB
    dirty_budget: int = 256 * MiB
    cache_size: int = 256 * MiB
    cache_dir: str = ""
    cache_dir_size: int = 4096 * MiB
    read_ahead: int = 32 * MiB  # refilled half a window per ranged GET (8 MiB at most)
    kernel_read_ahead: int = 1 * MiB  # the mount's bdi read_ahead_kb (0: kernel default)
    max_concurrency: int = 16
    timeout: float = 30.0
    retries: int = 3  # SDK retries per request; lower makes a dead endpoint fail fast (EIO)
    # Daemon.
    mountpoint: str = ""  # where `azregfs mount` mounts when the command line names none
    log_level: str = "INFO"
    log_file: str = ""
    log_format: str = "text"  # text | json (one object per line)
    metrics_addr: str = ""  # host:port of the Prometheus endpoint (/metrics); "" = off

    @property
    def prefix(self) -> str:
        """The blob-name prefix that is the mount's root ('' or ending in '/')."""
        root = self.rootdirectory
        if not root:
            return ""
        return root.rstrip("/") + "/"

    @property
    def account_url(self) -> str:
        if self.endpoint:
            return self.endpoint.rstrip("/")
        if not self.accountname:
            raise ConfigError(
                "no storage account: set accountname, endpoint or a connection string"
            )
        return f"https://{self.accountname}.blob.{self.realm}"

    def validate(self) -> None:
        if not self.container:
            raise ConfigError("no container given")
        if not CONTAINER_NAME.match(self.container):
            raise ConfigError(
                f"invalid container name {self.container!r}: 3-63 characters of lowercase "
                "letters, digits and single hyphens, starting and ending with a letter or digit"
            )
        if len(self.prefix) > 512:
            raise ConfigError("rootdirectory is longer than 512 characters")
        if not (self.connection_string or self.endpoint or self.accountname):
            raise ConfigError(
                "no storage account configured: set accountname (and accountkey), endpoint, "
                "or AZURE_STORAGE_CONNECTION_STRING"
            )
        if self.credentials.type not in ("", "shared_key", "client_secret", "default_credentials"):
            raise ConfigError(f"unknown credentials type {self.credentials.type!r}")
        if self.block_size < 64 * 1024 or self.block_size > 4000 * MiB:
            raise ConfigError("block_size must be between 64 KiB and 4000 MiB")
        if self.dirty_budget < 2 * self.block_size:
            raise ConfigError("dirty_budget must be at least twice block_size")
        if self.max_inodes < 100:
            raise ConfigError("max_inodes must be at least 100")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        if self.metrics_addr:
            parse_address(self.metrics_addr)

    def load_key_file(self) -> None:
        if self.accountkey_file and not self.accountkey:
            # e.g. ${CREDENTIALS_DIRECTORY}/accountkey under systemd's LoadCredential=
            path = os.path.expandvars(self.accountkey_file)
            if "$" in path:
                raise ConfigError(f"accountkey_file {self.accountkey_file}: a variable in it "
                                  "is not set (CREDENTIALS_DIRECTORY outside systemd?)")
            try:
                with open(path) as handle:
                    self.accountkey = handle.read().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read accountkey_file: {exc.strerror}") from None


# -- parsing -------------------------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (all interfaces) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"not an address: {text!r} (example: 127.0.0.1:9469)")
    return host.strip("[]") or "0.0.0.0", int(port)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB, "t": 1024 * 1024 * MiB}
_ALIASES = {
    "serviceurl": "endpoint",
    "connectionstring": "connection_string",
    "sastoken": "sas_token",
    "account_name": "accountname",
    "account_key": "accountkey",
    "createcontainer": "create_container",
    "root": "rootdirectory",
}
# Options that once existed: accepted with a warning, so that an old fstab line still mounts.
_RETIRED = {
    "new_dir_timeout": "a directory made here is listed from this mount's own knowledge "
                       "for dir_timeout at most, like every other directory",
}
_BYTES_FIELDS = {"listing_cache_size", "block_size", "read_block_size", "dirty_budget",
                 "cache_size", "cache_dir_size", "read_ahead", "kernel_read_ahead"}


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"not a size: {text!r} (examples: 4M, 512KiB, 1G)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "")[:1].lower()])


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def _owner_id(name: str, value: str) -> int:
    """uid/gid given as a user or group name (e.g. docker-registry, whose id varies)."""
    import grp
    import pwd

    try:
        return pwd.getpwnam(value).pw_uid if name == "uid" else grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"no {'user' if name == 'uid' else 'group'} named {value!r}") from None


def _coerce(name: str, value: Any, current: Any) -> Any:
    if name in ("uid", "gid") and isinstance(value, str) and not value.strip().isdigit():
        return _owner_id(name, value.strip())
    if name in _BYTES_FIELDS:
        return parse_size(value)
    if name == "umask":
        return int(str(value), 8) if isinstance(value, str) else int(value)
    if isinstance(current, bool):
        return _parse_bool(value)
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return "" if value is None else str(value)


def apply(cfg: Config, values: dict[str, Any], source: str) -> None:
    """Set options from one source; unknown keys are an error that names the source."""
    names = {f.name for f in fields(Config)}
    for raw_key, value in values.items():
        key = _ALIASES.get(raw_key.lower(), raw_key.lower().replace("-", "_"))
        if key in _RETIRED:
            log.warning("%s: option %r is ignored: %s", source, raw_key, _RETIRED[key])
            continue
        if key == "credentials":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: credentials must be a mapping")
            for sub_key, sub_value in value.items():
                if sub_key not in ("type", "clientid", "tenantid", "secret"):
                    raise ConfigError(f"{source}: unknown credentials key {sub_key!r}")
                setattr(cfg.credentials, sub_key, "" if sub_value is None else str(sub_value))
            continue
        if key not in names:
            raise ConfigError(f"{source}: unknown option {raw_key!r}")
        try:
            setattr(cfg, key, _coerce(key, value, getattr(cfg, key)))
        except ValueError as exc:
            raise ConfigError(f"{source}: bad value for {raw_key}: {exc}") from None


def read_yaml(path: str) -> dict[str, Any]:
    """Our own flat file, or a registry config.yml (its storage.azure section)."""
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    storage = data.get("storage")
    if isinstance(storage, dict):
        azure = storage.get("azure")
        if not isinstance(azure, dict):
            raise ConfigError(f"{path} is a registry config without a storage.azure section")
        return dict(azure)
    return data


def from_environment(environ: dict[str, str] | os._Environ) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        values["connection_string"] = environ["AZURE_STORAGE_CONNECTION_STRING"]
    if environ.get("AZURE_STORAGE_ACCOUNT"):
        values["accountname"] = environ["AZURE_STORAGE_ACCOUNT"]
    if environ.get("AZURE_STORAGE_KEY"):
        values["accountkey"] = environ["AZURE_STORAGE_KEY"]
    if environ.get("AZURE_STORAGE_SAS_TOKEN"):
        values["sas_token"] = environ["AZURE_STORAGE_SAS_TOKEN"]
    return values


# Options that belong to FUSE/mount(8) rather than to us; accepted and passed through or ignored.
MOUNT_PASSTHROUGH = frozenset({"rw", "ro", "_netdev", "nofail", "noauto", "auto", "user",
                               "users", "nouser", "exec", "noexec", "suid", "nosuid", "dev",
                               "nodev", "defaults", "x-systemd.automount", "allow_root"})


def parse_mount_options(text: str) -> tuple[dict[str, str], set[str]]:
    """Split '-o a=b,c' into our options and flags passed through to FUSE/mount."""
    ours: dict[str, str] = {}
    passthrough: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if key in MOUNT_PASSTHROUGH or key.startswith("x-"):
            passthrough.add(item)
        elif key == "allow_other":
            ours["allow_other"] = "true"
        else:
            ours[key] = value if sep else "true"
    return ours, passthrough


def check_not_secret(values: dict[str, Any], source: str) -> None:
    for key in values:
        if _ALIASES.get(key.lower(), key.lower()) in COMMAND_LINE_FORBIDDEN:
            raise ConfigError(
                f"{source}: {key} on a command line would be visible in 'ps'; put it in the "
                "config file, accountkey_file, or the environment (AZURE_STORAGE_KEY)"
            )


def build(
    config_file: str | None,
    environ: dict[str, str] | os._Environ,
    mount_options: dict[str, str],
    flags: dict[str, Any],
) -> Config:
    cfg = Config()
    if config_file:
        apply(cfg, read_yaml(config_file), config_file)
    apply(cfg, from_environment(environ), "environment")
    check_not_secret(mount_options, "-o")
    apply(cfg, mount_options, "-o")
    apply(cfg, {k: v for k, v in flags.items() if v is not None}, "command line")
    cfg.load_key_file()
    cfg.validate()
    return cfg
