//! The host's memory calls (HOST_SHARE_HYP, HOST_UNSHARE_HYP,
//! HOST_DONATE_HYP, HOST_RECLAIM, MEM_STATE) applied to the host stage 2,
//! the hypervisor's stage 1 and the pool, with the ownership rules of
//! [`keel_mm::owner`].
//!
//! Every call has the same shape: validate the arguments; read each page's
//! state and check the transition over the whole range; work out every
//! table page the change needs and refuse with NO_MEMORY if the pool cannot
//! supply them all; only then commit, in an order in which nothing can fail.
//! So a refused call leaves every page, mapping and counter as it was.
//!
//! Where the state of a page lives:
//! - host stage-2 leaf, mapped: its software bits (OWNED, SHARED_OWNED,
//!   SHARED_BORROWED); an OWNED page the hypervisor's stage 1 maps is
//!   shared with the hypervisor; a SHARED_OWNED or SHARED_BORROWED one is
//!   shared with the VM the shared-page table (`lent`) names;
//! - host stage-2 entry, unmapped: its annotation — [`ANN_HYP_PRIVATE`],
//!   [`ANN_HYP_DONATED`] (free or in use: the pool's donated-page table
//!   says), or the owning VM's handle.

use keel_mm::owner::{self, Owner, Page, Refusal, Request, View};
use keel_mm::stage1::{Perm, S1Error, Stage1, VA_LIMIT};
use keel_mm::stage2::Change;
use keel_mm::{
    Annotation, Leaf, LeafKind, MmError, PagePool, PageState, S2Attrs, Stage2, TlbMaintenance,
};

pub const PAGE: u64 = 4096;

/// Host stage-2 annotation of the hypervisor's image, stacks and boot pool.
pub const ANN_HYP_PRIVATE: Annotation = Annotation(1);
/// Host stage-2 annotation of pages donated to the hypervisor.
pub const ANN_HYP_DONATED: Annotation = Annotation(2);
/// Host stage-2 annotation of a VM's pages is its handle.
pub const VM_HANDLE_BASE: u32 = keel_abi::VM_HANDLE_BASE as u32;

/// Why a call is refused; maps one to one onto the ABI statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    NotSupported,
    Invalid,
    Denied,
    NoMemory,
    Busy,
}

impl CallError {
    pub fn status(self) -> i64 {
        use keel_abi::status::*;
        match self {
            CallError::NotSupported => NOT_SUPPORTED,
            CallError::Invalid => INVALID_PARAMETER,
            CallError::Denied => DENIED,
            CallError::NoMemory => NO_MEMORY,
            CallError::Busy => BUSY,
        }
    }
}

impl From<Refusal> for CallError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Denied => CallError::Denied,
            Refusal::Busy => CallError::Busy,
        }
    }
}

/// A [start, end) physical range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, end: u64) -> Self {
        Range { start, end }
    }
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

pub const MAX_RAM_REGIONS: usize = 8;

/// The RAM regions of the machine, sorted and disjoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ram {
    regions: [Range; MAX_RAM_REGIONS],
    len: usize,
}

impl Ram {
    /// Up to MAX_RAM_REGIONS regions; extra ones are ignored.
    pub fn new(regions: &[Range]) -> Self {
        let mut ram = Ram::default();
        for r in regions
            .iter()
            .filter(|r| !r.is_empty())
            .take(MAX_RAM_REGIONS)
        {
            ram.regions[ram.len] = *r;
            ram.len += 1;
        }
        ram.regions[..ram.len].sort_unstable_by_key(|r| r.start);
        ram
    }
    pub fn regions(&self) -> &[Range] {
        &self.regions[..self.len]
    }
    /// Whether [start, end) lies inside one region.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        self.regions()
            .iter()
            .any(|r| r.start <= start && end <= r.end)
    }
}

