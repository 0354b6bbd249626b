#!/bin/sh
# Builds the host test kernel and writes the flat binary the hypervisor loads
# (-device guest-loader,addr=0x50000000,kernel=out/testkernel.bin).
# Usage: tests/build-testkernel.sh [OUT]   (default out/testkernel.bin)
set -eu
cd "$(dirname "$0")/.."
out=${1:-out/testkernel.bin}
cargo build --release -p keel-testkernel --target aarch64-unknown-none
objcopy=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-objcopy 2>/dev/null | head -n1)
if [ -z "$objcopy" ]; then
    echo "llvm-objcopy not found: rustup component add llvm-tools" >&2
    exit 1
fi
mkdir -p "$(dirname "$out")"
"$objcopy" -O binary target/aarch64-unknown-none/release/keel-testkernel "$out"
