//! The stage-2 page-table engine (4 KiB granule).
//!
//! Every change goes through two phases: [`Stage2::plan`] walks the range
//! and counts the table pages the change will create, without writing
//! anything (tables that do not exist yet are walked virtually, as the
//! subdivision of the leaf they will replace); the pool must count that
//! many free pages, or the call fails with [`MmError::NoMemory`] having
//! changed nothing; the commit, which holds the pool exclusively, then
//! cannot fail. Single-page changes take the same steps along one walk
//! ([`Stage2::walk_page_into`], [`Stage2::plan_page`],
//! [`Stage2::commit_page`]).
//!
//! Tables are kept in canonical form: a table is created only where the
//! final contents of an entry's range cannot be one leaf, and a table whose
//! entries became one uniform leaf is replaced by that leaf (a merge). Live
//! entries are replaced with break-before-make. See docs/mm.md.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tock_registers::{register_bitfields, LocalRegisterCopy};

use crate::desc::{
    level_shift, level_size, Annotation, PageState, Pte, S2Attrs, BREAKS_UNKNOWN, ENTRIES,
    LEAF_LEVEL,
};
use crate::pool::PagePool;
pub use crate::tlb::{TlbMaintenance, Vmid};
use crate::MmError;

mod page;
pub use page::{PagePlan, PageWalk};

/// Hands out distinct stage-2 identities, so that a [`PageWalk`] of one
/// stage 2 is refused by every other.
static NEXT_STAGE2_ID: AtomicU32 = AtomicU32::new(1);

/// Above this many IPA invalidations for one subtree, invalidate the whole
/// VMID instead: one broadcast beats hundreds (Linux uses a similar cut).
const MAX_IPA_INVALIDATIONS: usize = 64;

register_bitfields! {u64,
    /// The fields of VTCR_EL2 that depend on the stage-2 geometry.
    VTCR [
        T0SZ OFFSET(0) NUMBITS(6) [],
        /// Start level for the 4 KiB granule: 0 = level 2, 1 = level 1, 2 = level 0.
        SL0 OFFSET(6) NUMBITS(2) [],
        IRGN0 OFFSET(8) NUMBITS(2) [WriteBackWriteAllocate = 0b01],
        ORGN0 OFFSET(10) NUMBITS(2) [WriteBackWriteAllocate = 0b01],
        SH0 OFFSET(12) NUMBITS(2) [Inner = 0b11],
        TG0 OFFSET(14) NUMBITS(2) [Granule4K = 0b00],
        PS OFFSET(16) NUMBITS(3) []
    ],
    VTTBR [
        /// Root table address (bit 0 is CnP, left 0).
        BADDR OFFSET(1) NUMBITS(47) [],
        VMID OFFSET(48) NUMBITS(16) []
    ]
}

/// The smallest PARange encoding (ID_AA64MMFR0_EL1.PARange, VTCR_EL2.PS)
/// that holds `bits` of address: 32, 36, 40, 42, 44 or 48 bits.
pub const fn parange(bits: u8) -> u64 {
    match bits {
        0..=32 => 0,
        33..=36 => 1,
        37..=40 => 2,
        41..=42 => 3,
        43..=44 => 4,
        _ => 5,
    }
}

/// The shape of a stage-2 table for an IPA size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    ipa_bits: u8,
    start_level: u8,
    root_pages: usize,
}

impl Geometry {
    /// The geometry for `ipa_bits` (32 to 48): the fewest levels whose root
    /// fits in at most 16 concatenated tables, as the architecture allows
    /// (e.g. 40 bits: start at level 1 with 2 concatenated tables).
    pub fn new(ipa_bits: u8) -> Result<Self, MmError> {
        if !(32..=48).contains(&ipa_bits) {
            return Err(MmError::UnsupportedIpaSize);
        }
        // Level 2 start takes up to 13 index bits (16 tables), level 1 too;
        // level 0 is never concatenated (48 bits need only 9).
        let start_level = [2u8, 1, 0]
            .into_iter()
            .find(|&l| u32::from(ipa_bits) - level_shift(l) <= 13)
            .unwrap_or(0);
        let root_entries = 1usize << (u32::from(ipa_bits) - level_shift(start_level));
        Ok(Self {
            ipa_bits,
            start_level,
            root_pages: root_entries.div_ceil(ENTRIES),
        })
    }

    pub fn ipa_bits(&self) -> u8 {
        self.ipa_bits
    }
    /// Level of the root table (0, 1 or 2).
    pub fn start_level(&self) -> u8 {
        self.start_level
    }
    /// Concatenated pages of the root table (1 to 16).
    pub fn root_pages(&self) -> usize {
        self.root_pages
    }
    /// Bytes of IPA space.
    pub fn ipa_size(&self) -> u64 {
        1u64 << self.ipa_bits
    }
    fn root_entries(&self) -> usize {
        1usize << (u32::from(self.ipa_bits) - level_shift(self.start_level))
    }
    /// VTCR_EL2.T0SZ.
    pub fn t0sz(&self) -> u64 {
        64 - u64::from(self.ipa_bits)
    }
    /// VTCR_EL2.SL0 for the 4 KiB granule.
    pub fn sl0(&self) -> u64 {
        2 - u64::from(self.start_level)
    }
    /// VTCR_EL2 for this geometry: T0SZ, SL0, 4 KiB granule, inner-shareable
    /// write-back walks, PS = the smallest PARange encoding that holds the
    /// IPA size. The hypervisor adds VS (16-bit VMIDs) and RES1 bits itself.
    pub fn vtcr(&self) -> u64 {
        let ps = parange(self.ipa_bits);
        let mut r = LocalRegisterCopy::<u64, VTCR::Register>::new(0);
        r.modify(
            VTCR::T0SZ.val(self.t0sz())
                + VTCR::SL0.val(self.sl0())
                + VTCR::IRGN0::WriteBackWriteAllocate
                + VTCR::ORGN0::WriteBackWriteAllocate
                + VTCR::SH0::Inner
                + VTCR::TG0::Granule4K
                + VTCR::PS.val(ps),
        );
        r.get()
    }
}

