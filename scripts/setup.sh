#!/usr/bin/env bash
# Set up a Debian 12 machine for kvc, idempotently: system packages, a virtualenv with kvc and
# its test tools, and the real Debian kernel the tests and the demo run against.
# Usage: bash scripts/setup.sh            (as root, from anywhere)
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

die() { echo "setup: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (apt-get installs system packages)"
command -v apt-get >/dev/null || die "apt-get not found: this script is for Debian 12"

export DEBIAN_FRONTEND=noninteractive
packages=(python3 python3-venv python3-dev gcc make kmod util-linux ca-certificates
          linux-headers-amd64 xz-utils zstd
          podman buildah skopeo runc crun fuse-overlayfs slirp4netns netavark aardvark-dns
          containernetworking-plugins uidmap iptables conmon catatonit debootstrap systemd)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install failed"
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv || die "could not create .venv with /usr/bin/python3"
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]' || die "pip install of kvc failed"

# The real Debian kernel package the tests and the demo read (cached in ~/.cache/kvc-test).
.venv/bin/python - <<'PY'
import sys
sys.path.insert(0, "tests")
from support.debian_kernel import indexed_debian_kernel
kernel = indexed_debian_kernel()
print(f"setup: Debian kernel {kernel.release} unpacked in {kernel.root}")
PY
echo "setup: done"
