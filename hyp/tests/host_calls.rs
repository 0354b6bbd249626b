//! The host's memory calls on a simulated machine: 64 MiB of RAM at
//! 0x4000_0000 backed by host memory, the hypervisor's image and boot pool
//! at 0x4020_0000..0x4030_0000, real page tables built by keel-mm.

use std::alloc::{alloc_zeroed, dealloc, Layout};

use keel_abi::PageState as AbiState;
use keel_hyp::mem::{
    CallError, Guests, HypMmu, Memory, NoGuests, Ram, Range, Violation, ANN_HYP_DONATED,
    ANN_HYP_PRIVATE, PAGE, VM_HANDLE_BASE,
};
use keel_mm::donated::DonatedPages;
use keel_mm::frames::RamFrames;
use keel_mm::owner::Page;
use keel_mm::stage1::{Perm, Stage1};
use keel_mm::{Annotation, Geometry, LeafKind, NoTlb, PagePool, PageState, S2Attrs, Stage2};

const RAM_BASE: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 64 << 20;
const HYP: Range = Range::new(0x4020_0000, 0x4030_0000);
const POOL: Range = Range::new(0x4024_0000, 0x4030_0000);
const MIB2: u64 = 2 << 20;

#[derive(Default)]
struct FakeMmu {
    invalidated: Vec<(u64, u64)>,
    flushed: Vec<(u64, u64)>,
}

impl HypMmu for FakeMmu {
    fn invalidate_range(&mut self, va: u64, len: u64) {
        self.invalidated.push((va, len));
    }
    fn flush_dcache(&mut self, va: u64, len: u64) {
        self.flushed.push((va, len));
    }
    fn zero_page(&mut self, pool: &PagePool, pa: u64) {
        // SAFETY: the test machine's RAM is all reachable at pool.va.
        unsafe { std::ptr::write_bytes(pool.va(pa), 0, PAGE as usize) };
        self.flushed.push((pa, PAGE));
    }
}

struct Machine {
    mem: Memory<NoTlb, FakeMmu>,
    backing: *mut u8,
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.backing, layout()) };
    }
}

fn layout() -> Layout {
    Layout::from_size_align(RAM_SIZE as usize, MIB2 as usize).unwrap()
}

impl Machine {
    fn new() -> Self {
        // SAFETY: a non-zero-sized layout.
        let backing = unsafe { alloc_zeroed(layout()) };
        assert!(!backing.is_null());
        let va_offset = (backing as usize).wrapping_sub(RAM_BASE as usize);
        let mut pool = PagePool::new(va_offset).unwrap();
        // SAFETY: the pool range is part of the backing, used by nothing else.
        unsafe { pool.add_range(POOL.start, POOL.len() as usize).unwrap() };
        let donated = Box::leak(Box::new(DonatedPages::new()));
        let pages = RAM_SIZE / PAGE;
        donated.attach(
            RamFrames::one(RAM_BASE / PAGE, pages),
            vec![0u64; DonatedPages::words_for(pages)].leak(),
        );
        pool.attach_donated(donated);
        let mut hyp = Stage1::new(&mut pool).unwrap();
        hyp.map(HYP.start, HYP.start, HYP.len(), Perm::ReadWrite, &mut pool)
            .unwrap();
        let mut host = Stage2::new(Geometry::new(40).unwrap(), 0, &mut pool, NoTlb).unwrap();
        host.map(
            &mut pool,
            RAM_BASE,
            RAM_SIZE,
            RAM_BASE,
            S2Attrs::NORMAL_RWX,
            PageState::Owned,
        )
        .unwrap();
        host.unmap(&mut pool, HYP.start, HYP.len(), ANN_HYP_PRIVATE)
            .unwrap();
        let ram = Ram::new(&[Range::new(RAM_BASE, RAM_BASE + RAM_SIZE)]);
        let m = Machine {
            mem: Memory {
                ram,
                host,
                hyp,
                pool,
                mmu: FakeMmu::default(),
            },
            backing,
        };
        m.check();
        m
    }

    fn check(&self) {
        self.mem.check_invariants(&NoGuests).expect("invariants");
    }

    /// (owner, host state, host mapping size)
    fn state(&self, pa: u64) -> (u64, u64, u64) {
        self.mem.mem_state(pa / PAGE, &NoGuests).unwrap()
    }

