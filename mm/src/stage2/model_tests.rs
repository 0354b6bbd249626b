//! Model-checked tests of the stage-2 engine: its TLB maintenance against a
//! worst-case model of the TLBs and walk caches, and its page path
//! ([`Stage2::walk_page`], [`Stage2::plan_page`], [`Stage2::commit_page`])
//! against its range path ([`Stage2::apply`]).
//!
//! The stage 2 under test runs with [`ModelTlb`] as its `TlbMaintenance`,
//! which assumes of the hardware no more than the architecture promises:
//! - a table walker may read any descriptor it can reach at any time, and
//!   cache every valid leaf and every table descriptor (a walk-cache entry)
//!   it read until an invalidation drops it; walks also start from the
//!   walk-cache entries it holds, a stale one included (whose table may
//!   have been freed and reused since);
//! - stores are not ordered for the walker until `publish_writes` (DSB):
//!   until then it may read, for each descriptor, any value the descriptor
//!   held since the last publish. The model sees the engine's stores by
//!   comparing the pool's memory at each maintenance call, so it knows the
//!   values a descriptor had at those calls (not between two of them);
//! - `invalidate_ipa` with a level drops the leaves of that level that
//!   cover the IPA and no walk-cache entry; without a level, every entry
//!   covering the IPA; `invalidate_vmid` drops everything.
//!
//! It flags, as errors of the operation running:
//! - two cached entries that translate an address differently (the
//!   break-before-make violations): two leaves at the same place that
//!   differ in more than permissions, access flag and software bits; two
//!   different tables, or a leaf and a table, at the same place; a block
//!   cached together with anything below it;
//! - an invalidation while a store the walker can see is unpublished;
//! - an operation that ends with a store the walker can see unpublished,
//!   or with a cached entry that the tables no longer hold.
//!
//! Beside it, every operation also runs through the range path of a twin
//! stage 2 (its own pool of the same size, no TLB), and the two must end
//! with the same result, the same tables down to every descriptor (table
//! addresses and run-break counts included), the same statistics and the
//! same stash, each stashed table holding the subdivision it is kept for;
//! [`Stage2::audit`] must find the tables canonical and their counts right.

use core::hash::{BuildHasherDefault, Hasher};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::*;
use crate::pool::PAGE_SIZE;
use crate::tlb::NoTlb;

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;
/// Where every pool pretends its memory sits physically (both pools of a
/// [`Rig`] alike, so the page and range paths allocate the same addresses).
const POOL_PA: u64 = 0x8000_0000;
/// Pages of a pool (a power of two, its alignment): enough for every
/// scenario's tables, root (up to 16 pages) and stash.
const POOL_PAGES: usize = 64;
/// Output addresses of the mappings.
const RAM: u64 = 0x40_0000_0000;
const VMID: Vmid = 7;
/// Errors kept per scenario (the first ones tell the story).
const MAX_ERRORS: usize = 20;

/// Zeroed host memory backing a pool at [`POOL_PA`], freed on drop.
struct PoolMemory {
    ptr: *mut u64,
    layout: Layout,
}

impl PoolMemory {
    fn new() -> (Self, PagePool) {
        // Aligned to its size: the buddy allocator splits it the same way
        // wherever it is, so equal changes allocate equal addresses.
        let size = POOL_PAGES * PAGE_SIZE;
        let layout = Layout::from_size_align(size, size).unwrap();
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        let mut pool = PagePool::new((ptr as usize).wrapping_sub(POOL_PA as usize)).unwrap();
        // SAFETY: the allocation is the pool's alone until drop (the model
        // only reads it), reachable at `POOL_PA` plus the pool's offset.
        unsafe { pool.add_range(POOL_PA, POOL_PAGES * PAGE_SIZE).unwrap() };
        (
            Self {
                ptr: ptr.cast(),
                layout,
            },
            pool,
        )
    }
}

impl Drop for PoolMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.cast(), self.layout) };
    }
}

/// A place the TLBs cache entries for: a level and the first IPA of the
/// entries there.
type Place = (u8, u64);

/// What the model caches for a place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Cached {
    /// A valid leaf descriptor, with its ownership state cleared (no TLB
    /// holds it).
    Leaf(u64),
    /// A walk-cache entry: the address of the next-level table.
    Walk(u64),
}

/// A multiplicative hasher for the model's integer keys: the model looks
/// up every entry the walker can reach at each fill, which the standard
/// hasher makes several times slower.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // The product's low bits are poor (the keys' low bits are mostly
        // 0), and the table indexes by the low bits.
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<KeyHasher>>;

