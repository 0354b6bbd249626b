//! `fuzz`: random hypercalls, seeded and reproducible.
//!
//! The host sends random calls of every ABI function (each ID of
//! `keel_abi::func`, the guest calls, the keel extensions, random IDs and
//! non-zero HVC immediates) with random and edge-biased arguments: 0, 1,
//! all ones, the ends of RAM, the hypervisor's hole, MMIO, this kernel's own
//! pages, handles just past the last VM, bad vCPU indices, IPAs at the ends
//! of the guest IPA space. It also builds VMs running a guest payload
//! (`fuzz_guest.S`) that does the same with the guest calls from a
//! generator of its own, seeded by the host.
//!
//! Seed: `seed=N` in the bootargs (tests/run.py passes a fresh one per run
//! and prints it; `--seed N` replays). `calls=N` sets how many host calls to
//! make, `check_first=N check_every=K` how often KEEL_CHECK_INVARIANTS runs
//! (default: after each of the first 25,000 calls, then after every 4th),
//! `fuzz_trace=1` prints every call as it goes
//! (to find the last call before a hypervisor panic or hang).
//!
//! Oracles, any of which fails the suite with the seed and the last calls:
//! - the invariant checker after every call (of the first 25,000; then
//!   after every 4th);
//! - statuses: only the ABI's; NOT_SUPPORTED for unknown IDs, non-zero
//!   immediates and guest calls from the host; discovery values exact;
//! - calls that take memory (HOST_DONATE_HYP, VM_DONATE, VM_SHARE) are
//!   aimed at a sacrificial region, or at ranges that are not all host RAM,
//!   which must be refused (this kernel's image, stack and device tree are
//!   never named by them, so a wrong success cannot crash the kernel);
//! - every page HOST_RECLAIM returns from the hypervisor or a dead VM reads
//!   zero, and so does every page a guest relinquished;
//! - sampled probes: a host read of the hypervisor's hole aborts, and a read
//!   of a page aborts exactly when MEM_STATE says the host has no access;
//! - the guest: loads from IPAs it was never given are MMIO exits, never
//!   data; host calls and HVC #imm from the guest are NOT_SUPPORTED; an MMIO
//!   exit never names an IPA the guest has memory at; the payload faults
//!   only once its code page is gone; no exception reaches its vectors.

use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use keel_abi::{call, exit, func, status, Regs};

use crate::dt::{parse_u64, BootInfo, Range, Ranges};
use crate::exception::{self, ec};
use crate::harness::{self, Failure, Suite, Test, TestResult};
use crate::suites::isolation::check_abort;
use crate::{print, println};

core::arch::global_asm!(include_str!("fuzz_guest.S"));

extern "C" {
    static keel_fuzz_guest_start: u8;
    static keel_fuzz_guest_end: u8;
}

pub static SUITE: Suite = Suite {
    name: "fuzz",
    tests: &[
        Test {
            name: "random_calls",
            run: random_calls,
        },
        Test {
            name: "teardown",
            run: teardown,
        },
    ],
};

const PAGE: u64 = 4096;
const BLOCK: u64 = 2 << 20;
/// Host calls per run unless `calls=N`.
const DEFAULT_CALLS: u64 = 100_000;
/// KEEL_CHECK_INVARIANTS after each of the first this many host calls,
/// then after every DEFAULT_CHECK_EVERY-th: 43,750 checks of 100,000 calls.
/// A check walks every leaf of the host stage 2 and of the hypervisor's
/// stage 1 and every donated run; with this suite's tens of thousands of
/// leaves it costs about 2.5 ms under TCG, 20 times a call, so the run
/// takes about 2 minutes, where a check after every call would take more
/// than 4. `check_first=N check_every=K` in the bootargs override them
/// (`check_every=1` checks after every call).
const DEFAULT_CHECK_FIRST: u64 = 25_000;
const DEFAULT_CHECK_EVERY: u64 = 4;
/// Every this many host calls: destroy every VM, take back every page.
const EPOCH: u64 = 4096;
/// The memory that calls taking memory from the host are aimed at.
const SACRIFICE: Range = Range::new(0x8000_0000, 0x8400_0000);
const SAC_PAGES: usize = ((SACRIFICE.end - SACRIFICE.start) / PAGE) as usize;
/// What the sacrificial pages hold while the host has them (non-zero, so a
/// page that comes back from the hypervisor unzeroed shows).
const FILL: u64 = 0xfeed_f00d_dead_beef;

// The guest's memory (fuzz_guest.S).
const CODE_IPA: u64 = 0x8000_0000;
const DATA_IPA: u64 = 0x8020_0000;
const SHARED_IPA: u64 = 0x9000_0000;
/// IPAs no guest is ever given: its loads there must be MMIO exits.
const WINDOW: Range = Range::new(0x40_0000_0000, 0x50_0000_0000);
const MAGIC: u64 = 0xf022_0000_0000_5a5a;
const IPA_LIMIT: u64 = 1 << 39;
// The guest's vendor calls (HYPERCALL exits).
const G_REPORT: u64 = 0xC600_0FE0;
const G_ERROR: u64 = 0xC600_0FE1;
const G_EXC: u64 = 0xC600_0FE2;

const MAX_VMS: usize = 8;
const MAX_VCPUS: usize = 4;
const HANDLE_BASE: u64 = keel_abi::VM_HANDLE_BASE;

/// Every function ID the ABI names, and the keel extensions.
const IDS: [u64; 28] = [
    func::FEATURES,
    func::CALL_UID,
    func::REVISION,
    func::HYP_MEMINFO,
    func::MEM_SHARE,
    func::MEM_UNSHARE,
    func::MEM_RELINQUISH,
    func::HYP_FEATURES,
    func::HOST_SHARE_HYP,
    func::HOST_UNSHARE_HYP,
    func::HOST_DONATE_HYP,
    func::HOST_RECLAIM,
    func::MEM_STATE,
    func::HYP_STATS,
    func::VM_CREATE,
    func::VM_DESTROY,
    func::VCPU_INIT,
    func::VCPU_RUN,
    func::VM_DONATE,
    func::VM_SHARE,
    func::VM_UNSHARE,
    func::VM_MEM_STATE,
    func::HOST_PIN,
    func::HOST_UNPIN,
    func::KEEL_CHECK_INVARIANTS,
    func::KEEL_TABLE_PAGES,
    func::KEEL_VCPU_IRQ,
    func::KEEL_VCPU_VTIMER,
];

fn call_name(id: u64) -> &'static str {
    match id {
        func::FEATURES => "FEATURES",
        func::CALL_UID => "CALL_UID",
        func::REVISION => "REVISION",
        func::HYP_MEMINFO => "HYP_MEMINFO",
        func::MEM_SHARE => "MEM_SHARE",
        func::MEM_UNSHARE => "MEM_UNSHARE",
        func::MEM_RELINQUISH => "MEM_RELINQUISH",
        func::HYP_FEATURES => "HYP_FEATURES",
        func::HOST_SHARE_HYP => "HOST_SHARE_HYP",
        func::HOST_UNSHARE_HYP => "HOST_UNSHARE_HYP",
        func::HOST_DONATE_HYP => "HOST_DONATE_HYP",
        func::HOST_RECLAIM => "HOST_RECLAIM",
        func::MEM_STATE => "MEM_STATE",
        func::HYP_STATS => "HYP_STATS",
        func::VM_CREATE => "VM_CREATE",
        func::VM_DESTROY => "VM_DESTROY",
        func::VCPU_INIT => "VCPU_INIT",
        func::VCPU_RUN => "VCPU_RUN",
        func::VM_DONATE => "VM_DONATE",
        func::VM_SHARE => "VM_SHARE",
        func::VM_UNSHARE => "VM_UNSHARE",
        func::VM_MEM_STATE => "VM_MEM_STATE",
        func::HOST_PIN => "HOST_PIN",
        func::HOST_UNPIN => "HOST_UNPIN",
        func::KEEL_CHECK_INVARIANTS => "KEEL_CHECK_INVARIANTS",
        func::KEEL_TABLE_PAGES => "KEEL_TABLE_PAGES",
        func::KEEL_VCPU_IRQ => "KEEL_VCPU_IRQ",
        func::KEEL_VCPU_VTIMER => "KEEL_VCPU_VTIMER",
        _ => "?",
    }
}

