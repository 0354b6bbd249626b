//! The page pool's stash: table pages a merge freed, kept whole (and
//! counted free) for the next split of the same leaf, and given to any
//! allocation the rest of the pool cannot serve.

mod common;

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeSet;

use common::*;
use keel_mm::donated::DonatedPages;
use keel_mm::frames::RamFrames;
use keel_mm::pool::STASH_ENTRIES;
use keel_mm::{Change, LeafKind, MmError, PagePool, PageState, S2Attrs};

const PAGE: u64 = 4096;
const RAM: u64 = 0x40_0000_0000;

fn fill(pool: &PagePool, pa: u64, byte: u8) {
    // SAFETY: `pa` is a page of this pool, mapped at `va(pa)`, and the
    // test holds it (allocated, or stashed and only read back).
    unsafe { pool.va(pa).write_bytes(byte, PAGE as usize) };
}

fn all_bytes(pool: &PagePool, pa: u64, byte: u8) -> bool {
    // SAFETY: as for `fill`; reading only.
    unsafe { std::slice::from_raw_parts(pool.va(pa), PAGE as usize) }
        .iter()
        .all(|&b| b == byte)
}

/// Allocates single pages until the pool says `NoMemory`.
fn drain(pool: &mut PagePool) -> Vec<u64> {
    let mut taken = Vec::new();
    loop {
        match pool.alloc_zeroed() {
            Ok(pa) => taken.push(pa),
            Err(e) => {
                assert_eq!(e, MmError::NoMemory);
                return taken;
            }
        }
    }
}

#[test]
fn free_split_keeps_contents_and_counts_free() {
    let mut tp = TestPool::new(16);
    let pool = &mut tp.pool;
    let total = pool.total_pages();
    let a = pool.alloc_zeroed().unwrap();
    let b = pool.alloc_zeroed().unwrap();
    let mut allocated = 2;
    assert_eq!(pool.free_pages() + allocated, total);
    fill(pool, a, 0x5a);
    fill(pool, b, 0xc3);
    let free = pool.free_pages();
    // SAFETY: allocated above, and not written again while stashed.
    unsafe { pool.free_split(a, 0x1234_0000_0000_0711, 2) };
    allocated -= 1;
    assert_eq!(pool.stashed(), 1);
    assert_eq!(pool.free_pages(), free + 1);
    assert_eq!(pool.all_free_pages(), free + 1);
    assert_eq!(pool.free_pages() + allocated, total);
    assert_eq!(pool.total_pages(), total, "stashing adds no page");
    // Ordinary allocations and frees go around the stashed page, which
    // keeps its entries.
    let mut others = Vec::new();
    for _ in 0..5 {
        let pa = pool.alloc_zeroed().unwrap();
        assert_ne!(pa, a, "the heap still has pages: the stash is kept");
        fill(pool, pa, 0xff);
        others.push(pa);
    }
    allocated += others.len();
    assert_eq!(pool.free_pages() + allocated, total);
    for pa in others.drain(..) {
        // SAFETY: allocated above, not used any more.
        unsafe { pool.free(pa) };
    }
    allocated -= 5;
    assert!(
        all_bytes(pool, a, 0x5a),
        "a stashed page keeps its contents"
    );
    assert!(all_bytes(pool, b, 0xc3));
    assert_eq!(pool.stashed(), 1);
    assert_eq!(pool.free_pages() + allocated, total);
    // SAFETY: allocated above, not written again.
    unsafe { pool.free_split(b, 0x1234_0000_0020_0711, 2) };
    allocated -= 1;
    assert_eq!((pool.stashed(), allocated), (2, 0));
    assert_eq!(pool.free_pages(), total);
    assert_eq!(pool.all_free_pages(), total);
    assert!(all_bytes(pool, a, 0x5a) && all_bytes(pool, b, 0xc3));
    // The reserve holds back stashed pages like any other free pages.
    pool.set_reserve(3);
    assert_eq!(pool.free_pages(), total - 3);
    assert_eq!(pool.all_free_pages(), total);
    pool.open_reserve(true);
    assert_eq!(pool.free_pages(), total);
}