    fn bytes(&mut self, pa: u64) -> &mut [u8] {
        let off = (pa - RAM_BASE) as usize;
        // SAFETY: inside the backing; tests use it as the machine's RAM.
        unsafe { std::slice::from_raw_parts_mut(self.backing.add(off), PAGE as usize) }
    }

    fn share(&mut self, pa: u64, nr: u64) -> Result<(), CallError> {
        let r = self.mem.host_share_hyp(pa / PAGE, nr, &NoGuests);
        self.check();
        r
    }
    fn unshare(&mut self, pa: u64, nr: u64) -> Result<(), CallError> {
        let r = self.mem.host_unshare_hyp(pa / PAGE, nr, &NoGuests);
        self.check();
        r
    }
    fn donate(&mut self, pa: u64, nr: u64) -> Result<(), CallError> {
        let r = self.mem.host_donate_hyp(pa / PAGE, nr, &NoGuests);
        self.check();
        r
    }
    fn reclaim(&mut self, pa: u64, nr: u64) -> Result<(), CallError> {
        let r = self
            .mem
            .host_reclaim(pa / PAGE, nr, &NoGuests, &mut |_, pa| {
                panic!("no guest pages here ({pa:#x})")
            });
        self.check();
        r
    }

    /// Everything a failed call must leave as it was.
    fn snapshot(&self) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<_> = (RAM_BASE..RAM_BASE + RAM_SIZE)
            .step_by(PAGE as usize)
            .map(|pa| self.state(pa))
            .collect();
        v.push((
            self.mem.pool.free_pages() as u64,
            self.mem.table_pages(),
            self.mem.pool.total_pages() as u64,
        ));
        v
    }
}

const OWNED: u64 = AbiState::Owned as u64;
const SHARED_OWNED: u64 = AbiState::SharedOwned as u64;
const NOPAGE: u64 = AbiState::NoPage as u64;

#[test]
fn boot_state_is_reported() {
    let m = Machine::new();
    assert_eq!(m.state(RAM_BASE), (0, OWNED, MIB2));
    assert_eq!(m.state(HYP.start), (1, NOPAGE, 0));
    assert_eq!(m.state(POOL.end - PAGE), (1, NOPAGE, 0));
    assert_eq!(
        m.state(HYP.end),
        (0, OWNED, PAGE),
        "the rest of the 2 MiB around the hypervisor is 4K-mapped"
    );
    assert_eq!(m.state(0x4200_0000), (0, OWNED, MIB2));
    assert_eq!(m.mem.mem_state(0, &NoGuests), Err(CallError::Invalid));
    assert_eq!(
        m.mem.mem_state((RAM_BASE + RAM_SIZE) / PAGE, &NoGuests),
        Err(CallError::Invalid)
    );
}

#[test]
fn share_and_unshare_with_the_hypervisor() {
    let mut m = Machine::new();
    let pa = 0x4100_3000;
    m.bytes(pa)[0] = 0x5a;
    m.share(pa, 3).unwrap();
    for p in [pa, pa + PAGE, pa + 2 * PAGE] {
        assert_eq!(
            m.state(p),
            (0, SHARED_OWNED, MIB2),
            "the host keeps its 2M mapping"
        );
        assert_eq!(
            m.mem.hyp.translate(p, &m.mem.pool),
            Some(p),
            "the hypervisor maps it"
        );
    }
    assert_eq!(m.state(pa + 3 * PAGE), (0, OWNED, MIB2));
    assert_eq!(
        m.share(pa + 2 * PAGE, 2),
        Err(CallError::Denied),
        "already shared"
    );
    assert_eq!(
        m.unshare(pa + 2 * PAGE, 2),
        Err(CallError::Denied),
        "last page not shared"
    );
    assert_eq!(
        m.state(pa + 2 * PAGE),
        (0, SHARED_OWNED, MIB2),
        "a refused unshare changes nothing"
    );
    m.unshare(pa, 3).unwrap();
    assert_eq!(m.state(pa), (0, OWNED, MIB2));
    assert_eq!(m.mem.hyp.translate(pa, &m.mem.pool), None);
    assert!(
        m.mem.mmu.invalidated.contains(&(pa, 3 * PAGE)),
        "the hypervisor's TLB is invalidated"
    );
    assert_eq!(m.bytes(pa)[0], 0x5a, "sharing never touches the contents");
}