// ---- The record of the last calls ----

#[derive(Clone, Copy)]
struct Rec {
    /// Host call number (0: not a host call).
    n: u64,
    guest: bool,
    imm: u16,
    id: u64,
    args: [u64; 5],
    ret: [u64; 5],
}

const RING: usize = 32;
/// How many records a failure prints.
const SHOWN: usize = 20;

struct Ring {
    recs: [Rec; RING],
    next: usize,
    len: usize,
}

struct Global<T>(UnsafeCell<T>);

// SAFETY: the test kernel runs on one CPU with interrupts masked; the ring
// is written by the suite and read by the abort hook, which runs on the
// same CPU and never while a write is half done in a way that matters
// (a torn record would only print oddly).
unsafe impl<T> Sync for Global<T> {}

static LAST: Global<Ring> = Global(UnsafeCell::new(Ring {
    recs: [Rec {
        n: 0,
        guest: false,
        imm: 0,
        id: 0,
        args: [0; 5],
        ret: [0; 5],
    }; RING],
    next: 0,
    len: 0,
}));
static SEED: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

fn ring() -> &'static mut Ring {
    // SAFETY: one CPU; see `Global`. Callers do not keep two of these
    // references alive at once.
    unsafe { &mut *LAST.0.get() }
}

fn push(rec: Rec) -> usize {
    let r = ring();
    let at = r.next;
    r.recs[at] = rec;
    r.next = (at + 1) % RING;
    r.len = (r.len + 1).min(RING);
    at
}

fn print_rec(rec: &Rec) {
    if rec.guest {
        println!(
            "    guest {}({:#x}, {:#x}) -> {} ({} guest calls since the previous report)",
            call_name(rec.id),
            rec.args[0],
            rec.args[1],
            rec.ret[0] as i64,
            rec.ret[1]
        );
        return;
    }
    print!("    #{} ", rec.n);
    if rec.imm != 0 {
        print!("HVC #{:#x} ", rec.imm);
    }
    println!(
        "{} {:#x}({:#x}, {:#x}, {:#x}, {:#x}, {:#x}) -> [{}, {:#x}, {:#x}, {:#x}, {:#x}]",
        call_name(rec.id),
        rec.id,
        rec.args[0],
        rec.args[1],
        rec.args[2],
        rec.args[3],
        rec.args[4],
        rec.ret[0] as i64,
        rec.ret[1],
        rec.ret[2],
        rec.ret[3],
        rec.ret[4]
    );
}

/// Prints the seed and the last calls: on a failure, and from the abort
/// hook (an unexpected exception or a panic of this kernel).
fn print_context() {
    let seed = SEED.load(Ordering::Relaxed);
    println!(
        "fuzz: FAILED after {} host calls; seed={:#x} (replay: python3 tests/run.py --suite fuzz --seed {:#x})",
        CALLS.load(Ordering::Relaxed),
        seed,
        seed
    );
    let r = ring();
    let shown = r.len.min(SHOWN);
    println!("fuzz: the last {} calls, oldest first:", shown);
    for k in 0..shown {
        let at = (r.next + RING - shown + k) % RING;
        print_rec(&r.recs[at]);
    }
}

// ---- Generator ----

/// splitmix64: every seed, 0 included, gives a good stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    /// True with probability 1/n.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

// ---- What the fuzzer knows ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cpu {
    Uninit,
    /// Starts at the payload (or finds no code there and faults at once).
    Payload,
    /// Starts in the window: faults at once.
    Window,
    /// Started elsewhere: never run (it could loop without an exit).
    Untrusted,
    /// Faulted, or the guest took an exception: never run again.
    Stopped,
}

#[derive(Clone, Copy)]
struct Vm {
    live: bool,
    nr: u64,
    cpu: [Cpu; MAX_VCPUS],
    /// What the next VCPU_RUN of each vCPU must pass as completion.
    completion: [u64; MAX_VCPUS],
    off: bool,
    payload: bool,
    /// A vCPU of it has entered the guest: VCPU_INIT is DENIED from then.
    started: bool,
}

const NO_VM: Vm = Vm {
    live: false,
    nr: 0,
    cpu: [Cpu::Uninit; MAX_VCPUS],
    completion: [0; MAX_VCPUS],
    off: false,
    payload: false,
    started: false,
};

/// One bit per sacrificial page.
struct Bits([u64; SAC_PAGES / 64]);

impl Bits {
    fn index(pfn: u64) -> Option<usize> {
        let pa = pfn.checked_mul(PAGE)?;
        SACRIFICE
            .contains(pa)
            .then(|| ((pa - SACRIFICE.start) / PAGE) as usize)
    }
    fn set(&mut self, pfn: u64, nr: u64) {
        for p in pfn..pfn.saturating_add(nr) {
            if let Some(i) = Self::index(p) {
                self.0[i / 64] |= 1 << (i % 64);
            }
        }
    }
    fn clear(&mut self, pfn: u64) {
        if let Some(i) = Self::index(pfn) {
            self.0[i / 64] &= !(1 << (i % 64));
        }
    }
    fn get(&self, pfn: u64) -> bool {
        Self::index(pfn).is_some_and(|i| self.0[i / 64] & (1 << (i % 64)) != 0)
    }
    fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
    /// The pfns of the set bits.
    fn pfns(&self) -> impl Iterator<Item = u64> + '_ {
        (0..SAC_PAGES)
            .filter(|&i| self.0[i / 64] & (1 << (i % 64)) != 0)
            .map(|i| SACRIFICE.start / PAGE + i as u64)
    }
}

struct Fuzzer {
    rng: Rng,
    seed: u64,
    trace: bool,
    /// Host calls made (the invariant checks not included).
    calls: u64,
    guest_calls: u64,
    checks: u64,
    check_first: u64,
    check_every: u64,
    /// Counts of x0 of the host calls, by status (0, -1, -3, -4, -5, -6,
    /// anything else).
    outcomes: [u64; 7],
    zero_checked: u64,
    probes: u64,
    mmio_window: u64,
    ram: Range,
    host_memory: Ranges,
    holes: Ranges,
    /// This kernel's image and stack, the device tree, the initrd.
    deny: [Range; 3],
    vms: [Vm; MAX_VMS],
    /// Sacrificial pages donated to the hypervisor or a VM: zero when they
    /// come back.
    given: Bits,
    /// Sacrificial pages shared with the hypervisor or a VM.
    lent: Bits,
    /// Ranges shared with the hypervisor (outside the sacrificial region
    /// too), unshared at each epoch: the invariant check's cost grows with
    /// the pages the hypervisor maps.
    shared: [(u64, u64); 64],
    nr_shared: usize,
    /// Pfns that recently took part in a successful call.
    recent: [u64; 16],
    recent_at: usize,
}

fn status_index(x0: u64) -> usize {
    match x0 as i64 {
        status::SUCCESS => 0,
        status::NOT_SUPPORTED => 1,
        status::INVALID_PARAMETER => 2,
        status::DENIED => 3,
        status::NO_MEMORY => 4,
        status::BUSY => 5,
        _ => 6,
    }
}

/// `HVC #imm` for the immediates the fuzzer uses.
fn hvc_imm(imm: u16, id: u64, a: [u64; 5]) -> Regs {
    macro_rules! hvc {
        ($imm:literal) => {{
            let (r0, r1, r2, r3, r4);
            // SAFETY: as crate::hvc: the hypervisor returns to the
            // next instruction, writing at most x0..x17, all declared.
            unsafe {
                core::arch::asm!(
                    concat!("hvc #", $imm),
                    inout("x0") id => r0,
                    inout("x1") a[0] => r1,
                    inout("x2") a[1] => r2,
                    inout("x3") a[2] => r3,
                    inout("x4") a[3] => r4,
                    inout("x5") a[4] => _,
                    out("x6") _, out("x7") _, out("x8") _, out("x9") _,
                    out("x10") _, out("x11") _, out("x12") _, out("x13") _,
                    out("x14") _, out("x15") _, out("x16") _, out("x17") _,
                    options(nostack),
                );
            }
            Regs([r0, r1, r2, r3, r4])
        }};
    }
    match imm {
        0 => crate::hvc(id, a),
        1 => hvc!("1"),
        0x7f => hvc!("0x7f"),
        _ => hvc!("0xffff"),
    }
}

