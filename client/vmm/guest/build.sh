#!/bin/sh
# Assembles the demonstration guest into a flat binary (loaded at the start
# of guest RAM, entered at its first byte).
# Usage: client/vmm/guest/build.sh OUT.bin
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
out=$1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
aarch64-linux-gnu-gcc -c -nostdlib -o "$tmp/guest.o" "$HERE/guest.S"
aarch64-linux-gnu-ld -nostdlib -static -Ttext=0x80000000 -e _start -o "$tmp/guest.elf" "$tmp/guest.o"
aarch64-linux-gnu-objcopy -O binary "$tmp/guest.elf" "$out"