/// What [`Stage2::lookup`] and the leaf visitor report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First IPA of the leaf (aligned to `size`).
    pub ipa: u64,
    /// Translation level of the entry (3 = page).
    pub level: u8,
    /// Bytes the entry covers.
    pub size: u64,
    pub kind: LeafKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafKind {
    /// A valid block or page; `pa` is the output address of `Leaf::ipa`.
    Mapped {
        pa: u64,
        attrs: S2Attrs,
        state: PageState,
    },
    /// An invalid entry and the annotation it records.
    Unmapped(Annotation),
}

impl Leaf {
    /// The output address of `ipa` (inside this leaf), if mapped.
    pub fn pa_of(&self, ipa: u64) -> Option<u64> {
        match self.kind {
            LeafKind::Mapped { pa, .. } => Some(pa + (ipa - self.ipa)),
            LeafKind::Unmapped(_) => None,
        }
    }
}

/// Counters of one stage-2 table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stage2Stats {
    /// Table pages below the root.
    pub table_pages: usize,
    /// Pages of the (possibly concatenated) root.
    pub root_pages: usize,
    /// Valid blocks replaced by tables.
    pub splits: u64,
    /// Tables replaced by valid blocks.
    pub merges: u64,
}

/// Result of [`Stage2::audit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Audit {
    /// Table pages below the root found in the audited range.
    pub table_pages: usize,
    /// The first table (its IPA and level) that could have been one leaf:
    /// `None` when the tables are in canonical form.
    pub non_canonical: Option<(u64, u8)>,
    /// The first table whose run-break count (kept in its parent's
    /// descriptor, so merges need not scan it) disagrees with its entries.
    pub miscounted: Option<(u64, u8)>,
}

/// One change applied to every page of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Page `x` maps `pa + (x - ipa)`.
    Map {
        ipa: u64,
        pa: u64,
        attrs: S2Attrs,
        state: PageState,
    },
    Unmap(Annotation),
    Attrs(S2Attrs),
    State(PageState),
}

impl Change {
    fn requires_mapped(self) -> bool {
        matches!(self, Change::Attrs(_) | Change::State(_))
    }

    /// The leaf an entry at `level` based at `base`, wholly inside the
    /// range, becomes when it is now leaf `old`; `None` if its new contents
    /// cannot be a single entry at this level.
    #[inline(always)]
    fn whole_entry(self, level: u8, base: u64, old: Pte) -> Option<Pte> {
        match self {
            Change::Map {
                ipa,
                pa,
                attrs,
                state,
            } => {
                let out = pa + (base - ipa);
                // Level 0 holds no blocks with the 4 KiB granule.
                (level > 0 && out & (level_size(level) - 1) == 0)
                    .then(|| Pte::leaf(level, out, attrs, state))
            }
            Change::Unmap(a) => Some(Pte::invalid(a)),
            Change::Attrs(a) => Some(old.with_meta(level, a, old.state())),
            // Only the software bits change (`old` is a leaf at `level`).
            Change::State(s) => Some(old.with_state(s)),
        }
    }

    /// The leaf that replaces a whole subtree, for changes that do not
    /// depend on what is there.
    fn replaces_subtree(self, level: u8, base: u64) -> Option<Pte> {
        match self {
            Change::Map { .. } | Change::Unmap(_) => self.whole_entry(level, base, Pte(0)),
            Change::Attrs(_) | Change::State(_) => None,
        }
    }

    /// Whether applying the change to part of leaf `old` keeps it as is.
    fn leaves_unchanged(self, level: u8, base: u64, old: Pte) -> bool {
        match self {
            Change::Map {
                ipa,
                pa,
                attrs,
                state,
            } => {
                old.is_valid()
                    && old.meta() == Pte::leaf(level, 0, attrs, state).meta()
                    && old.addr().wrapping_sub(base) == pa.wrapping_sub(ipa)
            }
            Change::Unmap(a) => old == Pte::invalid(a),
            Change::Attrs(_) | Change::State(_) => self.whole_entry(level, base, old) == Some(old),
        }
    }
}

/// Where the planner reads a table's entries from.
#[derive(Clone, Copy)]
enum Source {
    /// A table that exists, by physical address.
    Real(u64),
    /// A table the commit will create by splitting this leaf at this level.
    Split(Pte, u8),
}

/// The table pages one change may take from the pool. The commit holds the
/// pool exclusively from the check to the end and frees pages but never
/// allocates beyond the count, and a single page can always be allocated
/// while the pool counts one free: so checking the count reserves them,
/// and a split takes its page when it happens (from the stash, with its
/// entries already written, when a merge left the same table).
struct Reserve {
    pages: usize,
}

impl Reserve {
    fn take(pool: &PagePool, pages: usize) -> Result<Self, MmError> {
        if pool.free_pages() < pages {
            return Err(MmError::NoMemory);
        }
        Ok(Reserve { pages })
    }

    /// A table page holding the subdivision of leaf `leaf` at `level`.
    #[inline(always)]
    fn table_for(&mut self, pool: &mut PagePool, leaf: Pte, level: u8) -> u64 {
        // The plan counts exactly the splits the commit makes.
        assert!(
            self.pages > 0,
            "stage-2 commit needs a table page the plan did not reserve"
        );
        self.pages -= 1;
        if let Some(pa) = pool.take_split(leaf.0, level) {
            debug_assert!((0..ENTRIES).all(|i| read(pool, pa, i) == leaf.child(level, i)));
            return pa;
        }
        let pa = pool
            .alloc_uninit()
            .expect("a reserved table page could not be allocated");
        fill(pool, pa, leaf, level);
        pa
    }
}

