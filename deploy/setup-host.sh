#!/usr/bin/env bash
# Prepare this host for vpnr: Debian packages, kernel headers for bcc, bpffs, the admin
# group, the virtualenv with the project installed, and the lab IdP. Idempotent: run it
# again at any time. Usage: sudo bash deploy/setup-host.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${VPNR_VENV:-$repo/.venv}"

log() { printf '== %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
	echo "setup-host.sh: run as root (it installs packages and mounts bpffs)" >&2
	exit 1
fi

packages=(
	python3 python3-venv python3-dev python3-bpfcc bpfcc-tools libbpf1 bpftool
	clang llvm gcc make linux-headers-amd64
	iproute2 iputils-ping ethtool tcpdump iperf3 nftables util-linux passwd procps
	nodejs npm curl ca-certificates wireguard-go wireguard-tools zsh fish prometheus
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A machine may carry its own Node.js build (node and npm on PATH): keep it.
if command -v node >/dev/null && command -v npm >/dev/null; then
	missing=("${missing[@]/nodejs/}"); missing=("${missing[@]/npm/}")
fi
read -r -a missing <<<"${missing[*]}"
if [ "${#missing[@]}" -gt 0 ]; then
	log "installing Debian packages: ${missing[*]}"
	apt-get update -q
	# prometheus is here for promtool only: its postinst would start a Prometheus server.
	# A policy-rc.d refuses that one start (and defers to the host's own for the rest).
	policy=/usr/sbin/policy-rc.d saved=""
	if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
	restore_policy() { if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi; }
	trap restore_policy EXIT
	printf '#!/bin/sh\ncase "$1" in prometheus|prometheus.service) exit 101 ;; esac\n%s\nexit 0\n' \
		"${saved:+exec sh $saved \"\$@\"}" >"$policy"
	chmod 0755 "$policy"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
	restore_policy; trap - EXIT
	if [[ " ${missing[*]} " == *" prometheus "* ]]; then
		# Nor at boot: the package enabled the service.
		systemctl disable prometheus.service >/dev/null 2>&1 || true
		update-rc.d prometheus disable >/dev/null 2>&1 || true
	fi
fi

# bcc compiles against /lib/modules/$(uname -r)/build. This kernel is not Debian's, so point
# the links at the Debian headers (DESIGN.md, platform facts).
release=$(uname -r)
headers=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
if [ -z "$headers" ] || [ -z "$common" ]; then
	echo "setup-host.sh: no Debian kernel headers under /usr/src" >&2
	exit 1
fi
mkdir -p "/lib/modules/$release"
[ -e "/lib/modules/$release/build" ] || ln -sfn "$headers" "/lib/modules/$release/build"
[ -e "/lib/modules/$release/source" ] || ln -sfn "$common" "/lib/modules/$release/source"

if ! mountpoint -q /sys/fs/bpf; then
	log "mounting bpffs on /sys/fs/bpf"
	mount -t bpf bpf /sys/fs/bpf
fi
[ -e /sys/kernel/btf/vmlinux ] || echo "warning: /sys/kernel/btf/vmlinux missing: no BTF" >&2

getent group vpnr-admin >/dev/null || { log "creating group vpnr-admin"; groupadd --system vpnr-admin; }
getent group vpnr-viewer >/dev/null || { log "creating group vpnr-viewer"; groupadd --system vpnr-viewer; }
getent passwd vpnr-idpd >/dev/null || { log "creating user vpnr-idpd"; useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vpnr-idpd; }
install -d -m 0755 /run/vpnr /var/lib/vpnr

# bcc is only packaged for Debian's interpreter: build the venv from it, seeing its packages.
if [ ! -x "$venv/bin/python" ]; then
	log "creating virtualenv $venv"
	/usr/bin/python3 -m venv --system-site-packages "$venv"
fi
log "installing vpnr into $venv"
"$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$venv/bin/python" -m pip install -q -e "$repo[dev]"
"$venv/bin/python" -c "import bcc, vpnr.v1.policy_pb2" \
	|| { echo "setup-host.sh: bcc or the generated stubs are not importable" >&2; exit 1; }

if [ -f "$repo/deploy/idp/package-lock.json" ]; then
	log "installing the lab IdP (npm ci)"
	(cd "$repo/deploy/idp" && npm ci --no-audit --no-fund --loglevel=error)
fi

log "host ready: $venv/bin/vpnr-lab demo"
