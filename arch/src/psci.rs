//! PSCI function IDs keel relays or issues itself, and the policy for the
//! host's PSCI calls (plain data: it builds and is tested on the host).

pub const VERSION: u32 = 0x8400_0000;
pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
pub const CPU_SUSPEND: u32 = 0xC400_0001;
pub const CPU_OFF: u32 = 0x8400_0002;
pub const CPU_ON_32: u32 = 0x8400_0003;
pub const CPU_ON: u32 = 0xC400_0003;
pub const AFFINITY_INFO_32: u32 = 0x8400_0004;
pub const AFFINITY_INFO: u32 = 0xC400_0004;
pub const SYSTEM_OFF: u32 = 0x8400_0008;
pub const SYSTEM_RESET: u32 = 0x8400_0009;
pub const FEATURES: u32 = 0x8400_000A;

pub const SUCCESS: i64 = 0;
pub const NOT_SUPPORTED: i64 = -1;
pub const INVALID_PARAMETERS: i64 = -2;
pub const DENIED: i64 = -3;
pub const ALREADY_ON: i64 = -4;
pub const INVALID_ADDRESS: i64 = -9;

/// AFFINITY_INFO's answers.
pub const AFFINITY_ON: u64 = 0;
pub const AFFINITY_OFF: u64 = 1;

/// What keel does with a host SMC whose function ID is `fid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relay {
    /// Not PSCI: to firmware unchanged (SMCCC, SiP, OEM, ... services).
    Firmware,
    /// A PSCI call keel passes on unchanged: none of these takes an
    /// address that a CPU would later start at.
    Forward,
    /// CPU_ON: the CPU starts in keel, which then enters the host.
    CpuOn,
    /// CPU_SUSPEND: a CPU that powers down comes back through keel.
    CpuSuspend,
    /// Anything else in PSCI's range: NOT_SUPPORTED, firmware never
    /// sees it. SYSTEM_SUSPEND and CPU_DEFAULT_SUSPEND would resume a
    /// CPU at a host address at EL2, past keel; the rest (CPU_FREEZE,
    /// MEM_PROTECT, the statistics, IDs PSCI has not defined yet) are
    /// not offered, as pKVM does not offer them.
    Refuse,
}

/// PSCI's function IDs: 0x8400_0000..=0x8400_001F (SMC32) and
/// 0xC400_0000..=0xC400_001F (SMC64).
pub fn is_psci(fid: u32) -> bool {
    fid & !0x4000_001F == 0x8400_0000
}

/// The relay policy for a host SMC: an allow-list of PSCI calls (and
/// PSCI_FEATURES answers NOT_SUPPORTED for the calls it refuses,
/// `arg1` being the function asked about).
pub fn host_relay(fid: u32, arg1: u64) -> Relay {
    if !is_psci(fid) {
        return Relay::Firmware;
    }
    match fid {
        CPU_ON | CPU_ON_32 => Relay::CpuOn,
        CPU_SUSPEND | CPU_SUSPEND_32 => Relay::CpuSuspend,
        // PSCI_FEATURES takes the function it asks about in w1.
        FEATURES if is_psci(arg1 as u32) && host_relay(arg1 as u32, 0) == Relay::Refuse => {
            Relay::Refuse
        }
        FEATURES => Relay::Forward,
        // VERSION, CPU_OFF, AFFINITY_INFO, MIGRATE, MIGRATE_INFO_TYPE,
        // MIGRATE_INFO_UP_CPU, SYSTEM_OFF, SYSTEM_RESET,
        // SET_SUSPEND_MODE, SYSTEM_RESET2 (SMC32 and SMC64 forms).
        0x8400_0000 | 0x8400_0002 | 0x8400_0004 | 0xC400_0004 | 0x8400_0005 | 0xC400_0005
        | 0x8400_0006 | 0x8400_0007 | 0xC400_0007 | 0x8400_0008 | 0x8400_0009 | 0x8400_000F
        | 0x8400_0012 | 0xC400_0012 => Relay::Forward,
        _ => Relay::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psci_range() {
        for fid in [0x8400_0000, 0x8400_001F, 0xC400_0000, 0xC400_001F] {
            assert!(is_psci(fid), "{fid:#x}");
        }
        for fid in [
            0x8400_0020,
            0xC400_0020,
            0x83FF_FFFF,
            0x8000_0000,
            0xC600_0003,
            0x0400_0000,
            0x8500_0000,
            0xC200_0001,
        ] {
            assert!(!is_psci(fid), "{fid:#x}");
        }
    }

    #[test]
    fn host_relay_is_an_allow_list() {
        assert_eq!(host_relay(CPU_ON, 0), Relay::CpuOn);
        assert_eq!(host_relay(CPU_ON_32, 0), Relay::CpuOn);
        assert_eq!(host_relay(CPU_SUSPEND, 0), Relay::CpuSuspend);
        assert_eq!(host_relay(CPU_SUSPEND_32, 0), Relay::CpuSuspend);
        for fid in [VERSION, CPU_OFF, AFFINITY_INFO, SYSTEM_OFF, SYSTEM_RESET] {
            assert_eq!(host_relay(fid, 0), Relay::Forward, "{fid:#x}");
        }
        // Calls that take an entry point keel would not see: SYSTEM_SUSPEND,
        // CPU_DEFAULT_SUSPEND; and the ones not offered.
        for fid in [
            0x8400_000E,
            0xC400_000E,
            0x8400_000C,
            0xC400_000C,
            0x8400_000B,
            0x8400_0013,
            0x8400_0014,
            0xC400_0014,
            0x8400_0010,
            0xC400_0011,
            0x8400_001F,
            0xC400_0008,
        ] {
            assert_eq!(host_relay(fid, 0), Relay::Refuse, "{fid:#x}");
        }
        // Every other SMC goes to firmware unchanged.
        for fid in [
            0x8000_0000,
            0x8000_0001,
            0x8200_0000,
            0xC300_0001,
            0x8400_0020,
        ] {
            assert_eq!(host_relay(fid, 0), Relay::Firmware, "{fid:#x}");
        }
    }

    #[test]
    fn features_refuses_what_the_relay_refuses() {
        for asked in [0x8400_000Eu64, 0xC400_000C, 0x8400_0013, 0x1_8400_000E] {
            assert_eq!(host_relay(FEATURES, asked), Relay::Refuse, "{asked:#x}");
        }
        for asked in [
            u64::from(CPU_ON),
            u64::from(CPU_SUSPEND),
            u64::from(VERSION),
            0x8000_0000,
            0x1_8400_0000,
        ] {
            assert_eq!(host_relay(FEATURES, asked), Relay::Forward, "{asked:#x}");
        }
    }
}
