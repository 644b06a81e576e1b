#!/usr/bin/env bash
# Cross-compile citygate for the ARM edge boxes and, with --test, run the library's
# unit tests under qemu-user.
#
#   cross/build.sh aarch64 [--test]     # aarch64-unknown-linux-gnu (Cortex-A53 boxes)
#   cross/build.sh armv7 [--test]       # armv7-unknown-linux-gnueabihf (Cortex-A7 boxes)
#
# Needs: rustup target add <triple>; Debian's gcc-aarch64-linux-gnu / gcc-arm-linux-gnueabihf
# (and libc6-dev-*-cross); qemu-user for --test. cross/install-deps.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=${1:?usage: cross/build.sh aarch64|armv7 [--test]}
mode=${2:-}
case "$arch" in
  aarch64) triple=aarch64-unknown-linux-gnu; gcc=aarch64-linux-gnu-gcc; qemu=qemu-aarch64; sysroot=/usr/aarch64-linux-gnu ;;
  armv7) triple=armv7-unknown-linux-gnueabihf; gcc=arm-linux-gnueabihf-gcc; qemu=qemu-arm; sysroot=/usr/arm-linux-gnueabihf ;;
  *) echo "unknown arch $arch (valid: aarch64, armv7)" >&2; exit 64 ;;
esac
env_triple=$(echo "$triple" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${env_triple}_LINKER=$gcc"
export "CC_${triple//-/_}=$gcc"
export "CARGO_TARGET_${env_triple}_RUNNER=$qemu -L $sysroot"
# Child processes a test spawns (the store's kill-and-restart test) run through
# binfmt_misc, which does not see the runner's -L: qemu reads the sysroot from here.
export QEMU_LD_PREFIX=$sysroot

cargo build --release --locked --target "$triple" --bin citygate
ls -l "${CARGO_TARGET_DIR:-target}/$triple/release/citygate"
if [ "$mode" = "--test" ]; then
  skip=()
  if [ ! -e "/proc/sys/fs/binfmt_misc/$qemu" ]; then
    # Without a binfmt_misc handler the kernel cannot exec a foreign-architecture
    # binary, so the test that re-executes the test binary as a child cannot run.
    echo "note: no binfmt_misc handler for $qemu; skipping the child-process crash test" >&2
    skip=(--skip store::tests::crash::committed_batches_survive_sigkill)
  fi
  cargo test --locked --target "$triple" --lib -- "${skip[@]}"
fi
