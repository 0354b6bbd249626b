//! TLB maintenance instructions. Callers put them in the break-before-make
//! order with the barriers of [`crate::barrier`].

use core::arch::asm;

use crate::barrier::{dsb_ish, dsb_ishst, isb};

/// TLBI IPAS2E1IS: stage-2 entries for one IPA of the VMID in VTTBR_EL2
/// (non-last-level form, so walk-cache entries of a freed table go too).
pub fn ipas2e1is(ipa: u64) {
    let arg = (ipa >> 12) & ((1 << 36) - 1);
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe { asm!("tlbi ipas2e1is, {}", in(reg) arg, options(nostack, preserves_flags)) };
}

/// TLBI VMALLE1IS: stage-1 (and combined) entries of the VMID in VTTBR_EL2.
pub fn vmalle1is() {
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe { asm!("tlbi vmalle1is", options(nostack, preserves_flags)) };
}

/// This CPU's own stage-1 (and combined) entries of the VMID in VTTBR_EL2,
/// and its instruction cache, complete when this returns: for a vCPU about
/// to run where another vCPU of its VM ran last (`RunTicket::flush_local`).
pub fn vmalle1_local() {
    // SAFETY: TLB and instruction-cache invalidation only drop cached
    // translations and instructions.
    unsafe {
        asm!(
            "tlbi vmalle1",
            "ic iallu",
            "dsb nsh",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// TLBI VMALLS12E1IS: every stage-1 and stage-2 entry of the VMID in VTTBR_EL2.
pub fn vmalls12e1is() {
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe { asm!("tlbi vmalls12e1is", options(nostack, preserves_flags)) };
}

/// TLBI ALLE1IS: every EL1&0 entry, of every VMID (what EL2 software that
/// ran before keel may have left, for VMIDs keel's guests will use).
pub fn alle1is() {
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe { asm!("tlbi alle1is", options(nostack, preserves_flags)) };
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