/// What the hypervisor needs from the architecture for its own stage 1.
pub trait HypMmu {
    /// Invalidates the hypervisor's TLB entries for [va, va + len).
    fn invalidate_range(&mut self, va: u64, len: u64);
    /// Cleans and invalidates [va, va + len) to the point of coherency.
    fn flush_dcache(&mut self, va: u64, len: u64);
    /// Zeroes and flushes the RAM page at `pa`, which the hypervisor's stage
    /// 1 does not map (a guest's page), through a temporary mapping.
    fn zero_page(&mut self, pool: &PagePool, pa: u64);
    /// Zeroes [va, va + len) and cleans it to the point of coherency (the
    /// hypervisor uses a faster zeroing instruction than these stores).
    ///
    /// # Safety
    /// The range must be mapped writable, as Normal memory, at `va` in the
    /// hypervisor's stage 1, and be the caller's to overwrite.
    unsafe fn clear(&mut self, va: u64, len: u64) {
        // SAFETY: forwarded contract.
        unsafe { core::ptr::write_bytes(va as *mut u8, 0, len as usize) };
        self.flush_dcache(va, len);
    }
}

/// The memory the hypervisor manages, behind one lock.
pub struct Memory<T: TlbMaintenance, M: HypMmu> {
    pub ram: Ram,
    pub host: Stage2<T>,
    pub hyp: Stage1,
    pub pool: PagePool,
    pub mmu: M,
}

/// A host call's range as a byte range, if valid (ABI: nr > 0, no
/// overflow, inside one RAM region).
pub fn pfn_range(ram: &Ram, pfn: u64, nr: u64) -> Result<Range, CallError> {
    if nr == 0 {
        return Err(CallError::Invalid);
    }
    let start = pfn.checked_mul(PAGE).ok_or(CallError::Invalid)?;
    let len = nr.checked_mul(PAGE).ok_or(CallError::Invalid)?;
    let end = start.checked_add(len).ok_or(CallError::Invalid)?;
    if !ram.contains(start, end) {
        return Err(CallError::Invalid);
    }
    Ok(Range::new(start, end))
}

fn mm_err(e: MmError) -> CallError {
    match e {
        MmError::NoMemory => CallError::NoMemory,
        _ => CallError::Invalid,
    }
}

fn s1_err(e: S1Error) -> CallError {
    match e {
        S1Error::NoMemory => CallError::NoMemory,
        _ => CallError::Invalid,
    }
}

/// What the memory code needs to know about guests (the VM table).
pub trait Guests {
    /// Whether VM slot `vm` holds a live VM (else its pages are dead).
    fn is_live(&self, vm: u16) -> bool;
    /// The VM that shares the page `pfn` with the host, and whether the
    /// host holds a pin on it.
    fn lender(&self, pfn: u64) -> Option<(u16, bool)>;
    /// The VM the host shares its page `pfn` with.
    fn borrower(&self, pfn: u64) -> Option<u16>;
    /// Table pages of all VMs' stage 2s, roots included.
    fn table_pages(&self) -> u64;
    /// The first page of [pfn, pfn + nr) that no VM shares with the host
    /// (no [`lender`](Self::lender)), if any.
    fn first_not_lent(&self, pfn: u64, nr: u64) -> Option<u64> {
        (pfn..pfn.saturating_add(nr)).find(|&p| self.lender(p).is_none())
    }
    /// The first page of [pfn, pfn + nr) that the host shares with no VM
    /// (no [`borrower`](Self::borrower)), if any.
    fn first_not_borrowed(&self, pfn: u64, nr: u64) -> Option<u64> {
        (pfn..pfn.saturating_add(nr)).find(|&p| self.borrower(p).is_none())
    }
    /// How many pages are recorded as shared: (guests' pages the host
    /// borrows, host pages guests borrow), if the implementation counts
    /// them. Each must match a host page shared that way (the invariant
    /// checker counts those as it walks): an extra record is a stray.
    fn lent_counts(&self) -> Option<(u64, u64)> {
        None
    }
    /// The first page recorded as shared whose record the host stage 2
    /// (`host_state`: the state of the host's mapping of a page, None if
    /// unmapped) or the VM table contradicts: a free slot on the other
    /// side, a guest's page the host does not map SHARED_BORROWED, a host
    /// page it does not map SHARED_OWNED, pins on a host page. A scan of
    /// every record: only once the counts say one is stray.
    fn first_stray_record(&self, _host_state: &dyn Fn(u64) -> Option<PageState>) -> Option<u64> {
        None
    }
}

