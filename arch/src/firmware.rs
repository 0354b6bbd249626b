//! Calls to firmware (EL3, or QEMU's emulated PSCI) over SMC.

pub use crate::psci;

/// Issues an SMC64 with x0 = `function` and x1..x17 = `args`; returns x0..x17.
pub fn smc(function: u32, args: [u64; 17]) -> [u64; 18] {
    smccc::smc64(function, args)
}

/// PSCI CPU_OFF of the calling CPU. Returns only if firmware refuses.
pub fn cpu_off() {
    let _ = smccc::psci::cpu_off::<smccc::Smc>();
}

/// PSCI SYSTEM_OFF. Returns only if firmware refuses.
pub fn system_off() {
    let _ = smccc::psci::system_off::<smccc::Smc>();
}