#[test]
fn a_full_stash_evicts_the_oldest_page_and_counts_every_page_free() {
    let n = STASH_ENTRIES + 3;
    let mut tp = TestPool::new(n + 4);
    let pool = &mut tp.pool;
    let total = pool.total_pages();
    let pages: Vec<u64> = (0..n).map(|_| pool.alloc_zeroed().unwrap()).collect();
    assert_eq!(pool.free_pages(), total - n);
    for (i, &pa) in pages.iter().enumerate() {
        fill(pool, pa, i as u8 + 1);
        // SAFETY: allocated above, not written again.
        unsafe { pool.free_split(pa, 0x711 | (i as u64) << 21, 2) };
        assert_eq!(pool.stashed(), (i + 1).min(STASH_ENTRIES));
        assert_eq!(pool.free_pages(), total - n + i + 1);
    }
    assert_eq!(pool.stashed(), STASH_ENTRIES);
    assert_eq!(
        pool.free_pages(),
        total,
        "evicted and stashed pages all free"
    );
    assert_eq!(pool.all_free_pages(), total);
    // The newest STASH_ENTRIES pages are the stashed ones: still intact.
    for (i, &pa) in pages.iter().enumerate().skip(n - STASH_ENTRIES) {
        assert!(all_bytes(pool, pa, i as u8 + 1), "stashed page {i}");
    }
    // Everything is allocatable again, each page once.
    let again = drain(pool);
    assert_eq!(again.len(), total);
    assert_eq!(again.iter().collect::<BTreeSet<_>>().len(), total);
    assert_eq!(pool.stashed(), 0);
    assert_eq!(pool.free_pages(), 0);
    for &pa in &again {
        assert!(all_bytes(pool, pa, 0), "{pa:#x} zeroed");
    }
}

#[test]
fn an_empty_heap_hands_out_stashed_pages_oldest_first() {
    let mut tp = TestPool::new(24);
    let pool = &mut tp.pool;
    let total = pool.total_pages();
    let mut held = drain(pool);
    assert_eq!(held.len(), total);
    assert_eq!((pool.free_pages(), pool.stashed()), (0, 0));
    assert_eq!(held.iter().collect::<BTreeSet<_>>().len(), total);
    // Stash five pages, in an order that is not address order.
    let order = [7, 2, 19, 11, 0];
    let stashed: Vec<u64> = order.iter().map(|&i| held[i]).collect();
    held.retain(|pa| !stashed.contains(pa));
    for (i, &pa) in stashed.iter().enumerate() {
        fill(pool, pa, 0xee);
        // SAFETY: allocated above, not written again while stashed.
        unsafe { pool.free_split(pa, 0x711 | (i as u64) << 21, 2) };
    }
    assert_eq!(pool.stashed(), 5);
    assert_eq!(pool.free_pages(), 5);
    assert_eq!(pool.free_pages() + held.len(), total);
    let mut got = Vec::new();
    while pool.free_pages() > 0 {
        let before = pool.stashed();
        let pa = pool.alloc_zeroed().unwrap();
        assert_eq!(pool.stashed(), before - 1);
        assert!(all_bytes(pool, pa, 0), "{pa:#x} zeroed");
        assert!(!held.contains(&pa), "{pa:#x} handed out twice");
        assert!(!got.contains(&pa), "{pa:#x} handed out twice");
        got.push(pa);
    }
    assert_eq!(got, stashed, "the oldest stashed page first");
    assert_eq!(pool.stashed(), 0);
    assert_eq!(pool.alloc_zeroed(), Err(MmError::NoMemory));
    assert_eq!(pool.alloc_contiguous_zeroed(2), Err(MmError::NoMemory));
    // Freed normally, they are the heap's again.
    for &pa in &got {
        // SAFETY: allocated above, not used any more.
        unsafe { pool.free(pa) };
    }
    assert_eq!((pool.free_pages(), pool.stashed()), (5, 0));
}

