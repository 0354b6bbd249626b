//! Property tests: long random sequences of stage-2 operations checked after
//! every operation against the reference model (translations, accounting,
//! canonical form, TLB invalidations). In the page-path tests, single-page
//! operations go through `walk_page` + `change_page`, and a twin stage 2
//! that applies every operation as a range must agree with it on every
//! translation and counter.
//!
//! `KEEL_MM_PROPTEST_OPS` sets the total number of operations over the
//! tests of this file (default 1,000,000).

mod common;

use common::*;
use keel_mm::{
    Annotation, Change, MemType, MmError, PagePool, PageState, S2Attrs, Shareability, Stage2,
    TlbMaintenance,
};
use proptest::prelude::*;
use proptest::test_runner::Config;

const OPS_PER_CASE: usize = 128;
/// Tests in this file sharing the operation budget.
const TESTS: usize = 5;
/// The IPA window the operations play in: 4 GiB.
const WINDOW: u64 = 4 * G1;

fn cases() -> u32 {
    let total: usize = std::env::var("KEEL_MM_PROPTEST_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    total.div_ceil(TESTS * OPS_PER_CASE).max(1) as u32
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    }
}

const ATTRS: [S2Attrs; 3] = [
    S2Attrs::NORMAL_RWX,
    S2Attrs {
        mem: MemType::NormalWriteBack,
        read: true,
        write: false,
        exec: false,
        shareability: Shareability::Inner,
        access_flag: true,
    },
    S2Attrs::DEVICE_RW,
];
const STATES: [PageState; 3] = [
    PageState::Owned,
    PageState::SharedOwned,
    PageState::SharedBorrowed,
];

#[derive(Clone, Debug)]
enum Op {
    Map {
        ipa: u64,
        len: u64,
        pa_shift: u64,
        attrs: usize,
        state: usize,
    },
    Unmap {
        ipa: u64,
        len: u64,
        annotation: u32,
    },
    Attrs {
        ipa: u64,
        len: u64,
        attrs: usize,
    },
    State {
        ipa: u64,
        len: u64,
        state: usize,
    },
}

/// Takes bounded values off a random word.
struct Bits(u64, u64);

impl Bits {
    fn take(&mut self, n: u64) -> u64 {
        if self.0 < n {
            self.0 = self.1;
            self.1 = 0;
        }
        let v = self.0 % n;
        self.0 /= n;
        v
    }
    fn pick(&mut self, common: &[u64], max: u64) -> u64 {
        let i = self.take(common.len() as u64 + 2);
        match common.get(i as usize) {
            Some(&v) => v,
            None => self.take(max),
        }
    }
}

/// Decodes one operation from two random words (proptest generates and
/// shrinks plain integers far faster than nested strategies). Addresses are
/// offsets from the window base that often sit on block boundaries;
/// lengths are often block sized or one page off.
fn decode(words: (u64, u64), pages_bias: bool) -> Vec<Op> {
    let mut b = Bits(words.0, words.1);
    if pages_bias && b.take(128) == 0 {
        return stripe(&mut b);
    }
    vec![decode_one(&mut b, pages_bias)]
}

/// Pages pushed past what a table's run-break count holds, and back: one
/// 2M block mapped, every other page of 160 changed through the page path
/// (160 breaks), then the same pages back, which makes the table one run
/// again and must rebuild the block.
fn stripe(b: &mut Bits) -> Vec<Op> {
    const PAGES: u64 = 80;
    let block = b.take(4) * G1 + b.pick(&[0, 1, 511], 512) * M2;
    let first = b.pick(&[0, 1], 512 - 2 * PAGES);
    let (attrs, there, back) = (b.take(3) as usize, b.take(3) as usize, b.take(3) as usize);
    let pages = |state| {
        (0..PAGES).map(move |k| Op::State {
            ipa: block + (first + 2 * k) * K4,
            len: K4,
            state,
        })
    };
    core::iter::once(Op::Map {
        ipa: block,
        len: M2,
        pa_shift: 0,
        attrs,
        state: back,
    })
    .chain(pages(there))
    .chain(pages(back))
    .collect()
}

