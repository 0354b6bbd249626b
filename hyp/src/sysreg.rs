//! What a protected guest sees of the CPU's system registers.
//!
//! keel switches a guest's general, FP/SIMD, EL1 and timer state, and
//! nothing else: SVE and SME state, the PMU, debug and trace, MTE tags,
//! the GIC's CPU interface and every EL2 feature stay the host's (or
//! nobody's). A guest must not be told they exist. So guests run with
//! HCR_EL2.TID3, and their reads of the AArch64 ID registers are answered
//! here from the values every CPU has ([`common_ids`]) with those features
//! taken out; AArch32 and unallocated ID encodings read as zero (guests are
//! AArch64 only).
//!
//! The registers of the features taken out (debug and trace: Op0 = 2; the
//! PMU; RAS error records, whose contents describe the host's errors) are
//! trapped (MDCR_EL2, HCR_EL2.TERR) and read as zero, writes ignored
//! (RAZ/WI), as for a CPU that has none of them to program. Any other
//! trapped MSR/MRS (ACTLR_EL1, IMPLEMENTATION DEFINED registers, writes to
//! ID registers), and SVE, SME and LS64 instructions, are undefined instructions
//! for the guest: it takes its own EL1 exception and runs on.

/// A trapped MSR/MRS (ESR_EL2 EC 0x18), decoded from its ISS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysregAccess {
    pub op0: u8,
    pub op1: u8,
    pub crn: u8,
    pub crm: u8,
    pub op2: u8,
    /// The general register (31: XZR).
    pub rt: u8,
    /// MRS (a read) rather than MSR.
    pub read: bool,
}

impl SysregAccess {
    /// Decodes the ISS of an EC 0x18 syndrome.
    pub fn from_esr(esr: u64) -> Self {
        let f = |shift: u32, bits: u32| ((esr >> shift) & ((1 << bits) - 1)) as u8;
        Self {
            op0: f(20, 2),
            op2: f(17, 3),
            op1: f(14, 3),
            crn: f(10, 4),
            rt: f(5, 5),
            crm: f(1, 4),
            read: esr & 1 != 0,
        }
    }

    /// The ESR_EL2 a trap of this access carries (EC 0x18, IL set): what
    /// [`from_esr`](Self::from_esr) decodes.
    pub const fn esr(&self) -> u64 {
        (0x18 << 26)
            | (1 << 25)
            | ((self.op0 as u64 & 3) << 20)
            | ((self.op2 as u64 & 7) << 17)
            | ((self.op1 as u64 & 7) << 14)
            | ((self.crn as u64 & 0xf) << 10)
            | ((self.rt as u64 & 0x1f) << 5)
            | ((self.crm as u64 & 0xf) << 1)
            | self.read as u64
    }

    /// An ID register (Op0 = 3, Op1 = 0, CRn = 0, CRm = 1..7), the space
    /// HCR_EL2.TID3 traps: `(crm, op2)`.
    fn id_space(&self) -> Option<(u8, u8)> {
        (self.op0 == 3 && self.op1 == 0 && self.crn == 0 && (1..=7).contains(&self.crm))
            .then_some((self.crm, self.op2))
    }

