//! Memory barriers.

use core::arch::asm;

/// DSB ISH: all earlier memory accesses and maintenance are complete for the
/// inner-shareable domain.
#[inline(always)]
pub fn dsb_ish() {
    // SAFETY: a barrier has no effect on memory safety.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) }
}

/// DSB ISHST: earlier stores (e.g. page-table writes) are visible.
#[inline(always)]
pub fn dsb_ishst() {
    // SAFETY: a barrier has no effect on memory safety.
    unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) }
}

/// DSB SY.
#[inline(always)]
pub fn dsb_sy() {
    // SAFETY: a barrier has no effect on memory safety.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) }
}

/// ISB: later instructions see the effect of earlier system-register writes.
#[inline(always)]
pub fn isb() {
    // SAFETY: a barrier has no effect on memory safety.
    unsafe { asm!("isb", options(nostack, preserves_flags)) }
}