/// No VMs at all.
pub struct NoGuests;

impl Guests for NoGuests {
    fn is_live(&self, _: u16) -> bool {
        false
    }
    fn lender(&self, _: u64) -> Option<(u16, bool)> {
        None
    }
    fn borrower(&self, _: u64) -> Option<u16> {
        None
    }
    fn table_pages(&self) -> u64 {
        0
    }
}

/// An inconsistency the invariant checker found, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    pub what: &'static str,
    pub addr: u64,
}

fn violation(what: &'static str, addr: u64) -> Result<(), Violation> {
    Err(Violation { what, addr })
}

fn vm_of(a: Annotation) -> Option<u16> {
    let h = a.0.checked_sub(VM_HANDLE_BASE)?;
    u16::try_from(h).ok()
}

impl<T: TlbMaintenance, M: HypMmu> Memory<T, M> {
    /// The state of the RAM page at `pa`, read back from where it lives.
    pub fn page(&self, pa: u64, g: &dyn Guests) -> Page {
        match self.host.lookup(&self.pool, pa) {
            Ok(leaf) => self.page_in(leaf.kind, pa, g),
            Err(_) => Page::HypPrivate,
        }
    }

    /// The state of the RAM page at `pa`, whose host stage-2 leaf is of
    /// kind `kind`.
    #[inline(always)]
    pub fn page_in(&self, kind: LeafKind, pa: u64, g: &dyn Guests) -> Page {
        match kind {
            LeafKind::Mapped {
                state: PageState::Owned,
                ..
            } => {
                if self.hyp.translate(pa, &self.pool).is_some() {
                    Page::SharedWithHyp
                } else {
                    Page::HostOwned
                }
            }
            LeafKind::Mapped {
                state: PageState::SharedOwned,
                ..
            } => match g.borrower(pa / PAGE) {
                Some(vm) if g.is_live(vm) => Page::SharedWithGuest(vm),
                Some(vm) => Page::LentToDead(vm),
                None => Page::HypPrivate,
            },
            LeafKind::Mapped {
                state: PageState::SharedBorrowed,
                ..
            } => match g.lender(pa / PAGE) {
                Some((vm, pinned)) if g.is_live(vm) => Page::GuestShared { vm, pinned },
                Some((vm, pinned)) => Page::DeadShared { vm, pinned },
                None => Page::HypPrivate,
            },
            LeafKind::Unmapped(ANN_HYP_DONATED) => Page::HypDonated {
                in_use: self.pool.donated_in_use(pa / PAGE).unwrap_or(true),
            },
            LeafKind::Unmapped(a) => match vm_of(a) {
                Some(vm) if g.is_live(vm) => Page::GuestOwned(vm),
                Some(vm) => Page::Dead(vm),
                None => Page::HypPrivate,
            },
        }
    }

    /// Calls `f(start, end, page)` for consecutive runs of `range` whose
    /// pages are all in one state: whole leaves where the state is uniform
    /// across the leaf, single pages where it is kept per page.
    pub fn runs(
        &self,
        range: Range,
        g: &dyn Guests,
        f: &mut dyn FnMut(u64, u64, Page) -> Result<(), CallError>,
    ) -> Result<(), CallError> {
        let mut pa = range.start;
        while pa < range.end {
            let leaf = self.host.lookup(&self.pool, pa).map_err(mm_err)?;
            let leaf_end = (leaf.ipa + leaf.size).min(range.end);
            let end = match leaf.kind {
                LeafKind::Mapped {
                    state: PageState::Owned,
                    ..
                } => match self.hyp.first_mapped(pa, leaf_end - pa, &self.pool) {
                    None => leaf_end,
                    Some(m) if m > pa => m,
                    Some(_) => pa + PAGE,
                },
                LeafKind::Unmapped(a) if a != ANN_HYP_DONATED => leaf_end,
                _ => pa + PAGE,
            };
            f(pa, end, self.page(pa, g))?;
            pa = end;
        }
        Ok(())
    }

