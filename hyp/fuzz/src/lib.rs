//! The `hypercalls` fuzz target's machine and decoder, shared by the
//! libFuzzer target and the stable replay binary.
//!
//! A fresh simulated machine per input: 64 MiB of RAM at 0x4000_0000 backed
//! by host memory, the hypervisor's image and boot pool at
//! 0x4020_0000..0x4030_0000, real page tables built by keel-mm, and
//! `keel_hyp::host::Hyp` dispatching onto it. The input is decoded into a
//! sequence of operations (host calls with edge-biased arguments, raw IDs
//! and immediates, VCPU_RUN with guest traps of fabricated syndromes, guest
//! calls outside a run, host writes to its own pages); after each, the
//! invariant checker must pass and the call's status must be one the ABI
//! allows. Pages HOST_RECLAIM returns from the hypervisor or a dead VM, and
//! pages a guest relinquishes, must read zero.

use std::alloc::{alloc_zeroed, dealloc, Layout};

use keel_abi::{func, status};
use keel_hyp::guest::{Action, Trap, TrapKind};
use keel_hyp::host::Hyp;
use keel_hyp::hvc::{Call, Return};
use keel_hyp::mem::{HypMmu, Memory, Ram, Range, ANN_HYP_PRIVATE, PAGE};
use keel_hyp::vm::{Vcpu, Vms};
use keel_mm::donated::DonatedPages;
use keel_mm::frames::RamFrames;
use keel_mm::stage1::{Perm, Stage1};
use keel_mm::{Geometry, NoTlb, PagePool, PageState, S2Attrs, Stage2};
use spin::Mutex;

const RAM_BASE: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 64 << 20;
const RAM_END: u64 = RAM_BASE + RAM_SIZE;
const HYP: Range = Range::new(0x4020_0000, 0x4030_0000);
const POOL: Range = Range::new(0x4024_0000, 0x4030_0000);
const MAX_VMS: u64 = keel_hyp::vm::MAX_VMS as u64;
const HANDLE: u64 = keel_abi::VM_HANDLE_BASE;
/// At most this many operations per input.
const MAX_OPS: usize = 512;

/// Zeroes guest pages for real in the backing.
struct FakeMmu;

impl HypMmu for FakeMmu {
    fn invalidate_range(&mut self, _: u64, _: u64) {}
    fn flush_dcache(&mut self, _: u64, _: u64) {}
    fn zero_page(&mut self, pool: &PagePool, pa: u64) {
        // SAFETY: the machine's RAM is all reachable at pool.va.
        unsafe { std::ptr::write_bytes(pool.va(pa), 0, PAGE as usize) };
    }
}

type FuzzHyp = Hyp<NoTlb, FakeMmu, NoTlb>;

/// The VM table outlives the machines (`Hyp` wants a `'static` one): one
/// per thread, emptied for each input.
fn vms() -> &'static Mutex<Vms<NoTlb>> {
    thread_local! {
        static VMS: &'static Mutex<Vms<NoTlb>> = Box::leak(Box::new(Mutex::new(Vms::new())));
    }
    let v = VMS.with(|v| *v);
    let mut vms = Vms::new();
    vms.lent.attach(
        RamFrames::one(RAM_BASE / PAGE, RAM_SIZE / PAGE),
        lent_words(),
    );
    *v.lock() = vms;
    v
}

/// The lent-page table's words (one per page of RAM), one set per thread
/// like the VM table; `Lent::attach` clears them for each input.
fn lent_words() -> &'static mut [u32] {
    thread_local! {
        static WORDS: *mut [u32] =
            Box::leak(vec![0u32; (RAM_SIZE / PAGE) as usize].into_boxed_slice());
    }
    let p = WORDS.with(|w| *w);
    // SAFETY: leaked, so it lives for ever; one machine at a time per
    // thread uses it, through the VM table `vms` just emptied.
    unsafe { &mut *p }
}

