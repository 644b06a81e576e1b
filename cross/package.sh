#!/usr/bin/env bash
# Build the citygate Debian package from a staging tree with dpkg-deb (no cargo-deb).
#
#   cross/package.sh amd64|arm64|armhf [--binary PATH] [--out DIR] [--compress xz|none]
#
# Takes the release binary of the matching target (cargo build --release for amd64,
# cross/build.sh aarch64|armv7 for the others; CARGO_TARGET_DIR is honoured) unless
# --binary names one (a static build from cross/build.sh --static is packaged without the
# libc6 dependency), and writes DIR/citygate_<version>_<arch>.deb (default DIR:
# target/debian). Layout: /usr/bin/citygate, /usr/share/citygate/{firmware-profiles,policies},
# /usr/share/doc/citygate (README, copyright, examples), /lib/systemd/system/citygate.service
# and citygate-hub.service; the maintainer scripts are cross/debian/{postinst,prerm,postrm}.
# DEB_MAINTAINER sets the Maintainer field. --compress none (tests, around a debug binary of
# some hundred MB) skips the xz compression that takes minutes there.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: cross/package.sh amd64|arm64|armhf [--binary PATH] [--out DIR] [--compress xz|none]"
arch=${1:?$usage}
shift
target_dir=${CARGO_TARGET_DIR:-target}
case "$arch" in
  amd64) binary=$target_dir/release/citygate ;;
  arm64) binary=$target_dir/aarch64-unknown-linux-gnu/release/citygate ;;
  armhf) binary=$target_dir/armv7-unknown-linux-gnueabihf/release/citygate ;;
  *) echo "unknown arch $arch (valid: amd64, arm64, armhf)" >&2; exit 64 ;;
esac
out=target/debian
compress=xz
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?$usage}; shift 2 ;;
    --out) out=${2:?$usage}; shift 2 ;;
    --compress) compress=${2:?$usage}; shift 2 ;;
    *) echo "$usage" >&2; exit 64 ;;
  esac
done
case "$compress" in
  xz|none) ;;
  *) echo "$usage" >&2; exit 64 ;;
esac
if [ ! -x "$binary" ]; then
  echo "no citygate binary at $binary (build it first, or give --binary)" >&2
  exit 66
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
# A dynamic binary depends on the libc6 of the newest GLIBC_x.y symbol version it needs
# (readelf reads any architecture's ELF); a static one (cross/build.sh --static: no
# program interpreter) on no libc at all.
if readelf --program-headers "$binary" | grep -q INTERP; then
  glibc=$(readelf --version-info --wide "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' \
    | sed 's/GLIBC_//' | sort -u -V | tail -n 1)
  if [ -z "$glibc" ]; then
    echo "$binary is dynamic but names no GLIBC symbol version: not a glibc binary?" >&2
    exit 65
  fi
  depends="libc6 (>= $glibc), adduser"
else
  depends="adduser"
fi

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
root=$staging/root
doc=$root/usr/share/doc/citygate
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
  "$root/usr/share/citygate/firmware-profiles" "$root/usr/share/citygate/policies" \
  "$doc/examples/policies"
install -m 0755 "$binary" "$root/usr/bin/citygate"
install -m 0644 firmware-profiles/*.toml "$root/usr/share/citygate/firmware-profiles/"
install -m 0644 config/policies/*.toml "$root/usr/share/citygate/policies/"
install -m 0644 config/*.example.toml "$doc/examples/"
install -m 0644 config/policies/*.toml "$doc/examples/policies/"
install -m 0644 README.md cross/debian/copyright "$doc/"
install -m 0644 cross/debian/citygate.service cross/debian/citygate-hub.service \
  "$root/lib/systemd/system/"
install -m 0755 cross/debian/postinst cross/debian/prerm cross/debian/postrm "$root/DEBIAN/"

size_kib=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: citygate
Version: $version
Architecture: $arch
Maintainer: ${DEB_MAINTAINER:-citygate maintainers <citygate@localhost>}
Installed-Size: $size_kib
Depends: $depends
Recommends: mosquitto
Section: net
Priority: optional
Description: edge gateway for city meter data
 citygate polls Modbus TCP/RTU and MQTT meters, normalises, checks and minimises
 their readings per declared purpose, seals them into signed, encrypted batches
 in a durable outbox and delivers them over MQTT/TLS to a hub; the same binary
 runs the hub. The services citygate and citygate-hub are installed, not enabled.
CONTROL

mkdir -p "$out"
deb=$out/citygate_${version}_${arch}.deb
dpkg-deb --root-owner-group "-Z$compress" --build "$root" "$deb" >/dev/null
ls -l "$deb"