fn entry(pool: &PagePool, table: u64, index: usize) -> &AtomicU64 {
    // SAFETY: `table` is a table page (or concatenated root) of a Stage2
    // built from this pool, so it is mapped at `pool.va`, 8-byte aligned,
    // and `index` is below its entry count. Descriptors are only accessed
    // as atomics (the table walker reads them concurrently).
    unsafe { AtomicU64::from_ptr((pool.va(table) as *mut u64).add(index)) }
}

fn read(pool: &PagePool, table: u64, index: usize) -> Pte {
    Pte(entry(pool, table, index).load(Ordering::Relaxed))
}

/// Stores one descriptor with a single 64-bit store (single-copy atomic for
/// the walker); ordering against the walker comes from the explicit
/// barriers of [`TlbMaintenance`].
fn write(pool: &PagePool, table: u64, index: usize, pte: Pte) {
    entry(pool, table, index).store(pte.0, Ordering::Relaxed);
}

/// Indices of the entries of a table based at `base` at `level`, with
/// `entries` entries, that intersect `[start, end)`.
fn span(
    level: u8,
    base: u64,
    entries: usize,
    start: u64,
    end: u64,
) -> core::ops::RangeInclusive<usize> {
    let shift = level_shift(level);
    let table_end = base + ((entries as u64) << shift);
    let first = (start.max(base) - base) >> shift;
    let last = (end.min(table_end) - 1 - base) >> shift;
    first as usize..=last as usize
}

/// A stage-2 translation table for one VMID.
///
/// The table pages come from a [`PagePool`] passed to each call (the same
/// one every time); call [`destroy`](Self::destroy) to give them back, as
/// dropping a `Stage2` leaks them.
pub struct Stage2<T: TlbMaintenance> {
    geometry: Geometry,
    vmid: Vmid,
    root: u64,
    /// The pool's identity; 0 once destroyed (pool identities start at 1).
    pool_id: u32,
    /// This stage 2's identity, and its changes so far (wrapping): a
    /// [`PageWalk`] is only used on the stage 2 it walked, while nothing
    /// changed since.
    id: u32,
    generation: u32,
    tlb: T,
    stats: Stage2Stats,
}

