//! Where everything goes at boot: the hypervisor's reservation (image,
//! per-CPU stacks, page pool) and the host's device tree.
//!
//! The reservation starts at the image's load address and is contiguous:
//!
//! ```text
//! | image (text, rodata, data, bss) | CPU 0 slot | CPU 1 slot | ... | pool | lent | donated |
//! slot = | guard 4K (unmapped) | stack 16K | emergency stack 4K |
//! ```
//!
//! `lent` is the lent-page table's words: one `u32` per page of RAM
//! (`keel_hyp::lent`). `donated` is the donated-page table's words: two
//! bits per page of RAM and their summaries (`keel_mm::donated`). Both are
//! indexed by a page's position in RAM (`Layout::ram`), so the holes
//! between RAM regions cost nothing.
//!
//! The boot CPU's slot is the first one: entry.S puts its stack there before
//! any Rust runs, so the slot geometry here and there must agree.

pub use crate::dt::PhysRange as Range;
use keel_mm::donated::DonatedPages;
use keel_mm::frames::RamFrames;

fn contains(outer: &Range, inner: &Range) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

pub const PAGE: u64 = 4096;
pub const GUARD_SIZE: u64 = PAGE;
pub const STACK_SIZE: u64 = 16 * 1024;
pub const EMERGENCY_STACK_SIZE: u64 = PAGE;
pub const STACK_SLOT: u64 = GUARD_SIZE + STACK_SIZE + EMERGENCY_STACK_SIZE;
/// Most CPUs keel runs on (per-CPU data is a static array of this length).
pub const MAX_CPUS: usize = 8;

/// One CPU's stack slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackSlot {
    pub guard: Range,
    pub stack: Range,
    pub emergency: Range,
}

/// The boot plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub image: Range,
    pub stacks: Range,
    pub pool: Range,
    /// The lent-page table's words, one per page of `ram`.
    pub lent: Range,
    /// The donated-page table's words, for every page of `ram`.
    pub donated: Range,
    /// RAM's pages, as the per-page tables number them.
    pub ram: RamFrames,
    /// All memory withheld from the host: image + stacks + pool + lent +
    /// donated.
    pub reserved: Range,
    pub host_dtb: Range,
}

impl Layout {
    pub fn stack_slot(&self, cpu: usize) -> StackSlot {
        let base = self.stacks.start + cpu as u64 * STACK_SLOT;
        StackSlot {
            guard: Range::new(base, base + GUARD_SIZE),
            stack: Range::new(base + GUARD_SIZE, base + GUARD_SIZE + STACK_SIZE),
            emergency: Range::new(base + GUARD_SIZE + STACK_SIZE, base + STACK_SLOT),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The image is not page aligned or not inside one RAM region.
    ImageNotInRam,
    /// The reservation would run past the end of the image's RAM region.
    ReservationPastRam,
    /// A module or the boot DTB lies inside the reservation.
    Overlap(Range),
    /// No room for the host's device tree.
    NoRoomForHostDtb,
    TooManyCpus(usize),
    /// More separate RAM regions than the per-page tables can number.
    TooManyRamRegions,
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            LayoutError::ImageNotInRam => write!(f, "the image is not page aligned inside RAM"),
            LayoutError::ReservationPastRam => {
                write!(f, "the hypervisor's reservation runs past the end of its RAM region")
            }
            LayoutError::Overlap(r) => write!(
                f,
                "{:#x}..{:#x} (a module or the DTB) overlaps the hypervisor's reservation; load it higher",
                r.start, r.end
            ),
            LayoutError::NoRoomForHostDtb => write!(f, "no free RAM for the host's device tree"),
            LayoutError::TooManyCpus(n) => write!(f, "{n} CPUs; keel supports at most {MAX_CPUS}"),
            LayoutError::TooManyRamRegions => write!(
                f,
                "more than {} separate RAM regions",
                keel_mm::frames::MAX_RUNS
            ),
        }
    }
}

/// Pool pages the hypervisor keeps at boot: tables of the host stage 2 and
/// of its own stage 1, with room to spare. Grows with RAM (one page of level-3
/// or level-2 tables per GiB covers the splits a host mapping can need) and
/// with CPUs (per-CPU state). Anything beyond comes from pages the host
/// donates (HOST_DONATE_HYP).
pub fn pool_pages(ram_bytes: u64, cpus: usize) -> u64 {
    let gib = ram_bytes.div_ceil(1 << 30);
    48 + 2 * gib + 4 * cpus as u64
}