fn counter() -> u64 {
    let v: u64;
    // SAFETY: reading the virtual counter has no side effects.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack)) };
    v
}

fn counter_hz() -> u64 {
    let v: u64;
    // SAFETY: as above.
    unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) v, options(nomem, nostack)) };
    v.max(1)
}

fn overlaps(a: &Range, b: &Range) -> bool {
    a.start < b.end && b.start < a.end
}

/// [pfn, pfn + nr) as bytes, if it does not overflow.
fn pfn_bytes(pfn: u64, nr: u64) -> Option<Range> {
    let start = pfn.checked_mul(PAGE)?;
    let end = start.checked_add(nr.checked_mul(PAGE)?)?;
    Some(Range::new(start, end))
}

impl Fuzzer {
    fn new(boot: &BootInfo, seed: u64) -> Result<Self, Failure> {
        let arg = |k| boot.arg(k).and_then(parse_u64);
        let initrd = {
            let chosen = boot.fdt.find_node("/chosen");
            let prop = |name| {
                chosen
                    .and_then(|c| c.property(name))
                    .and_then(|p| p.as_usize())
                    .map(|v| v as u64)
            };
            match (prop("linux,initrd-start"), prop("linux,initrd-end")) {
                (Some(s), Some(e)) => Range::new(s, e),
                _ => Range::new(0, 0),
            }
        };
        let f = Fuzzer {
            rng: Rng(seed),
            seed,
            trace: arg("fuzz_trace").is_some_and(|v| v != 0),
            calls: 0,
            guest_calls: 0,
            checks: 0,
            check_first: arg("check_first").unwrap_or(DEFAULT_CHECK_FIRST),
            check_every: arg("check_every").unwrap_or(DEFAULT_CHECK_EVERY).max(1),
            outcomes: [0; 7],
            zero_checked: 0,
            probes: 0,
            mmio_window: 0,
            ram: boot.physical_ram(),
            host_memory: boot.memory,
            holes: boot.hyp_ranges(),
            deny: [boot.image, boot.dtb, initrd],
            vms: [NO_VM; MAX_VMS],
            given: Bits([0; SAC_PAGES / 64]),
            lent: Bits([0; SAC_PAGES / 64]),
            shared: [(0, 0); 64],
            nr_shared: 0,
            recent: [SACRIFICE.start / PAGE; 16],
            recent_at: 0,
        };
        ensure_ok(
            f.host_memory.covers(&SACRIFICE),
            format_args!("the sacrificial region {} is not host memory", SACRIFICE),
        )?;
        for d in &f.deny {
            ensure_ok(
                !overlaps(d, &SACRIFICE),
                format_args!(
                    "{} (image, DTB or initrd) overlaps the sacrificial region",
                    d
                ),
            )?;
        }
        ensure_ok(
            !f.holes.is_empty(),
            format_args!("no hypervisor memory found in RAM {}", f.ram),
        )?;
        Ok(f)
    }

    fn fail(&self, args: core::fmt::Arguments) -> Failure {
        print_context();
        let mut f = Failure::new(args);
        let _ = write!(f, " (call {}, seed {:#x})", self.calls, self.seed);
        f
    }

    // ---- Issuing calls ----

    /// One host call: recorded, made, counted, then the invariants checked.
    fn hvc(&mut self, imm: u16, id: u64, args: [u64; 5]) -> Result<Regs, Failure> {
        self.calls += 1;
        CALLS.store(self.calls, Ordering::Relaxed);
        let at = push(Rec {
            n: self.calls,
            guest: false,
            imm,
            id,
            args,
            ret: [0; 5],
        });
        if self.trace {
            print_rec(&ring().recs[at]);
        }
        let r = hvc_imm(imm, id, args);
        ring().recs[at].ret = r.0;
        if self.trace {
            println!(
                "      -> [{}, {:#x}, {:#x}, {:#x}, {:#x}]",
                r.0[0] as i64, r.0[1], r.0[2], r.0[3], r.0[4]
            );
        }
        self.outcomes[status_index(r.0[0])] += 1;
        self.check_status(imm, id, &r)?;
        if self.calls <= self.check_first || self.calls.is_multiple_of(self.check_every) {
            self.checks += 1;
            if let Err((e, addr)) = call::keel_check_invariants() {
                return Err(self.fail(format_args!(
                    "KEEL_CHECK_INVARIANTS after {} {:#x}: {:?} at {:#x}",
                    call_name(id),
                    id,
                    e,
                    addr
                )));
            }
        }
        Ok(r)
    }

    fn call(&mut self, id: u64, args: [u64; 5]) -> Result<Regs, Failure> {
        self.hvc(0, id, args)
    }

    /// What the contract says of x0 whatever the arguments.
    fn check_status(&self, imm: u16, id: u64, r: &Regs) -> TestResult {
        let x0 = r.0[0];
        if imm != 0 {
            if x0 as i64 != status::NOT_SUPPORTED {
                return Err(self.fail(format_args!(
                    "HVC #{:#x} of {:#x} returned {}, not NOT_SUPPORTED",
                    imm, id, x0 as i64
                )));
            }
            return Ok(());
        }
        let ok = match id {
            func::FEATURES => x0 == keel_abi::FEATURES_BITMAP,
            func::CALL_UID => r.0[..4] == keel_abi::KVM_UID,
            func::REVISION => r.0[..2] == [keel_abi::REVISION_MAJOR, keel_abi::REVISION_MINOR],
            func::HYP_FEATURES => x0 == 0 && r.0[1] == keel_abi::BLOCK_SIZES,
            func::HYP_MEMINFO | func::MEM_SHARE | func::MEM_UNSHARE | func::MEM_RELINQUISH => {
                x0 as i64 == status::NOT_SUPPORTED
            }
            id if IDS.contains(&id) => status_index(x0) < 6,
            _ => x0 as i64 == status::NOT_SUPPORTED,
        };
        if !ok {
            return Err(self.fail(format_args!(
                "{} {:#x} returned x0..x3 = [{:#x}, {:#x}, {:#x}, {:#x}], which the contract rules out",
                call_name(id),
                id,
                x0,
                r.0[1],
                r.0[2],
                r.0[3]
            )));
        }
        Ok(())
    }

    // ---- Arguments ----

    fn remember(&mut self, pfn: u64) {
        self.recent[self.recent_at] = pfn;
        self.recent_at = (self.recent_at + 1) % self.recent.len();
    }

    fn hyp_shared(&mut self, pfn: u64, nr: u64) {
        if self.nr_shared < self.shared.len() {
            self.shared[self.nr_shared] = (pfn, nr);
            self.nr_shared += 1;
        }
    }

    fn sac_pfn(&mut self) -> u64 {
        SACRIFICE.start / PAGE + self.rng.below(SAC_PAGES as u64)
    }

    /// A pfn, biased to the interesting ones.
    fn pfn(&mut self) -> u64 {
        let r = &mut self.rng;
        match r.below(16) {
            0..=4 => self.sac_pfn(),
            5..=6 => {
                let p = self.rng.pick(&self.recent);
                p.wrapping_add(self.rng.pick(&[0, 0, 0, 1, u64::MAX, 511, 512]))
            }
            7 => {
                // The hypervisor's memory: its ends, their neighbours, inside.
                let holes = self.holes;
                let n = holes.iter().count() as u64;
                let h = *holes.iter().nth(self.rng.below(n) as usize).unwrap();
                let inside = h.start / PAGE + self.rng.below(h.len() / PAGE);
                let near = [
                    h.start / PAGE,
                    h.start / PAGE - 1,
                    h.end / PAGE - 1,
                    h.end / PAGE,
                    inside,
                ];
                self.rng.pick(&near)
            }
            8 => {
                let (s, e) = (self.ram.start / PAGE, self.ram.end / PAGE);
                self.rng.pick(&[s, s - 1, e - 1, e, e + 1, s + 1])
            }
            9 => self.rng.pick(&[
                0x0900_0000 / PAGE, // UART
                0x0800_0000 / PAGE, // GIC distributor
                0x080a_0000 / PAGE, // GIC redistributor
                0x0a00_0000 / PAGE, // virtio-mmio
                0x1000_0000 / PAGE, // PCIe window
                0,
                1,
            ]),
            10 => self.rng.pick(&[
                u64::MAX,
                u64::MAX >> 12,
                (u64::MAX >> 12) - 1,
                1 << 52,
                (1 << 36) - 1,
                1 << 40,
                1 << 63,
            ]),
            11..=12 => (self.ram.start + self.rng.below(self.ram.len())) / PAGE,
            13 => {
                let d = self.rng.pick(&self.deny);
                if d.len() == 0 {
                    self.sac_pfn()
                } else {
                    (d.start + self.rng.below(d.len())) / PAGE
                }
            }
            _ => (SACRIFICE.start + self.rng.below(SAC_PAGES as u64 / 512) * BLOCK) / PAGE,
        }
    }

