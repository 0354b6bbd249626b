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

/// The fine-grained trap version: 0 none, 1 FEAT_FGT (HFGRTR_EL2 and the
/// other four, plus HAFGRTR_EL2 with AMU), 2 FEAT_FGT2 as well
/// (HFGRTR2_EL2 and four more). ID_AA64MMFR0_EL1.FGT [59:56].
pub const fn fgt_version(mmfr0: u64) -> u64 {
    field(mmfr0, 56)
}

/// The ID registers [`host_fgt`] looks at, and the two implementation
/// registers some of its bits depend on.
#[derive(Clone, Copy, Debug, Default)]
pub struct FgtIds {
    pub pfr0: u64,
    pub pfr1: u64,
    pub dfr0: u64,
    pub dfr1: u64,
    pub dfr2: u64,
    pub isar1: u64,
    pub mmfr3: u64,
    pub mmfr4: u64,
    /// PMSIDR_EL1 if SPE is implemented (ID_AA64DFR0_EL1.PMSVer), else 0.
    pub pmsidr: u64,
    /// TRBIDR_EL1 if TRBE is implemented (ID_AA64DFR0_EL1.TraceBuffer),
    /// else 0.
    pub trbidr: u64,
}

/// Values of the fine-grained trap registers: the FEAT_FGT five, then
/// the FEAT_FGT2 five (written only where the CPU has them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fgt {
    pub hfgrtr: u64,
    pub hfgwtr: u64,
    pub hfgitr: u64,
    pub hdfgrtr: u64,
    pub hdfgwtr: u64,
    pub hfgrtr2: u64,
    pub hfgwtr2: u64,
    pub hfgitr2: u64,
    pub hdfgrtr2: u64,
    pub hdfgwtr2: u64,
}

