//! The hypervisor's own EL2 stage-1 translation tables (non-VHE EL2: one VA
//! range through TTBR0_EL2, 4K granule, 48-bit VA, walks start at level 0).
//!
//! keel maps only what it owns or borrows, identity (VA == PA): its image
//! with per-section permissions, its stacks with unmapped guard pages, its
//! page pool, the console, and pages the host shares with it. A mapping is
//! made with 2M blocks where alignment allows and 4K pages elsewhere;
//! `unmap` removes whole leaves, so callers unmap what they mapped.

use tock_registers::fields::FieldValue;
use tock_registers::register_bitfields;

const PAGE: u64 = 4096;
const ENTRIES: usize = 512;
/// Level-2 block size.
const BLOCK_2M: u64 = 1 << 21;
/// Output-address bits [47:12] of a descriptor.
const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
/// Highest VA + 1 (T0SZ = 16).
pub const VA_LIMIT: u64 = 1 << 48;

register_bitfields! {u64,
    /// An EL2 stage-1 descriptor (block, page, or table).
    pub S1_DESC [
        VALID OFFSET(0) NUMBITS(1) [],
        /// 1: table (levels 0-2) or page (level 3); 0: block.
        TABLE_OR_PAGE OFFSET(1) NUMBITS(1) [],
        /// Index into MAIR_EL2.
        ATTR_INDX OFFSET(2) NUMBITS(3) [Device = 0, Normal = 1],
        /// AP[2:1]: at EL2 AP[1] is RES1, AP[2] makes the page read-only.
        AP OFFSET(6) NUMBITS(2) [ReadWrite = 0b01, ReadOnly = 0b11],
        SH OFFSET(8) NUMBITS(2) [Non = 0b00, Inner = 0b11],
        AF OFFSET(10) NUMBITS(1) [],
        /// Execute-never (bit 54 in the EL2 regime).
        XN OFFSET(54) NUMBITS(1) []
    ]
}

/// MAIR_EL2 that matches `ATTR_INDX`: 0 Device-nGnRE, 1 Normal write-back.
pub const MAIR_EL2: u64 = 0x04 | (0xff << 8);

/// What a mapping is for; each gives one set of permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// Code: read-only, executable.
    Text,
    /// Read-only data, never executable.
    ReadOnly,
    /// Read-write data, never executable.
    ReadWrite,
    /// MMIO: Device-nGnRE, read-write, never executable.
    Device,
}

impl Perm {
    fn leaf_bits(self) -> u64 {
        use S1_DESC::*;
        let v: FieldValue<u64, S1_DESC::Register> = match self {
            Perm::Text => ATTR_INDX::Normal + AP::ReadOnly + SH::Inner,
            Perm::ReadOnly => ATTR_INDX::Normal + AP::ReadOnly + SH::Inner + XN::SET,
            Perm::ReadWrite => ATTR_INDX::Normal + AP::ReadWrite + SH::Inner + XN::SET,
            Perm::Device => ATTR_INDX::Device + AP::ReadWrite + SH::Non + XN::SET,
        };
        (v + VALID::SET + AF::SET).value
    }
}

/// Where stage-1 table pages come from, and how to reach them.
pub trait TablePages {
    /// A zeroed 4 KiB page's physical address, or None when exhausted.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Returns a page `alloc_table` gave out.
    fn free_table(&mut self, pa: u64);
    /// Where the hypervisor can read and write the page at `pa`.
    fn table_ptr(&self, pa: u64) -> *mut [u64; ENTRIES];
}

/// Errors of stage-1 operations. BadRange, AlreadyMapped and NotMapped are
/// found before anything changes; NoMemory part-way through `map` leaves
/// what was mapped so far (stage 1 is built at boot, from a pool sized for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S1Error {
    /// Zero length, misaligned, or beyond the VA space.
    BadRange,
    /// Part of the range is already mapped.
    AlreadyMapped,
    /// Part of the range is not mapped by a leaf that lies wholly inside it.
    NotMapped,
    /// No page for a table.
    NoMemory,
}

/// One EL2 stage-1 address space.
pub struct Stage1 {
    root: u64,
    /// Table pages in use, the root included.
    tables: usize,
}

