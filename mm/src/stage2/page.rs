//! The single-page path of the stage-2 engine: [`Stage2::walk_page`] finds
//! the path to one page (the walk is the check), [`Stage2::plan_page`]
//! works out what a change does there, and [`Stage2::commit_page`] makes
//! the change along that path without walking again.
//!
//! It gives exactly what the range path ([`Stage2::apply`]) gives for one
//! page: the same tables, run-break counts, merges, statistics and stash
//! (the model tests compare the two descriptor by descriptor). Only its
//! TLB maintenance differs, by design: one break-before-make for the page
//! and every table that merges above it, where the range path breaks once
//! per table (the model TLB checks both are safe).
//! It exists for the calls that convert one page at a time (a guest's
//! MEM_SHARE and MEM_UNSHARE), so it is written for their shapes: a page
//! inside a block (split along its path, the tables coming back from the
//! stash with their entries written) and a page whose change makes its
//! tables uniform again (merged back into the block). Levels are indexed
//! directly, the entry counts of every table below the root are known
//! (512), and each step reads only the entries it needs.

use super::*;

/// `level` as an index into a walk's per-level arrays (levels are 0..=3;
/// the mask lets the compiler drop the bounds checks).
#[inline(always)]
fn lv(level: u8) -> usize {
    usize::from(level & 3)
}

/// Index of the entry covering `ipa` in a table at `level` below the root.
#[inline(always)]
fn child_index(ipa: u64, level: u8) -> usize {
    ((ipa >> level_shift(level)) as usize) % ENTRIES
}

/// The path from a stage 2's root to the leaf mapping one page, found by
/// [`Stage2::walk_page`] and good until the stage 2 next changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct PageWalk {
    ipa: u64,
    /// The walked stage 2's identity (high half, 0: none) and generation
    /// (low half).
    stamp: u64,
    start: u8,
    /// Level of the leaf.
    pub(super) level: u8,
    /// `table[l]` (start <= l <= level): the table at level `l` on the path.
    table: [u64; 4],
    /// `entry[l]`: that table's entry on the path (a table descriptor
    /// with its run-break count above the leaf; `entry[level]` is the
    /// leaf).
    entry: [Pte; 4],
}

impl PageWalk {
    /// The leaf that maps the page (it may cover more than the page).
    #[inline]
    pub fn leaf(&self) -> Leaf {
        leaf_info(
            self.leaf_pte(),
            self.level,
            self.ipa & !(level_size(self.level) - 1),
        )
    }

    /// What the leaf that maps the page is ([`leaf`](Self::leaf) without
    /// its extent).
    #[inline]
    pub fn kind(&self) -> LeafKind {
        leaf_kind(self.leaf_pte())
    }

    /// For a page the walk found mapped: its output address and state.
    #[inline]
    pub fn mapped(&self) -> Option<(u64, PageState)> {
        let page = self.page();
        page.is_valid().then(|| (page.addr(), page.state()))
    }

    /// The page's own descriptor: its part of the leaf (an invalid leaf
    /// is the same everywhere).
    #[inline(always)]
    fn page(&self) -> Pte {
        let leaf = self.leaf_pte();
        if leaf.is_valid() {
            leaf.page_at(self.ipa & (level_size(self.level) - 1))
        } else {
            leaf
        }
    }

    #[inline(always)]
    fn leaf_pte(&self) -> Pte {
        self.entry[lv(self.level)]
    }

    /// The run-break count of the table at `level` on the path (the
    /// root's is not kept).
    #[inline(always)]
    pub(super) fn table_count(&self, level: u8) -> u8 {
        if level == self.start {
            BREAKS_UNKNOWN
        } else {
            self.entry[lv(level.wrapping_sub(1))].breaks()
        }
    }

    /// The page's own descriptor, were its leaf split down to level 3,
    /// split by split: what `page` computes in one step (checked against
    /// this in debug builds).
    fn page_pte(&self) -> Pte {
        let mut pte = self.leaf_pte();
        for level in self.level..LEAF_LEVEL {
            pte = pte.child(level, child_index(self.ipa, level + 1));
        }
        pte
    }

    /// The path's entry at `level` (at most the leaf's).
    #[inline(always)]
    pub(super) fn slot(&self, level: u8, root_entries: usize) -> Slot {
        Slot {
            table: self.table[lv(level)],
            index: entry_index(self.ipa, level, self.start),
            entries: if level == self.start {
                root_entries
            } else {
                ENTRIES
            },
            level,
            base: self.ipa & !(level_size(level) - 1),
        }
    }
}

/// A single-page change checked against one [`PageWalk`]
/// ([`Stage2::plan_page`]), for [`Stage2::commit_page`].
#[derive(Clone, Copy, Debug)]
pub struct PagePlan {
    stamp: u64,
    ipa: u64,
    old: Pte,
    new: Pte,
    pages: u8,
}

