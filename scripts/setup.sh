#!/usr/bin/env bash
# Set up everything ddp-diffusion needs: system packages (when root or with sudo) and .venv.
#   scripts/setup.sh          the demo's needs: Fashion-MNIST from Debian, the package
#   scripts/setup.sh --test   also the test tools (pytest, ruff) and a private SLURM's packages
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 77
  fi
}

apt_install() {  # apt_install PKG...: install what is missing, politely skip when we cannot
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "setup: no apt-get here; install ${missing[*]} yourself (or set data.download=true)"; return 0
  fi
  if [[ $(id -u) -ne 0 ]] && ! (command -v sudo >/dev/null && sudo -n true 2>/dev/null); then
    echo "setup: skipping 'apt-get install ${missing[*]}' (needs root or passwordless sudo)"; return 0
  fi
  echo "setup: apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

apt_install dataset-fashion-mnist
if [[ $want_test -eq 1 && -x slurm/dev-cluster/install.sh ]]; then
  slurm/dev-cluster/install.sh || echo "setup: SLURM packages not installed; SLURM tests will skip"
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.ddp-diffusion-installed$([[ $want_test -eq 1 ]] && echo -dev)
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing ddp-diffusion into .venv (first time: a few minutes, torch is large)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  extra=$([[ $want_test -eq 1 ]] && echo "[dev]")
  .venv/bin/python -m pip install -q -e ".${extra}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import ddp_diffusion.train" # fail here, not later, if the install broke
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/ddp-diffusion)"