    /// Checks `req` for every page of `range`; the first refusal wins.
    pub fn check(&self, range: Range, req: Request, g: &dyn Guests) -> Result<(), CallError> {
        self.runs(range, g, &mut |_, _, page| {
            owner::transition(page, req)
                .map(drop)
                .map_err(CallError::from)
        })
    }

    fn need(&self, range: Range, change: Change) -> Result<usize, CallError> {
        self.host
            .pages_needed(&self.pool, range.start, range.len(), change)
            .map_err(mm_err)
    }

    fn ensure_pages(&self, pages: usize) -> Result<(), CallError> {
        if self.pool.free_pages() < pages {
            return Err(CallError::NoMemory);
        }
        Ok(())
    }

    /// HOST_SHARE_HYP: the hypervisor maps the pages in its stage 1; the
    /// host stage 2 is untouched (the host keeps its block mappings).
    pub fn host_share_hyp(&mut self, pfn: u64, nr: u64, g: &dyn Guests) -> Result<(), CallError> {
        let range = pfn_range(&self.ram, pfn, nr)?;
        self.check(range, Request::HostShareHyp, g)?;
        self.ensure_pages(self.hyp.pages_needed(range.start, range.len(), &self.pool))?;
        self.hyp
            .map_pages(
                range.start,
                range.start,
                range.len(),
                Perm::ReadWrite,
                &mut self.pool,
            )
            .map_err(s1_err)
    }

    /// HOST_UNSHARE_HYP.
    pub fn host_unshare_hyp(&mut self, pfn: u64, nr: u64, g: &dyn Guests) -> Result<(), CallError> {
        let range = pfn_range(&self.ram, pfn, nr)?;
        self.check(range, Request::HostUnshareHyp, g)?;
        self.hyp
            .unmap(range.start, range.len(), &mut self.pool)
            .map_err(s1_err)?;
        self.mmu.invalidate_range(range.start, range.len());
        Ok(())
    }

    /// HOST_DONATE_HYP: the pages leave the host and join the pool.
    pub fn host_donate_hyp(&mut self, pfn: u64, nr: u64, g: &dyn Guests) -> Result<(), CallError> {
        let range = pfn_range(&self.ram, pfn, nr)?;
        self.check(range, Request::HostDonateHyp, g)?;
        self.pool.check_donate(pfn, nr).map_err(mm_err)?;
        // Donation is how the host refills an empty pool, so it may use the
        // pool's reserve for its own tables: it never gets stuck.
        self.pool.open_reserve(true);
        let r = self.donate_range(range, pfn, nr);
        self.pool.open_reserve(false);
        r
    }

    fn donate_range(&mut self, range: Range, pfn: u64, nr: u64) -> Result<(), CallError> {
        // Whole 2 MiB blocks are mapped as blocks in the hypervisor's stage 1
        // (no table), the ragged ends as pages.
        let s1 = self
            .hyp
            .pages_needed_blocks(range.start, range.len(), &self.pool);
        self.ensure_pages(self.need(range, Change::Unmap(ANN_HYP_DONATED))? + s1)?;
        self.host
            .unmap(&mut self.pool, range.start, range.len(), ANN_HYP_DONATED)
            .map_err(mm_err)?;
        self.hyp
            .map(
                range.start,
                range.start,
                range.len(),
                Perm::ReadWrite,
                &mut self.pool,
            )
            .map_err(s1_err)?;
        self.pool.donate(pfn, nr).map_err(mm_err)
    }

    /// Whether the hypervisor maps `pa` with a 2 MiB block that extends
    /// beyond `range` (so unmapping part of it needs a split first).
    fn block_sticks_out(&self, pa: u64, range: Range) -> bool {
        const BLOCK: u64 = 2 << 20;
        match self.hyp.leaf(pa, &self.pool) {
            Some((_, size)) if size == BLOCK => {
                let start = pa & !(BLOCK - 1);
                start < range.start || start + BLOCK > range.end
            }
            _ => false,
        }
    }