impl<T: TlbMaintenance> Stage2<T> {
    /// An empty table (everything unmapped, annotation 0).
    pub fn new(
        geometry: Geometry,
        vmid: Vmid,
        pool: &mut PagePool,
        tlb: T,
    ) -> Result<Self, MmError> {
        let root = pool.alloc_contiguous_zeroed(geometry.root_pages)?;
        Ok(Self {
            geometry,
            vmid,
            root,
            pool_id: pool.id(),
            id: NEXT_STAGE2_ID.fetch_add(1, Ordering::Relaxed),
            generation: 0,
            tlb,
            stats: Stage2Stats {
                root_pages: geometry.root_pages,
                ..Stage2Stats::default()
            },
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    pub fn vmid(&self) -> Vmid {
        self.vmid
    }
    /// Physical address of the root table.
    pub fn root_pa(&self) -> u64 {
        self.root
    }
    /// VTTBR_EL2: root address and VMID (16-bit VMIDs need VTCR_EL2.VS;
    /// with 8-bit VMIDs keep `vmid` below 256).
    pub fn vttbr(&self) -> u64 {
        let mut r = LocalRegisterCopy::<u64, VTTBR::Register>::new(0);
        r.modify(VTTBR::BADDR.val(self.root >> 1) + VTTBR::VMID.val(u64::from(self.vmid)));
        r.get()
    }
    /// VTCR_EL2 geometry fields (see [`Geometry::vtcr`]).
    pub fn vtcr(&self) -> u64 {
        self.geometry.vtcr()
    }
    pub fn stats(&self) -> Stage2Stats {
        self.stats
    }
    pub fn tlb(&self) -> &T {
        &self.tlb
    }
    pub fn tlb_mut(&mut self) -> &mut T {
        &mut self.tlb
    }

    #[inline(always)]
    fn check_pool(&self, pool: &PagePool) -> Result<(), MmError> {
        // One compare on the hot paths, for both errors.
        if pool.id() == self.pool_id {
            Ok(())
        } else {
            Err(self.pool_error())
        }
    }

    #[cold]
    fn pool_error(&self) -> MmError {
        if self.pool_id == 0 {
            MmError::Destroyed
        } else {
            MmError::WrongPool
        }
    }

    /// This stage 2's identity (high half) and generation (low half): what
    /// a [`PageWalk`] or [`PagePlan`] must carry to be used here.
    #[inline(always)]
    fn stamp(&self) -> u64 {
        (u64::from(self.id) << 32) | u64::from(self.generation)
    }

    /// Why a walk or plan stamped `stamp` is refused here.
    #[cold]
    fn stamp_error(&self, stamp: u64) -> MmError {
        if stamp >> 32 != u64::from(self.id) {
            MmError::InvalidArgument
        } else {
            MmError::Stale
        }
    }

    /// [`check_range`](Self::check_range) of one page, with the common case
    /// in two compares.
    #[inline(always)]
    fn check_page(&self, ipa: u64) -> Result<(), MmError> {
        if ipa & (crate::PAGE_SIZE as u64 - 1) == 0 && ipa < self.geometry.ipa_size() {
            Ok(())
        } else {
            self.check_range(ipa, crate::PAGE_SIZE as u64).map(|_| ())
        }
    }

    /// `[ipa, ipa + len)` as `(start, end)` if it is a valid range here.
    fn check_range(&self, ipa: u64, len: u64) -> Result<(u64, u64), MmError> {
        if len == 0 {
            return Err(MmError::ZeroLength);
        }
        if (ipa | len) & (crate::PAGE_SIZE as u64 - 1) != 0 {
            return Err(MmError::Misaligned);
        }
        let end = ipa.checked_add(len).ok_or(MmError::Overflow)?;
        if end > self.geometry.ipa_size() {
            return Err(MmError::OutOfRange);
        }
        Ok((ipa, end))
    }

    /// Maps `[ipa, ipa + len)` onto `[pa, pa + len)` with the largest
    /// blocks alignment allows, replacing whatever was there.
    pub fn map(
        &mut self,
        pool: &mut PagePool,
        ipa: u64,
        len: u64,
        pa: u64,
        attrs: S2Attrs,
        state: PageState,
    ) -> Result<(), MmError> {
        let change = Change::Map {
            ipa,
            pa,
            attrs,
            state,
        };
        let (start, end) = self.check_change(ipa, len, change)?;
        self.apply(pool, start, end, change)
    }

    /// Unmaps `[ipa, ipa + len)`, recording `annotation` in the invalid
    /// entries (e.g. the owner the pages were given to).
    pub fn unmap(
        &mut self,
        pool: &mut PagePool,
        ipa: u64,
        len: u64,
        annotation: Annotation,
    ) -> Result<(), MmError> {
        let (start, end) = self.check_range(ipa, len)?;
        self.apply(pool, start, end, Change::Unmap(annotation))
    }

    /// Sets the hardware attributes of every page of a fully mapped range.
    pub fn set_attrs(
        &mut self,
        pool: &mut PagePool,
        ipa: u64,
        len: u64,
        attrs: S2Attrs,
    ) -> Result<(), MmError> {
        let (start, end) = self.check_range(ipa, len)?;
        self.apply(pool, start, end, Change::Attrs(attrs))
    }

    /// Sets the ownership state of every page of a fully mapped range.
    pub fn set_state(
        &mut self,
        pool: &mut PagePool,
        ipa: u64,
        len: u64,
        state: PageState,
    ) -> Result<(), MmError> {
        let (start, end) = self.check_range(ipa, len)?;
        self.apply(pool, start, end, Change::State(state))
    }

    /// Table pages that applying `change` to `[ipa, ipa + len)` would take
    /// from the pool now, without changing anything; also the errors the
    /// change would return. For callers that must reserve the memory of
    /// several table changes before committing any of them.
    pub fn pages_needed(
        &self,
        pool: &PagePool,
        ipa: u64,
        len: u64,
        change: Change,
    ) -> Result<usize, MmError> {
        self.check_pool(pool)?;
        let (start, end) = self.check_change(ipa, len, change)?;
        self.plan_from_root(pool, change, start, end)
    }

    /// `check_range`, and for a mapping, that the output range is aligned
    /// and inside the 48-bit output space.
    fn check_change(&self, ipa: u64, len: u64, change: Change) -> Result<(u64, u64), MmError> {
        let range = self.check_range(ipa, len)?;
        if let Change::Map { pa, .. } = change {
            if pa & (crate::PAGE_SIZE as u64 - 1) != 0 {
                return Err(MmError::Misaligned);
            }
            if pa.checked_add(len).ok_or(MmError::Overflow)? > 1 << 48 {
                return Err(MmError::OutOfRange);
            }
        }
        Ok(range)
    }

    /// The table pages `change` over `[start, end)` needs, from the root.
    fn plan_from_root(
        &self,
        pool: &PagePool,
        change: Change,
        start: u64,
        end: u64,
    ) -> Result<usize, MmError> {
        self.plan(
            pool,
            change,
            start,
            end,
            self.geometry.start_level,
            0,
            Source::Real(self.root),
            self.geometry.root_entries(),
        )
    }

    /// Plan, reserve, commit.
    fn apply(
        &mut self,
        pool: &mut PagePool,
        start: u64,
        end: u64,
        change: Change,
    ) -> Result<(), MmError> {
        self.check_pool(pool)?;
        let pages = self.plan_from_root(pool, change, start, end)?;
        let mut reserve = Reserve::take(pool, pages)?;
        self.generation = self.generation.wrapping_add(1);
        let mut walk = Commit {
            pool,
            reserve: &mut reserve,
            change,
            start,
            end,
        };
        self.commit(
            &mut walk,
            self.geometry.start_level,
            0,
            self.root,
            self.geometry.root_entries(),
            true,
            // The root is never merged: its count is not kept.
            BREAKS_UNKNOWN,
        );
        self.tlb.publish_writes();
        Ok(())
    }

    /// How many table pages committing `change` over `[start, end)` within
    /// the table `src` (at `level`, based at `base`) will create; also
    /// refuses attribute/state changes of unmapped pages. Writes nothing.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        pool: &PagePool,
        change: Change,
        start: u64,
        end: u64,
        level: u8,
        base: u64,
        src: Source,
        entries: usize,
    ) -> Result<usize, MmError> {
        // Pages never need a table; a split leaf is mapped if its parent is.
        if level == LEAF_LEVEL && !(change.requires_mapped() && matches!(src, Source::Real(_))) {
            return Ok(0);
        }
        let size = level_size(level);
        let mut pages = 0;
        for i in span(level, base, entries, start, end) {
            let pte = match src {
                Source::Real(table) => read(pool, table, i),
                Source::Split(parent, parent_level) => parent.child(parent_level, i),
            };
            let entry_base = base + i as u64 * size;
            let whole = start <= entry_base && entry_base + size <= end;
            if pte.is_table(level) {
                if whole && change.replaces_subtree(level, entry_base).is_some() {
                    continue;
                }
                pages += self.plan(
                    pool,
                    change,
                    start,
                    end,
                    level + 1,
                    entry_base,
                    Source::Real(pte.addr()),
                    ENTRIES,
                )?;
                continue;
            }
            if change.requires_mapped() && !pte.is_valid() {
                return Err(MmError::NotMapped);
            }
            let keeps_leaf = if whole {
                change.whole_entry(level, entry_base, pte).is_some()
            } else {
                change.leaves_unchanged(level, entry_base, pte)
            };
            if !keeps_leaf {
                pages += 1 + self.plan(
                    pool,
                    change,
                    start,
                    end,
                    level + 1,
                    entry_base,
                    Source::Split(pte, level),
                    ENTRIES,
                )?;
            }
        }
        Ok(pages)
    }

    /// Applies the change to the entries of table `table` (at `level`,
    /// based at `base`) that intersect the range. `live` says whether the
    /// table is reachable by the walker (a table being filled after a split
    /// is not, so it needs no break-before-make). `breaks` is the table's
    /// run-break count (what its parent's descriptor holds); returns it
    /// updated for every entry this walk changed.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        walk: &mut Commit<'_>,
        level: u8,
        base: u64,
        table: u64,
        entries: usize,
        live: bool,
        mut breaks: u8,
    ) -> u8 {
        let size = level_size(level);
        for i in span(level, base, entries, walk.start, walk.end) {
            let pte = read(walk.pool, table, i);
            let entry_base = base + i as u64 * size;
            let whole = walk.start <= entry_base && entry_base + size <= walk.end;
            let at = Slot {
                table,
                index: i,
                entries,
                level,
                base: entry_base,
            };
            if pte.is_table(level) {
                if whole {
                    if let Some(new) = walk.change.replaces_subtree(level, entry_base) {
                        breaks = self.replace_subtree(walk.pool, at, pte, new, breaks);
                        continue;
                    }
                }
                let child = self.commit(
                    walk,
                    level + 1,
                    entry_base,
                    pte.addr(),
                    ENTRIES,
                    live,
                    pte.breaks(),
                );
                breaks = self.try_merge(walk.pool, at, pte.with_breaks(child), breaks);
                continue;
            }
            if whole {
                if let Some(new) = walk.change.whole_entry(level, entry_base, pte) {
                    if new != pte {
                        breaks = recount(walk.pool, at, pte, new, breaks);
                        self.write_leaf(walk.pool, at, pte, new, live);
                    }
                    continue;
                }
            } else if walk.change.leaves_unchanged(level, entry_base, pte) {
                continue;
            }
            breaks = self.split(walk, at, pte, live, breaks);
        }
        breaks
    }

    /// Replaces leaf `pte` (entry `at`) by a table holding the equivalent
    /// entries with the change already applied, then installs it with
    /// break-before-make. Returns the run-break count of `at`'s table.
    fn split(&mut self, walk: &mut Commit<'_>, at: Slot, pte: Pte, live: bool, breaks: u8) -> u8 {
        let new_table = walk.reserve.table_for(walk.pool, pte, at.level);
        // The entries of one leaf's subdivision all continue each other.
        let child = self.commit(walk, at.level + 1, at.base, new_table, ENTRIES, false, 0);
        let link = Pte::table(new_table).with_breaks(child);
        self.link_table(walk.pool, at, pte, link, live);
        self.stats.table_pages += 1;
        if pte.is_valid() {
            self.stats.splits += 1;
        }
        recount(walk.pool, at, pte, link, breaks)
    }

    /// Replaces leaf `old` in entry `at` by table descriptor `link`, whose
    /// table is filled: with break-before-make if the entry is live and
    /// valid; for a live invalid entry, only after the table's entries are
    /// visible to the walker.
    #[inline(always)]
    fn link_table(&mut self, pool: &PagePool, at: Slot, old: Pte, link: Pte, live: bool) {
        if live && old.is_valid() {
            write(pool, at.table, at.index, Pte::invalid(Annotation(0)));
            self.tlb.publish_writes();
            self.tlb.invalidate_ipa(self.vmid, at.base, Some(at.level));
            self.tlb.complete(self.vmid);
        } else if live {
            // No TLB holds an invalid entry, but the walker must not see
            // the link before the table's contents.
            self.tlb.publish_writes();
        }
        write(pool, at.table, at.index, link);
    }

    /// Replaces leaf `old` by leaf `new` in entry `at`.
    fn write_leaf(&mut self, pool: &PagePool, at: Slot, old: Pte, new: Pte, live: bool) {
        if !live || !old.is_valid() || old.sw_only_change(new) {
            // Nothing cached depends on what changes.
            write(pool, at.table, at.index, new);
            return;
        }
        if !new.is_valid() || old.bbm_free_change(new) {
            // Unmapping is its own break; permission changes need none.
            write(pool, at.table, at.index, new);
            self.tlb.publish_writes();
            self.tlb.invalidate_ipa(self.vmid, at.base, Some(at.level));
            self.tlb.complete(self.vmid);
            return;
        }
        write(pool, at.table, at.index, Pte::invalid(Annotation(0)));
        self.tlb.publish_writes();
        self.tlb.invalidate_ipa(self.vmid, at.base, Some(at.level));
        self.tlb.complete(self.vmid);
        write(pool, at.table, at.index, new);
    }

    /// Replaces table entry `old` (entry `at`, in a live table) by leaf
    /// `new` with break-before-make, and frees the subtree. Returns the
    /// run-break count of `at`'s table.
    fn replace_subtree(
        &mut self,
        pool: &mut PagePool,
        at: Slot,
        old: Pte,
        new: Pte,
        breaks: u8,
    ) -> u8 {
        write(
            pool,
            at.table,
            at.index,
            if new.is_valid() {
                Pte::invalid(Annotation(0))
            } else {
                new
            },
        );
        self.tlb.publish_writes();
        let first = read(pool, old.addr(), 0);
        // A table with no breaks holds one run of leaves and nothing else:
        // what it caches is known without reading it.
        let flat = old.breaks() == 0 && !first.is_table(at.level + 1);
        let ops = if flat {
            1 + if first.is_valid() { ENTRIES } else { 0 }
        } else {
            let mut ops = 0;
            count_invalidations(pool, old.addr(), at.level + 1, &mut ops);
            ops
        };
        if ops > MAX_IPA_INVALIDATIONS {
            self.tlb.invalidate_vmid(self.vmid);
        } else if flat {
            // Only the table itself, in the walk caches.
            self.tlb.invalidate_ipa(self.vmid, at.base, None);
        } else {
            self.invalidate_subtree(pool, old.addr(), at.level + 1, at.base);
        }
        self.tlb.complete(self.vmid);
        if new.is_valid() {
            write(pool, at.table, at.index, new);
        }
        if flat {
            match merged_leaf(first, at.level) {
                // It holds exactly the subdivision of that leaf: kept for
                // the next split of the same leaf.
                Some(leaf) => {
                    // SAFETY: as for `free_table`; nothing writes it since.
                    unsafe { pool.free_split(old.addr(), leaf.0, at.level) };
                    self.stats.table_pages -= 1;
                }
                None => self.free_table(pool, old.addr()),
            }
        } else {
            self.free_subtree(pool, old.addr(), at.level + 1);
        }
        recount(pool, at, old, new, breaks)
    }

    /// One IPA invalidation per valid leaf (with its level), and one
    /// without a level per table so its walk-cache entries go too.
    fn invalidate_subtree(&mut self, pool: &PagePool, table: u64, level: u8, base: u64) {
        self.tlb.invalidate_ipa(self.vmid, base, None);
        for j in 0..ENTRIES {
            let pte = read(pool, table, j);
            let entry_base = base + ((j as u64) << level_shift(level));
            if pte.is_table(level) {
                self.invalidate_subtree(pool, pte.addr(), level + 1, entry_base);
            } else if pte.is_valid() {
                self.tlb.invalidate_ipa(self.vmid, entry_base, Some(level));
            }
        }
    }

    fn free_subtree(&mut self, pool: &mut PagePool, table: u64, level: u8) {
        // A level-3 table holds pages only: nothing below it to free.
        for j in (0..ENTRIES).take_while(|_| level < LEAF_LEVEL) {
            let pte = read(pool, table, j);
            if pte.is_table(level) {
                self.free_subtree(pool, pte.addr(), level + 1);
            }
        }
        self.free_table(pool, table);
    }

    /// Gives one table page, with nothing below it, back to the pool.
    fn free_table(&mut self, pool: &mut PagePool, table: u64) {
        // SAFETY: the page was allocated from this pool for this tree, it
        // is unlinked and its TLB entries are gone.
        unsafe { pool.free(table) };
        self.stats.table_pages -= 1;
    }

    /// Entry `at` holds table descriptor `pte`, whose run-break count the
    /// walk below it just updated. If the table is now one uniform leaf,
    /// replaces it by that leaf; otherwise stores the count. Returns the
    /// run-break count of `at`'s table.
    fn try_merge(&mut self, pool: &mut PagePool, at: Slot, pte: Pte, breaks: u8) -> u8 {
        let mut pte = pte;
        // An unknown count stays unknown until the table has no break at
        // all: finding the first break is enough to rule a merge out.
        if pte.breaks() == BREAKS_UNKNOWN && count_breaks(pool, pte.addr(), at.level + 1, 1) == 0 {
            pte = pte.with_breaks(0);
        }
        let leaf = if pte.breaks() == 0 {
            merged_leaf(read(pool, pte.addr(), 0), at.level)
        } else {
            None
        };
        let Some(leaf) = leaf else {
            if read(pool, at.table, at.index) != pte {
                // Only the software count changes: no TLB maintenance.
                write(pool, at.table, at.index, pte);
            }
            return breaks;
        };
        let breaks = self.replace_subtree(pool, at, pte, leaf, breaks);
        if leaf.is_valid() {
            self.stats.merges += 1;
        }
        breaks
    }

    /// The entry covering `ipa`.
    pub fn lookup(&self, pool: &PagePool, ipa: u64) -> Result<Leaf, MmError> {
        self.check_pool(pool)?;
        if ipa >= self.geometry.ipa_size() {
            return Err(MmError::OutOfRange);
        }
        let mut level = self.geometry.start_level;
        let mut table = self.root;
        loop {
            let pte = read(
                pool,
                table,
                entry_index(ipa, level, self.geometry.start_level),
            );
            if pte.is_table(level) {
                table = pte.addr();
                level += 1;
                continue;
            }
            return Ok(leaf_info(pte, level, ipa & !(level_size(level) - 1)));
        }
    }

    /// Calls `f` for every leaf (valid or not) intersecting `[ipa, ipa+len)`,
    /// in IPA order.
    pub fn visit_leaves(
        &self,
        pool: &PagePool,
        ipa: u64,
        len: u64,
        f: &mut dyn FnMut(&Leaf),
    ) -> Result<(), MmError> {
        self.check_pool(pool)?;
        let (start, end) = self.check_range(ipa, len)?;
        visit(
            pool,
            self.root,
            self.geometry.start_level,
            0,
            self.geometry.root_entries(),
            start,
            end,
            f,
        );
        Ok(())
    }

    /// Calls `f` for runs of consecutive leaves intersecting
    /// `[ipa, ipa+len)`, in IPA order: each run is the longest stretch of
    /// whole leaves that one leaf could describe, whatever their levels
    /// (valid: output contiguous, same attributes and state; invalid: same
    /// annotation). `Leaf::level` is the first leaf's and `Leaf::size` the
    /// run's length. A table of 512 pages that continue each other costs
    /// 512 descriptor compares and one call.
    pub fn visit_runs(
        &self,
        pool: &PagePool,
        ipa: u64,
        len: u64,
        f: &mut dyn FnMut(&Leaf),
    ) -> Result<(), MmError> {
        self.check_pool(pool)?;
        let (start, end) = self.check_range(ipa, len)?;
        // The run so far, and its last descriptor and level.
        let mut run: Option<(Leaf, Pte, u8)> = None;
        visit_raw(
            pool,
            self.root,
            self.geometry.start_level,
            0,
            self.geometry.root_entries(),
            start,
            end,
            &mut |pte, level, base| {
                if let Some((leaf, last, last_level)) = &mut run {
                    let size = level_size(level);
                    let contiguous = leaf.ipa + leaf.size == base;
                    if contiguous && level == *last_level && last.next_in_run(size) == Some(pte) {
                        leaf.size += size;
                        *last = pte;
                        return;
                    }
                    let next = leaf_info(pte, level, base);
                    let continues = contiguous
                        && match (leaf.kind, next.kind) {
                            (
                                LeafKind::Mapped { pa, attrs, state },
                                LeafKind::Mapped {
                                    pa: p,
                                    attrs: a,
                                    state: s,
                                },
                            ) => pa.checked_add(leaf.size) == Some(p) && attrs == a && state == s,
                            (LeafKind::Unmapped(a), LeafKind::Unmapped(b)) => a == b,
                            _ => false,
                        };
                    if continues {
                        leaf.size += size;
                        (*last, *last_level) = (pte, level);
                        return;
                    }
                    f(leaf);
                }
                run = Some((leaf_info(pte, level, base), pte, level));
            },
        );
        if let Some((leaf, _, _)) = run {
            f(&leaf);
        }
        Ok(())
    }

    /// Counts the table pages intersecting `[ipa, ipa+len)` and finds any
    /// that is not canonical (could be a single leaf).
    pub fn audit(&self, pool: &PagePool, ipa: u64, len: u64) -> Result<Audit, MmError> {
        self.check_pool(pool)?;
        let (start, end) = self.check_range(ipa, len)?;
        let mut audit = Audit {
            table_pages: 0,
            non_canonical: None,
            miscounted: None,
        };
        audit_table(
            pool,
            self.root,
            self.geometry.start_level,
            0,
            self.geometry.root_entries(),
            start,
            end,
            &mut audit,
        );
        Ok(audit)
    }

    /// Frees every table page and the root, after invalidating the VMID's
    /// TLB entries. The table must no longer be in use by any CPU (VTTBR).
    pub fn destroy(&mut self, pool: &mut PagePool) -> Result<(), MmError> {
        self.check_pool(pool)?;
        self.tlb.invalidate_vmid(self.vmid);
        self.tlb.complete(self.vmid);
        for i in 0..self.geometry.root_entries() {
            let pte = read(pool, self.root, i);
            if pte.is_table(self.geometry.start_level) {
                self.free_subtree(pool, pte.addr(), self.geometry.start_level + 1);
            }
        }
        // SAFETY: the root came from this pool in `new` and nothing points
        // to it once the VMID's TLB entries are gone.
        unsafe { pool.free_contiguous(self.root, self.geometry.root_pages) };
        self.stats.root_pages = 0;
        self.pool_id = 0;
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }
}

/// The index of the entry covering `ipa` in a table at `level`, in a stage 2
/// whose root (which may be concatenated: more than 512 entries) is at
/// level `start`.
#[inline]
fn entry_index(ipa: u64, level: u8, start: u8) -> usize {
    let index = (ipa >> level_shift(level)) as usize;
    if level == start {
        index
    } else {
        index % ENTRIES
    }
}

/// One entry of a table, with what the engine needs to change it.
#[derive(Clone, Copy)]
struct Slot {
    table: u64,
    index: usize,
    /// Entries of the table (512, or more for a concatenated root).
    entries: usize,
    level: u8,
    /// The first IPA the entry covers.
    base: u64,
}

/// State of one commit walk.
struct Commit<'a> {
    pool: &'a mut PagePool,
    reserve: &'a mut Reserve,
    change: Change,
    start: u64,
    end: u64,
}

