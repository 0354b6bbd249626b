//! Everything aarch64-specific in keel: system registers, barriers, TLB and
//! cache maintenance, exception vectors and trap frames, SMCCC calls to
//! firmware, the PL011 console and the semihosting exit.
//!
//! The architecture-neutral parts (ESR decoding, exception-injection
//! arithmetic, feature checks on ID register values, PSCI's relay policy) build everywhere and are tested on the build machine; the rest
//! exists only when compiling for aarch64.
#![cfg_attr(not(test), no_std)]

pub mod errata;
pub mod esr;
pub mod features;
pub mod gic;
pub mod inject;
pub mod psci;

#[cfg(target_arch = "aarch64")]
pub mod barrier;
#[cfg(target_arch = "aarch64")]
pub mod cache;
#[cfg(target_arch = "aarch64")]
pub mod console;
#[cfg(target_arch = "aarch64")]
pub mod exception;
#[cfg(target_arch = "aarch64")]
pub mod exit;
#[cfg(target_arch = "aarch64")]
pub mod firmware;
#[cfg(target_arch = "aarch64")]
pub mod guest;
#[cfg(target_arch = "aarch64")]
pub mod sysreg;
#[cfg(target_arch = "aarch64")]
pub mod tlb;

/// General-purpose registers x0..x30 of the interrupted context, as the
/// exception vectors save them on the hypervisor's stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapFrame {
    pub x: [u64; 31],
    /// Keeps the frame a multiple of 16 bytes (the stack alignment).
    pub _pad: u64,
}

/// Per-CPU data reached through TPIDR_EL2. The exception vectors read
/// `emergency_sp` (offset 0) to get a usable stack when the hypervisor
/// faults, e.g. on its own stack's guard page.
#[repr(C)]
#[derive(Debug)]
pub struct CpuLocal {
    pub emergency_sp: u64,
    pub cpu_index: u64,
    pub mpidr: u64,
    /// Bottom (lowest address) of this CPU's stack guard page.
    pub guard_page: u64,
    /// While a guest runs on this CPU: the image's record of that run
    /// (0 otherwise), so that a trap from a lower EL knows whose it is.
    pub guest_run: u64,
    /// Top of this CPU's stack (offset 40: read by the secondary entry).
    pub stack_top: u64,
    /// Where the host asked this CPU to start (PSCI CPU_ON or a powerdown
    /// CPU_SUSPEND), and the context id it passes in x0.
    pub host_entry: u64,
    pub host_context: u64,
}

/// Offsets the entry code relies on.
pub const CPU_LOCAL_SIZE: usize = 64;
const _: () = assert!(core::mem::size_of::<CpuLocal>() == CPU_LOCAL_SIZE);
const _: () = assert!(core::mem::offset_of!(CpuLocal, stack_top) == 40);

impl CpuLocal {
    pub const fn new() -> Self {
        CpuLocal {
            emergency_sp: 0,
            cpu_index: 0,
            mpidr: 0,
            guard_page: 0,
            guest_run: 0,
            stack_top: 0,
            host_entry: 0,
            host_context: 0,
        }
    }
}

impl Default for CpuLocal {
    fn default() -> Self {
        Self::new()
    }
}