/// The pool's donated-page table and its words (two bits per page of RAM,
/// as at boot), like the VM table one per thread (a leaked one per input
/// would be a leak libFuzzer reports), emptied for each input.
fn donated() -> &'static mut DonatedPages {
    const PAGES: u64 = RAM_SIZE / PAGE;
    thread_local! {
        static DONATED: *mut DonatedPages = Box::leak(Box::new(DonatedPages::new()));
        static WORDS: *mut [u64] =
            Box::leak(vec![0u64; DonatedPages::words_for(PAGES)].into_boxed_slice());
    }
    let p = DONATED.with(|d| *d);
    let w = WORDS.with(|w| *w);
    // SAFETY: both leaked, so they live for ever; one machine at a time per
    // thread uses them, and the previous one was dropped before `new` runs
    // (so nothing refers to the words while `attach` clears them).
    let (d, words) = unsafe { (&mut *p, &mut *w) };
    *d = DonatedPages::new();
    d.attach(RamFrames::one(RAM_BASE / PAGE, PAGES), words);
    d
}

struct Machine {
    hyp: FuzzHyp,
    backing: *mut u8,
    layout: Layout,
    verbose: bool,
    calls: usize,
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.backing, self.layout) };
    }
}

impl Machine {
    fn new(verbose: bool) -> Self {
        let layout = Layout::from_size_align(RAM_SIZE as usize, 2 << 20).unwrap();
        // SAFETY: a non-zero-sized layout.
        let backing = unsafe { alloc_zeroed(layout) };
        assert!(!backing.is_null());
        let va_offset = (backing as usize).wrapping_sub(RAM_BASE as usize);
        let mut pool = PagePool::new(va_offset).unwrap();
        // SAFETY: the pool range is part of the backing, used by nothing else.
        unsafe { pool.add_range(POOL.start, POOL.len() as usize).unwrap() };
        pool.attach_donated(donated());
        let mut s1 = Stage1::new(&mut pool).unwrap();
        s1.map(HYP.start, HYP.start, HYP.len(), Perm::ReadWrite, &mut pool)
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
        let mem = Memory {
            ram: Ram::new(&[Range::new(RAM_BASE, RAM_END)]),
            host,
            hyp: s1,
            pool,
            mmu: FakeMmu,
        };
        let m = Machine {
            hyp: Hyp::new(mem, vms()),
            backing,
            layout,
            verbose,
            calls: 0,
        };
        m.check("boot");
        m
    }

    fn check(&self, after: &str) {
        let r = self.hyp.host_hvc(
            0,
            &Call {
                id: func::KEEL_CHECK_INVARIANTS,
                args: [0; 5],
            },
        );
        if r.regs[0] != status::SUCCESS as u64 {
            let what = {
                let m = self.hyp.mem.lock();
                let vms = self.hyp.vms.lock();
                m.check_invariants(&*vms).err().map(|v| v.what)
            };
            panic!(
                "invariant violated after {after}: {:?} at {:#x}",
                what, r.regs[1]
            );
        }
    }

    fn host(&mut self, imm: u64, id: u64, args: [u64; 5]) -> Return {
        self.calls += 1;
        let r = self.hyp.host_hvc(imm, &Call { id, args });
        if self.verbose {
            println!("host imm {imm:#x} {id:#x} {args:x?} -> {:x?}", r.regs);
        }
        check_status(imm, id, &r);
        self.check(&format!("host {imm:#x} {id:#x} {args:x?} -> {:x?}", r.regs));
        r
    }

    fn page(&mut self, pa: u64) -> &mut [u8] {
        assert!((RAM_BASE..RAM_END).contains(&pa) && pa.is_multiple_of(PAGE));
        // SAFETY: a page of the backing; the slice is dropped before anything
        // else touches the page.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.backing.add((pa - RAM_BASE) as usize),
                PAGE as usize,
            )
        }
    }

    /// MEM_STATE without counting it: (status, owner, host view).
    fn peek(&self, pfn: u64) -> (u64, u64, u64) {
        let r = self.hyp.host_hvc(
            0,
            &Call {
                id: func::MEM_STATE,
                args: [pfn, 0, 0, 0, 0],
            },
        );
        (r.regs[0], r.regs[1], r.regs[2])
    }

    fn expect_zero(&mut self, pfn: u64, after: &str) {
        let pa = pfn * PAGE;
        if let Some(i) = self.page(pa).iter().position(|&b| b != 0) {
            panic!("after {after}: page {pa:#x} is not zero at offset {i:#x}");
        }
    }
}