impl PagePlan {
    /// Table pages the commit takes from the pool.
    pub fn pages(&self) -> usize {
        usize::from(self.pages)
    }
}

impl<T: TlbMaintenance> Stage2<T> {
    /// Walks to the leaf that maps page `ipa`, for a single-page change:
    /// the walk is the check ([`PageWalk::leaf`], [`page_pages_needed`])
    /// and what [`change_page`] commits along, without walking again.
    ///
    /// [`page_pages_needed`]: Self::page_pages_needed
    /// [`change_page`]: Self::change_page
    pub fn walk_page(&self, pool: &PagePool, ipa: u64) -> Result<PageWalk, MmError> {
        let mut walk = PageWalk::default();
        self.walk_page_into(pool, ipa, &mut walk)?;
        Ok(walk)
    }

    /// [`walk_page`](Self::walk_page) into `walk` (the hot paths keep the
    /// walk where it is, rather than moving it out of a `Result`).
    #[inline(always)]
    pub fn walk_page_into(
        &self,
        pool: &PagePool,
        ipa: u64,
        walk: &mut PageWalk,
    ) -> Result<(), MmError> {
        self.check_pool(pool)?;
        self.check_page(ipa)?;
        let start = self.geometry.start_level;
        walk.ipa = ipa;
        walk.stamp = self.stamp();
        walk.start = start;
        let mut level = start;
        let mut table = self.root;
        // The root needs no mask: the IPA is inside the table.
        let mut index = (ipa >> level_shift(start)) as usize;
        loop {
            let pte = read(pool, table, index);
            walk.table[lv(level)] = table;
            walk.entry[lv(level)] = pte;
            if !pte.is_table(level) {
                walk.level = level;
                return Ok(());
            }
            level += 1;
            table = pte.addr();
            index = child_index(ipa, level);
        }
    }

    /// What `change` does to page `walk.ipa`: its descriptor now (its
    /// part of the leaf) and after, and the table pages the change takes;
    /// refuses what `apply` refuses. Writes nothing.
    #[inline(always)]
    pub fn plan_page(&self, walk: &PageWalk, change: Change) -> Result<PagePlan, MmError> {
        if walk.stamp != self.stamp() {
            return Err(self.stamp_error(walk.stamp));
        }
        let leaf = walk.leaf_pte();
        if change.requires_mapped() && !leaf.is_valid() {
            return Err(MmError::NotMapped);
        }
        if let Change::Map { ipa, pa, .. } = change {
            let out = pa.wrapping_add(walk.ipa.wrapping_sub(ipa));
            self.check_change(walk.ipa, crate::PAGE_SIZE as u64, change)?;
            if walk.ipa < ipa || out & (crate::PAGE_SIZE as u64 - 1) != 0 || out >= 1 << 48 {
                return Err(MmError::OutOfRange);
            }
        }
        let old = walk.page();
        debug_assert_eq!(old, walk.page_pte());
        let new = change
            .whole_entry(LEAF_LEVEL, walk.ipa, old)
            .ok_or(MmError::InvalidArgument)?;
        let pages = if old == new {
            0
        } else {
            LEAF_LEVEL - walk.level
        };
        Ok(PagePlan {
            stamp: walk.stamp,
            ipa: walk.ipa,
            old,
            new,
            pages,
        })
    }

    /// Table pages [`change_page`](Self::change_page) would take for
    /// `change` to page `walk.ipa`, and the errors it would return.
    pub fn page_pages_needed(&self, walk: &PageWalk, change: Change) -> Result<usize, MmError> {
        self.plan_page(walk, change).map(|p| p.pages())
    }

    /// Applies `change` to page `walk.ipa` alone: `plan_page`, then
    /// `commit_page`.
    pub fn change_page(
        &mut self,
        pool: &mut PagePool,
        walk: &PageWalk,
        change: Change,
    ) -> Result<(), MmError> {
        let plan = self.plan_page(walk, change)?;
        self.commit_page(pool, walk, &plan)
    }

