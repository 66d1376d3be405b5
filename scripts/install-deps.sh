#!/usr/bin/env bash
# install-deps.sh installs what Cairn's build, tests and demo need on a fresh
# Debian 12 (bookworm) machine, then downloads the Go modules.
# install-deps.sh --e2e adds what `make e2e` needs (tests/e2e/README.md).
#
# Idempotent: apt is not touched at all when every package is already there, so
# it also runs without root on a machine that has everything. Run it as root
# (CI is root) when something is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Tools such as mkfs.ext4 and losetup live in sbin, which a non-root PATH may lack.
export PATH="${PATH}:/usr/sbin:/sbin"

# Debian packages the project needs, one "package:command" per entry. The command
# is how we tell the package is installed (command -v); an entry with no command
# is checked with dpkg -s instead.
# >>> Append new needs here, e.g. "fio:fio" "nbdkit:nbdkit" "libnbd-bin:nbdcopy".
APT_PACKAGES=(
	"e2fsprogs:mkfs.ext4"
	"xfsprogs:mkfs.xfs"
	"util-linux:nsenter"
	"mount:losetup"
	"fuse3:fusermount3"
	"iproute2:ip"
	"procps:pgrep"
	"ca-certificates:"
	"fio:fio"
	"nbdkit:nbdkit"
	"libnbd-bin:nbdcopy"
	"python3:python3"
	"nftables:nft"
)
# <<< end of the package list

# With --e2e, also what tests/e2e's local Kubernetes needs: a container
# runtime, the CNI plugins (/usr/lib/cni), a static busybox for the
# workload image and debootstrap for the Debian root filesystem of the
# Cairn image. Nothing here starts a service (no systemd on CI).
if [[ "${1:-}" == "--e2e" ]]; then
	APT_PACKAGES+=(
		"containerd:containerd"
		"runc:runc"
		"containernetworking-plugins:"
		"busybox-static:"
		"debootstrap:debootstrap"
	)
fi

log() { printf 'install-deps: %s\n' "$*"; }

missing=()
for entry in "${APT_PACKAGES[@]}"; do
	pkg="${entry%%:*}"
	cmd="${entry#*:}"
	if [[ -n "${cmd}" ]]; then
		command -v "${cmd}" >/dev/null 2>&1 && continue
	elif dpkg -s "${pkg}" 2>/dev/null | grep -q '^Status: install ok installed'; then
		continue
	fi
	missing+=("${pkg}")
done

if ((${#missing[@]} == 0)); then
	log "Debian packages: all present"
else
	if [[ "$(id -u)" -ne 0 ]]; then
		log "missing Debian packages: ${missing[*]}" >&2
		log "run this script as root (or: sudo apt-get install ${missing[*]})" >&2
		exit 1
	fi
	log "installing Debian packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update
	apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
	export PATH="${PATH}:/usr/local/go/bin"
fi
if ! command -v go >/dev/null 2>&1; then
	log "error: the Go toolchain ('go') is not on PATH and not in /usr/local/go/bin;" >&2
	log "install Go (the version go.mod names) and put its bin directory on PATH" >&2
	exit 1
fi

log "downloading Go modules ($(go version))"
go mod download
log "done"
