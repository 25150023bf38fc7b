#!/usr/bin/env bash
# Install the Debian packages the tests need: the single-machine SLURM test cluster (Debian 12: SLURM 22.05,
# munge 0.5) and Chromium, which opens the Snakemake HTML report headless (tests/test_report_html.py; ~21 s
# and ~350 MB more when the package lists are fresh).
# Idempotent: when every package is already installed it returns in well under a second, so CI can call it
# unconditionally. Nothing auto-starts (no systemd in the containers); slurm/testcluster/start.sh runs the
# daemons by hand.
set -euo pipefail

# iproute2: `ip netns`, veth and bridge for the test cluster's two namespaced hosts (unshare and nsenter are in
# util-linux, always installed).
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server chromium iproute2)

missing=()
for p in "${PKGS[@]}"; do
    # dpkg-query prints "install ok installed" only for a fully configured package; a half-installed one
    # (e.g. an earlier apt run that was interrupted) counts as missing so we repair it.
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_debs: all present (${PKGS[*]})"
    exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

echo "install_debs: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Package lists are often absent in fresh containers; an install without update fails with "no candidate".
$SUDO apt-get update -qq
# --no-install-recommends keeps it to ~17 s; recommends drag in mail servers etc. that we never use.
# The mariadb-server postinst tries to start the server through invoke-rc.d; with no init system it just
# prints a warning, which is fine: start.sh runs its own private instance.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install_debs: done"
