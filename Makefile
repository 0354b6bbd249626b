# keel: `make run` boots the hypervisor with a demonstration host under QEMU;
# `make test` runs every test. Both install what they need on a fresh
# machine (rust targets, llvm-tools, QEMU) first.

HYP_TARGET  := aarch64-unknown-none-softfloat
TK_TARGET   := aarch64-unknown-none
OUT         := out
HYP_ELF     := target/$(HYP_TARGET)/image/keel
TK_ELF      := target/$(TK_TARGET)/release/keel-testkernel
HYP_IMG     := $(OUT)/hypervisor.img
TK_BIN      := $(OUT)/testkernel.bin
QEMU        := qemu-system-aarch64
# Where QEMU's -kernel puts an Image with text_offset 0 on `virt`.
HYP_LOAD    := 0x40200000

SYSROOT     = $(shell rustc --print sysroot)
OBJCOPY     = $(firstword $(wildcard $(SYSROOT)/lib/rustlib/*/bin/llvm-objcopy) llvm-objcopy)

.PHONY: all deps image testkernel run run-linux debug test test-host test-c test-fuzz-corpus test-qemu test-linux lint bench fuzz clean

# How long `make fuzz` runs libFuzzer (seconds).
FUZZ_SECONDS ?= 600

all: image testkernel

# Everything the build and the QEMU suites need, installed only if missing.
deps:
	@rustup target list --installed | grep -q '^$(HYP_TARGET)$$' || rustup target add $(HYP_TARGET)
	@rustup target list --installed | grep -q '^$(TK_TARGET)$$' || rustup target add $(TK_TARGET)
	@rustup component list --installed | grep -q '^llvm-tools' || rustup component add llvm-tools
	@command -v $(QEMU) >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-system-arm; }
	@command -v aarch64-linux-gnu-gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu; }

image: deps
	cargo build --profile image -p keel-boot --bin keel --target $(HYP_TARGET)
	@mkdir -p $(OUT)
	$(OBJCOPY) -O binary $(HYP_ELF) $(HYP_IMG)
	@echo "wrote $(HYP_IMG) ($$(stat -c %s $(HYP_IMG)) bytes)"

testkernel: deps
	cargo build --release -p keel-testkernel --target $(TK_TARGET)
	@mkdir -p $(OUT)
	$(OBJCOPY) -O binary $(TK_ELF) $(TK_BIN)

run: image testkernel
	python3 tests/run.py --demo

debug: image testkernel
	@echo "QEMU is waiting for gdb. In another terminal:"
	@echo "  gdb-multiarch -ex 'add-symbol-file $(HYP_ELF) -o $(HYP_LOAD)' -ex 'target remote :1234'"
	python3 tests/run.py --demo --gdb

test: deps test-host test-c test-fuzz-corpus test-qemu test-linux lint
	@echo "make test: all passed"

test-host:
	cargo test --profile hosttest --workspace

# The C header compiles (user and kernel flavours) and matches the contract.
test-c:
	sh tests/c/check.sh

# The fuzz corpus and some random inputs through the hypercall dispatcher
# (stable toolchain; `make fuzz` is the long libFuzzer run).
test-fuzz-corpus:
	cd hyp/fuzz && cargo run --release -q --bin hypercalls-replay -- corpus/hypercalls --random 300

# libFuzzer over the dispatcher (nightly + cargo-fuzz, installed if
# possible); without them, a long random run of the stable replayer.
fuzz:
	@if rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal; then \
		command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz; \
		cargo +nightly fuzz run --fuzz-dir hyp/fuzz hypercalls hyp/fuzz/corpus/hypercalls -- -max_total_time=$(FUZZ_SECONDS); \
	else \
		cd hyp/fuzz && cargo run --release --bin hypercalls-replay -- corpus/hypercalls --random 200000; \
	fi

# An unmodified Debian arm64 kernel as the host, on 4 CPUs (fetched as
# packages into .cache/linux on first use).
test-linux: image
	tests/linux/fetch.sh
	python3 tests/linux/run.py --test

run-linux: image
	tests/linux/fetch.sh
	python3 tests/linux/run.py --shell

test-qemu: image testkernel
	python3 tests/run.py

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p keel-boot --bin keel --target $(HYP_TARGET) -- -D warnings
	cargo clippy -p keel-testkernel --target $(TK_TARGET) -- -D warnings

bench: image testkernel
	cargo run --release -q -p keel-mm --example s2bench
	cargo run --release -q -p keel-hyp --example model_bench
	python3 tests/bench.py
	tests/linux/fetch.sh >/dev/null
	python3 tests/linux/bench.py

clean:
	cargo clean
	rm -rf $(OUT)
