//! How an exception is injected into EL1: which vector it enters and with
//! what syndrome and PSTATE. Plain arithmetic over register values, so it is
//! tested on the build machine; `exception` applies it to the registers.

use crate::esr::{ec, Esr, FSC_SEA, IL, ISS_WNR};

/// PSTATE.M values of the interrupted context (SPSR_EL2[3:0]).
const M_EL0T: u64 = 0b0000;
const M_EL1T: u64 = 0b0100;
const M_EL1H: u64 = 0b0101;
const M_MASK: u64 = 0b1111;
/// SPSR.nRW: the interrupted context was AArch32.
const SPSR_NRW: u64 = 1 << 4;
const DAIF: u64 = 0b1111 << 6;
const SPSR_PAN: u64 = 1 << 22;
/// PSTATE.{N, Z, C, V} and DIT: exception entry leaves them as they were.
const SPSR_NZCV: u64 = 0b1111 << 28;
const SPSR_DIT: u64 = 1 << 24;
const SPSR_SSBS: u64 = 1 << 12;
const SCTLR_SPAN: u64 = 1 << 23;
/// SCTLR_EL1.DSSBS: the PSTATE.SSBS an exception to EL1 enters with.
const SCTLR_DSSBS: u64 = 1 << 44;

/// Where and how to enter the EL1 exception vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    /// New ELR_EL2: the EL1 vector entry.
    pub vector: u64,
    /// New SPSR_EL2: EL1h, all of DAIF masked, PAN as SCTLR_EL1.SPAN says.
    pub spsr: u64,
    /// ESR_EL1 the EL1 handler reads.
    pub esr: u64,
}

/// Offset of the synchronous vector for an exception taken from `spsr`'s
/// mode into EL1: AArch32 EL0 uses the lower-EL AArch32 vector; an AArch32
/// EL1 cannot exist (HCR_EL2.RW = 1), so None.
fn sync_vector_offset(spsr: u64) -> Option<u64> {
    if spsr & SPSR_NRW != 0 {
        // AArch32 M[3:0] = 0b0000 is User mode (EL0).
        return (spsr & M_MASK == 0).then_some(0x600);
    }
    match spsr & M_MASK {
        M_EL1T => Some(0x000),
        M_EL1H => Some(0x200),
        M_EL0T => Some(0x400),
        _ => None,
    }
}

/// PSTATE on entry to EL1, as the architecture sets it: EL1h, D, A, I and F
/// masked; PAN set unless SCTLR_EL1.SPAN says keep it; SSBS from
/// SCTLR_EL1.DSSBS; NZCV and DIT kept; everything else (UAO, BTYPE, SS,
/// IL) clear.
fn target_spsr(old_spsr: u64, sctlr_el1: u64) -> u64 {
    let pan = if sctlr_el1 & SCTLR_SPAN == 0 {
        SPSR_PAN
    } else {
        old_spsr & SPSR_PAN
    };
    let ssbs = if sctlr_el1 & SCTLR_DSSBS != 0 {
        SPSR_SSBS
    } else {
        0
    };
    M_EL1H | DAIF | pan | ssbs | (old_spsr & (SPSR_NZCV | SPSR_DIT))
}

/// A synchronous external abort for the stage-2 fault described by
/// `fault_esr` (an ESR_EL2 with EC = instruction or data abort from a lower
/// EL), delivered to EL1 with VBAR_EL1 = `vbar`.
pub fn external_abort(fault_esr: u64, spsr: u64, sctlr_el1: u64, vbar: u64) -> Option<Injection> {
    let offset = sync_vector_offset(spsr)?;
    let from_el1 = offset < 0x400;
    let fault = Esr(fault_esr);
    let class = match (fault.ec(), from_el1) {
        (ec::IABT_LOWER, true) => ec::IABT_CUR,
        (ec::IABT_LOWER, false) => ec::IABT_LOWER,
        (_, true) => ec::DABT_CUR,
        (_, false) => ec::DABT_LOWER,
    };
    let wnr = if fault.ec() == ec::DABT_LOWER {
        fault_esr & ISS_WNR
    } else {
        0
    };
    Some(Injection {
        vector: vbar + offset,
        spsr: target_spsr(spsr, sctlr_el1),
        esr: (class << 26) | IL | wnr | FSC_SEA,
    })
}