    /// HOST_RECLAIM: free donated pages and pages of dead VMs go back to
    /// the host, zeroed and flushed first. `zero` clears a page that is not
    /// in the hypervisor's stage 1 (a dead guest's).
    pub fn host_reclaim(
        &mut self,
        pfn: u64,
        nr: u64,
        g: &dyn Guests,
        zero: &mut dyn FnMut(&mut Self, u64),
    ) -> Result<(), CallError> {
        let range = pfn_range(&self.ram, pfn, nr)?;
        self.check(range, Request::HostReclaim, g)?;
        let change = Change::Map {
            ipa: range.start,
            pa: range.start,
            attrs: S2Attrs::NORMAL_RWX,
            state: PageState::Owned,
        };
        // Donated pages leave the pool before the host mapping is built, so
        // they do not count as available for its tables; a block of the
        // hypervisor's stage 1 that the range cuts needs a table to split.
        let donated = (pfn..pfn + nr)
            .filter(|&p| self.pool.donated_in_use(p) == Some(false))
            .count();
        let is_donated = |m: &Self, pa: u64| m.pool.donated_in_use(pa / PAGE) == Some(false);
        let splits = [range.start, range.end - PAGE]
            .iter()
            .filter(|&&pa| is_donated(self, pa) && self.block_sticks_out(pa, range))
            .count();
        let splits = if splits == 2 && (range.start >> 21) == ((range.end - PAGE) >> 21) {
            1
        } else {
            splits
        };
        self.ensure_pages(self.need(range, change)? + donated + splits)?;
        // First every donated page of the range leaves the pool: the stage-1
        // tables the splits below allocate must not be pages the host is
        // about to get back.
        let mut pa = range.start;
        while pa < range.end {
            if !is_donated(self, pa) {
                pa += PAGE;
                continue;
            }
            let mut end = pa;
            while end < range.end && is_donated(self, end) {
                end += PAGE;
            }
            // One removal for the run (the table shifts once, not per page).
            self.pool
                .reclaim_donated(pa / PAGE, (end - pa) / PAGE)
                .map_err(mm_err)?;
            pa = end;
        }
        // Then the pages that were donated, which are the range's pages
        // mapped in the hypervisor's stage 1 (a guest's never are), are
        // cleared while still mapped and unmapped (splitting blocks the
        // range cuts); the others (a dead guest's) are cleared by `zero`.
        let mut pa = range.start;
        while pa < range.end {
            let run = self.hyp_mapped_run(pa, range.end);
            let zero_end = run.map_or(range.end, |r| r.start);
            while pa < zero_end {
                zero(self, pa);
                pa += PAGE;
            }
            let Some(run) = run else {
                break;
            };
            for page in (run.start..run.end).step_by(PAGE as usize) {
                // SAFETY: a donated page that was free and has left the
                // pool: ours alone, and mapped writable (Normal) at pool.va
                // in the hypervisor's stage 1 until just below.
                unsafe { self.mmu.clear(self.pool.va(page) as u64, PAGE) };
            }
            for edge in [run.start, run.end - PAGE] {
                if self.block_sticks_out(edge, run) {
                    let mmu = &mut self.mmu;
                    self.hyp
                        .split_block(edge, &mut self.pool, &mut |va| {
                            mmu.invalidate_range(va, 2 << 20)
                        })
                        .map_err(s1_err)?;
                }
            }
            self.hyp
                .unmap(run.start, run.len(), &mut self.pool)
                .map_err(s1_err)?;
            self.mmu.invalidate_range(run.start, run.len());
            pa = run.end;
        }
        self.host
            .map(
                &mut self.pool,
                range.start,
                range.len(),
                range.start,
                S2Attrs::NORMAL_RWX,
                PageState::Owned,
            )
            .map_err(mm_err)
    }

    /// The first run of pages of `[from, end)` mapped in the hypervisor's
    /// stage 1.
    fn hyp_mapped_run(&self, from: u64, end: u64) -> Option<Range> {
        let mut leaves = self
            .hyp
            .leaves(from, end - from, &self.pool)
            .map(|(va, size, _)| Range::new(va.max(from), (va + size).min(end)));
        let mut run = leaves.next()?;
        for leaf in leaves {
            if leaf.start != run.end {
                break;
            }
            run = Range::new(run.start, leaf.end);
        }
        Some(run)
    }

