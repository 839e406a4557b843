"""distribution's own definition of a storage backend: its storage-driver conformance suite
(Debian's distribution 2.8.2 source, the `filesystem` driver's test binary) run with its
root on a fresh mount of a fresh container. Every test, 5 GiB stream included.

The binary is built once from Debian's packaged source (scripts/install installs
golang-go, golang-github-docker-distribution-dev and golang-gopkg-check.v1-dev) into
.cache/ beside the checkout, and rebuilt when that package changes.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import need

PACKAGE = "github.com/docker/distribution/registry/storage/driver/filesystem"
GOPATH = "/usr/share/gocode"
CACHE = Path(__file__).resolve().parent.parent / ".cache"


def _debian_version(package: str) -> str | None:
    found = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                           capture_output=True, text=True, check=False)
    return found.stdout.strip() or None


def suite_binary() -> Path:
    need("go")
    version = _debian_version("golang-github-docker-distribution-dev")
    if version is None or not Path(GOPATH, "src", PACKAGE).is_dir():
        pytest.skip("Debian's golang-github-docker-distribution-dev is not installed "
                    "(scripts/install installs it)")
    binary = CACHE / f"distribution-{version}-filesystem.test"
    if not binary.exists():
        CACHE.mkdir(exist_ok=True)
        env = {**os.environ, "GOPATH": GOPATH, "GO111MODULE": "off", "GOFLAGS": "",
               "GOCACHE": str(CACHE / "go-build")}
        subprocess.run(["go", "test", "-c", "-o", f"{binary}.tmp", PACKAGE], env=env,
                       check=True, timeout=600)
        os.replace(f"{binary}.tmp", binary)
    return binary


@pytest.mark.slow
def test_distribution_storage_driver_suite_passes_on_the_mount(mnt, tmp_path: Path) -> None:
    binary = suite_binary()
    # The suite's root is ioutil.TempDir("", "driver-"): TMPDIR puts it on the mount.
    result = subprocess.run(
        [str(binary), "-test.v", "-check.v", "-test.timeout", "40m"],
        env={**os.environ, "TMPDIR": str(mnt.path)}, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=45 * 60,
        check=False)
    log = tmp_path / "suite.log"
    log.write_text(result.stdout)
    failures = [line for line in result.stdout.splitlines()
                if line.startswith(("FAIL:", "PANIC:", "MISS:", "... Error", "OOPS:"))]
    summary = re.findall(r"^(?:OK|OOPS): .*$", result.stdout, re.MULTILINE)
    assert result.returncode == 0 and not failures, (
        f"suite exited {result.returncode}: {summary} {failures[:10]}\n"
        f"{result.stdout[-3000:]}\nmount log: {mnt.log()[-3000:]}")
    # Every test ran: 34 in 2.8.2's suite, the 5 GiB stream among them.
    assert summary and re.match(r"OK: (\d+) passed$", summary[0]), summary
    assert int(summary[0].split()[1]) >= 34, summary
    assert "DriverSuite.TestWriteReadLargeStreams" in result.stdout
    left = [os.path.join(top, name) for top, _, names in os.walk(mnt.path) for name in names]
    assert left == [], f"files the suite removed are still there: {left[:10]}"