/// Plans the boot. `avoid` are ranges that must stay intact (boot DTB,
/// modules); `host_dtb_size` is how much room the host's DTB needs.
pub fn plan(
    image: Range,
    ram: &[Range],
    cpus: usize,
    avoid: &[Range],
    host_dtb_size: u64,
) -> Result<Layout, LayoutError> {
    if cpus > MAX_CPUS {
        return Err(LayoutError::TooManyCpus(cpus));
    }
    let region = ram
        .iter()
        .find(|r| contains(r, &image))
        .filter(|_| image.start.is_multiple_of(PAGE) && image.end.is_multiple_of(PAGE))
        .ok_or(LayoutError::ImageNotInRam)?;
    let ram_bytes: u64 = ram.iter().map(Range::size).sum();
    let stacks = Range::new(image.end, image.end + cpus.max(1) as u64 * STACK_SLOT);
    let pool = Range::new(stacks.end, stacks.end + pool_pages(ram_bytes, cpus) * PAGE);
    let ram_frames = ram_frames(ram)?;
    let ram_pages = ram_frames.pages();
    let lent_bytes = (ram_pages * 4).next_multiple_of(PAGE);
    let lent = Range::new(pool.end, pool.end + lent_bytes);
    let donated_words = DonatedPages::words_for(ram_pages) as u64;
    let donated = Range::new(
        lent.end,
        lent.end + (donated_words * 8).next_multiple_of(PAGE),
    );
    let reserved = Range::new(image.start, donated.end);
    if reserved.end > region.end {
        return Err(LayoutError::ReservationPastRam);
    }
    if let Some(r) = avoid.iter().find(|r| r.overlaps(&reserved)) {
        return Err(LayoutError::Overlap(*r));
    }
    let host_dtb = place_host_dtb(ram, &reserved, avoid, host_dtb_size)?;
    Ok(Layout {
        image,
        stacks,
        pool,
        lent,
        donated,
        ram: ram_frames,
        reserved,
        host_dtb,
    })
}

/// RAM's pages: each region's, rounded out to whole pages, regions that
/// touch or overlap merged.
pub fn ram_frames(ram: &[Range]) -> Result<RamFrames, LayoutError> {
    let mut runs = [(0u64, 0u64); keel_mm::frames::MAX_RUNS];
    if ram.len() > runs.len() {
        return Err(LayoutError::TooManyRamRegions);
    }
    for (run, r) in runs.iter_mut().zip(ram) {
        let first = r.start / PAGE;
        *run = (first, r.end.div_ceil(PAGE) - first);
    }
    RamFrames::new(&runs[..ram.len()]).ok_or(LayoutError::TooManyRamRegions)
}