fn index(va: u64, level: usize) -> usize {
    ((va >> (39 - 9 * level)) & 0x1ff) as usize
}

fn check_range(va: u64, pa: u64, len: u64) -> Result<(), S1Error> {
    let aligned = (va | pa | len).is_multiple_of(PAGE);
    let end_ok = va.checked_add(len).is_some_and(|e| e <= VA_LIMIT);
    if len == 0 || !aligned || !end_ok || pa.checked_add(len).is_none() {
        return Err(S1Error::BadRange);
    }
    Ok(())
}

impl Stage1 {
    pub fn new(pages: &mut impl TablePages) -> Result<Self, S1Error> {
        let root = pages.alloc_table().ok_or(S1Error::NoMemory)?;
        Ok(Stage1 { root, tables: 1 })
    }

    /// Table pages in use, the root included.
    pub fn table_pages(&self) -> usize {
        self.tables
    }

    /// The value for TTBR0_EL2.
    pub fn ttbr(&self) -> u64 {
        self.root
    }

    fn entry(pages: &impl TablePages, table: u64, idx: usize) -> u64 {
        // SAFETY: `table` is one of our table pages, reachable through
        // `table_ptr`; idx < 512.
        unsafe { (*pages.table_ptr(table))[idx] }
    }

    fn set_entry(pages: &impl TablePages, table: u64, idx: usize, desc: u64) {
        // SAFETY: as in `entry`; a volatile store so the table walker sees
        // exactly one write of the whole descriptor.
        unsafe { core::ptr::write_volatile(&mut (*pages.table_ptr(table))[idx], desc) }
    }

    /// The table at `level + 1` under `table[idx]`, created if absent.
    fn next_table(
        &mut self,
        pages: &mut impl TablePages,
        table: u64,
        idx: usize,
    ) -> Result<u64, S1Error> {
        let desc = Self::entry(pages, table, idx);
        if desc & 1 == 0 {
            let new = pages.alloc_table().ok_or(S1Error::NoMemory)?;
            self.tables += 1;
            Self::set_entry(pages, table, idx, new | 0b11);
            return Ok(new);
        }
        if desc & 0b10 == 0 {
            return Err(S1Error::AlreadyMapped);
        }
        Ok(desc & OA_MASK)
    }

    /// Maps [va, va + len) to [pa, pa + len) with `perm`. Fails, mapping
    /// nothing new, if any page of the range is already mapped.
    pub fn map(
        &mut self,
        va: u64,
        pa: u64,
        len: u64,
        perm: Perm,
        pages: &mut impl TablePages,
    ) -> Result<(), S1Error> {
        self.map_with(va, pa, len, perm, pages, true)
    }

    /// As [`map`](Self::map), with 4K pages only, so that any part of the
    /// range can later be unmapped on its own (shared and donated pages).
    pub fn map_pages(
        &mut self,
        va: u64,
        pa: u64,
        len: u64,
        perm: Perm,
        pages: &mut impl TablePages,
    ) -> Result<(), S1Error> {
        self.map_with(va, pa, len, perm, pages, false)
    }

    /// Table pages that `map_pages(va, .., len, ..)` would allocate.
    pub fn pages_needed(&self, va: u64, len: u64, pages: &impl TablePages) -> usize {
        self.pages_needed_with(va, len, pages, false)
    }

    /// Table pages that `map(va, va, len, ..)` (identity, blocks where
    /// aligned) would allocate.
    pub fn pages_needed_blocks(&self, va: u64, len: u64, pages: &impl TablePages) -> usize {
        self.pages_needed_with(va, len, pages, true)
    }

