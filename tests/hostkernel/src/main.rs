//! keel-testkernel: the EL1 host kernel that the QEMU suites boot under the
//! hypervisor. It runs the suite its bootargs name (`suite=NAME`) and reports
//! on the UART (protocol in `harness.rs`), then powers off.
//!
//! Only `aarch64-unknown-none` builds the kernel. On the build machine the
//! crate is a stub binary plus the unit tests of its pure parts (`ranges`),
//! so `cargo test/clippy --workspace` can include it.
#![cfg_attr(target_os = "none", no_std, no_main)]
// A failure carries its message inline because there is no heap; copying
// 200 bytes per failed test costs nothing here.
#![allow(clippy::result_large_err)]

// On the build machine only the unit tests use it.
#[cfg(not(target_os = "none"))]
#[allow(dead_code)]
mod ranges;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "keel-testkernel runs under keel in QEMU: build it with --target aarch64-unknown-none"
    );
    std::process::exit(1);
}

#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod dt;
#[cfg(target_os = "none")]
mod exception;
#[cfg(target_os = "none")]
mod harness;
#[cfg(target_os = "none")]
mod kernel;
#[cfg(target_os = "none")]
mod mmu;
#[cfg(target_os = "none")]
mod psci;
#[cfg(target_os = "none")]
mod ranges;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod suites;

#[cfg(target_os = "none")]
pub use kernel::current_el;

/// keel's raw call for the suites: any ID and arguments.
#[cfg(target_os = "none")]
#[inline(always)]
pub fn hvc(id: u64, args: [u64; 5]) -> keel_abi::Regs {
    // SAFETY: the pages the suites give keel or its guests (or lend, pin,
    // share) come from their test ranges, which they reach only through
    // raw pointers with volatile accesses, never references: nothing the
    // compiler assumes about memory changes when a call gives them away.
    unsafe { keel_abi::call::hvc(id, args) }
}
