//! Calls to firmware (EL3, or QEMU's emulated PSCI) over SMC.

/// PSCI function IDs keel relays or issues itself.
pub mod psci {
    pub const VERSION: u32 = 0x8400_0000;
    pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
    pub const CPU_SUSPEND: u32 = 0xC400_0001;
    pub const CPU_OFF: u32 = 0x8400_0002;
    pub const CPU_ON_32: u32 = 0x8400_0003;
    pub const CPU_ON: u32 = 0xC400_0003;
    pub const AFFINITY_INFO: u32 = 0xC400_0004;
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    pub const FEATURES: u32 = 0x8400_000A;
    pub const DENIED: i64 = -3;
    pub const NOT_SUPPORTED: i64 = -1;
}

/// Issues an SMC64 with x0 = `function` and x1..x17 = `args`; returns x0..x17.
pub fn smc(function: u32, args: [u64; 17]) -> [u64; 18] {
    smccc::smc64(function, args)
}

/// PSCI SYSTEM_OFF. Returns only if firmware refuses.
pub fn system_off() {
    let _ = smccc::psci::system_off::<smccc::Smc>();
}
