//! The test kernel's own stage-1: an identity map in 1 GiB blocks.
//!
//! With the MMU off every data access is Device memory, where exclusives
//! (atomics) are not guaranteed to work and unaligned accesses fault, so the
//! kernel turns its MMU on before running any test: [0, 1 GiB) is
//! Device-nGnRE (the QEMU virt peripherals), and each 1 GiB block that holds
//! RAM is Normal write-back, executable so that instruction-fetch probes
//! reach the hypervisor's stage-2. Everything else is unmapped, which gives
//! the self-test a translation fault of its own to probe.

use core::cell::UnsafeCell;

const BLOCK_SHIFT: u32 = 30;
pub const BLOCK_SIZE: u64 = 1 << BLOCK_SHIFT;
const ENTRIES: usize = 512;

/// 39-bit VAs: T0SZ = 25, so the walk starts at level 1 with 1 GiB entries.
const T0SZ: u64 = 64 - 39;
/// The first VA this map cannot translate at all.
pub const VA_LIMIT: u64 = 1 << 39;

const MAIR_DEVICE_NGNRE: u64 = 0x04;
const MAIR_NORMAL_WB: u64 = 0xff;
const ATTR_DEVICE: u64 = 0;
const ATTR_NORMAL: u64 = 1;

const DESC_BLOCK: u64 = 0b01;
const DESC_ATTR_SHIFT: u32 = 2;
const DESC_SH_INNER: u64 = 0b11 << 8;
const DESC_AF: u64 = 1 << 10;
const DESC_PXN: u64 = 1 << 53;
const DESC_UXN: u64 = 1 << 54;

#[repr(C, align(4096))]
struct Table(UnsafeCell<[u64; ENTRIES]>);

// SAFETY: the kernel runs on one CPU; the table is written only by `map_*`
// functions, which are called from that CPU and never concurrently.
unsafe impl Sync for Table {}

static L1: Table = Table(UnsafeCell::new([0; ENTRIES]));

fn write_entry(index: usize, desc: u64) {
    // SAFETY: index < ENTRIES is checked by the callers (`block_index`); the
    // table is ours alone and the write is a single aligned u64 store, which
    // the walker sees atomically.
    unsafe {
        core::ptr::write_volatile((L1.0.get() as *mut u64).add(index), desc);
    }
}

fn read_entry(index: usize) -> u64 {
    // SAFETY: as in `write_entry`, a single aligned load inside the table.
    unsafe { core::ptr::read_volatile((L1.0.get() as *const u64).add(index)) }
}

fn block_index(pa: u64) -> Option<usize> {
    if pa < VA_LIMIT {
        Some((pa >> BLOCK_SHIFT) as usize)
    } else {
        None
    }
}

/// Maps the 1 GiB block holding `pa` as Normal RAM (no-op if outside the
/// 39-bit space or block 0, which stays Device). Invalid-to-valid changes
/// need no break-before-make, only a barrier before the next access.
pub fn map_ram_block(pa: u64) {
    let Some(index) = block_index(pa) else { return };
    if index == 0 || read_entry(index) != 0 {
        return;
    }
    let desc = (index as u64) << BLOCK_SHIFT
        | DESC_BLOCK
        | ATTR_NORMAL << DESC_ATTR_SHIFT
        | DESC_SH_INNER
        | DESC_AF
        | DESC_UXN;
    write_entry(index, desc);
    // SAFETY: barriers only: make the new entry visible to the walker.
    unsafe { core::arch::asm!("dsb ishst", "isb", options(nostack)) };
}

/// Maps every block that intersects [start, end) as RAM.
pub fn map_ram(start: u64, end: u64) {
    let mut pa = start & !(BLOCK_SIZE - 1);
    while pa < end && pa < VA_LIMIT {
        map_ram_block(pa);
        pa += BLOCK_SIZE;
    }
}

/// Builds the initial map (devices, plus the blocks holding the image and the
/// device tree) and turns the MMU and caches on.
///
/// # Safety
/// Call once, early, with the MMU off, before anything relies on caches.
pub unsafe fn enable(image: u64, dtb: u64) {
    write_entry(
        0,
        DESC_BLOCK | ATTR_DEVICE << DESC_ATTR_SHIFT | DESC_AF | DESC_PXN | DESC_UXN,
    );
    map_ram_block(image);
    map_ram_block(dtb);

    let mair = MAIR_DEVICE_NGNRE << (8 * ATTR_DEVICE) | MAIR_NORMAL_WB << (8 * ATTR_NORMAL);
    let mmfr0: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe {
        core::arch::asm!("mrs {}, id_aa64mmfr0_el1", out(reg) mmfr0, options(nomem, nostack))
    };
    // IPS: the CPU's physical address size, capped at 48 bits (0b101).
    let ips = (mmfr0 & 0xf).min(0b101);
    let tcr = T0SZ
        | 0b01 << 8 // IRGN0: write-back
        | 0b01 << 10 // ORGN0: write-back
        | 0b11 << 12 // SH0: inner shareable
        | 1 << 23 // EPD1: no TTBR1 walks
        | ips << 32;
    // SCTLR_EL1: the ARMv8.0 RES1 bits, then M (MMU), C (data cache),
    // SA (stack alignment check) and I (instruction cache).
    let sctlr: u64 =
        (1 << 29 | 1 << 28 | 1 << 23 | 1 << 22 | 1 << 20 | 1 << 11) | 1 | 1 << 2 | 1 << 3 | 1 << 12;
    // SAFETY: the table maps the code, stack and data we run from at the
    // same addresses (identity), so execution continues seamlessly once
    // SCTLR.M is set; stale TLB and I-cache contents are discarded first.
    unsafe {
        core::arch::asm!(
            "msr mair_el1, {mair}",
            "msr tcr_el1, {tcr}",
            "msr ttbr0_el1, {ttbr}",
            "isb",
            "tlbi vmalle1",
            "ic iallu",
            "dsb nsh",
            "isb",
            "msr sctlr_el1, {sctlr}",
            "isb",
            mair = in(reg) mair,
            tcr = in(reg) tcr,
            ttbr = in(reg) L1.0.get() as u64,
            sctlr = in(reg) sctlr,
            options(nostack),
        );
    }
}