#[test]
fn bad_ranges_are_invalid_and_change_nothing() {
    let mut m = Machine::new();
    let before = m.snapshot();
    let first = RAM_BASE / PAGE;
    let last = (RAM_BASE + RAM_SIZE) / PAGE - 1;
    for (pfn, nr) in [
        (first, 0),
        (last, 2),
        (0, 1),
        (first - 1, 2),
        (u64::MAX, 1),
        (first, u64::MAX),
        (u64::MAX / PAGE, 2),
    ] {
        assert_eq!(
            m.mem.host_share_hyp(pfn, nr, &NoGuests),
            Err(CallError::Invalid),
            "share {pfn:#x}+{nr}"
        );
        assert_eq!(
            m.mem.host_unshare_hyp(pfn, nr, &NoGuests),
            Err(CallError::Invalid)
        );
        assert_eq!(
            m.mem.host_donate_hyp(pfn, nr, &NoGuests),
            Err(CallError::Invalid)
        );
        let r = m
            .mem
            .host_reclaim(pfn, nr, &NoGuests, &mut |_, _| unreachable!());
        assert_eq!(r, Err(CallError::Invalid));
    }
    assert_eq!(m.snapshot(), before);
}

#[test]
fn the_hypervisors_memory_is_refused() {
    let mut m = Machine::new();
    let before = m.snapshot();
    for pa in [HYP.start, POOL.start, HYP.end - PAGE] {
        assert_eq!(m.share(pa, 1), Err(CallError::Denied));
        assert_eq!(m.donate(pa, 1), Err(CallError::Denied));
        assert_eq!(
            m.reclaim(pa, 1),
            Err(CallError::Denied),
            "boot memory is never reclaimable"
        );
    }
    // A range that ends inside the hypervisor fails as a whole.
    assert_eq!(m.share(HYP.start - 4 * PAGE, 5), Err(CallError::Denied));
    assert_eq!(m.donate(HYP.start - 4 * PAGE, 5), Err(CallError::Denied));
    assert_eq!(m.snapshot(), before, "all or nothing");
}

#[test]
fn donate_then_reclaim_zeroes_and_rebuilds_the_block() {
    let mut m = Machine::new();
    let pa = 0x4180_0000 + 5 * PAGE;
    m.bytes(pa).fill(0xa5);
    let (free, total, tables) = (
        m.mem.pool.free_pages(),
        m.mem.pool.total_pages(),
        m.mem.table_pages(),
    );
    m.donate(pa, 4).unwrap();
    assert_eq!(m.state(pa), (1, NOPAGE, 0));
    assert_eq!(
        m.state(pa + 4 * PAGE),
        (0, OWNED, PAGE),
        "the host block split around the donation"
    );
    assert_eq!(m.mem.pool.total_pages(), total + 4);
    assert!(
        m.mem.pool.free_pages() >= free + 4 - 3,
        "4 more pages, minus the tables the split took"
    );
    assert_eq!(
        m.donate(pa + 3 * PAGE, 2),
        Err(CallError::Denied),
        "already donated"
    );
    assert_eq!(
        m.reclaim(pa + 3 * PAGE, 2),
        Err(CallError::Denied),
        "the last page is not donated"
    );
    m.reclaim(pa, 4).unwrap();
    assert_eq!(m.state(pa), (0, OWNED, MIB2), "the 2 MiB block is rebuilt");
    assert!(
        m.bytes(pa).iter().all(|&b| b == 0),
        "reclaimed pages read zero"
    );
    assert!(m
        .mem
        .mmu
        .flushed
        .contains(&(m.mem.pool.va(pa) as u64, PAGE)));
    assert_eq!(m.mem.pool.total_pages(), total);
    assert_eq!(
        m.mem.pool.free_pages(),
        free - (m.mem.table_pages() - tables) as usize
    );
}