    /// A register of a feature guests are not given, which keel traps:
    /// debug and trace (all of Op0 = 2: MDCR_EL2.TDA/TDOSA/TDRA,
    /// CPTR_EL2.TTA), the PMU (MDCR_EL2.TPM/TPMCR), SPE and TRBE
    /// (MDCR_EL2.TPMS, E2PB and E2TB 0), TRFCR_EL1 (MDCR_EL2.TTRF), RAS
    /// error records (HCR_EL2.TERR), the activity monitors (CPTR_EL2.TAM)
    /// and LORegions (HCR_EL2.TLOR).
    fn hidden_feature(&self) -> bool {
        let pmu = match (self.op1, self.crn, self.crm) {
            // PMCR_EL0 .. PMUSERENR_EL0, PMOVSSET_EL0.
            (3, 9, 12..=14) => true,
            // PMEVCNTR<n>_EL0, PMEVTYPER<n>_EL0, PMCCFILTR_EL0.
            (3, 14, 8..=15) => true,
            // PMINTENSET_EL1, PMINTENCLR_EL1, PMUACR_EL1, PMECR_EL1,
            // PMMIR_EL1, PMIAR_EL1.
            (0, 9, 14) => self.op2 != 0 && self.op2 != 3,
            // PMICNTR_EL0, PMICFILTR_EL0 (FEAT_PMUv3_ICNTR).
            (3, 9, 4 | 6) => self.op2 == 0,
            // PMSSCR_EL1 (FEAT_PMUv3_SS).
            (0, 9, 13) => self.op2 == 3,
            _ => false,
        };
        let other = match (self.op1, self.crn, self.crm) {
            // SPE (PMS*_EL1, PMB*_EL1) and TRBE (TRB*_EL1).
            (0, 9, 9..=11) => true,
            // TRFCR_EL1.
            (0, 1, 2) => self.op2 == 1,
            // ERRIDR_EL1, ERRSELR_EL1, ERX*_EL1.
            (0, 5, 3..=5) => true,
            // The activity monitors (AMCR_EL0 .. AMEVTYPER1<n>_EL0).
            (3, 13, 2..=15) => true,
            // LORSA_EL1, LOREA_EL1, LORN_EL1, LORC_EL1, LORID_EL1.
            (0, 10, 4) => matches!(self.op2, 0..=3 | 7),
            _ => false,
        };
        self.op0 == 2 || (self.op0 == 3 && (pmu || other))
    }
}

/// The ESR_EL2 of a trapped MSR (`read` false) or MRS of system register
/// (`op0`, `op1`, `crn`, `crm`, `op2`) with general register `rt`.
pub const fn sysreg_esr(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8, rt: u8, read: bool) -> u64 {
    SysregAccess {
        op0,
        op1,
        crn,
        crm,
        op2,
        rt,
        read,
    }
    .esr()
}

/// The AArch64 ID registers: CRm 4 to 7 of the ID space, eight each.
pub const AA64_ID_REGS: usize = 32;

/// Index in a `[u64; AA64_ID_REGS]` of AArch64 ID register (`crm`, `op2`).
pub const fn aa64_index(crm: u8, op2: u8) -> usize {
    (crm as usize - 4) * 8 + op2 as usize
}

/// Named indices of the registers whose values change.
mod reg {
    use super::aa64_index;
    pub const PFR0: usize = aa64_index(4, 0);
    pub const PFR1: usize = aa64_index(4, 1);
    pub const DFR0: usize = aa64_index(5, 0);
    pub const ISAR1: usize = aa64_index(6, 1);
    pub const ISAR2: usize = aa64_index(6, 2);
    pub const MMFR0: usize = aa64_index(7, 0);
    pub const MMFR1: usize = aa64_index(7, 1);
    pub const MMFR2: usize = aa64_index(7, 2);
}

/// `v` with its unsigned 4-bit field at `lsb` at most `max`.
const fn cap(v: u64, lsb: u32, max: u64) -> u64 {
    if (v >> lsb) & 0xf > max {
        (v & !(0xf << lsb)) | (max << lsb)
    } else {
        v
    }
}

/// ID_AA64MMFR0_EL1.PARange of the guests' IPA size (the smallest that
/// holds it).
const GUEST_PARANGE: u64 = keel_mm::stage2::parange(crate::vm::GUEST_IPA_BITS);

/// Mask of 4-bit ID fields at the given bit positions.
const fn fields(lsbs: &[u32]) -> u64 {
    let mut m = 0;
    let mut i = 0;
    while i < lsbs.len() {
        m |= 0xf << lsbs[i];
        i += 1;
    }
    m
}

/// Signed ID fields among those guests see, as (register index, lsb):
/// 0xF (-1) is "not implemented", below 0. ID_AA64PFR0_EL1.FP, AdvSIMD;
/// ID_AA64MMFR0_EL1.TGran64, TGran4.
const SIGNED_FIELDS: [(usize, u32); 4] = [
    (reg::PFR0, 16),
    (reg::PFR0, 20),
    (reg::MMFR0, 24),
    (reg::MMFR0, 28),
];

/// ID fields among those guests see whose higher value is the safe one:
/// ID_AA64MMFR1_EL1.SpecSEI (speculative reads may raise SErrors).
const HIGHER_SAFE_FIELDS: [(usize, u32); 1] = [(reg::MMFR1, 24)];

