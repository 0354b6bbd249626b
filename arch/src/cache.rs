//! Data-cache maintenance by virtual address.

use core::arch::asm;

/// Smallest data-cache line size, from CTR_EL0.DminLine.
fn dcache_line() -> usize {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    4 << ((ctr >> 16) & 0xf)
}

/// Cleans and invalidates [start, start + len) to the point of coherency, so
/// that a non-cacheable observer (another CPU with its MMU off, a device, a
/// host that maps the page with other attributes) sees what was written.
pub fn clean_invalidate(start: usize, len: usize) {
    let line = dcache_line();
    let mut addr = start & !(line - 1);
    while addr < start + len {
        // SAFETY: DC CIVAC only affects cache state; the data is preserved.
        unsafe { asm!("dc civac, {}", in(reg) addr, options(nostack, preserves_flags)) };
        addr += line;
    }
    crate::barrier::dsb_sy();
}

/// Invalidates the whole instruction cache (inner shareable).
pub fn invalidate_icache() {
    // SAFETY: IC IALLUIS only affects cache state.
    unsafe { asm!("ic ialluis", options(nostack, preserves_flags)) };
    crate::barrier::dsb_ish();
    crate::barrier::isb();
}
