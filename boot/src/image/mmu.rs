//! The hypervisor's stage 1: identity map of what keel owns, then MMU on.

use keel_arch::{barrier, sysreg, tlb};
use keel_boot::layout::Layout;
use keel_mm::stage1::{Perm, Stage1, TablePages, MAIR_EL2};

use super::ImageSections;

/// TCR_EL2: T0SZ 16 (48-bit VA), walks inner-shareable write-back, 4K
/// granule, PS from the CPU's PA size, RES1 bits 23 and 31.
fn tcr_el2() -> u64 {
    let ps = (sysreg::id_aa64mmfr0_el1() & 0xf).min(5);
    16 | (1 << 8) | (1 << 10) | (3 << 12) | (ps << 16) | (1 << 23) | (1 << 31)
}

/// SCTLR_EL2 with MMU, caches, SP alignment check and WXN on (RES1 bits of
/// the non-VHE layout included).
const SCTLR_EL2_MMU_ON: u64 = 0x30c5_0830 | 1 | (1 << 2) | (1 << 3) | (1 << 12) | (1 << 19);

/// Builds the stage-1 tables for the image, the stacks (guard pages left
/// unmapped), the pool, the lent- and donated-page tables and the console.
pub fn build(
    s: &ImageSections,
    plan: &Layout,
    cpus: usize,
    uart: Option<u64>,
    gicr: &[(u64, u64)],
    pages: &mut impl TablePages,
) -> Result<Stage1, keel_mm::stage1::S1Error> {
    let mut s1 = Stage1::new(pages)?;
    s1.map(s.start, s.start, s.text_end - s.start, Perm::Text, pages)?;
    s1.map(
        s.text_end,
        s.text_end,
        s.rodata_end - s.text_end,
        Perm::ReadOnly,
        pages,
    )?;
    s1.map(
        s.rodata_end,
        s.rodata_end,
        s.end - s.rodata_end,
        Perm::ReadWrite,
        pages,
    )?;
    for cpu in 0..cpus.max(1) {
        let slot = plan.stack_slot(cpu);
        let rw = slot.stack.start;
        s1.map(rw, rw, slot.emergency.end - rw, Perm::ReadWrite, pages)?;
    }
    s1.map(
        plan.pool.start,
        plan.pool.start,
        plan.pool.size(),
        Perm::ReadWrite,
        pages,
    )?;
    for words in [plan.lent, plan.donated] {
        s1.map(
            words.start,
            words.start,
            words.size(),
            Perm::ReadWrite,
            pages,
        )?;
    }
    for &(start, end) in gicr {
        s1.map(start, start, end - start, Perm::Device, pages)?;
    }
    if let Some(u) = uart {
        s1.map(u & !0xfff, u & !0xfff, 0x1000, Perm::Device, pages)?;
    }
    Ok(s1)
}

/// Turns the MMU on with `s1`. The code doing it is identity mapped, so
/// execution continues at the next instruction.
pub fn enable(s1: &Stage1) {
    enable_ttbr(s1.ttbr());
}

/// Turns the MMU on with the stage-1 tables at `ttbr` (every CPU shares
/// keel's one stage 1).
pub fn enable_ttbr(ttbr: u64) {
    // SAFETY: `s1` identity-maps the image, stacks, pool and console with
    // the right permissions, so every access after the switch still hits;
    // the TLB holds nothing for EL2 that could conflict (invalidated here).
    unsafe {
        sysreg::set_mair_el2(MAIR_EL2);
        sysreg::set_tcr_el2(tcr_el2());
        sysreg::set_ttbr0_el2(ttbr);
        barrier::dsb_ish();
        barrier::isb();
        tlb::invalidate_el2_all();
        sysreg::set_sctlr_el2(SCTLR_EL2_MMU_ON);
    }
    barrier::isb();
    keel_arch::cache::invalidate_icache();
}