/// 48 MiB in one donation (more than the 8192 pages keel once tracked):
/// every page joins the pool, is handed out before the boot pages, lowest
/// first, and is reclaimable once free, the host getting its blocks back.
#[test]
fn donations_are_limited_by_ram_alone() {
    let mut m = Machine::new();
    let (start, nr) = (0x4100_0000, 12_288);
    let donated = start..start + nr * PAGE;
    let total = m.mem.pool.total_pages();
    m.donate(start, nr).unwrap();
    assert_eq!(m.mem.pool.total_pages(), total + nr as usize);
    let mut taken = vec![];
    while let Ok(p) = m.mem.pool.alloc_zeroed() {
        taken.push(p);
    }
    let want: Vec<u64> = donated.clone().step_by(PAGE as usize).collect();
    assert_eq!(
        taken[..nr as usize],
        want,
        "donated pages first, lowest first"
    );
    assert!(taken[nr as usize..].iter().all(|p| !donated.contains(p)));
    // (Not `m.reclaim`: its invariant check would count the pages held
    // here, outside any table, as lost.)
    let r = m
        .mem
        .host_reclaim(start / PAGE, nr, &NoGuests, &mut |_, _| unreachable!());
    assert_eq!(r, Err(CallError::Denied), "all in use");
    assert_eq!(m.state(start), (1, NOPAGE, 0), "nothing changed");
    for &p in taken.iter().rev() {
        // SAFETY: allocated above, unused.
        unsafe { m.mem.pool.free(p) };
    }
    m.reclaim(start, nr).unwrap();
    assert_eq!(m.mem.pool.total_pages(), total);
    for pa in [start, start + nr * PAGE - PAGE] {
        assert_eq!(m.state(pa), (0, OWNED, MIB2), "the host's blocks are back");
    }
}

#[test]
fn donated_pages_in_use_are_not_reclaimable() {
    let mut m = Machine::new();
    // Exhaust the boot pool so the next allocation takes a donated page.
    let mut taken = vec![];
    while let Ok(p) = m.mem.pool.alloc_zeroed() {
        taken.push(p);
    }
    let r = m.mem.host_donate_hyp(0x4200_0000 / PAGE, 1, &NoGuests);
    assert_eq!(
        r,
        Err(CallError::NoMemory),
        "the split needs tables the pool lacks"
    );
    for p in taken.drain(..8) {
        // SAFETY: allocated above, unused.
        unsafe { m.mem.pool.free(p) };
    }
    // Stop checking pool accounting while pages are held outside tables.
    m.mem
        .host_donate_hyp(0x4200_0000 / PAGE, 2, &NoGuests)
        .unwrap();
    let mut more = vec![];
    while let Ok(p) = m.mem.pool.alloc_zeroed() {
        more.push(p);
    }
    assert!(
        more.contains(&0x4200_0000) && more.contains(&0x4200_1000),
        "donated pages were used"
    );
    // SAFETY: allocated above, unused.
    unsafe { m.mem.pool.free(0x4200_1000) };
    let r = m
        .mem
        .host_reclaim(0x4200_0000 / PAGE, 2, &NoGuests, &mut |_, _| unreachable!());
    assert_eq!(r, Err(CallError::Denied), "page 0 is in use");
    assert_eq!(
        m.mem.mem_state(0x4200_1000 / PAGE, &NoGuests).unwrap().0,
        1,
        "nothing changed"
    );
}

#[test]
fn no_memory_changes_nothing() {
    let mut m = Machine::new();
    let mut taken = vec![];
    while let Ok(p) = m.mem.pool.alloc_zeroed() {
        taken.push(p);
    }
    let before: Vec<_> = (0x4100_0000..0x4100_0000 + 16 * PAGE)
        .step_by(PAGE as usize)
        .map(|pa| m.state(pa))
        .collect();
    assert_eq!(
        m.mem.host_share_hyp(0x4100_0000 / PAGE, 16, &NoGuests),
        Err(CallError::NoMemory)
    );
    assert_eq!(
        m.mem.host_donate_hyp(0x4100_0000 / PAGE, 16, &NoGuests),
        Err(CallError::NoMemory)
    );
    let after: Vec<_> = (0x4100_0000..0x4100_0000 + 16 * PAGE)
        .step_by(PAGE as usize)
        .map(|pa| m.state(pa))
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        m.mem.hyp.first_mapped(0x4100_0000, 16 * PAGE, &m.mem.pool),
        None
    );
    assert_eq!(m.mem.pool.free_pages(), 0);
}

/// Guests of VM 0 (live) that lend `to_host` pages to the host and borrow
/// the host's `to_guest` pages, by pfn.
struct SharingGuests {
    to_host: Vec<u64>,
    to_guest: Vec<u64>,
}

impl Guests for SharingGuests {
    fn is_live(&self, vm: u16) -> bool {
        vm == 0
    }
    fn lender(&self, pfn: u64) -> Option<(u16, bool)> {
        self.to_host.contains(&pfn).then_some((0, false))
    }
    fn borrower(&self, pfn: u64) -> Option<u16> {
        self.to_guest.contains(&pfn).then_some(0)
    }
    fn table_pages(&self) -> u64 {
        0
    }
}