/// The model of every TLB and walk cache of the VMID (see the module
/// documentation), as the `TlbMaintenance` of the stage 2 under test.
struct ModelTlb {
    /// The pool's memory, [`POOL_PAGES`] pages from [`POOL_PA`].
    mem: *const u64,
    /// The pool's memory at the last maintenance call.
    seen: Vec<u64>,
    /// For each word stored to since the last publish (by index in
    /// `seen`), the other values it had at maintenance calls since: the
    /// walker may still read any of them. `pending_pages` marks the pages
    /// that hold such words.
    pending: FastMap<usize, Vec<u64>>,
    pending_pages: Vec<bool>,
    root: u64,
    start_level: u8,
    root_entries: usize,
    /// What is cached, and the places that hold anything in IPA order
    /// (for finding what a block covers).
    cache: FastMap<Place, Vec<Cached>>,
    places: BTreeSet<(u64, u8)>,
    /// Table pages the walker could read at the last fill.
    reachable: FastSet<u64>,
    /// Entries were dropped since the last fill: the walker may refill.
    refill: bool,
    /// A store the walker can see was made since the last publish.
    unpublished: bool,
    /// The operation running, and its maintenance calls so far.
    op: String,
    calls: usize,
    errors: Vec<String>,
}

impl ModelTlb {
    /// A model of the caches of a stage 2 whose pool's memory is `mem`,
    /// to [`attach`](Self::attach) once the stage 2 exists.
    fn new(mem: &PoolMemory) -> Self {
        Self {
            mem: mem.ptr,
            seen: Vec::new(),
            pending: FastMap::default(),
            pending_pages: vec![false; POOL_PAGES],
            root: 0,
            start_level: 0,
            root_entries: 0,
            cache: FastMap::default(),
            places: BTreeSet::new(),
            reachable: FastSet::default(),
            refill: false,
            unpublished: false,
            op: String::from("creation"),
            calls: 0,
            errors: Vec::new(),
        }
    }

    /// Starts modelling the stage 2 with root `root` and geometry `g`:
    /// the walker caches all it can reach from then on.
    fn attach(&mut self, root: u64, g: Geometry) {
        self.root = root;
        self.start_level = g.start_level;
        self.root_entries = g.root_entries();
        self.seen = self.memory().to_vec();
        self.fill();
    }

    /// The pool's memory as it is now.
    fn memory(&self) -> &[u64] {
        // SAFETY: `mem` is the `PoolMemory` of the rig that owns this model
        // (alive as long as the model), zero-initialised; the engine stores
        // to it only while it runs, never while the model looks.
        unsafe { core::slice::from_raw_parts(self.mem, POOL_PAGES * PAGE_SIZE / 8) }
    }

    fn error(&mut self, what: String) {
        if self.errors.len() < MAX_ERRORS {
            let call = self.calls;
            self.errors
                .push(format!("[{}, maintenance call {call}] {what}", self.op));
        }
    }

    /// Starts observing operation `op` (described for the errors).
    fn begin(&mut self, op: String) {
        self.op = op;
        self.calls = 0;
        if self.absorb_stores() {
            self.error("stores between operations".into());
        }
    }

    /// Ends the operation: every store the walker can see must have been
    /// published, and every cached entry must be in the tables.
    fn end(&mut self) {
        let visible = self.absorb_stores();
        if visible || self.unpublished {
            self.error("the operation ended with unpublished stores".into());
        }
        if visible || self.unpublished || self.refill {
            self.fill();
        }
        let mut stale: Vec<(Place, Cached)> = self
            .cache
            .iter()
            .flat_map(|(&place, v)| v.iter().map(move |&c| (place, c)))
            .filter(|&(place, c)| self.holds(place) != Some(c))
            .collect();
        stale.sort_unstable_by_key(|&((level, base), _)| (base, level));
        for ((level, base), c) in stale.into_iter().take(5) {
            self.error(format!(
                "cached after the operation: L{level} {base:#x} {c:x?}"
            ));
        }
    }

    /// What the tables hold for `place` now, as the walker would cache it.
    fn holds(&self, (level, base): Place) -> Option<Cached> {
        let mut table = self.root;
        for l in self.start_level..=level {
            let first = (table.checked_sub(POOL_PA)? / 8) as usize;
            let pte = Pte(*self
                .seen
                .get(first + entry_index(base, l, self.start_level))?);
            if !pte.is_table(l) {
                let leaf = pte.is_valid() && l == level;
                return leaf.then(|| Cached::Leaf(pte.with_state(PageState::Owned).0));
            }
            if l == level {
                return Some(Cached::Walk(pte.addr()));
            }
            table = pte.addr();
        }
        None
    }