    fn nr(&mut self) -> u64 {
        match self.rng.below(16) {
            0..=6 => 1,
            7..=9 => 2 + self.rng.below(7),
            10 => 512,
            11 => 0,
            12 => self.rng.pick(&[511, 513, 1024, 1 << 18]),
            13 => self.rng.pick(&[
                u64::MAX,
                1 << 52,
                u64::MAX >> 12,
                1 << 51,
                u64::MAX / PAGE + 1,
            ]),
            _ => 1 + self.rng.below(64),
        }
    }

    fn live_handles(&self) -> ([u64; MAX_VMS], usize) {
        let mut h = [0; MAX_VMS];
        let mut n = 0;
        for (i, vm) in self.vms.iter().enumerate() {
            if vm.live {
                h[n] = HANDLE_BASE + i as u64;
                n += 1;
            }
        }
        (h, n)
    }

    fn handle(&mut self) -> u64 {
        let (live, n) = self.live_handles();
        match self.rng.below(10) {
            0..=4 if n > 0 => live[self.rng.below(n as u64) as usize],
            0..=6 => HANDLE_BASE + self.rng.below(MAX_VMS as u64 + 1),
            7..=8 => self.rng.pick(&[
                0,
                HANDLE_BASE - 1,
                HANDLE_BASE + MAX_VMS as u64,
                u64::MAX,
                HANDLE_BASE | 1 << 32,
                HANDLE_BASE | 1 << 63,
                1,
            ]),
            _ => self.rng.next(),
        }
    }

    fn vcpu(&mut self) -> u64 {
        match self.rng.below(10) {
            0..=6 => self.rng.below(MAX_VCPUS as u64),
            7..=8 => self
                .rng
                .pick(&[MAX_VCPUS as u64, MAX_VCPUS as u64 + 1, u64::MAX, 1 << 32]),
            _ => self.rng.next(),
        }
    }

    fn ipa(&mut self) -> u64 {
        match self.rng.below(10) {
            0..=3 => DATA_IPA + self.rng.below(512) * PAGE,
            4 => SHARED_IPA + self.rng.below(8) * PAGE,
            5 => CODE_IPA,
            6 => self.rng.pick(&[
                0,
                PAGE,
                IPA_LIMIT - PAGE,
                IPA_LIMIT,
                !(PAGE - 1),
                1 << 38,
                0x4000_0000,
                DATA_IPA - PAGE,
            ]),
            7 => self.rng.below(IPA_LIMIT / PAGE) * PAGE,
            8 => WINDOW.start + self.rng.below(WINDOW.len() / PAGE) * PAGE,
            _ => self.rng.next(),
        }
    }

    /// Whether a memory-taking call's range [pfn, pfn + nr) may be sent:
    /// `Some(true)` if it lies in the sacrificial region, `Some(false)` if
    /// it is not all host memory (the call must be refused), `None` if it
    /// names host memory outside the sacrificial region or any of this
    /// kernel's own memory.
    fn taking_ok(&self, pfn: u64, nr: u64) -> Option<bool> {
        let Some(r) = pfn_bytes(pfn, nr) else {
            return Some(false);
        };
        if nr == 0 || r.start == r.end {
            return Some(false);
        }
        if SACRIFICE.covers(&r) {
            return Some(true);
        }
        if self.deny.iter().any(|d| overlaps(d, &r)) {
            return None;
        }
        if self.host_memory.iter().any(|m| m.covers(&r)) {
            return None;
        }
        Some(false)
    }

    /// A (pfn, nr) for a memory-taking call, and whether it must be refused.
    fn taking_range(&mut self) -> (u64, u64, bool) {
        let (pfn, nr) = (self.pfn(), self.nr());
        match self.taking_ok(pfn, nr) {
            Some(true) => (pfn, nr, false),
            Some(false) => (pfn, nr, true),
            None => {
                let pfn = self.sac_pfn();
                let room = SACRIFICE.end / PAGE - pfn;
                (pfn, nr.clamp(1, room), false)
            }
        }
    }

    /// An IPA range for VM_DONATE / VM_SHARE clear of the payload's code
    /// page and of the window.
    fn giving_ipa(&mut self, nr: u64) -> u64 {
        let ipa = self.ipa();
        let end = ipa.saturating_add(nr.saturating_mul(PAGE)).min(IPA_LIMIT);
        let r = Range::new(ipa, end.max(ipa));
        let code = Range::new(CODE_IPA, CODE_IPA + PAGE);
        if overlaps(&r, &code) || overlaps(&r, &WINDOW) {
            DATA_IPA
        } else {
            ipa
        }
    }

    // ---- One random call ----