fn pfns(pa: u64, nr: u64) -> Vec<u64> {
    (pa / PAGE..pa / PAGE + nr).collect()
}

impl Machine {
    /// The checker's complaint, as (what, where).
    fn violation(&self, g: &dyn Guests) -> (&'static str, u64) {
        let v = self.mem.check_invariants(g).unwrap_err();
        (v.what, v.addr)
    }
    /// Maps [pa, pa + len) in the host stage 2 (identity, normal memory,
    /// host-owned) behind the tracker's back.
    fn host_map(&mut self, pa: u64, len: u64) {
        let mem = &mut self.mem;
        mem.host
            .map(
                &mut mem.pool,
                pa,
                len,
                pa,
                S2Attrs::NORMAL_RWX,
                PageState::Owned,
            )
            .unwrap();
    }
    fn host_unmap(&mut self, pa: u64, len: u64, a: Annotation) {
        let mem = &mut self.mem;
        mem.host.unmap(&mut mem.pool, pa, len, a).unwrap();
    }
    fn host_set_state(&mut self, pa: u64, len: u64, state: PageState) {
        let mem = &mut self.mem;
        mem.host.set_state(&mut mem.pool, pa, len, state).unwrap();
    }
    /// Maps [pa, pa + len) in the hypervisor's stage 1, with a block where
    /// aligned if `blocks`.
    fn hyp_map(&mut self, pa: u64, len: u64, blocks: bool) {
        let mem = &mut self.mem;
        if blocks {
            mem.hyp.map(pa, pa, len, Perm::ReadWrite, &mut mem.pool)
        } else {
            mem.hyp
                .map_pages(pa, pa, len, Perm::ReadWrite, &mut mem.pool)
        }
        .unwrap();
    }
    fn hyp_unmap(&mut self, pa: u64, len: u64) {
        let mem = &mut self.mem;
        mem.hyp.unmap(pa, len, &mut mem.pool).unwrap();
    }
}

const NOT_IDENTITY: &str = "host mapping is not an identity";
const WRONG_ATTRS: &str = "host RAM mapped with wrong attributes";
const NO_OTHER_SIDE: &str = "host page shared, but no guest on the other side";
const NO_OWNER: &str = "unmapped RAM without an owner";
const HYP_MAPS: &str = "the hypervisor maps a page it neither owns nor borrows";
const NOT_DONATED_IN_HOST: &str = "donated page not recorded as donated in the host stage 2";
const DONATED_UNMAPPED: &str = "donated page not mapped by the hypervisor";
const POOL_COUNT: &str = "pool pages != free pages + table pages";

