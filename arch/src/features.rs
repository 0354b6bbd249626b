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
    /// LD64B, ST64B at EL1 and EL0 (FEAT_LS64).
    pub const ENALS: u64 = 1 << 1;
    /// ST64BV at EL1 and EL0 (FEAT_LS64_V).
    pub const ENASR: u64 = 1 << 2;
    /// MOPS instructions (CPY*, SET*) at EL1 and EL0.
    pub const MSCEN: u64 = 1 << 11;
    /// TCR2_EL1 accessible (not trapped) and in use.
    pub const TCR2EN: u64 = 1 << 14;
    /// SCTLR2_EL1 accessible (not trapped) and in use.
    pub const SCTLR2EN: u64 = 1 << 15;
    /// The Guarded Control Stack registers at EL1 and EL0 (FEAT_GCS).
    pub const GCSEN: u64 = 1 << 22;
    /// FPMR at EL1 and EL0 (FEAT_FPMR).
    pub const ENFPM: u64 = 1 << 23;
}

/// The ID registers [`host_hcrx`] looks at.
#[derive(Clone, Copy, Debug, Default)]
pub struct HcrxIds {
    pub pfr1: u64,
    pub pfr2: u64,
    pub isar1: u64,
    pub isar2: u64,
    pub mmfr3: u64,
}

/// HCRX_EL2 while the host runs, on a CPU with FEAT_HCX: the EL1 features
/// an unmodified kernel may use without knowing about EL2 enabled, as
/// Linux's own EL2 set-up enables them (their registers are the host's
/// own), everything else 0:
/// - MOPS (ID_AA64ISAR2_EL1.MOPS);
/// - TCR2 and SCTLR2 (ID_AA64MMFR3_EL1.TCRX, SCTLRX);
/// - LS64 and LS64_V (ID_AA64ISAR1_EL1.LS64 1 and 2);
/// - GCS (ID_AA64PFR1_EL1.GCS), FPMR (ID_AA64PFR2_EL1.FPMR).
///
/// HCRX_EL2 resets to an UNKNOWN value, so keel always writes it; guests
/// run with 0, as keel switches none of these registers for them.
pub const fn host_hcrx(ids: &HcrxIds) -> u64 {
    let mut v = 0;
    if field(ids.isar2, 16) != 0 {
        v |= hcrx::MSCEN;
    }
    if field(ids.mmfr3, 0) != 0 {
        v |= hcrx::TCR2EN;
    }
    if field(ids.mmfr3, 4) != 0 {
        v |= hcrx::SCTLR2EN;
    }
    if field(ids.isar1, 60) >= 1 {
        v |= hcrx::ENALS;
    }
    if field(ids.isar1, 60) >= 2 {
        v |= hcrx::ENASR;
    }
    if field(ids.pfr1, 44) != 0 {
        v |= hcrx::GCSEN;
    }
    if field(ids.pfr2, 32) != 0 {
        v |= hcrx::ENFPM;
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
        let none = HcrxIds::default();
        let with = |f: fn(&mut HcrxIds)| {
            let mut ids = none;
            f(&mut ids);
            host_hcrx(&ids)
        };
        assert_eq!(host_hcrx(&none), 0);
        // ISAR2.MOPS [19:16]; WFxT [3:0] alone enables nothing.
        assert_eq!(with(|i| i.isar2 = 1 << 16), hcrx::MSCEN);
        assert_eq!(with(|i| i.isar2 = 0xf), 0);
        // MMFR3.TCRX [3:0], SCTLRX [7:4]; S1PIE [11:8] alone nothing.
        assert_eq!(with(|i| i.mmfr3 = 1), hcrx::TCR2EN);
        assert_eq!(with(|i| i.mmfr3 = 1 << 4), hcrx::SCTLR2EN);
        assert_eq!(with(|i| i.mmfr3 = 1 << 8), 0);
        // ISAR1.LS64 [63:60]: 1 LS64, 2 LS64_V, 3 LS64_ACCDATA.
        assert_eq!(with(|i| i.isar1 = 1 << 60), hcrx::ENALS);
        assert_eq!(with(|i| i.isar1 = 3 << 60), hcrx::ENALS | hcrx::ENASR);
        assert_eq!(with(|i| i.isar1 = 0x0fff_ffff_ffff_ffff), 0);
        // PFR1.GCS [47:44], PFR2.FPMR [35:32].
        assert_eq!(with(|i| i.pfr1 = 1 << 44), hcrx::GCSEN);
        assert_eq!(with(|i| i.pfr2 = 1 << 32), hcrx::ENFPM);
        assert_eq!(with(|i| i.pfr1 = 0xffff_0fff_ffff_ffff), 0);
        assert_eq!(
            (hcrx::ENALS, hcrx::ENASR, hcrx::MSCEN, hcrx::TCR2EN),
            (0x2, 0x4, 0x800, 0x4000)
        );
        assert_eq!(
            (hcrx::SCTLR2EN, hcrx::GCSEN, hcrx::ENFPM),
            (0x8000, 0x40_0000, 0x80_0000)
        );
    }
}
