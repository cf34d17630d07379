"""scripts/setup.sh, the set-up step of both README commands, run for real: as a user without
root or sudo, with a pip that cannot install anything, and the packaging's own warnings."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

USER = "ddpd-nosudo"


def copy_repo(dest: Path) -> Path:
    """The tracked files of this checkout (as a fresh clone has them) under dest."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def setup_sh(repo: Path, *args: str, user: str | None = None, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    cmd = ["bash", str(repo / "scripts" / "setup.sh"), *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=env or dict(os.environ))


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp folder another user can enter (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ddpd-setup-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a user without sudo")
def test_setup_as_a_user_without_sudo_skips_the_root_steps_and_succeeds(shared_tmp: Path
                                                                        ) -> None:
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/bash", USER], check=True)
    repo = copy_repo(shared_tmp / "repo")
    subprocess.run(["chown", "-R", f"{USER}:", str(repo)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_USER", "HOME")}
    # The user's .venv from an earlier install, stamped for this pyproject.toml (installing torch
    # again would take minutes; what is under test is everything around it).
    subprocess.run(["runuser", "-u", USER, "--", "python3", "-m", "venv", "--without-pip",
                    str(repo / ".venv")], check=True, env=env)
    digest = hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest()
    for stamp in (".ddp-diffusion", ".ddp-diffusion-dev"):
        (repo / ".venv" / stamp).write_text(digest + "\n")

    for args in ((), ("--test",)):  # `make demo` and `make test` (the demo's once died here)
        proc = setup_sh(repo, *args, user=USER, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "setup: ready (.venv/bin/ddp-diffusion)"
        assert "Traceback" not in proc.stderr
    assert ("setup: skipping the SLURM packages (needs root or passwordless sudo); the SLURM "
            "tests will skip") in proc.stdout


def test_a_failing_pip_install_is_shown_fails_setup_and_stamps_nothing(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # pip with no package index and no config: it cannot fetch the build backend.
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
                "PYTHON": getattr(sys, "_base_executable", "python3")})
    proc = setup_sh(repo, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "setup: pip install -e . failed; the end of .setup-logs/pip.log:" in proc.stderr
    assert "No matching distribution found for setuptools" in proc.stderr  # pip's own words
    assert (repo / ".venv" / "bin" / "python").exists()
    assert not list((repo / ".venv").glob(".ddp-diffusion*"))  # nothing stamped "installed"


def test_installing_the_package_prints_no_warnings_about_its_packaging(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                           "install", "--no-deps", "-e", str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = (proc.stdout + proc.stderr).splitlines()
    # "WARNING: Location ... is ignored" comes from this machine's pip config, not from us.
    warnings = [ln for ln in out if "warn" in ln.lower() and "WARNING: Location" not in ln]
    assert warnings == [], "\n".join(out)
    assert "Successfully installed ddp-diffusion" in proc.stdout
