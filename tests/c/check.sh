#!/bin/sh
# Compile-time checks of the C header client/c/keel_hyp.h (the Rust side is
# client/rust/tests/c_header.rs, run by `cargo test`):
#  - tests/c/abi_check.c, freestanding aarch64, -Wall -Wextra -Werror, at -O0
#    and -O2, in C99 (GNU) and C11: every constant static-asserted against
#    the contract, every call helper compiled;
#  - the same file in the header's __KERNEL__ branch, against the stand-in
#    headers of tests/c/kstub (a syntax and type check only);
#  - the constants alone from a host compiler and from assembly.
# Exits non-zero on the first failure. Usage: sh tests/c/check.sh
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
CC=${CC:-aarch64-linux-gnu-gcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if ! command -v "$CC" >/dev/null 2>&1; then
	echo "check.sh: $CC missing, installing gcc-aarch64-linux-gnu"
	apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu
fi

flags="-ffreestanding -nostdlib -Wall -Wextra -Werror -I$root/client/c"
run() {
	echo "  $*"
	"$@"
}

echo "tests/c: keel_hyp.h"
for std in gnu11 gnu99; do
	for opt in -O0 -O2; do
		run "$CC" $flags -std=$std $opt -c "$here/abi_check.c" -o "$out/user.o"
	done
done
# -std=c11 (no GNU extensions): the header spells asm as __asm__.
run "$CC" $flags -std=c11 -pedantic -O2 -c "$here/abi_check.c" -o "$out/user.o"

# The user-mode helpers really issue HVC #0: abi_check.c makes 31 calls
# (keel_probe() makes two), each inlined to its own HVC.
n=$(aarch64-linux-gnu-objdump -d "$out/user.o" | grep -c 'hvc[[:space:]]*#0x0' || true)
echo "  $n hvc #0 instructions in abi_check.o"
[ "$n" -ge 31 ] || { echo "check.sh: expected at least 31 HVC instructions, found $n"; exit 1; }

# Kernel branch against the stand-ins.
run "$CC" $flags -nostdinc -I"$here/kstub" -D__KERNEL__ -DCONFIG_ARM64 -O2 \
	-c "$here/abi_check.c" -o "$out/kernel.o"

# Constants only: a host compiler (no call helpers there) and assembly.
if command -v cc >/dev/null 2>&1; then
	printf '#include "keel_hyp.h"\n_Static_assert(KEEL_FN_VCPU_RUN == 0xC6000113, "id");\n' \
		>"$out/host.c"
	run cc -Wall -Wextra -Werror -I"$root/client/c" -c "$out/host.c" -o "$out/host.o"
	# A kernel of another architecture gets the constants too, not an #error.
	run cc -Wall -Wextra -Werror -I"$root/client/c" -nostdinc -I"$here/kstub" -D__KERNEL__ \
		-c "$out/host.c" -o "$out/host-kernel.o"
fi
printf '#include "keel_hyp.h"\n\tmov\tx0, #(KEEL_FN_HYP_STATS & 0xffff)\n\tmovk\tx0, #(KEEL_FN_HYP_STATS >> 16), lsl #16\n\thvc\t#0\n' \
	>"$out/asm.S"
run "$CC" -D__ASSEMBLY__ -I"$root/client/c" -c "$out/asm.S" -o "$out/asm.o"

echo "tests/c: all passed"