    fn random_call(&mut self) -> TestResult {
        let imm = if self.rng.one_in(40) {
            self.rng.pick(&[1u16, 0x7f, 0xffff])
        } else {
            0
        };
        let id = match self.rng.below(20) {
            0 => {
                let (a, b, c, d) = (
                    self.rng.below(0x200),
                    self.rng.below(0x1_0000),
                    self.rng.below(0x1_0000),
                    self.rng.next(),
                );
                self.rng.pick(&[
                    0xC600_0000 | a,
                    0x8600_0000 | b,
                    0xC600_0000 | c,
                    d & 0xffff_ffff,
                    d,
                    func::VCPU_RUN | 1 << 32,
                    0,
                ])
            }
            _ => self.rng.pick(&IDS),
        };
        if imm != 0 {
            let args = [self.rng.next(), self.nr(), self.rng.next(), 0, 0];
            self.hvc(imm, id, args)?;
            return Ok(());
        }
        match id {
            func::HOST_DONATE_HYP => {
                let (pfn, nr, refuse) = self.taking_range();
                let r = self.call(id, [pfn, nr, 0, 0, 0])?;
                self.after_taking(id, pfn, nr, refuse, &r)?;
            }
            func::VM_DONATE | func::VM_SHARE => {
                let h = self.handle();
                let (pfn, nr, refuse) = self.taking_range();
                let ipa = self.giving_ipa(nr);
                let r = self.call(id, [h, pfn, ipa, nr, 0])?;
                self.after_taking(id, pfn, nr, refuse, &r)?;
            }
            func::HOST_RECLAIM => {
                let (pfn, nr) = (self.pfn(), self.nr());
                self.reclaim(pfn, nr)?;
            }
            func::HOST_SHARE_HYP | func::HOST_UNSHARE_HYP | func::HOST_PIN | func::HOST_UNPIN => {
                let (pfn, nr) = (self.pfn(), self.nr());
                let r = self.call(id, [pfn, nr, 0, 0, 0])?;
                if r.0[0] == 0 {
                    self.remember(pfn);
                    if id == func::HOST_SHARE_HYP {
                        self.lent.set(pfn, nr);
                        self.hyp_shared(pfn, nr);
                    }
                }
            }
            func::MEM_STATE => {
                let pfn = self.pfn();
                self.call(id, [pfn, 0, 0, 0, 0])?;
            }
            func::HYP_STATS => {
                let c = match self.rng.below(4) {
                    0..=2 => self.rng.below(keel_abi::stat::COUNT),
                    _ => {
                        let junk = self.rng.next();
                        self.rng.pick(&[6, 7, 64, 1 << 32, u64::MAX, junk])
                    }
                };
                self.call(id, [c, 0, 0, 0, 0])?;
            }
            func::VM_CREATE => {
                let nr = match self.rng.below(10) {
                    0..=6 => 1 + self.rng.below(MAX_VCPUS as u64),
                    7..=8 => self.rng.pick(&[0, MAX_VCPUS as u64 + 1, u64::MAX, 1 << 32]),
                    _ => self.rng.next(),
                };
                let flags = if self.rng.one_in(10) {
                    self.rng.next()
                } else {
                    0
                };
                self.create(nr, flags)?;
            }
            func::VM_DESTROY => {
                let h = self.handle();
                self.destroy(h)?;
            }
            func::VCPU_INIT => {
                let (h, i) = (self.handle(), self.vcpu());
                let entry = match self.rng.below(10) {
                    0..=3 => CODE_IPA,
                    4 => WINDOW.start + self.rng.below(WINDOW.len() / PAGE) * PAGE,
                    5..=6 => self.ipa(),
                    7 => CODE_IPA + 2,
                    _ => self.rng.next(),
                };
                let seed = self.rng.next();
                self.vcpu_init(h, i, entry, seed)?;
            }
            func::VCPU_RUN => {
                let (h, i) = (self.handle(), self.vcpu());
                match self.known_cpu(h, i) {
                    Some((_, _, Cpu::Untrusted)) => {
                        // Could run anything without ever exiting: name a
                        // vCPU past the last instead.
                        let c = self.rng.next();
                        self.call(id, [h, MAX_VCPUS as u64, c, 0, 0])?;
                    }
                    Some((slot, i, Cpu::Payload | Cpu::Window | Cpu::Stopped)) => {
                        self.run(slot, i)?
                    }
                    Some((_, _, Cpu::Uninit)) => {
                        let c = self.rng.next();
                        let r = self.call(id, [h, i, c, 0, 0])?;
                        if r.0[0] as i64 != status::INVALID_PARAMETER {
                            return Err(self.fail(format_args!(
                                "VCPU_RUN of handle {:#x} vCPU {:#x}, never initialized, returned {}",
                                h, i, r.0[0] as i64
                            )));
                        }
                    }
                    None => {
                        let c = self.rng.next();
                        let r = self.call(id, [h, i, c, 0, 0])?;
                        if r.0[0] == 0 {
                            return Err(self.fail(format_args!(
                                "VCPU_RUN of handle {:#x} vCPU {:#x}, which the fuzzer never made, succeeded",
                                h, i
                            )));
                        }
                    }
                }
            }
            func::VM_UNSHARE => {
                let (h, ipa, nr) = (self.handle(), self.ipa(), self.nr());
                let r = self.call(id, [h, ipa, nr, 0, 0])?;
                let _ = r;
            }
            func::VM_MEM_STATE => {
                let (h, ipa) = (self.handle(), self.ipa());
                self.call(id, [h, ipa, 0, 0, 0])?;
            }
            func::KEEL_TABLE_PAGES => {
                // The host's stage 2 (0) always answers, and so does a
                // live VM's; a dead VM's does until its last page is back.
                let which = if self.rng.one_in(4) { 0 } else { self.handle() };
                let r = self.call(id, [which, 0, 0, 0, 0])?;
                let live = which
                    .checked_sub(HANDLE_BASE)
                    .filter(|&s| s < MAX_VMS as u64)
                    .is_some_and(|s| self.vms[s as usize].live);
                if (which == 0 || live) && (r.0[0] != 0 || r.0[1] == 0) {
                    return Err(self.fail(format_args!(
                        "KEEL_TABLE_PAGES of {:#x}: status {}, {} pages",
                        which, r.0[0] as i64, r.0[1]
                    )));
                }
            }
            func::KEEL_VCPU_VTIMER => {
                // A started vCPU of a live VM takes a good configuration.
                let (h, i) = (self.handle(), self.vcpu());
                let enabled = self.rng.pick(&[0, 1, 1, 2]);
                let prio = if self.rng.one_in(8) {
                    self.rng.next()
                } else {
                    self.rng.below(256)
                };
                let r = self.call(id, [h, i, enabled, prio, 0])?;
                let started =
                    matches!(self.known_cpu(h, i), Some((_, _, c)) if !matches!(c, Cpu::Uninit));
                let want = if enabled <= 1 && prio <= 0xff && started {
                    status::SUCCESS
                } else {
                    status::INVALID_PARAMETER
                };
                if r.0[0] as i64 != want {
                    return Err(self.fail(format_args!(
                        "KEEL_VCPU_VTIMER({:#x}, {}, {}, {:#x}): status {}, expected {}",
                        h, i, enabled, prio, r.0[0] as i64, want
                    )));
                }
            }
            func::KEEL_VCPU_IRQ => {
                // An interrupt for a started vCPU of a live VM is taken
                // (or BUSY, once 32 wait for it: the fuzzer runs vCPUs
                // seldom); anything else is refused.
                let (h, i) = (self.handle(), self.vcpu());
                let intid = match self.rng.below(4) {
                    0..=1 => self.rng.below(1024),
                    2 => keel_abi::VTIMER_INTID,
                    _ => self.rng.next(),
                };
                let prio = if self.rng.one_in(8) {
                    self.rng.next()
                } else {
                    self.rng.below(256)
                };
                let r = self.call(id, [h, i, intid, prio, 0])?;
                let valid = intid <= 1019 && intid != keel_abi::VTIMER_INTID && prio <= 0xff;
                let started =
                    matches!(self.known_cpu(h, i), Some((_, _, c)) if !matches!(c, Cpu::Uninit));
                let want: &[i64] = if valid && started {
                    &[status::SUCCESS, status::BUSY]
                } else {
                    &[status::INVALID_PARAMETER]
                };
                if !want.contains(&(r.0[0] as i64)) {
                    return Err(self.fail(format_args!(
                        "KEEL_VCPU_IRQ({:#x}, {}, {:#x}, {:#x}): status {}, expected one of {:?}",
                        h, i, intid, prio, r.0[0] as i64, want
                    )));
                }
            }
            _ => {
                // Discovery, guest calls, the invariant check, unknown IDs.
                let args = [self.ipa(), self.nr(), self.rng.next(), self.rng.next(), 0];
                self.call(id, args)?;
            }
        }
        Ok(())
    }

    /// The live VM slot and vCPU `(h, i)` name, and what the fuzzer knows
    /// of it.
    fn known_cpu(&self, h: u64, i: u64) -> Option<(usize, usize, Cpu)> {
        let slot = h.checked_sub(HANDLE_BASE).filter(|&s| s < MAX_VMS as u64)? as usize;
        let vm = &self.vms[slot];
        (vm.live && i < vm.nr).then(|| (slot, i as usize, vm.cpu[i as usize]))
    }

    fn after_taking(&mut self, id: u64, pfn: u64, nr: u64, refuse: bool, r: &Regs) -> TestResult {
        if r.0[0] != 0 {
            return Ok(());
        }
        if refuse {
            return Err(self.fail(format_args!(
                "{} of pfn {:#x} nr {:#x}, not all host memory, succeeded",
                call_name(id),
                pfn,
                nr
            )));
        }
        self.remember(pfn);
        if id == func::VM_SHARE {
            self.lent.set(pfn, nr);
        } else {
            self.given.set(pfn, nr);
        }
        Ok(())
    }

    fn create(&mut self, nr: u64, flags: u64) -> Result<Option<usize>, Failure> {
        let r = self.call(func::VM_CREATE, [nr, flags, 0, 0, 0])?;
        if r.0[0] != 0 {
            return Ok(None);
        }
        let slot = r.0[1].wrapping_sub(HANDLE_BASE);
        if slot >= MAX_VMS as u64 || self.vms[slot as usize].live || nr == 0 || nr > 4 || flags != 0
        {
            return Err(self.fail(format_args!(
                "VM_CREATE({:#x}, {:#x}) gave handle {:#x}: bad arguments, or a live or unknown slot",
                nr, flags, r.0[1]
            )));
        }
        self.vms[slot as usize] = Vm {
            live: true,
            nr,
            ..NO_VM
        };
        Ok(Some(slot as usize))
    }