/// The ID register values that hold on every one of CPUs `a` and `b`
/// (each the CPU's registers, index [`aa64_index`]): per
/// 4-bit field the lower value (signed where the field is), or the higher
/// one where that is the safe one.
pub fn common_ids(a: &[u64; AA64_ID_REGS], b: &[u64; AA64_ID_REGS]) -> [u64; AA64_ID_REGS] {
    let mut out = [0u64; AA64_ID_REGS];
    for (i, o) in out.iter_mut().enumerate() {
        for lsb in (0..64).step_by(4) {
            let (x, y) = ((a[i] >> lsb) & 0xf, (b[i] >> lsb) & 0xf);
            let v = if SIGNED_FIELDS.contains(&(i, lsb)) {
                // Sign-extend the 4-bit fields and take the lower.
                let sx = |v: u64| ((v as i64) << 60) >> 60;
                if sx(x) <= sx(y) {
                    x
                } else {
                    y
                }
            } else if HIGHER_SAFE_FIELDS.contains(&(i, lsb)) {
                x.max(y)
            } else {
                x.min(y)
            };
            *o |= v << lsb;
        }
    }
    out
}

/// The guest's view of the AArch64 ID registers: the CPUs' common values
/// (see [`common_ids`]), less what keel does not give guests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestIdRegs {
    aa64: [u64; AA64_ID_REGS],
    /// The common values of the CPUs added so far.
    cpus: Option<[u64; AA64_ID_REGS]>,
    /// A guest has read the view: it may no longer narrow.
    frozen: bool,
}

/// A CPU that comes up after guests read the ID view ([`GuestIdRegs::
/// freeze`]) and lacks something the view promised them: their vCPUs could
/// run on it, so it must not run anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NarrowerCpu;

impl Default for GuestIdRegs {
    /// Before any CPU is added: every ID register zero except that EL0
    /// and EL1 run AArch64 and the debug architecture is Armv8.0's.
    fn default() -> Self {
        Self {
            aa64: Self::view(&[0; AA64_ID_REGS]),
            cpus: None,
            frozen: false,
        }
    }
}

impl GuestIdRegs {
    /// The guest's view of a CPU whose AArch64 ID registers are `cpu`
    /// (index [`aa64_index`]). Fields are kept by allow-list where a
    /// register describes features keel does not switch, so a feature a
    /// later architecture adds stays hidden until keel supports it.
    pub fn from_cpu(cpu: &[u64; AA64_ID_REGS]) -> Self {
        Self {
            aa64: Self::view(cpu),
            cpus: Some(*cpu),
            frozen: false,
        }
    }

    /// Adds a CPU (its AArch64 ID registers, as each CPU comes up): guests
    /// are told only what every CPU added so far has, as a vCPU may run on
    /// any of them. Once a guest has read the view ([`freeze`]), a CPU
    /// that would narrow it is refused ([`NarrowerCpu`]) and changes
    /// nothing: as Linux parks a late CPU that lacks a feature it already
    /// uses, keel keeps that CPU off (the host's CPU_ON of it never
    /// completes).
    ///
    /// [`freeze`]: Self::freeze
    pub fn add_cpu(&mut self, cpu: &[u64; AA64_ID_REGS]) -> Result<(), NarrowerCpu> {
        let common = match &self.cpus {
            Some(c) => common_ids(c, cpu),
            None => *cpu,
        };
        let aa64 = Self::view(&common);
        if self.frozen && aa64 != self.aa64 {
            return Err(NarrowerCpu);
        }
        self.aa64 = aa64;
        self.cpus = Some(common);
        Ok(())
    }