/// What the contract allows in x0 whatever the arguments.
fn check_status(imm: u64, id: u64, r: &Return) {
    let x0 = r.regs[0];
    let is_status = matches!(x0 as i64, 0 | -1 | -3 | -4 | -5 | -6);
    let ok = if imm != 0 {
        x0 as i64 == status::NOT_SUPPORTED
    } else {
        match id {
            func::FEATURES => x0 == keel_abi::FEATURES_BITMAP,
            func::CALL_UID => r.regs[..4] == keel_abi::KVM_UID,
            func::REVISION => r.regs[..2] == [1, 0],
            func::HYP_MEMINFO | func::MEM_SHARE | func::MEM_UNSHARE | func::MEM_RELINQUISH => {
                x0 as i64 == status::NOT_SUPPORTED
            }
            id if func::HOST_CALLS.contains(&id) || func::KEEL_CALLS.contains(&id) => is_status,
            _ => x0 as i64 == status::NOT_SUPPORTED,
        }
    };
    assert!(ok, "call {id:#x} (HVC #{imm:#x}) returned {:x?}", r.regs);
}

/// The input, read front to back; zeros once it runs out.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | u64::from(self.byte());
        }
        v
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.byte() as usize % items.len()]
    }
    /// A pfn: a byte chooses among RAM pages (a small index into a 2 MiB
    /// aligned area away from the hypervisor, which the ops reuse often),
    /// the hypervisor's pages and their neighbours, the ends of RAM, device
    /// memory, overflowing values, or 8 raw bytes.
    fn pfn(&mut self) -> u64 {
        let k = self.byte();
        match k % 8 {
            0..=2 => (0x4100_0000 + u64::from(self.byte()) * PAGE) / PAGE,
            3 => (0x4100_0000 + u64::from(self.byte()) * (2 << 20)) / PAGE % (RAM_END / PAGE),
            4 => self.pick(&[
                HYP.start / PAGE,
                HYP.start / PAGE - 1,
                HYP.end / PAGE - 1,
                HYP.end / PAGE,
                POOL.start / PAGE,
            ]),
            5 => self.pick(&[
                RAM_BASE / PAGE,
                RAM_BASE / PAGE - 1,
                RAM_END / PAGE - 1,
                RAM_END / PAGE,
                0x0900_0000 / PAGE,
                0,
            ]),
            6 => self.pick(&[u64::MAX, u64::MAX >> 12, 1 << 52, 1 << 63, 1]),
            _ => self.u64(),
        }
    }
    fn nr(&mut self) -> u64 {
        let k = self.byte();
        match k % 8 {
            0..=3 => 1 + u64::from(k >> 3) % 8,
            4 => self.pick(&[512, 511, 513, 1024, 0]),
            5 => self.pick(&[u64::MAX, 1 << 52, u64::MAX >> 12, 1 << 51]),
            _ => u64::from(self.byte()),
        }
    }
    fn handle(&mut self) -> u64 {
        let k = self.byte();
        match k % 4 {
            0..=2 => HANDLE + u64::from(k >> 2) % (MAX_VMS + 1),
            _ => {
                let raw = self.u64();
                self.pick(&[0, HANDLE - 1, u64::MAX, HANDLE | 1 << 32, raw])
            }
        }
    }
    fn vcpu(&mut self) -> u64 {
        let k = self.byte();
        match k % 4 {
            0..=2 => u64::from(k >> 2) % 5,
            _ => self.pick(&[u64::MAX, 1 << 32, 4]),
        }
    }
    fn ipa(&mut self) -> u64 {
        let k = self.byte();
        match k % 8 {
            0..=3 => 0x8000_0000 + u64::from(self.byte()) * PAGE,
            4 => 0x8000_0000 + u64::from(self.byte()) * (2 << 20),
            5 => self.pick(&[0, PAGE, (1 << 39) - PAGE, 1 << 39, !0xfff, 4095]),
            _ => self.u64(),
        }
    }
}

/// IDs the decoder names by index.
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
    // Last, so that the corpus's earlier indices keep their meaning.
    func::KEEL_TABLE_PAGES,
    func::KEEL_VCPU_IRQ,
    func::KEEL_VCPU_VTIMER,
];

