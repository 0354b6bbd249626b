//! Stage-2 engine figures, one JSON line each:
//! `cargo run --release -p keel-mm --example s2bench`.
//!
//! The convert comparison with aarch64-paging: both sides start from the
//! same 1 GiB block mappings of a 40-bit stage-2 space and then change one
//! 4 KiB page inside each block (software bit 0 for aarch64-paging, the
//! ownership state for us), which splits the block into a level-2 and a
//! level-3 table on both sides. aarch64-paging refuses to split a block of
//! a live table (break-before-make); the best it can do on a live table is
//! deactivate it (VTTBR switch and TLBI VMALLS12E1), modify, reactivate. We
//! time it on an inactive table, i.e. its lower bound, while our side does
//! the full live break-before-make sequence through a no-op TLB (on the
//! build machine aarch64-paging's barriers compile to nothing as well).
//! Fresh tables every round on both sides; only the changes are timed.

use std::alloc::{alloc, Layout};
use std::time::Instant;

use aarch64_paging::descriptor::Stage2Attributes as A;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{MemoryRegion, Stage2 as Regime};
use keel_mm::{Geometry, NoTlb, PagePool, PageState, S2Attrs, Stage2};

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;
const RAM: u64 = 0x40_0000_0000;

fn pool(pages: usize) -> PagePool {
    let layout = Layout::from_size_align(pages * 4096, 1 << 16).unwrap();
    // SAFETY: non-zero size; the memory is leaked to the pool for the run.
    let mem = unsafe { alloc(layout) };
    assert!(!mem.is_null());
    let pa = 0x8000_0000u64;
    let mut pool = PagePool::new((mem as usize).wrapping_sub(pa as usize)).unwrap();
    // SAFETY: the allocation is the pool's alone from now on.
    unsafe { pool.add_range(pa, pages * 4096).unwrap() };
    pool
}

fn metric(name: &str, value: f64, unit: &str) {
    println!("{{\"metric\": \"{name}\", \"value\": {value}, \"unit\": \"{unit}\"}}");
}

fn main() {
    let mut p = pool(64 * 1024);
    let geometry = Geometry::new(40).unwrap();
    let attrs = S2Attrs::NORMAL_RWX;

    // Table figures for one 1 GiB guest.
    let mut s2 = Stage2::new(geometry, 1, &mut p, NoTlb).unwrap();
    s2.map(&mut p, G1, G1, RAM, attrs, PageState::Owned)
        .unwrap();
    let base = s2.stats().table_pages;
    metric("s2_tables_1g_guest", base as f64, "pages");
    let page = G1 + 123 * M2 + 45 * K4;
    s2.set_state(&mut p, page, K4, PageState::SharedOwned)
        .unwrap();
    metric(
        "s2_tables_after_4k_convert_in_1g",
        (s2.stats().table_pages - base) as f64,
        "pages",
    );
    s2.set_state(&mut p, page, K4, PageState::Owned).unwrap();
    metric(
        "s2_tables_after_revert",
        (s2.stats().table_pages - base) as f64,
        "pages",
    );
    s2.destroy(&mut p).unwrap();

    // Per-4K change that splits a 1 GiB block.
    const BLOCKS: u64 = 256;
    const ROUNDS: u32 = 40;
    let flags = A::VALID
        | A::MEMATTR_NORMAL_INNER_WB
        | A::MEMATTR_NORMAL_OUTER_WB
        | A::S2AP_ACCESS_RW
        | A::SH_INNER
        | A::ACCESS_FLAG;
    let (mut ours_ns, mut theirs_ns) = (0u128, 0u128);
    for round in 0..ROUNDS {
        let offset = (u64::from(round) * 7919 % 262_144) * K4;
        let mut s2 = Stage2::new(geometry, 1, &mut p, NoTlb).unwrap();
        s2.map(&mut p, 0, BLOCKS * G1, RAM, attrs, PageState::Owned)
            .unwrap();
        let t = Instant::now();
        for b in 0..BLOCKS {
            s2.set_state(&mut p, b * G1 + offset, K4, PageState::SharedOwned)
                .unwrap();
        }
        ours_ns += t.elapsed().as_nanos();
        s2.destroy(&mut p).unwrap();

        let mut theirs = IdMap::new(1, Regime);
        theirs
            .map_range(&MemoryRegion::new(0, (BLOCKS * G1) as usize), flags)
            .unwrap();
        let t = Instant::now();
        for b in 0..BLOCKS {
            let at = (b * G1 + offset) as usize;
            theirs
                .modify_range(&MemoryRegion::new(at, at + K4 as usize), &|_, d| {
                    d.modify_flags(A::SWFLAG_0, A::empty())
                })
                .unwrap();
        }
        theirs_ns += t.elapsed().as_nanos();
    }
    let changes = f64::from(ROUNDS) * BLOCKS as f64;
    let ours = ours_ns as f64 / changes;
    let theirs = theirs_ns as f64 / changes;
    metric("s2_convert_ns", ours.round(), "ns");
    metric(
        "s2_convert_vs_aarch64_paging",
        (ours / theirs * 1000.0).round() / 1000.0,
        "ratio",
    );

    // 64 GiB in 16 runs of 4 GiB: 8 with 1G-aligned output, 6 only
    // 2M-aligned, 2 only 4K-aligned.
    let mut s2 = Stage2::new(geometry, 1, &mut p, NoTlb).unwrap();
    let t = Instant::now();
    for run in 0..16u64 {
        let shift = match run % 8 {
            0..=3 => 0,
            4..=6 => M2,
            _ => K4,
        };
        let ipa = run * 4 * G1;
        s2.map(
            &mut p,
            ipa,
            4 * G1,
            RAM + ipa + shift,
            attrs,
            PageState::Owned,
        )
        .unwrap();
    }
    metric("s2_map_64g_mixed_ns", t.elapsed().as_nanos() as f64, "ns");
    metric(
        "s2_map_64g_mixed_table_pages",
        s2.stats().table_pages as f64,
        "pages",
    );
    s2.destroy(&mut p).unwrap();
}