/// Each check of `check_invariants` fires on a state corrupted for it, at
/// the first bad page, inside 2 MiB leaves and runs of pages too.
#[test]
fn the_invariant_checker_sees_corruption() {
    let mut m = Machine::new();
    m.donate(0x4300_0000, 1).unwrap();
    // Give the page back to the host behind the tracker's back.
    m.host_map(0x4300_0000, PAGE);
    assert_eq!(m.violation(&NoGuests), (NOT_DONATED_IN_HOST, 0x4300_0000));

    // Host stage-2 leaves.
    let mut m = Machine::new();
    m.mem
        .host
        .set_attrs(&mut m.mem.pool, 0x4100_0000, PAGE, S2Attrs::DEVICE_RW)
        .unwrap();
    assert_eq!(m.violation(&NoGuests), (WRONG_ATTRS, 0x4100_0000));
    let mut m = Machine::new();
    m.mem
        .host
        .map(
            &mut m.mem.pool,
            0x4100_0000,
            PAGE,
            0x4200_0000,
            S2Attrs::NORMAL_RWX,
            PageState::Owned,
        )
        .unwrap();
    assert_eq!(m.violation(&NoGuests), (NOT_IDENTITY, 0x4100_0000));
    let mut m = Machine::new();
    m.host_unmap(0x4100_3000, PAGE, Annotation(3));
    assert_eq!(m.violation(&NoGuests), (NO_OWNER, 0x4100_3000));

    // A 2 MiB host block shared with a guest that has only its first pages.
    let mut m = Machine::new();
    let block = 0x4200_0000;
    m.host_set_state(block, MIB2, PageState::SharedOwned);
    assert_eq!(m.mem.host.lookup(&m.mem.pool, block).unwrap().size, MIB2);
    let g = SharingGuests {
        to_host: pfns(block, 512),
        to_guest: pfns(block, 5),
    };
    assert_eq!(m.violation(&g), (NO_OTHER_SIDE, block + 5 * PAGE));
    assert_eq!(m.violation(&NoGuests), (NO_OTHER_SIDE, block));
    let g = SharingGuests {
        to_host: vec![],
        to_guest: pfns(block, 512),
    };
    m.mem.check_invariants(&g).unwrap();
    // The same block borrowed from a guest: pages shared the other way do
    // not count.
    m.host_set_state(block, MIB2, PageState::SharedBorrowed);
    assert_eq!(m.violation(&g), (NO_OTHER_SIDE, block));
    let g = SharingGuests {
        to_host: pfns(block, 3),
        to_guest: pfns(block + 3 * PAGE, 509),
    };
    assert_eq!(m.violation(&g), (NO_OTHER_SIDE, block + 3 * PAGE));
    let g = SharingGuests {
        to_host: pfns(block, 512),
        to_guest: vec![],
    };
    m.mem.check_invariants(&g).unwrap();

    // The hypervisor maps a guest's pages: a run of 4K pages that starts
    // two pages before them, then a 2 MiB block around them.
    let mut m = Machine::new();
    m.host_unmap(0x4250_0000, 4 * PAGE, Annotation(VM_HANDLE_BASE + 1));
    m.check();
    m.hyp_map(0x4250_0000 - 2 * PAGE, 6 * PAGE, false);
    assert_eq!(m.violation(&NoGuests), (HYP_MAPS, 0x4250_0000));
    m.hyp_unmap(0x4250_0000 - 2 * PAGE, 6 * PAGE);
    m.check();
    m.hyp_map(0x4240_0000, MIB2, true);
    assert_eq!(m.mem.hyp.leaf(0x4240_0000, &m.mem.pool).unwrap().1, MIB2);
    assert_eq!(m.violation(&NoGuests), (HYP_MAPS, 0x4250_0000));
    // ... or a host page the host shares with a guest.
    let mut m = Machine::new();
    let g = SharingGuests {
        to_host: vec![],
        to_guest: pfns(0x4100_1000, 1),
    };
    m.host_set_state(0x4100_1000, PAGE, PageState::SharedOwned);
    m.mem.check_invariants(&g).unwrap();
    m.hyp_map(0x4100_0000, 4 * PAGE, false);
    assert_eq!(m.violation(&g), (HYP_MAPS, 0x4100_1000));
    // ... or a page recorded as donated that the donated-page table lacks,
    // inside a donated 2 MiB block.
    let mut m = Machine::new();
    m.donate(block, 512).unwrap();
    assert_eq!(m.mem.hyp.leaf(block, &m.mem.pool).unwrap().1, MIB2);
    m.mem
        .pool
        .reclaim_donated((block + 0x10_0000) / PAGE, 1)
        .unwrap();
    assert_eq!(m.violation(&NoGuests), (HYP_MAPS, block + 0x10_0000));

    // Donated pages: the host maps one in the middle of a donated block.
    let mut m = Machine::new();
    m.donate(block, 512).unwrap();
    m.host_map(block + 0x10_0000, PAGE);
    assert_eq!(
        m.violation(&NoGuests),
        (NOT_DONATED_IN_HOST, block + 0x10_0000)
    );
    // The hypervisor unmaps one of a run of donated pages; the lower of
    // two failing pages wins, the host stage 2's at the same page.
    let mut m = Machine::new();
    let run = 0x4300_0000;
    m.donate(run, 8).unwrap();
    m.hyp_unmap(run + 3 * PAGE, PAGE);
    assert_eq!(m.violation(&NoGuests), (DONATED_UNMAPPED, run + 3 * PAGE));
    m.host_map(run + 6 * PAGE, PAGE);
    assert_eq!(m.violation(&NoGuests), (DONATED_UNMAPPED, run + 3 * PAGE));
    m.host_map(run + 2 * PAGE, PAGE);
    assert_eq!(
        m.violation(&NoGuests),
        (NOT_DONATED_IN_HOST, run + 2 * PAGE)
    );
    let mut m = Machine::new();
    m.donate(run, 8).unwrap();
    m.hyp_unmap(run + 7 * PAGE, PAGE);
    m.host_map(run + 7 * PAGE, PAGE);
    assert_eq!(
        m.violation(&NoGuests),
        (NOT_DONATED_IN_HOST, run + 7 * PAGE)
    );
    // The last page of a run, in the second of two runs.
    let mut m = Machine::new();
    m.donate(run, 8).unwrap();
    m.donate(run + 16 * PAGE, 4).unwrap();
    m.hyp_unmap(run + 19 * PAGE, PAGE);
    assert_eq!(m.violation(&NoGuests), (DONATED_UNMAPPED, run + 19 * PAGE));

    // A pool page that is neither free nor a table.
    let mut m = Machine::new();
    let total = m.mem.pool.total_pages() as u64;
    m.mem.pool.alloc_zeroed().unwrap();
    assert_eq!(m.violation(&NoGuests), (POOL_COUNT, total));
}

