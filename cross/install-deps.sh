#!/usr/bin/env bash
# Installs what cross/build.sh and cross/package.sh need on a Debian machine (idempotent).
set -euo pipefail
# dpkg (dpkg-deb) and binutils (readelf) build and inspect the packages.
pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user
  dpkg binutils)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf \
  aarch64-unknown-linux-musl x86_64-unknown-linux-musl
# armv7-unknown-linux-musleabihf is used by `cross/build.sh armv7 --static` when installed;
# without it that build links glibc statically instead (see cross/build.sh).
