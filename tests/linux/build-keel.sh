#!/bin/sh
# Builds what the Linux suite runs on the host besides busybox: the driver
# (client/linux/keel.ko, against the headers of fetch-headers.sh), the VMM
# (client/vmm, static aarch64-unknown-linux-musl) and its guest
# (client/vmm/guest/guest.S), and copies them into .cache/linux/keel/.
# Installs what is missing (the musl target; gcc-aarch64-linux-gnu).
# Prints DIR=.cache/linux/keel.
#
# Usage: tests/linux/build-keel.sh
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${KEEL_LINUX_CACHE:-$ROOT/.cache/linux}/keel
mkdir -p "$OUT"

command -v aarch64-linux-gnu-gcc >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu; } >&2
rustup target list --installed | grep -q '^aarch64-unknown-linux-musl$' ||
    rustup target add aarch64-unknown-linux-musl >&2

kdir=$("$ROOT/tests/linux/fetch-headers.sh" | sed -n 's/^KDIR=//p')
make -s -C "$ROOT/client/linux" KDIR="$kdir" >&2
cp "$ROOT/client/linux/keel.ko" "$OUT/keel.ko"
aarch64-linux-gnu-strip --strip-debug "$OUT/keel.ko"

(cd "$ROOT/client/vmm" && cargo build --release -q) >&2
cp "$ROOT/client/vmm/target/aarch64-unknown-linux-musl/release/keel-vmm" "$OUT/keel-vmm"

"$ROOT/client/vmm/guest/build.sh" "$OUT/guest.bin"
echo "DIR=$OUT"
