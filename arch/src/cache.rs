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

/// Bytes one `DC ZVA` zeroes, or `None` if the instruction is prohibited
/// (DCZID_EL0: BS, log2 of the block in 4-byte words; DZP).
fn zva_block() -> Option<usize> {
    let dczid: u64;
    // SAFETY: reading DCZID_EL0 has no side effects.
    unsafe { asm!("mrs {}, dczid_el0", out(reg) dczid, options(nomem, nostack)) };
    (dczid & (1 << 4) == 0).then(|| 4 << (dczid & 0xf))
}

/// Zeroes [start, start + len) of Normal memory: with `DC ZVA` (one
/// instruction per block, typically 64 bytes) when `start` and `len` are
/// multiples of the block, else with ordinary stores.
///
/// # Safety
/// The range must be mapped writable as Normal memory and be the caller's
/// to overwrite.
pub unsafe fn zero(start: usize, len: usize) {
    match zva_block() {
        Some(block) if (start | len) & (block - 1) == 0 => {
            let mut addr = start;
            while addr < start + len {
                // SAFETY: the caller owns the block at `addr`, mapped Normal
                // and writable; DC ZVA writes zeros to exactly that block.
                unsafe { asm!("dc zva, {}", in(reg) addr, options(nostack, preserves_flags)) };
                addr += block;
            }
        }
        // SAFETY: forwarded contract.
        _ => unsafe { core::ptr::write_bytes(start as *mut u8, 0, len) },
    }
}

/// Invalidates the whole instruction cache (inner shareable).
pub fn invalidate_icache() {
    // SAFETY: IC IALLUIS only affects cache state.
    unsafe { asm!("ic ialluis", options(nostack, preserves_flags)) };
    crate::barrier::dsb_ish();
    crate::barrier::isb();
}
