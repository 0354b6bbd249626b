//! Differential test against the aarch64-paging crate for plain mappings:
//! the same map requests give the same translations (and, as both map with
//! the largest blocks alignment allows, the same descriptor attribute bits).

mod common;

use aarch64_paging::descriptor::Stage2Attributes as A;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{Constraints, MemoryRegion, Stage2 as Regime};
use common::*;
use keel_mm::{LeafKind, PageState, S2Attrs};
use proptest::prelude::*;

/// (start, end, pa of start or None if unmapped), merged when contiguous.
type Pieces = Vec<(u64, u64, Option<u64>)>;

fn push(pieces: &mut Pieces, s: u64, e: u64, pa: Option<u64>) {
    if let Some(last) = pieces.last_mut() {
        let contiguous = match (last.2, pa) {
            (Some(lp), Some(p)) => lp + (last.1 - last.0) == p,
            (None, None) => true,
            _ => false,
        };
        if last.1 == s && contiguous {
            last.1 = e;
            return;
        }
    }
    pieces.push((s, e, pa));
}

fn theirs(map: &IdMap<Regime>, start: u64, end: u64) -> Pieces {
    let mut pieces = Pieces::new();
    map.walk_range(
        &MemoryRegion::new(start as usize, end as usize),
        &mut |mr, d, level| {
            let s = (mr.start().0 as u64).max(start);
            let e = (mr.end().0 as u64).min(end);
            if !d.is_valid() {
                push(&mut pieces, s, e, None);
            } else if level == 3 || !d.is_table_or_page() {
                let bits = d.flags() & !(A::VALID | A::TABLE_OR_PAGE);
                assert_eq!(bits, flags() & !A::VALID, "attributes at {s:#x}");
                let base = mr.start().0 as u64;
                push(
                    &mut pieces,
                    s,
                    e,
                    Some(d.output_address().0 as u64 + (s - base)),
                );
            }
            Ok(())
        },
    )
    .unwrap();
    pieces
}

fn ours(
    s2: &keel_mm::Stage2<RecordingTlb>,
    pool: &keel_mm::PagePool,
    start: u64,
    end: u64,
) -> Pieces {
    let mut pieces = Pieces::new();
    s2.visit_leaves(pool, start, end - start, &mut |l| {
        let s = l.ipa.max(start);
        let e = (l.ipa + l.size).min(end);
        let pa = match l.kind {
            LeafKind::Mapped { pa, .. } => Some(pa + (s - l.ipa)),
            LeafKind::Unmapped(_) => None,
        };
        push(&mut pieces, s, e, pa);
    })
    .unwrap();
    pieces
}

/// aarch64-paging's spelling of `S2Attrs::NORMAL_RWX`.
fn flags() -> A {
    A::VALID
        | A::MEMATTR_NORMAL_INNER_WB
        | A::MEMATTR_NORMAL_OUTER_WB
        | A::S2AP_ACCESS_RW
        | A::SH_INNER
        | A::ACCESS_FLAG
}

fn request() -> impl Strategy<Value = (u64, u64)> {
    let start = (0..8u64, 0..512u64, prop_oneof![Just(0u64), 0..512u64])
        .prop_map(|(g, m, p)| g * G1 + m * M2 + p * K4);
    let pages = prop_oneof![1..1024u64, Just(512u64), Just(262_144u64), 1..600_000u64];
    (start, pages).prop_map(|(s, p)| (s, p * K4))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn same_translations_as_aarch64_paging(reqs in proptest::collection::vec(request(), 1..12)) {
        let mut tp = TestPool::new(4096);
        let mut s2 = new_stage2(&mut tp, 40, 1);
        let mut theirs_map = IdMap::new(1, Regime);
        let top = 9 * G1;
        for &(start, len) in &reqs {
            // Identity map: aarch64-paging's IdMap maps each address to itself.
            s2.map(&mut tp.pool, start, len, start, S2Attrs::NORMAL_RWX, PageState::Owned).unwrap();
            theirs_map
                .map_range_with_constraints(&MemoryRegion::new(start as usize, (start + len) as usize), flags(), Constraints::empty())
                .unwrap();
        }
        let mine = ours(&s2, &tp.pool, 0, top);
        prop_assert!(mine.iter().any(|p| p.2.is_some()));
        prop_assert_eq!(mine, theirs(&theirs_map, 0, top));
        s2.destroy(&mut tp.pool).unwrap();
    }
}