/// Guest-side IDs (x0 of a trapped HVC or SMC).
const GUEST_IDS: [u64; 13] = [
    func::MEM_SHARE,
    func::MEM_UNSHARE,
    func::MEM_RELINQUISH,
    func::HYP_MEMINFO,
    func::FEATURES,
    func::HOST_DONATE_HYP,
    func::KEEL_CHECK_INVARIANTS,
    0x8400_0000, // PSCI VERSION
    0x8400_000A, // PSCI FEATURES
    0x8400_0008, // PSCI SYSTEM_OFF
    0x8400_0009, // PSCI SYSTEM_RESET
    0xC600_0FFF,
    func::KEEL_TABLE_PAGES,
];

/// A fabricated syndrome for a guest trap.
fn esr(inp: &mut Input) -> u64 {
    const IL: u64 = 1 << 25;
    let k = inp.byte();
    match k % 8 {
        // HVC64, mostly imm 0
        0..=2 => {
            0x16 << 26
                | IL
                | if k & 0x80 != 0 {
                    u64::from(inp.byte())
                } else {
                    0
                }
        }
        3 => 0x17 << 26 | IL, // SMC64
        // DABT_LOWER, ISV, size, SRT, WnR, SSE, SF, a translation or other FSC
        4 | 5 => {
            let b = inp.u64();
            0x24 << 26
                | IL
                | 1 << 24
                | (b & 3) << 22
                | (b >> 2 & 1) << 21
                | (b >> 3 & 31) << 16
                | (b >> 8 & 1) << 15
                | (b >> 9 & 1) << 6
                | inp.pick(&[0x04u64, 0x05, 0x06, 0x07, 0x09, 0x0d, 0x10, 0x3f])
        }
        6 => 0x20 << 26 | IL | 0x07, // IABT_LOWER
        // MSR/MRS (any encoding, any register), or SVE, SME, LS64 traps
        7 if k & 0x80 != 0 => {
            let ec = inp.pick(&[0x18u64, 0x18, 0x19, 0x1d, 0x0a]);
            ec << 26 | IL | inp.u64() & 0x1ff_ffff
        }
        _ => inp.u64() & 0xffff_ffff,
    }
}

fn trap(inp: &mut Input) -> Trap {
    let kind = match inp.byte() % 16 {
        0 => TrapKind::Irq,
        1 => TrapKind::Other,
        _ => TrapKind::Sync,
    };
    let esr = esr(inp);
    let far = inp.ipa() | u64::from(inp.byte()) & 0xff8;
    let hpfar = if inp.byte().is_multiple_of(4) {
        inp.u64()
    } else {
        (far >> 12) << 4
    };
    Trap {
        kind,
        esr,
        far,
        hpfar,
    }
}

/// Loads a guest's registers for a trap: x0 an ID, x1 an IPA, x2 a count.
fn guest_regs(inp: &mut Input, vcpu: &mut Vcpu) {
    vcpu.x[0] = if inp.byte().is_multiple_of(8) {
        inp.u64()
    } else {
        inp.pick(&GUEST_IDS)
    };
    vcpu.x[1] = inp.ipa();
    vcpu.x[2] = if inp.byte().is_multiple_of(4) {
        inp.nr()
    } else {
        0
    };
    vcpu.x[3] = inp.u64();
}

impl Machine {
    /// A guest trap on `vcpu` of VM slot `slot`; for MEM_RELINQUISH the
    /// pages it gave up must read zero afterwards.
    fn guest(&mut self, slot: usize, vcpu: &mut Vcpu, t: &Trap) -> Action {
        self.calls += 1;
        let (id, ipa, nr) = (vcpu.x[0], vcpu.x[1], vcpu.x[2].max(1));
        let relinquish = t.kind == TrapKind::Sync
            && t.esr >> 26 == 0x16
            && t.esr & 0xffff == 0
            && id == func::MEM_RELINQUISH
            && nr <= 16;
        let mut pfns = [None; 16];
        if relinquish {
            for (k, p) in pfns.iter_mut().enumerate().take(nr as usize) {
                let r = self.hyp.host_hvc(
                    0,
                    &Call {
                        id: func::VM_MEM_STATE,
                        args: [
                            HANDLE + slot as u64,
                            ipa.wrapping_add(k as u64 * PAGE),
                            0,
                            0,
                            0,
                        ],
                    },
                );
                if r.regs[0] == 0 && r.regs[2] != keel_abi::PageState::NoPage as u64 {
                    *p = Some(r.regs[1]);
                }
            }
        }
        let a = self.hyp.guest_trap(slot, vcpu, t);
        if self.verbose {
            println!(
                "guest slot {slot} {t:x?} -> {a:x?}, x0..x3 {:x?}",
                &vcpu.x[..4]
            );
        }
        self.check(&format!("guest slot {slot} {t:x?} -> {a:x?}"));
        if relinquish && matches!(a, Action::Resume) && vcpu.x[0] == 0 {
            for p in pfns.iter().flatten() {
                self.expect_zero(*p, "MEM_RELINQUISH");
            }
        }
        a
    }

