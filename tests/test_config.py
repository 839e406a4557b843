"""Unit tests of azregfs.config: sources and their precedence, parsing, derived values."""

from __future__ import annotations

from pathlib import Path

import pytest

from azregfs import config
from azregfs.config import Config, ConfigError

KEY = "c2VjcmV0LWtleS10aGF0LW11c3Qtbm90LWxlYWs="


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return str(path)


def test_precedence_file_env_options_flags(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "container: fromfile\naccountname: fileacct\n"
                                "rootdirectory: file/\nblock_size: 1M\numask: '077'\n")
    only_file = config.build(path, {}, {}, {})
    assert (only_file.container, only_file.accountname, only_file.rootdirectory) == (
        "fromfile", "fileacct", "file/")
    assert only_file.block_size == 1024 * 1024
    assert only_file.umask == 0o077

    env = {"AZURE_STORAGE_ACCOUNT": "envacct", "AZURE_STORAGE_KEY": KEY}
    with_env = config.build(path, env, {}, {})
    assert with_env.accountname == "envacct"
    assert with_env.accountkey == KEY

    options = {"accountname": "optacct", "rootdirectory": "opt", "block_size": "2M"}
    with_options = config.build(path, env, options, {})
    assert with_options.accountname == "optacct"
    assert with_options.rootdirectory == "opt"
    assert with_options.block_size == 2 * 1024 * 1024

    flags = {"accountname": "flagacct", "rootdirectory": None, "container": "fromflag"}
    with_flags = config.build(path, env, options, flags)
    assert with_flags.accountname == "flagacct"
    assert with_flags.container == "fromflag"
    assert with_flags.rootdirectory == "opt"  # a flag left unset (None) does not override


def test_environment_connection_string_and_sas() -> None:
    env = {"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=" + KEY,
           "AZURE_STORAGE_SAS_TOKEN": "sv=x&sig=y"}
    cfg = config.build(None, env, {}, {"container": "abc"})
    assert cfg.connection_string.endswith(KEY)
    assert cfg.sas_token == "sv=x&sig=y"


@pytest.mark.parametrize(("text", "expected"), [
    ("4M", 4 * 1024 * 1024),
    ("4MiB", 4 * 1024 * 1024),
    ("4mb", 4 * 1024 * 1024),
    ("512KiB", 512 * 1024),
    ("512k", 512 * 1024),
    ("1G", 1024 ** 3),
    ("2T", 2 * 1024 ** 4),
    ("1.5M", 3 * 512 * 1024),
    ("100", 100),
    (" 7 M ", 7 * 1024 * 1024),
    (12345, 12345),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert config.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "4X", "-1M", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        config.parse_size(text)


def test_bad_size_option_names_its_source() -> None:
    with pytest.raises(ConfigError, match="-o"):
        config.build(None, {"AZURE_STORAGE_ACCOUNT": "a"}, {"block_size": "lots"},
                     {"container": "abc"})


@pytest.mark.parametrize(("root", "prefix"), [
    ("", ""), ("/", "/"), ("a", "a/"), ("a/", "a/"), ("a/b", "a/b/"), ("/docker", "/docker/"),
])
def test_prefix(root: str, prefix: str) -> None:
    assert Config(rootdirectory=root).prefix == prefix


@pytest.mark.parametrize(("realm", "url"), [
    ("core.windows.net", "https://acct.blob.core.windows.net"),
    ("core.chinacloudapi.cn", "https://acct.blob.core.chinacloudapi.cn"),
    ("core.usgovcloudapi.net", "https://acct.blob.core.usgovcloudapi.net"),
])
def test_realm_endpoint(realm: str, url: str) -> None:
    assert Config(accountname="acct", realm=realm).account_url == url


def test_default_realm_and_explicit_endpoint() -> None:
    assert Config(accountname="acct").account_url == "https://acct.blob.core.windows.net"
    explicit = Config(accountname="acct", endpoint="http://127.0.0.1:1/devstoreaccount1/")
    assert explicit.account_url == "http://127.0.0.1:1/devstoreaccount1"
    with pytest.raises(ConfigError):
        _ = Config().account_url


def test_repr_never_shows_secrets() -> None:
    cfg = Config(accountname="acct", accountkey=KEY, container="abc",
                 connection_string=f"AccountName=acct;AccountKey={KEY}",
                 sas_token="sv=2021&sig=SASSIGNATURE")
    cfg.credentials.secret = "CLIENTSECRET"
    text = repr(cfg) + str(cfg)
    for secret in (KEY, "SASSIGNATURE", "CLIENTSECRET"):
        assert secret not in text
    assert "acct" in text


def test_registry_config_yml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, f"""
version: 0.1
storage:
  azure:
    accountname: devstoreaccount1
    accountkey: {KEY}
    container: registry
    realm: core.chinacloudapi.cn
    rootdirectory: /
http:
  addr: :5000
""")
    cfg = config.build(path, {}, {}, {})
    assert (cfg.accountname, cfg.accountkey, cfg.container) == ("devstoreaccount1", KEY, "registry")
    assert cfg.account_url == "https://devstoreaccount1.blob.core.chinacloudapi.cn"
    assert cfg.prefix == "/"


def test_registry_config_without_azure_is_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "storage:\n  filesystem:\n    rootdirectory: /var/lib/r\n")
    with pytest.raises(ConfigError, match="storage.azure"):
        config.build(path, {}, {}, {})