fn count_invalidations(pool: &PagePool, table: u64, level: u8, ops: &mut usize) {
    *ops += 1;
    for j in 0..ENTRIES {
        if *ops > MAX_IPA_INVALIDATIONS {
            return;
        }
        let pte = read(pool, table, j);
        if pte.is_table(level) {
            count_invalidations(pool, pte.addr(), level + 1, ops);
        } else if pte.is_valid() {
            *ops += 1;
        }
    }
}

/// The leaf at `parent_level` equivalent to a table whose entries form one
/// run starting with `first` (its run-break count is 0), if one leaf can
/// hold it: any invalid run, or a valid run whose output is aligned for a
/// block at `parent_level` (never at level 0).
fn merged_leaf(first: Pte, parent_level: u8) -> Option<Pte> {
    if first.is_table(parent_level + 1) {
        return None;
    }
    if !first.is_valid() {
        return Some(first);
    }
    if parent_level == 0 || first.addr() & (level_size(parent_level) - 1) != 0 {
        return None;
    }
    Some(first.as_block_at(parent_level))
}

/// Whether entry `next` continues the run of entry `prev`, both at `level`.
#[inline]
fn continues(prev: Pte, next: Pte, level: u8) -> bool {
    let continued = prev.continued_by(next, level_size(level), level);
    debug_assert_eq!(
        continued,
        !prev.is_table(level)
            && !next.is_table(level)
            && prev.next_in_run(level_size(level)) == Some(next)
    );
    continued
}

