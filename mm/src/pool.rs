//! The page pool: 4 KiB pages of physical memory handed to the hypervisor,
//! from which every translation table is allocated.
//!
//! The pool is a buddy allocator (`buddy_system_allocator::Heap`, which needs
//! no global allocator) over the pool's *virtual* addresses. Physical and
//! virtual addresses differ by a fixed offset: the hypervisor runs with
//! VA == PA (offset 0); host tests back the pool with an aligned `Vec` and
//! pretend it sits at some physical address, so the engine really does
//! translate every table address it follows.
//!
//! Not `Sync`: the hypervisor keeps the pool behind its own spin lock.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

use buddy_system_allocator::Heap;

use crate::donated::{DonatedError, DonatedPages};
use crate::MmError;

/// Size of a pool page and of a translation table.
pub const PAGE_SIZE: usize = 4096;
const PAGE_SHIFT: u32 = 12;

/// Largest block the buddy allocator tracks is 2^(ORDER-1) bytes (2 GiB),
/// larger ranges are simply added as several blocks.
const ORDER: usize = 32;

/// The PA-to-VA offset must keep physical alignment up to this size, so that
/// a block aligned in virtual addresses (what the buddy allocator sees) is
/// aligned in physical addresses too (what the table walker needs; a
/// concatenated stage-2 root of 16 tables needs 64 KiB alignment).
pub const MAX_CONTIGUOUS_PAGES: usize = 16;

/// Tables a merge freed, kept whole for the next split of the same leaf.
pub const STASH_ENTRIES: usize = 8;

/// A free page that still holds the subdivision of one leaf (a table a
/// merge made redundant): a split of that same leaf takes it as it is
/// instead of writing 512 entries again.
#[derive(Clone, Copy)]
struct Stashed {
    pa: u64,
    /// The leaf descriptor the table subdivides, and its level.
    leaf: u64,
    level: u8,
}

/// Hands out distinct pool identities so that a page-table owner can refuse
/// a pool that is not the one its tables came from.
static NEXT_POOL_ID: AtomicU32 = AtomicU32::new(1);

/// A pool of 4 KiB physical pages.
pub struct PagePool {
    heap: Heap<ORDER>,
    /// `va = pa + va_offset` (wrapping).
    va_offset: usize,
    total_pages: usize,
    free_pages: usize,
    id: u32,
    /// Pages the host donated, each reclaimable by name while free; used
    /// for single pages once the buddy heap is empty.
    donated: Option<&'static mut DonatedPages>,
    /// Pages held back for the calls that bring memory in (a donation must
    /// work even when the pool is otherwise empty), and whether they are
    /// available right now.
    reserve: usize,
    reserve_open: bool,
    /// Free pages that are out of the heap and the donated table while
    /// they hold a merged table's entries, oldest first. They count as
    /// free: any allocation the rest of the pool cannot serve takes them.
    stash: [Stashed; STASH_ENTRIES],
    stashed: usize,
}

impl PagePool {
    /// An empty pool whose memory is reachable at `pa + va_offset`
    /// (wrapping); the hypervisor passes 0. `va_offset` must be a multiple of
    /// `MAX_CONTIGUOUS_PAGES * PAGE_SIZE`.
    pub fn new(va_offset: usize) -> Result<Self, MmError> {
        if !va_offset.is_multiple_of(MAX_CONTIGUOUS_PAGES * PAGE_SIZE) {
            return Err(MmError::Misaligned);
        }
        Ok(Self {
            heap: Heap::new(),
            va_offset,
            total_pages: 0,
            free_pages: 0,
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            donated: None,
            reserve: 0,
            reserve_open: false,
            stash: [Stashed {
                pa: 0,
                leaf: 0,
                level: 0,
            }; STASH_ENTRIES],
            stashed: 0,
        })
    }