/// Bits `lo..=hi` set.
const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// The fine-grained traps while the host runs: none. Their registers
/// reset to UNKNOWN values, and most fields trap when 1, but the "n"
/// fields trap when 0. Each n field exists only with its feature (it is
/// RES0 without), so the host's value sets exactly the n fields of the
/// features this CPU has, and nothing else. The field positions are
/// those of the Arm ARM (as Linux's `arch/arm64/tools/sysreg` has them).
///
/// Guests run with every field 0 ([`Fgt::default`]): no positive trap,
/// and every n field traps. Each feature with an n field is one guests
/// are told they lack (keel_hyp::sysreg), and whose registers keel does
/// not switch, so a guest's access is emulated (read as zero, as for the
/// PMU, SPE and debug registers) or an undefined instruction for it.
///
/// Like Linux, keel needs firmware to have set SCR_EL3.FGTEn (and FGTEn2
/// on FEAT_FGT2 CPUs), or these registers trap to EL3.
pub fn host_fgt(ids: &FgtIds) -> Fgt {
    let has = |reg: u64, lsb: u32, min: u64| field(reg, lsb) >= min;
    let mut g = 0;
    // HFGRTR_EL2/HFGWTR_EL2 (same n fields).
    if has(ids.mmfr3, 24, 1) {
        g |= bits(63, 62); // nAMAIR2_EL1, nMAIR2_EL1 (FEAT_AIE)
    }
    if has(ids.mmfr3, 20, 1) {
        g |= 1 << 61; // nS2POR_EL1 (FEAT_S2POE)
    }
    if has(ids.mmfr3, 16, 1) {
        g |= bits(60, 59); // nPOR_EL1, nPOR_EL0 (FEAT_S1POE)
    }
    if has(ids.mmfr3, 8, 1) {
        g |= bits(58, 57); // nPIR_EL1, nPIRE0_EL1 (FEAT_S1PIE)
    }
    if has(ids.pfr1, 48, 1) {
        g |= 1 << 56; // nRCWMASK_EL1 (FEAT_THE)
    }
    if has(ids.pfr1, 24, 1) {
        g |= bits(55, 54); // nTPIDR2_EL0, nSMPRI_EL1 (FEAT_SME)
    }
    if has(ids.pfr1, 44, 1) {
        g |= bits(53, 52); // nGCS_EL1, nGCS_EL0 (FEAT_GCS)
    }
    if has(ids.isar1, 60, 3) {
        g |= 1 << 50; // nACCDATA_EL1 (FEAT_LS64_ACCDATA)
    }
    // HFGITR_EL2.
    let brbe = has(ids.dfr0, 52, 1);
    let mut i = 0;
    if has(ids.pfr1, 44, 1) {
        i |= bits(59, 57); // nGCSEPP, nGCSSTR_EL1, nGCSPUSHM_EL1
    }
    if brbe {
        i |= bits(56, 55); // nBRBIALL, nBRBINJ
    }
    // HDFGRTR_EL2 (HDFGWTR_EL2: no nBRBIDR, a read-only register).
    let mut d = 0;
    let pmsver = field(ids.dfr0, 32);
    if pmsver >= 3 {
        d |= 1 << 62; // nPMSNEVFR_EL1 (FEAT_SPEv1p2)
    }
    if brbe {
        d |= bits(61, 59); // nBRBDATA, nBRBCTL, nBRBIDR
    }
    // FEAT_FGT2: HFGRTR2_EL2/HFGWTR2_EL2 (nERXGSR_EL1 read only).
    let mut g2 = 0;
    if has(ids.mmfr4, 44, 1) {
        g2 |= bits(14, 3); // the SCTLR/TCR/CPACR/ACTLR mask and alias n fields
    }
    if has(ids.pfr1, 48, 1) {
        g2 |= 1 << 2; // nRCWSMASK_EL1 (FEAT_THE)
    }
    if has(ids.pfr1, 60, 1) {
        g2 |= 1; // nPFAR_EL1 (FEAT_PFAR)
    }
    let rasv2 = if has(ids.pfr0, 28, 3) { 1 << 1 } else { 0 }; // nERXGSR_EL1
                                                               // HFGITR2_EL2: nDCCIVAPS (FEAT_PoPS).
    let i2 = if has(ids.mmfr4, 0, 1) { 1 << 1 } else { 0 };
    // HDFGRTR2_EL2/HDFGWTR2_EL2.
    let mut d2 = 0;
    let pmuv3p9 = field(ids.dfr0, 8) >= 9 && field(ids.dfr0, 8) != 0xf;
    let pmss = has(ids.dfr0, 16, 1);
    if has(ids.dfr2, 20, 1) {
        d2 |= 1 << 24; // nPMBMAR_EL1 (FEAT_SPE_nVM)
    }
    if has(ids.dfr2, 0, 1) {
        d2 |= 1 << 23; // nMDSTEPOP_EL1 (FEAT_STEP2)
    }
    if has(ids.dfr0, 44, 1) && has(ids.pfr0, 40, 1) && field(ids.trbidr, 12) != 0 {
        d2 |= 1 << 22; // nTRBMPAM_EL1 (FEAT_TRBE_MPAM)
    }
    if has(ids.dfr1, 44, 1) {
        d2 |= 1 << 20; // nTRCITECR_EL1 (FEAT_ITE)
    }
    if pmsver >= 5 && ids.pmsidr & (1 << 7) != 0 {
        d2 |= 1 << 19; // nPMSDSFR_EL1 (FEAT_SPE_FDS, SPEv1p4)
    }
    if has(ids.dfr1, 32, 1) {
        d2 |= bits(18, 8); // the nSPM* fields (FEAT_SPMU)
    }
    if pmss {
        d2 |= bits(7, 6); // nPMSSCR_EL1, nPMSSDATA (FEAT_PMUv3_SS)
    }
    if field(ids.dfr0, 0) >= 0xb {
        d2 |= 1 << 5; // nMDSELR_EL1 (FEAT_Debugv8p9: DebugVer, PMU or not)
    }
    if pmuv3p9 {
        d2 |= 1 << 4; // nPMUACR_EL1 (FEAT_PMUv3p9)
    }
    if has(ids.dfr1, 36, 1) {
        d2 |= bits(3, 2); // nPMICFILTR_EL0, nPMICNTR_EL0 (FEAT_PMUv3_ICNTR)
    }
    if has(ids.dfr0, 24, 1) {
        d2 |= 1 << 1; // nPMIAR_EL1 (FEAT_SEBEP)
    }
    if has(ids.dfr1, 48, 1) || pmss {
        d2 |= 1; // nPMECR_EL1 (FEAT_EBEP or FEAT_PMUv3_SS)
    }
    // The write register lacks the read-only registers' fields and has
    // nPMZR_EL0 (a write-only register, FEAT_PMUv3p9).
    let pmzr = if pmuv3p9 { 1 << 21 } else { 0 };
    Fgt {
        hfgrtr: g,
        hfgwtr: g,
        hfgitr: i,
        hdfgrtr: d,
        hdfgwtr: d & !(1 << 59),
        hfgrtr2: g2 | rasv2,
        hfgwtr2: g2,
        hfgitr2: i2,
        hdfgrtr2: d2,
        hdfgwtr2: (d2 & !(bits(18, 17) | 1 << 6)) | pmzr,
    }
}