    /// Takes in the stores made since the last call: each changed word's
    /// earlier value stays readable until the next publish. Returns
    /// whether a store was to a table the walker could read.
    fn absorb_stores(&mut self) -> bool {
        // SAFETY: as in `memory` (not borrowing `self`, whose record of
        // the memory this updates); the slice does not outlive the call.
        let now = unsafe { core::slice::from_raw_parts(self.mem, self.seen.len()) };
        let words = PAGE_SIZE / 8;
        let mut visible = false;
        for (page, (now, seen)) in now
            .chunks(words)
            .zip(self.seen.chunks_mut(words))
            .enumerate()
        {
            if now == seen {
                continue;
            }
            visible |= self
                .reachable
                .contains(&(POOL_PA + (page * PAGE_SIZE) as u64));
            self.pending_pages[page] = true;
            for (j, (&new, old)) in now.iter().zip(seen.iter_mut()).enumerate() {
                if new != *old {
                    let values = self.pending.entry(page * words + j).or_default();
                    if !values.contains(old) {
                        values.push(*old);
                    }
                    *old = new;
                }
            }
        }
        visible
    }

    /// Caches everything the walker can reach now (from the root and from
    /// the cached walk entries, reading each descriptor as any value it
    /// may hold), checking each new entry against the cache.
    fn fill(&mut self) {
        let mut found = Vec::new();
        let mut tables = FastSet::default();
        self.walk(
            self.root,
            self.start_level,
            0,
            self.root_entries,
            &mut found,
            &mut tables,
        );
        let walks: Vec<(Place, u64)> = self
            .cache
            .iter()
            .flat_map(|(&place, v)| {
                v.iter().filter_map(move |c| match *c {
                    Cached::Walk(table) => Some((place, table)),
                    Cached::Leaf(_) => None,
                })
            })
            .collect();
        for ((level, base), table) in walks {
            self.walk(table, level + 1, base, ENTRIES, &mut found, &mut tables);
        }
        let root_pages = self.root_entries.div_ceil(ENTRIES) as u64;
        self.reachable = tables
            .into_iter()
            .flat_map(|(table, _, _)| {
                let pages = if table == self.root { root_pages } else { 1 };
                (0..pages).map(move |p| table + p * PAGE_SIZE as u64)
            })
            .collect();
        for (place, c) in found {
            if !self.cache.get(&place).is_some_and(|v| v.contains(&c)) {
                self.conflicts(place, c);
                self.cache.entry(place).or_default().push(c);
                self.places.insert((place.1, place.0));
            }
        }
        self.refill = false;
    }

    /// Appends to `out` the entries reachable from table `table` at
    /// `level` (based at `base`, with `entries` entries), reading each
    /// descriptor as any value it may hold. `tables` holds the tables
    /// walked so far (walked once each).
    fn walk(
        &self,
        table: u64,
        level: u8,
        base: u64,
        entries: usize,
        out: &mut Vec<(Place, Cached)>,
        tables: &mut FastSet<(u64, u8, u64)>,
    ) {
        let pool = POOL_PA..POOL_PA + (POOL_PAGES * PAGE_SIZE) as u64;
        if !pool.contains(&table) || !tables.insert((table, level, base)) {
            return;
        }
        let first = ((table - POOL_PA) / 8) as usize;
        for j in 0..entries {
            let word = first + j;
            let entry_base = base + ((j as u64) << level_shift(level));
            let earlier = if self.pending_pages[word * 8 / PAGE_SIZE] {
                self.pending.get(&word).map_or(&[][..], Vec::as_slice)
            } else {
                &[]
            };
            for &value in core::iter::once(&self.seen[word]).chain(earlier) {
                let pte = Pte(value);
                if pte.is_table(level) {
                    out.push(((level, entry_base), Cached::Walk(pte.addr())));
                    self.walk(pte.addr(), level + 1, entry_base, ENTRIES, out, tables);
                } else if pte.is_valid() {
                    let leaf = pte.with_state(PageState::Owned).0;
                    out.push(((level, entry_base), Cached::Leaf(leaf)));
                }
            }
        }
    }

    /// Flags what entry `c`, about to be cached for `place`, conflicts
    /// with in the cache.
    fn conflicts(&mut self, place: Place, c: Cached) {
        let (level, base) = place;
        let mut found = Vec::new();
        for &other in self.cache.get(&place).into_iter().flatten() {
            let compatible = match (c, other) {
                (Cached::Leaf(a), Cached::Leaf(b)) => Pte(a).bbm_free_change(Pte(b)),
                _ => false,
            };
            if !compatible {
                found.push(format!("L{level} {base:#x}: {c:x?} and {other:x?}"));
            }
        }
        for up in self.start_level..level {
            let up_base = base & !(level_size(up) - 1);
            for other in self.cache.get(&(up, up_base)).into_iter().flatten() {
                if matches!(other, Cached::Leaf(_)) {
                    found.push(format!(
                        "L{level} {base:#x} {c:x?} under L{up} {up_base:#x} {other:x?}"
                    ));
                }
            }
        }
        if matches!(c, Cached::Leaf(_)) {
            // Past the place itself, only deeper places start inside it.
            let inside = (base, level + 1)..(base + level_size(level), 0);
            if let Some(&(b, l)) = self.places.range(inside).next() {
                found.push(format!(
                    "L{level} {base:#x} {c:x?} over L{l} {b:#x} {:x?}",
                    self.cache[&(l, b)]
                ));
            }
        }
        for f in found {
            self.error(format!("conflicting TLB entries: {f}"));
        }
    }

