"""A namespace cluster (launch/netns/cluster) for the multi-host tests.

Skipped, with the reason, where the machine cannot make network namespaces
(not root, no iproute2, or a kernel that refuses).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "launch" / "netns" / "cluster"
AGENT = ROOT / "launch" / "netns" / "agent"
BIN = Path(sys.executable).parent


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2 / util-linux)"
    probe = f"smprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this machine refuses network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Cluster:
    """N hosts in network namespaces; run commands on them, cut their links."""

    prefix: str
    size: int
    workdir: Path

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PREFIX=self.prefix,
            PATH=f"{BIN}:{env.get('PATH', '')}",
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    @property
    def hostnames(self) -> list[str]:
        return [f"{self.prefix}-h{i}" for i in range(1, self.size + 1)]

    def hostfile(self, slots: int) -> Path:
        listing = subprocess.run([str(CLUSTER), "hostfile", str(slots)], env=self.env,
                                 capture_output=True, text=True, check=True).stdout
        path = self.workdir / f"hostfile.{slots}"
        path.write_text(listing)
        return path

    def mpi_options(self) -> list[str]:
        """What mpirun needs to launch across the namespaces and fail fast."""
        return [
            "--prtemca", "plm_ssh_agent", str(AGENT),
            "--mca", "btl", "tcp,self",
            "--mca", "btl_tcp_if_include", "eth0",
            "--mca", "oob_tcp_if_include", "eth0",
            "--mca", "oob_tcp_keepalive_time", "2",
            "--mca", "oob_tcp_keepalive_intvl", "1",
            "--mca", "oob_tcp_keepalive_probes", "3",
        ]

    def command(self, host: int, *argv: str) -> list[str]:
        """argv run on host number ``host`` (1-based)."""
        return [str(CLUSTER), "exec", self.hostnames[host - 1], *argv]

    def link(self, host: int, state: str) -> None:
        subprocess.run([str(CLUSTER), "link", self.hostnames[host - 1], state], env=self.env,
                       check=True, capture_output=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"smt{uuid.uuid4().hex[:5]}"
    made = Cluster(prefix, 2, tmp_path_factory.mktemp("cluster"))
    up = subprocess.run([str(CLUSTER), "up", "2"], env=made.env, capture_output=True, text=True)
    try:
        if up.returncode != 0:
            pytest.fail(f"cluster up failed: {up.stderr}")
        yield made
    finally:
        subprocess.run([str(CLUSTER), "down"], env=made.env, capture_output=True)
