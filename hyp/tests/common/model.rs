//! A reference model of page ownership, written from ABI.md alone (it does
//! not use keel_mm::owner), and a driver that runs the same seeded random
//! calls on the model and on the real hypervisor, comparing every status
//! and, periodically, the state of every page.
//!
//! The model keeps, per RAM page, who owns it and who borrows it; per VM
//! slot, whether it is free, live or dead; per live VM, its IPA map. The
//! hypervisor's internal choices (which pool pages hold tables, mapping
//! sizes) are not modelled: NO_MEMORY is accepted where the model says a
//! call succeeds (and then nothing may change), whether a donated page is
//! in use is asked of the pool, and mapping sizes are checked for
//! consistency (a block only where the model says the range is uniform).

use std::collections::BTreeMap;

use keel_abi::{func, stat, status};
use keel_hyp::guest::Action;
use keel_hyp::mem::PAGE;
use keel_hyp::vm::{Slot, MAX_VCPUS, MAX_VMS};

use super::{Config, Machine, MIB2, RAM_BASE};

const OK: i64 = status::SUCCESS;
const NOT_SUPPORTED: i64 = status::NOT_SUPPORTED;
const INVALID: i64 = status::INVALID_PARAMETER;
const DENIED: i64 = status::DENIED;
const NO_MEMORY: i64 = status::NO_MEMORY;
const BUSY: i64 = status::BUSY;
/// Free pool pages below which a NO_MEMORY where the model expects success
/// is the pool's to give (no call of the generator needs more table pages
/// than this); above it, NO_MEMORY is a wrong answer.
const LOW_POOL: u64 = 64;

const OWNED: u64 = 0;
const SHARED_OWNED: u64 = 1;
const SHARED_BORROWED: u64 = 2;
const NOPAGE: u64 = 3;

const IPA_SIZE: u64 = 1 << 39;
const GIB: u64 = 1 << 30;
/// Guest IPA windows the generator uses for valid addresses: (start, len).
const WINDOWS: [(u64, u64); 3] = [
    (0, 8 << 20),
    (GIB - MIB2, 2 * MIB2),
    (IPA_SIZE - MIB2, MIB2),
];

/// A set of statuses a call may return (bit per status).
pub type Want = u8;

fn want(status: i64) -> Want {
    1 << (-status) as u32
}

fn wants(w: Want) -> String {
    let names = [
        (OK, "OK"),
        (NOT_SUPPORTED, "NOT_SUPPORTED"),
        (INVALID, "INVALID"),
        (DENIED, "DENIED"),
        (NO_MEMORY, "NO_MEMORY"),
        (BUSY, "BUSY"),
    ];
    names
        .iter()
        .filter(|(s, _)| w & want(*s) != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("|")
}

/// What the model checks against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// ABI.md as written.
    Strict,
    /// ABI.md, but each known deviation of the implementation (the
    /// `bug_*` tests of tests/guests.rs) is accepted as well as the ABI's
    /// answer, so that everything else is checked while fixes land:
    /// 1. HOST_RECLAIM of a host page lent to a dead VM is DENIED;
    /// 2. VM_UNSHARE of more than 64 leaves is INVALID (the generator keeps
    ///    VM_UNSHARE to 64 pages);
    /// 3. MEM_STATE of a dead VM's page it had shared with the host says
    ///    NOPAGE although the host still maps it;
    /// 4. guest MEM_SHARE/MEM_UNSHARE of a range with an unmapped IPA is
    ///    INVALID rather than DENIED.
    Tolerant,
}