    /// Commits `plan` (from `plan_page` on `walk`) as `apply` over that
    /// page would (the same tables, merges and counts; fewer TLB sequences),
    /// along the path `walk` found: splits only the leaves on the page's
    /// path, and merges the tables on it that become uniform. Nothing
    /// changes on an error: `MmError::Stale` if the table changed since
    /// the walk, `InvalidArgument` for a walk or plan of another stage 2
    /// (or another page), `NoMemory` if the pool lacks the plan's pages.
    #[inline(always)]
    pub fn commit_page(
        &mut self,
        pool: &mut PagePool,
        walk: &PageWalk,
        plan: &PagePlan,
    ) -> Result<(), MmError> {
        self.check_pool(pool)?;
        if plan.stamp != self.stamp() {
            return Err(self.stamp_error(plan.stamp));
        }
        if walk.stamp != plan.stamp {
            return Err(self.stamp_error(walk.stamp));
        }
        if walk.ipa != plan.ipa {
            return Err(MmError::InvalidArgument);
        }
        let (old, new) = (plan.old, plan.new);
        if old == new {
            return Ok(());
        }
        let mut reserve = Reserve::take(pool, plan.pages())?;
        self.generation = self.generation.wrapping_add(1);
        if walk.level == LEAF_LEVEL {
            self.change_and_merge(pool, walk, old, new);
        } else {
            self.split_path(pool, &mut reserve, walk, new);
        }
        self.tlb.publish_writes();
        Ok(())
    }

    /// Writes the page's entry `new` (now `old`) and merges every table
    /// on the path that becomes one leaf: one break, at the highest entry
    /// that changes, and one TLB sequence for the page and every table
    /// merged (where the range path breaks once per table).
    fn change_and_merge(&mut self, pool: &mut PagePool, walk: &PageWalk, old: Pte, new: Pte) {
        let ipa = walk.ipa;
        let start = walk.start;
        // The root is never at level 3 (see `Geometry::new`).
        debug_assert!(start < LEAF_LEVEL);
        let t3 = walk.table[3];
        let i3 = child_index(ipa, LEAF_LEVEL);
        let mut count = recount_in(pool, t3, i3, LEAF_LEVEL, old, new, walk.table_count(3));
        // A page going away may stay cached until the invalidation that
        // ends this change; any other change is written as `write_leaf`
        // writes it (a store where nothing cached depends on it, else
        // break-before-make first). `write_leaf`'s plain-store case is
        // tested here as well, so the hot conversions make no call.
        let deferred = old.is_valid() && !new.is_valid();
        if deferred || !old.is_valid() || old.sw_only_change(new) {
            write(pool, t3, i3, new);
        } else {
            let at = walk.slot(LEAF_LEVEL, ENTRIES);
            self.write_leaf(pool, at, old, new, true);
        }
        // How far up the tables merge: `leaf[l]` is what entry `l` of the
        // path becomes, for `top <= l < 3`. Nothing above the page is
        // written yet, so the entry on the path in the table below is read
        // as what it is to become (`below`).
        let mut leaf = [Pte(0); LEAF_LEVEL as usize];
        let mut top = LEAF_LEVEL;
        let mut below = new;
        // The level whose entry on the path keeps its (new) count, if any.
        let mut keep = None;
        let mut level = LEAF_LEVEL;
        while level > start {
            level -= 1;
            let table = walk.table[lv(level + 1)];
            let index = child_index(ipa, level + 1);
            // A saturated count is known again once the table has no break
            // at all: finding the first break is enough to rule a merge out.
            if count == BREAKS_UNKNOWN
                && count_breaks_as(pool, table, level + 1, 1, (index, below)) == 0
            {
                count = 0;
            }
            // No break: one run of leaves (tables break runs), which one
            // leaf here holds unless its output is misaligned for it.
            let merged = if count != 0 {
                None
            } else if index == 0 {
                merged_leaf(below, level)
            } else {
                merged_leaf(read(pool, table, 0), level)
            };
            let Some(merged) = merged else {
                keep = Some((level, count));
                break;
            };
            leaf[usize::from(level)] = merged;
            top = level;
            below = merged;
            // The root's count is not kept (`recount` would find that out
            // too, after more work on this hot path).
            count = if level == start {
                BREAKS_UNKNOWN
            } else {
                recount_in(
                    pool,
                    walk.table[lv(level)],
                    child_index(ipa, level),
                    level,
                    walk.entry[lv(level)],
                    merged,
                    walk.table_count(level),
                )
            };
        }
        if top == LEAF_LEVEL {
            if deferred {
                self.tlb.publish_writes();
                self.tlb.invalidate_ipa(self.vmid, ipa, Some(LEAF_LEVEL));
                self.tlb.complete(self.vmid);
            }
        } else {
            let at_table = walk.table[lv(top)];
            let at_index = entry_index(ipa, top, start);
            let merged = leaf[usize::from(top)];
            if merged.is_valid() {
                write(pool, at_table, at_index, Pte::invalid(Annotation(0)));
                self.tlb.publish_writes();
                // Each of the leaves below may be cached: one VMID-wide
                // operation rather than hundreds by IPA.
                self.tlb.invalidate_vmid(self.vmid);
                self.tlb.complete(self.vmid);
                write(pool, at_table, at_index, merged);
            } else {
                write(pool, at_table, at_index, merged);
                self.tlb.publish_writes();
                // Nothing below was valid but (perhaps) the page: its
                // entry, and the walk caches of every table on its path.
                self.tlb.invalidate_ipa(self.vmid, ipa, None);
                self.tlb.complete(self.vmid);
            }
            // The unlinked tables, bottom up (a split takes them top down,
            // newest first), each holding exactly the subdivision of its
            // leaf once the entry on the path is that leaf too.
            let mut level = LEAF_LEVEL;
            while level > top {
                level -= 1;
                let l = usize::from(level);
                let table = walk.table[lv(level + 1)];
                if level + 1 < LEAF_LEVEL {
                    write(pool, table, child_index(ipa, level + 1), leaf[l + 1]);
                }
                // SAFETY: a table of this tree from this pool, unlinked,
                // with its TLB entries gone; nothing writes it since.
                unsafe { pool.free_split(table, leaf[l].0, level) };
                self.stats.table_pages -= 1;
                if leaf[l].is_valid() {
                    self.stats.merges += 1;
                }
            }
        }
        if let Some((level, count)) = keep {
            // Only the software count changes: no TLB maintenance.
            let at_table = walk.table[lv(level)];
            let at_index = entry_index(ipa, level, start);
            let child = walk.entry[lv(level)].with_breaks(count);
            if read(pool, at_table, at_index) != child {
                write(pool, at_table, at_index, child);
            }
        }
    }

