#!/usr/bin/env bash
# Render vpnr's systemd units and install them; starts and enables nothing.
#
# @BINDIR@ becomes the directory holding the daemons (the virtualenv's bin), @INSTANCE@ the
# router instance (the state directories systemd creates are named after it). The instance
# is taken from --instance, or else from the router config, validated by policyd itself.
#
# Usage: sudo bash deploy/systemd/install.sh --bindir /opt/vpnr/.venv/bin
#            [--instance NAME | --config /etc/vpnr/router.toml] [--root DIR]
# --root DIR installs into DIR/etc/systemd/system (a staging tree or a test) instead of /.
# Then: systemctl daemon-reload && systemctl enable --now vpnr.target
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
units=(vpnr.target vpnr-policyd.service vpnr-auditd.service vpnr-tunneld.service
	vpnr-idpd.service)
daemons=(policyd auditd tunneld idpd)

usage() { sed -n '8,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "install.sh: $*" >&2; exit 1; }

bindir="" instance="" config=/etc/vpnr/router.toml root=/
while [ $# -gt 0 ]; do
	case "$1" in
	--bindir) bindir=${2:?}; shift 2 ;;
	--instance) instance=${2:?}; shift 2 ;;
	--config) config=${2:?}; shift 2 ;;
	--root) root=${2:?}; shift 2 ;;
	-h | --help) usage ;;
	*) echo "install.sh: unknown argument $1" >&2; usage ;;
	esac
done
[ -n "$bindir" ] || usage
case "$bindir" in /*) ;; *) die "--bindir must be an absolute path (systemd needs one)" ;; esac
for daemon in "${daemons[@]}"; do
	[ -x "$bindir/$daemon" ] || die "$bindir/$daemon is missing or not executable"
done
if [ -z "$instance" ]; then
	# check-config prints: policyd: FILE: configuration is valid (instance 'NAME')
	out=$("$bindir/policyd" check-config --config "$config") || die "cannot read the instance from $config"
	instance=$(sed -n "s/.*(instance '\(.*\)')\$/\1/p" <<<"$out")
fi
# The same rule as router.instance in the config (services/core/config.py).
[[ "$instance" =~ ^[a-z0-9][a-z0-9_-]{0,23}$ ]] || die "not a router instance name: '$instance'"

target="${root%/}/etc/systemd/system"
install -d -m 0755 "$target"
for unit in "${units[@]}"; do
	tmp=$(mktemp "$target/.$unit.XXXXXX")
	sed -e "s|@BINDIR@|$bindir|g" -e "s|@INSTANCE@|$instance|g" "$here/$unit" >"$tmp"
	chmod 0644 "$tmp"
	mv -f "$tmp" "$target/$unit"  # atomic: systemd never reads a half-written unit
	echo "installed $target/$unit"
done
if [ "$root" = / ]; then
	echo "next: systemctl daemon-reload && systemctl enable --now vpnr.target"
fi