/// Whether the CPU has a PMUv3 (ID_AA64DFR0_EL1.PMUVer [11:8] neither 0,
/// none, nor 0xf, an IMPLEMENTATION DEFINED PMU).
pub fn has_pmuv3(dfr0: u64) -> bool {
    !matches!((dfr0 >> 8) & 0xf, 0 | 0xf)
}

/// Features whose EL1/EL0 registers a CPU may lack, and which keel then
/// switches too: pointer authentication (FEAT_PAuth: its key registers) and
/// SME (TPIDR2_EL0, which no trap covers on a CPU without FEAT_FGT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtFeatures {
    pub pauth: bool,
    pub sme: bool,
}

impl ExtFeatures {
    /// From ID_AA64ISAR1_EL1 (APA, API, GPA, GPI), ID_AA64ISAR2_EL1 (GPA3,
    /// APA3) and ID_AA64PFR1_EL1 (SME).
    pub fn from_ids(isar1: u64, isar2: u64, pfr1: u64) -> Self {
        let field = |v: u64, lsb: u32| (v >> lsb) & 0xf;
        ExtFeatures {
            pauth: [4, 8, 24, 28].iter().any(|&l| field(isar1, l) != 0)
                || [8, 12].iter().any(|&l| field(isar2, l) != 0),
            sme: field(pfr1, 24) != 0,
        }
    }
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
    fn fgt_version_is_mmfr0_bits_59_56() {
        assert_eq!(fgt_version(0xf0ff_ffff_ffff_ffff), 0);
        assert_eq!(fgt_version(1 << 56), 1);
        assert_eq!(fgt_version(2 << 56), 2);
    }

    /// A CPU with every feature that has an n field.
    fn every_fgt_feature() -> FgtIds {
        FgtIds {
            // RAS v2 [31:28], MPAM [43:40].
            pfr0: 3 << 28 | 1 << 40,
            // SME [27:24], GCS [47:44], THE [51:48], PFAR [63:60].
            pfr1: 1 << 24 | 1 << 44 | 1 << 48 | 1 << 60,
            // DebugVer v8.9 [3:0], PMUVer v3.9 [11:8], PMSS [19:16], SEBEP
            // [27:24], PMSVer v1.4 [35:32], TraceBuffer [47:44], BRBE [55:52].
            dfr0: 0xb | 9 << 8 | 1 << 16 | 1 << 24 | 5 << 32 | 1 << 44 | 1 << 52,
            // SPMU [35:32], PMICNTR [39:36], ITE [47:44], EBEP [51:48].
            dfr1: 1 << 32 | 1 << 36 | 1 << 44 | 1 << 48,
            // STEP [3:0], SPE_nVM [23:20].
            dfr2: 1 | 1 << 20,
            // LS64_ACCDATA [63:60].
            isar1: 3 << 60,
            // S1PIE [11:8], S1POE [19:16], S2POE [23:20], AIE [27:24].
            mmfr3: 1 << 8 | 1 << 16 | 1 << 20 | 1 << 24,
            // PoPS [3:0], SRMASK [47:44].
            mmfr4: 1 | 1 << 44,
            // PMSIDR_EL1.FDS, TRBIDR_EL1.MPAM [15:12].
            pmsidr: 1 << 7,
            trbidr: 1 << 12,
        }
    }