/// One page of RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum P {
    /// The host's alone.
    Host,
    /// The host's, borrowed by the hypervisor.
    HostSharedHyp,
    /// The host's, borrowed by VM slot `vm` at `ipa`.
    HostLent { vm: usize, ipa: u64 },
    /// The hypervisor's image and boot pool.
    HypImage,
    /// Donated to the hypervisor.
    HypDonated,
    /// VM slot `vm`'s at `ipa`; `shared` with the host, with `pins`.
    Guest {
        vm: usize,
        ipa: u64,
        shared: bool,
        pins: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum VmSlot {
    Free,
    Live { vcpus: u64 },
    Dead,
}

/// The model.
pub struct Model {
    mode: Mode,
    cfg: Config,
    first_pfn: u64,
    pages: Vec<P>,
    slots: Vec<VmSlot>,
    /// Per slot: IPA -> pfn of every mapped guest page (live VMs).
    maps: Vec<BTreeMap<u64, u64>>,
    /// Per slot: pages owned by or lent to the VM.
    owed: Vec<u64>,
    donated: u64,
}

fn handle(vm: usize) -> u64 {
    keel_abi::VM_HANDLE_BASE + vm as u64
}

impl Model {
    pub fn new(cfg: Config, mode: Mode) -> Self {
        let first_pfn = RAM_BASE / PAGE;
        let pages = (RAM_BASE..cfg.ram_end())
            .step_by(PAGE as usize)
            .map(|pa| {
                if pa >= cfg.hyp.start && pa < cfg.hyp.end {
                    P::HypImage
                } else {
                    P::Host
                }
            })
            .collect();
        Model {
            mode,
            cfg,
            first_pfn,
            pages,
            slots: vec![VmSlot::Free; MAX_VMS],
            maps: vec![BTreeMap::new(); MAX_VMS],
            owed: vec![0; MAX_VMS],
            donated: 0,
        }
    }

    fn page(&self, pfn: u64) -> P {
        self.pages[(pfn - self.first_pfn) as usize]
    }
    fn set(&mut self, pfn: u64, p: P) {
        let i = (pfn - self.first_pfn) as usize;
        self.pages[i] = p;
    }
    fn ram_pages(&self) -> u64 {
        self.pages.len() as u64
    }
    fn live(&self, vm: usize) -> bool {
        matches!(self.slots[vm], VmSlot::Live { .. })
    }

    /// The live VM slot of `h`.
    fn live_slot(&self, h: u64) -> Option<usize> {
        let i = h.checked_sub(keel_abi::VM_HANDLE_BASE)?;
        let i = usize::try_from(i).ok().filter(|&i| i < MAX_VMS)?;
        self.live(i).then_some(i)
    }

    /// The VM slot of `h`, live or dead (not free).
    fn used_slot(&self, h: u64) -> Option<usize> {
        let i = h.checked_sub(keel_abi::VM_HANDLE_BASE)?;
        let i = usize::try_from(i).ok().filter(|&i| i < MAX_VMS)?;
        (self.slots[i] != VmSlot::Free).then_some(i)
    }

    /// ABI: nr > 0, no overflow, inside RAM.
    fn pfns(&self, pfn: u64, nr: u64) -> Option<std::ops::Range<u64>> {
        let end = pfn.checked_add(nr)?;
        let ok = nr > 0
            && pfn >= self.first_pfn
            && end <= self.first_pfn + self.ram_pages()
            && end.checked_mul(PAGE).is_some();
        ok.then_some(pfn..end)
    }

    /// ABI: aligned, nr > 0, no overflow, inside the IPA space.
    fn ipas(ipa: u64, nr: u64) -> Option<impl Iterator<Item = u64>> {
        let len = nr.checked_mul(PAGE)?;
        let end = ipa.checked_add(len)?;
        let ok = nr > 0 && ipa.is_multiple_of(PAGE) && end <= IPA_SIZE;
        ok.then(|| (ipa..end).step_by(PAGE as usize))
    }

    /// The statuses a call over `range` may return: OK if every page
    /// agrees, else any of the pages' refusals (ABI.md orders none of
    /// DENIED and BUSY before the other).
    fn all(range: impl Iterator<Item = u64>, mut f: impl FnMut(u64) -> i64) -> Want {
        let mut refusals = 0;
        for x in range {
            let s = f(x);
            if s != OK {
                refusals |= want(s);
            }
        }
        if refusals == 0 {
            want(OK)
        } else {
            refusals
        }
    }

    /// What the guest `vm` has at `ipa`: (pfn, its view).
    fn guest_view(&self, vm: usize, ipa: u64) -> Option<(u64, u64)> {
        let &pfn = self.maps[vm].get(&ipa)?;
        let view = match self.page(pfn) {
            P::Guest { shared: false, .. } => OWNED,
            P::Guest { shared: true, .. } => SHARED_OWNED,
            P::HostLent { .. } => SHARED_BORROWED,
            p => panic!("model: guest {vm} maps {pfn:#x} in state {p:?}"),
        };
        Some((pfn, view))
    }

    /// MEM_STATE: (owner, host view).
    fn host_view(&self, pfn: u64) -> (u64, u64) {
        match self.page(pfn) {
            P::Host => (0, OWNED),
            P::HostSharedHyp | P::HostLent { .. } => (0, SHARED_OWNED),
            P::HypImage | P::HypDonated => (1, NOPAGE),
            // A dead VM's page stays the host's to read until it reclaims
            // it, if the guest had shared it.
            P::Guest { vm, shared, .. } => {
                (handle(vm), if shared { SHARED_BORROWED } else { NOPAGE })
            }
        }
    }

    /// The expected status of a host call; `in_use(pfn)` says whether a
    /// donated page is in use by the hypervisor.
    /// `lent_reclaimable`: whether HOST_RECLAIM takes back host pages lent
    /// to a dead VM (ABI: yes).
    fn check_host(
        &self,
        id: u64,
        a: [u64; 4],
        in_use: &dyn Fn(u64) -> bool,
        lent_reclaimable: bool,
    ) -> Want {
        let [a1, a2, a3, a4] = a;
        match id {
            func::HOST_SHARE_HYP | func::HOST_UNSHARE_HYP | func::HOST_DONATE_HYP => {
                let Some(r) = self.pfns(a1, a2) else {
                    return want(INVALID);
                };
                let want = if id == func::HOST_UNSHARE_HYP {
                    P::HostSharedHyp
                } else {
                    P::Host
                };
                Self::all(r, |p| if self.page(p) == want { OK } else { DENIED })
            }
            func::HOST_RECLAIM => {
                let Some(r) = self.pfns(a1, a2) else {
                    return want(INVALID);
                };
                Self::all(r, |p| match self.page(p) {
                    P::HypDonated if !in_use(p) => OK,
                    P::Guest { vm, .. } if !self.live(vm) => OK,
                    P::HostLent { vm, .. } if !self.live(vm) && lent_reclaimable => OK,
                    _ => DENIED,
                })
            }
            func::MEM_STATE => {
                if self.pfns(a1, 1).is_some() {
                    want(OK)
                } else {
                    want(INVALID)
                }
            }
            func::HYP_STATS => {
                if a1 < stat::COUNT {
                    want(OK)
                } else {
                    want(INVALID)
                }
            }
            func::VM_CREATE => {
                if a1 == 0 || a1 > MAX_VCPUS as u64 || a2 != 0 {
                    want(INVALID)
                } else if self.slots.contains(&VmSlot::Free) {
                    want(OK)
                } else {
                    want(NO_MEMORY)
                }
            }
            func::VM_DESTROY => match self.live_slot(a1) {
                Some(_) => want(OK),
                None => want(INVALID),
            },
            func::VCPU_INIT => match self.live_slot(a1) {
                Some(vm) => {
                    let VmSlot::Live { vcpus } = self.slots[vm] else {
                        unreachable!()
                    };
                    if a2 < vcpus && a3.is_multiple_of(4) && a3 < IPA_SIZE {
                        want(OK)
                    } else {
                        want(INVALID)
                    }
                }
                None => want(INVALID),
            },
            func::VM_DONATE | func::VM_SHARE => {
                let Some(vm) = self.live_slot(a1) else {
                    return want(INVALID);
                };
                let Some(pfns) = self.pfns(a2, a4) else {
                    return want(INVALID);
                };
                let Some(ipas) = Self::ipas(a3, a4) else {
                    return want(INVALID);
                };
                let pages = Self::all(pfns, |p| if self.page(p) == P::Host { OK } else { DENIED });
                let ipas = Self::all(ipas, |i| {
                    if self.maps[vm].contains_key(&i) {
                        DENIED
                    } else {
                        OK
                    }
                });
                if pages == want(OK) {
                    ipas
                } else {
                    (pages | ipas) & !want(OK)
                }
            }
            func::VM_UNSHARE => {
                let Some(vm) = self.live_slot(a1) else {
                    return want(INVALID);
                };
                let Some(ipas) = Self::ipas(a2, a3) else {
                    return want(INVALID);
                };
                Self::all(ipas, |i| match self.guest_view(vm, i) {
                    Some((_, SHARED_BORROWED)) => OK,
                    _ => DENIED,
                })
            }
            func::VM_MEM_STATE => match (self.live_slot(a1), Self::ipas(a2, 1)) {
                (Some(_), Some(_)) => want(OK),
                _ => want(INVALID),
            },
            // keel extension: the host's stage 2 (0) or a VM's, a dead VM's
            // too while its slot is not free.
            func::KEEL_TABLE_PAGES => {
                if a1 == 0 || self.used_slot(a1).is_some() {
                    want(OK)
                } else {
                    want(INVALID)
                }
            }
            func::HOST_PIN | func::HOST_UNPIN => {
                let Some(r) = self.pfns(a1, a2) else {
                    return want(INVALID);
                };
                Self::all(r, |p| match self.page(p) {
                    P::Guest {
                        vm,
                        shared: true,
                        pins,
                        ..
                    } if self.live(vm) && (id == func::HOST_PIN || pins > 0) => OK,
                    // A destroyed VM's page: its pins can still be dropped.
                    P::Guest {
                        shared: true, pins, ..
                    } if id == func::HOST_UNPIN && pins > 0 => OK,
                    _ => DENIED,
                })
            }
            _ => want(NOT_SUPPORTED),
        }
    }

    /// Applies a host call the model and the hypervisor both accepted.
    fn apply_host(&mut self, id: u64, a: [u64; 4], m: &Machine, ret: [u64; 4]) {
        let [a1, a2, a3, a4] = a;
        match id {
            func::HOST_SHARE_HYP => (a1..a1 + a2).for_each(|p| self.set(p, P::HostSharedHyp)),
            func::HOST_UNSHARE_HYP => (a1..a1 + a2).for_each(|p| self.set(p, P::Host)),
            func::HOST_DONATE_HYP => {
                (a1..a1 + a2).for_each(|p| self.set(p, P::HypDonated));
                self.donated += a2;
            }
            func::HOST_RECLAIM => {
                for p in a1..a1 + a2 {
                    match self.page(p) {
                        P::HypDonated => {
                            self.donated -= 1;
                            expect_zero(m, p, "reclaimed donated page");
                        }
                        P::Guest { vm, .. } => {
                            self.settle(vm);
                            expect_zero(m, p, "reclaimed page of a dead VM");
                        }
                        P::HostLent { vm, .. } => self.settle(vm),
                        _ => unreachable!(),
                    }
                    self.set(p, P::Host);
                }
            }
            func::VM_CREATE => {
                let vm = self.slots.iter().position(|s| *s == VmSlot::Free).unwrap();
                assert_eq!(ret[1], handle(vm), "VM_CREATE takes the first free slot");
                self.slots[vm] = VmSlot::Live { vcpus: a1 };
            }
            func::VM_DESTROY => {
                let vm = self.live_slot(a1).unwrap();
                self.maps[vm].clear();
                self.slots[vm] = if self.owed[vm] > 0 {
                    VmSlot::Dead
                } else {
                    VmSlot::Free
                };
            }
            func::VM_DONATE | func::VM_SHARE => {
                let vm = self.live_slot(a1).unwrap();
                for i in 0..a4 {
                    let (pfn, ipa) = (a2 + i, a3 + i * PAGE);
                    self.set(
                        pfn,
                        if id == func::VM_DONATE {
                            P::Guest {
                                vm,
                                ipa,
                                shared: false,
                                pins: 0,
                            }
                        } else {
                            P::HostLent { vm, ipa }
                        },
                    );
                    self.maps[vm].insert(ipa, pfn);
                    if id == func::VM_DONATE {
                        // The guest writes its memory.
                        m.fill_marker(pfn * PAGE);
                    }
                }
                self.owed[vm] += a4;
            }
            func::VM_UNSHARE => {
                let vm = self.live_slot(a1).unwrap();
                for i in 0..a3 {
                    let pfn = self.maps[vm].remove(&(a2 + i * PAGE)).unwrap();
                    self.set(pfn, P::Host);
                    self.owed[vm] -= 1;
                }
            }
            func::HOST_PIN | func::HOST_UNPIN => {
                for p in a1..a1 + a2 {
                    if let P::Guest { pins, .. } = &mut self.pages[(p - self.first_pfn) as usize] {
                        if id == func::HOST_PIN {
                            *pins += 1;
                        } else {
                            *pins -= 1;
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// One page fewer owed by `vm`; a dead slot owing nothing is free.
    fn settle(&mut self, vm: usize) {
        self.owed[vm] -= 1;
        if self.owed[vm] == 0 && self.slots[vm] == VmSlot::Dead {
            self.slots[vm] = VmSlot::Free;
        }
    }

    /// The expected status of a guest memory call from live slot `vm`.
    /// `unmapped_invalid`: refuse a MEM_SHARE/MEM_UNSHARE range with an
    /// unmapped IPA with INVALID_PARAMETER (ABI: DENIED).
    fn check_guest(&self, vm: usize, id: u64, ipa: u64, nr: u64, unmapped_invalid: bool) -> Want {
        let nr = nr.max(1);
        let Some(ipas) = Self::ipas(ipa, nr) else {
            return want(INVALID);
        };
        let ipas: Vec<u64> = ipas.collect();
        if unmapped_invalid
            && id != func::MEM_RELINQUISH
            && ipas.iter().any(|i| !self.maps[vm].contains_key(i))
        {
            return want(INVALID);
        }
        Self::all(ipas.into_iter(), |i| {
            let Some(&pfn) = self.maps[vm].get(&i) else {
                return DENIED;
            };
            match (id, self.page(pfn)) {
                (func::MEM_SHARE, P::Guest { shared: false, .. }) => OK,
                (
                    func::MEM_UNSHARE,
                    P::Guest {
                        shared: true, pins, ..
                    },
                ) => {
                    if pins > 0 {
                        BUSY
                    } else {
                        OK
                    }
                }
                (func::MEM_RELINQUISH, P::Guest { shared, pins, .. }) => {
                    if shared && pins > 0 {
                        BUSY
                    } else {
                        OK
                    }
                }
                _ => DENIED,
            }
        })
    }

    fn apply_guest(&mut self, vm: usize, id: u64, ipa: u64, nr: u64, m: &Machine) {
        for i in 0..nr.max(1) {
            let ipa = ipa + i * PAGE;
            let pfn = self.maps[vm][&ipa];
            match id {
                func::MEM_SHARE | func::MEM_UNSHARE => {
                    if let P::Guest { shared, .. } =
                        &mut self.pages[(pfn - self.first_pfn) as usize]
                    {
                        *shared = id == func::MEM_SHARE;
                    }
                }
                _ => {
                    self.maps[vm].remove(&ipa);
                    self.set(pfn, P::Host);
                    self.owed[vm] -= 1;
                    expect_zero(m, pfn, "relinquished page");
                }
            }
        }
    }
}

fn expect_zero(m: &Machine, pfn: u64, what: &str) {
    let page = m.read(pfn * PAGE);
    assert!(
        page[0] == 0 && page[PAGE as usize - 1] == 0,
        "{what} {:#x} was not zeroed",
        pfn * PAGE
    );
}

impl Machine {
    /// Marks a page as written by its guest (first and last byte).
    fn fill_marker(&self, pa: u64) {
        self.poke(pa, 0xa5);
        self.poke(pa + PAGE - 1, 0x5a);
    }
}

/// splitmix64: small, fast, good enough to drive a test.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// One generated call.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Host {
        id: u64,
        args: [u64; 4],
    },
    Guest {
        vm: usize,
        id: u64,
        ipa: u64,
        nr: u64,
    },
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    pub calls: u64,
    pub succeeded: u64,
    pub no_memory: u64,
    /// Answers accepted only as known deviations (Mode::Tolerant).
    pub tolerated: u64,
    pub full_checks: u64,
}

/// The machine the model runs on: 8 MiB of RAM, the hypervisor's 512 KiB
/// at 0x4020_0000 (boot pool 256 KiB). Small, because the invariant checker
/// after every call walks every host leaf and every page the hypervisor
/// maps.
pub fn config() -> Config {
    Config::new(8 << 20, 512 << 10)
}

struct Driver<'a> {
    m: &'a Machine,
    model: Model,
    rng: Rng,
    report: Report,
}

impl Driver<'_> {
    fn first_pfn(&self) -> u64 {
        RAM_BASE / PAGE
    }
    fn end_pfn(&self) -> u64 {
        self.m.cfg.ram_end() / PAGE
    }

    fn edge_pfn(&mut self) -> u64 {
        let c = self.m.cfg;
        self.rng.pick(&[
            0,
            1,
            u64::MAX,
            u64::MAX / PAGE,
            self.first_pfn() - 1,
            self.first_pfn(),
            self.end_pfn() - 1,
            self.end_pfn(),
            c.hyp.start / PAGE - 1,
            c.hyp.start / PAGE,
            c.pool.start / PAGE,
            c.hyp.end / PAGE - 1,
            c.hyp.end / PAGE,
        ])
    }

    fn pfn(&mut self) -> u64 {
        match self.rng.below(16) {
            0 => self.edge_pfn(),
            // A few hot 64 KiB spots, so that calls collide.
            1..=5 => {
                let c = self.m.cfg;
                let spot = self.rng.pick(&[
                    RAM_BASE,
                    c.hyp.end,
                    RAM_BASE + c.ram_size / 2 + 0x1_0000,
                    c.ram_end() - 0x1_0000,
                ]);
                spot / PAGE + self.rng.below(16)
            }
            _ => self.first_pfn() + self.rng.below(self.end_pfn() - self.first_pfn()),
        }
    }

    /// A pfn at which `pred` holds, searching from a random page.
    fn find_pfn(&mut self, pred: impl Fn(P, &Model) -> bool) -> Option<u64> {
        let n = self.end_pfn() - self.first_pfn();
        let start = self.rng.below(n);
        (0..n)
            .map(|i| self.first_pfn() + (start + i) % n)
            .find(|&p| pred(self.model.page(p), &self.model))
    }

    /// How many pages from `pfn` satisfy `pred` (at most `max`).
    fn run_len(&self, pfn: u64, max: u64, pred: impl Fn(P, &Model) -> bool) -> u64 {
        (pfn..self.end_pfn().min(pfn + max))
            .take_while(|&p| pred(self.model.page(p), &self.model))
            .count() as u64
    }

    fn nr(&mut self) -> u64 {
        match self.rng.below(24) {
            0 => self.rng.pick(&[
                0,
                u64::MAX,
                u64::MAX / PAGE,
                u64::MAX / PAGE + 1,
                1 << 52,
                (8 << 20) / PAGE,
                (IPA_SIZE / PAGE) + 1,
            ]),
            1..=12 => 1,
            13..=19 => 1 + self.rng.below(16),
            20..=22 => 1 + self.rng.below(600),
            _ => 512,
        }
    }

    fn ipa(&mut self, vm: Option<usize>) -> u64 {
        let w = WINDOWS[self.rng.pick(&[0, 0, 0, 0, 0, 0, 1, 2])];
        let base = w.0 + self.rng.below(w.1 / PAGE) * PAGE;
        match self.rng.below(16) {
            0 => self.rng.pick(&[
                IPA_SIZE,
                IPA_SIZE - PAGE,
                !0xfff,
                0x800,
                1,
                u64::MAX,
                base + 8,
            ]),
            1..=7 => match vm.and_then(|vm| {
                let map = &self.model.maps[vm];
                map.range(base..).next().or_else(|| map.iter().next())
            }) {
                Some((&ipa, _)) => ipa,
                None => base,
            },
            8..=9 => base & !(MIB2 - 1),
            _ => base,
        }
    }

    fn handle(&mut self) -> u64 {
        match self.rng.below(12) {
            0 => self.rng.pick(&[
                0,
                0xfff,
                keel_abi::VM_HANDLE_BASE + MAX_VMS as u64,
                u64::MAX,
                1 << 32 | keel_abi::VM_HANDLE_BASE,
            ]),
            1 => handle(self.rng.below(MAX_VMS as u64) as usize),
            _ => {
                let live: Vec<usize> = (0..MAX_VMS).filter(|&v| self.model.live(v)).collect();
                if live.is_empty() {
                    handle(0)
                } else {
                    handle(self.rng.pick(&live))
                }
            }
        }
    }

    fn gen(&mut self) -> Op {
        let live: Vec<usize> = (0..MAX_VMS).filter(|&v| self.model.live(v)).collect();
        if !live.is_empty() && self.rng.chance(3) {
            let vm = self.rng.pick(&live);
            let id = self.rng.pick(&[
                func::MEM_SHARE,
                func::MEM_SHARE,
                func::MEM_UNSHARE,
                func::MEM_UNSHARE,
                func::MEM_RELINQUISH,
                func::HYP_MEMINFO,
                func::VM_CREATE,
                func::KEEL_CHECK_INVARIANTS,
                func::KEEL_TABLE_PAGES,
                0xC600_0042,
            ]);
            let ipa = self.ipa(Some(vm));
            let nr = if self.rng.chance(4) { 0 } else { self.nr() };
            if id == func::HYP_MEMINFO && self.rng.chance(2) {
                // As pKVM guests ask it.
                return Op::Guest {
                    vm,
                    id,
                    ipa: 0,
                    nr: 0,
                };
            }
            return Op::Guest { vm, id, ipa, nr };
        }
        let id = self.rng.pick(&[
            func::HOST_SHARE_HYP,
            func::HOST_UNSHARE_HYP,
            func::HOST_DONATE_HYP,
            func::HOST_RECLAIM,
            func::HOST_RECLAIM,
            func::MEM_STATE,
            func::HYP_STATS,
            func::VM_CREATE,
            func::VM_CREATE,
            func::VM_DESTROY,
            func::VCPU_INIT,
            func::VM_DONATE,
            func::VM_DONATE,
            func::VM_DONATE,
            func::VM_SHARE,
            func::VM_SHARE,
            func::VM_UNSHARE,
            func::VM_MEM_STATE,
            func::HOST_PIN,
            func::HOST_UNPIN,
            func::KEEL_TABLE_PAGES,
        ]);
        let mut a = [0u64; 4];
        match id {
            func::HOST_SHARE_HYP | func::HOST_DONATE_HYP => {
                a = [self.pfn(), self.nr(), 0, 0];
            }
            func::HOST_UNSHARE_HYP | func::HOST_RECLAIM | func::HOST_PIN | func::HOST_UNPIN => {
                let want = move |p: P, m: &Model| match id {
                    func::HOST_UNSHARE_HYP => p == P::HostSharedHyp,
                    func::HOST_RECLAIM => match p {
                        P::HypDonated => true,
                        P::Guest { vm, .. } | P::HostLent { vm, .. } => !m.live(vm),
                        _ => false,
                    },
                    _ => matches!(p, P::Guest { shared: true, .. }),
                };
                a = match self.rng.chance(2).then(|| self.find_pfn(want)).flatten() {
                    Some(p) => {
                        let run = self.run_len(p, 700, want);
                        let nr = if self.rng.chance(4) {
                            self.nr()
                        } else {
                            1 + self.rng.below(run)
                        };
                        [p, nr, 0, 0]
                    }
                    None => [self.pfn(), self.nr(), 0, 0],
                };
            }
            func::MEM_STATE => a[0] = self.pfn(),
            func::HYP_STATS => a[0] = self.rng.below(stat::COUNT + 2),
            func::VM_CREATE => {
                a[0] = self.rng.pick(&[1, 1, 2, 3, 4, 0, 5, u64::MAX]);
                a[1] = if self.rng.chance(16) { 1 } else { 0 };
            }
            func::VM_DESTROY => a[0] = self.handle(),
            func::KEEL_TABLE_PAGES => {
                a[0] = if self.rng.chance(4) { 0 } else { self.handle() };
            }
            func::VCPU_INIT => {
                a = [
                    self.handle(),
                    self.rng.pick(&[0, 0, 1, 2, 3, 4, u64::MAX]),
                    self.rng.pick(&[0, 0x8_0000, 2, IPA_SIZE, IPA_SIZE - 4]),
                    self.rng.next(),
                ];
            }
            func::VM_DONATE | func::VM_SHARE => {
                let h = self.handle();
                let ipa = self.ipa(None);
                let host = |p: P, _: &Model| p == P::Host;
                a = match self.rng.chance(2).then(|| self.find_pfn(host)).flatten() {
                    Some(p) => {
                        let run = self.run_len(p, 700, host);
                        let nr = match self.rng.below(8) {
                            0 => self.nr(),
                            1 => run,
                            _ => 1 + self.rng.below(run.min(32)),
                        };
                        // Sometimes make the pfn and IPA congruent mod 2M.
                        let ipa = if self.rng.chance(3) && ipa.is_multiple_of(PAGE) {
                            (ipa & !(MIB2 - 1)) | ((p * PAGE) & (MIB2 - 1))
                        } else {
                            ipa
                        };
                        [h, p, ipa, nr]
                    }
                    None => [h, self.pfn(), ipa, self.nr()],
                };
            }
            func::VM_UNSHARE => {
                let h = self.handle();
                let vm = self.model.live_slot(h);
                let ipa = self.ipa(vm);
                let mut nr = if self.rng.chance(2) {
                    // A run of pages lent to the VM.
                    vm.map_or(1, |vm| {
                        let n = (0..64)
                            .take_while(|i| {
                                matches!(
                                    self.model.guest_view(vm, ipa + i * PAGE),
                                    Some((_, SHARED_BORROWED))
                                )
                            })
                            .count() as u64;
                        1 + self.rng.below(n.max(1))
                    })
                } else {
                    self.nr()
                };
                if self.model.mode == Mode::Tolerant && nr > 64 && nr < u64::MAX / PAGE {
                    nr = 64;
                }
                a = [h, ipa, nr, 0];
            }
            func::VM_MEM_STATE => {
                let h = self.handle();
                let vm = self.model.live_slot(h);
                a = [h, self.ipa(vm), 0, 0];
            }
            _ => {}
        }
        Op::Host { id, args: a }
    }

    /// Runs one call on both; Err describes a disagreement.
    fn step(&mut self, op: Op) -> Result<(), String> {
        self.report.calls += 1;
        match op {
            Op::Host { id, args } => {
                let m = self.m;
                let in_use = |p: u64| {
                    m.hyp
                        .mem
                        .lock()
                        .pool
                        .donated_in_use(p)
                        .expect("donated page")
                };
                let abi = self.model.check_host(id, args, &in_use, true);
                let alt = match self.model.mode {
                    Mode::Strict => abi,
                    Mode::Tolerant => self.model.check_host(id, args, &in_use, false),
                };
                let r = m.call(id, &args);
                let got = r.regs[0] as i64;
                if abi & want(got) == 0 && alt & want(got) != 0 {
                    self.report.tolerated += 1;
                } else if got == NO_MEMORY
                    && abi == want(OK)
                    && m.stat(stat::FREE_POOL_PAGES) < LOW_POOL
                {
                    self.report.no_memory += 1;
                } else if abi & want(got) == 0 {
                    return Err(format!("status {got}, the model says {}", wants(abi)));
                } else if got == OK {
                    self.report.succeeded += 1;
                    self.check_values(id, args, [r.regs[1], r.regs[2], r.regs[3], r.regs[4]])?;
                    self.model.apply_host(
                        id,
                        args,
                        m,
                        [r.regs[0], r.regs[1], r.regs[2], r.regs[3]],
                    );
                }
            }
            Op::Guest { vm, id, ipa, nr } => {
                let (action, x) = self.m.guest_hvc(vm, id, &[ipa, nr]);
                match id {
                    func::MEM_SHARE | func::MEM_UNSHARE | func::MEM_RELINQUISH => {
                        let abi = self.model.check_guest(vm, id, ipa, nr, false);
                        let alt = match self.model.mode {
                            Mode::Strict => abi,
                            Mode::Tolerant => self.model.check_guest(vm, id, ipa, nr, true),
                        };
                        let got = x[0] as i64;
                        if action != Action::Resume {
                            return Err(format!("{action:?}"));
                        }
                        if abi & want(got) == 0 && alt & want(got) != 0 {
                            self.report.tolerated += 1;
                        } else if got == NO_MEMORY
                            && abi == want(OK)
                            && self.m.stat(stat::FREE_POOL_PAGES) < LOW_POOL
                        {
                            self.report.no_memory += 1;
                        } else if abi & want(got) == 0 {
                            return Err(format!("status {got}, the model says {}", wants(abi)));
                        } else if got == OK {
                            self.report.succeeded += 1;
                            self.model.apply_guest(vm, id, ipa, nr, self.m);
                        }
                    }
                    func::HYP_MEMINFO => {
                        // x1 = x2 = 0, as pKVM requires.
                        let want = if ipa == 0 && nr == 0 {
                            PAGE
                        } else {
                            INVALID as u64
                        };
                        if (action, x[0]) != (Action::Resume, want) {
                            return Err(format!("HYP_MEMINFO: {action:?} {x:x?}"));
                        }
                    }
                    id if id == func::VM_CREATE || func::KEEL_CALLS.contains(&id) => {
                        if (action, x[0] as i64) != (Action::Resume, NOT_SUPPORTED) {
                            return Err(format!("a host call from a guest: {action:?} {x:x?}"));
                        }
                    }
                    _ => {
                        let want = Action::Exit([keel_abi::exit::HYPERCALL, id, ipa, nr]);
                        if action != want {
                            return Err(format!("{action:?}, the model says {want:?}"));
                        }
                    }
                }
            }
        }
        // Queries change nothing: the checker runs after every other call,
        // refused ones included.
        let query = match op {
            Op::Host { id, .. } => [
                func::MEM_STATE,
                func::VM_MEM_STATE,
                func::HYP_STATS,
                func::KEEL_TABLE_PAGES,
            ]
            .contains(&id),
            Op::Guest { id, .. } => {
                ![func::MEM_SHARE, func::MEM_UNSHARE, func::MEM_RELINQUISH].contains(&id)
            }
        };
        if query {
            return Ok(());
        }
        self.m.invariants().map_err(|addr| {
            let mem = self.m.hyp.mem.lock();
            let vms = self.m.hyp.vms.lock();
            let what = mem.check_invariants(&*vms).err().map_or("?", |v| v.what);
            format!("invariant violated at {addr:#x}: {what}")
        })
    }

    /// The values a successful query returned.
    fn check_values(&self, id: u64, a: [u64; 4], r: [u64; 4]) -> Result<(), String> {
        match id {
            func::MEM_STATE => {
                let (owner, view) = self.model.host_view(a[0]);
                let dead_shared = matches!(
                    self.model.page(a[0]),
                    P::Guest { vm, shared: true, .. } if !self.model.live(vm)
                );
                if dead_shared
                    && self.model.mode == Mode::Tolerant
                    && (r[0], r[1]) == (owner, NOPAGE)
                {
                    return Ok(());
                }
                if (r[0], r[1]) != (owner, view) {
                    return Err(format!(
                        "MEM_STATE {:#x}: ({:#x}, {}), the model says ({owner:#x}, {view})",
                        a[0] * PAGE,
                        r[0],
                        r[1]
                    ));
                }
                self.check_host_size(a[0], view, r[2])
            }
            func::VM_MEM_STATE => {
                let vm = self.model.live_slot(a[0]).unwrap();
                self.check_guest_page(vm, a[1], (r[0], r[1], r[2]))
            }
            func::HYP_STATS => self.check_stat(a[0], r[0]),
            // A stage 2 has at least its root.
            func::KEEL_TABLE_PAGES if r[0] == 0 => Err(format!(
                "KEEL_TABLE_PAGES {:#x}: no pages, not even a root",
                a[0]
            )),
            _ => Ok(()),
        }
    }

    fn check_host_size(&self, pfn: u64, view: u64, size: u64) -> Result<(), String> {
        let ok = if view == NOPAGE {
            size == 0
        } else {
            [PAGE, MIB2, GIB].contains(&size)
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "MEM_STATE {:#x}: view {view} with a {size:#x}-byte mapping",
                pfn * PAGE
            ))
        }
    }

    /// VM_MEM_STATE of `ipa` against the model, including that a block is
    /// reported only over a range the model maps uniformly and contiguously.
    fn check_guest_page(&self, vm: usize, ipa: u64, got: (u64, u64, u64)) -> Result<(), String> {
        let (pfn, view, size) = got;
        let want = self.model.guest_view(vm, ipa);
        let fail = |why: &str| {
            Err(format!(
                "VM_MEM_STATE {:#x} {ipa:#x}: {got:x?}, the model says {want:x?}: {why}",
                handle(vm)
            ))
        };
        match want {
            None if (pfn, view, size) != (0, NOPAGE, 0) => fail("unmapped"),
            None => Ok(()),
            Some(w) if (pfn, view) != w => fail("state"),
            Some(_) if ![PAGE, MIB2, GIB].contains(&size) => fail("size"),
            Some(_) if size > PAGE => {
                let base = ipa & !(size - 1);
                let first = self.model.guest_view(vm, base);
                let uniform = (0..size / PAGE).all(|i| {
                    self.model.guest_view(vm, base + i * PAGE) == first.map(|(p, v)| (p + i, v))
                });
                if uniform && first.is_some() {
                    Ok(())
                } else {
                    fail("a block over a range that is not uniform")
                }
            }
            Some(_) => Ok(()),
        }
    }

    fn check_stat(&self, index: u64, value: u64) -> Result<(), String> {
        if index == stat::HOST_ABORTS && value != 0 {
            return Err(format!("{value} host aborts"));
        }
        Ok(())
    }

    /// Compares every page of RAM, every mapped guest page, and the pool.
    fn full_check(&mut self) -> Result<(), String> {
        self.report.full_checks += 1;
        for pfn in self.first_pfn()..self.end_pfn() {
            let r = self.m.call(func::MEM_STATE, &[pfn]);
            self.check_values(
                func::MEM_STATE,
                [pfn, 0, 0, 0],
                [r.regs[1], r.regs[2], r.regs[3], 0],
            )?;
        }
        let tables = self.m.stat(stat::TABLE_PAGES);
        let free = self.m.stat(stat::FREE_POOL_PAGES);
        let pool = self.m.cfg.pool_pages() + self.model.donated;
        if tables + free != pool {
            return Err(format!(
                "HYP_STATS: {tables} table + {free} free pages, the pool has {pool}"
            ));
        }
        self.check_stat(stat::HOST_ABORTS, self.m.stat(stat::HOST_ABORTS))?;
        // Every stage 2 the model knows of, the dead VMs' included, and
        // the hypervisor's stage 1 make up HYP_STATS 0.
        let mut stage2s = 0;
        for which in std::iter::once(0).chain((0..MAX_VMS).map(handle)) {
            let r = self.m.call(func::KEEL_TABLE_PAGES, &[which]);
            let got = r.regs[0] as i64;
            let expected =
                self.model
                    .check_host(func::KEEL_TABLE_PAGES, [which, 0, 0, 0], &|_| false, true);
            if expected & want(got) == 0 {
                return Err(format!(
                    "KEEL_TABLE_PAGES {which:#x}: status {got}, the model says {}",
                    wants(expected)
                ));
            }
            if got == OK {
                stage2s += r.regs[1];
            }
        }
        let stage1 = self.m.hyp.mem.lock().hyp.table_pages() as u64;
        if stage2s + stage1 != tables {
            return Err(format!(
                "HYP_STATS 0 is {tables}, KEEL_TABLE_PAGES sum to {stage2s} and the stage 1 has {stage1}"
            ));
        }
        for vm in 0..MAX_VMS {
            let h = handle(vm);
            if !self.model.live(vm) {
                let s = self.m.st(func::VM_MEM_STATE, &[h, 0]);
                if s != INVALID {
                    return Err(format!("VM_MEM_STATE of {h:#x}, not live: {s}"));
                }
                continue;
            }
            for &ipa in self.model.maps[vm].keys() {
                let r = self.m.call(func::VM_MEM_STATE, &[h, ipa]);
                self.check_guest_page(vm, ipa, (r.regs[1], r.regs[2], r.regs[3]))?;
            }
            // Nothing mapped that the model does not know of.
            let mapped = {
                let vms = self.m.hyp.vms.lock();
                let mem = self.m.hyp.mem.lock();
                let Some(Slot::Used(v)) = vms
                    .slots
                    .get(vm)
                    .filter(|s| matches!(s, Slot::Used(v) if v.alive))
                else {
                    return Err(format!("{h:#x} is not live in the hypervisor"));
                };
                let mut bytes = 0;
                v.s2.visit_leaves(&mem.pool, 0, IPA_SIZE, &mut |l| {
                    if matches!(l.kind, keel_mm::LeafKind::Mapped { .. }) {
                        bytes += l.size;
                    }
                })
                .unwrap();
                bytes
            };
            let want = self.model.maps[vm].len() as u64 * PAGE;
            if mapped != want {
                return Err(format!(
                    "{h:#x} maps {mapped:#x} bytes, the model {want:#x}"
                ));
            }
        }
        Ok(())
    }
}

/// Runs `calls` random calls from `seed` on a fresh machine and the model,
/// a full comparison every `check_every` calls and at the end.
pub fn run(seed: u64, calls: u64, check_every: u64, mode: Mode) -> Result<Report, String> {
    let cfg = config();
    let m = Machine::new(cfg);
    let mut d = Driver {
        m: &m,
        model: Model::new(cfg, mode),
        rng: Rng::new(seed),
        report: Report::default(),
    };
    let mut recent = [None; 12];
    for n in 0..calls {
        let op = d.gen();
        recent[n as usize % recent.len()] = Some(op);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            d.step(op)?;
            if (n + 1) % check_every == 0 || n + 1 == calls {
                d.full_check()?;
            }
            Ok::<(), String>(())
        }))
        .unwrap_or_else(|e| {
            Err(e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()))
        });
        if let Err(e) = r {
            let mut last = String::new();
            for i in 1..=recent.len() as u64 {
                if let Some(o) = recent[((n + i) % recent.len() as u64) as usize] {
                    last += &format!("\n  {o:x?}");
                }
            }
            return Err(format!(
                "model disagrees at call {n} {op:x?}: {e}\nlast calls:{last}\n\
                 replay: KEEL_MODEL_SEED={seed:#x} KEEL_MODEL_CALLS={}",
                n + 1
            ));
        }
    }
    Ok(d.report)
}