fn decode_one(b: &mut Bits, pages_bias: bool) -> Op {
    let kind = b.take(9);
    // The page-path tests: most operations on one page, around few blocks.
    let single = pages_bias && b.take(4) != 0;
    let ipa = b.take(4) * G1
        + b.pick(&[0, 1, 255, 256, 511], 512) * M2
        + b.pick(&[0, 0, 1, 511], 512) * K4;
    let pages = if single {
        1
    } else if b.take(4) == 0 {
        b.pick(&[262_144, 262_143, 262_145, 524_288], 600_000)
            .max(1)
    } else {
        b.pick(&[1, 2, 511, 512, 513, 1024], 2048).max(1)
    };
    let len = pages * K4;
    match kind {
        0..=3 => Op::Map {
            ipa,
            len,
            pa_shift: [0, 0, 0, K4, M2, 5 * G1][b.take(6) as usize],
            attrs: b.take(3) as usize,
            state: b.take(3) as usize,
        },
        4..=5 => Op::Unmap {
            ipa,
            len,
            annotation: b.take(3) as u32,
        },
        6 => Op::Attrs {
            ipa,
            len,
            attrs: b.take(3) as usize,
        },
        _ => Op::State {
            ipa,
            len,
            state: b.take(3) as usize,
        },
    }
}

fn ops(pages_bias: bool) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(any::<(u64, u64)>(), OPS_PER_CASE).prop_map(move |words| {
        words
            .into_iter()
            .flat_map(|w| decode(w, pages_bias))
            .collect()
    })
}

/// A change of one page through the page path; checks that the walk
/// said how many tables it takes, and that a used walk is stale.
fn page_op<T: TlbMaintenance>(
    s2: &mut Stage2<T>,
    pool: &mut PagePool,
    ipa: u64,
    change: Change,
) -> Result<(), MmError> {
    let walk = s2.walk_page(pool, ipa)?;
    let need = s2.page_pages_needed(&walk, change)?;
    let before = s2.stats();
    s2.change_page(pool, &walk, change)?;
    let after = s2.stats();
    assert!(
        after.table_pages <= before.table_pages + need,
        "the page path took more than the {need} tables it said"
    );
    let now = s2.walk_page(pool, ipa).unwrap();
    if now.leaf() != walk.leaf() || after != before {
        assert_eq!(
            s2.change_page(pool, &walk, change),
            Err(MmError::Stale),
            "a used walk was taken"
        );
    }
    Ok(())
}

/// `change` over `[ipa, ipa + len)` as a range.
fn range_op<T: TlbMaintenance>(
    s2: &mut Stage2<T>,
    pool: &mut PagePool,
    ipa: u64,
    len: u64,
    change: Change,
) -> Result<(), MmError> {
    match change {
        Change::Map {
            pa, attrs, state, ..
        } => s2.map(pool, ipa, len, pa, attrs, state),
        Change::Unmap(a) => s2.unmap(pool, ipa, len, a),
        Change::Attrs(a) => s2.set_attrs(pool, ipa, len, a),
        Change::State(st) => s2.set_state(pool, ipa, len, st),
    }
}

/// Runs one sequence in a `ipa_bits` space whose window starts at `base`;
/// with `page_path`, single-page operations take the page path and a twin
/// applies every operation as a range.
fn run(ops: &[Op], ipa_bits: u8, base: u64, page_path: bool) -> Result<(), String> {
    run_with_pool(ops, ipa_bits, base, page_path, 8192)
}