/// The invariant checker as it was written first, page by page: what
/// `check_invariants` must agree with, violation and address, on any state.
fn reference_check(mem: &Memory<NoTlb, FakeMmu>, g: &dyn Guests) -> Result<(), Violation> {
    let err = |what, addr| Err(Violation { what, addr });
    for region in mem.ram.regions() {
        let mut bad = None;
        let _ = mem
            .host
            .visit_leaves(&mem.pool, region.start, region.len(), &mut |leaf| {
                if bad.is_some() {
                    return;
                }
                match leaf.kind {
                    LeafKind::Mapped { pa, attrs, state } => {
                        if pa != leaf.ipa {
                            bad = Some((NOT_IDENTITY, leaf.ipa));
                        } else if attrs != S2Attrs::NORMAL_RWX {
                            bad = Some((WRONG_ATTRS, leaf.ipa));
                        } else if let Some(p) = (leaf.ipa..leaf.ipa + leaf.size)
                            .step_by(PAGE as usize)
                            .find(|p| match state {
                                PageState::SharedBorrowed => g.lender(p / PAGE).is_none(),
                                PageState::SharedOwned => g.borrower(p / PAGE).is_none(),
                                PageState::Owned => false,
                            })
                        {
                            bad = Some((NO_OTHER_SIDE, p));
                        }
                    }
                    LeafKind::Unmapped(a) => {
                        let vm = a.0.checked_sub(VM_HANDLE_BASE).map(u16::try_from);
                        if a != ANN_HYP_PRIVATE
                            && a != ANN_HYP_DONATED
                            && !matches!(vm, Some(Ok(_)))
                        {
                            bad = Some((NO_OWNER, leaf.ipa));
                        }
                    }
                }
            });
        if let Some((what, addr)) = bad {
            return err(what, addr);
        }
        let mut pa = region.start;
        while let Some(m) = mem.hyp.first_mapped(pa, region.end - pa, &mem.pool) {
            let ok = match mem.page(m, g) {
                Page::SharedWithHyp | Page::HypPrivate => true,
                Page::HypDonated { .. } => mem.pool.donated_in_use(m / PAGE).is_some(),
                _ => false,
            };
            if !ok {
                return err(HYP_MAPS, m);
            }
            pa = m + PAGE;
            if pa >= region.end {
                break;
            }
        }
    }
    for (pfn, _) in mem.pool.donated_pages() {
        let pa = pfn * PAGE;
        match mem.host.lookup(&mem.pool, pa) {
            Ok(leaf) if leaf.kind == LeafKind::Unmapped(ANN_HYP_DONATED) => {}
            _ => return err(NOT_DONATED_IN_HOST, pa),
        }
        if mem.hyp.translate(pa, &mem.pool).is_none() {
            return err(DONATED_UNMAPPED, pa);
        }
    }
    let tables = mem.table_pages() + g.table_pages();
    if mem.pool.total_pages() as u64 != mem.pool.all_free_pages() as u64 + tables {
        return err(POOL_COUNT, mem.pool.total_pages() as u64);
    }
    Ok(())
}

/// xorshift64*: reproducible random numbers for the test below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A page-aligned range of 1 to 1100 pages in 0x4100_0000..0x4400_0000,
    /// often 2 MiB aligned (so blocks are made and cut).
    fn range(&mut self) -> (u64, u64) {
        let mut pa = 0x4100_0000 + self.below(0x300_0000 / PAGE) * PAGE;
        if self.below(3) == 0 {
            pa &= !(MIB2 - 1);
        }
        let nr = match self.below(3) {
            0 => 1 + self.below(4),
            1 => 512,
            _ => 1 + self.below(1100),
        };
        (pa, nr.min((0x4400_0000 - pa) / PAGE))
    }
}

