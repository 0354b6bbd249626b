//! Exception Syndrome Register (ESR_ELx) decoding.

/// Exception classes (ESR_ELx.EC) that keel handles or reports.
pub mod ec {
    pub const UNKNOWN: u64 = 0x00;
    pub const WFX: u64 = 0x01;
    /// LD64B/ST64B* trapped (HCRX_EL2.EnALS/EnASR/EnAS0 clear).
    pub const LS64: u64 = 0x0a;
    pub const SVC64: u64 = 0x15;
    pub const HVC64: u64 = 0x16;
    pub const SMC64: u64 = 0x17;
    pub const SYSREG: u64 = 0x18;
    /// SVE access trapped (CPTR_EL2.TZ).
    pub const SVE: u64 = 0x19;
    /// SME access trapped (CPTR_EL2.TSM).
    pub const SME: u64 = 0x1d;
    pub const IABT_LOWER: u64 = 0x20;
    pub const IABT_CUR: u64 = 0x21;
    pub const PC_ALIGN: u64 = 0x22;
    pub const DABT_LOWER: u64 = 0x24;
    pub const DABT_CUR: u64 = 0x25;
    pub const SP_ALIGN: u64 = 0x26;
    pub const SERROR: u64 = 0x2f;
    pub const BRK64: u64 = 0x3c;
}

/// Fault status code of a synchronous external abort, not on a table walk.
pub const FSC_SEA: u64 = 0x10;
/// ESR.IL: the trapped instruction was 32 bits wide.
pub const IL: u64 = 1 << 25;
/// Data abort ISS.WnR: the access was a write.
pub const ISS_WNR: u64 = 1 << 6;

/// A decoded syndrome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Esr(pub u64);

impl Esr {
    pub fn ec(self) -> u64 {
        (self.0 >> 26) & 0x3f
    }
    pub fn iss(self) -> u64 {
        self.0 & 0x1ff_ffff
    }
    /// The immediate of a trapped HVC or SMC.
    pub fn imm16(self) -> u64 {
        self.0 & 0xffff
    }
    pub fn is_write(self) -> bool {
        self.0 & ISS_WNR != 0
    }
    /// Data/instruction fault status code.
    pub fn fsc(self) -> u64 {
        self.0 & 0x3f
    }
    /// Data abort ISS.ISV: the syndrome describes the access (size, register).
    pub fn isv(self) -> bool {
        self.0 & (1 << 24) != 0
    }
    /// Access size in bytes (valid when `isv`).
    pub fn access_size(self) -> u64 {
        1 << ((self.0 >> 22) & 3)
    }
    /// Transfer register number (valid when `isv`).
    pub fn srt(self) -> u64 {
        (self.0 >> 16) & 0x1f
    }
    /// A short name of the exception class, for reports.
    pub fn class_name(self) -> &'static str {
        match self.ec() {
            ec::UNKNOWN => "unknown/undefined instruction",
            ec::WFX => "WFI/WFE",
            ec::SVC64 => "SVC",
            ec::HVC64 => "HVC",
            ec::SMC64 => "SMC",
            ec::SYSREG => "system register access",
            ec::IABT_LOWER | ec::IABT_CUR => "instruction abort",
            ec::PC_ALIGN => "PC alignment fault",
            ec::DABT_LOWER | ec::DABT_CUR => "data abort",
            ec::SP_ALIGN => "SP alignment fault",
            ec::SERROR => "SError",
            ec::BRK64 => "BRK",
            _ => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_hvc_and_data_abort() {
        let hvc = Esr((ec::HVC64 << 26) | IL | 0x1234);
        assert_eq!(hvc.ec(), ec::HVC64);
        assert_eq!(hvc.imm16(), 0x1234);
        // A 4-byte write of x5 that stage 2 refused (translation fault, level 3).
        let dabt =
            Esr((ec::DABT_LOWER << 26) | IL | (1 << 24) | (2 << 22) | (5 << 16) | ISS_WNR | 0x07);
        assert!(dabt.isv());
        assert_eq!(dabt.access_size(), 4);
        assert_eq!(dabt.srt(), 5);
        assert!(dabt.is_write());
        assert_eq!(dabt.fsc(), 0x07);
        assert_eq!(dabt.class_name(), "data abort");
    }
}
