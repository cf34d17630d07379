#!/usr/bin/env bash
# Install the Debian packages needed by the private dev SLURM cluster (start.sh).
# Idempotent: does nothing when every package is already installed.
set -euo pipefail

PKGS=(slurm-wlm slurm-client slurmdbd munge mariadb-server)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install.sh: all packages already installed (${PKGS[*]})"
    exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install.sh: need root (or passwordless sudo) to apt-get install ${missing[*]}" >&2
        exit 2
    fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: apt-get not found; install ${missing[*]} by hand (Debian/Ubuntu packages)" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh package lists only when they are missing or a package cannot be found.
need_update=0
if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
    need_update=1
else
    for p in "${missing[@]}"; do
        if ! apt-cache show "$p" >/dev/null 2>&1; then need_update=1; break; fi
    done
fi
if [[ $need_update -eq 1 ]]; then
    echo "install.sh: apt-get update"
    "${SUDO[@]}" apt-get update -q
fi

echo "install.sh: apt-get install ${missing[*]}"
# policy-rc.d keeps Debian's postinst from starting the system-wide daemons
# (munge, mariadb, slurm*): start.sh runs private instances instead.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod +x "$policy"
    created_policy=1
fi
rc=0
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
if [[ $created_policy -eq 1 ]]; then
    "${SUDO[@]}" rm -f "$policy"
fi
if [[ $rc -ne 0 ]]; then
    echo "install.sh: apt-get install failed (exit $rc)" >&2
    exit "$rc"
fi
echo "install.sh: done"