    /// One maintenance call (an invalidation or not): takes in the stores
    /// made since the last call, and checks that none the walker can see
    /// is unpublished at an invalidation.
    fn call(&mut self, invalidation: bool) {
        self.calls += 1;
        self.unpublished |= self.absorb_stores();
        if invalidation && self.unpublished {
            self.error("invalidation before the stores it covers were published".into());
        }
    }

    /// Drops what `drop` says of the entries cached for `place`.
    fn invalidate(&mut self, place: Place, drop: impl Fn(Cached) -> bool) {
        if let Some(v) = self.cache.get_mut(&place) {
            v.retain(|&c| !drop(c));
            if v.is_empty() {
                self.cache.remove(&place);
                self.places.remove(&(place.1, place.0));
            }
            self.refill = true;
        }
    }
}

impl TlbMaintenance for ModelTlb {
    /// Caches what the walker may have read since the last publish (the
    /// values it may have read are all pending until now, so filling here
    /// is as good as filling at every call in between), then forgets the
    /// values the stores replaced.
    fn publish_writes(&mut self) {
        self.call(false);
        if self.unpublished || self.refill {
            self.fill();
        }
        self.pending.clear();
        self.pending_pages.fill(false);
        self.unpublished = false;
    }

    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: u64, hint: Option<u8>) {
        assert_eq!(vmid, VMID);
        self.call(true);
        for level in self.start_level..=LEAF_LEVEL {
            let place = (level, ipa & !(level_size(level) - 1));
            self.invalidate(place, |c| match c {
                Cached::Leaf(_) => hint.is_none_or(|h| h == level),
                Cached::Walk(_) => hint.is_none(),
            });
        }
    }

    fn invalidate_vmid(&mut self, vmid: Vmid) {
        assert_eq!(vmid, VMID);
        self.call(true);
        self.cache.clear();
        self.places.clear();
        self.refill = true;
    }

    fn complete(&mut self, vmid: Vmid) {
        assert_eq!(vmid, VMID);
        self.call(false);
    }
}

/// Every entry of a stage 2, tables included, in walk order: (level,
/// first IPA, descriptor).
fn dump<T: TlbMaintenance>(s2: &Stage2<T>, pool: &PagePool) -> Vec<(u8, u64, u64)> {
    fn table(
        pool: &PagePool,
        t: u64,
        level: u8,
        base: u64,
        n: usize,
        out: &mut Vec<(u8, u64, u64)>,
    ) {
        for j in 0..n {
            let pte = read(pool, t, j);
            let entry_base = base + ((j as u64) << level_shift(level));
            out.push((level, entry_base, pte.0));
            if pte.is_table(level) {
                table(pool, pte.addr(), level + 1, entry_base, ENTRIES, out);
            }
        }
    }
    let mut out = Vec::new();
    let g = s2.geometry;
    table(pool, s2.root, g.start_level, 0, g.root_entries(), &mut out);
    out
}

/// A stage 2 under the model and its twin, changed alike: the first
/// through the page path for single pages, the twin always through the
/// range path.
struct Rig {
    s2: Stage2<ModelTlb>,
    pool: PagePool,
    twin: Stage2<NoTlb>,
    twin_pool: PagePool,
    /// Page-path changes that merged, by (level of the leaf they left,
    /// whether it is valid).
    merges: BTreeMap<(u8, bool), usize>,
    errors: Vec<String>,
    // Last: freed after everything using them.
    _mem: PoolMemory,
    _twin_mem: PoolMemory,
}

impl Rig {
    fn new(ipa_bits: u8) -> Self {
        let g = Geometry::new(ipa_bits).unwrap();
        let (mem, mut pool) = PoolMemory::new();
        let (twin_mem, mut twin_pool) = PoolMemory::new();
        let mut s2 = Stage2::new(g, VMID, &mut pool, ModelTlb::new(&mem)).unwrap();
        s2.tlb.attach(s2.root, g);
        let twin = Stage2::new(g, VMID, &mut twin_pool, NoTlb).unwrap();
        Self {
            s2,
            pool,
            twin,
            twin_pool,
            merges: BTreeMap::new(),
            errors: Vec::new(),
            _mem: mem,
            _twin_mem: twin_mem,
        }
    }