    /// Gives the pool the physical range `[pa, pa + len)`; may be called at
    /// any time (e.g. when the host donates pages). Returns the number of
    /// pages added.
    ///
    /// # Safety
    /// The range must be memory that nothing else uses from now on, readable
    /// and writable at `pa + va_offset`, and never given to any pool before.
    pub unsafe fn add_range(&mut self, pa: u64, len: usize) -> Result<usize, MmError> {
        if len == 0 {
            return Err(MmError::ZeroLength);
        }
        if !pa.is_multiple_of(PAGE_SIZE as u64) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MmError::Misaligned);
        }
        let pa = usize::try_from(pa).map_err(|_| MmError::Overflow)?;
        let va = pa.wrapping_add(self.va_offset);
        // The heap works on VAs: the whole range must be representable
        // without wrapping, with room for the heap's own end arithmetic.
        let end = va
            .checked_add(len)
            .filter(|end| end.checked_add(PAGE_SIZE).is_some())
            .ok_or(MmError::Overflow)?;
        if pa.checked_add(len).is_none() || va == 0 {
            return Err(MmError::Overflow);
        }
        // SAFETY: the caller hands us exclusive use of this range at these
        // virtual addresses; it is page aligned and does not wrap.
        unsafe { self.heap.add_to_heap(va, end) };
        let pages = len >> PAGE_SHIFT;
        self.total_pages += pages;
        self.free_pages += pages;
        Ok(pages)
    }

    /// A zeroed page, by physical address.
    pub fn alloc_zeroed(&mut self) -> Result<u64, MmError> {
        self.alloc_contiguous_zeroed(1)
    }

    /// `pages` (a power of two, at most `MAX_CONTIGUOUS_PAGES`) contiguous
    /// zeroed pages aligned to their total size, by physical address of the
    /// first one.
    pub fn alloc_contiguous_zeroed(&mut self, pages: usize) -> Result<u64, MmError> {
        let pa = self.alloc_contiguous(pages)?;
        // SAFETY: the pages were just taken from the heap, so they are ours
        // alone and mapped at this VA (contract of `add_range`).
        unsafe { core::ptr::write_bytes(self.va(pa), 0, pages * PAGE_SIZE) };
        Ok(pa)
    }

    /// One page whose content is unspecified: for callers that overwrite
    /// all of it anyway (a table filled on a block split).
    pub(crate) fn alloc_uninit(&mut self) -> Result<u64, MmError> {
        self.alloc_contiguous(1)
    }

    fn alloc_contiguous(&mut self, pages: usize) -> Result<u64, MmError> {
        if pages == 0 || !pages.is_power_of_two() || pages > MAX_CONTIGUOUS_PAGES {
            return Err(MmError::InvalidArgument);
        }
        if pages > self.free_pages() {
            return Err(MmError::NoMemory);
        }
        // Single pages come from donated memory first: that is what the
        // host gave it for, and it leaves the boot pages (the reserve for
        // donations among them) untouched as long as possible.
        if pages == 1 {
            if let Some(pfn) = self.donated.as_mut().and_then(|d| d.take()) {
                self.free_pages -= 1;
                return Ok(pfn << PAGE_SHIFT);
            }
        }
        let layout = Self::layout(pages)?;
        let ptr = match self.heap.alloc(layout) {
            Ok(ptr) => ptr,
            // The rest of the free pages are in the stash: the oldest one
            // does for a single page; a larger block may need them all back
            // in the heap to form.
            Err(_) if pages == 1 && self.stashed > 0 => {
                let pa = self.stash[0].pa;
                self.unstash(0);
                self.free_pages -= 1;
                return Ok(pa);
            }
            Err(_) if self.stashed > 0 => {
                self.flush_stash();
                self.heap.alloc(layout).map_err(|_| MmError::NoMemory)?
            }
            Err(_) => return Err(MmError::NoMemory),
        };
        self.free_pages -= pages;
        Ok((ptr.as_ptr() as usize).wrapping_sub(self.va_offset) as u64)
    }

    /// Frees table page `pa`, which holds exactly the subdivision of leaf
    /// descriptor `leaf` at `level` (what splitting it writes), keeping
    /// its contents for `take_split` (a later split of that leaf). The oldest
    /// stashed page goes back to the heap if the stash is full.
    ///
    /// # Safety
    /// As for [`free`](Self::free); the contents must be as said, and
    /// nothing may write the page afterwards.
    #[inline]
    pub unsafe fn free_split(&mut self, pa: u64, leaf: u64, level: u8) {
        if self.stashed >= STASH_ENTRIES {
            self.evict_oldest();
        }
        self.stash[self.stashed] = Stashed { pa, leaf, level };
        self.stashed += 1;
        self.free_pages += 1;
    }

    /// Puts the oldest stashed page back in the heap or the donated table
    /// (out of line: the merges that stash pages stay small).
    #[inline(never)]
    fn evict_oldest(&mut self) {
        let oldest = self.stash[0].pa;
        self.unstash(0);
        // SAFETY: a stashed page is a free page of this pool.
        unsafe { self.release(oldest, 1) };
    }

    /// A free page holding the subdivision of leaf descriptor `leaf` at
    /// `level`, if a merge left one: allocated, like `alloc_uninit`. The
    /// caller has checked that `free_pages` covers it.
    #[inline]
    pub(crate) fn take_split(&mut self, leaf: u64, level: u8) -> Option<u64> {
        // The newest entry first: a split usually undoes the last merge.
        let last = self.stashed.checked_sub(1)?;
        let newest = self.stash[last];
        if newest.leaf == leaf && newest.level == level {
            self.stashed = last;
            self.free_pages -= 1;
            return Some(newest.pa);
        }
        self.take_older_split(leaf, level)
    }

    /// [`take_split`](Self::take_split) of an entry other than the newest.
    #[inline(never)]
    fn take_older_split(&mut self, leaf: u64, level: u8) -> Option<u64> {
        let last = self.stashed - 1;
        let i = (0..last)
            .rev()
            .find(|&i| self.stash[i].leaf == leaf && self.stash[i].level == level)?;
        let pa = self.stash[i].pa;
        // The last entry fills the hole: eviction order is a guess anyway.
        self.stash[i] = self.stash[last];
        self.stashed = last;
        self.free_pages -= 1;
        Some(pa)
    }

    /// The stashed pages, oldest first: (page, leaf descriptor, level).
    #[cfg(test)]
    pub(crate) fn stash_entries(&self) -> impl Iterator<Item = (u64, u64, u8)> + '_ {
        self.stash[..self.stashed]
            .iter()
            .map(|s| (s.pa, s.leaf, s.level))
    }

    /// Free pages kept in the stash.
    pub fn stashed(&self) -> usize {
        self.stashed
    }

    fn unstash(&mut self, i: usize) {
        self.stash.copy_within(i + 1..self.stashed, i);
        self.stashed -= 1;
    }

    fn is_stashed(&self, pa: u64) -> bool {
        self.stash[..self.stashed].iter().any(|s| s.pa == pa)
    }

    /// Puts every stashed page back in the heap or the donated table.
    fn flush_stash(&mut self) {
        while self.stashed > 0 {
            let pa = self.stash[self.stashed - 1].pa;
            self.stashed -= 1;
            // SAFETY: a stashed page is a free page of this pool.
            unsafe { self.release(pa, 1) };
        }
    }

    /// Gives the pool a table of donated pages to keep (once, at boot).
    pub fn attach_donated(&mut self, table: &'static mut DonatedPages) {
        self.donated = Some(table);
    }

    /// Whether `pfn` is a donated page, and if so whether it is in use (a
    /// stashed page is free).
    pub fn donated_in_use(&self, pfn: u64) -> Option<bool> {
        let in_use = self.donated.as_ref()?.lookup(pfn)?;
        Some(in_use && !self.is_stashed(pfn << PAGE_SHIFT))
    }

    /// Every donated page and whether it is in use.
    pub fn donated_pages(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.donated
            .as_deref()
            .into_iter()
            .flat_map(|d| d.iter())
            .map(|(pfn, in_use)| (pfn, in_use && !self.is_stashed(pfn << PAGE_SHIFT)))
    }

    /// The donated pages as runs of consecutive frame numbers: (first
    /// frame number, pages), in order.
    pub fn donated_runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.donated.as_deref().into_iter().flat_map(|d| d.runs())
    }

    /// The first page of [pfn, pfn + nr) that is not a donated page.
    pub fn first_not_donated(&self, pfn: u64, nr: u64) -> Option<u64> {
        match self.donated.as_deref() {
            Some(d) => d.first_missing(pfn, nr),
            None => (nr > 0).then_some(pfn),
        }
    }

    /// Checks that `nr` pages from `pfn` can be donated.
    pub fn check_donate(&self, pfn: u64, nr: u64) -> Result<(), MmError> {
        let table = self.donated.as_ref().ok_or(MmError::NoMemory)?;
        table.check_add(pfn, nr).map_err(donated_err)
    }

    /// Adds `nr` donated pages from `pfn` to the pool. The caller has taken
    /// them from the host and mapped them at `va(pa)`.
    pub fn donate(&mut self, pfn: u64, nr: u64) -> Result<(), MmError> {
        let table = self.donated.as_mut().ok_or(MmError::NoMemory)?;
        table.add(pfn, nr).map_err(donated_err)?;
        self.total_pages += nr as usize;
        self.free_pages += nr as usize;
        Ok(())
    }

    /// Takes `nr` free donated pages from `pfn` out of the pool (for the
    /// host to reclaim); refused if any is not donated or in use.
    pub fn reclaim_donated(&mut self, pfn: u64, nr: u64) -> Result<(), MmError> {
        if self.donated.is_none() {
            return Err(MmError::InvalidArgument);
        }
        // All or nothing, stashed pages being free ones.
        let end = pfn.checked_add(nr).ok_or(MmError::InvalidArgument)?;
        for p in pfn..end {
            match self.donated_in_use(p) {
                Some(false) => {}
                Some(true) => return Err(donated_err(DonatedError::InUse)),
                None => return Err(donated_err(DonatedError::NotDonated)),
            }
        }
        // Stashed pages of the range go back in the table first.
        let range = pfn << PAGE_SHIFT..end << PAGE_SHIFT;
        let mut i = 0;
        while i < self.stashed {
            let pa = self.stash[i].pa;
            if range.contains(&pa) {
                self.unstash(i);
                // SAFETY: a stashed page is a free page of this pool.
                unsafe { self.release(pa, 1) };
            } else {
                i += 1;
            }
        }
        let table = self.donated.as_mut().ok_or(MmError::InvalidArgument)?;
        table.remove(pfn, nr).map_err(donated_err)?;
        self.total_pages -= nr as usize;
        self.free_pages -= nr as usize;
        Ok(())
    }

    /// Returns one page to the pool.
    ///
    /// # Safety
    /// `pa` must come from `alloc_*` of this pool (one page, or `pages`
    /// pages for `free_contiguous`) and must not be used afterwards.
    pub unsafe fn free(&mut self, pa: u64) {
        // SAFETY: forwarded contract.
        unsafe { self.free_contiguous(pa, 1) }
    }

    /// Returns `pages` contiguous pages allocated together.
    ///
    /// # Safety
    /// As for [`free`](Self::free), with the same `pages` as the allocation.
    pub unsafe fn free_contiguous(&mut self, pa: u64, pages: usize) {
        // SAFETY: forwarded contract.
        if unsafe { self.release(pa, pages) } {
            self.free_pages += pages;
        }
    }

    /// Puts pages back in the donated table or the heap without counting
    /// them (a stashed page is counted free already); false if `pages` is
    /// not a valid allocation size.
    ///
    /// # Safety
    /// As for [`free_contiguous`](Self::free_contiguous).
    unsafe fn release(&mut self, pa: u64, pages: usize) -> bool {
        if pages == 1
            && self
                .donated
                .as_mut()
                .is_some_and(|d| d.give_back(pa >> PAGE_SHIFT))
        {
            return true;
        }
        let Ok(layout) = Self::layout(pages) else {
            return false;
        };
        let Some(ptr) = NonNull::new(self.va(pa)) else {
            return false;
        };
        self.heap.dealloc(ptr, layout);
        true
    }

    fn layout(pages: usize) -> Result<Layout, MmError> {
        Layout::from_size_align(pages * PAGE_SIZE, pages * PAGE_SIZE)
            .map_err(|_| MmError::InvalidArgument)
    }

    /// Pages ever given to the pool.
    pub fn total_pages(&self) -> usize {
        self.total_pages
    }

    /// Pages free for allocation now: all free pages while the reserve is
    /// open, else all but the reserve.
    pub fn free_pages(&self) -> usize {
        if self.reserve_open {
            self.free_pages
        } else {
            self.free_pages.saturating_sub(self.reserve)
        }
    }

    /// Every free page, the reserve included.
    pub fn all_free_pages(&self) -> usize {
        self.free_pages
    }

    /// Holds `pages` back from ordinary allocations.
    pub fn set_reserve(&mut self, pages: usize) {
        self.reserve = pages;
    }

    /// Lets allocations use the reserve (`true`) or not.
    pub fn open_reserve(&mut self, open: bool) {
        self.reserve_open = open;
    }

    /// Where the pool's page at `pa` can be accessed.
    pub fn va(&self, pa: u64) -> *mut u8 {
        (pa as usize).wrapping_add(self.va_offset) as *mut u8
    }

    /// This pool's identity (distinct for every pool created).
    pub fn id(&self) -> u32 {
        self.id
    }
}

fn donated_err(e: DonatedError) -> MmError {
    match e {
        DonatedError::NotCovered => MmError::OutOfRange,
        DonatedError::NotDonated | DonatedError::AlreadyDonated | DonatedError::InUse => {
            MmError::InvalidArgument
        }
    }
}

impl core::fmt::Debug for PagePool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PagePool")
            .field("id", &self.id)
            .field("total_pages", &self.total_pages)
            .field("free_pages", &self.free_pages)
            .field("stashed", &self.stashed)
            .finish()
    }
}
