#!/usr/bin/env bash
# Cross-compile citygate for the ARM edge boxes (and x86_64) and, with --test, run the
# library's unit tests under qemu-user (natively for x86_64).
#
#   cross/build.sh aarch64 [--static] [--test]   # Cortex-A53 boxes
#   cross/build.sh armv7 [--static] [--test]     # Cortex-A7 boxes
#   cross/build.sh x86_64 --static [--test]      # x86_64 boxes and VMs
#
# Dynamic (glibc) builds: aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf; the
# binary needs the box's libc6 (the .deb states which).
# --static: one self-contained binary that needs nothing on the box:
#   aarch64 -> aarch64-unknown-linux-musl, x86_64 -> x86_64-unknown-linux-musl (musl libc,
#   statically linked; the C parts, ring and zstd, are compiled by Debian's cross gcc);
#   armv7   -> armv7-unknown-linux-musleabihf when that target's standard library is
#   installed (rustup target add), otherwise armv7-unknown-linux-gnueabihf with glibc linked
#   statically (+crt-static) into CARGO_TARGET_DIR/static/ (the binary resolves host names
#   with glibc's built-in files and DNS lookup, so /etc/nsswitch.conf entries for other NSS
#   modules are ignored).
# Prints the binary's path and size; the last line is the path.
#
# Needs: rustup target add <triple>; Debian's gcc-aarch64-linux-gnu / gcc-arm-linux-gnueabihf
# (and libc6-dev-*-cross); qemu-user for --test. cross/install-deps.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: cross/build.sh aarch64|armv7|x86_64 [--static] [--test]"
arch=${1:?$usage}
shift
static=no
run_tests=no
for a in "$@"; do
  case "$a" in
    --static) static=yes ;;
    --test) run_tests=yes ;;
    *) echo "$usage" >&2; exit 64 ;;
  esac
done
target_dir=${CARGO_TARGET_DIR:-target}
rustflags=""
case "$arch/$static" in
  aarch64/no) triple=aarch64-unknown-linux-gnu; gcc=aarch64-linux-gnu-gcc; qemu=qemu-aarch64; sysroot=/usr/aarch64-linux-gnu ;;
  aarch64/yes) triple=aarch64-unknown-linux-musl; gcc=aarch64-linux-gnu-gcc; qemu=qemu-aarch64; sysroot= ;;
  armv7/no) triple=armv7-unknown-linux-gnueabihf; gcc=arm-linux-gnueabihf-gcc; qemu=qemu-arm; sysroot=/usr/arm-linux-gnueabihf ;;
  armv7/yes)
    gcc=arm-linux-gnueabihf-gcc; qemu=qemu-arm; sysroot=
    if rustup target list --installed 2>/dev/null | grep -qx armv7-unknown-linux-musleabihf; then
      triple=armv7-unknown-linux-musleabihf
    else
      echo "note: no armv7-unknown-linux-musleabihf standard library installed; linking glibc statically" >&2
      triple=armv7-unknown-linux-gnueabihf
      rustflags="-C target-feature=+crt-static"
      target_dir=$target_dir/static
    fi ;;
  x86_64/yes) triple=x86_64-unknown-linux-musl; gcc=gcc; qemu=; sysroot= ;;
  x86_64/no) echo "x86_64 is built natively (cargo build --release); cross/build.sh builds it with --static" >&2; exit 64 ;;
  *) echo "unknown arch $arch (valid: aarch64, armv7, x86_64)" >&2; exit 64 ;;
esac
env_triple=$(echo "$triple" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${env_triple}_LINKER=$gcc"
export "CC_${triple//-/_}=$gcc"
if [ -n "$rustflags" ]; then
  export "CARGO_TARGET_${env_triple}_RUSTFLAGS=$rustflags"
fi
if [ -n "$qemu" ]; then
  if [ -n "$sysroot" ]; then
    export "CARGO_TARGET_${env_triple}_RUNNER=$qemu -L $sysroot"
    # Child processes a test spawns (the store's kill-and-restart test) run through
    # binfmt_misc, which does not see the runner's -L: qemu reads the sysroot from here.
    export QEMU_LD_PREFIX=$sysroot
  else
    export "CARGO_TARGET_${env_triple}_RUNNER=$qemu"
  fi
fi

cargo build --release --locked --target "$triple" --target-dir "$target_dir" --bin citygate
binary=$target_dir/$triple/release/citygate
if [ "$static" = yes ] && readelf --program-headers "$binary" | grep -q INTERP; then
  echo "$binary asks for a program interpreter: it is not statically linked" >&2
  exit 65
fi
stat -c '%10s bytes  %n' "$binary"
if [ "$run_tests" = yes ]; then
  skip=()
  if [ -n "$qemu" ] && [ ! -e "/proc/sys/fs/binfmt_misc/$qemu" ]; then
    # Without a binfmt_misc handler the kernel cannot exec a foreign-architecture
    # binary, so the test that re-executes the test binary as a child cannot run.
    echo "note: no binfmt_misc handler for $qemu; skipping the child-process crash test" >&2
    skip=(--skip store::tests::crash::committed_batches_survive_sigkill)
  fi
  cargo test --locked --target "$triple" --target-dir "$target_dir" --lib -- "${skip[@]}"
fi
echo "$binary"