    /// MEM_STATE: (owner code, host view, host mapping size).
    pub fn mem_state(&self, pfn: u64, g: &dyn Guests) -> Result<(u64, u64, u64), CallError> {
        let range = pfn_range(&self.ram, pfn, 1)?;
        let page = self.page(range.start, g);
        let owner = match page.owner() {
            Owner::Host => keel_abi::owner::HOST,
            Owner::Hyp => keel_abi::owner::HYP,
            Owner::Vm(vm) => keel_abi::VM_HANDLE_BASE + u64::from(vm),
        };
        let size = match self.host.lookup(&self.pool, range.start) {
            Ok(leaf) if matches!(leaf.kind, LeafKind::Mapped { .. }) => leaf.size,
            _ => 0,
        };
        let view: View = page.host_view();
        Ok((owner, view as u64, size))
    }

    /// Table pages in use: host stage 2 and the hypervisor's stage 1.
    pub fn table_pages(&self) -> u64 {
        let s = self.host.stats();
        (s.root_pages + s.table_pages) as u64 + self.hyp.table_pages() as u64
    }

    /// Checks that the tables, the pool and the VM table agree:
    /// - every host stage-2 mapping of RAM is an identity, normal-memory
    ///   mapping of a page the host owns or borrows from a live or dead VM;
    /// - every unmapped RAM page records an owner (hypervisor or a VM);
    /// - every RAM page the hypervisor maps is its own or shared with it by
    ///   the host, never a page the host maps as a guest's or shares with a
    ///   guest (no page has two owners);
    /// - the donated-page table and the host stage 2 name the same pages;
    /// - pool pages = free pages + table pages.
    ///
    /// One walk of the host stage 2 per RAM region, by runs of leaves one
    /// leaf could describe, with the hypervisor's stage-1 leaves and the
    /// donated pages (by runs of consecutive pfns) walked alongside; shared
    /// runs are checked against the shared-page table by runs. So the cost
    /// grows with the number of leaves, table entries and table records,
    /// not with the number of pages they cover. The violation reported, and
    /// where, is the one a page-by-page walk would report: per region the
    /// host stage 2's first, then the first page the hypervisor maps wrongly;
    /// then the first bad donated page.
    pub fn check_invariants(&self, g: &dyn Guests) -> Result<(), Violation> {
        let mut donated_host = None;
        let mut shared = (0, 0);
        for region in self.ram.regions() {
            let walk = self.check_region(*region, g);
            walk.host?;
            walk.hyp?;
            donated_host = donated_host.or(walk.donated_host);
            shared = (shared.0 + walk.shared.0, shared.1 + walk.shared.1);
        }
        let elsewhere = self.donated_host_elsewhere();
        let host_bad = match (donated_host, elsewhere) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match (host_bad, self.donated_unmapped()) {
            (Some(h), u) if u.is_none_or(|u| h <= u) => violation(
                "donated page not recorded as donated in the host stage 2",
                h,
            )?,
            (_, Some(u)) => violation("donated page not mapped by the hypervisor", u)?,
            _ => {}
        }
        // Every host page shared either way has its record (the walk
        // checked): as many records as such pages means no other record.
        if let Some(counts) = g.lent_counts().filter(|&c| c != shared) {
            if counts.0 < shared.0 || counts.1 < shared.1 {
                // Pages the walk could not check page by page (a region
                // partly beyond the host's IPA space).
                return violation("host pages shared without a shared-page record", 0);
            }
            let host_state =
                |pfn: u64| match self.host.lookup(&self.pool, pfn * PAGE).map(|l| l.kind) {
                    Ok(LeafKind::Mapped { state, .. }) => Some(state),
                    _ => None,
                };
            let at = g
                .first_stray_record(&host_state)
                .map_or(0, |pfn| pfn * PAGE);
            return violation(
                "shared-page record with no such sharing in the host stage 2 or the VM table",
                at,
            );
        }
        let tables = self.table_pages() + g.table_pages();
        if self.pool.total_pages() as u64 != self.pool.all_free_pages() as u64 + tables {
            return violation(
                "pool pages != free pages + table pages",
                self.pool.total_pages() as u64,
            );
        }
        Ok(())
    }