    #[test]
    fn host_fgt_sets_exactly_the_n_fields_of_present_features() {
        assert_eq!(host_fgt(&FgtIds::default()), Fgt::default());
        // Every feature: every n field of the architecture, and no other
        // bit (the masks of Linux's arch/arm64/tools/sysreg).
        let all = host_fgt(&every_fgt_feature());
        assert_eq!(all.hfgrtr, 0xfff4_0000_0000_0000);
        assert_eq!(all.hfgwtr, 0xfff4_0000_0000_0000);
        assert_eq!(all.hfgitr, 0x0f80_0000_0000_0000);
        assert_eq!(all.hdfgrtr, 0x7800_0000_0000_0000);
        assert_eq!(all.hdfgwtr, 0x7000_0000_0000_0000);
        assert_eq!(all.hfgrtr2, 0x7fff);
        assert_eq!(all.hfgwtr2, 0x7ffd);
        assert_eq!(all.hfgitr2, 0x2);
        assert_eq!(all.hdfgrtr2, 0x01df_ffff);
        assert_eq!(all.hdfgwtr2, 0x01f9_ffbf);
        // One feature at a time sets only its own fields.
        let with = |f: fn(&mut FgtIds)| {
            let mut ids = FgtIds::default();
            f(&mut ids);
            host_fgt(&ids)
        };
        let sme = with(|i| i.pfr1 = 1 << 24);
        assert_eq!((sme.hfgrtr, sme.hfgwtr), (3 << 54, 3 << 54));
        assert_eq!(sme.hfgitr | sme.hdfgrtr | sme.hfgrtr2, 0);
        let gcs = with(|i| i.pfr1 = 1 << 44);
        assert_eq!((gcs.hfgrtr, gcs.hfgitr), (3 << 52, 7 << 57));
        let brbe = with(|i| i.dfr0 = 1 << 52);
        assert_eq!((brbe.hfgitr, brbe.hdfgrtr), (3 << 55, 7 << 59));
        assert_eq!(brbe.hdfgwtr, 3 << 60);
        // SPE v1.2 has PMSNEVFR; FDS needs v1.4 (PMSVer 5) and
        // PMSIDR_EL1.FDS.
        let spe = with(|i| i.dfr0 = 3 << 32);
        assert_eq!((spe.hdfgrtr, spe.hdfgrtr2), (1 << 62, 0));
        let v1p3 = with(|i| {
            i.dfr0 = 4 << 32;
            i.pmsidr = 1 << 7;
        });
        assert_eq!(v1p3.hdfgrtr2, 0);
        let fds = with(|i| {
            i.dfr0 = 5 << 32;
            i.pmsidr = 1 << 7;
        });
        assert_eq!(fds.hdfgrtr2, 1 << 19);
        // Debug v8.9 without a PMU still has MDSELR_EL1; the instruction
        // counter needs only its own field.
        let dbg = with(|i| i.dfr0 = 0xb);
        assert_eq!((dbg.hdfgrtr2, dbg.hdfgwtr2), (1 << 5, 1 << 5));
        let icntr = with(|i| i.dfr1 = 1 << 36);
        assert_eq!(icntr.hdfgrtr2, 3 << 2);
        // LS64 and LS64_V alone have no ACCDATA register.
        assert_eq!(with(|i| i.isar1 = 2 << 60), Fgt::default());
        // An IMPLEMENTATION DEFINED PMU (PMUVer 0xf) is not PMUv3.9.
        assert_eq!(with(|i| i.dfr0 = 0xf << 8), Fgt::default());
        let p9 = with(|i| i.dfr0 = 9 << 8);
        assert_eq!((p9.hdfgrtr2, p9.hdfgwtr2), (1 << 4, 1 << 4 | 1 << 21));
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

    #[test]
    fn ext_features_are_pauth_fields_and_sme() {
        let none = ExtFeatures::from_ids(0, 0, 0);
        assert_eq!(none, ExtFeatures::default());
        // ISAR1 APA [7:4], API [11:8], GPA [27:24], GPI [31:28]; ISAR2
        // GPA3 [11:8], APA3 [15:12]: any of them means the keys exist.
        for (isar1, isar2) in [
            (1 << 4, 0),
            (1 << 8, 0),
            (1 << 24, 0),
            (1 << 28, 0),
            (0, 1 << 8),
            (0, 1 << 12),
        ] {
            let f = ExtFeatures::from_ids(isar1, isar2, 0);
            assert!(f.pauth && !f.sme, "{isar1:#x} {isar2:#x}");
        }
        // Neighbouring fields do not: ISAR1 DPB, JSCVT, FCMA, LRCPC; ISAR2
        // WFxT, RPRES, MOPS.
        let f = ExtFeatures::from_ids(0x00ff_f00f | 0xf << 12, 0xf00ff, 0);
        assert!(!f.pauth);
        // PFR1 SME [27:24]; MTE [11:8] and SSBS [7:4] do not count.
        assert!(ExtFeatures::from_ids(0, 0, 1 << 24).sme);
        assert_eq!(ExtFeatures::from_ids(0, 0, 0xff0), none);
    }

    #[test]
    fn pmuv3_is_dfr0_bits_11_8() {
        assert!(!has_pmuv3(0));
        assert!(!has_pmuv3(0xf << 8));
        assert!(!has_pmuv3(0xffff_f0ff));
        for v in [1, 4, 5, 6, 7, 8] {
            assert!(has_pmuv3(v << 8), "{v}");
        }
    }
}