/// Random legal calls, then random corruption of the tables, the pool's
/// tables and the guests' shared-page records: the run-based checker and
/// the page-by-page one report the same violation at the same address.
#[test]
fn the_invariant_checker_agrees_with_a_page_by_page_walk() {
    let mut disagreements = vec![];
    let mut seen = std::collections::BTreeMap::new();
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut m = Machine::new();
        let mut donated = vec![];
        for _ in 0..rng.below(12) {
            let (pa, nr) = rng.range();
            let _ = match rng.below(4) {
                0 => m.share(pa, nr),
                1 => m.unshare(pa, nr),
                2 => m.donate(pa, nr).inspect(|_| donated.push((pa, nr))),
                _ => m.reclaim(pa, nr),
            };
        }
        let mut g = SharingGuests {
            to_host: vec![],
            to_guest: vec![],
        };
        for _ in 0..1 + rng.below(3) {
            // Half the time inside something donated, where the hypervisor
            // maps pages and the donated-page table is checked.
            let (pa, nr) = match rng.below(2) {
                0 if !donated.is_empty() => {
                    let (pa, nr) = donated[rng.below(donated.len() as u64) as usize];
                    let skip = rng.below(nr);
                    (pa + skip * PAGE, 1 + rng.below(nr - skip))
                }
                _ => rng.range(),
            };
            let mem = &mut m.mem;
            let pool = &mut mem.pool;
            let _ = match rng.below(12) {
                0 => mem.host.map(
                    pool,
                    pa,
                    nr * PAGE,
                    pa + PAGE,
                    S2Attrs::NORMAL_RWX,
                    PageState::Owned,
                ),
                1 => mem.host.set_attrs(pool, pa, nr * PAGE, S2Attrs::DEVICE_RW),
                2 | 3 => {
                    let state =
                        [PageState::SharedOwned, PageState::SharedBorrowed][rng.below(2) as usize];
                    let (lo, n) = (pa / PAGE + rng.below(nr), rng.below(nr + 1));
                    let side = if rng.below(2) == 0 {
                        &mut g.to_guest
                    } else {
                        &mut g.to_host
                    };
                    side.extend(lo..lo + n);
                    mem.host.set_state(pool, pa, nr * PAGE, state)
                }
                4 => {
                    let a = [
                        0,
                        1,
                        2,
                        3,
                        7,
                        VM_HANDLE_BASE,
                        VM_HANDLE_BASE + 5,
                        VM_HANDLE_BASE + 0x1_0000,
                    ];
                    mem.host
                        .unmap(pool, pa, nr * PAGE, Annotation(a[rng.below(8) as usize]))
                }
                5 => mem.host.map(
                    pool,
                    pa,
                    nr * PAGE,
                    pa,
                    S2Attrs::NORMAL_RWX,
                    PageState::Owned,
                ),
                6 => mem
                    .hyp
                    .map(pa, pa, nr * PAGE, Perm::ReadWrite, pool)
                    .map_err(|_| keel_mm::MmError::NoMemory),
                7 => mem
                    .hyp
                    .map_pages(pa, pa, nr * PAGE, Perm::ReadWrite, pool)
                    .map_err(|_| keel_mm::MmError::NoMemory),
                8 => {
                    // One page out of the hypervisor's stage 1, splitting a block.
                    let _ = mem.hyp.split_block(pa, pool, &mut |_| {});
                    mem.hyp
                        .unmap(pa, PAGE, pool)
                        .map(drop)
                        .map_err(|_| keel_mm::MmError::NoMemory)
                }
                9 => pool.reclaim_donated(pa / PAGE, 1 + rng.below(3)),
                10 => pool.alloc_zeroed().map(drop),
                _ => {
                    // The host stage 2 records pages as donated.
                    mem.host.unmap(pool, pa, nr * PAGE, ANN_HYP_DONATED)
                }
            };
        }
        let fast = m.mem.check_invariants(&g);
        let slow = reference_check(&m.mem, &g);
        if let Err(v) = slow {
            *seen.entry(v.what).or_insert(0) += 1;
        }
        if fast != slow {
            disagreements.push((seed, fast, slow));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#x?}");
    // Every check fired on some state.
    assert_eq!(seen.len(), 8, "{seen:#?}");
}