    /// Replaces the walk's leaf (above level 3) by tables down to the
    /// page, whose entry becomes `new`: the tables are built unlinked and
    /// linked with one break-before-make.
    fn split_path(
        &mut self,
        pool: &mut PagePool,
        reserve: &mut Reserve,
        walk: &PageWalk,
        new: Pte,
    ) {
        let ipa = walk.ipa;
        let top = walk.level;
        let old = walk.leaf_pte();
        // Top down (the order the merges that stashed them run
        // backwards), each new table subdividing its leaf: `tables[l]`,
        // at level `l + 1`, subdivides `leaves[l]`.
        let mut tables = [0u64; LEAF_LEVEL as usize];
        let mut leaves = [old; LEAF_LEVEL as usize];
        let mut leaf = old;
        let mut level = top;
        while level < LEAF_LEVEL {
            let l = usize::from(level);
            leaves[l] = leaf;
            tables[l] = reserve.table_for(pool, leaf, level);
            leaf = leaf.child(level, child_index(ipa, level + 1));
            level += 1;
        }
        // From the page up to the first new table. A fresh subdivision is
        // one run, and an entry that differs from its leaf's part (`new`,
        // then each link) continues neither neighbour: each neighbour the
        // entry has is one break.
        let mut entry = new;
        let mut level = LEAF_LEVEL;
        while level > top {
            let table = tables[usize::from(level - 1)];
            let index = child_index(ipa, level);
            let count = u8::from(index > 0) + u8::from(index < ENTRIES - 1);
            debug_assert_eq!(
                count,
                recount_in(
                    pool,
                    table,
                    index,
                    level,
                    leaves[usize::from(level - 1)].child(level - 1, index),
                    entry,
                    0,
                )
            );
            write(pool, table, index, entry);
            entry = Pte::table(table).with_breaks(count);
            level -= 1;
        }
        let tables = usize::from(LEAF_LEVEL - top);
        self.stats.table_pages += tables;
        if old.is_valid() {
            self.stats.splits += tables as u64;
        }
        // Link the first new table in place of the leaf.
        let at = walk.slot(top, self.geometry.root_entries());
        // The root's count is not kept (`recount` would find that out too,
        // after more work on this hot path).
        let count = if top == walk.start {
            BREAKS_UNKNOWN
        } else {
            recount_in(
                pool,
                at.table,
                at.index,
                top,
                old,
                entry,
                walk.table_count(top),
            )
        };
        self.link_table(pool, at, old, entry, true);
        if top > walk.start {
            let up = top - 1;
            write(
                pool,
                walk.table[lv(up)],
                entry_index(ipa, up, walk.start),
                walk.entry[lv(up)].with_breaks(count),
            );
        }
    }
}

/// [`recount`] of entry `index` of `table`, a table below the root at
/// `level` (512 entries): the hot paths know these without a [`Slot`].
#[inline(always)]
fn recount_in(
    pool: &PagePool,
    table: u64,
    index: usize,
    level: u8,
    old: Pte,
    new: Pte,
    breaks: u8,
) -> u8 {
    let at = Slot {
        table,
        index,
        entries: ENTRIES,
        level,
        // `recount` reads the entry's neighbours, not where it maps.
        base: 0,
    };
    recount(pool, at, old, new, breaks)
}