    /// Applies `change` to page `ipa` through the page path (walk, plan,
    /// commit), checking the plan's page count against the range path's.
    fn page(&mut self, ipa: u64, change: Change) -> Result<(), MmError> {
        let op = format!("{change:x?} to page {ipa:#x}");
        self.s2.tlb.begin(op.clone());
        let walk = self.s2.walk_page(&self.pool, ipa);
        let res = walk.and_then(|walk| {
            let plan = self.s2.plan_page(&walk, change)?;
            let needed = self.twin.pages_needed(&self.twin_pool, ipa, K4, change);
            if needed != Ok(plan.pages()) {
                self.fail(
                    &op,
                    format!("plans {} pages, range path {needed:?}", plan.pages()),
                );
            }
            self.s2.commit_page(&mut self.pool, &walk, &plan)?;
            let leaf = self.s2.lookup(&self.pool, ipa)?;
            if walk.level == LEAF_LEVEL && leaf.level < LEAF_LEVEL {
                let valid = matches!(leaf.kind, LeafKind::Mapped { .. });
                *self.merges.entry((leaf.level, valid)).or_default() += 1;
            }
            Ok(())
        });
        self.s2.tlb.end();
        self.compare(&op, res, ipa, K4, change);
        res
    }

    /// Applies `change` to `[ipa, ipa + len)` through the range path.
    fn range(&mut self, ipa: u64, len: u64, change: Change) -> Result<(), MmError> {
        let op = format!("{change:x?} to [{ipa:#x}, {:#x})", ipa + len);
        self.s2.tlb.begin(op.clone());
        let res = self.s2.apply(&mut self.pool, ipa, ipa + len, change);
        self.s2.tlb.end();
        self.compare(&op, res, ipa, len, change);
        res
    }

    /// Records an error of operation `op`.
    fn fail(&mut self, op: &str, what: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(format!("[{op}] {what}"));
        }
    }

    /// Applies the change to the twin and compares the two.
    fn compare(&mut self, op: &str, res: Result<(), MmError>, ipa: u64, len: u64, change: Change) {
        let twin_res = self.twin.apply(&mut self.twin_pool, ipa, ipa + len, change);
        if res != twin_res {
            self.fail(op, format!("result {res:?}, range path {twin_res:?}"));
        }
        if res == Err(MmError::NoMemory) {
            self.fail(op, "out of table pages: POOL_PAGES is too small".into());
        }
        let (stats, twin_stats) = (self.s2.stats(), self.twin.stats());
        if stats != twin_stats {
            self.fail(op, format!("stats {stats:?}, range path {twin_stats:?}"));
        }
        let (ours, theirs) = (
            dump(&self.s2, &self.pool),
            dump(&self.twin, &self.twin_pool),
        );
        if ours != theirs {
            let first = ours.iter().zip(&theirs).find(|(a, b)| a != b);
            self.fail(op, format!("tables differ: {first:x?} (ours, range path)"));
        }
        let stash: Vec<_> = self.pool.stash_entries().collect();
        let twin_stash: Vec<_> = self.twin_pool.stash_entries().collect();
        if stash != twin_stash {
            self.fail(op, format!("stash {stash:x?}, range path {twin_stash:x?}"));
        }
        for &(pa, leaf, level) in &stash {
            let wrong =
                (0..ENTRIES).find(|&i| read(&self.pool, pa, i) != Pte(leaf).child(level, i));
            if let Some(i) = wrong {
                self.fail(
                    op,
                    format!("stashed table {pa:#x} for L{level} {leaf:#x}: entry {i} is wrong"),
                );
            }
        }
        let (free, twin_free) = (self.pool.free_pages(), self.twin_pool.free_pages());
        if free != twin_free {
            self.fail(op, format!("{free} free pages, range path {twin_free}"));
        }
        let audit = self
            .s2
            .audit(&self.pool, 0, self.s2.geometry.ipa_size())
            .unwrap();
        if audit.non_canonical.is_some() || audit.miscounted.is_some() {
            self.fail(op, format!("{audit:x?}"));
        }
        let model_errors = core::mem::take(&mut self.s2.tlb.errors);
        let room = MAX_ERRORS.saturating_sub(self.errors.len());
        self.errors.extend(model_errors.into_iter().take(room));
    }

    /// Stores `pte` in the entry at `level` on the path to `ipa`, as a
    /// broken engine might.
    fn store(&mut self, ipa: u64, level: u8, pte: Pte) {
        let walk = self.s2.walk_page(&self.pool, ipa).unwrap();
        let at = walk.slot(level, self.s2.geometry.root_entries());
        write(&self.pool, at.table, at.index, pte);
    }

    /// Checks that the table at `level` on the path to `ipa` has its
    /// run-break count saturated (the scenario does what it says).
    fn assert_saturated(&self, ipa: u64, level: u8) {
        let walk = self.s2.walk_page(&self.pool, ipa).unwrap();
        assert!(walk.level >= level, "no table at L{level} for {ipa:#x}");
        let count = walk.table_count(level);
        assert_eq!(count, BREAKS_UNKNOWN, "L{level} table for {ipa:#x}");
    }

    /// The level of the leaf mapping `ipa` now.
    fn level_of(&self, ipa: u64) -> u8 {
        self.s2.lookup(&self.pool, ipa).unwrap().level
    }

    /// Fails the test with every error found.
    fn assert_clean(&self, scenario: &str) {
        assert!(self.errors.is_empty(), "{scenario}: {:#?}", self.errors);
    }
}

