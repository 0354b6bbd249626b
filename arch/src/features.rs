//! Feature checks on ID register values, and the EL2 controls that follow
//! from them: plain arithmetic, tested on the build machine.

/// The unsigned 4-bit ID field of `reg` at `lsb`.
const fn field(reg: u64, lsb: u32) -> u64 {
    (reg >> lsb) & 0xf
}

/// FEAT_HCX (HCRX_EL2 exists), from ID_AA64MMFR1_EL1.HCX.
pub const fn has_hcx(mmfr1: u64) -> bool {
    field(mmfr1, 40) != 0
}

/// HCRX_EL2 bits.
pub mod hcrx {
    /// MOPS instructions (CPY*, SET*) at EL1 and EL0.
    pub const MSCEN: u64 = 1 << 11;
    /// TCR2_EL1 accessible (not trapped) and in use.
    pub const TCR2EN: u64 = 1 << 14;
    /// SCTLR2_EL1 accessible (not trapped) and in use.
    pub const SCTLR2EN: u64 = 1 << 15;
}

/// HCRX_EL2 while the host runs, on a CPU with FEAT_HCX: the EL1 features
/// an unmodified kernel may use without knowing about EL2 enabled (MOPS
/// from ID_AA64ISAR2_EL1, TCR2 and SCTLR2 from ID_AA64MMFR3_EL1: their
/// registers are the host's own), everything else 0. HCRX_EL2 resets to
/// an UNKNOWN value, so keel always writes it; guests run with 0, as
/// keel switches none of these registers for them.
pub const fn host_hcrx(isar2: u64, mmfr3: u64) -> u64 {
    let mut v = 0;
    if field(isar2, 16) != 0 {
        v |= hcrx::MSCEN;
    }
    if field(mmfr3, 0) != 0 {
        v |= hcrx::TCR2EN;
    }
    if field(mmfr3, 4) != 0 {
        v |= hcrx::SCTLR2EN;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcx_is_mmfr1_bits_43_40() {
        assert!(!has_hcx(0xffff_f0ff_ffff_ffff));
        assert!(has_hcx(1 << 40));
        assert!(has_hcx(2 << 40));
    }

    #[test]
    fn host_hcrx_enables_what_the_cpu_has() {
        assert_eq!(host_hcrx(0, 0), 0);
        // ISAR2.MOPS [19:16]; WFxT [3:0] alone enables nothing.
        assert_eq!(host_hcrx(1 << 16, 0), hcrx::MSCEN);
        assert_eq!(host_hcrx(0xf, 0), 0);
        // MMFR3.TCRX [3:0], SCTLRX [7:4]; S1PIE [11:8] alone nothing.
        assert_eq!(host_hcrx(0, 1), hcrx::TCR2EN);
        assert_eq!(host_hcrx(0, 1 << 4), hcrx::SCTLR2EN);
        assert_eq!(host_hcrx(0, 1 << 8), 0);
        assert_eq!(
            host_hcrx(1 << 16, 0x11),
            hcrx::MSCEN | hcrx::TCR2EN | hcrx::SCTLR2EN
        );
        assert_eq!(
            (hcrx::MSCEN, hcrx::TCR2EN, hcrx::SCTLR2EN),
            (0x800, 0x4000, 0x8000)
        );
    }
}