    /// The part of `region` the host stage 2 can describe.
    fn host_span(&self, region: Range) -> Range {
        Range::new(
            region.start,
            region.end.min(self.host.geometry().ipa_size()),
        )
    }

    /// Walks the host stage 2 over `region` with the hypervisor's leaves and
    /// the donated pages alongside.
    fn check_region(&self, region: Range, g: &dyn Guests) -> RegionWalk {
        let mut walk = RegionWalk {
            host: Ok(()),
            hyp: Ok(()),
            donated_host: None,
            shared: (0, 0),
        };
        // Pages beyond the host stage 2's IPA space have no host entry: the
        // hypervisor's (Page::HypPrivate); a region that reaches there is
        // not walked for the host check (the host stage 2 cannot map it).
        let span = self.host_span(region);
        if span.is_empty() {
            return walk;
        }
        let whole = span == region;
        let mut hyp = self
            .hyp
            .leaves(span.start, span.len(), &self.pool)
            .map(|(va, size, _)| Range::new(va.max(span.start), (va + size).min(span.end)))
            .peekable();
        let mut donated = self
            .pool
            .donated_runs()
            .map(|(pfn, nr)| Range::new(pfn * PAGE, (pfn + nr) * PAGE))
            .peekable();
        let mut host_bad = None;
        let mut hyp_bad = None;
        let _ = self
            .host
            .visit_runs(&self.pool, span.start, span.len(), &mut |run| {
                if whole && host_bad.is_none() {
                    host_bad = host_run_violation(run, g);
                }
                let here = Range::new(run.ipa.max(span.start), (run.ipa + run.size).min(span.end));
                match run.kind {
                    LeafKind::Mapped {
                        state: PageState::SharedBorrowed,
                        ..
                    } => walk.shared.0 += here.len() / PAGE,
                    LeafKind::Mapped {
                        state: PageState::SharedOwned,
                        ..
                    } => walk.shared.1 += here.len() / PAGE,
                    _ => {}
                }
                while hyp_bad.is_none() {
                    let Some(&h) = hyp.peek() else { break };
                    if h.start >= here.end {
                        break;
                    }
                    let both = Range::new(h.start.max(here.start), h.end.min(here.end));
                    if !both.is_empty() {
                        hyp_bad = self.hyp_mapped_violation(run.kind, both);
                    }
                    if h.end > here.end {
                        break;
                    }
                    hyp.next();
                }
                while walk.donated_host.is_none() {
                    let Some(&d) = donated.peek() else { break };
                    if d.start >= here.end {
                        break;
                    }
                    let both = Range::new(d.start.max(here.start), d.end.min(here.end));
                    if !both.is_empty() && run.kind != LeafKind::Unmapped(ANN_HYP_DONATED) {
                        walk.donated_host = Some(both.start);
                    }
                    if d.end > here.end {
                        break;
                    }
                    donated.next();
                }
            });
        if let Some(v) = host_bad {
            walk.host = Err(v);
        }
        if let Some(addr) = hyp_bad {
            walk.hyp = violation(
                "the hypervisor maps a page it neither owns nor borrows",
                addr,
            );
        }
        walk
    }

    /// The first page of `pages`, all mapped by the hypervisor and all in
    /// one host stage-2 run of kind `kind`, that is neither its own
    /// (private, or donated and in the donated-page table) nor shared with
    /// it by the host (host-owned and mapped), as [`Self::page`] would say.
    fn hyp_mapped_violation(&self, kind: LeafKind, pages: Range) -> Option<u64> {
        match kind {
            LeafKind::Mapped {
                state: PageState::Owned,
                ..
            } => None,
            // Shared with a guest or lent to a dead one: every page of the
            // run has a guest on the other side, or the host check of the
            // region (reported first) failed.
            LeafKind::Mapped { .. } => Some(pages.start),
            LeafKind::Unmapped(ANN_HYP_DONATED) => self
                .pool
                .first_not_donated(pages.start / PAGE, pages.len() / PAGE)
                .map(|p| p * PAGE),
            LeafKind::Unmapped(a) => vm_of(a).map(|_| pages.start),
        }
    }