#[test]
fn a_contiguous_allocation_flushes_the_stash_into_the_heap() {
    let mut tp = TestPool::new(16);
    let pool = &mut tp.pool;
    let held = drain(pool);
    assert_eq!(held.len(), 16);
    let base = *held.iter().min().unwrap();
    assert_eq!(base % (2 * PAGE), 0);
    // Stash an aligned pair (its two halves apart in the stash) and a
    // page whose buddy is still in use.
    let (lo, hi, lone) = (base + 4 * PAGE, base + 5 * PAGE, base + 9 * PAGE);
    for (i, &pa) in [hi, lone, lo].iter().enumerate() {
        fill(pool, pa, 0x77);
        // SAFETY: allocated above, not written again while stashed.
        unsafe { pool.free_split(pa, 0x711 | (i as u64) << 21, 2) };
    }
    assert_eq!((pool.free_pages(), pool.stashed()), (3, 3));
    let pair = pool.alloc_contiguous_zeroed(2).unwrap();
    assert_eq!(pair, lo, "the only aligned pair the free pages form");
    assert!(all_bytes(pool, lo, 0) && all_bytes(pool, hi, 0), "zeroed");
    assert_eq!(pool.stashed(), 0, "the stash went back to the heap");
    assert_eq!(pool.free_pages(), 1);
    // The lone page is the heap's now.
    assert_eq!(pool.alloc_zeroed(), Ok(lone));
    assert!(all_bytes(pool, lone, 0));
    assert_eq!(pool.free_pages(), 0);
    assert_eq!(pool.alloc_zeroed(), Err(MmError::NoMemory));

    // Two stashed pages that are not buddies: no pair, and no page lost.
    // SAFETY: allocated above, not written again while stashed.
    unsafe {
        pool.free_split(base + 7 * PAGE, 0x711, 2);
        pool.free_split(base + 8 * PAGE, 0x200711, 2);
    }
    assert_eq!(pool.alloc_contiguous_zeroed(2), Err(MmError::NoMemory));
    assert_eq!(pool.free_pages(), 2);
    let mut singles = vec![pool.alloc_zeroed().unwrap(), pool.alloc_zeroed().unwrap()];
    singles.sort_unstable();
    assert_eq!(singles, [base + 7 * PAGE, base + 8 * PAGE]);
    assert_eq!(pool.alloc_zeroed(), Err(MmError::NoMemory));
}

/// A pool of `boot` heap pages followed by `donated` pages the host
/// donates, in one host allocation at a fake physical address.
struct DonatedPool {
    pool: PagePool,
    /// Frame number of the first donated page.
    first: u64,
    mem: *mut u8,
    layout: Layout,
}

const FAKE_PA: u64 = 0x9000_0000;

impl DonatedPool {
    fn new(boot: usize, donated: u64) -> Self {
        let pages = boot + donated as usize;
        let layout = Layout::from_size_align(pages * PAGE as usize, 1 << 16).unwrap();
        // SAFETY: non-zero size.
        let mem = unsafe { alloc(layout) };
        assert!(!mem.is_null());
        let mut pool = PagePool::new((mem as usize).wrapping_sub(FAKE_PA as usize)).unwrap();
        // SAFETY: the first `boot` pages of the allocation, ours until drop.
        unsafe { pool.add_range(FAKE_PA, boot * PAGE as usize).unwrap() };
        let table = Box::leak(Box::new(DonatedPages::new()));
        let covered = pages as u64;
        let words = vec![0u64; DonatedPages::words_for(covered)].leak();
        table.attach(RamFrames::one(FAKE_PA >> 12, covered), words);
        pool.attach_donated(table);
        let first = (FAKE_PA >> 12) + boot as u64;
        pool.check_donate(first, donated).unwrap();
        pool.donate(first, donated).unwrap();
        Self {
            pool,
            first,
            mem,
            layout,
        }
    }
}

impl Drop for DonatedPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.mem, self.layout) };
    }
}