/// An undefined-instruction exception (EC 0), for a trapped instruction
/// keel does not emulate.
pub fn undefined(spsr: u64, sctlr_el1: u64, vbar: u64) -> Option<Injection> {
    let offset = sync_vector_offset(spsr)?;
    Some(Injection {
        vector: vbar + offset,
        spsr: target_spsr(spsr, sctlr_el1),
        esr: IL,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VBAR: u64 = 0xffff_8000_1000_0000;

    #[test]
    fn data_abort_from_el1h_goes_to_current_el_spx_vector() {
        let esr = (ec::DABT_LOWER << 26) | IL | ISS_WNR | 0x07;
        let i = external_abort(esr, 0x3c5, 0, VBAR).unwrap();
        assert_eq!(i.vector, VBAR + 0x200);
        assert_eq!(Esr(i.esr).ec(), ec::DABT_CUR);
        assert_eq!(Esr(i.esr).fsc(), FSC_SEA);
        assert!(Esr(i.esr).is_write());
        assert_eq!(i.spsr & M_MASK, M_EL1H);
        assert_eq!(i.spsr & DAIF, DAIF);
        // SPAN = 0: PAN is set on entry.
        assert_ne!(i.spsr & SPSR_PAN, 0);
    }

    #[test]
    fn abort_from_el0_goes_to_lower_el_vector() {
        let esr = (ec::IABT_LOWER << 26) | IL | 0x0f;
        let i = external_abort(esr, 0, SCTLR_SPAN, VBAR).unwrap();
        assert_eq!(i.vector, VBAR + 0x400);
        assert_eq!(Esr(i.esr).ec(), ec::IABT_LOWER);
        assert!(!Esr(i.esr).is_write());
        // SPAN = 1: PAN keeps its old value (0).
        assert_eq!(i.spsr & SPSR_PAN, 0);
    }

    #[test]
    fn entry_pstate_keeps_flags_and_dit_and_takes_ssbs_from_dssbs() {
        // EL0t with N, C, DIT, SSBS, UAO (bit 23), BTYPE (bits 11:10), SS
        // (bit 21) set.
        let old =
            M_EL0T | (0b1010 << 28) | SPSR_DIT | SPSR_SSBS | (1 << 23) | (0b11 << 10) | (1 << 21);
        let i = undefined(old, SCTLR_SPAN, VBAR).unwrap();
        assert_eq!(i.vector, VBAR + 0x400);
        assert_eq!(i.esr, IL, "EC 0, IL");
        assert_eq!(i.spsr, M_EL1H | DAIF | (0b1010 << 28) | SPSR_DIT);
        let i = undefined(old, SCTLR_SPAN | SCTLR_DSSBS, VBAR).unwrap();
        assert_eq!(
            i.spsr,
            M_EL1H | DAIF | (0b1010 << 28) | SPSR_DIT | SPSR_SSBS
        );
        // From EL1h with SPAN clear: PAN set.
        let i = undefined(M_EL1H, 0, VBAR).unwrap();
        assert_eq!((i.vector, i.spsr), (VBAR + 0x200, M_EL1H | DAIF | SPSR_PAN));
        // No EL1 entry from an EL2 mode (EL2h, 0b1001).
        assert_eq!(undefined(0b1001, 0, VBAR), None);
    }

    #[test]
    fn instruction_abort_from_el1t_and_aarch32_refused() {
        let esr = (ec::IABT_LOWER << 26) | IL;
        assert_eq!(external_abort(esr, M_EL1T, 0, VBAR).unwrap().vector, VBAR);
        assert_eq!(
            Esr(external_abort(esr, M_EL1T, 0, VBAR).unwrap().esr).ec(),
            ec::IABT_CUR
        );
        assert!(external_abort(esr, SPSR_NRW | 0x3, 0, VBAR).is_none());
        assert_eq!(undefined(SPSR_NRW, 0, VBAR).unwrap().vector, VBAR + 0x600);
        assert_eq!(undefined(M_EL1H, 0, VBAR).unwrap().esr, IL);
    }
}