    fn pages_needed_with(&self, va: u64, len: u64, pages: &impl TablePages, blocks: bool) -> usize {
        // Walk the 4K leaves in VA order; a missing table at `level` is
        // counted once per distinct VA prefix it covers, and everything
        // below a missing table is missing too.
        let mut last = [u64::MAX; 4];
        let mut needed = 0;
        let end = va.saturating_add(len).min(VA_LIMIT);
        let mut v = va & !(PAGE - 1);
        while v < end {
            let block = blocks && v.is_multiple_of(BLOCK_2M) && end - v >= BLOCK_2M;
            let leaf_level = if block { 2 } else { 3 };
            let mut table = Some(self.root);
            for (level, last) in last.iter_mut().enumerate().take(leaf_level) {
                let idx = index(v, level);
                let present = table
                    .map(|t| Self::entry(pages, t, idx))
                    .filter(|d| d & 0b11 == 0b11);
                let prefix = v >> (39 - 9 * level);
                match present {
                    Some(d) => table = Some(d & OA_MASK),
                    None => {
                        if *last != prefix {
                            *last = prefix;
                            needed += 1;
                        }
                        table = None;
                    }
                }
            }
            v += if block { BLOCK_2M } else { PAGE };
        }
        needed
    }

    fn map_with(
        &mut self,
        va: u64,
        pa: u64,
        len: u64,
        perm: Perm,
        pages: &mut impl TablePages,
        blocks: bool,
    ) -> Result<(), S1Error> {
        check_range(va, pa, len)?;
        if (0..len)
            .step_by(PAGE as usize)
            .any(|off| self.translate(va + off, pages).is_some())
        {
            return Err(S1Error::AlreadyMapped);
        }
        let bits = perm.leaf_bits();
        let mut off = 0;
        while off < len {
            let (v, p) = (va + off, pa + off);
            let use_block = blocks && (v | p).is_multiple_of(BLOCK_2M) && len - off >= BLOCK_2M;
            let mut table = self.root;
            let leaf_level = if use_block { 2 } else { 3 };
            for level in 0..leaf_level {
                table = self.next_table(pages, table, index(v, level))?;
            }
            let kind = if use_block { 0 } else { 0b10 };
            Self::set_entry(pages, table, index(v, leaf_level), p | bits | kind);
            off += if use_block { BLOCK_2M } else { PAGE };
        }
        Ok(())
    }

    /// Removes the leaves that map [va, va + len); each leaf must lie wholly
    /// inside the range. Returns how many leaves were removed; the caller
    /// invalidates the TLB for the range.
    /// Tables left empty go back to `pages`; the caller's TLB invalidation
    /// of the range (TLBI VAE2IS, all levels) also drops their walk-cache
    /// entries, and must come before the pages are reused.
    pub fn unmap(
        &mut self,
        va: u64,
        len: u64,
        pages: &mut impl TablePages,
    ) -> Result<usize, S1Error> {
        check_range(va, 0, len)?;
        // Check the whole range first, so a failure changes nothing.
        let mut off = 0;
        while off < len {
            let (_, size) = self.leaf(va + off, pages).ok_or(S1Error::NotMapped)?;
            if !(va + off).is_multiple_of(size) || len - off < size {
                return Err(S1Error::NotMapped);
            }
            off += size;
        }
        let mut removed = 0;
        let mut off = 0;
        while off < len {
            let (slot_table, slot_idx, size) =
                self.leaf_slot(va + off, pages).ok_or(S1Error::NotMapped)?;
            Self::set_entry(pages, slot_table, slot_idx, 0);
            removed += 1;
            off += size;
        }
        // Once per 2 MiB (one level-3 table) of the range.
        let mut v = va & !(BLOCK_2M - 1);
        while v < va + len {
            self.prune(v, pages);
            v += BLOCK_2M;
        }
        Ok(removed)
    }

    /// Replaces the 2 MiB block that maps `va` by a table of 512 pages with
    /// the same output and permissions, so that part of it can be unmapped.
    /// `invalidate(block_va)` must drop the block's TLB entries: it is
    /// called between removing the block and installing the table
    /// (break-before-make). Ok(false) if `va` is not in a block.
    pub fn split_block(
        &mut self,
        va: u64,
        pages: &mut impl TablePages,
        invalidate: &mut dyn FnMut(u64),
    ) -> Result<bool, S1Error> {
        let Some((table, idx, size)) = self.leaf_slot(va, pages) else {
            return Err(S1Error::NotMapped);
        };
        if size != BLOCK_2M {
            return Ok(false);
        }
        let block = Self::entry(pages, table, idx);
        let new = pages.alloc_table().ok_or(S1Error::NoMemory)?;
        self.tables += 1;
        let attrs = block & !OA_MASK & !0b11;
        let base = block & OA_MASK;
        for i in 0..ENTRIES {
            Self::set_entry(pages, new, i, (base + i as u64 * PAGE) | attrs | 0b11);
        }
        Self::set_entry(pages, table, idx, 0);
        invalidate(va & !(BLOCK_2M - 1));
        Self::set_entry(pages, table, idx, new | 0b11);
        Ok(true)
    }