/// The host's DTB goes in the first page-aligned gap of RAM, after the
/// reservation if possible, that overlaps neither the reservation nor `avoid`.
fn place_host_dtb(
    ram: &[Range],
    reserved: &Range,
    avoid: &[Range],
    size: u64,
) -> Result<Range, LayoutError> {
    let size = size.div_ceil(PAGE) * PAGE;
    let free = |c: &Range| !c.overlaps(reserved) && !avoid.iter().any(|a| a.overlaps(c));
    // Candidates: right after the reservation, after each avoided range,
    // and the start of each RAM region.
    let starts = core::iter::once(reserved.end)
        .chain(avoid.iter().map(|a| a.end.div_ceil(PAGE) * PAGE))
        .chain(ram.iter().map(|r| r.start));
    starts
        .filter_map(|s| Some(Range::new(s, s.checked_add(size)?)))
        .find(|c| ram.iter().any(|r| contains(r, c)) && free(c))
        .ok_or(LayoutError::NoRoomForHostDtb)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: [Range; 1] = [Range::new(0x4000_0000, 0xC000_0000)];
    const IMAGE: Range = Range::new(0x4020_0000, 0x4024_0000);

    #[test]
    fn reservation_is_image_stacks_pool_and_fits_budget() {
        let dtb = Range::new(0x4000_0000, 0x4010_0000);
        let kernel = Range::new(0x4800_0000, 0x4801_0000);
        let l = plan(IMAGE, &RAM, 1, &[dtb, kernel], 0x2000).unwrap();
        assert_eq!(l.reserved.start, IMAGE.start);
        assert_eq!(l.stacks.start, IMAGE.end);
        assert_eq!(l.pool.start, l.stacks.end);
        assert_eq!(l.lent.start, l.pool.end);
        assert_eq!(l.donated.start, l.lent.end);
        assert_eq!(l.reserved.end, l.donated.end);
        assert_eq!(l.pool.size(), pool_pages(2 << 30, 1) * PAGE);
        assert_eq!(l.ram.runs().collect::<Vec<_>>(), [(0x40000, 0x80000)]);
        assert_eq!(l.lent.size(), (2 << 30) / PAGE * 4, "a word per page");
        // Two bits per page (64 KiB each per 2 GiB) and 130 summary words.
        assert_eq!(l.donated.size(), (128 << 10) + PAGE);
        assert!(l.reserved.size() <= 4 << 20);
        let s = l.stack_slot(0);
        assert_eq!(
            s.stack.end,
            IMAGE.end + GUARD_SIZE + STACK_SIZE,
            "matches entry.S"
        );
        assert_eq!(
            l.host_dtb,
            Range::new(l.reserved.end, l.reserved.end + 0x2000)
        );
    }

    #[test]
    fn lent_and_donated_words_cover_ram_and_not_the_holes() {
        // 1 GiB and a page and a half 3 GiB above it, then 2 GiB far above
        // (the 1 TiB hole between costs nothing).
        let ram = [
            Range::new(0x4000_0000, 0x8000_0000),
            Range::new(0x1_0000_0000, 0x1_0000_1800),
            Range::new(0x100_0000_0000, 0x100_8000_0000),
        ];
        let l = plan(IMAGE, &ram, 2, &[], 0x1000).unwrap();
        let runs: Vec<_> = l.ram.runs().collect();
        assert_eq!(
            runs,
            [(0x40000, 0x40000), (0x100000, 2), (0x1000_0000, 0x80000)]
        );
        let words = 0x40000 + 2 + 0x80000;
        assert_eq!(l.ram.pages(), words);
        assert_eq!(l.lent.size(), (words * 4).next_multiple_of(PAGE));
        let donated = DonatedPages::words_for(words) as u64 * 8;
        assert_eq!(l.donated.size(), donated.next_multiple_of(PAGE));
        assert_eq!(l.reserved.end, l.donated.end);
    }

    #[test]
    fn ram_regions_that_touch_are_one_run() {
        let ram = [
            Range::new(0x8000_0000, 0x8000_2000),
            Range::new(0x4000_0000, 0x4000_0800),
            Range::new(0x4000_0800, 0x4000_1000),
        ];
        let frames = ram_frames(&ram).unwrap();
        let runs: Vec<_> = frames.runs().collect();
        assert_eq!(runs, [(0x40000, 1), (0x80000, 2)]);
        let many = [Range::new(0, 0x1000); 9];
        assert_eq!(ram_frames(&many), Err(LayoutError::TooManyRamRegions));
    }

    #[test]
    fn host_dtb_skips_modules() {
        let dtb = Range::new(0x4000_0000, 0x4010_0000);
        let probe = plan(IMAGE, &RAM, 1, &[dtb], 0x1000).unwrap();
        let blocker = Range::new(probe.reserved.end, probe.reserved.end + 0x1800);
        let l = plan(IMAGE, &RAM, 1, &[dtb, blocker], 0x1000).unwrap();
        // The first free gap: between the boot DTB and the image.
        assert_eq!(l.host_dtb.start, dtb.end);
        assert!(!l.host_dtb.overlaps(&blocker) && !l.host_dtb.overlaps(&l.reserved));
        let low = Range::new(dtb.end, IMAGE.start);
        let l = plan(IMAGE, &RAM, 1, &[dtb, blocker, low], 0x1000).unwrap();
        assert_eq!(l.host_dtb.start, probe.reserved.end + 0x2000);
    }

    #[test]
    fn refuses_overlaps_and_bad_images() {
        let inside = Range::new(0x4021_0000, 0x4022_0000);
        assert_eq!(
            plan(IMAGE, &RAM, 1, &[inside], 0x1000),
            Err(LayoutError::Overlap(inside))
        );
        let outside = Range::new(0x1000_0000, 0x1004_0000);
        assert_eq!(
            plan(outside, &RAM, 1, &[], 0x1000),
            Err(LayoutError::ImageNotInRam)
        );
        let unaligned = Range::new(0x4020_0010, 0x4024_0000);
        assert_eq!(
            plan(unaligned, &RAM, 1, &[], 0x1000),
            Err(LayoutError::ImageNotInRam)
        );
        let top = Range::new(0xBFFF_0000, 0xC000_0000);
        assert_eq!(
            plan(top, &RAM, 1, &[], 0x1000),
            Err(LayoutError::ReservationPastRam)
        );
        assert_eq!(
            plan(IMAGE, &RAM, 9, &[], 0x1000),
            Err(LayoutError::TooManyCpus(9))
        );
        let all = Range::new(0x4000_0000, 0xC000_0000);
        let l = plan(IMAGE, &RAM, 1, &[], 0x1000).unwrap();
        let rest = Range::new(l.reserved.end, 0xC000_0000);
        let low = Range::new(0x4000_0000, IMAGE.start);
        assert_eq!(
            plan(IMAGE, &RAM, 1, &[rest, low], 0x1000),
            Err(LayoutError::NoRoomForHostDtb)
        );
        assert!(plan(IMAGE, &[all], 1, &[], 0x1000).is_ok());
    }
}