    fn destroy(&mut self, h: u64) -> TestResult {
        let r = self.call(func::VM_DESTROY, [h, 0, 0, 0, 0])?;
        let known = self.known_cpu(h, 0).map(|(s, _, _)| s);
        match (r.0[0], known) {
            (0, Some(slot)) => self.vms[slot] = NO_VM,
            (0, None) => {
                return Err(self.fail(format_args!(
                    "VM_DESTROY of {:#x}, not a live VM, succeeded",
                    h
                )))
            }
            _ => {}
        }
        Ok(())
    }

    fn vcpu_init(&mut self, h: u64, i: u64, entry: u64, seed: u64) -> TestResult {
        let r = self.call(func::VCPU_INIT, [h, i, entry, seed, 0])?;
        let valid = entry.is_multiple_of(4) && entry < 1 << 39;
        if let Some((slot, _, _)) = self.known_cpu(h, i) {
            let s = r.0[0] as i64;
            if self.vms[slot].started && valid && s != status::DENIED {
                return Err(self.fail(format_args!(
                    "VCPU_INIT of handle {:#x} vCPU {:#x}, whose VM has run, returned {} (not DENIED)",
                    h, i, s
                )));
            }
        }
        if r.0[0] == 0 {
            let Some((slot, i, _)) = self.known_cpu(h, i) else {
                return Err(self.fail(format_args!(
                    "VCPU_INIT of handle {:#x} vCPU {:#x}, not known to exist, succeeded",
                    h, i
                )));
            };
            self.vms[slot].cpu[i] = if entry == CODE_IPA {
                Cpu::Payload
            } else if WINDOW.contains(entry) {
                Cpu::Window
            } else {
                Cpu::Untrusted
            };
            self.vms[slot].completion[i] = 0;
        }
        Ok(())
    }

    // ---- Reclaim and what comes back ----

    /// HOST_RECLAIM. Only sacrificial pages the fuzzer gave away or lent
    /// may come back; on success every one that was given (to the
    /// hypervisor or a VM) reads zero, while pages the host had lent to a
    /// VM come back as they were.
    fn reclaim(&mut self, pfn: u64, nr: u64) -> TestResult {
        let r = self.call(func::HOST_RECLAIM, [pfn, nr, 0, 0, 0])?;
        if r.0[0] != 0 {
            return Ok(());
        }
        self.remember(pfn);
        for p in pfn..pfn.saturating_add(nr) {
            if !self.given.get(p) && !self.lent.get(p) {
                return Err(self.fail(format_args!(
                    "HOST_RECLAIM of pfn {:#x} nr {:#x} succeeded, but pfn {:#x} was never given away",
                    pfn, nr, p
                )));
            }
        }
        for p in pfn..pfn + nr {
            if self.given.get(p) {
                self.expect_zero(p, "HOST_RECLAIM")?;
            }
            self.given.clear(p);
            self.lent.clear(p);
            self.refill(p);
        }
        Ok(())
    }

    /// Reclaims [pfn, pfn + n) of pages the fuzzer gave away or lent, in
    /// halves where a whole range is refused, down to single pages.
    fn reclaim_run(&mut self, pfn: u64, n: u64) -> TestResult {
        self.reclaim(pfn, n)?;
        if !self.given.get(pfn) && !self.lent.get(pfn) {
            return Ok(());
        }
        if n == 1 {
            return self.settle(pfn);
        }
        let half = n / 2;
        self.reclaim_run(pfn, half)?;
        self.reclaim_run(pfn + half, n - half)
    }

    /// A page HOST_RECLAIM refused: shared with the hypervisor (unshared
    /// now), back with the host already (a guest relinquished it, zeroed;
    /// or the host unshared it), or still in use (a table).
    fn settle(&mut self, pfn: u64) -> TestResult {
        let given = self.given.get(pfn);
        if self.lent.get(pfn) {
            self.call(func::HOST_UNSHARE_HYP, [pfn, 1, 0, 0, 0])?;
        }
        let m = self.call(func::MEM_STATE, [pfn, 0, 0, 0, 0])?;
        if m.0[0] == 0 && m.0[1] == keel_abi::owner::HOST && m.0[2] == 0 {
            if given {
                self.expect_zero(pfn, "MEM_RELINQUISH")?;
            }
            self.given.clear(pfn);
            self.lent.clear(pfn);
            self.refill(pfn);
        }
        Ok(())
    }

    /// The page at `pfn`, the host's now, reads zero.
    fn expect_zero(&mut self, pfn: u64, after: &str) -> TestResult {
        let pa = pfn * PAGE;
        self.zero_checked += 1;
        if let Err(abort) = exception::read(pa) {
            return Err(self.fail(format_args!(
                "after {}, the host cannot read its page {:#x}: {}",
                after, pa, abort
            )));
        }
        for off in (0..PAGE).step_by(8) {
            // SAFETY: the host's page (the probe above read it), identity
            // mapped as RAM by our stage 1.
            let v = unsafe { core::ptr::read_volatile((pa + off) as *const u64) };
            if v != 0 {
                return Err(self.fail(format_args!(
                    "after {}, page {:#x} is not zero: {:#x} at {:#x}",
                    after,
                    pa,
                    v,
                    pa + off
                )));
            }
        }
        Ok(())
    }

    /// Puts FILL back into a sacrificial page the host has again.
    fn refill(&mut self, pfn: u64) {
        let pa = pfn * PAGE;
        if SACRIFICE.contains(pa) {
            fill(pa, PAGE);
        }
    }

    // ---- Probes ----

    /// A read of the hypervisor's memory aborts; a read of a page aborts
    /// exactly when MEM_STATE says the host has no access to it.
    fn probe(&mut self) -> TestResult {
        self.probes += 1;
        let holes = self.holes;
        let n = holes.iter().count() as u64;
        let h = *holes.iter().nth(self.rng.below(n) as usize).unwrap();
        let addr = (h.start + self.rng.below(h.len())) & !7;
        match exception::read(addr) {
            Ok(v) => {
                return Err(self.fail(format_args!(
                    "host read of the hypervisor's {:#x} succeeded: {:#x}",
                    addr, v
                )))
            }
            Err(abort) => {
                if let Err(f) = check_abort(&abort, ec::DATA_ABORT_SAME, addr, "read") {
                    return Err(self.fail(format_args!("{}", f.as_str())));
                }
            }
        }
        let pfn = if self.rng.one_in(2) {
            self.rng.pick(&self.recent)
        } else {
            self.sac_pfn()
        };
        let m = self.call(func::MEM_STATE, [pfn, 0, 0, 0, 0])?;
        if m.0[0] != 0 {
            return Ok(());
        }
        let addr = pfn * PAGE + (self.rng.below(PAGE) & !7);
        let nopage = m.0[2] == keel_abi::PageState::NoPage as u64;
        match (exception::read(addr), nopage) {
            (Ok(v), true) => Err(self.fail(format_args!(
                "MEM_STATE says the host has no access to {:#x} (owner {:#x}), but it read {:#x}",
                addr, m.0[1], v
            ))),
            (Err(abort), false) => Err(self.fail(format_args!(
                "MEM_STATE says the host has {:#x} (owner {:#x}, state {}), but reading it aborted: {}",
                addr, m.0[1], m.0[2], abort
            ))),
            (Err(abort), true) => match check_abort(&abort, ec::DATA_ABORT_SAME, addr, "read") {
                Ok(()) => Ok(()),
                Err(f) => Err(self.fail(format_args!("{}", f.as_str()))),
            },
            (Ok(_), false) => Ok(()),
        }
    }
}

fn ensure_ok(cond: bool, args: core::fmt::Arguments) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(Failure::new(args))
    }
}

/// Writes FILL over [pa, pa + len) of the host's own memory.
fn fill(pa: u64, len: u64) {
    for a in (pa..pa + len).step_by(8) {
        // SAFETY: callers pass sacrificial memory the host owns now; nothing
        // of this kernel lives there.
        unsafe { core::ptr::write_volatile(a as *mut u64, FILL) };
    }
}

// ---- Guests ----