    /// A guest reads the view: from now on it may not change.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    fn view(cpu: &[u64; AA64_ID_REGS]) -> [u64; AA64_ID_REGS] {
        let mut aa64 = [0u64; AA64_ID_REGS];
        // ID_AA64PFR0_EL1: FP, AdvSIMD, CSV2, CSV3, DIT kept; EL0 and EL1
        // AArch64 only (1); GIC at most 1 (the GICv3 CPU interface, whose
        // virtual side keel switches: crate::vgic; no GICv4.1 direct
        // injection); EL2, EL3, RAS, SVE, MPAM, AMU, SEL2, RME hidden. CSV2
        // at most 1: SCXTNUM_ELx (CSV2_2) is not switched (HCR_EL2.EnSCXT
        // clear traps it).
        let pfr0 = cpu[reg::PFR0] & fields(&[16, 20, 24, 48, 56, 60]);
        aa64[reg::PFR0] = cap(cap(pfr0, 56, 1), 24, 1) | 0x11;
        // ID_AA64PFR1_EL1: BT, SSBS, CSV2_frac (at most 1, as CSV2) kept;
        // MTE (tags need HCR_EL2.ATA), SME, RAS_frac, MPAM_frac, NMI, GCS
        // and the rest hidden.
        aa64[reg::PFR1] = cap(cpu[reg::PFR1] & fields(&[0, 4, 32]), 32, 1);
        // ID_AA64DFR0_EL1: the debug architecture version alone (at least
        // Armv8.0's). No PMU, trace, SPE, BRBE; the breakpoint and
        // watchpoint counts read 0, and every debug register (MDSCR_EL1
        // too) reads as zero and ignores writes: guests have no
        // self-hosted debug, as pKVM's protected guests have none.
        aa64[reg::DFR0] = (cpu[reg::DFR0] & 0xf).max(6);
        // ID_AA64ISAR0_EL1 without TME (needs HCR_EL2.TME); ISAR3: both
        // instructions EL1 and EL0 run without EL2.
        aa64[aa64_index(6, 0)] = cpu[aa64_index(6, 0)] & !fields(&[24]);
        aa64[aa64_index(6, 3)] = cpu[aa64_index(6, 3)];
        // ID_AA64ISAR1_EL1 without LS64 (needs HCRX_EL2.EnALS/EnAS0).
        aa64[reg::ISAR1] = cpu[reg::ISAR1] & !fields(&[60]);
        // ID_AA64ISAR2_EL1 without MOPS (HCRX_EL2.MSCEn) and SYSREG_128
        // (HCRX_EL2.D128En).
        aa64[reg::ISAR2] = cpu[reg::ISAR2] & !fields(&[16, 32]);
        // ID_AA64MMFR0_EL1: the guest's stage 1 is its own; all kept but
        // PARange, which is the guest's IPA size (at most).
        aa64[reg::MMFR0] = cap(cpu[reg::MMFR0], 0, GUEST_PARANGE);
        // ID_AA64MMFR1_EL1 without VH, TWED, HCX (EL2 features) and LO
        // (LORegions: HCR_EL2.TLOR traps them, read as zero).
        aa64[reg::MMFR1] = cpu[reg::MMFR1] & !fields(&[8, 16, 32, 40]);
        // ID_AA64MMFR2_EL1 without NV and EVT (EL2 features).
        aa64[reg::MMFR2] = cpu[reg::MMFR2] & !fields(&[24, 56]);
        // Everything else (PFR2, ZFR0, SMFR0, FPFR0, DFR1, AFR0/1, MMFR3
        // whose features need HCRX_EL2 enables, MMFR4, unallocated): zero.
        aa64
    }

    /// What a guest reads from ID register (`crm`, `op2`) of the ID space.
    pub fn read(&self, crm: u8, op2: u8) -> u64 {
        if (4..=7).contains(&crm) && op2 < 8 {
            self.aa64[aa64_index(crm, op2)]
        } else {
            0
        }
    }
}

impl SysregAccess {
    /// For a write to an SGI generation register (ICC_SGI1R_EL1,
    /// ICC_ASGI1R_EL1, ICC_SGI0R_EL1: EL1 writes trap while HCR_EL2.IMO is
    /// set), which one (`keel_abi::exit::sgi`).
    pub fn sgi_register(&self) -> Option<u64> {
        use keel_abi::exit::sgi;
        if self.read || (self.op0, self.crn, self.crm) != (3, 12, 11) {
            return None;
        }
        match (self.op1, self.op2) {
            (0, 5) => Some(sgi::SGI1R),
            (1, 6) => Some(sgi::ASGI1R),
            (2, 7) => Some(sgi::SGI0R),
            _ => None,
        }
    }
}