#[test]
fn stashed_donated_pages_are_free_and_reclaimable() {
    let mut dp = DonatedPool::new(8, 6);
    let d = dp.first;
    let pool = &mut dp.pool;
    assert_eq!((pool.total_pages(), pool.free_pages()), (14, 14));
    // Single pages come from the donated pages first, lowest first.
    let taken: Vec<u64> = (0..6).map(|_| pool.alloc_zeroed().unwrap()).collect();
    assert_eq!(taken, (d..d + 6).map(|p| p << 12).collect::<Vec<_>>());
    assert!((d..d + 6).all(|p| pool.donated_in_use(p) == Some(true)));
    assert_eq!(pool.free_pages(), 8);

    // SAFETY: allocated above, not written again while stashed.
    unsafe { pool.free_split((d + 2) << 12, 0x711, 2) };
    assert_eq!(pool.stashed(), 1);
    assert_eq!(pool.free_pages(), 9);
    assert_eq!(pool.donated_in_use(d + 2), Some(false), "stashed is free");
    assert_eq!(pool.donated_in_use(d + 1), Some(true));
    let listed: Vec<(u64, bool)> = pool.donated_pages().collect();
    assert_eq!(
        listed,
        (d..d + 6).map(|p| (p, p != d + 2)).collect::<Vec<_>>()
    );

    // A range with a page in use is refused; nothing changes.
    let (total, free) = (pool.total_pages(), pool.free_pages());
    assert_eq!(
        pool.reclaim_donated(d + 2, 2),
        Err(MmError::InvalidArgument)
    );
    assert_eq!((pool.total_pages(), pool.free_pages()), (total, free));
    assert_eq!(pool.donated_in_use(d + 2), Some(false));
    assert_eq!(pool.donated_in_use(d + 3), Some(true));

    // The stashed page alone is reclaimed.
    pool.reclaim_donated(d + 2, 1).unwrap();
    assert_eq!(pool.stashed(), 0);
    assert_eq!(pool.total_pages(), total - 1);
    assert_eq!(pool.free_pages(), free - 1);
    assert_eq!(pool.donated_in_use(d + 2), None, "no longer donated");
    assert_eq!(pool.first_not_donated(d, 6), Some(d + 2));

    // A stashed page and a free donated page, together.
    // SAFETY: allocated above, not written again while stashed.
    unsafe {
        pool.free_split((d + 4) << 12, 0x200711, 2);
        pool.free((d + 5) << 12);
    }
    assert_eq!(pool.stashed(), 1);
    let (total, free) = (pool.total_pages(), pool.free_pages());
    pool.reclaim_donated(d + 4, 2).unwrap();
    assert_eq!(pool.stashed(), 0);
    assert_eq!(pool.total_pages(), total - 2);
    assert_eq!(pool.free_pages(), free - 2);
    let listed: Vec<(u64, bool)> = pool.donated_pages().collect();
    assert_eq!(listed, [(d, true), (d + 1, true), (d + 3, true)]);
    // Only the boot pages are free: no donated page is handed out again.
    let rest = drain(pool);
    assert_eq!(rest.len(), 8);
    assert!(rest.iter().all(|&pa| pa >> 12 < d));
}

/// A refused reclaim must leave the stash as it was (MmError: "On any
/// error nothing changed"): the stashed page keeps its entries for the next
/// split of the same leaf.
#[test]
fn a_refused_reclaim_keeps_the_stash() {
    let mut dp = DonatedPool::new(4, 4);
    let d = dp.first;
    let pool = &mut dp.pool;
    for p in d..d + 4 {
        assert_eq!(pool.alloc_zeroed(), Ok(p << 12));
    }
    // SAFETY: allocated above, not written again while stashed.
    unsafe { pool.free_split((d + 1) << 12, 0x711, 2) };
    let before = (pool.total_pages(), pool.free_pages(), pool.stashed());
    assert_eq!(before.2, 1);
    assert_eq!(
        pool.reclaim_donated(d + 1, 2),
        Err(MmError::InvalidArgument),
        "page d + 2 is in use"
    );
    assert_eq!(
        (pool.total_pages(), pool.free_pages(), pool.stashed()),
        before
    );
}

/// Checks every page of [start, start + len) against `expect(ipa)`.
fn check_pages(
    s2: &keel_mm::Stage2<RecordingTlb>,
    pool: &PagePool,
    start: u64,
    len: u64,
    expect: impl Fn(u64) -> (u64, PageState),
) {
    let mut next = start;
    s2.visit_leaves(pool, start, len, &mut |l| {
        assert_eq!(l.ipa.max(start), next, "leaves contiguous");
        let LeafKind::Mapped { pa, attrs, state } = l.kind else {
            panic!("{:#x} unmapped", l.ipa);
        };
        assert_eq!(attrs, S2Attrs::NORMAL_RWX);
        let end = (l.ipa + l.size).min(start + len);
        for ipa in (l.ipa.max(start)..end).step_by(PAGE as usize) {
            assert_eq!((pa + (ipa - l.ipa), state), expect(ipa), "page {ipa:#x}");
        }
        next = end;
    })
    .unwrap();
    assert_eq!(next, start + len);
}