impl Fuzzer {
    /// A sacrificial page the host owns alone now (MEM_STATE), or None.
    fn free_sac_page(&mut self) -> Result<Option<u64>, Failure> {
        for _ in 0..8 {
            let pfn = self.sac_pfn();
            let m = self.call(func::MEM_STATE, [pfn, 0, 0, 0, 0])?;
            if m.0[0] == 0 && m.0[1] == keel_abi::owner::HOST && m.0[2] == 0 {
                return Ok(Some(pfn));
            }
        }
        Ok(None)
    }

    /// Builds a VM running the payload: code at CODE_IPA, a 2 MiB block (or
    /// a few pages) at DATA_IPA, a few host pages shared at SHARED_IPA,
    /// every vCPU at the payload with a seed of its own. Best effort: the
    /// random calls may have used up slots, pool or pages.
    fn setup_guest(&mut self) -> TestResult {
        let nr = 1 + self.rng.below(MAX_VCPUS as u64);
        let mut slot = self.create(nr, 0)?;
        if slot.is_none() {
            // Make room: destroy a VM that runs no payload, or the oldest.
            let victim = (0..MAX_VMS)
                .find(|&s| self.vms[s].live && !self.vms[s].payload)
                .or_else(|| (0..MAX_VMS).find(|&s| self.vms[s].live));
            if let Some(v) = victim.filter(|_| self.rng.one_in(2)) {
                self.destroy(HANDLE_BASE + v as u64)?;
            } else {
                // Dead VMs hold the slots, or the pool is dry: feed it.
                let pfn = self.sac_pfn().min(SACRIFICE.end / PAGE - 64);
                let r = self.call(func::HOST_DONATE_HYP, [pfn, 64, 0, 0, 0])?;
                self.after_taking(func::HOST_DONATE_HYP, pfn, 64, false, &r)?;
            }
            slot = self.create(nr, 0)?;
        }
        let Some(slot) = slot else { return Ok(()) };
        let h = HANDLE_BASE + slot as u64;
        let Some(code) = self.free_sac_page()? else {
            return Ok(());
        };
        // Linker symbols: only their addresses are taken.
        let (start, end) = (
            core::ptr::addr_of!(keel_fuzz_guest_start) as u64,
            core::ptr::addr_of!(keel_fuzz_guest_end) as u64,
        );
        let len = (end - start).min(PAGE);
        let dst = code * PAGE;
        // SAFETY: `code` is a sacrificial page the host owns (just checked);
        // the payload is `len` bytes of our rodata.
        unsafe { core::ptr::copy_nonoverlapping(start as *const u8, dst as *mut u8, len as usize) };
        clean_dcache(dst, PAGE);
        let r = self.call(func::VM_DONATE, [h, code, CODE_IPA, 1, 0])?;
        self.after_taking(func::VM_DONATE, code, 1, false, &r)?;
        if r.0[0] != 0 {
            return Ok(());
        }
        self.vms[slot].payload = true;
        // Data: a whole 2 MiB block if one is free, else 16 pages.
        let mut data = false;
        for _ in 0..3 {
            let pfn = (SACRIFICE.start + self.rng.below(SAC_PAGES as u64 / 512) * BLOCK) / PAGE;
            let r = self.call(func::VM_DONATE, [h, pfn, DATA_IPA, 512, 0])?;
            self.after_taking(func::VM_DONATE, pfn, 512, false, &r)?;
            if r.0[0] == 0 {
                data = true;
                break;
            }
        }
        if !data {
            let pfn = self.sac_pfn().min(SACRIFICE.end / PAGE - 16);
            let r = self.call(func::VM_DONATE, [h, pfn, DATA_IPA, 16, 0])?;
            self.after_taking(func::VM_DONATE, pfn, 16, false, &r)?;
        }
        let pfn = self.sac_pfn().min(SACRIFICE.end / PAGE - 4);
        let n = 1 + self.rng.below(4);
        let r = self.call(func::VM_SHARE, [h, pfn, SHARED_IPA, n, 0])?;
        self.after_taking(func::VM_SHARE, pfn, n, false, &r)?;
        for i in 0..nr {
            let seed = self.rng.next();
            self.vcpu_init(h, i, CODE_IPA, seed)?;
        }
        Ok(())
    }

    /// A vCPU that may run: trusted, of a live VM.
    fn runnable(&mut self) -> Option<(usize, usize)> {
        let start = self.rng.below((MAX_VMS * MAX_VCPUS) as u64) as usize;
        (0..MAX_VMS * MAX_VCPUS)
            .map(|k| (start + k) % (MAX_VMS * MAX_VCPUS))
            .map(|k| (k / MAX_VCPUS, k % MAX_VCPUS))
            .find(|&(s, i)| {
                let vm = &self.vms[s];
                vm.live
                    && (i as u64) < vm.nr
                    && match vm.cpu[i] {
                        Cpu::Payload => !vm.off,
                        // Fault or power off at once: run now and then.
                        Cpu::Window | Cpu::Stopped => k_small(start),
                        _ => false,
                    }
            })
    }

    /// One VCPU_RUN of a trusted vCPU, and its exit checked and completed.
    fn run(&mut self, slot: usize, i: usize) -> TestResult {
        let h = HANDLE_BASE + slot as u64;
        let was = self.vms[slot].cpu[i];
        let completion = self.vms[slot].completion[i];
        // It enters now, or a vCPU of its VM entered before (a vCPU only
        // fails or stops, and a VM only goes off, by running).
        self.vms[slot].started = true;
        let r = self.call(func::VCPU_RUN, [h, i as u64, completion, 0, 0])?;
        if r.0[0] != 0 {
            return Err(self.fail(format_args!(
                "VCPU_RUN of live VM {:#x} vCPU {} ({:?}) returned {}",
                h, i, was, r.0[0] as i64
            )));
        }
        let [_, reason, d2, d3, d4] = r.0;
        let mut completion = self.rng.next();
        match reason {
            exit::HYPERCALL => match d2 {
                G_REPORT => {
                    let op = match (d4 >> 16) & 0xff {
                        3 => func::MEM_SHARE,
                        4 => func::MEM_UNSHARE,
                        _ => func::MEM_RELINQUISH,
                    };
                    let calls = (d4 >> 24) & 0xff;
                    self.guest_calls += calls;
                    push(Rec {
                        n: 0,
                        guest: true,
                        imm: 0,
                        id: op,
                        args: [d3, d4 >> 32, 0, 0, 0],
                        ret: [(d4 & 0xffff) as i16 as i64 as u64, calls, 0, 0, 0],
                    });
                    let st = (d4 & 0xffff) as i16 as i64;
                    if !matches!(st, 0 | -1 | -3 | -4 | -5 | -6) {
                        return Err(self.fail(format_args!(
                            "guest {} of {:#x} returned {}, not a status",
                            call_name(op),
                            d3,
                            st
                        )));
                    }
                }
                G_ERROR => {
                    let what = match d3 {
                        1 => "a host call from the guest was not refused with NOT_SUPPORTED",
                        2 => "an HVC with a non-zero immediate from the guest was not refused",
                        _ => "a guest load from an IPA it was never given returned data, not an MMIO exit",
                    };
                    return Err(self.fail(format_args!(
                        "VM {:#x} vCPU {}: {} (x1 = {:#x}, x2 = {:#x})",
                        h, i, what, d3, d4
                    )));
                }
                G_EXC => {
                    return Err(self.fail(format_args!(
                        "VM {:#x} vCPU {}: the payload took an exception at EL1: ESR_EL1 {:#x} ELR_EL1 {:#x}",
                        h, i, d3, d4
                    )));
                }
                _ => {}
            },
            exit::MMIO => {
                let ipa = d2;
                if WINDOW.contains(ipa) {
                    self.mmio_window += 1;
                    if d3 != (8 << 8) | (5 << 16) {
                        return Err(self.fail(format_args!(
                            "MMIO exit at {:#x}: access {:#x}, expected an 8-byte read into x5",
                            ipa, d3
                        )));
                    }
                    completion = ipa ^ MAGIC;
                } else {
                    let m = self.call(func::VM_MEM_STATE, [h, ipa & !(PAGE - 1), 0, 0, 0])?;
                    if m.0[0] == 0 && m.0[2] != keel_abi::PageState::NoPage as u64 {
                        return Err(self.fail(format_args!(
                            "MMIO exit at {:#x}, where VM {:#x} has memory (pfn {:#x}, state {})",
                            ipa, h, m.0[1], m.0[2]
                        )));
                    }
                }
            }
            exit::FAULT => {
                if was == Cpu::Payload {
                    let m = self.call(func::VM_MEM_STATE, [h, CODE_IPA, 0, 0, 0])?;
                    if m.0[0] == 0 && m.0[2] != keel_abi::PageState::NoPage as u64 {
                        return Err(self.fail(format_args!(
                            "VM {:#x} vCPU {} faulted (ESR {:#x}) with its code page still mapped",
                            h, i, d2
                        )));
                    }
                }
                self.vms[slot].cpu[i] = Cpu::Stopped;
            }
            exit::SYSTEM_OFF => self.vms[slot].off = true,
            exit::IRQ => {}
            _ => return Err(self.fail(format_args!("VCPU_RUN returned exit reason {:#x}", reason))),
        }
        self.vms[slot].completion[i] = completion;
        Ok(())
    }