/// A deterministic pseudo-random sequence (a 64-bit LCG, upper bits).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    /// One of `items`, the first three times as often as each other.
    fn mostly_first<T: Copy>(&mut self, items: [T; 2]) -> T {
        items[usize::from(self.below(4) == 0)]
    }
}

/// `steps` random changes in a 2 GiB window of a stage 2 of `ipa_bits`
/// (near its bottom, or with `high` at the top of its IPA space, where the
/// root index is largest):
/// mostly single pages next to table edges (the first, second, middle and
/// last two entries at each level), some larger ranges, and undoing
/// earlier page changes (which makes the page path merge).
fn random_changes(ipa_bits: u8, seed: u64, steps: usize, high: bool) -> Rig {
    let mut rig = Rig::new(ipa_bits);
    let mut r = Lcg(seed);
    let window = match (high, ipa_bits > 32) {
        (true, _) => (1u64 << ipa_bits) - 2 * G1,
        (false, true) => G1,
        (false, false) => 0,
    };
    let edges = [0, 1, 255, 510, 511];
    // Page changes that can be undone: the page and what mapped it before.
    let mut undo: Vec<(u64, Leaf)> = Vec::new();
    for _ in 0..steps {
        let ipa = window
            + r.below(2) * G1
            + edges[r.below(5) as usize] * M2
            + edges[r.below(5) as usize] * K4;
        if !undo.is_empty() && r.below(3) == 0 {
            let (ipa, leaf) = undo.swap_remove(r.below(undo.len() as u64) as usize);
            let change = match leaf.kind {
                LeafKind::Mapped { pa, attrs, state } => Change::Map {
                    ipa,
                    pa: pa + (ipa - leaf.ipa),
                    attrs,
                    state,
                },
                LeafKind::Unmapped(a) => Change::Unmap(a),
            };
            // Refusals are checked against the range path like the rest.
            let _ = rig.page(ipa, change);
            continue;
        }
        let len = if r.below(10) < 7 {
            K4
        } else {
            [K4, M2, G1, 3 * M2][r.below(4) as usize]
        };
        let ipa = ipa & !(len.min(G1) - 1);
        let change = match r.below(4) {
            0 | 1 => {
                // Output misaligned for blocks, for pages only.
                let shift = [0, 0, 0, 0, 0, K4, M2][r.below(7) as usize];
                let shift = if len > K4 && shift == K4 { 0 } else { shift };
                Change::Map {
                    ipa,
                    pa: RAM + (ipa - window) + shift,
                    attrs: r.mostly_first([S2Attrs::NORMAL_RWX, S2Attrs::DEVICE_RW]),
                    state: r.mostly_first([PageState::Owned, PageState::SharedOwned]),
                }
            }
            2 => Change::Unmap(Annotation(r.mostly_first([0, 1]))),
            _ if r.below(2) == 0 => {
                Change::State(r.mostly_first([PageState::Owned, PageState::SharedOwned]))
            }
            _ => Change::Attrs(r.mostly_first([S2Attrs::NORMAL_RWX, S2Attrs::DEVICE_RW])),
        };
        if len == K4 {
            undo.push((ipa, rig.s2.lookup(&rig.pool, ipa).unwrap()));
            let _ = rig.page(ipa, change);
        } else {
            let _ = rig.range(ipa, len, change);
        }
        if !rig.errors.is_empty() {
            break;
        }
    }
    rig
}

/// `random_changes` from `seeds` seeds, every other one at the top of the
/// IPA space; the page path must have merged to each (level, validity) of
/// `merges` at least once.
fn random_run(ipa_bits: u8, seeds: u64, steps: usize, merges: &[(u8, bool)]) {
    let mut seen = BTreeMap::new();
    for seed in 0..seeds {
        let high = seed % 2 == 1;
        let rig = random_changes(ipa_bits, seed * 7919 + u64::from(ipa_bits), steps, high);
        rig.assert_clean(&format!("{ipa_bits} bits, seed {seed}, high {high}"));
        for (k, n) in rig.merges {
            *seen.entry(k).or_insert(0) += n;
        }
    }
    for m in merges {
        assert!(
            seen.contains_key(m),
            "{ipa_bits} bits: no page-path merge to {m:?} (merges: {seen:?})"
        );
    }
}

#[test]
fn random_changes_32_bit_ipa() {
    random_run(32, 16, 300, &[(2, false), (2, true)]);
}

#[test]
fn random_changes_40_bit_ipa() {
    random_run(40, 16, 300, &[(1, false), (2, false), (2, true)]);
}