/// The run-break count of table `table` at `level`: how many of its
/// neighbouring entries do not continue each other, counting stopped at
/// `cap` (which then means "at least that many").
fn count_breaks(pool: &PagePool, table: u64, level: u8, cap: u8) -> u8 {
    // No entry is replaced (index past the table).
    count_breaks_as(pool, table, level, cap, (ENTRIES, Pte(0)))
}

/// [`count_breaks`] of the table as it will be once entry `index` is
/// `pte` (`on_path`), without writing it.
fn count_breaks_as(pool: &PagePool, table: u64, level: u8, cap: u8, on_path: (usize, Pte)) -> u8 {
    let entry = |j: usize| {
        if j == on_path.0 {
            on_path.1
        } else {
            read(pool, table, j)
        }
    };
    let mut n = 0u8;
    let mut prev = entry(0);
    for j in 1..ENTRIES {
        let pte = entry(j);
        if !continues(prev, pte, level) {
            n += 1;
            if n == cap {
                break;
            }
        }
        prev = pte;
    }
    n
}

/// `breaks`, the run-break count of `at`'s table, once entry `at` changes
/// from `old` to `new` (its neighbours as they are now).
#[inline]
fn recount(pool: &PagePool, at: Slot, old: Pte, new: Pte, breaks: u8) -> u8 {
    if breaks == BREAKS_UNKNOWN {
        return breaks;
    }
    let prev = (at.index > 0).then(|| read(pool, at.table, at.index - 1));
    let next = (at.index + 1 < at.entries).then(|| read(pool, at.table, at.index + 1));
    // The breaks entry `at` takes part in, were it `pte`.
    let around = |pte: Pte| {
        u16::from(prev.is_some_and(|p| !continues(p, pte, at.level)))
            + u16::from(next.is_some_and(|n| !continues(pte, n, at.level)))
    };
    // A table descriptor continues no neighbour: a break with each.
    let around_old = if old.is_table(at.level) {
        u16::from(prev.is_some()) + u16::from(next.is_some())
    } else {
        around(old)
    };
    let n = u16::from(breaks) + around(new) - around_old;
    n.min(u16::from(BREAKS_UNKNOWN)) as u8
}