    // ---- Taking everything back ----

    /// Destroys every VM and takes back every sacrificial page the fuzzer
    /// gave away, checking that what comes back zeroed is zero.
    fn cleanup(&mut self) -> TestResult {
        for s in 0..MAX_VMS {
            let h = HANDLE_BASE + s as u64;
            // Also slots the fuzzer does not know of (it would be a bug).
            let r = self.call(func::VM_DESTROY, [h, 0, 0, 0, 0])?;
            if r.0[0] == 0 && !self.vms[s].live {
                return Err(self.fail(format_args!(
                    "VM_DESTROY of {:#x}, which the fuzzer never created, succeeded",
                    h
                )));
            }
            self.vms[s] = NO_VM;
        }
        for k in 0..self.nr_shared {
            let (pfn, nr) = self.shared[k];
            self.call(func::HOST_UNSHARE_HYP, [pfn, nr, 0, 0, 0])?;
        }
        self.nr_shared = 0;
        let mut pending = Bits([0; SAC_PAGES / 64]);
        for (k, w) in pending.0.iter_mut().enumerate() {
            *w = self.given.0[k] | self.lent.0[k];
        }
        // Runs of consecutive pages, at most a 2 MiB block each.
        let mut run: Option<(u64, u64)> = None;
        for pfn in pending.pfns() {
            run = match run {
                Some((start, n)) if start + n == pfn && n < 512 => Some((start, n + 1)),
                Some((start, n)) => {
                    self.reclaim_run(start, n)?;
                    Some((pfn, 1))
                }
                None => Some((pfn, 1)),
            };
        }
        if let Some((start, n)) = run {
            self.reclaim_run(start, n)?;
        }
        Ok(())
    }

    fn summary(&self, ticks: u64) {
        let hz = counter_hz();
        let ms = ticks * 1000 / hz;
        let total = self.calls + self.guest_calls;
        println!(
            "fuzz: {} host calls + {} guest calls, {} invariant checks, in {} ms",
            self.calls, self.guest_calls, self.checks, ms
        );
        println!(
            "fuzz: host statuses: {} ok, {} NOT_SUPPORTED, {} INVALID_PARAMETER, {} DENIED, {} NO_MEMORY, {} BUSY, {} values",
            self.outcomes[0],
            self.outcomes[1],
            self.outcomes[2],
            self.outcomes[3],
            self.outcomes[4],
            self.outcomes[5],
            self.outcomes[6]
        );
        println!(
            "fuzz: {} pages checked zero, {} isolation probes, {} guest loads from never-given IPAs answered by MMIO exits",
            self.zero_checked, self.probes, self.mmio_window
        );
        if let Some(rate) = (total * hz).checked_div(ticks) {
            println!("bench fuzz_calls_per_second_qemu {} calls/s", rate);
        }
    }
}

/// One time in eight (by the low bits of a random number).
fn k_small(r: usize) -> bool {
    r.is_multiple_of(8)
}

/// Cleans [va, va + len) to the point of coherency, so that a guest with
/// its MMU (and so its caches) off fetches what the host wrote.
fn clean_dcache(va: u64, len: u64) {
    for a in (va..va + len).step_by(64) {
        // SAFETY: a cache clean of memory we own changes no data.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack)) };
    }
    // SAFETY: a barrier only.
    unsafe { core::arch::asm!("dsb sy", options(nostack)) };
}

static STATE: Global<Option<Fuzzer>> = Global(UnsafeCell::new(None));

fn state() -> &'static mut Option<Fuzzer> {
    // SAFETY: one CPU; the two tests use it one after the other.
    unsafe { &mut *STATE.0.get() }
}

fn random_calls(boot: &BootInfo) -> TestResult {
    let seed = boot.arg("seed").and_then(parse_u64).unwrap_or(0x6b65_656c);
    SEED.store(seed, Ordering::Relaxed);
    let target = boot
        .arg("calls")
        .and_then(parse_u64)
        .unwrap_or(DEFAULT_CALLS);
    println!(
        "fuzz: seed={:#x} calls={} (replay: python3 tests/run.py --suite fuzz --seed {:#x})",
        seed, target, seed
    );
    harness::set_on_abort(Some(print_context));
    let mut f = Fuzzer::new(boot, seed)?;
    if f.check_every != 1 {
        println!(
            "fuzz: invariants checked after each of the first {} calls, then every {}",
            f.check_first, f.check_every
        );
    }
    fill(SACRIFICE.start, SACRIFICE.len());
    let t0 = counter();
    let mut next_epoch = EPOCH;
    let mut next_progress = 20_000;
    while f.calls < target {
        match f.rng.below(100) {
            0..=64 => f.random_call()?,
            65..=84 => match f.runnable() {
                Some((s, i)) => f.run(s, i)?,
                None => f.setup_guest()?,
            },
            85..=89 => f.probe()?,
            90..=91 => {
                let payloads = f.vms.iter().filter(|v| v.live && v.payload).count();
                if payloads < 3 {
                    f.setup_guest()?;
                } else {
                    f.random_call()?;
                }
            }
            _ => f.random_call()?,
        }
        if f.calls >= next_epoch {
            next_epoch = f.calls + EPOCH;
            f.cleanup()?;
        }
        if f.calls >= next_progress {
            next_progress += 20_000;
            println!(
                "fuzz: {} host calls, {} guest calls, {} given / {} lent pages out",
                f.calls,
                f.guest_calls,
                f.given.count(),
                f.lent.count()
            );
        }
    }
    let ticks = counter() - t0;
    f.summary(ticks);
    // The oracles above speak only when their calls succeed: a keel that
    // refused every VM_DONATE, say, would leave them silent. A run of any
    // length has guests that ran, pages checked zero, probes made, and
    // host calls that succeeded.
    if target >= 1000 {
        for (count, what) in [
            (f.guest_calls, "guest calls"),
            (f.zero_checked, "pages checked zero"),
            (f.probes, "isolation probes"),
            (f.outcomes[0], "host calls that succeeded"),
        ] {
            if count == 0 {
                return Err(f.fail(format_args!(
                    "{} calls made no {}: the oracles that need them never ran",
                    f.calls, what
                )));
            }
        }
    }
    *state() = Some(f);
    Ok(())
}

/// Every VM destroyed and every page the fuzzer gave away taken back (but
/// those the hypervisor still uses as tables), zeroed where it must be.
fn teardown(_: &BootInfo) -> TestResult {
    let Some(f) = state().as_mut() else {
        crate::fail!("random_calls did not finish");
    };
    f.cleanup()?;
    let (given, lent) = (f.given.count(), f.lent.count());
    println!(
        "fuzz: after teardown {} donated pages stay with the hypervisor (tables), {} lent",
        given, lent
    );
    if lent != 0 {
        let pfn = f.lent.pfns().next().unwrap_or(0);
        return Err(f.fail(format_args!(
            "{} lent pages did not come back (first: pfn {:#x})",
            lent, pfn
        )));
    }
    harness::set_on_abort(None);
    Ok(())
}
