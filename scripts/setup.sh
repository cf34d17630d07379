#!/usr/bin/env bash
# Set up everything ddp-diffusion needs: system packages (when root or with sudo) and .venv.
#   scripts/setup.sh          the demo's needs: Fashion-MNIST from Debian, the package
#   scripts/setup.sh --test   also the test tools (pytest, ruff) and a private SLURM's packages
# apt and pip write their output to .setup-logs/; a step that fails prints the end of its log
# and ends the setup with a non-zero status. .venv is stamped "installed" (with the hash of
# pyproject.toml) only after the package imports, so a broken install is retried next time.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1
logs=.setup-logs
mkdir -p "$logs"

fail() {  # fail WHAT LOG: report a failed step with the end of its log, and stop
  echo "setup: $1 failed; the end of $2:" >&2
  tail -n 25 "$2" | sed 's/^/  | /' >&2
  exit 1
}

can_sudo() {  # root, or passwordless sudo
  [[ $(id -u) -eq 0 ]] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo -n "$@"; fi
}

apt_install() {  # apt_install PKG...: install what is missing, politely skip when we cannot
  local missing=() p log="$logs/apt.log"
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [[ ${#missing[@]} -eq 0 ]]; then return 0; fi
  if ! command -v apt-get >/dev/null; then
    echo "setup: no apt-get here; install ${missing[*]} yourself (the demo downloads" \
         "Fashion-MNIST instead)"
    return 0
  fi
  if ! can_sudo; then
    echo "setup: skipping 'apt-get install ${missing[*]}' (needs root or passwordless sudo);" \
         "the demo downloads Fashion-MNIST instead"
    return 0
  fi
  echo "setup: apt-get install ${missing[*]} (log: $log)"
  { as_root apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}"; } \
    >"$log" 2>&1 || fail "apt-get install ${missing[*]}" "$log"
}

apt_install dataset-fashion-mnist
if [[ $want_test -eq 1 ]]; then
  if can_sudo; then
    echo "setup: SLURM packages for the dev cluster (log: $logs/apt-slurm.log)"
    slurm/dev-cluster/install.sh >"$logs/apt-slurm.log" 2>&1 \
      || fail "installing the SLURM packages" "$logs/apt-slurm.log"
  else
    echo "setup: skipping the SLURM packages (needs root or passwordless sudo); the SLURM" \
         "tests will skip"
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
hash=$(sha256sum pyproject.toml | cut -c1-64)
stamped() { [[ -f $1 && $(<"$1") == "$hash" ]]; }
if [[ $want_test -eq 1 ]]; then stamp=.venv/.ddp-diffusion-dev extra="[dev]"
else stamp=.venv/.ddp-diffusion extra=""
fi
# The dev install holds everything the plain one does.
if ! stamped "$stamp" && ! { [[ $want_test -eq 0 ]] && stamped .venv/.ddp-diffusion-dev; }; then
  log="$logs/pip.log"
  echo "setup: installing ddp-diffusion$extra into .venv (first time: a few minutes, torch is" \
       "large; log: $log)"
  : >"$log"
  .venv/bin/python -m pip install --upgrade pip >>"$log" 2>&1 || fail "upgrading pip" "$log"
  .venv/bin/python -m pip install -e ".$extra" >>"$log" 2>&1 \
    || fail "pip install -e .$extra" "$log"
  # diffusers too: diffusion.py imports it only when a dpm++ or unipc sampler is built
  .venv/bin/python -c "import ddp_diffusion.train, diffusers" >>"$log" 2>&1 \
    || fail "importing the installed package" "$log"
  echo "$hash" >"$stamp"
fi
echo "setup: ready (.venv/bin/ddp-diffusion)"