/// `run` with pools of `pages` pages: small ones make changes fail with
/// `NoMemory` (which must change nothing) and keep the stash busy.
fn run_with_pool(
    ops: &[Op],
    ipa_bits: u8,
    base: u64,
    page_path: bool,
    pages: usize,
) -> Result<(), String> {
    let mut tp = TestPool::new(pages);
    let mut s2 = new_stage2(&mut tp, ipa_bits, 7);
    let mut twin_pool = TestPool::new(pages);
    let mut twin = new_stage2(&mut twin_pool, ipa_bits, 7);
    let size = 1u64 << ipa_bits;
    let mut model = Model::new(size);
    let mut old_leaves = Vec::new();
    for (n, op) in ops.iter().enumerate() {
        let (off, len) = match *op {
            Op::Map { ipa, len, .. }
            | Op::Unmap { ipa, len, .. }
            | Op::Attrs { ipa, len, .. }
            | Op::State { ipa, len, .. } => (ipa, len),
        };
        let start = base + off;
        // Mostly stay inside the window; sometimes run past the IPA space.
        let len = if start + len > base + WINDOW && (start + len <= size || n % 8 != 0) {
            base + WINDOW - start
        } else {
            len
        };
        let end = start + len;
        let before = s2.stats();
        old_leaves.clear();
        let in_space = end <= size;
        if in_space {
            s2.visit_leaves(&tp.pool, start, len, &mut |l| old_leaves.push(*l))
                .unwrap();
        }
        s2.tlb_mut().events.clear();
        let pool = &mut tp.pool;
        let mut twin_result = None;
        let mut apply = |change: Change| {
            if page_path {
                twin_result = Some(range_op(&mut twin, &mut twin_pool.pool, start, len, change));
            }
            if page_path && len == K4 {
                page_op(&mut s2, pool, start, change)
            } else {
                range_op(&mut s2, pool, start, len, change)
            }
        };
        let (result, expect_ok) = match *op {
            Op::Map {
                pa_shift,
                attrs,
                state,
                ..
            } => {
                // A large range mapped misaligned by 4K is 512 pages per 2M:
                // keep those ranges small so checking stays cheap.
                let pa_shift = if pa_shift == K4 && len > 2048 * K4 {
                    M2
                } else {
                    pa_shift
                };
                let pa = 0x40_0000_0000 + off + pa_shift;
                let r = apply(Change::Map {
                    ipa: start,
                    pa,
                    attrs: ATTRS[attrs],
                    state: STATES[state],
                });
                if in_space && r.is_ok() {
                    model.set(
                        start,
                        end,
                        Val::Mapped {
                            pa,
                            attrs: ATTRS[attrs],
                            state: STATES[state],
                        },
                    );
                }
                (r, in_space)
            }
            Op::Unmap { annotation, .. } => {
                let r = apply(Change::Unmap(Annotation(annotation)));
                if in_space && r.is_ok() {
                    model.set(start, end, Val::Unmapped(Annotation(annotation)));
                }
                (r, in_space)
            }
            Op::Attrs { attrs, .. } => {
                let ok = in_space && model.all_mapped(start, end);
                let r = apply(Change::Attrs(ATTRS[attrs]));
                if ok && r.is_ok() {
                    model.modify(start, end, |v| match v {
                        Val::Mapped { pa, state, .. } => Val::Mapped {
                            pa,
                            attrs: ATTRS[attrs],
                            state,
                        },
                        v => v,
                    });
                }
                (r, ok)
            }
            Op::State { state, .. } => {
                let ok = in_space && model.all_mapped(start, end);
                let r = apply(Change::State(STATES[state]));
                if ok && r.is_ok() {
                    model.modify(start, end, |v| match v {
                        Val::Mapped { pa, attrs, .. } => Val::Mapped {
                            pa,
                            attrs,
                            state: STATES[state],
                        },
                        v => v,
                    });
                }
                (r, ok)
            }
        };
        match (result, expect_ok) {
            (Ok(()), true) => {}
            (Err(MmError::NoMemory), _) => {
                if s2.stats() != before || !s2.tlb().events.is_empty() {
                    return Err(format!("op {n} {op:?}: NoMemory but changed something"));
                }
            }
            (Err(e), false) => {
                let want = if in_space {
                    MmError::NotMapped
                } else {
                    MmError::OutOfRange
                };
                if e != want {
                    return Err(format!("op {n} {op:?}: error {e:?}, expected {want:?}"));
                }
                if s2.stats() != before || !s2.tlb().events.is_empty() {
                    return Err(format!("op {n} {op:?}: failed but changed something"));
                }
            }
            (r, _) => return Err(format!("op {n} {op:?}: got {r:?}, expected ok={expect_ok}")),
        }
        check_accounting(&s2, &tp.pool).map_err(|e| format!("op {n} {op:?}: {e}"))?;
        if let Some(r) = twin_result {
            // The page path and the range path agree on everything.
            if r != result || twin.stats() != s2.stats() {
                return Err(format!(
                    "op {n} {op:?}: page path {result:?} {:?}, range path {r:?} {:?}",
                    s2.stats(),
                    twin.stats()
                ));
            }
        }
        if !in_space {
            continue;
        }
        // Every translation that changed or went away was invalidated.
        let invalidated = s2.tlb().invalidated(7);
        let mut cursor = RunCursor::new(&model, start, end);
        for leaf in &old_leaves {
            if translation_changed(leaf, &mut cursor, start, end) && !invalidated.covers(leaf) {
                return Err(format!("op {n} {op:?}: no invalidation for {leaf:?}"));
            }
        }
        // Translations around the change and canonical form of its path.
        let ws = start.saturating_sub(M2) & !(M2 - 1);
        let we = (end + M2).next_multiple_of(M2).min(size);
        check_window(&s2, &tp.pool, &model, ws, we).map_err(|e| format!("op {n} {op:?}: {e}"))?;
        let audit = s2.audit(&tp.pool, ws, we - ws).unwrap();
        if let Some(t) = audit.non_canonical {
            return Err(format!("op {n} {op:?}: table at {t:?} could be a block"));
        }
        if let Some(t) = audit.miscounted {
            return Err(format!(
                "op {n} {op:?}: table at {t:?} has a wrong run-break count"
            ));
        }
    }
    // The whole space, and every table.
    check_window(&s2, &tp.pool, &model, 0, size)?;
    if page_path {
        check_window(&twin, &twin_pool.pool, &model, 0, size)?;
    }
    let audit = s2.audit(&tp.pool, 0, size).unwrap();
    if audit.non_canonical.is_some()
        || audit.miscounted.is_some()
        || audit.table_pages != s2.stats().table_pages
    {
        return Err(format!("final audit {audit:?} vs {:?}", s2.stats()));
    }
    s2.destroy(&mut tp.pool).unwrap();
    if tp.pool.free_pages() != tp.pool.total_pages() {
        return Err("pages leaked after destroy".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// A 40-bit IPA space (2 concatenated level-1 root tables), low window.
    #[test]
    fn random_ops_40bit(ops in ops(false)) {
        if let Err(e) = run(&ops, 40, G1, false) {
            prop_assert!(false, "{}", e);
        }
    }

    /// A 48-bit IPA space (level-0 root), window at the very top.
    #[test]
    fn random_ops_48bit_top(ops in ops(false)) {
        if let Err(e) = run(&ops, 48, (1u64 << 48) - WINDOW, false) {
            prop_assert!(false, "{}", e);
        }
    }

    /// Mostly single pages through the page path, against a twin that
    /// applies them as ranges (40-bit space).
    #[test]
    fn page_path_40bit(ops in ops(true)) {
        if let Err(e) = run(&ops, 40, G1, true) {
            prop_assert!(false, "{}", e);
        }
    }

    /// The page path against the twin with pools of 24 pages: changes
    /// that need more tables than are free fail with NoMemory, the same on
    /// both paths, and change nothing.
    #[test]
    fn page_path_small_pool(ops in ops(true)) {
        if let Err(e) = run_with_pool(&ops, 40, G1, true, 24) {
            prop_assert!(false, "{}", e);
        }
    }

    /// The same at the top of a 48-bit space (level-0 root).
    #[test]
    fn page_path_48bit_top(ops in ops(true)) {
        if let Err(e) = run(&ops, 48, (1u64 << 48) - WINDOW, true) {
            prop_assert!(false, "{}", e);
        }
    }
}