/// What keel does with a trapped guest MSR/MRS: `Some(value)` to give
/// an MRS (and to ignore an MSR), `None` if the access is not emulated
/// (the guest gets an undefined-instruction exception).
pub fn emulate(ids: &GuestIdRegs, access: &SysregAccess) -> Option<u64> {
    if let Some((crm, op2)) = access.id_space() {
        // The ID registers are read-only: an MSR is not emulated.
        return access.read.then(|| ids.read(crm, op2));
    }
    access.hidden_feature().then_some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use sysreg_esr as esr;

    fn place(f: &[(u32, u64)]) -> u64 {
        f.iter().map(|&(lsb, v)| v << lsb).sum()
    }

    /// AArch64 ID registers of a CPU like QEMU's `-cpu max`, with every
    /// feature this module hides.
    fn max_cpu() -> [u64; AA64_ID_REGS] {
        let mut c = [0; AA64_ID_REGS];
        // EL0-EL3 with AArch32, FP, AdvSIMD, GICv4.1, RAS 2, SVE, SEL2, AMU,
        // DIT, CSV2 2, CSV3.
        c[reg::PFR0] = place(&[
            (0, 2),
            (4, 2),
            (8, 2),
            (12, 2),
            (16, 1),
            (20, 1),
            (24, 3),
            (28, 2),
            (32, 1),
            (36, 1),
            (44, 1),
            (48, 1),
            (56, 2),
            (60, 1),
        ]);
        // BT, SSBS 2, MTE 2, SME.
        c[reg::PFR1] = place(&[(0, 1), (4, 2), (8, 2), (24, 1)]);
        // DebugVer 9, PMUVer 5, BRPs 5, WRPs 3, PMSVer, DoubleLock 0xf.
        c[reg::DFR0] = place(&[(0, 9), (8, 5), (12, 5), (20, 3), (32, 1), (36, 0xf)]);
        c[aa64_index(4, 4)] = place(&[(0, 1), (20, 1)]); // ZFR0
        c[aa64_index(4, 5)] = place(&[(32, 1), (60, 8)]); // SMFR0
        c[aa64_index(6, 0)] = place(&[(4, 2), (8, 1), (12, 1), (16, 2), (28, 1)]);
        c[reg::ISAR1] = place(&[(0, 1), (4, 1), (20, 1), (60, 1)]); // LS64
        c[reg::ISAR2] = place(&[(0, 2), (16, 1)]); // WFxT 2, MOPS
        c[reg::MMFR0] = place(&[(0, 6), (4, 2), (20, 1), (24, 0xf)]); // PARange 52 bits
        c[reg::MMFR1] = place(&[(0, 2), (8, 1), (16, 1), (40, 1)]); // HAFDBS 2, VH, LO, HCX
        c[reg::MMFR2] = place(&[(0, 1), (24, 1), (56, 2)]); // CnP, NV, EVT
        c
    }

    fn field(v: u64, lsb: u32) -> u64 {
        (v >> lsb) & 0xf
    }

    #[test]
    fn decodes_the_syndrome() {
        let a = SysregAccess::from_esr(esr(3, 0, 0, 4, 4, 7, true));
        assert_eq!(
            a,
            SysregAccess {
                op0: 3,
                op1: 0,
                crn: 0,
                crm: 4,
                op2: 4,
                rt: 7,
                read: true
            }
        );
        assert!(!SysregAccess::from_esr(esr(2, 0, 0, 2, 2, 31, false)).read);
        // The encoding is the decoding's inverse, field by field.
        for (op0, op1, crn, crm, op2, rt, read) in [
            (3, 7, 15, 15, 7, 31, true),
            (1, 0, 7, 6, 2, 0, false),
            (2, 3, 0, 5, 0, 17, true),
        ] {
            let a = SysregAccess {
                op0,
                op1,
                crn,
                crm,
                op2,
                rt,
                read,
            };
            assert_eq!(SysregAccess::from_esr(a.esr()), a);
        }
        assert_eq!(esr(3, 0, 0, 4, 4, 7, true) >> 26, 0x18, "EC");
        assert_eq!(SysregAccess::from_esr(esr(2, 0, 0, 2, 2, 31, false)).rt, 31);
    }

    #[test]
    fn hides_what_keel_does_not_switch() {
        let cpu = max_cpu();
        let g = GuestIdRegs::from_cpu(&cpu);
        let pfr0 = g.read(4, 0);
        assert_eq!(field(cpu[reg::PFR0], 32), 1, "the test's CPU has SVE");
        assert_eq!(field(pfr0, 32), 0, "SVE");
        assert_eq!(
            (field(cpu[reg::PFR0], 24), field(pfr0, 24)),
            (3, 1),
            "GIC: the CPU's GICv4.1 is a GICv3 CPU interface for guests"
        );
        assert_eq!(field(pfr0, 8), 0, "EL2");
        assert_eq!(field(pfr0, 12), 0, "EL3");
        assert_eq!(
            (field(pfr0, 0), field(pfr0, 4)),
            (1, 1),
            "EL0/EL1 AArch64 only"
        );
        assert_eq!(field(pfr0, 16), field(cpu[reg::PFR0], 16), "FP kept");
        assert_eq!(field(pfr0, 20), field(cpu[reg::PFR0], 20), "AdvSIMD kept");
        assert_eq!(field(pfr0, 28), 0, "RAS");
        assert_eq!(
            (field(pfr0, 56), field(pfr0, 60)),
            (1, 1),
            "CSV2 (at most 1), CSV3"
        );
        assert_eq!((field(pfr0, 36), field(pfr0, 44)), (0, 0), "SEL2, AMU");
        let pfr1 = g.read(4, 1);
        assert_eq!(field(pfr1, 24), 0, "SME");
        assert_eq!(field(pfr1, 8), 0, "MTE");
        assert_eq!(field(pfr1, 0), 1, "BT kept");
        assert_eq!(field(pfr1, 4), 2, "SSBS kept");
        assert_eq!(g.read(5, 0), 9, "DFR0: DebugVer alone");
        assert_eq!(g.read(4, 4), 0, "ZFR0");
        assert_eq!(g.read(4, 5), 0, "SMFR0");
        assert_eq!(g.read(6, 0), cpu[aa64_index(6, 0)], "ISAR0 kept");
        let tme = {
            let mut c = cpu;
            c[aa64_index(6, 0)] |= 1 << 24;
            c[reg::PFR1] |= 2 << 32;
            GuestIdRegs::from_cpu(&c)
        };
        assert_eq!(tme.read(6, 0), cpu[aa64_index(6, 0)], "TME hidden");
        assert_eq!(field(tme.read(4, 1), 32), 1, "CSV2_frac at most 1");
        assert_eq!(field(g.read(6, 2), 16), 0, "MOPS");
        assert_eq!(field(g.read(6, 1), 60), 0, "LS64");
        assert_eq!(
            g.read(6, 1) & 0xfff_ffff,
            cpu[reg::ISAR1] & 0xfff_ffff,
            "ISAR1 kept"
        );
        assert_eq!(field(g.read(6, 2), 0), 2, "WFxT kept");
        assert_eq!(g.read(7, 0) & !0xf, cpu[reg::MMFR0] & !0xf, "MMFR0 kept");
        assert_eq!(
            field(cpu[reg::MMFR0], 0),
            6,
            "the test's CPU has 52-bit PAs"
        );
        assert_eq!(
            field(g.read(7, 0), 0),
            2,
            "PARange: 40 bits for 39-bit IPAs"
        );
        assert_eq!(
            (field(g.read(7, 1), 8), field(g.read(7, 1), 40)),
            (0, 0),
            "VH, HCX"
        );
        assert_eq!(field(g.read(7, 1), 0), 2, "HAFDBS kept");
        assert_eq!(field(g.read(7, 1), 16), 0, "LO");
        assert_eq!(
            (field(g.read(7, 2), 24), field(g.read(7, 2), 56)),
            (0, 0),
            "NV, EVT"
        );
        // AArch32, unallocated, out of range.
        for (crm, op2) in [
            (1, 0),
            (2, 0),
            (3, 0),
            (3, 7),
            (4, 7),
            (5, 4),
            (7, 7),
            (8, 0),
        ] {
            assert_eq!(g.read(crm, op2), 0, "({crm}, {op2})");
        }
        // An old CPU with a zero DebugVer field still reports Armv8.0 debug.
        assert_eq!(GuestIdRegs::default().read(5, 0), 6);
        assert_eq!(GuestIdRegs::default().read(4, 0), 0x11);
    }

    #[test]
    fn guests_see_what_every_cpu_has() {
        let big = max_cpu();
        let mut little = big;
        // No DIT; AES without PMULL (ISAR0.AES 1, not 2); no 64K granule
        // (TGran64 0xf, signed: below 0) but the 4K one (TGran4 0); FP
        // without half precision (0, not 1); SpecSEI 1 (higher is safe).
        little[reg::PFR0] &= !(0xf << 48);
        little[aa64_index(6, 0)] = (little[aa64_index(6, 0)] & !0xf0) | 0x10;
        little[reg::MMFR0] |= 0xf << 24;
        little[reg::PFR0] &= !(0xf << 16);
        little[reg::MMFR1] |= 1 << 24;
        let common = common_ids(&big, &little);
        assert_eq!(common, common_ids(&little, &big), "order does not matter");
        assert_eq!(common_ids(&big, &big), big, "one kind of CPU: its values");
        assert_eq!(field(common[reg::PFR0], 48), 0, "DIT");
        assert_eq!(field(common[aa64_index(6, 0)], 4), 1, "AES");
        assert_eq!(field(common[reg::MMFR0], 24), 0xf, "TGran64 (signed)");
        assert_eq!(field(common[reg::MMFR0], 28), 0, "TGran4");
        assert_eq!(field(common[reg::PFR0], 16), 0, "FP");
        assert_eq!(field(common[reg::MMFR1], 24), 1, "SpecSEI (higher safe)");
        // FP 0xf (none) on one CPU wins over 1.
        let mut nofp = big;
        nofp[reg::PFR0] |= 0xf << 16;
        assert_eq!(field(common_ids(&big, &nofp)[reg::PFR0], 16), 0xf, "FP");

        let mut g = GuestIdRegs::default();
        assert_eq!(g.add_cpu(&big), Ok(()));
        assert_eq!(g, GuestIdRegs::from_cpu(&big));
        assert_eq!(
            field(g.read(4, 0), 48),
            1,
            "DIT while only the big CPU is in"
        );
        assert_eq!(g.add_cpu(&little), Ok(()));
        assert_eq!(field(g.read(4, 0), 48), 0, "DIT once the little CPU is in");
        assert_eq!(field(g.read(7, 0), 24), 0xf, "TGran64");
        assert_eq!(g.add_cpu(&big), Ok(()));
        assert_eq!(
            field(g.read(4, 0), 48),
            0,
            "a CPU added again widens nothing"
        );

        // Once a guest has read the view, a CPU with less is refused and
        // changes nothing; one with as much or more still comes in.
        let mut g = GuestIdRegs::default();
        assert_eq!(g.add_cpu(&big), Ok(()));
        g.freeze();
        let before = g.clone();
        assert_eq!(g.add_cpu(&little), Err(NarrowerCpu));
        assert_eq!(g, before, "a refused CPU changed the view");
        assert_eq!(g.add_cpu(&big), Ok(()), "the same kind of CPU");
        // Differences the guest's view hides do not matter (PMU version:
        // guests see no PMU at all).
        let mut other_pmu = big;
        other_pmu[reg::DFR0] ^= 0xf << 8;
        assert_eq!(
            g.add_cpu(&other_pmu),
            Ok(()),
            "a difference guests do not see"
        );
        assert_eq!(g.aa64, before.aa64);
        // Before any guest read, the view narrows as before.
        let mut g = GuestIdRegs::from_cpu(&big);
        assert_eq!(g.add_cpu(&little), Ok(()));
        assert_eq!(field(g.read(4, 0), 48), 0);
    }

    #[test]
    fn emulates_id_reads_and_debug_and_pmu_as_raz_wi() {
        let g = GuestIdRegs::from_cpu(&max_cpu());
        let run = |e| emulate(&g, &SysregAccess::from_esr(e));
        assert_eq!(run(esr(3, 0, 0, 4, 0, 1, true)), Some(g.read(4, 0)));
        assert_eq!(run(esr(3, 0, 0, 1, 0, 1, true)), Some(0), "ID_PFR0_EL1");
        assert_eq!(
            run(esr(3, 0, 0, 4, 0, 1, false)),
            None,
            "MSR to an ID register"
        );
        // Read as zero, writes ignored.
        for e in [
            // Debug: MDSCR_EL1, OSLAR_EL1, OSLSR_EL1, DBGBCR0_EL1, MDCCSR_EL0.
            esr(2, 0, 0, 2, 2, 3, true),
            esr(2, 0, 0, 2, 2, 3, false),
            esr(2, 0, 1, 0, 4, 3, false),
            esr(2, 0, 1, 1, 4, 3, true),
            esr(2, 0, 0, 0, 5, 3, true),
            esr(2, 3, 0, 1, 0, 3, true),
            // PMU: PMCR_EL0, PMCCNTR_EL0, PMEVTYPER3_EL0, PMCCFILTR_EL0,
            // PMINTENSET_EL1, PMUSERENR_EL0.
            esr(3, 3, 9, 12, 0, 2, true),
            esr(3, 3, 9, 13, 0, 2, true),
            esr(3, 3, 14, 12, 3, 2, false),
            esr(3, 3, 14, 15, 7, 2, true),
            esr(3, 0, 9, 14, 1, 2, false),
            esr(3, 3, 9, 14, 0, 2, true),
            // PMUACR_EL1, PMIAR_EL1, PMICNTR_EL0, PMICFILTR_EL0, PMSSCR_EL1;
            // SPE: PMSCR_EL1, PMBLIMITR_EL1; TRBE: TRBLIMITR_EL1; TRFCR_EL1;
            // AMU: AMCR_EL0, AMEVCNTR00_EL0, AMEVTYPER1<15>_EL0; LOR: LORC_EL1,
            // LORID_EL1; trace: TRCPRGCTLR (Op0 2, Op1 1).
            esr(3, 0, 9, 14, 4, 4, true),
            esr(3, 0, 9, 14, 7, 4, true),
            esr(3, 3, 9, 4, 0, 4, true),
            esr(3, 3, 9, 6, 0, 4, false),
            esr(3, 0, 9, 13, 3, 4, true),
            esr(3, 0, 9, 9, 0, 4, false),
            esr(3, 0, 9, 10, 0, 4, true),
            esr(3, 0, 9, 11, 0, 4, true),
            esr(3, 0, 1, 2, 1, 4, false),
            esr(3, 3, 13, 2, 0, 4, true),
            esr(3, 3, 13, 4, 0, 4, true),
            esr(3, 3, 13, 15, 7, 4, false),
            esr(3, 0, 10, 4, 3, 4, false),
            esr(3, 0, 10, 4, 7, 4, true),
            esr(2, 1, 0, 1, 0, 4, true),
            // RAS: ERRIDR_EL1, ERRSELR_EL1, ERXSTATUS_EL1, ERXMISC3_EL1.
            esr(3, 0, 5, 3, 0, 4, true),
            esr(3, 0, 5, 3, 1, 4, false),
            esr(3, 0, 5, 4, 2, 4, true),
            esr(3, 0, 5, 5, 3, 4, true),
        ] {
            assert_eq!(run(e), Some(0), "{e:#x}");
        }
        // Not emulated: ACTLR_EL1 (TACR), an IMPLEMENTATION DEFINED
        // register (TIDCP), DC ISW, MIDR_EL1 (not trapped), CNTP_CTL_EL0,
        // the unallocated encoding after PMINTENCLR_EL1, ESR_EL1.
        for e in [
            esr(3, 0, 1, 0, 1, 0, true),
            esr(3, 0, 15, 0, 0, 0, true),
            esr(1, 0, 7, 6, 2, 0, false),
            esr(3, 0, 0, 0, 0, 0, true),
            esr(3, 3, 14, 2, 1, 0, true),
            esr(3, 0, 9, 14, 3, 0, true),
            esr(3, 0, 5, 2, 0, 0, true),
            // TPIDR_EL0 and SCXTNUM_EL0 beside the AMU's; MAIR_EL1 and an
            // unallocated encoding beside the LOR registers; (0, 9, 14, 0).
            esr(3, 3, 13, 0, 2, 0, true),
            esr(3, 3, 13, 0, 7, 0, true),
            esr(3, 0, 10, 2, 0, 0, true),
            esr(3, 0, 10, 4, 4, 0, true),
            esr(3, 0, 9, 14, 0, 0, true),
        ] {
            assert_eq!(run(e), None, "{e:#x}");
        }
    }
}
