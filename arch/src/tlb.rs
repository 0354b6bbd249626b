//! TLB maintenance for stage 2 (per VMID) and for the hypervisor's stage 1.

use core::arch::asm;

use crate::barrier::{dsb_ish, dsb_ishst, isb};

/// Invalidates stage-2 entries for one IPA in the VMID currently in VTTBR_EL2
/// and, since combined entries may cache it, all stage-1 entries of that VMID.
pub fn invalidate_ipa(ipa: u64) {
    let arg = (ipa >> 12) & ((1 << 36) - 1);
    dsb_ishst();
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe {
        asm!("tlbi ipas2e1is, {}", in(reg) arg, options(nostack, preserves_flags));
    }
    dsb_ish();
    // SAFETY: as above.
    unsafe { asm!("tlbi vmalle1is", options(nostack, preserves_flags)) };
    dsb_ish();
    isb();
}

/// Invalidates every stage-1 and stage-2 entry of the VMID in VTTBR_EL2.
pub fn invalidate_vmid() {
    dsb_ishst();
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe { asm!("tlbi vmalls12e1is", options(nostack, preserves_flags)) };
    dsb_ish();
    isb();
}

/// Invalidates one page of the hypervisor's own (EL2) stage 1.
pub fn invalidate_el2_va(va: u64) {
    dsb_ishst();
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe { asm!("tlbi vae2is, {}", in(reg) (va >> 12), options(nostack, preserves_flags)) };
    dsb_ish();
    isb();
}

/// Invalidates the hypervisor's whole EL2 stage 1.
pub fn invalidate_el2_all() {
    dsb_ishst();
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe { asm!("tlbi alle2is", options(nostack, preserves_flags)) };
    dsb_ish();
    isb();
}