/// Level-1 roots of 8 and 16 concatenated pages (4096 and 8192 entries),
/// and a level-0 root of 32 entries.
#[test]
fn random_changes_42_to_44_bit_ipa() {
    for bits in [42, 43, 44] {
        random_run(bits, 8, 300, &[(2, false), (2, true)]);
    }
}

#[test]
fn random_changes_48_bit_ipa() {
    let merges = [(0, false), (1, false), (1, true), (2, false), (2, true)];
    random_run(48, 16, 300, &merges);
}

/// Sets the state of every other 2 MiB block (those of the other parity
/// than `blk`) of the 1 GiB at `base`: enough breaks to saturate the
/// run-break count of the level-2 table there.
fn stripe_blocks(rig: &mut Rig, base: u64, blk: u64, state: PageState) {
    for m in (1 - blk % 2..512).step_by(2) {
        rig.range(base + m * M2, M2, Change::State(state)).unwrap();
    }
}

/// Sets the state of every other page (of the other parity than `pg`)
/// of the 2 MiB at `base`, through the page path.
fn stripe_pages(rig: &mut Rig, base: u64, pg: u64, state: PageState) {
    for k in (1 - pg % 2..512).step_by(2) {
        rig.page(base + k * K4, Change::State(state)).unwrap();
    }
}

/// Maps `[ipa, ipa + len)` to RAM from its start.
fn map_ram(rig: &mut Rig, ipa: u64, len: u64) {
    let map = Change::Map {
        ipa,
        pa: RAM,
        attrs: S2Attrs::NORMAL_RWX,
        state: PageState::Owned,
    };
    rig.range(ipa, len, map).unwrap();
}

/// A 1 GiB block split by a page change (page `pg` of its 2 MiB block
/// `blk`) while its level-2 table's count is saturated, and with `sat3`
/// the level-3 table's too; undone with the page last, through the page
/// path, which must merge both tables back into the block.
fn saturated_block(ipa_bits: u8, blk: u64, pg: u64, sat3: bool) {
    let mut rig = Rig::new(ipa_bits);
    let (block, page) = (G1 + blk * M2, G1 + blk * M2 + pg * K4);
    map_ram(&mut rig, G1, G1);
    stripe_blocks(&mut rig, G1, blk, PageState::SharedOwned);
    rig.page(page, Change::State(PageState::SharedOwned))
        .unwrap();
    rig.assert_saturated(page, 2);
    if sat3 {
        stripe_pages(&mut rig, block, pg, PageState::SharedOwned);
        rig.assert_saturated(page, 3);
    }
    stripe_blocks(&mut rig, G1, blk, PageState::Owned);
    if sat3 {
        stripe_pages(&mut rig, block, pg, PageState::Owned);
    }
    rig.page(page, Change::State(PageState::Owned)).unwrap();
    let scenario = format!("{ipa_bits} bits, page {blk}:{pg}, level 3 saturated: {sat3}");
    rig.assert_clean(&scenario);
    assert_eq!(rig.level_of(page), 1, "{scenario}: not merged back");
}

#[test]
fn saturated_level2_and_level3_counts_merge_back_to_a_block() {
    for ipa_bits in [40, 48] {
        for (blk, pg) in [(0, 0), (511, 511), (0, 511), (511, 0), (7, 300)] {
            saturated_block(ipa_bits, blk, pg, false);
            saturated_block(ipa_bits, blk, pg, true);
        }
    }
}

/// As `saturated_block` with the level-3 table merged at once (the page
/// changed and restored), and the level-2 stripes undone but one, which
/// is split and restored page by page through the page path: the last
/// page merges both tables back into the block.
fn saturated_block_undone_by_pages(ipa_bits: u8, blk: u64, pg: u64) {
    let mut rig = Rig::new(ipa_bits);
    let page = G1 + blk * M2 + pg * K4;
    map_ram(&mut rig, G1, G1);
    stripe_blocks(&mut rig, G1, blk, PageState::SharedOwned);
    rig.page(page, Change::State(PageState::SharedOwned))
        .unwrap();
    rig.assert_saturated(page, 2);
    rig.page(page, Change::State(PageState::Owned)).unwrap();
    // The stripes are `first`, `first + 2`, ... `last`.
    let first = 1 - blk % 2;
    let last = first + 510;
    for m in (first..last).step_by(2) {
        rig.range(G1 + m * M2, M2, Change::State(PageState::Owned))
            .unwrap();
    }
    for k in 0..512 {
        rig.page(G1 + last * M2 + k * K4, Change::State(PageState::Owned))
            .unwrap();
    }
    let scenario = format!("{ipa_bits} bits, page {blk}:{pg}");
    rig.assert_clean(&scenario);
    assert_eq!(rig.level_of(page), 1, "{scenario}: not merged back");
}