#[test]
fn a_split_of_a_merged_block_takes_its_tables_from_the_stash() {
    let mut tp = TestPool::new(64);
    let mut s2 = new_stage2(&mut tp, 40, 5);
    let pool = &mut tp.pool;
    let owned = PageState::Owned;
    s2.map(pool, G1, G1, RAM, S2Attrs::NORMAL_RWX, owned)
        .unwrap();
    assert_eq!(s2.stats().table_pages, 0);
    let page = G1 + 5 * M2 + 7 * K4;
    let only = |shared: u64| {
        move |ipa: u64| {
            let state = if ipa == shared {
                PageState::SharedOwned
            } else {
                owned
            };
            (RAM + ipa - G1, state)
        }
    };
    let free0 = pool.free_pages();

    // Split (two fresh tables), then merge: both tables stashed.
    s2.set_state(pool, page, K4, PageState::SharedOwned)
        .unwrap();
    assert_eq!(s2.stats().table_pages, 2);
    assert_eq!((pool.stashed(), pool.free_pages()), (0, free0 - 2));
    s2.set_state(pool, page, K4, owned).unwrap();
    assert_eq!(s2.stats().table_pages, 0);
    assert_eq!(s2.stats().merges, 2);
    assert_eq!((pool.stashed(), pool.free_pages()), (2, free0));
    check_accounting(&s2, pool).unwrap();
    let l = s2.lookup(pool, page).unwrap();
    assert_eq!((l.ipa, l.level), (G1, 1), "one 1G block again");

    // The same split again: both tables come from the stash.
    s2.set_state(pool, page, K4, PageState::SharedOwned)
        .unwrap();
    assert_eq!(s2.stats().table_pages, 2);
    assert_eq!(s2.stats().splits, 4);
    assert_eq!((pool.stashed(), pool.free_pages()), (0, free0 - 2));
    check_accounting(&s2, pool).unwrap();
    let l = s2.lookup(pool, page).unwrap();
    assert_eq!((l.ipa, l.level), (page, 3));
    assert_eq!(l.pa_of(page), Some(RAM + 5 * M2 + 7 * K4));
    let l = s2.lookup(pool, page + K4).unwrap();
    assert_eq!(
        (l.level, l.pa_of(page + K4)),
        (3, Some(RAM + 5 * M2 + 8 * K4))
    );
    let l = s2.lookup(pool, G1 + 6 * M2 + K4).unwrap();
    assert_eq!((l.ipa, l.level), (G1 + 6 * M2, 2));
    assert_eq!(l.pa_of(G1 + 6 * M2 + K4), Some(RAM + 6 * M2 + K4));
    check_pages(&s2, pool, G1, G1, only(page));
    let audit = s2.audit(pool, 0, 1 << 40).unwrap();
    assert_eq!(
        (audit.table_pages, audit.non_canonical, audit.miscounted),
        (2, None, None)
    );

    // Merge again, then change a page of another 2M of the same 1G block
    // through the page path: the level-2 table is the same, the level-3
    // table subdivides another 2M block.
    s2.set_state(pool, page, K4, owned).unwrap();
    assert_eq!((pool.stashed(), s2.stats().table_pages), (2, 0));
    let other = G1 + 300 * M2 + 511 * K4;
    let walk = s2.walk_page(pool, other).unwrap();
    let change = Change::State(PageState::SharedOwned);
    assert_eq!(s2.page_pages_needed(&walk, change), Ok(2));
    s2.change_page(pool, &walk, change).unwrap();
    assert_eq!(s2.stats().table_pages, 2);
    assert_eq!(pool.stashed(), 1, "only the level-2 table is reused");
    assert_eq!(pool.free_pages(), free0 - 2);
    check_accounting(&s2, pool).unwrap();
    check_pages(&s2, pool, G1, G1, only(other));
    let audit = s2.audit(pool, 0, 1 << 40).unwrap();
    assert_eq!(
        (audit.table_pages, audit.non_canonical, audit.miscounted),
        (2, None, None)
    );

    // The first page again, while `other` is shared: its 2M block splits
    // into the stashed level-3 table.
    s2.set_state(pool, page, K4, PageState::SharedOwned)
        .unwrap();
    assert_eq!(s2.stats().table_pages, 3);
    assert_eq!(pool.stashed(), 0);
    check_pages(&s2, pool, G1, G1, |ipa| {
        let state = if ipa == page || ipa == other {
            PageState::SharedOwned
        } else {
            owned
        };
        (RAM + ipa - G1, state)
    });

    // Back to one block page by page: each table merges on its own and
    // is stashed, and nothing leaked.
    s2.set_state(pool, page, K4, owned).unwrap();
    assert_eq!((s2.stats().table_pages, pool.stashed()), (2, 1));
    s2.set_state(pool, other, K4, owned).unwrap();
    assert_eq!((s2.stats().table_pages, pool.stashed()), (0, 3));
    assert_eq!(pool.free_pages(), free0);
    check_accounting(&s2, pool).unwrap();
    check_pages(&s2, pool, G1, G1, only(0));
    s2.destroy(pool).unwrap();
    assert_eq!(pool.free_pages(), pool.total_pages());
}
