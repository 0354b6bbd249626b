//! System-register accessors. Reads are safe; writes are `unsafe` because
//! each can change translation, trapping or exception return, and the caller
//! must know that the new value is right for the running hypervisor.

use crate::features::Fgt;

macro_rules! sysreg_read {
    ($($name:ident => $reg:literal),* $(,)?) => {$(
        #[doc = concat!("Reads ", $reg, ".")]
        #[inline(always)]
        pub fn $name() -> u64 {
            let v: u64;
            // SAFETY: reading this system register has no side effects.
            unsafe { core::arch::asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }
    )*};
}

macro_rules! sysreg_write {
    ($($name:ident => $reg:literal),* $(,)?) => {$(
        #[doc = concat!("Writes ", $reg, ".")]
        ///
        /// # Safety
        /// The value must be valid for the register and consistent with the
        /// memory and exception state the hypervisor relies on.
        #[inline(always)]
        pub unsafe fn $name(v: u64) {
            // SAFETY: the caller vouches for the value (see above).
            unsafe { core::arch::asm!(concat!("msr ", $reg, ", {}"), in(reg) v, options(nostack, preserves_flags)) };
        }
    )*};
}

sysreg_read! {
    current_el => "CurrentEL",
    esr_el2 => "esr_el2",
    far_el2 => "far_el2",
    hpfar_el2 => "hpfar_el2",
    elr_el2 => "elr_el2",
    spsr_el2 => "spsr_el2",
    sctlr_el1 => "sctlr_el1",
    vbar_el1 => "vbar_el1",
    mpidr_el1 => "mpidr_el1",
    midr_el1 => "midr_el1",
    id_aa64mmfr0_el1 => "id_aa64mmfr0_el1",
    id_aa64pfr0_el1 => "id_aa64pfr0_el1",
    id_aa64pfr1_el1 => "id_aa64pfr1_el1",
    id_aa64mmfr1_el1 => "id_aa64mmfr1_el1",
    id_aa64isar1_el1 => "id_aa64isar1_el1",
    id_aa64isar2_el1 => "s3_0_c0_c6_2",
    id_aa64pfr2_el1 => "s3_0_c0_c4_2",
    id_aa64mmfr3_el1 => "s3_0_c0_c7_3",
    hcrx_el2 => "s3_4_c1_c2_2",
    // PMSIDR_EL1 (with SPE) and TRBIDR_EL1 (with TRBE), by encoding.
    pmsidr_el1 => "s3_0_c9_c9_7",
    trbidr_el1 => "s3_0_c9_c11_7",
    pmcr_el0 => "pmcr_el0",
    id_aa64dfr0_el1 => "id_aa64dfr0_el1",
    // ICH_VMCR_EL2 by encoding (see set_icc_sre_el2).
    ich_vmcr_el2 => "s3_4_c12_c11_7",
    pmcntenset_el0 => "pmcntenset_el0",
    pmintenset_el1 => "pmintenset_el1",
    cntpct_el0 => "cntpct_el0",
    cntfrq_el0 => "cntfrq_el0",
    hcr_el2 => "hcr_el2",
    vttbr_el2 => "vttbr_el2",
    sctlr_el2 => "sctlr_el2",
    tpidr_el2 => "tpidr_el2",
    spsr_el1 => "spsr_el1",
    vtcr_el2 => "vtcr_el2",
    cptr_el2 => "cptr_el2",
    mdcr_el2 => "mdcr_el2",
    cnthctl_el2 => "cnthctl_el2",
    vmpidr_el2 => "vmpidr_el2",
}

sysreg_write! {
    set_pmcntenset_el0 => "pmcntenset_el0",
    set_pmcntenclr_el0 => "pmcntenclr_el0",
    set_pmintenset_el1 => "pmintenset_el1",
    set_pmintenclr_el1 => "pmintenclr_el1",
    set_elr_el2 => "elr_el2",
    set_spsr_el2 => "spsr_el2",
    set_esr_el1 => "esr_el1",
    set_far_el1 => "far_el1",
    set_elr_el1 => "elr_el1",
    set_spsr_el1 => "spsr_el1",
    set_hcr_el2 => "hcr_el2",
    set_hcrx_el2 => "s3_4_c1_c2_2",
    set_hafgrtr_el2 => "s3_4_c3_c1_6",
    set_vtcr_el2 => "vtcr_el2",
    set_vttbr_el2 => "vttbr_el2",
    set_vbar_el2 => "vbar_el2",
    set_tpidr_el2 => "tpidr_el2",
    set_mair_el2 => "mair_el2",
    set_tcr_el2 => "tcr_el2",
    set_ttbr0_el2 => "ttbr0_el2",
    set_sctlr_el2 => "sctlr_el2",
    set_cptr_el2 => "cptr_el2",
    set_mdcr_el2 => "mdcr_el2",
    set_cnthctl_el2 => "cnthctl_el2",
    set_cntvoff_el2 => "cntvoff_el2",
    set_vpidr_el2 => "vpidr_el2",
    set_vmpidr_el2 => "vmpidr_el2",
    set_sctlr_el1 => "sctlr_el1",
    set_hstr_el2 => "hstr_el2",
    // ICC_SRE_EL2 and ICH_HCR_EL2 by encoding: assemblers without GICv3
    // names still accept these.
    set_icc_sre_el2 => "s3_4_c12_c9_5",
    set_ich_hcr_el2 => "s3_4_c12_c11_0",
    set_ich_vmcr_el2 => "s3_4_c12_c11_7",
}

/// Physical-address size in bits from ID_AA64MMFR0_EL1.PARange.
pub fn pa_bits() -> u32 {
    match id_aa64mmfr0_el1() & 0xf {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

/// The FEAT_FGT registers, then the FEAT_FGT2 ones, by encoding, in the
/// order of [`Fgt`]'s fields.
macro_rules! fgt_regs {
    ($m:ident) => {
        $m!(
            hfgrtr => "s3_4_c1_c1_4",
            hfgwtr => "s3_4_c1_c1_5",
            hfgitr => "s3_4_c1_c1_6",
            hdfgrtr => "s3_4_c3_c1_4",
            hdfgwtr => "s3_4_c3_c1_5";
            hfgrtr2 => "s3_4_c3_c1_2",
            hfgwtr2 => "s3_4_c3_c1_3",
            hfgitr2 => "s3_4_c3_c1_7",
            hdfgrtr2 => "s3_4_c3_c1_0",
            hdfgwtr2 => "s3_4_c3_c1_1"
        )
    };
}

/// The fine-grained trap registers of a CPU whose FEAT_FGT version
/// ([`fgt_version`](crate::features::fgt_version)) is `version`: those it
/// lacks read as 0.
pub fn fgt(version: u64) -> Fgt {
    macro_rules! read {
        ($($f:ident => $r:literal),*; $($f2:ident => $r2:literal),*) => {{
            let mut v = Fgt::default();
            if version >= 1 {
                // SAFETY: reading a trap control has no side effects; the
                // CPU has these registers (FEAT_FGT).
                unsafe {
                    $(core::arch::asm!(concat!("mrs {}, ", $r), out(reg) v.$f, options(nomem, nostack, preserves_flags));)*
                }
            }
            if version >= 2 {
                // SAFETY: as above (FEAT_FGT2).
                unsafe {
                    $(core::arch::asm!(concat!("mrs {}, ", $r2), out(reg) v.$f2, options(nomem, nostack, preserves_flags));)*
                }
            }
            v
        }};
    }
    fgt_regs!(read)
}

/// Writes the fine-grained trap registers of a CPU whose FEAT_FGT
/// version is `version` (those it lacks are left alone).
///
/// # Safety
/// Every trap the values enable must be one the hypervisor handles for
/// whatever runs at EL1 next.
pub unsafe fn set_fgt(version: u64, v: &Fgt) {
    macro_rules! write {
        ($($f:ident => $r:literal),*; $($f2:ident => $r2:literal),*) => {{
            if version >= 1 {
                // SAFETY: the caller vouches for the values (FEAT_FGT).
                unsafe {
                    $(core::arch::asm!(concat!("msr ", $r, ", {}"), in(reg) v.$f, options(nostack, preserves_flags));)*
                }
            }
            if version >= 2 {
                // SAFETY: as above (FEAT_FGT2).
                unsafe {
                    $(core::arch::asm!(concat!("msr ", $r2, ", {}"), in(reg) v.$f2, options(nostack, preserves_flags));)*
                }
            }
        }};
    }
    fgt_regs!(write)
}

/// The AArch64 ID registers, Op0 = 3, Op1 = 0, CRn = 0, CRm = 4 to 7,
/// Op2 = 0 to 7, in that order (unallocated encodings read as zero).
pub fn aa64_id_regs() -> [u64; 32] {
    macro_rules! read_all {
        ($($crm:literal: [$($op2:literal),*]),*) => {
            [$($({
                let v: u64;
                // SAFETY: reading an ID register has no side effects; the
                // unallocated encodings of this space are RAZ.
                unsafe {
                    core::arch::asm!(
                        concat!("mrs {}, s3_0_c0_c", $crm, "_", $op2),
                        out(reg) v,
                        options(nomem, nostack, preserves_flags)
                    )
                };
                v
            }),*),*]
        };
    }
    read_all!(
        4: [0, 1, 2, 3, 4, 5, 6, 7],
        5: [0, 1, 2, 3, 4, 5, 6, 7],
        6: [0, 1, 2, 3, 4, 5, 6, 7],
        7: [0, 1, 2, 3, 4, 5, 6, 7]
    )
}