/// Fills the new table `table` with the subdivision of leaf `leaf` at
/// `level`: the table is not linked yet, so plain stores do. Eight entries
/// a step (four pair stores), as this is most of what a split costs.
fn fill(pool: &PagePool, table: u64, leaf: Pte, level: u8) {
    let first = leaf.child(level, 0).0;
    let entries = pool.va(table) as *mut [u64; 8];
    if !leaf.is_valid() {
        for j in 0..ENTRIES / 8 {
            // SAFETY: `table` is a pool page of ours (see `entry`), 4 KiB
            // aligned and not yet reachable by any walker.
            unsafe { entries.add(j).write([first; 8]) };
        }
        return;
    }
    let step = level_size(level + 1);
    let mut next = first;
    for j in 0..ENTRIES / 8 {
        let row = core::array::from_fn(|k| next + k as u64 * step);
        // SAFETY: as above; a valid leaf's output range lies below 2^48,
        // so adding to the address field never carries out of it.
        unsafe { entries.add(j).write(row) };
        next += 8 * step;
    }
}

fn leaf_info(pte: Pte, level: u8, ipa: u64) -> Leaf {
    Leaf {
        ipa,
        level,
        size: level_size(level),
        kind: leaf_kind(pte),
    }
}

#[inline(always)]
fn leaf_kind(pte: Pte) -> LeafKind {
    if pte.is_valid() {
        LeafKind::Mapped {
            pa: pte.addr(),
            attrs: pte.attrs(),
            state: pte.state(),
        }
    } else {
        LeafKind::Unmapped(pte.annotation())
    }
}