    /// Frees the empty tables on the path to `va`, deepest first.
    fn prune(&mut self, va: u64, pages: &mut impl TablePages) {
        let mut path = [(0u64, 0usize); 3];
        let mut table = self.root;
        let mut depth = 0;
        for (level, slot) in path.iter_mut().enumerate() {
            let idx = index(va, level);
            let desc = Self::entry(pages, table, idx);
            if desc & 0b11 != 0b11 {
                break;
            }
            *slot = (table, idx);
            table = desc & OA_MASK;
            depth = level + 1;
        }
        // path[l] = (table at level l, index of the child at level l + 1).
        for l in (0..depth).rev() {
            let (parent, idx) = path[l];
            let child = Self::entry(pages, parent, idx) & OA_MASK;
            // SAFETY: `child` is one of our table pages.
            let empty = unsafe { (*pages.table_ptr(child)).iter().all(|&d| d == 0) };
            if !empty {
                break;
            }
            Self::set_entry(pages, parent, idx, 0);
            pages.free_table(child);
            self.tables -= 1;
        }
    }

    /// The lowest mapped VA in [va, va + len), skipping unmapped subtrees
    /// whole, so a sparse search over a large range is cheap.
    pub fn first_mapped(&self, va: u64, len: u64, pages: &impl TablePages) -> Option<u64> {
        let end = va.checked_add(len)?.min(VA_LIMIT);
        self.first_mapped_in(pages, self.root, 0, 0, va, end)
    }

    fn first_mapped_in(
        &self,
        pages: &impl TablePages,
        table: u64,
        level: usize,
        base: u64,
        start: u64,
        end: u64,
    ) -> Option<u64> {
        let size = 1u64 << (39 - 9 * level);
        let first = ((start.max(base) - base) / size) as usize;
        for idx in first..ENTRIES {
            let entry_base = base + idx as u64 * size;
            if entry_base >= end {
                break;
            }
            let desc = Self::entry(pages, table, idx);
            if desc & 1 == 0 {
                continue;
            }
            if level == 3 || desc & 0b10 == 0 {
                return Some(entry_base.max(start));
            }
            if let Some(found) =
                self.first_mapped_in(pages, desc & OA_MASK, level + 1, entry_base, start, end)
            {
                return Some(found);
            }
        }
        None
    }

    /// Calls `f(leaf_va, size, desc)` for every valid leaf (block or page)
    /// that intersects [va, va + len), in VA order; `leaf_va` is the leaf's
    /// own first VA (aligned to `size`), so a leaf may extend beyond the
    /// range. Unmapped subtrees are skipped whole: the cost is the number
    /// of leaves and table entries in the range, not its number of pages.
    pub fn visit_leaves(
        &self,
        va: u64,
        len: u64,
        pages: &impl TablePages,
        f: &mut impl FnMut(u64, u64, u64),
    ) {
        for (leaf_va, size, desc) in self.leaves(va, len, pages) {
            f(leaf_va, size, desc);
        }
    }