def test_unknown_option_names_it(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "container: abc\naccountname: a\nblocksize_typo: 1\n")
    with pytest.raises(ConfigError, match="blocksize_typo"):
        config.build(path, {}, {}, {})


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.build("/nonexistent/azregfs.yml", {}, {}, {})


@pytest.mark.parametrize("key", ["accountkey", "account_key", "connection_string", "sas_token",
                                 "connectionstring", "sastoken"])
def test_secrets_refused_on_the_command_line(key: str) -> None:
    with pytest.raises(ConfigError, match="ps"):
        config.build(None, {"AZURE_STORAGE_ACCOUNT": "a"}, {key: "x"}, {"container": "abc"})


def test_mount_options_parsing() -> None:
    ours, passthrough = config.parse_mount_options(
        "uid=1234,gid=4321,umask=027,allow_other,_netdev,x-systemd.automount,ro")
    assert ours == {"uid": "1234", "gid": "4321", "umask": "027", "allow_other": "true"}
    assert passthrough == {"_netdev", "x-systemd.automount", "ro"}
    cfg = config.build(None, {"AZURE_STORAGE_ACCOUNT": "a"}, ours, {"container": "abc"})
    assert (cfg.uid, cfg.gid, cfg.umask, cfg.allow_other) == (1234, 4321, 0o27, True)


def test_aliases() -> None:
    cfg = config.build(None, {}, {"serviceurl": "http://127.0.0.1:9/acct", "root": "reg"},
                       {"container": "abc"})
    assert cfg.endpoint == "http://127.0.0.1:9/acct"
    assert cfg.prefix == "reg/"


@pytest.mark.parametrize("name", ["Bad_Name", "ab", "a" * 64, "-abc", "abc-", "a--b", "UPPER"])
def test_invalid_container_names(name: str) -> None:
    with pytest.raises(ConfigError, match="container name"):
        config.build(None, {"AZURE_STORAGE_ACCOUNT": "a"}, {}, {"container": name})


def test_no_account_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no storage account"):
        config.build(None, {}, {}, {"container": "abc"})


def test_accountkey_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    cfg = config.build(None, {"AZURE_STORAGE_ACCOUNT": "a"},
                       {"accountkey_file": str(key_file)}, {"container": "abc"})
    assert cfg.accountkey == KEY
    with pytest.raises(ConfigError, match="accountkey_file"):
        config.build(None, {"AZURE_STORAGE_ACCOUNT": "a"},
                     {"accountkey_file": str(tmp_path / "missing")}, {"container": "abc"})


def test_dirty_budget_must_hold_two_blocks() -> None:
    with pytest.raises(ConfigError, match="dirty_budget"):
        config.build(None, {"AZURE_STORAGE_ACCOUNT": "a"},
                     {"block_size": "8M", "dirty_budget": "8M"}, {"container": "abc"})


def test_a_retired_option_still_mounts_with_a_warning(caplog) -> None:
    cfg = Config()
    config.apply(cfg, {"new_dir_timeout": "10", "dir_timeout": "2"}, "-o")
    assert cfg.dir_timeout == 2.0
    assert "'new_dir_timeout' is ignored" in caplog.text
