//! Shared fixtures of the stage-2 tests: a pool backed by host memory, a TLB
//! that records calls, and the reference model.
#![allow(dead_code)]

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeMap;

use keel_mm::{
    Annotation, Leaf, LeafKind, PagePool, PageState, S2Attrs, Stage2, TlbMaintenance, Vmid,
};

pub const K4: u64 = 1 << 12;
pub const M2: u64 = 1 << 21;
pub const G1: u64 = 1 << 30;

/// Where the tests pretend the pool's memory sits physically.
const FAKE_PA_BASE: u64 = 0x8000_0000;

/// Host memory backing a pool, freed on drop (after the pool).
pub struct TestPool {
    pub pool: PagePool,
    mem: *mut u8,
    layout: Layout,
}

impl TestPool {
    pub fn new(pages: usize) -> Self {
        let layout = Layout::from_size_align(pages * 4096, 1 << 16).unwrap();
        // SAFETY: non-zero size.
        let mem = unsafe { alloc(layout) };
        assert!(!mem.is_null());
        let offset = (mem as usize).wrapping_sub(FAKE_PA_BASE as usize);
        let mut pool = PagePool::new(offset).unwrap();
        // SAFETY: the allocation is ours until drop, at FAKE_PA_BASE + offset.
        unsafe { pool.add_range(FAKE_PA_BASE, pages * 4096).unwrap() };
        Self { pool, mem, layout }
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.mem, self.layout) };
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbEvent {
    Publish,
    Ipa {
        vmid: Vmid,
        ipa: u64,
        level: Option<u8>,
    },
    Vmid(Vmid),
    Complete(Vmid),
}

/// Records every maintenance call.
#[derive(Default, Debug)]
pub struct RecordingTlb {
    pub events: Vec<TlbEvent>,
}

impl TlbMaintenance for RecordingTlb {
    fn publish_writes(&mut self) {
        self.events.push(TlbEvent::Publish);
    }
    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: u64, level: Option<u8>) {
        self.events.push(TlbEvent::Ipa { vmid, ipa, level });
    }
    fn invalidate_vmid(&mut self, vmid: Vmid) {
        self.events.push(TlbEvent::Vmid(vmid));
    }
    fn complete(&mut self, vmid: Vmid) {
        self.events.push(TlbEvent::Complete(vmid));
    }
}

impl RecordingTlb {
    /// The recorded invalidations of `vmid`, indexed for [`Invalidated::covers`].
    pub fn invalidated(&self, vmid: Vmid) -> Invalidated {
        let mut ipas: Vec<(u64, Option<u8>)> = Vec::new();
        let mut all = false;
        for e in &self.events {
            match *e {
                TlbEvent::Vmid(v) if v == vmid => all = true,
                TlbEvent::Ipa {
                    vmid: v,
                    ipa,
                    level,
                } if v == vmid => ipas.push((ipa, level)),
                _ => {}
            }
        }
        ipas.sort_unstable();
        Invalidated { all, ipas }
    }
}

/// Invalidations recorded during one operation.
pub struct Invalidated {
    all: bool,
    ipas: Vec<(u64, Option<u8>)>,
}

impl Invalidated {
    /// Whether they drop any TLB entry of `leaf`: a whole-VMID invalidation,
    /// or one by an IPA inside the leaf with its level (or no level hint).
    pub fn covers(&self, leaf: &Leaf) -> bool {
        if self.all {
            return true;
        }
        let from = self.ipas.partition_point(|&(ipa, _)| ipa < leaf.ipa);
        self.ipas[from..]
            .iter()
            .take_while(|&&(ipa, _)| ipa < leaf.ipa + leaf.size)
            .any(|&(_, level)| level.is_none() || level == Some(leaf.level))
    }
}

/// What the model says about a run of pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Val {
    /// The run's first page maps `pa`, the next `pa + 4K`, ...
    Mapped {
        pa: u64,
        attrs: S2Attrs,
        state: PageState,
    },
    Unmapped(Annotation),
}

impl Val {
    fn advance(self, by: u64) -> Self {
        match self {
            Val::Mapped { pa, attrs, state } => Val::Mapped {
                pa: pa + by,
                attrs,
                state,
            },
            v => v,
        }
    }
}

/// The reference model: page -> translation, stored as runs
/// (start -> (end, value)) covering the whole IPA space.
#[derive(Clone, Debug)]
pub struct Model {
    pub runs: BTreeMap<u64, (u64, Val)>,
    pub size: u64,
}

impl Model {
    pub fn new(size: u64) -> Self {
        let mut runs = BTreeMap::new();
        runs.insert(0, (size, Val::Unmapped(Annotation(0))));
        Self { runs, size }
    }

    fn split_at(&mut self, x: u64) {
        if x >= self.size {
            return;
        }
        let (&s, &(e, v)) = self.runs.range(..=x).next_back().unwrap();
        if s < x {
            self.runs.insert(s, (x, v));
            self.runs.insert(x, (e, v.advance(x - s)));
        }
    }