    /// The leaves [`visit_leaves`](Self::visit_leaves) reports, as an
    /// iterator of (leaf_va, size, desc): for walking alongside other
    /// tables.
    pub fn leaves<'a, P: TablePages>(&self, va: u64, len: u64, pages: &'a P) -> Leaves<'a, P> {
        let end = va.saturating_add(len).min(VA_LIMIT);
        let mut path = [(0, ENTRIES, 0); 4];
        path[0] = (self.root, index(va, 0), 0);
        Leaves {
            pages,
            path,
            level: 0,
            start: va,
            end: if va < end { end } else { 0 },
        }
    }

    /// The table, index and size of the leaf that maps `va`.
    fn leaf_slot(&self, va: u64, pages: &impl TablePages) -> Option<(u64, usize, u64)> {
        let mut table = self.root;
        for level in 0..4 {
            let idx = index(va, level);
            let desc = Self::entry(pages, table, idx);
            if desc & 1 == 0 {
                return None;
            }
            let size = 1u64 << (39 - 9 * level);
            if level == 3 || desc & 0b10 == 0 {
                return Some((table, idx, size));
            }
            table = desc & OA_MASK;
        }
        None
    }

    /// Where the descriptor of the 4K page mapping `va` lives, for a
    /// temporary-mapping slot the hypervisor rewrites itself (the caller
    /// keeps the walker coherent: one 64-bit store, then TLB invalidation).
    pub fn page_entry_ptr(&self, va: u64, pages: &impl TablePages) -> Option<*mut u64> {
        let (table, idx, size) = self.leaf_slot(va, pages)?;
        if size != PAGE {
            return None;
        }
        // SAFETY: `table` is one of our table pages; idx < 512.
        Some(unsafe { (*pages.table_ptr(table)).as_mut_ptr().add(idx) })
    }

    /// The descriptor of a 4K page mapping `pa` with `perm`.
    pub fn page_descriptor(pa: u64, perm: Perm) -> u64 {
        (pa & OA_MASK) | perm.leaf_bits() | 0b10
    }

    /// The descriptor and size of the leaf that maps `va`.
    pub fn leaf(&self, va: u64, pages: &impl TablePages) -> Option<(u64, u64)> {
        let (table, idx, size) = self.leaf_slot(va, pages)?;
        Some((Self::entry(pages, table, idx), size))
    }

    /// The physical address `va` maps to, and the permission bits' leaf.
    pub fn translate(&self, va: u64, pages: &impl TablePages) -> Option<u64> {
        let (desc, size) = self.leaf(va, pages)?;
        Some((desc & OA_MASK & !(size - 1)) | (va & (size - 1)))
    }

    /// Whether the leaf mapping `va` is writable and executable.
    pub fn permissions(&self, va: u64, pages: &impl TablePages) -> Option<(bool, bool)> {
        let (desc, _) = self.leaf(va, pages)?;
        let writable = (desc >> 6) & 0b11 == 0b01;
        let executable = desc & (1 << 54) == 0;
        Some((writable, executable))
    }
}

/// The valid leaves of a range of a [`Stage1`], in VA order: see
/// [`Stage1::leaves`].
pub struct Leaves<'a, P: TablePages> {
    pages: &'a P,
    /// Per level from the root down to the current one: the table, the
    /// index of the next entry to look at, and the table's first VA.
    path: [(u64, usize, u64); 4],
    level: usize,
    start: u64,
    end: u64,
}

impl<P: TablePages> Iterator for Leaves<'_, P> {
    type Item = (u64, u64, u64);

    fn next(&mut self) -> Option<(u64, u64, u64)> {
        loop {
            let (table, idx, base) = self.path[self.level];
            let size = 1u64 << (39 - 9 * self.level);
            let entry_base = base + idx as u64 * size;
            if idx >= ENTRIES || entry_base >= self.end {
                if self.level == 0 {
                    self.end = 0;
                    return None;
                }
                self.level -= 1;
                continue;
            }
            self.path[self.level].1 += 1;
            let desc = Stage1::entry(self.pages, table, idx);
            if desc & 1 == 0 {
                continue;
            }
            if self.level == 3 || desc & 0b10 == 0 {
                return Some((entry_base, size, desc));
            }
            self.level += 1;
            let first = index(self.start.max(entry_base), self.level);
            self.path[self.level] = (desc & OA_MASK, first, entry_base);
        }
    }
}

impl TablePages for crate::PagePool {
    fn alloc_table(&mut self) -> Option<u64> {
        self.alloc_zeroed().ok()
    }
    fn free_table(&mut self, pa: u64) {
        // SAFETY: `pa` came from `alloc_table`, i.e. from this pool.
        unsafe { self.free(pa) }
    }
    fn table_ptr(&self, pa: u64) -> *mut [u64; ENTRIES] {
        self.va(pa).cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Table pages from a Vec, with PA = index * 4096 + a fake base.
    struct VecPages {
        pages: Vec<Box<[u64; ENTRIES]>>,
        freed: usize,
    }
    const BASE: u64 = 0x8000_0000;

    impl TablePages for VecPages {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.pages.len() >= 64 {
                return None;
            }
            self.pages.push(Box::new([0; ENTRIES]));
            Some(BASE + (self.pages.len() as u64 - 1) * PAGE)
        }
        fn free_table(&mut self, _pa: u64) {
            self.freed += 1;
        }
        fn table_ptr(&self, pa: u64) -> *mut [u64; ENTRIES] {
            let i = ((pa - BASE) / PAGE) as usize;
            &*self.pages[i] as *const _ as *mut _
        }
    }