    /// The first donated page outside the parts of RAM `check_region` walks
    /// that the host stage 2 does not record as donated (none, unless the
    /// donated-page table is corrupt).
    fn donated_host_elsewhere(&self) -> Option<u64> {
        let limit = self.host.geometry().ipa_size();
        for (pfn, nr) in self.pool.donated_runs() {
            let run = Range::new(pfn * PAGE, (pfn + nr) * PAGE);
            let mut p = run.start;
            while p < run.end {
                let spans = self.ram.regions().iter().map(|r| self.host_span(*r));
                if let Some(s) = spans.clone().find(|s| s.start <= p && p < s.end) {
                    p = s.end;
                    continue;
                }
                let next = spans.filter(|s| s.start > p).map(|s| s.start).min();
                let piece = Range::new(p, next.unwrap_or(run.end).min(run.end));
                if piece.start >= limit {
                    return Some(piece.start);
                }
                let mut bad = None;
                let len = piece.end.min(limit) - piece.start;
                let _ = self
                    .host
                    .visit_runs(&self.pool, piece.start, len, &mut |leaf| {
                        if bad.is_none() && leaf.kind != LeafKind::Unmapped(ANN_HYP_DONATED) {
                            bad = Some(leaf.ipa.max(piece.start));
                        }
                    });
                if let Some(b) = bad.or((piece.end > limit).then_some(limit)) {
                    return Some(b);
                }
                p = piece.end;
            }
        }
        None
    }

    /// The first donated page the hypervisor does not map: the donated runs
    /// and the hypervisor's leaves, walked together.
    fn donated_unmapped(&self) -> Option<u64> {
        let mut runs = self.pool.donated_runs().peekable();
        let first = runs.peek()?.0 * PAGE;
        let mut leaves = self.hyp.leaves(first, VA_LIMIT - first, &self.pool);
        let mut leaf = leaves.next();
        for (pfn, nr) in runs {
            let (mut p, end) = (pfn * PAGE, (pfn + nr) * PAGE);
            while p < end {
                while let Some((va, size, _)) = leaf {
                    if va + size > p {
                        break;
                    }
                    leaf = leaves.next();
                }
                match leaf {
                    Some((va, size, _)) if va <= p => p = va + size,
                    _ => return Some(p),
                }
            }
        }
        None
    }
}

/// What [`Memory::check_region`] found.
struct RegionWalk {
    /// The host stage 2's first violation.
    host: Result<(), Violation>,
    /// The first page the hypervisor maps but should not.
    hyp: Result<(), Violation>,
    /// The first donated page the host stage 2 does not record as donated.
    donated_host: Option<u64>,
    /// Host pages shared by guests, and shared with guests.
    shared: (u64, u64),
}

/// A host stage-2 run's violation: an identity, normal-memory mapping;
/// shared pages with a guest on the other side (the shared-page table, by
/// runs); unmapped pages with an owner.
fn host_run_violation(run: &Leaf, g: &dyn Guests) -> Option<Violation> {
    let at = |what, addr| Some(Violation { what, addr });
    match run.kind {
        LeafKind::Mapped { pa, attrs, state } => {
            let (first, nr) = (run.ipa / PAGE, run.size / PAGE);
            if pa != run.ipa {
                return at("host mapping is not an identity", run.ipa);
            }
            if attrs != S2Attrs::NORMAL_RWX {
                return at("host RAM mapped with wrong attributes", run.ipa);
            }
            let unshared = match state {
                PageState::SharedBorrowed => g.first_not_lent(first, nr),
                PageState::SharedOwned => g.first_not_borrowed(first, nr),
                PageState::Owned => None,
            };
            at(
                "host page shared, but no guest on the other side",
                unshared? * PAGE,
            )
        }
        LeafKind::Unmapped(a) => {
            if a != ANN_HYP_PRIVATE && a != ANN_HYP_DONATED && vm_of(a).is_none() {
                return at("unmapped RAM without an owner", run.ipa);
            }
            None
        }
    }
}