    pub fn set(&mut self, start: u64, end: u64, v: Val) {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.runs.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            self.runs.remove(&k);
        }
        self.runs.insert(start, (end, v));
    }

    pub fn all_mapped(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end)
            .all(|(_, _, v)| matches!(v, Val::Mapped { .. }))
    }

    pub fn modify(&mut self, start: u64, end: u64, f: impl Fn(Val) -> Val) {
        self.split_at(start);
        self.split_at(end);
        for (_, (_, v)) in self.runs.range_mut(start..end) {
            *v = f(*v);
        }
    }

    /// Runs overlapping `[start, end)`, clipped: (start, end, value at start).
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, Val)> + '_ {
        let first = *self.runs.range(..=start).next_back().unwrap().0;
        self.runs.range(first..end).map(move |(&s, &(e, v))| {
            let a = s.max(start);
            (a, e.min(end), v.advance(a - s))
        })
    }

    pub fn at(&self, ipa: u64) -> Val {
        self.overlapping(ipa, ipa + K4).next().unwrap().2
    }
}

/// The translation leaf `leaf` gives page `ipa`, as a model value.
pub fn leaf_val(leaf: &Leaf, ipa: u64) -> Val {
    match leaf.kind {
        LeafKind::Mapped { pa, attrs, state } => Val::Mapped {
            pa: pa + (ipa - leaf.ipa),
            attrs,
            state,
        },
        LeafKind::Unmapped(a) => Val::Unmapped(a),
    }
}

/// Walks the model's runs in step with leaves visited in IPA order.
pub struct RunCursor<'a> {
    runs: std::iter::Peekable<Box<dyn Iterator<Item = (u64, u64, Val)> + 'a>>,
}

impl<'a> RunCursor<'a> {
    pub fn new(model: &'a Model, start: u64, end: u64) -> Self {
        let it: Box<dyn Iterator<Item = (u64, u64, Val)> + 'a> =
            Box::new(model.overlapping(start, end));
        Self {
            runs: it.peekable(),
        }
    }

    /// Calls `f(page, model value)` for each run piece of `[a, b)`
    /// (increasing calls only); stops early when `f` returns false.
    pub fn pieces(&mut self, mut a: u64, b: u64, mut f: impl FnMut(u64, Val) -> bool) {
        while a < b {
            while let Some(&(_, e, _)) = self.runs.peek() {
                if e <= a {
                    self.runs.next();
                } else {
                    break;
                }
            }
            let Some(&(s, e, v)) = self.runs.peek() else {
                return;
            };
            let v = v.advance(a.max(s) - s);
            if !f(a, v) {
                return;
            }
            a = e.min(b);
        }
    }
}

/// Checks that every page of `[start, end)` translates as the model says.
pub fn check_window<T: TlbMaintenance>(
    s2: &Stage2<T>,
    pool: &PagePool,
    model: &Model,
    start: u64,
    end: u64,
) -> Result<(), String> {
    let mut err = None;
    let mut next = start;
    let mut cursor = RunCursor::new(model, start, end);
    s2.visit_leaves(pool, start, end - start, &mut |leaf| {
        if err.is_some() {
            return;
        }
        let a = leaf.ipa.max(start);
        let b = (leaf.ipa + leaf.size).min(end);
        if a != next {
            err = Some(format!("leaves not contiguous at {a:#x}"));
        }
        next = b;
        cursor.pieces(a, b, |s, v| {
            let got = leaf_val(leaf, s);
            if got != v {
                err = Some(format!(
                    "page {s:#x}: tables {got:?} (leaf {leaf:?}), model {v:?}"
                ));
                return false;
            }
            true
        });
    })
    .map_err(|e| format!("visit: {e:?}"))?;
    if err.is_none() && next != end {
        err = Some(format!("leaves end at {next:#x}, not {end:#x}"));
    }
    err.map_or(Ok(()), Err)
}

/// Whether a leaf's translation of the pages it shares with the model's
/// `[start, end)` differs (ignoring software state, which no TLB caches).
/// Leaves must come in IPA order through the same cursor.
pub fn translation_changed(leaf: &Leaf, cursor: &mut RunCursor<'_>, start: u64, end: u64) -> bool {
    let a = leaf.ipa.max(start);
    let b = (leaf.ipa + leaf.size).min(end);
    let LeafKind::Mapped { pa, attrs, .. } = leaf.kind else {
        return false;
    };
    let mut changed = false;
    cursor.pieces(a, b, |s, v| {
        changed = match v {
            Val::Mapped {
                pa: p, attrs: at, ..
            } => p != pa + (s - leaf.ipa) || at != attrs,
            Val::Unmapped(_) => true,
        };
        !changed
    });
    changed
}

pub fn new_stage2(tp: &mut TestPool, ipa_bits: u8, vmid: Vmid) -> Stage2<RecordingTlb> {
    let g = keel_mm::Geometry::new(ipa_bits).unwrap();
    Stage2::new(g, vmid, &mut tp.pool, RecordingTlb::default()).unwrap()
}

/// Pages in use by `s2` plus free pages equals the pool's pages.
pub fn check_accounting<T: TlbMaintenance>(s2: &Stage2<T>, pool: &PagePool) -> Result<(), String> {
    let st = s2.stats();
    if st.table_pages + st.root_pages + pool.free_pages() != pool.total_pages() {
        return Err(format!("pages leaked: {st:?}, pool {pool:?}"));
    }
    Ok(())
}