#[test]
fn saturated_level2_count_merges_back_page_by_page() {
    for ipa_bits in [40, 48] {
        for (blk, pg) in [(0, 0), (511, 511), (2, 7)] {
            saturated_block_undone_by_pages(ipa_bits, blk, pg);
        }
    }
}

/// Unmapped space with every other 1 GiB entry of the first 512 GiB
/// annotated (saturating the level-1 table's count where it is not the
/// root), then page `pg` of 2 MiB block `blk` of 1 GiB entry `gi`
/// annotated otherwise through the page path, and every other 2 MiB
/// entry around it (saturating the level-2 table); undone with the page
/// last, which must merge every table on its path up to the root.
fn saturated_unmapped(ipa_bits: u8, gi: u64, blk: u64, pg: u64) {
    let mut rig = Rig::new(ipa_bits);
    let page = gi * G1 + blk * M2 + pg * K4;
    let gigs = 1 << (ipa_bits.min(39) - 30);
    let unmap = |a| Change::Unmap(Annotation(a));
    let annotate_gigs = |rig: &mut Rig, a| {
        for g in (1 - gi % 2..gigs).step_by(2) {
            rig.range(g * G1, G1, unmap(a)).unwrap();
        }
    };
    let annotate_blocks = |rig: &mut Rig, a| {
        for m in (1 - blk % 2..512).step_by(2) {
            rig.range(gi * G1 + m * M2, M2, unmap(a)).unwrap();
        }
    };
    annotate_gigs(&mut rig, 5);
    rig.page(page, unmap(9)).unwrap();
    annotate_blocks(&mut rig, 6);
    rig.assert_saturated(page, 2);
    if rig.s2.geometry.start_level == 0 {
        rig.assert_saturated(page, 1);
    }
    annotate_gigs(&mut rig, 0);
    annotate_blocks(&mut rig, 0);
    rig.page(page, unmap(0)).unwrap();
    let scenario = format!("{ipa_bits} bits, page {gi}:{blk}:{pg}");
    rig.assert_clean(&scenario);
    let root = rig.s2.geometry.start_level;
    assert_eq!(
        rig.level_of(page),
        root,
        "{scenario}: not merged up to the root"
    );
}

#[test]
fn saturated_level1_and_level2_counts_merge_back_to_the_root() {
    for ipa_bits in [48, 40, 36] {
        for (gi, blk, pg) in [(0, 0, 0), (1, 511, 511), (3, 0, 511)] {
            saturated_unmapped(ipa_bits, gi, blk, pg);
        }
    }
}

/// An invalid descriptor, for the broken sequences.
const UNMAPPED: Pte = Pte(0);

/// A broken sequence of stores and maintenance calls, by name, and what
/// the model's error for it says.
type Broken = (&'static str, fn(&mut Rig), &'static str);

/// The model flags each broken sequence of stores and maintenance below
/// (a 2 MiB block at 1 GiB, in a level-2 table, changed by hand).
#[test]
fn model_flags_broken_maintenance() {
    let cases: [Broken; 5] = [
        (
            "a block replaced without a break",
            |rig| {
                let other = Pte::leaf(2, RAM + M2, S2Attrs::NORMAL_RWX, PageState::Owned);
                rig.store(G1, 2, other);
                rig.s2.tlb.publish_writes();
            },
            "conflicting TLB entries",
        ),
        (
            "a block unmapped without an invalidation",
            |rig| {
                rig.store(G1, 2, UNMAPPED);
                rig.s2.tlb.publish_writes();
            },
            "cached after the operation",
        ),
        (
            "an invalidation before the publish",
            |rig| {
                rig.store(G1, 2, UNMAPPED);
                rig.s2.tlb.invalidate_ipa(VMID, G1, Some(2));
                rig.s2.tlb.complete(VMID);
                rig.s2.tlb.publish_writes();
            },
            "invalidation before the stores",
        ),
        (
            "a store never published",
            |rig| rig.store(G1, 2, UNMAPPED),
            "ended with unpublished stores",
        ),
        (
            "a table unlinked with a leaf invalidation only",
            |rig| {
                rig.store(G1, 1, UNMAPPED);
                rig.s2.tlb.publish_writes();
                rig.s2.tlb.invalidate_ipa(VMID, G1, Some(2));
                rig.s2.tlb.complete(VMID);
                rig.s2.tlb.publish_writes();
            },
            "cached after the operation: L1",
        ),
    ];
    for (name, broken, flagged) in cases {
        let mut rig = Rig::new(40);
        map_ram(&mut rig, G1, M2);
        rig.assert_clean("setup");
        rig.s2.tlb.begin(name.into());
        broken(&mut rig);
        rig.s2.tlb.end();
        let errors = &rig.s2.tlb.errors;
        assert!(
            errors.iter().any(|e| e.contains(flagged)),
            "{name}: not flagged as {flagged:?}: {errors:#?}"
        );
    }
}