    /// HOST_RECLAIM: pages that were not the host's come back zeroed.
    fn reclaim(&mut self, pfn: u64, nr: u64) {
        let mut zero = Vec::new();
        let small = nr <= 64 && pfn >= RAM_BASE / PAGE && pfn.saturating_add(nr) <= RAM_END / PAGE;
        if small {
            for p in pfn..pfn + nr {
                let (s, owner, _) = self.peek(p);
                if s == 0 && owner != keel_abi::owner::HOST {
                    zero.push(p);
                }
            }
        }
        let r = self.host(0, func::HOST_RECLAIM, [pfn, nr, 0, 0, 0]);
        if r.regs[0] == 0 {
            for p in zero {
                self.expect_zero(p, "HOST_RECLAIM");
            }
        }
    }

    /// One operation; false when the input is used up.
    fn op(&mut self, inp: &mut Input) -> bool {
        if inp.data.is_empty() {
            return false;
        }
        match inp.byte() % 16 {
            // A host call from the ABI with decoded arguments.
            0..=8 => {
                let id = inp.pick(&IDS);
                let args = match id {
                    func::HOST_SHARE_HYP
                    | func::HOST_UNSHARE_HYP
                    | func::HOST_DONATE_HYP
                    | func::HOST_PIN
                    | func::HOST_UNPIN => [inp.pfn(), inp.nr(), 0, 0, 0],
                    func::HOST_RECLAIM => {
                        let (pfn, nr) = (inp.pfn(), inp.nr());
                        self.reclaim(pfn, nr);
                        return true;
                    }
                    func::MEM_STATE => [inp.pfn(), 0, 0, 0, 0],
                    func::HYP_STATS => [u64::from(inp.byte() % 8), 0, 0, 0, 0],
                    func::VM_CREATE => {
                        let flags = if inp.byte().is_multiple_of(8) {
                            inp.u64()
                        } else {
                            0
                        };
                        [u64::from(inp.byte() % 6), flags, 0, 0, 0]
                    }
                    func::VM_DESTROY => [inp.handle(), 0, 0, 0, 0],
                    func::VCPU_INIT => [inp.handle(), inp.vcpu(), inp.ipa(), inp.u64(), 0],
                    func::VM_DONATE | func::VM_SHARE => {
                        [inp.handle(), inp.pfn(), inp.ipa(), inp.nr(), 0]
                    }
                    func::VM_UNSHARE => [inp.handle(), inp.ipa(), inp.nr(), 0, 0],
                    func::VM_MEM_STATE => [inp.handle(), inp.ipa(), 0, 0, 0],
                    func::KEEL_VCPU_VTIMER => {
                        let enabled = inp.pick(&[0, 1, 1, 2, u64::MAX]);
                        let prio = inp.pick(&[0, 0x40, 0xa0, 0xff, 0x100]);
                        [inp.handle(), inp.vcpu(), enabled, prio, 0]
                    }
                    func::KEEL_VCPU_IRQ => {
                        let intid = match inp.byte() % 4 {
                            0..=1 => u64::from(inp.byte()) * 4,
                            2 => inp.pick(&[27, 1019, 1020, 1023, 1 << 32 | 40]),
                            _ => inp.u64(),
                        };
                        let prio = if inp.byte().is_multiple_of(8) {
                            inp.u64()
                        } else {
                            u64::from(inp.byte())
                        };
                        [inp.handle(), inp.vcpu(), intid, prio, 0]
                    }
                    func::KEEL_TABLE_PAGES => {
                        let which = if inp.byte().is_multiple_of(4) {
                            0
                        } else {
                            inp.handle()
                        };
                        [which, 0, 0, 0, 0]
                    }
                    _ => [inp.u64(), inp.u64(), 0, 0, 0],
                };
                self.host(0, id, args);
            }
            // Raw IDs and immediates.
            9 => {
                let imm = if inp.byte().is_multiple_of(2) {
                    u64::from(inp.byte())
                } else {
                    0
                };
                let id = match inp.byte() % 4 {
                    0 => 0xC600_0000 | inp.u64() & 0x1ff,
                    1 => 0x8600_0000 | inp.u64() & 0xffff,
                    _ => inp.u64(),
                };
                // VCPU_RUN is the image's (op 10), not the dispatcher's.
                if id != func::VCPU_RUN {
                    self.host(imm, id, [inp.u64(), inp.u64(), inp.u64(), inp.u64(), 0]);
                }
            }
            // VCPU_RUN: the run's traps until one exits to the host.
            10..=12 => {
                let (h, i, completion) = (inp.handle(), inp.vcpu(), inp.u64());
                self.calls += 1;
                match self.hyp.begin_run(h, i, completion) {
                    Ok(ticket) => {
                        let slot = ticket.slot;
                        // The image's entry: the list registers, on CPUs
                        // of 1 to 16 of them, and what the guest did to
                        // them (took, ended) while it ran.
                        {
                            // SAFETY: the ticket makes the vCPU ours until end_run.
                            let vcpu = unsafe { &mut *ticket.vcpu };
                            // A CPU shape per VM slot (keel uses every CPU's
                            // common one, so it does not change between runs).
                            let lrs = 1 + (slot * 5) % 16;
                            let before = vcpu.vgic.queued();
                            let e = vcpu.vgic.prepare(inp.byte().is_multiple_of(2), lrs);
                            assert!(vcpu.vgic.queued() <= before, "prepare queued more");
                            assert_eq!(e.hcr, keel_hyp::vgic::HCR_EN);
                            let in_flight = |l: &u64| keel_hyp::vgic::lr::in_flight(*l);
                            assert!(vcpu.vgic.lr[lrs..].iter().all(|l| !in_flight(l)));
                            for l in vcpu.vgic.lr[..lrs].iter_mut().filter(|l| in_flight(l)) {
                                match inp.byte() % 4 {
                                    // Acknowledged (active), or ended.
                                    0 => *l = (*l & !(3 << 62)) | (2 << 62),
                                    1 => *l &= !(3 << 62),
                                    _ => {}
                                }
                            }
                            let mut seen = [false; 1024];
                            for l in vcpu.vgic.lr[..lrs].iter().filter(|l| in_flight(l)) {
                                let id = keel_hyp::vgic::lr::intid(*l) as usize;
                                assert!(!seen[id % 1024], "INTID {id} in two list registers");
                                seen[id % 1024] = true;
                            }
                        }
                        for _ in 0..1 + inp.byte() % 8 {
                            // SAFETY: the ticket makes the vCPU ours until end_run.
                            let vcpu = unsafe { &mut *ticket.vcpu };
                            guest_regs(inp, vcpu);
                            let t = trap(inp);
                            if let Action::Exit(_) = self.guest(slot, vcpu, &t) {
                                break;
                            }
                        }
                        self.hyp.end_run(&ticket);
                    }
                    Err(r) => check_status(0, func::VCPU_RUN, &r),
                }
                self.check("VCPU_RUN");
            }
            // A guest trap outside a run (the registers are scratch).
            13..=14 => {
                let slot = (inp.byte() as u64 % MAX_VMS) as usize;
                let mut vcpu = Vcpu::new();
                guest_regs(inp, &mut vcpu);
                let t = trap(inp);
                self.guest(slot, &mut vcpu, &t);
            }
            // The host writes a page it can reach (so zeroing shows).
            _ => {
                let pfn = inp.pfn();
                let b = inp.byte() | 1;
                if (RAM_BASE / PAGE..RAM_END / PAGE).contains(&pfn) {
                    let (s, _, view) = self.peek(pfn);
                    if s == 0 && view != keel_abi::PageState::NoPage as u64 {
                        self.page(pfn * PAGE).fill(b);
                    }
                }
            }
        }
        true
    }
}

/// Runs one input on a fresh machine; returns the calls made. Panics on
/// any failed check. `verbose` prints every call.
pub fn run(data: &[u8], verbose: bool) -> usize {
    let mut m = Machine::new(verbose);
    let mut inp = Input { data };
    for _ in 0..MAX_OPS {
        if !m.op(&mut inp) {
            break;
        }
    }
    m.calls
}
