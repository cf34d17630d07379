"""Helpers to run tests against a private single-machine SLURM cluster.

The cluster is started and stopped by the scripts in ``slurm/dev-cluster/``
(munged, MariaDB, slurmdbd, slurmctld and one slurmd per node, all under one
folder). This module is not a test file; use it from tests like (with
``tests/`` on ``sys.path``, as pytest's default rootdir-relative import gives)::

    from slurm_cluster import cluster_unavailable_reason, slurm_cluster

    def test_something(tmp_path_factory, monkeypatch):
        reason = cluster_unavailable_reason()
        if reason:
            pytest.skip(reason)
        with slurm_cluster(nodes=2, base_dir=short_dir) as env:
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            ...

``base_dir`` must be short (unix socket paths live under it): prefer
``tempfile.mkdtemp(prefix="slurm-", dir="/tmp")`` over pytest's ``tmp_path``.
Job ids restart at 1 for every cluster, so give submitit a fresh folder each time.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO_ROOT / "slurm" / "dev-cluster"

REQUIRED_BINARIES = (
    "munged",
    "mungekey",
    "mariadbd",
    "mariadb-install-db",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sacctmgr",
    "sacct",
    "sbatch",
    "sinfo",
)
MAX_BASE_DIR_LEN = 87  # unix socket paths (<= 107 bytes) are created under it
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 120.0
INSTALL_TIMEOUT_S = 900.0


class SlurmClusterError(RuntimeError):
    """A dev-cluster script failed; the message holds its output."""


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return shutil.which(name, path=path)


def _missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if _which(b) is None]


def _run_script(name: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    script = SCRIPTS_DIR / name
    try:
        return subprocess.run(
            ["bash", str(script), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise SlurmClusterError(
            f"{name} {' '.join(args)} timed out after {timeout:.0f}s\n{out}\n{err}"
        ) from exc


@functools.cache
def cluster_unavailable_reason(install: bool = True) -> str | None:
    """Why a dev SLURM cluster cannot be started here, or None if it can.

    With ``install`` (the default), missing Debian packages are installed with
    ``slurm/dev-cluster/install.sh`` (root only, takes ~30 s). The answer is cached.
    """
    if not sys.platform.startswith("linux"):
        return f"dev SLURM cluster needs Linux (this is {sys.platform})"
    if not (SCRIPTS_DIR / "start.sh").is_file():
        return f"dev SLURM cluster scripts not found in {SCRIPTS_DIR}"
    if shutil.which("bash") is None:
        return "dev SLURM cluster needs bash"
    if os.geteuid() != 0:
        return "dev SLURM cluster needs root (slurmd runs as root and /etc/hosts is edited)"
    missing = _missing_binaries()
    if not missing:
        return None
    what = f"SLURM packages not installed (missing {', '.join(missing)})"
    if not install:
        return f"{what}; run {SCRIPTS_DIR / 'install.sh'}"
    if shutil.which("apt-get") is None:
        return f"{what} and apt-get is not available"
    proc = _run_script("install.sh", [], timeout=INSTALL_TIMEOUT_S)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        return f"could not install SLURM packages (install.sh exit {proc.returncode}): {tail}"
    missing = _missing_binaries()
    if missing:
        return f"SLURM packages installed but still missing: {', '.join(missing)}"
    return None


def _check_base_dir(base_dir: Path) -> Path:
    base_dir = Path(base_dir).absolute()
    if len(str(base_dir)) > MAX_BASE_DIR_LEN:
        raise ValueError(
            f"base_dir {base_dir} is too long ({len(str(base_dir))} > {MAX_BASE_DIR_LEN} "
            "characters) for the unix sockets under it; use e.g. "
            "tempfile.mkdtemp(prefix='slurm-', dir='/tmp')"
        )
    return base_dir


def read_env_file(env_file: Path) -> dict[str, str]:
    """Parse the ``export KEY=VALUE`` lines of a cluster's ``env.sh``."""
    env: dict[str, str] = {}
    for line in env_file.read_text().splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export ") :].split("=", 1)
            env[key.strip()] = value.strip().strip("'\"")
    return env


def start_cluster(nodes: int, base_dir: Path) -> dict[str, str]:
    """Start a dev SLURM cluster with ``nodes`` nodes (1 or 2) under ``base_dir``.

    Returns the environment variables clients need (``SLURM_CONF``). Raises
    :class:`SlurmClusterError` with the script output when it fails.
    """
    if nodes not in (1, 2):
        raise ValueError(f"nodes must be 1 or 2, got {nodes}")
    base_dir = _check_base_dir(base_dir)
    proc = _run_script("start.sh", ["--nodes", str(nodes), "--dir", str(base_dir)], START_TIMEOUT_S)
    if proc.returncode != 0:
        raise SlurmClusterError(
            f"start.sh failed (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
        )
    env = read_env_file(base_dir / "env.sh")
    if "SLURM_CONF" not in env:
        raise SlurmClusterError(f"start.sh wrote no SLURM_CONF to {base_dir / 'env.sh'}")
    return env


def stop_cluster(base_dir: Path, keep: bool = False) -> None:
    """Stop the dev SLURM cluster under ``base_dir`` and remove it (unless ``keep``)."""
    base_dir = Path(base_dir).absolute()
    args = ["--dir", str(base_dir)] + (["--keep"] if keep else [])
    proc = _run_script("stop.sh", args, STOP_TIMEOUT_S)
    if proc.returncode != 0:
        raise SlurmClusterError(
            f"stop.sh failed (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
        )


@contextmanager
def slurm_cluster(nodes: int, base_dir: Path) -> Iterator[dict[str, str]]:
    """Context manager: start a cluster, yield its client env vars, always stop it."""
    try:
        env = start_cluster(nodes, base_dir)
    except BaseException:
        stop_cluster(base_dir)
        raise
    try:
        yield env
    finally:
        stop_cluster(base_dir)