#[allow(clippy::too_many_arguments)]
fn visit(
    pool: &PagePool,
    table: u64,
    level: u8,
    base: u64,
    entries: usize,
    start: u64,
    end: u64,
    f: &mut dyn FnMut(&Leaf),
) {
    for i in span(level, base, entries, start, end) {
        let pte = read(pool, table, i);
        let entry_base = base + ((i as u64) << level_shift(level));
        if pte.is_table(level) {
            visit(
                pool,
                pte.addr(),
                level + 1,
                entry_base,
                ENTRIES,
                start,
                end,
                f,
            );
        } else {
            f(&leaf_info(pte, level, entry_base));
        }
    }
}

/// As [`visit`], handing each leaf's raw descriptor, level and first IPA
/// to `f` (inlined: no decoding, no indirect call per leaf).
#[allow(clippy::too_many_arguments)]
fn visit_raw(
    pool: &PagePool,
    table: u64,
    level: u8,
    base: u64,
    entries: usize,
    start: u64,
    end: u64,
    f: &mut impl FnMut(Pte, u8, u64),
) {
    for i in span(level, base, entries, start, end) {
        let pte = read(pool, table, i);
        let entry_base = base + ((i as u64) << level_shift(level));
        if pte.is_table(level) {
            visit_raw(
                pool,
                pte.addr(),
                level + 1,
                entry_base,
                ENTRIES,
                start,
                end,
                f,
            );
        } else {
            f(pte, level, entry_base);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn audit_table(
    pool: &PagePool,
    table: u64,
    level: u8,
    base: u64,
    entries: usize,
    start: u64,
    end: u64,
    audit: &mut Audit,
) {
    for i in span(level, base, entries, start, end) {
        let pte = read(pool, table, i);
        let entry_base = base + ((i as u64) << level_shift(level));
        if pte.is_table(level) {
            audit.table_pages += 1;
            let breaks = count_breaks(pool, pte.addr(), level + 1, BREAKS_UNKNOWN);
            if audit.non_canonical.is_none()
                && breaks == 0
                && merged_leaf(read(pool, pte.addr(), 0), level).is_some()
            {
                audit.non_canonical = Some((entry_base, level + 1));
            }
            // The stored count is exact, or "unknown" (not kept up once
            // reached, until the table has no break at all).
            if audit.miscounted.is_none()
                && pte.breaks() != breaks
                && pte.breaks() != BREAKS_UNKNOWN
            {
                audit.miscounted = Some((entry_base, level + 1));
            }
            audit_table(
                pool,
                pte.addr(),
                level + 1,
                entry_base,
                ENTRIES,
                start,
                end,
                audit,
            );
        }
    }
}

#[cfg(test)]
mod model_tests;