    fn pages() -> VecPages {
        VecPages {
            pages: Vec::new(),
            freed: 0,
        }
    }

    #[test]
    fn maps_blocks_where_aligned_and_pages_elsewhere() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        // 4 KiB before a 2 MiB boundary, then a full block, then 8 KiB.
        let va = 0x4020_0000 - PAGE;
        s1.map(va, va, PAGE + BLOCK_2M + 2 * PAGE, Perm::ReadWrite, &mut p)
            .unwrap();
        assert_eq!(s1.leaf(va, &p).unwrap().1, PAGE);
        assert_eq!(s1.leaf(0x4020_0000, &p).unwrap().1, BLOCK_2M);
        assert_eq!(s1.leaf(0x4040_0000 + PAGE, &p).unwrap().1, PAGE);
        assert_eq!(s1.translate(0x4030_1234, &p), Some(0x4030_1234));
        assert_eq!(s1.translate(0x4040_2000, &p), None);
        assert_eq!(s1.permissions(va, &p), Some((true, false)));
    }

    #[test]
    fn permissions_follow_perm() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        s1.map(0x1000, 0x1000, PAGE, Perm::Text, &mut p).unwrap();
        s1.map(0x2000, 0x2000, PAGE, Perm::ReadOnly, &mut p)
            .unwrap();
        s1.map(0x900_0000, 0x900_0000, PAGE, Perm::Device, &mut p)
            .unwrap();
        assert_eq!(s1.permissions(0x1000, &p), Some((false, true)));
        assert_eq!(s1.permissions(0x2000, &p), Some((false, false)));
        assert_eq!(s1.permissions(0x900_0000, &p), Some((true, false)));
        let (desc, _) = s1.leaf(0x900_0000, &p).unwrap();
        assert_eq!((desc >> 2) & 0b111, 0, "device memory uses MAIR index 0");
    }

    #[test]
    fn refuses_bad_and_overlapping_ranges() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        assert_eq!(
            s1.map(0, 0, 0, Perm::ReadWrite, &mut p),
            Err(S1Error::BadRange)
        );
        assert_eq!(
            s1.map(0x10, 0, PAGE, Perm::ReadWrite, &mut p),
            Err(S1Error::BadRange)
        );
        assert_eq!(
            s1.map(VA_LIMIT - PAGE, 0, 2 * PAGE, Perm::ReadWrite, &mut p),
            Err(S1Error::BadRange)
        );
        assert_eq!(
            s1.map(u64::MAX - 0xfff, 0, PAGE, Perm::ReadWrite, &mut p),
            Err(S1Error::BadRange)
        );
        s1.map(0x5000, 0x5000, PAGE, Perm::ReadWrite, &mut p)
            .unwrap();
        assert_eq!(
            s1.map(0x4000, 0x4000, 2 * PAGE, Perm::ReadWrite, &mut p),
            Err(S1Error::AlreadyMapped)
        );
        assert_eq!(
            s1.translate(0x4000, &p),
            None,
            "a refused map changes nothing"
        );
    }

    #[test]
    fn pages_needed_is_exact_for_page_mappings() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        // Empty: L1, L2 and one L3 per 2 MiB touched.
        let (va, len) = (0x4020_0000 - 2 * PAGE, 4 * PAGE);
        let need = s1.pages_needed(va, len, &p);
        assert_eq!(
            need, 4,
            "L1, L2, and two L3 tables (the range crosses 2 MiB)"
        );
        let before = p.pages.len();
        s1.map_pages(va, va, len, Perm::ReadWrite, &mut p).unwrap();
        assert_eq!(p.pages.len() - before, need);
        assert_eq!(s1.table_pages(), 1 + need);
        assert_eq!(s1.pages_needed(va, len, &p), 0);
        assert_eq!(
            s1.leaf(0x4020_0000, &p).unwrap().1,
            PAGE,
            "map_pages never uses blocks"
        );
        // Next 2 MiB along: only its L3.
        assert_eq!(s1.pages_needed(0x4040_0000, BLOCK_2M, &p), 1);
    }

    #[test]
    fn split_block_keeps_every_translation() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        s1.map(0x4020_0000, 0x4020_0000, BLOCK_2M, Perm::ReadOnly, &mut p)
            .unwrap();
        assert_eq!(
            s1.pages_needed_blocks(0x4040_0000, BLOCK_2M, &p),
            0,
            "the L2 table exists"
        );
        assert_eq!(
            s1.pages_needed(0x4040_0000, BLOCK_2M, &p),
            1,
            "4K pages need an L3 table"
        );
        let mut invalidated = vec![];
        assert_eq!(
            s1.split_block(0x4030_0000, &mut p, &mut |va| invalidated.push(va)),
            Ok(true)
        );
        assert_eq!(invalidated, [0x4020_0000]);
        for va in (0x4020_0000..0x4040_0000).step_by(PAGE as usize) {
            assert_eq!(s1.leaf(va, &p).unwrap().1, PAGE);
            assert_eq!(s1.translate(va, &p), Some(va));
            assert_eq!(s1.permissions(va, &p), Some((false, false)));
        }
        assert_eq!(
            s1.split_block(0x4030_0000, &mut p, &mut |_| {}),
            Ok(false),
            "already pages"
        );
        assert_eq!(s1.unmap(0x4030_0000, PAGE, &mut p), Ok(1));
        assert_eq!(s1.translate(0x4030_1000, &p), Some(0x4030_1000));
    }

    #[test]
    fn first_mapped_skips_holes() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        assert_eq!(s1.first_mapped(0, VA_LIMIT, &p), None);
        s1.map_pages(0x4030_5000, 0x4030_5000, PAGE, Perm::ReadWrite, &mut p)
            .unwrap();
        s1.map(0x8000_0000, 0x8000_0000, BLOCK_2M, Perm::ReadWrite, &mut p)
            .unwrap();
        assert_eq!(s1.first_mapped(0, VA_LIMIT, &p), Some(0x4030_5000));
        assert_eq!(s1.first_mapped(0x4030_5000, PAGE, &p), Some(0x4030_5000));
        assert_eq!(s1.first_mapped(0x4030_6000, 0x1000_0000, &p), None);
        assert_eq!(
            s1.first_mapped(0x4030_6000, 0x4000_0000, &p),
            Some(0x8000_0000)
        );
        assert_eq!(
            s1.first_mapped(0x8000_1000, PAGE, &p),
            Some(0x8000_1000),
            "inside a block"
        );
        assert_eq!(s1.first_mapped(0x4000_0000, 0x5000, &p), None);
    }

    /// Every leaf `visit_leaves` reports over [va, va + len).
    fn leaves(s1: &Stage1, p: &VecPages, va: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let mut v = vec![];
        s1.visit_leaves(va, len, p, &mut |va, size, desc| v.push((va, size, desc)));
        v
    }

    #[test]
    fn visit_leaves_reports_whole_leaves_in_order() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        assert_eq!(leaves(&s1, &p, 0, VA_LIMIT), []);
        // A page, a block, two pages after it, a read-only page far above.
        s1.map_pages(0x4010_0000, 0x4010_0000, PAGE, Perm::ReadWrite, &mut p)
            .unwrap();
        s1.map(0x4020_0000, 0x4020_0000, BLOCK_2M, Perm::ReadWrite, &mut p)
            .unwrap();
        s1.map_pages(0x4040_0000, 0x4040_0000, 2 * PAGE, Perm::ReadWrite, &mut p)
            .unwrap();
        s1.map(0x80_0000_0000, 0x1000, PAGE, Perm::ReadOnly, &mut p)
            .unwrap();
        let all = leaves(&s1, &p, 0, VA_LIMIT);
        let spans: Vec<_> = all.iter().map(|&(va, size, _)| (va, size)).collect();
        assert_eq!(
            spans,
            [
                (0x4010_0000, PAGE),
                (0x4020_0000, BLOCK_2M),
                (0x4040_0000, PAGE),
                (0x4040_1000, PAGE),
                (0x80_0000_0000, PAGE),
            ]
        );
        for &(va, size, desc) in &all {
            assert_eq!(s1.leaf(va, &p), Some((desc, size)), "the leaf's descriptor");
        }
        assert_eq!(
            all[4].2 & OA_MASK,
            0x1000,
            "the descriptor carries the output"
        );
        // A range inside the block reports the whole block.
        assert_eq!(
            leaves(&s1, &p, 0x4030_0000, PAGE),
            [(0x4020_0000, BLOCK_2M, all[1].2)]
        );
        // Ranges that end before, start after, or fall between leaves.
        assert_eq!(leaves(&s1, &p, 0x4010_1000, 0x000f_f000), []);
        assert_eq!(leaves(&s1, &p, 0x4040_2000, 0x1000_0000), []);
        assert_eq!(
            leaves(&s1, &p, 0x4040_1000, VA_LIMIT).len(),
            2,
            "from the second page to the end of the VA space"
        );
        assert_eq!(leaves(&s1, &p, 0x4010_0000, 0), [], "an empty range");
        assert_eq!(
            leaves(&s1, &p, 0x4040_1000, u64::MAX).len(),
            2,
            "a length past the VA space stops at its end"
        );
    }

    #[test]
    fn visit_leaves_agrees_with_leaf_page_by_page() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        let base = 0x4000_0000;
        s1.map(base, base, 3 * BLOCK_2M + 5 * PAGE, Perm::ReadWrite, &mut p)
            .unwrap();
        s1.unmap(base + 3 * BLOCK_2M + PAGE, PAGE, &mut p).unwrap();
        s1.split_block(base + BLOCK_2M, &mut p, &mut |_| {})
            .unwrap();
        s1.unmap(base + BLOCK_2M + 7 * PAGE, 2 * PAGE, &mut p)
            .unwrap();
        let (va, len) = (base + PAGE, 4 * BLOCK_2M);
        let mut seen = vec![];
        s1.visit_leaves(va, len, &p, &mut |lva, size, _| {
            for v in (lva..lva + size).step_by(PAGE as usize) {
                if (va..va + len).contains(&v) {
                    seen.push(v);
                }
            }
        });
        let expect: Vec<u64> = (va..va + len)
            .step_by(PAGE as usize)
            .filter(|&v| s1.translate(v, &p).is_some())
            .collect();
        assert_eq!(seen, expect);
    }

    #[test]
    fn unmap_removes_whole_leaves_only() {
        let mut p = pages();
        let mut s1 = Stage1::new(&mut p).unwrap();
        s1.map(0x20_0000, 0x20_0000, BLOCK_2M, Perm::ReadWrite, &mut p)
            .unwrap();
        s1.map(0x40_0000, 0x40_0000, 2 * PAGE, Perm::ReadWrite, &mut p)
            .unwrap();
        let tables = s1.table_pages();
        assert_eq!(s1.unmap(0x20_0000, PAGE, &mut p), Err(S1Error::NotMapped));
        assert_eq!(
            s1.unmap(0x40_0000, 3 * PAGE, &mut p),
            Err(S1Error::NotMapped)
        );
        assert!(
            s1.translate(0x40_0000, &p).is_some(),
            "a refused unmap changes nothing"
        );
        assert_eq!(s1.unmap(0x40_0000, PAGE, &mut p), Ok(1));
        assert_eq!(
            (p.freed, s1.table_pages()),
            (0, tables),
            "the L3 table still maps a page"
        );
        assert_eq!(s1.unmap(0x40_1000, PAGE, &mut p), Ok(1));
        assert_eq!(
            (p.freed, s1.table_pages()),
            (1, tables - 1),
            "the empty L3 table is freed"
        );
        assert_eq!(s1.unmap(0x20_0000, BLOCK_2M, &mut p), Ok(1));
        assert_eq!(s1.translate(0x20_0000, &p), None);
        assert_eq!(
            s1.table_pages(),
            1,
            "every empty table is freed, the root stays"
        );
        assert_eq!(p.freed, 3);
    }
}
