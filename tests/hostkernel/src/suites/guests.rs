//! `guests`: protected VMs as ABI.md describes them, driven from the host.
//!
//! The guest is `src/guest.S`, a position-independent command agent copied
//! into the first donated page and started at its IPA (EL1h, MMU off). It
//! reads each command (op, a1, a2, a3) from a mailbox at IPA [`MBOX`] (four
//! MMIO reads, which [`Guest`] completes) and reports its result with the
//! vendor call [`REPORT`], which keel does not handle: a HYPERCALL exit.
//! So a test here is host code that says what the guest does next: touch
//! its memory, make a guest call, an MMIO access, an SMC.
//!
//! Every hypercall of this suite, VCPU_RUN included, goes through [`hc`],
//! which runs KEEL_CHECK_INVARIANTS after it. Each test leaves no VM and no
//! guest page behind, so the next starts from the same pool and tables.
//!
//! Memory: the 1 GiB guest gets [`PA_1G`] (0x8000_0000..0xC000_0000, host
//! RAM aligned to 1 GiB); the others 8 MiB slots from [`PA_SMALL`] up,
//! below the host-abi and bench suites' test blocks at 0x7000_0000.

use keel_abi::{exit, func, owner, stat, status, Regs, VM_HANDLE_BASE};

use crate::dt::BootInfo;
use crate::exception::{self, ec};
use crate::harness::{Failure, Suite, Test, TestResult};
use crate::suites::isolation::check_abort;
use crate::{ensure, ensure_eq, fail, println};

core::arch::global_asm!(include_str!("../guest.S"));

extern "C" {
    static keel_guest_start: u8;
    static keel_guest_end: u8;
}

pub static SUITE: Suite = Suite {
    name: "guests",
    tests: &[
        Test {
            name: "exits_and_completions",
            run: exits_and_completions,
        },
        Test {
            name: "discovery_and_psci",
            run: discovery_and_psci,
        },
        Test {
            name: "guest_system_registers",
            run: guest_system_registers,
        },
        Test {
            name: "one_gib_guest",
            run: one_gib_guest,
        },
        Test {
            name: "two_mib_blocks",
            run: two_mib_blocks,
        },
        Test {
            name: "unaligned_4k",
            run: unaligned_4k,
        },
        Test {
            name: "pins",
            run: pins,
        },
        Test {
            name: "bad_guest_calls",
            run: bad_guest_calls,
        },
        Test {
            name: "relinquish",
            run: relinquish,
        },
        Test {
            name: "vm_share",
            run: vm_share,
        },
        Test {
            name: "teardown_reclaim",
            run: teardown_reclaim,
        },
        Test {
            name: "two_vms_isolated",
            run: two_vms_isolated,
        },
        Test {
            name: "bad_handles_and_vcpus",
            run: bad_handles_and_vcpus,
        },
        Test {
            name: "fault_stays_failed",
            run: fault_stays_failed,
        },
        Test {
            name: "guest_starts_its_vcpus",
            run: guest_starts_its_vcpus,
        },
        Test {
            name: "keys_are_switched",
            run: keys_are_switched,
        },
        Test {
            name: "host_pmu_stops_in_guests",
            run: host_pmu_stops_in_guests,
        },
        Test {
            name: "gic_interface_state_is_per_vcpu",
            run: gic_interface_state_is_per_vcpu,
        },
        Test {
            name: "virtual_interrupts",
            run: virtual_interrupts,
        },
        Test {
            name: "virtual_timer",
            run: virtual_timer,
        },
        Test {
            name: "back_to_boot_state",
            run: back_to_boot_state,
        },
    ],
};

pub const PAGE: u64 = 4096;
pub const MB2: u64 = 2 << 20;
pub const GB1: u64 = 1 << 30;
/// Host RAM for the 1 GiB guest: 1 GiB aligned, the top of the 2 GiB.
pub const PA_1G: u64 = 0x8000_0000;
/// 8 MiB slots for the smaller guests, one per test.
pub const PA_SMALL: u64 = 0x6000_0000;
const SLOT: u64 = 8 << 20;
/// Where guests have their memory (1 GiB aligned, and not the PA, so a
/// mix-up of IPA and PA shows).
pub const IPA: u64 = 0x4000_0000;
/// The guest's mailbox, console and test device: IPAs without memory.
const MBOX: u64 = 0x0a00_0000;
const CONSOLE: u64 = 0x0900_0000;
const DEV: u64 = 0x0b00_0000;
/// The vendor call the guest reports with (not in the ABI).
pub const REPORT: u64 = 0xC600_0FF0;
const HELLO: u64 = 0x4845;
const IPA_LIMIT: u64 = 1 << 39;
/// The guest's code fits in this many bytes at the start of its memory.
const CODE: u64 = 3072;

/// The guest's commands (guest.S).
#[derive(Clone, Copy)]
#[repr(u64)]
pub enum Op {
    Hvc = 1,
    Smc = 2,
    Write = 3,
    Read = 4,
    Fill = 5,
    Check = 6,
    ShareLoop = 7,
    MmioRead = 8,
    MmioWrite = 9,
    Console = 10,
    Fault = 11,
    Regs = 12,
    Sysregs = 13,
    Undef = 14,
    Keys = 15,
    Pmr = 16,
    Irqs = 17,
    Sgi = 18,
}

// ---- hypercalls ----

/// Every host call of this suite: issues it, then runs keel's invariant
/// checker and fails the test if it reports a violation.
pub fn hc(id: u64, args: [u64; 4]) -> Result<Regs, Failure> {
    let r = crate::hvc(id, [args[0], args[1], args[2], args[3], 0]);
    let c = crate::hvc(func::KEEL_CHECK_INVARIANTS, [0; 5]);
    if c.status() != status::SUCCESS {
        fail!(
            "KEEL_CHECK_INVARIANTS after call {:#x}({:#x?}) (status {}): status {}, at {:#x}",
            id,
            args,
            r.status(),
            c.status(),
            c.0[1]
        );
    }
    Ok(r)
}

/// A host call that must succeed; its registers.
pub fn ok(id: u64, args: [u64; 4], what: &str) -> Result<Regs, Failure> {
    let r = hc(id, args)?;
    ensure!(
        r.status() == status::SUCCESS,
        "{} ({:#x}({:#x?})): status {}",
        what,
        id,
        args,
        r.status()
    );
    Ok(r)
}

/// A host call that must return `want`.
fn expect(id: u64, args: [u64; 4], want: i64, what: &str) -> TestResult {
    let got = hc(id, args)?.status();
    ensure!(
        got == want,
        "{} ({:#x}({:#x?})): status {}, expected {}",
        what,
        id,
        args,
        got,
        want
    );
    Ok(())
}

pub fn stat_of(i: u64) -> Result<u64, Failure> {
    Ok(ok(func::HYP_STATS, [i, 0, 0, 0], "HYP_STATS")?.0[1])
}

/// KEEL_TABLE_PAGES (a keel extension): the table pages, root included, of
/// the host's stage 2 (`which` = 0) or of VM `which`'s.
pub fn table_pages(which: u64) -> Result<u64, Failure> {
    Ok(ok(func::KEEL_TABLE_PAGES, [which, 0, 0, 0], "KEEL_TABLE_PAGES")?.0[1])
}

/// HYP_STATS 0..=3: table pages, free pool pages, splits, merges.
pub fn counters() -> Result<[u64; 4], Failure> {
    Ok([
        stat_of(stat::TABLE_PAGES)?,
        stat_of(stat::FREE_POOL_PAGES)?,
        stat_of(stat::BLOCK_SPLITS)?,
        stat_of(stat::BLOCK_MERGES)?,
    ])
}

/// MEM_STATE: (owner, host state, host mapping size).
pub fn host_view(pa: u64) -> Result<(u64, u64, u64), Failure> {
    let r = ok(func::MEM_STATE, [pa / PAGE, 0, 0, 0], "MEM_STATE")?.0;
    Ok((r[1], r[2], r[3]))
}

/// VM_MEM_STATE: (pfn, guest state, guest mapping size).
pub fn guest_view(handle: u64, ipa: u64) -> Result<(u64, u64, u64), Failure> {
    let r = ok(func::VM_MEM_STATE, [handle, ipa, 0, 0], "VM_MEM_STATE")?.0;
    Ok((r[1], r[2], r[3]))
}

fn expect_guest_view(g: &Guest, ipa: u64, state: u64, size: u64, when: &str) -> TestResult {
    let got = guest_view(g.handle, ipa)?;
    let want = (g.pa_of(ipa) / PAGE, state, size);
    ensure!(
        got == want,
        "{}: VM_MEM_STATE({:#x}) = (pfn {:#x}, state {}, size {:#x}), expected (pfn {:#x}, state {}, size {:#x})",
        when,
        ipa,
        got.0,
        got.1,
        got.2,
        want.0,
        want.1,
        want.2
    );
    Ok(())
}

fn expect_host_view(pa: u64, want: (u64, u64, u64), when: &str) -> TestResult {
    let got = host_view(pa)?;
    ensure!(
        got == want,
        "{}: MEM_STATE({:#x}) = (owner {:#x}, state {}, size {:#x}), expected (owner {:#x}, state {}, size {:#x})",
        when,
        pa,
        got.0,
        got.1,
        got.2,
        want.0,
        want.1,
        want.2
    );
    Ok(())
}

/// A host read of `pa` must abort (a guest's private page).
fn host_read_aborts(pa: u64, what: &str) -> TestResult {
    match exception::read(pa) {
        Ok(v) => fail!("{}: host read of {:#x} succeeded ({:#x})", what, pa, v),
        Err(a) => check_abort(&a, ec::DATA_ABORT_SAME, pa, what),
    }
}

fn host_read(pa: u64, what: &str) -> Result<u64, Failure> {
    match exception::read(pa) {
        Ok(v) => Ok(v),
        Err(a) => fail!("{}: host read of {:#x} aborted: {}", what, pa, a),
    }
}

/// The guest's FILL pattern.
fn pattern(ipa: u64, key: u64) -> u64 {
    ipa ^ key
}

/// Cleans [start, start + len) to the point of coherency: the guest runs
/// with its MMU (and caches) off and must see what the host wrote.
fn clean_dcache(start: u64, len: u64) {
    for a in (start & !63..start + len).step_by(64) {
        // SAFETY: cache maintenance by VA of memory our stage 1 maps; it
        // changes no data.
        unsafe { core::arch::asm!("dc civac, {}", in(reg) a, options(nostack)) };
    }
    // SAFETY: barriers and I-cache invalidation have no memory effects.
    unsafe { core::arch::asm!("dsb sy", "ic iallu", "dsb sy", "isb", options(nostack)) };
}

/// `Ok` if `cond`, else a failure with `args`.
fn check(cond: bool, args: core::fmt::Arguments) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(Failure::new(args))
    }
}

/// The virtual counter (the clock guests can read too).
#[inline(always)]
pub fn ticks() -> u64 {
    let v: u64;
    // SAFETY: reading the counter has no side effects.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", "isb", out(reg) v, options(nostack)) };
    v
}

// ---- the guest ----

/// What a run of the guest ended with, when it was not a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Report(u64, u64),
    Exit(u64, [u64; 3]),
}

/// One VM running guest.S over `pages` pages from `pa`, donated at `ipa`,
/// with one vCPU (or more: `create_smp`).
pub struct Guest {
    pub handle: u64,
    pub ipa: u64,
    pub pa: u64,
    pub pages: u64,
    /// The vCPU that `run` (and so every command) runs: 0 unless a test
    /// switches it.
    pub vcpu: u64,
    completion: u64,
    cmd: [u64; 4],
    pub console: [u8; 64],
    pub console_len: usize,
    pub destroyed: bool,
    /// Torn down: nothing for `Drop` to clean up.
    done: bool,
}

/// A test that fails half-way must not leave its VM and pages behind for
/// the next tests: destroy the VM and reclaim what can be reclaimed.
impl Drop for Guest {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let call = crate::hvc;
        if !self.destroyed {
            call(func::VM_DESTROY, [self.handle, 0, 0, 0, 0]);
        }
        let (p, n) = (self.pa / PAGE, self.pages);
        if call(func::HOST_RECLAIM, [p, n, 0, 0, 0]).status() == 0 {
            return;
        }
        // Some pages are the host's already (relinquished): by 2 MiB, then
        // by page where that fails.
        let chunk = MB2 / PAGE;
        for c in (p..p + n).step_by(chunk as usize) {
            let m = chunk.min(p + n - c);
            if call(func::HOST_RECLAIM, [c, m, 0, 0, 0]).status() != 0 {
                for q in c..c + m {
                    call(func::HOST_RECLAIM, [q, 1, 0, 0, 0]);
                }
            }
        }
    }
}

impl Guest {
    /// Copies the payload to `pa`, creates a VM, donates [pa, pa + pages)
    /// at `ipa` with one VM_DONATE, starts the vCPU with x0 = `arg` and
    /// runs it to its hello.
    pub fn new(pa: u64, ipa: u64, pages: u64, arg: u64) -> Result<Guest, Failure> {
        let g = Self::create(pa, ipa, pages)?;
        g.start(arg)
    }

    /// As `new`, without running the guest.
    pub fn create(pa: u64, ipa: u64, pages: u64) -> Result<Guest, Failure> {
        Self::create_smp(pa, ipa, pages, 1)
    }

    /// As `create`, with `vcpus` vCPUs.
    pub fn create_smp(pa: u64, ipa: u64, pages: u64, vcpus: u64) -> Result<Guest, Failure> {
        let (o, s, _) = host_view(pa)?;
        ensure!(
            o == owner::HOST && s == 0,
            "guest memory {:#x} is not host OWNED",
            pa
        );
        let (o, s, _) = host_view(pa + (pages - 1) * PAGE)?;
        ensure!(
            o == owner::HOST && s == 0,
            "guest memory's last page is not host OWNED"
        );
        ensure!(
            payload().len() as u64 <= CODE,
            "the guest is {} bytes",
            payload().len()
        );
        copy_payload(pa);
        let handle = ok(func::VM_CREATE, [vcpus, 0, 0, 0], "VM_CREATE")?.0[1];
        let g = Guest {
            handle,
            ipa,
            pa,
            pages,
            vcpu: 0,
            completion: 0,
            cmd: [0; 4],
            console: [0; 64],
            console_len: 0,
            destroyed: false,
            done: false,
        };
        ok(
            func::VM_DONATE,
            [handle, pa / PAGE, ipa, pages],
            "VM_DONATE",
        )?;
        Ok(g)
    }

    pub fn start(mut self, arg: u64) -> Result<Guest, Failure> {
        ok(
            func::VCPU_INIT,
            [self.handle, 0, self.ipa, arg],
            "VCPU_INIT",
        )?;
        match self.serve()? {
            Event::Report(a, HELLO) if a == arg => Ok(self),
            e => fail!("guest start: expected its hello ({:#x}), got {:x?}", arg, e),
        }
    }

    pub fn pa_of(&self, ipa: u64) -> u64 {
        self.pa + (ipa - self.ipa)
    }

    pub fn end(&self) -> u64 {
        self.ipa + self.pages * PAGE
    }

    /// One VCPU_RUN with the pending completion.
    pub fn run(&mut self) -> Result<(u64, [u64; 3]), Failure> {
        let c = core::mem::take(&mut self.completion);
        let r = ok(func::VCPU_RUN, [self.handle, self.vcpu, c, 0], "VCPU_RUN")?.0;
        Ok((r[1], [r[2], r[3], r[4]]))
    }

    /// Runs the guest until it reports or makes an exit the mailbox and
    /// console do not explain (IRQ exits just run it again).
    pub fn serve(&mut self) -> Result<Event, Failure> {
        loop {
            let (reason, d) = self.run()?;
            match reason {
                exit::MMIO
                    if d[0] >= MBOX
                        && d[0] < MBOX + 32
                        && d[1] == (8 << 8) | (d[1] & (31 << 16)) =>
                {
                    self.completion = self.cmd[((d[0] - MBOX) / 8) as usize];
                }
                exit::MMIO if d[0] == CONSOLE && d[1] & 0xff01 == 0x101 => {
                    if self.console_len < self.console.len() {
                        self.console[self.console_len] = d[2] as u8;
                        self.console_len += 1;
                    }
                }
                exit::HYPERCALL if d[0] == REPORT => return Ok(Event::Report(d[1], d[2])),
                exit::IRQ => {}
                _ => return Ok(Event::Exit(reason, d)),
            }
        }
    }

    /// Posts a command and runs until the next event.
    pub fn post(&mut self, op: Op, a1: u64, a2: u64, a3: u64) -> Result<Event, Failure> {
        self.cmd = [op as u64, a1, a2, a3];
        self.serve()
    }

    /// Runs a command that must end with a report.
    pub fn op(&mut self, op: Op, a1: u64, a2: u64, a3: u64) -> Result<(u64, u64), Failure> {
        match self.post(op, a1, a2, a3)? {
            Event::Report(a, b) => Ok((a, b)),
            e => fail!(
                "guest op {}({:#x}, {:#x}, {:#x}): {:x?}",
                op as u64,
                a1,
                a2,
                a3,
                e
            ),
        }
    }

    /// Completes the exit the guest stopped at with `value` and runs on.
    pub fn complete(&mut self, value: u64) -> Result<Event, Failure> {
        self.completion = value;
        self.serve()
    }

    /// A guest call (HVC #0); its x0 as a status and x1.
    pub fn call(&mut self, id: u64, a1: u64, a2: u64) -> Result<(i64, u64), Failure> {
        let (x0, x1) = self.op(Op::Hvc, id, a1, a2)?;
        Ok((x0 as i64, x1))
    }

    /// A guest memory call that must return `want`.
    pub fn expect_call(&mut self, id: u64, ipa: u64, nr: u64, want: i64, what: &str) -> TestResult {
        let (got, _) = self.call(id, ipa, nr)?;
        ensure!(
            got == want,
            "{}: guest call {:#x}({:#x}, {:#x}): status {}, expected {}",
            what,
            id,
            ipa,
            nr,
            got,
            want
        );
        Ok(())
    }

    pub fn share(&mut self, ipa: u64, nr: u64) -> TestResult {
        self.expect_call(func::MEM_SHARE, ipa, nr, 0, "MEM_SHARE")
    }

    pub fn unshare(&mut self, ipa: u64, nr: u64) -> TestResult {
        self.expect_call(func::MEM_UNSHARE, ipa, nr, 0, "MEM_UNSHARE")
    }

    pub fn fill(&mut self, ipa: u64, len: u64, key: u64) -> TestResult {
        ensure_eq!(self.op(Op::Fill, ipa, len, key)?, (0, 0), "guest fill");
        Ok(())
    }

    pub fn check(&mut self, ipa: u64, len: u64, key: u64) -> TestResult {
        let r = self.op(Op::Check, ipa, len, key)?;
        ensure!(
            r == (0, 0),
            "guest check of [{:#x}, +{:#x}): differs at {:#x}",
            ipa,
            len,
            r.1
        );
        Ok(())
    }

    pub fn destroy(&mut self) -> TestResult {
        ok(func::VM_DESTROY, [self.handle, 0, 0, 0], "VM_DESTROY")?;
        self.destroyed = true;
        Ok(())
    }

    /// VM_DESTROY (unless done), then HOST_RECLAIM of all its pages.
    pub fn teardown(mut self) -> TestResult {
        if !self.destroyed {
            self.destroy()?;
        }
        ok(
            func::HOST_RECLAIM,
            [self.pa / PAGE, self.pages, 0, 0],
            "HOST_RECLAIM of the guest's memory",
        )?;
        self.done = true;
        Ok(())
    }
}

fn payload() -> &'static [u8] {
    // SAFETY: the two symbols bound the payload's bytes in .rodata.
    unsafe {
        let start = core::ptr::addr_of!(keel_guest_start);
        let end = core::ptr::addr_of!(keel_guest_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

fn copy_payload(pa: u64) {
    let p = payload();
    for (i, b) in p.iter().enumerate() {
        // SAFETY: `pa` is host RAM the caller checked the host owns and that
        // nothing of this kernel uses (the suite's own regions).
        unsafe { core::ptr::write_volatile((pa + i as u64) as *mut u8, *b) };
    }
    clean_dcache(pa, p.len() as u64);
}

/// Failures a test notes and carries on after, so that one wrong status
/// does not hide the checks after it; the first is the test's result.
#[derive(Default)]
struct Soft {
    first: Option<Failure>,
    count: usize,
}

impl Soft {
    fn note(&mut self, r: TestResult) {
        if let Err(f) = r {
            println!("  (noted) {}", f.as_str());
            self.count += 1;
            self.first.get_or_insert(f);
        }
    }

    fn finish(self) -> TestResult {
        match self.first {
            None => Ok(()),
            Some(f) if self.count == 1 => Err(f),
            Some(f) => fail!(
                "{} (and {} more, printed above)",
                f.as_str(),
                self.count - 1
            ),
        }
    }
}

fn slot(k: u64) -> u64 {
    PA_SMALL + k * SLOT
}

/// The numbers a test must find unchanged at its end: table and free pool
/// pages.
fn pool_now() -> Result<[u64; 2], Failure> {
    let c = counters()?;
    Ok([c[0], c[1]])
}

// ---- the tests ----

fn exits_and_completions(_: &BootInfo) -> TestResult {
    let before = pool_now()?;
    let mut g = Guest::new(slot(0), IPA, 512, 0x1234_5678_9abc_def0)?;
    // The console: 1-byte stores to an IPA without memory.
    let (n, _) = g.op(Op::Console, 0, 0, 0)?;
    let text = &g.console[..g.console_len];
    ensure!(
        text == b"keel guest: hello from EL1\n" && n == text.len() as u64,
        "console: {} bytes reported, got {:?}",
        n,
        core::str::from_utf8(text)
    );
    // MMIO reads: the exit describes the access, the completion lands in
    // the register (x5), sized and extended as the instruction says.
    let v = 0x8877_6655_4433_8001;
    for (variant, size, want) in [
        (0u64, 8u64, v),
        (1, 4, v & 0xffff_ffff),
        (2, 1, v & 0xff),
        (3, 2, 0xffff_ffff_ffff_8001),
    ] {
        match g.post(Op::MmioRead, DEV + 0x10, variant, 0x5555)? {
            Event::Exit(exit::MMIO, [ipa, access, _]) => {
                ensure_eq!(ipa, DEV + 0x10, "MMIO read exit: IPA");
                ensure_eq!(
                    access,
                    (size << 8) | (5 << 16),
                    "MMIO read exit: access (read, size, x5)"
                );
            }
            e => fail!("MMIO read variant {}: {:x?}", variant, e),
        }
        match g.complete(v)? {
            Event::Report(x5, 0) => ensure!(
                x5 == want,
                "MMIO read variant {}: x5 = {:#x}, expected {:#x}",
                variant,
                x5,
                want
            ),
            e => fail!("after the MMIO read: {:x?}", e),
        }
    }
    // MMIO writes: value and access in the exit; the store is skipped.
    let w = 0x0102_0304_0506_0708;
    for (variant, size, want) in [(0u64, 8u64, w), (1, 4, w & 0xffff_ffff), (2, 1, w & 0xff)] {
        match g.post(Op::MmioWrite, DEV + 8, w, variant)? {
            Event::Exit(exit::MMIO, d) => ensure_eq!(
                d,
                [DEV + 8, 1 | (size << 8) | (7 << 16), want],
                "MMIO write exit (IPA, access, value)"
            ),
            e => fail!("MMIO write variant {}: {:x?}", variant, e),
        }
        ensure_eq!(g.complete(0xdead)?, Event::Report(0, 0), "after the write");
    }
    // A call keel does not handle: HYPERCALL exit; the completion value
    // becomes the guest's x0.
    let id = 0xC600_0F00;
    match g.post(Op::Hvc, id, 0x1111, 0x2222)? {
        Event::Exit(exit::HYPERCALL, d) => {
            ensure_eq!(d, [id, 0x1111, 0x2222], "HYPERCALL exit (id, x1, x2)")
        }
        e => fail!("unknown guest call: {:x?}", e),
    }
    match g.complete(0xfeed_f00d_cafe)? {
        Event::Report(x0, x1) => {
            ensure_eq!(x0, 0xfeed_f00d_cafe, "guest x0 after the HYPERCALL exit");
            ensure_eq!(x1, 0x1111, "guest x1 after the HYPERCALL exit");
        }
        e => fail!("after the HYPERCALL exit: {:x?}", e),
    }
    // Registers survive a call keel answers in place, and a HYPERCALL exit.
    ensure_eq!(
        g.op(Op::Regs, func::HYP_MEMINFO, 0, 0)?,
        (0, 4096),
        "x4..x17 across HYP_MEMINFO (0 = all kept, then x0)"
    );
    match g.post(Op::Regs, 0xC600_0F01, 0, 0)? {
        Event::Exit(exit::HYPERCALL, _) => {}
        e => fail!("REGS with an unknown call: {:x?}", e),
    }
    ensure_eq!(
        g.complete(77)?,
        Event::Report(0, 77),
        "x4..x17 across a HYPERCALL exit"
    );
    // PSCI SYSTEM_OFF: exit 1 with x2 = 0, and the VM stays off.
    match g.post(Op::Smc, 0x8400_0008, 0, 0)? {
        Event::Exit(exit::SYSTEM_OFF, [0, ..]) => {}
        e => fail!("PSCI SYSTEM_OFF: {:x?}", e),
    }
    let (reason, d) = g.run()?;
    ensure_eq!(
        (reason, d[0]),
        (exit::SYSTEM_OFF, 0),
        "VCPU_RUN after SYSTEM_OFF"
    );
    g.teardown()?;
    // SYSTEM_RESET: x2 = 1.
    let mut g = Guest::new(slot(0), IPA, 16, 1)?;
    match g.post(Op::Smc, 0x8400_0009, 0, 0)? {
        Event::Exit(exit::SYSTEM_OFF, [1, ..]) => {}
        e => fail!("PSCI SYSTEM_RESET: {:x?}", e),
    }
    g.teardown()?;
    ensure_eq!(pool_now()?, before, "table and free pool pages at the end");
    Ok(())
}

fn discovery_and_psci(_: &BootInfo) -> TestResult {
    let mut g = Guest::new(slot(1), IPA, 16, 2)?;
    // What Linux asks first: PSCI_FEATURES(SMCCC_VERSION), then
    // SMCCC_VERSION (1.1 or it never looks for the KVM services).
    ensure_eq!(
        g.call(0x8400_000A, 0x8000_0000, 0)?.0,
        0,
        "PSCI_FEATURES(SMCCC_VERSION) over HVC"
    );
    ensure_eq!(
        g.call(0x8000_0000, 0, 0)?.0,
        0x1_0001,
        "SMCCC_VERSION over HVC"
    );
    ensure_eq!(
        g.call(0x8000_0001, 0x8000_8000, 0)?.0,
        -1,
        "SMCCC_ARCH_FEATURES(ARCH_WORKAROUND_1)"
    );
    // The standard secure services stay in keel: TRNG_VERSION is refused
    // in place (no exit: the host cannot pose as the guest's TRNG).
    ensure_eq!(g.call(0x8400_0050, 0, 0)?.0, -1, "TRNG_VERSION");
    // FEATURES: x0..x3 are one bitmap; the contract's functions are 0..31.
    let (f, f1) = g.call(func::FEATURES, 5, 5)?;
    ensure_eq!(
        (f as u64 & keel_abi::FEATURES_BITMAP, f1),
        (keel_abi::FEATURES_BITMAP, 0),
        "FEATURES from the guest (contract bits; x1)"
    );
    let (u0, u1) = g.call(func::CALL_UID, 0, 0)?;
    ensure_eq!(
        [u0 as u64, u1],
        [keel_abi::KVM_UID[0], keel_abi::KVM_UID[1]],
        "CALL_UID x0, x1"
    );
    ensure_eq!(g.call(func::REVISION, 0, 0)?, (1, 0), "REVISION");
    ensure_eq!(
        g.call(func::HYP_FEATURES, 0, 0)?,
        (0, keel_abi::BLOCK_SIZES),
        "HYP_FEATURES x0, x1"
    );
    ensure_eq!(g.call(func::HYP_MEMINFO, 0, 0)?.0, 4096, "HYP_MEMINFO");
    ensure_eq!(
        g.call(func::HYP_MEMINFO, 1, 0)?.0,
        status::INVALID_PARAMETER,
        "HYP_MEMINFO with x1 = 1"
    );
    // Host calls and the keel extensions are not for guests.
    for id in func::HOST_CALLS
        .iter()
        .copied()
        .filter(|&id| (func::HOST_SHARE_HYP..=func::HOST_UNPIN).contains(&id))
        .chain(func::KEEL_CALLS)
    {
        let (s, _) = g.call(id, g.pa / PAGE, 1)?;
        ensure!(
            s == status::NOT_SUPPORTED,
            "host call {:#x} from the guest: status {}",
            id,
            s
        );
    }
    expect_host_view(g.pa, (g.handle, 3, 0), "guest memory after the host calls")?;
    // PSCI over SMC.
    let (v, _) = g.op(Op::Smc, 0x8400_0000, 0, 0)?;
    ensure!(v >> 16 >= 1 && v >> 32 == 0, "PSCI VERSION {:#x}", v);
    for (fid, want) in [
        (0x8400_0008u64, 0i64),
        (0x8400_0009, 0),
        (0x8400_0000, 0),
        (0xC400_0003, 0),
        (0xC400_0001, -1),
    ] {
        let (s, _) = g.op(Op::Smc, 0x8400_000A, fid, 0)?;
        ensure!(
            s as i64 == want,
            "PSCI FEATURES({:#x}) = {}, expected {}",
            fid,
            s as i64,
            want
        );
    }
    ensure_eq!(
        g.op(Op::Smc, 0xC400_0003, 0, 0)?.0 as i64,
        -4,
        "PSCI CPU_ON of the calling vCPU: ALREADY_ON"
    );
    // The guest has run: the host can no longer point its vCPU at code of
    // its choosing. The guest carries on where it was.
    expect(
        func::VCPU_INIT,
        [g.handle, 0, g.ipa, 0x5eed],
        status::DENIED,
        "VCPU_INIT once the VM has run",
    )?;
    ensure_eq!(
        g.call(func::HYP_MEMINFO, 0, 0)?.0,
        4096,
        "the guest after the refused VCPU_INITs"
    );
    g.teardown()
}

/// A 4-bit ID register field.
fn id_field(v: u64, lsb: u32) -> u64 {
    (v >> lsb) & 0xf
}

/// What a guest reads of the ID registers: the features keel does not
/// switch for guests (SVE, SME, the PMU, EL2, AArch32) are gone, what runs
/// without keel is as the host sees it; debug and PMU registers read as
/// zero and ignore writes; what keel traps and does not emulate is an
/// undefined instruction for the guest; and the vCPU runs on.
fn guest_system_registers(_: &BootInfo) -> TestResult {
    let mut g = Guest::new(slot(1), IPA, 16, 2)?;
    let host_pfr0 = crate::kernel::id_aa64pfr0();
    let host_dfr0 = crate::kernel::id_aa64dfr0();
    let (pfr0, pfr1) = g.op(Op::Sysregs, 0, 0, 0)?;
    // The CPU must have what the guest should not see, or this proves
    // nothing (QEMU's -cpu max has SVE and a PMU).
    ensure!(
        id_field(host_pfr0, 32) != 0 && id_field(host_dfr0, 8) != 0,
        "the host CPU lacks SVE or a PMU, so hiding them proves nothing (PFR0 {:#x}, DFR0 {:#x})",
        host_pfr0,
        host_dfr0
    );
    ensure_eq!(id_field(pfr0, 32), 0, "guest ID_AA64PFR0_EL1.SVE");
    ensure_eq!(id_field(pfr0, 8), 0, "guest ID_AA64PFR0_EL1.EL2");
    ensure_eq!(id_field(pfr0, 28), 0, "guest ID_AA64PFR0_EL1.RAS");
    ensure_eq!(
        (id_field(pfr0, 0), id_field(pfr0, 4)),
        (1, 1),
        "guest ID_AA64PFR0_EL1.EL0, EL1 (AArch64 only)"
    );
    ensure_eq!(
        (id_field(pfr0, 16), id_field(pfr0, 20)),
        (id_field(host_pfr0, 16), id_field(host_pfr0, 20)),
        "guest ID_AA64PFR0_EL1.FP, AdvSIMD"
    );
    ensure_eq!(id_field(pfr1, 24), 0, "guest ID_AA64PFR1_EL1.SME");
    ensure_eq!(id_field(pfr1, 8), 0, "guest ID_AA64PFR1_EL1.MTE");
    let (dfr0, zfr0) = g.op(Op::Sysregs, 1, 0, 0)?;
    ensure_eq!(
        dfr0,
        id_field(host_dfr0, 0).max(6),
        "guest ID_AA64DFR0_EL1 (DebugVer alone)"
    );
    ensure_eq!(zfr0, 0, "guest ID_AA64ZFR0_EL1");
    // ISAR0 less TME; MMFR0 with PARange the guest's 40 bits (2).
    let (isar0, mmfr0) = g.op(Op::Sysregs, 2, 0, 0)?;
    let host_mmfr0 = crate::kernel::id_aa64mmfr0();
    ensure_eq!(
        [isar0, mmfr0],
        [
            crate::kernel::id_aa64isar0() & !(0xf << 24),
            (host_mmfr0 & !0xf) | (host_mmfr0 & 0xf).min(2)
        ],
        "guest ID_AA64ISAR0_EL1, ID_AA64MMFR0_EL1"
    );
    ensure!(id_field(pfr0, 56) <= 1, "guest CSV2 {}", id_field(pfr0, 56));
    ensure_eq!(
        g.op(Op::Sysregs, 3, 0, 0)?,
        (0, 0),
        "guest ID_PFR0_EL1 (AArch32), ID_AA64SMFR0_EL1"
    );
    ensure_eq!(
        g.op(Op::Sysregs, 4, 0x8001, 0)?,
        (0, 0),
        "guest MDSCR_EL1, PMCR_EL0 after writing them"
    );
    // What keel traps and does not emulate is the guest's own undefined
    // instruction (EC 0, IL), and it runs on; before, the vCPU failed.
    const UNDEF_ESR: u64 = 1 << 25;
    ensure_eq!(
        g.op(Op::Undef, 0, 0, 0)?.0,
        UNDEF_ESR,
        "ESR_EL1 after MRS ACTLR_EL1 (TACR)"
    );
    ensure_eq!(
        g.op(Op::Undef, 1, 0, 0)?.0,
        UNDEF_ESR,
        "ESR_EL1 after SVE's RDVL (hidden from the guest)"
    );
    // Still running: a call answers.
    ensure_eq!(g.call(func::REVISION, 0, 0)?, (1, 0), "REVISION afterwards");
    g.teardown()
}

/// The conversion scenario on a guest whose memory is one block of `block`
/// bytes at the start: share one page at `ipa` (after filling it and its
/// neighbours), check both views, the host's reads, the mapping sizes, the
/// counters; unshare; check everything is back.
fn convert_one(g: &mut Guest, ipa: u64, block: u64, key: u64) -> TestResult {
    // The guest fills the page and its neighbours (not its own code).
    let lo = if ipa == g.ipa {
        ipa + CODE
    } else {
        (ipa - PAGE).max(g.ipa + PAGE)
    };
    let hi = (ipa + 2 * PAGE).min(g.end());
    g.fill(lo, hi - lo, key)?;
    let before = counters()?;
    let s2_before = [table_pages(g.handle)?, table_pages(0)?];
    expect_guest_view(g, ipa, 0, block, "before the share")?;
    g.share(ipa, 0)?;
    let shared = counters()?;
    let s2_shared = [table_pages(g.handle)?, table_pages(0)?];
    expect_guest_view(g, ipa, 1, PAGE, "the shared page")?;
    let pa = g.pa_of(ipa);
    expect_host_view(pa, (g.handle, 2, PAGE), "the shared page")?;
    // The guest's pattern, read by the host (the code page: past the code).
    let from = if ipa == g.ipa { CODE } else { 0 };
    for off in (from..PAGE).step_by(8) {
        let v = host_read(pa + off, "the shared page")?;
        ensure!(
            v == pattern(ipa + off, key),
            "host read of the shared page at {:#x}: {:#x}, expected {:#x}",
            pa + off,
            v,
            pattern(ipa + off, key)
        );
    }
    // Host writes reach the guest.
    // SAFETY: the page is shared with the host (MEM_STATE above); the
    // original value is written back below.
    unsafe { exception::write(pa + PAGE - 8, 0x5a5a_5a5a) };
    clean_dcache(pa + PAGE - 8, 8);
    ensure_eq!(
        g.op(Op::Read, ipa + PAGE - 8, 0, 0)?,
        (0x5a5a_5a5a, 0),
        "guest read of the host's write"
    );
    // SAFETY: as above.
    unsafe { exception::write(pa + PAGE - 8, pattern(ipa + PAGE - 8, key)) };
    clean_dcache(pa + PAGE - 8, 8);
    // Neighbours: still private (the host aborts), mapped 4K in the
    // split block, and the blocks around at the full size.
    // In the same 2 MiB range (or block) as the shared page: 4K; past it,
    // the range's own size.
    let near = block.min(MB2);
    let size_of = |n: u64| if n / near == ipa / near { PAGE } else { near };
    if ipa > g.ipa {
        host_read_aborts(pa - PAGE, "the page before the shared one")?;
        let n = ipa - PAGE;
        expect_guest_view(g, n, 0, size_of(n), "the page before the shared one")?;
    }
    if ipa + PAGE < g.end() {
        host_read_aborts(pa + PAGE, "the page after the shared one")?;
        let n = ipa + PAGE;
        expect_guest_view(g, n, 0, size_of(n), "the page after the shared one")?;
    }
    let block_start = ipa & !(block - 1);
    if block > MB2 {
        // A 1 GiB block splits into 2 MiB blocks and one 4K table.
        let b2 = ipa & !(MB2 - 1);
        if b2 > g.ipa {
            expect_guest_view(g, b2 - PAGE, 0, MB2, "the 2 MiB range before")?;
        }
        if b2 + MB2 < g.end() {
            expect_guest_view(g, b2 + MB2, 0, MB2, "the 2 MiB range after")?;
        }
        expect_guest_view(
            g,
            block_start,
            0,
            if b2 == block_start { PAGE } else { MB2 },
            "the block's first page",
        )?;
    } else {
        if block_start > g.ipa {
            expect_guest_view(g, block_start - PAGE, 0, block, "the block before")?;
        }
        if block_start + block < g.end() {
            expect_guest_view(g, block_start + block, 0, block, "the block after")?;
        }
    }
    ensure!(
        shared[0] > before[0] && shared[2] >= before[2] + if block > MB2 { 2 } else { 1 },
        "sharing a page of a {:#x} block: table pages {} -> {}, splits {} -> {}",
        block,
        before[0],
        shared[0],
        before[2],
        shared[2]
    );
    // Per stage 2 (KEEL_TABLE_PAGES): a 1 GiB guest block splits into an
    // L2 and an L3 table, a 2 MiB one into an L3 table; the host's stage 2
    // takes the rest of HYP_STATS 0's growth, for the page it now borrows.
    let guest_grew = s2_shared[0] as i64 - s2_before[0] as i64;
    let host_grew = s2_shared[1] as i64 - s2_before[1] as i64;
    ensure!(
        guest_grew == if block > MB2 { 2 } else { 1 }
            && host_grew >= 0
            && guest_grew + host_grew == shared[0] as i64 - before[0] as i64,
        "sharing a page of a {:#x} block: guest stage 2 {:+} table pages, host stage 2 {:+}, HYP_STATS 0 {:+}",
        block,
        guest_grew,
        host_grew,
        shared[0] as i64 - before[0] as i64
    );
    g.unshare(ipa, 0)?;
    ensure_eq!(
        [table_pages(g.handle)?, table_pages(0)?],
        s2_before,
        "guest and host stage-2 table pages after MEM_UNSHARE"
    );
    host_read_aborts(pa, "the page after MEM_UNSHARE")?;
    expect_guest_view(g, ipa, 0, block, "after MEM_UNSHARE")?;
    expect_host_view(pa, (g.handle, 3, 0), "after MEM_UNSHARE")?;
    let after = counters()?;
    ensure!(
        after[0] == before[0] && after[1] == before[1],
        "table/free pool pages after share + unshare: {:?} -> {:?}",
        &before[..2],
        &after[..2]
    );
    ensure!(
        after[3] > shared[3],
        "block merges did not grow ({} -> {})",
        shared[3],
        after[3]
    );
    // The guest's data survived both conversions.
    g.check(lo, hi - lo, key)
}

fn one_gib_guest(_: &BootInfo) -> TestResult {
    let start = pool_now()?;
    let g = Guest::create(PA_1G, IPA, GB1 / PAGE)?;
    expect_guest_view(&g, IPA, 0, GB1, "after one VM_DONATE of 1 GiB")?;
    expect_guest_view(&g, IPA + GB1 - PAGE, 0, GB1, "the last page")?;
    expect_host_view(PA_1G + GB1 / 2, (g.handle, 3, 0), "the guest's memory")?;
    host_read_aborts(PA_1G + GB1 / 2, "the guest's memory")?;
    let mut g = g.start(0x1_0000_0000)?;
    let mapped = counters()?;
    // A page in the middle of a 2 MiB range, then pages at both ends of a
    // 2 MiB range and of the 1 GiB.
    for (n, ipa) in [
        IPA + 0x1234_5000,
        IPA + 0x2000_0000 - PAGE,
        IPA + 0x2000_0000,
        IPA + GB1 - PAGE,
        IPA + PAGE,
    ]
    .into_iter()
    .enumerate()
    {
        convert_one(&mut g, ipa, GB1, 0x6b65_656c_0000_0000 + n as u64)?;
        expect_guest_view(&g, IPA + GB1 / 2 + MB2, 0, GB1, "after the conversion")?;
    }
    ensure_eq!(
        pool_now()?,
        [mapped[0], mapped[1]],
        "pool after the conversions"
    );
    // 16 MiB shared in one MEM_SHARE (more than a fixed table of 2048
    // pages would hold): the host reads the guest's pattern throughout,
    // and after MEM_UNSHARE the guest is one 1 GiB block again.
    let (big, len) = (IPA + 0x1000_0000, 8 * MB2);
    g.fill(big, len, 0x6269_6700)?;
    g.share(big, len / PAGE)?;
    for off in [0, PAGE, 2048 * PAGE, len - 8] {
        let v = host_read(g.pa_of(big + off), "16 MiB shared")?;
        ensure_eq!(
            v,
            pattern(big + off, 0x6269_6700),
            "host read of the shared 16 MiB"
        );
    }
    expect_guest_view(&g, big + len - PAGE, 1, MB2, "the last of the 16 MiB")?;
    g.unshare(big, len / PAGE)?;
    host_read_aborts(g.pa_of(big), "the 16 MiB once unshared")?;
    expect_guest_view(&g, big, 0, GB1, "after unsharing the 16 MiB")?;
    ensure_eq!(
        pool_now()?,
        [mapped[0], mapped[1]],
        "pool after the 16 MiB share"
    );
    g.teardown()?;
    ensure_eq!(
        pool_now()?,
        start,
        "table and free pool pages after teardown"
    );
    expect_host_view(PA_1G, (owner::HOST, 0, GB1), "after reclaim")?;
    Ok(())
}

fn two_mib_blocks(_: &BootInfo) -> TestResult {
    let start = pool_now()?;
    // Three 2 MiB blocks (pfn and IPA 2 MiB aligned, not 1 GiB aligned).
    let pa = slot(2);
    let mut g = Guest::new(pa, IPA, 3 * MB2 / PAGE, 3)?;
    for b in 0..3 {
        expect_guest_view(&g, IPA + b * MB2, 0, MB2, "2 MiB block")?;
    }
    let mapped = pool_now()?;
    for (n, ipa) in [
        IPA + MB2 + 0x7000,
        IPA + MB2 - PAGE,
        IPA + MB2,
        IPA + 3 * MB2 - PAGE,
        IPA + 2 * MB2 - PAGE,
        IPA,
    ]
    .into_iter()
    .enumerate()
    {
        convert_one(&mut g, ipa, MB2, 0x3200_0000_0000 + n as u64)?;
    }
    // Two pages across a block boundary in one call: both blocks split.
    let ipa = IPA + MB2 - PAGE;
    g.share(ipa, 2)?;
    expect_guest_view(&g, ipa, 1, PAGE, "first of two shared")?;
    expect_guest_view(&g, ipa + PAGE, 1, PAGE, "second of two shared")?;
    expect_guest_view(&g, IPA + 2 * MB2, 0, MB2, "the third block")?;
    host_read(g.pa_of(ipa), "first of two shared")?;
    host_read(g.pa_of(ipa + PAGE), "second of two shared")?;
    g.unshare(ipa, 2)?;
    expect_guest_view(&g, IPA, 0, MB2, "first block after unshare")?;
    expect_guest_view(&g, IPA + MB2, 0, MB2, "second block after unshare")?;
    ensure_eq!(pool_now()?, mapped, "pool after the conversions");
    // The host's page before the guest's memory is the host's.
    let (o, st, _) = host_view(pa - PAGE)?;
    ensure_eq!(
        (o, st),
        (owner::HOST, 0),
        "MEM_STATE of the page before the guest"
    );
    g.teardown()?;
    ensure_eq!(
        pool_now()?,
        start,
        "table and free pool pages after teardown"
    );
    Ok(())
}

fn unaligned_4k(_: &BootInfo) -> TestResult {
    let start = pool_now()?;
    // pfn one page past a 2 MiB boundary, IPA 2 MiB aligned: no run is
    // aligned in both, so every mapping is 4K.
    let pa = slot(3) + PAGE;
    let mut g = Guest::new(pa, IPA, 600, 4)?;
    for off in [0, PAGE, MB2 - PAGE, MB2, 599 * PAGE] {
        expect_guest_view(&g, IPA + off, 0, PAGE, "4K mapping")?;
    }
    let mapped = counters()?;
    let ipa = IPA + 300 * PAGE;
    g.fill(ipa - PAGE, 3 * PAGE, 0x4444)?;
    g.share(ipa, 0)?;
    expect_guest_view(&g, ipa, 1, PAGE, "shared")?;
    expect_host_view(g.pa_of(ipa), (g.handle, 2, PAGE), "shared")?;
    ensure_eq!(
        host_read(g.pa_of(ipa) + 8, "shared")?,
        pattern(ipa + 8, 0x4444),
        "host read of the shared page"
    );
    host_read_aborts(g.pa_of(ipa) + PAGE, "the next page")?;
    host_read_aborts(g.pa_of(ipa) - PAGE, "the previous page")?;
    let shared = counters()?;
    ensure_eq!(
        shared[2],
        mapped[2],
        "block splits when sharing a 4K-mapped page"
    );
    g.unshare(ipa, 0)?;
    expect_guest_view(&g, ipa, 0, PAGE, "after unshare")?;
    host_read_aborts(g.pa_of(ipa), "after unshare")?;
    ensure_eq!(
        pool_now()?,
        [mapped[0], mapped[1]],
        "pool after the conversion"
    );
    g.check(ipa - PAGE, 3 * PAGE, 0x4444)?;
    g.teardown()?;
    ensure_eq!(pool_now()?, start, "pool after teardown");
    Ok(())
}

fn pins(_: &BootInfo) -> TestResult {
    let mut g = Guest::new(slot(4), IPA, 512, 5)?;
    let ipa = IPA + 0x10_000;
    let pfn = g.pa_of(ipa) / PAGE;
    expect(
        func::HOST_PIN,
        [pfn, 1, 0, 0],
        status::DENIED,
        "HOST_PIN of a private page",
    )?;
    g.share(ipa, 0)?;
    expect(
        func::HOST_UNPIN,
        [pfn, 1, 0, 0],
        status::DENIED,
        "HOST_UNPIN without a pin",
    )?;
    ok(func::HOST_PIN, [pfn, 1, 0, 0], "HOST_PIN")?;
    ok(func::HOST_PIN, [pfn, 1, 0, 0], "HOST_PIN again")?;
    let before = counters()?;
    g.expect_call(
        func::MEM_UNSHARE,
        ipa,
        0,
        status::BUSY,
        "MEM_UNSHARE of a page pinned twice",
    )?;
    ok(func::HOST_UNPIN, [pfn, 1, 0, 0], "HOST_UNPIN")?;
    g.expect_call(
        func::MEM_UNSHARE,
        ipa,
        0,
        status::BUSY,
        "MEM_UNSHARE with one pin left",
    )?;
    ensure_eq!(counters()?, before, "counters after the refused unshares");
    expect_guest_view(&g, ipa, 1, PAGE, "pinned page")?;
    expect_host_view(g.pa_of(ipa), (g.handle, 2, PAGE), "pinned page")?;
    host_read(g.pa_of(ipa), "the pinned page")?;
    ok(func::HOST_UNPIN, [pfn, 1, 0, 0], "last HOST_UNPIN")?;
    g.unshare(ipa, 0)?;
    host_read_aborts(g.pa_of(ipa), "after unshare")?;
    expect(
        func::HOST_UNPIN,
        [pfn, 1, 0, 0],
        status::DENIED,
        "HOST_UNPIN after unshare",
    )?;
    g.teardown()
}

fn bad_guest_calls(_: &BootInfo) -> TestResult {
    let start = pool_now()?;
    let mut g = Guest::new(slot(5), IPA, 512, 6)?;
    let end = g.end();
    let shared = IPA + 0x20_000;
    let private = shared + PAGE;
    g.share(shared, 0)?;
    let before = counters()?;
    let inv = status::INVALID_PARAMETER;
    let den = status::DENIED;
    // (ipa, nr, status, why) for MEM_SHARE, MEM_UNSHARE, MEM_RELINQUISH;
    // 0: not tried here (a success, or MEM_RELINQUISH of a page shared with
    // the host, which docs/abi.md leaves open and this build accepts).
    let cases: [(u64, u64, [i64; 3], &str); 12] = [
        (private + 8, 0, [inv; 3], "misaligned IPA"),
        (private + 0x800, 1, [inv; 3], "misaligned IPA, nr 1"),
        (IPA_LIMIT - PAGE, 2, [inv; 3], "past the IPA space"),
        (IPA_LIMIT, 0, [inv; 3], "at the IPA space's end"),
        (!0xfff, 1, [inv; 3], "far past the IPA space"),
        (private, 1 << 52, [inv; 3], "nr * 4096 overflows"),
        (end - PAGE, 2, [den; 3], "past guest memory"),
        (end, 0, [den; 3], "no memory there"),
        (MBOX, 0, [den; 3], "the mailbox (no memory)"),
        (shared, 0, [den, 0, 0], "the shared page"),
        (private, 0, [0, den, 0], "a private page"),
        (shared, 2, [den, den, 0], "shared + private"),
    ];
    let mut soft = Soft::default();
    for (ipa, nr, want, why) in cases {
        for (id, w) in [func::MEM_SHARE, func::MEM_UNSHARE, func::MEM_RELINQUISH]
            .into_iter()
            .zip(want)
        {
            if w == 0 {
                continue;
            }
            let (got, _) = g.call(id, ipa, nr)?;
            soft.note(check(
                got == w,
                format_args!(
                    "guest call {:#x}({:#x}, {:#x}) ({}): status {}, expected {}",
                    id, ipa, nr, why, got, w
                ),
            ));
        }
    }
    ensure_eq!(
        counters()?,
        before,
        "counters after the refused guest calls"
    );
    expect_guest_view(&g, shared, 1, PAGE, "the shared page")?;
    expect_guest_view(&g, private, 0, PAGE, "the private page")?;
    expect_guest_view(&g, end - PAGE, 0, PAGE, "the last page")?;
    expect_host_view(g.pa_of(shared), (g.handle, 2, PAGE), "the shared page")?;
    expect_host_view(g.pa_of(private), (g.handle, 3, 0), "the private page")?;
    let (_, s, size) = guest_view(g.handle, end)?;
    ensure_eq!((s, size), (3, 0), "VM_MEM_STATE past the guest's memory");
    // nr = 0 and nr = 1 are the same page.
    g.unshare(shared, 1)?;
    g.teardown()?;
    ensure_eq!(pool_now()?, start, "pool after teardown");
    soft.finish()
}

fn relinquish(_: &BootInfo) -> TestResult {
    let mut g = Guest::new(slot(6), IPA, 512, 7)?;
    let ipa = IPA + 0x40_000;
    g.fill(ipa, PAGE, 0x7777)?;
    g.expect_call(func::MEM_RELINQUISH, ipa, 0, 0, "MEM_RELINQUISH")?;
    let pa = g.pa_of(ipa);
    expect_host_view(pa, (owner::HOST, 0, PAGE), "relinquished page")?;
    for off in (0..PAGE).step_by(8) {
        ensure_eq!(
            host_read(pa + off, "relinquished")?,
            0,
            "relinquished page word"
        );
    }
    let (_, s, size) = guest_view(g.handle, ipa)?;
    ensure_eq!((s, size), (3, 0), "VM_MEM_STATE of the relinquished IPA");
    // The guest's access is now an MMIO exit: it has no memory there.
    match g.post(Op::Read, ipa, 0, 0)? {
        Event::Exit(exit::MMIO, [i, _, _]) => ensure_eq!(i, ipa, "MMIO exit IPA"),
        e => fail!("guest read of a relinquished page: {:x?}", e),
    }
    ensure_eq!(g.complete(9)?, Event::Report(9, 0), "after the MMIO read");
    g.destroy()?;
    let (p0, n0) = (g.pa / PAGE, (pa - g.pa) / PAGE);
    expect(
        func::HOST_RECLAIM,
        [p0, g.pages, 0, 0],
        status::DENIED,
        "HOST_RECLAIM over a page the host owns",
    )?;
    ok(func::HOST_RECLAIM, [p0, n0, 0, 0], "reclaim below")?;
    ok(
        func::HOST_RECLAIM,
        [p0 + n0 + 1, g.pages - n0 - 1, 0, 0],
        "reclaim above",
    )?;
    g.done = true;
    Ok(())
}

fn vm_share(_: &BootInfo) -> TestResult {
    let mut g = Guest::new(slot(7), IPA, 16, 8)?;
    let h = slot(7) + 2 * MB2;
    let win = 0x5000_0000;
    // SAFETY: host RAM of this test's slot, not given to anyone.
    unsafe { exception::write(h, 0xabcd_0123) };
    clean_dcache(h, 8);
    let mapped = host_view(h)?.2;
    ok(func::VM_SHARE, [g.handle, h / PAGE, win, 1], "VM_SHARE")?;
    // Shared alone: the host's block split around it.
    expect_host_view(h, (owner::HOST, 1, PAGE), "lent page")?;
    ensure_eq!(
        guest_view(g.handle, win)?,
        (h / PAGE, 2, PAGE),
        "VM_MEM_STATE of the lent page"
    );
    ensure_eq!(g.op(Op::Read, win, 0, 0)?, (0xabcd_0123, 0), "guest read");
    g.op(Op::Write, win + 8, 0x600d, 0)?;
    ensure_eq!(
        host_read(h + 8, "lent page")?,
        0x600d,
        "host read of the guest's write"
    );
    g.expect_call(
        func::MEM_SHARE,
        win,
        0,
        status::DENIED,
        "MEM_SHARE of a borrowed page",
    )?;
    g.expect_call(
        func::MEM_RELINQUISH,
        win,
        0,
        status::DENIED,
        "MEM_RELINQUISH of a borrowed page",
    )?;
    expect(
        func::VM_DONATE,
        [g.handle, h / PAGE, win + PAGE, 1],
        status::DENIED,
        "VM_DONATE of a lent page",
    )?;
    expect(
        func::VM_SHARE,
        [g.handle, slot(7) / PAGE, win + PAGE, 1],
        status::DENIED,
        "VM_SHARE of the guest's own page",
    )?;
    expect(
        func::VM_UNSHARE,
        [g.handle, IPA, 1, 0],
        status::DENIED,
        "VM_UNSHARE of a private page",
    )?;
    ok(func::VM_UNSHARE, [g.handle, win, 1, 0], "VM_UNSHARE")?;
    // Back in the mapping it had before: the block rebuilt.
    expect_host_view(h, (owner::HOST, 0, mapped), "returned page")?;
    match g.post(Op::Read, win, 0, 0)? {
        Event::Exit(exit::MMIO, [i, _, _]) => ensure_eq!(i, win, "MMIO exit IPA"),
        e => fail!("guest read after VM_UNSHARE: {:x?}", e),
    }
    g.complete(0)?;
    g.teardown()
}

fn teardown_reclaim(_: &BootInfo) -> TestResult {
    let start = pool_now()?;
    // One 2 MiB block and 16 pages mapped 4K; one page shared at the end.
    let pa = slot(8);
    let n = 512 + 16;
    let mut g = Guest::new(pa, IPA, n, 9)?;
    g.fill(IPA + PAGE, (n - 1) * PAGE, 0x9999)?;
    let shared = IPA + 512 * PAGE + 3 * PAGE;
    g.share(shared, 0)?;
    let p = pa / PAGE;
    for (pfn, nr, why) in [
        (p, n, "all of a live VM's pages"),
        (p + 5, 1, "one private page of a live VM"),
        (p + 515, 1, "a page the live VM shares"),
    ] {
        expect(func::HOST_RECLAIM, [pfn, nr, 0, 0], status::DENIED, why)?;
    }
    expect_host_view(
        pa + 5 * PAGE,
        (g.handle, 3, 0),
        "private page before destroy",
    )?;
    let handle = g.handle;
    let tables = table_pages(handle)?;
    g.destroy()?;
    ensure_eq!(
        table_pages(handle)?,
        tables,
        "KEEL_TABLE_PAGES of a destroyed VM before reclaim (its tables stay)"
    );
    let dead = host_view(pa + 5 * PAGE)?;
    println!(
        "  MEM_STATE of a destroyed VM's page before reclaim: owner {:#x}, state {}, size {:#x}",
        dead.0, dead.1, dead.2
    );
    ensure!(
        dead.0 != owner::HOST,
        "a destroyed VM's page is the host's before HOST_RECLAIM"
    );
    host_read_aborts(pa + 5 * PAGE, "a destroyed VM's page before reclaim")?;
    for (id, args) in [
        (func::VM_DESTROY, [handle, 0, 0, 0]),
        (func::VCPU_RUN, [handle, 0, 0, 0]),
        (func::VCPU_INIT, [handle, 0, IPA, 0]),
        (func::VM_MEM_STATE, [handle, IPA, 0, 0]),
        (func::VM_DONATE, [handle, slot(9) / PAGE, IPA, 1]),
    ] {
        expect(
            id,
            args,
            status::INVALID_PARAMETER,
            "a destroyed VM's handle",
        )?;
    }
    ok(
        func::HOST_RECLAIM,
        [p, n, 0, 0],
        "HOST_RECLAIM of the dead VM",
    )?;
    g.done = true;
    expect(
        func::KEEL_TABLE_PAGES,
        [handle, 0, 0, 0],
        status::INVALID_PARAMETER,
        "KEEL_TABLE_PAGES once the last page is reclaimed (the slot is free)",
    )?;
    expect(
        func::HOST_RECLAIM,
        [p, n, 0, 0],
        status::DENIED,
        "HOST_RECLAIM again",
    )?;
    for q in [0, 5, 511, 512, 515, n - 1] {
        expect_host_view(
            pa + q * PAGE,
            (owner::HOST, 0, host_view(pa + q * PAGE)?.2),
            "reclaimed page",
        )?;
    }
    for a in (pa..pa + n * PAGE).step_by(8) {
        let v = host_read(a, "reclaimed")?;
        ensure!(v == 0, "reclaimed page word {:#x} = {:#x}", a, v);
    }
    ensure_eq!(pool_now()?, start, "pool after teardown");
    Ok(())
}

fn two_vms_isolated(_: &BootInfo) -> TestResult {
    let start = pool_now()?;
    let mut a = Guest::new(slot(9), IPA, 512, 0xa)?;
    let mut b = Guest::new(slot(10), IPA, 512, 0xb)?;
    ensure!(a.handle != b.handle, "two VMs got the same handle");
    let x = IPA + 0x8000;
    a.fill(x, PAGE, 0xaaaa)?;
    b.fill(x, PAGE, 0xbbbb)?;
    a.check(x, PAGE, 0xaaaa)?;
    b.check(x, PAGE, 0xbbbb)?;
    // A's memory is nowhere in B's IPA space: at A's PA, B finds no memory.
    match b.post(Op::Read, a.pa_of(x), 0, 0)? {
        Event::Exit(exit::MMIO, [i, ..]) => ensure_eq!(i, a.pa_of(x), "B's access to A's PA"),
        e => fail!("B's read at A's PA: {:x?}", e),
    }
    b.complete(0)?;
    let mut soft = Soft::default();
    soft.note(b.expect_call(
        func::MEM_SHARE,
        a.pa_of(x),
        0,
        status::DENIED,
        "B shares an IPA it has no memory at",
    ));
    soft.note(b.expect_call(
        func::MEM_SHARE,
        IPA + MB2,
        0,
        status::DENIED,
        "B shares past its memory",
    ));
    // The host cannot hand A's pages to B, private or shared.
    let pfn = a.pa_of(x) / PAGE;
    expect(
        func::VM_DONATE,
        [b.handle, pfn, IPA + MB2, 1],
        status::DENIED,
        "VM_DONATE of A's page to B",
    )?;
    expect(
        func::VM_SHARE,
        [b.handle, pfn, IPA + MB2, 1],
        status::DENIED,
        "VM_SHARE of A's page to B",
    )?;
    a.share(x, 0)?;
    expect(
        func::VM_DONATE,
        [b.handle, pfn, IPA + MB2, 1],
        status::DENIED,
        "VM_DONATE of A's shared page to B",
    )?;
    expect(
        func::VM_SHARE,
        [b.handle, pfn, IPA + MB2, 1],
        status::DENIED,
        "VM_SHARE of A's shared page to B",
    )?;
    // B cannot unshare or relinquish A's page through its own IPA.
    b.expect_call(
        func::MEM_UNSHARE,
        x,
        0,
        status::DENIED,
        "B unshares its private page",
    )?;
    expect_guest_view(&a, x, 1, PAGE, "A's shared page")?;
    a.unshare(x, 0)?;
    a.check(x, PAGE, 0xaaaa)?;
    b.check(x, PAGE, 0xbbbb)?;
    a.teardown()?;
    b.check(x, PAGE, 0xbbbb)?;
    b.teardown()?;
    ensure_eq!(pool_now()?, start, "pool after teardown");
    soft.finish()
}

fn bad_handles_and_vcpus(_: &BootInfo) -> TestResult {
    let mut raw = [0u64; 8];
    let r = bad_handles_inner(&mut raw);
    // Whatever happened, the empty VMs go (the Guest's Drop takes care of
    // its own).
    for h in raw.iter().filter(|&&h| h != 0) {
        crate::hvc(func::VM_DESTROY, [*h, 0, 0, 0, 0]);
    }
    r
}

fn bad_handles_inner(raw: &mut [u64; 8]) -> TestResult {
    let inv = status::INVALID_PARAMETER;
    for (n, flags) in [(0, 0), (5, 0), (u64::MAX, 0), (1, 1), (1, 1 << 63)] {
        expect(
            func::VM_CREATE,
            [n, flags, 0, 0],
            inv,
            "VM_CREATE with bad vCPUs/flags",
        )?;
    }
    let g = Guest::create(slot(11), IPA, 16)?;
    let v2 = ok(func::VM_CREATE, [2, 0, 0, 0], "VM_CREATE(2)")?.0[1];
    raw[0] = v2;
    let gone = ok(func::VM_CREATE, [1, 0, 0, 0], "VM_CREATE(1)")?.0[1];
    ok(
        func::VM_DESTROY,
        [gone, 0, 0, 0],
        "VM_DESTROY of an empty VM",
    )?;
    let pfn = slot(11) / PAGE + 100;
    // KEEL_TABLE_PAGES: 0 is the host, not a bad handle.
    for h in [0x0fff, VM_HANDLE_BASE + 8, u64::MAX, gone] {
        expect(
            func::KEEL_TABLE_PAGES,
            [h, 0, 0, 0],
            inv,
            "KEEL_TABLE_PAGES of a handle without a VM",
        )?;
    }
    for h in [
        0,
        0x0fff,
        VM_HANDLE_BASE + 8,
        VM_HANDLE_BASE + 0x100,
        u64::MAX,
        gone,
    ] {
        for (id, args) in [
            (func::VM_DESTROY, [h, 0, 0, 0]),
            (func::VCPU_INIT, [h, 0, IPA, 0]),
            (func::VCPU_RUN, [h, 0, 0, 0]),
            (func::VM_DONATE, [h, pfn, IPA, 1]),
            (func::VM_SHARE, [h, pfn, IPA, 1]),
            (func::VM_UNSHARE, [h, IPA, 1, 0]),
            (func::VM_MEM_STATE, [h, IPA, 0, 0]),
        ] {
            let got = hc(id, args)?.status();
            ensure!(
                got == inv,
                "call {:#x} with handle {:#x}: status {}, expected INVALID_PARAMETER",
                id,
                h,
                got
            );
        }
    }
    for (h, nr) in [(g.handle, 1), (v2, 2)] {
        for i in [nr, nr + 1, 4, 5, u64::MAX] {
            expect(
                func::VCPU_INIT,
                [h, i, IPA, 0],
                inv,
                "VCPU_INIT of a vCPU index >= nr_vcpus",
            )?;
            expect(
                func::VCPU_RUN,
                [h, i, 0, 0],
                inv,
                "VCPU_RUN of a vCPU index >= nr_vcpus",
            )?;
        }
    }
    // Valid index, never initialized.
    expect(
        func::VCPU_RUN,
        [v2, 1, 0, 0],
        inv,
        "VCPU_RUN of an uninitialized vCPU",
    )?;
    // Bad IPAs and ranges for the host's VM calls.
    for (id, args, why) in [
        (
            func::VM_MEM_STATE,
            [g.handle, IPA + 8, 0, 0],
            "misaligned IPA",
        ),
        (
            func::VM_MEM_STATE,
            [g.handle, IPA_LIMIT, 0, 0],
            "IPA past the space",
        ),
        (
            func::VM_DONATE,
            [v2, pfn, IPA_LIMIT - PAGE, 2],
            "range past the IPA space",
        ),
        (func::VM_DONATE, [v2, pfn, IPA + 8, 1], "misaligned IPA"),
        (func::VM_DONATE, [v2, pfn, IPA, 0], "nr = 0"),
        (func::VM_SHARE, [v2, pfn, IPA, 0], "nr = 0"),
        (func::VM_UNSHARE, [v2, IPA, 0, 0], "nr = 0"),
    ] {
        expect(id, args, inv, why)?;
    }
    // The IPA is already mapped in g: DENIED.
    expect(
        func::VM_DONATE,
        [g.handle, pfn, IPA, 1],
        status::DENIED,
        "VM_DONATE over mapped IPAs",
    )?;
    // At most HYP_FEATURES x2 VMs.
    let max = ok(func::HYP_FEATURES, [0; 4], "HYP_FEATURES")?.0[2];
    ensure_eq!(max, 8, "HYP_FEATURES max VMs");
    let mut n = 0;
    while n < raw.len() - 1 {
        let r = hc(func::VM_CREATE, [1, 0, 0, 0])?;
        if r.status() != 0 {
            ensure!(
                r.status() == status::NO_MEMORY || r.status() == status::DENIED,
                "VM_CREATE past the maximum: status {}",
                r.status()
            );
            break;
        }
        raw[n + 1] = r.0[1];
        n += 1;
    }
    ensure_eq!(n as u64 + 2, max, "VMs that could be created");
    for h in raw.iter_mut().filter(|h| **h != 0) {
        ok(func::VM_DESTROY, [*h, 0, 0, 0], "VM_DESTROY")?;
        *h = 0;
    }
    g.teardown()
}

fn fault_stays_failed(_: &BootInfo) -> TestResult {
    let mut g = Guest::new(slot(12), IPA, 16, 0xf)?;
    let esr = match g.post(Op::Fault, DEV, 0, 0)? {
        Event::Exit(exit::FAULT, [esr, ..]) => esr,
        e => fail!("LDP from an IPA without memory: {:x?}", e),
    };
    ensure_eq!(
        esr >> 26,
        0x24,
        "FAULT ESR class (data abort from a lower EL)"
    );
    for _ in 0..2 {
        let (reason, d) = g.run()?;
        ensure_eq!(
            (reason, d[0]),
            (exit::FAULT, esr),
            "VCPU_RUN of the failed vCPU"
        );
    }
    // The host cannot restart it (the VM has run): VCPU_INIT is DENIED and
    // changes nothing, so the vCPU stays failed until VM_DESTROY.
    expect(
        func::VCPU_INIT,
        [g.handle, 0, IPA, 0x10],
        status::DENIED,
        "VCPU_INIT of a VM that has run",
    )?;
    let (reason, d) = g.run()?;
    ensure_eq!(
        (reason, d[0]),
        (exit::FAULT, esr),
        "VCPU_RUN after the refused VCPU_INIT"
    );
    g.teardown()
}

/// PSCI CPU_ON, AFFINITY_INFO and CPU_OFF from a guest with two vCPUs: the
/// host cannot start vCPU 1 (the VM has run), the guest can, at an entry
/// and context of its choosing; the host hears of it through a HYPERCALL
/// exit and runs it. A vCPU that turned itself off does not run until the
/// guest starts it again.
fn guest_starts_its_vcpus(_: &BootInfo) -> TestResult {
    const CPU_ON: u64 = 0xC400_0003;
    const CPU_OFF: u64 = 0x8400_0002;
    const AFFINITY_INFO: u64 = 0xC400_0004;
    let before = pool_now()?;
    let mut g = Guest::create_smp(slot(13), IPA, 16, 2)?.start(0x10)?;
    let vcpu_run = |g: &Guest, vcpu: u64| hc(func::VCPU_RUN, [g.handle, vcpu, 0, 0]);
    expect(
        func::VCPU_INIT,
        [g.handle, 1, IPA, 0],
        status::DENIED,
        "VCPU_INIT of vCPU 1 once vCPU 0 has run",
    )?;
    ensure_eq!(
        vcpu_run(&g, 1)?.status(),
        status::INVALID_PARAMETER,
        "VCPU_RUN of vCPU 1, off"
    );
    ensure_eq!(g.call(AFFINITY_INFO, 1, 0)?.0, 1, "AFFINITY_INFO(1): off");
    // CPU_ON(1, entry = the payload, context = the entry: guest.S passes
    // a3 in x2 and x3).
    match g.post(Op::Hvc, CPU_ON, 1, IPA)? {
        Event::Exit(exit::HYPERCALL, d) => ensure_eq!(d, [CPU_ON, 1, IPA], "the CPU_ON exit"),
        e => fail!("CPU_ON from vCPU 0: {:x?}", e),
    }
    // vCPU 1 starts at the payload with x0 = the context: its hello.
    g.vcpu = 1;
    match g.serve()? {
        Event::Report(a, HELLO) if a == IPA => {}
        e => fail!(
            "vCPU 1 after CPU_ON: expected its hello with x0 = {:#x}, got {:x?}",
            IPA,
            e
        ),
    }
    ensure_eq!(
        g.call(AFFINITY_INFO, 0, 0)?.0,
        0,
        "AFFINITY_INFO(0) from vCPU 1"
    );
    ensure_eq!(
        g.call(CPU_ON, 0, IPA)?.0,
        -4,
        "CPU_ON of vCPU 0 (on) from vCPU 1"
    );
    // vCPU 1 turns itself off.
    match g.post(Op::Hvc, CPU_OFF, 0, 0)? {
        Event::Exit(exit::HYPERCALL, [CPU_OFF, ..]) => {}
        e => fail!("CPU_OFF from vCPU 1: {:x?}", e),
    }
    ensure_eq!(
        vcpu_run(&g, 1)?.status(),
        status::INVALID_PARAMETER,
        "VCPU_RUN of vCPU 1 after its CPU_OFF"
    );
    // vCPU 0 carries on from its CPU_ON with the host's SUCCESS.
    g.vcpu = 0;
    match g.complete(0)? {
        Event::Report(0, _) => {}
        e => fail!("vCPU 0 after its CPU_ON exit: {:x?}", e),
    }
    ensure_eq!(
        g.call(AFFINITY_INFO, 1, 0)?.0,
        1,
        "AFFINITY_INFO(1) after CPU_OFF"
    );
    ensure_eq!(
        g.call(CPU_ON, 1, IPA + 2)?.0,
        -9,
        "CPU_ON with a misaligned entry"
    );
    ensure_eq!(
        g.call(CPU_ON, 2, IPA)?.0,
        -2,
        "CPU_ON of a vCPU the VM lacks"
    );
    g.teardown()?;
    ensure_eq!(pool_now()?, before, "table and free pool pages at the end");
    Ok(())
}

/// The host's APIAKeyLo_EL1 (pointer authentication).
fn host_apia_lo() -> u64 {
    let v: u64;
    // SAFETY: reading a key register (FEAT_PAuth: checked by the caller).
    unsafe { core::arch::asm!("mrs {}, s3_0_c2_c1_0", out(reg) v, options(nomem, nostack)) };
    v
}

/// The host's TPIDR2_EL0 (SME).
fn host_tpidr2() -> u64 {
    let v: u64;
    // SAFETY: reading TPIDR2_EL0 (FEAT_SME: checked by the caller).
    unsafe { core::arch::asm!("mrs {}, s3_3_c13_c0_5", out(reg) v, options(nomem, nostack)) };
    v
}

/// Sets the host's APIAKeyLo_EL1 and TPIDR2_EL0 (this kernel signs no
/// pointers and uses no SME).
fn set_host_keys(apia: u64, tpidr2: u64, sme: bool) {
    // SAFETY: as in host_apia_lo and host_tpidr2; nothing here uses them.
    unsafe {
        core::arch::asm!("msr s3_0_c2_c1_0, {}", in(reg) apia, options(nostack));
        if sme {
            core::arch::asm!("msr s3_3_c13_c0_5, {}", in(reg) tpidr2, options(nostack));
        }
    }
}

/// Pointer-authentication keys and SME's TPIDR2_EL0, which the guest may
/// use untrapped, are the guest's own: it never reads the host's, and the
/// host never runs with the guest's.
fn keys_are_switched(_: &BootInfo) -> TestResult {
    let isar1 = crate::kernel::id_aa64isar1();
    let pauth = [4, 8, 24, 28].iter().any(|&l| id_field(isar1, l) != 0);
    let sme = id_field(crate::kernel::id_aa64pfr1(), 24) != 0;
    ensure!(
        pauth,
        "the CPU lacks pointer authentication, so switching keys proves nothing (ISAR1 {:#x})",
        isar1
    );
    let (host_key, host_tp2) = (0x1111_2222_3333_4444, 0x5555_6666_7777_8888);
    set_host_keys(host_key, host_tp2, sme);
    let mut g = Guest::new(slot(14), IPA, 16, 0x20)?;
    let a3 = u64::from(sme);
    ensure_eq!(
        g.op(Op::Keys, 0xaaaa_0001, 0xbbbb_0001, a3)?,
        (0, 0),
        "a new vCPU's APIAKeyLo and TPIDR2 (not the host's)"
    );
    ensure_eq!(
        (host_apia_lo(), if sme { host_tpidr2() } else { host_tp2 }),
        (host_key, host_tp2),
        "the host's APIAKeyLo and TPIDR2 after the guest set its own"
    );
    ensure_eq!(
        g.op(Op::Keys, 0xaaaa_0002, 0xbbbb_0002, a3)?,
        (0xaaaa_0001, if sme { 0xbbbb_0001 } else { 0 }),
        "the guest's own values across its exits"
    );
    ensure_eq!(host_apia_lo(), host_key, "the host's APIAKeyLo at the end");
    set_host_keys(0, 0, sme);
    g.teardown()
}

/// The host's PMU counts nothing while a guest runs (its events would tell
/// the host what the guest does): the cycle counter, enabled by the host to
/// count at EL1 and EL2, advances over a guest's long loop by much less
/// than the loop's own length on the guest's clock. (Without -icount
/// QEMU's cycle counter is its virtual clock, in ns.)
fn host_pmu_stops_in_guests(_: &BootInfo) -> TestResult {
    use crate::suites::bench;
    ensure_eq!(bench::unit(), "cycles", "the host's clock is the PMU's");
    let mut g = Guest::new(slot(15), IPA, 16, 0x30)?;
    let freq: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects.
    unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) freq, options(nomem, nostack)) };
    let c0 = bench::now();
    let (t, s) = g.op(Op::ShareLoop, IPA + 8 * PAGE, 3000, 0)?;
    let c1 = bench::now();
    ensure!(t != u64::MAX, "the guest's loop: status {}", s as i64);
    let loop_ns = t * 1_000_000_000 / freq;
    ensure!(
        (c1 - c0) * 4 < loop_ns,
        "the host's cycle counter advanced {} over a guest loop of {} ns",
        c1 - c0,
        loop_ns
    );
    // And it counts again once the run is over.
    let c2 = bench::now();
    for _ in 0..1000 {
        core::hint::spin_loop();
    }
    ensure!(bench::now() > c2, "the cycle counter after the runs");
    g.teardown()
}

/// A guest's GIC CPU interface state (ICC_PMR_EL1 here, which reaches the
/// virtual interface while it runs) is its own: another VM never reads it,
/// and it survives the guest's exits.
fn gic_interface_state_is_per_vcpu(_: &BootInfo) -> TestResult {
    let mut a = Guest::new(slot(16), IPA, 16, 0x40)?;
    let (pmr, _) = a.op(Op::Pmr, 0xa0, 0, 0)?;
    ensure_eq!(pmr, 0, "a new vCPU's ICC_PMR_EL1");
    let mut b = Guest::new(slot(17), IPA, 16, 0x41)?;
    ensure_eq!(
        b.op(Op::Pmr, 0x50, 0, 0)?.0,
        0,
        "another VM's ICC_PMR_EL1 after the first wrote 0xa0"
    );
    ensure_eq!(
        a.op(Op::Pmr, 0xa0, 0, 0)?.0,
        0xa0,
        "the first VM's own, again"
    );
    ensure_eq!(b.op(Op::Pmr, 0, 0, 0)?.0, 0x50, "the second VM's own");
    b.teardown()?;
    a.teardown()
}

/// Spins of the guest's IRQS op: long enough for every interrupt pending
/// at entry (and the maintenance exits that refill the list registers).
const IRQ_SPINS: u64 = 20_000;

/// The INTIDs an IRQS report lists (10 bits each, the last taken lowest),
/// oldest first.
fn taken(history: u64, n: u64) -> [u64; 6] {
    let mut out = [u64::MAX; 6];
    let k = n.min(6) as usize;
    for (i, o) in out.iter_mut().take(k).enumerate() {
        *o = (history >> (10 * (k - 1 - i))) & 0x3ff;
    }
    out
}

/// KEEL_VCPU_IRQ: the guest takes what the host asks for through its GIC
/// CPU interface (ICC_IAR1_EL1), once per request that comes before it
/// takes it, highest priority first; more than the CPU's list registers
/// (4 on QEMU) all arrive; bad requests are refused and deliver nothing.
fn virtual_interrupts(boot: &BootInfo) -> TestResult {
    // The maintenance interrupt that refills the list registers is a PPI
    // like any other: configured by the host (group 1, a priority), as
    // Linux configures its PPIs.
    crate::smp::host_gic_init(boot)?;
    let mut g = Guest::new(slot(18), IPA, 16, 0x50)?;
    let h = g.handle;
    let pfr0 = g.op(Op::Sysregs, 0, 0, 0)?.0;
    ensure_eq!(
        id_field(pfr0, 24),
        1,
        "guest ID_AA64PFR0_EL1.GIC (GICv3 CPU interface)"
    );
    ensure_eq!(
        g.op(Op::Irqs, 0, IRQ_SPINS, 0)?,
        (0, 0),
        "interrupts with none asked for"
    );
    let irq = |intid: u64, prio: u64| ok(func::KEEL_VCPU_IRQ, [h, 0, intid, prio], "KEEL_VCPU_IRQ");
    for (args, what) in [
        ([0, 0, 40, 0x80], "handle 0"),
        ([h + 1, 0, 40, 0x80], "a handle without a VM"),
        ([h, 1, 40, 0x80], "vCPU 1 of a 1-vCPU VM"),
        ([h, 0, 1020, 0x80], "INTID 1020"),
        (
            [h, 0, keel_abi::VTIMER_INTID, 0x80],
            "the virtual timer's INTID",
        ),
        ([h, 0, 40, 0x100], "priority 0x100"),
    ] {
        expect(func::KEEL_VCPU_IRQ, args, status::INVALID_PARAMETER, what)?;
    }
    ensure_eq!(
        g.op(Op::Irqs, 0, IRQ_SPINS, 0)?,
        (0, 0),
        "interrupts after refused requests"
    );
    irq(40, 0x80)?;
    irq(40, 0x80)?;
    ensure_eq!(
        g.op(Op::Irqs, 0, IRQ_SPINS, 0)?,
        (40, 1),
        "INTID 40, asked for twice"
    );
    irq(41, 0xa0)?;
    irq(42, 0x20)?;
    irq(43, 0x60)?;
    let (history, n) = g.op(Op::Irqs, 0, IRQ_SPINS, 0)?;
    ensure_eq!(
        taken(history, n),
        [42, 43, 41, u64::MAX, u64::MAX, u64::MAX],
        "three interrupts, by priority"
    );
    // An SGI and a PPI number are the host's to ask for too.
    irq(0, 0x80)?;
    irq(31, 0x90)?;
    let (history, n) = g.op(Op::Irqs, 0, IRQ_SPINS, 0)?;
    ensure_eq!(taken(history, n)[..2], [0, 31], "SGI 0 and PPI 31");
    // A full queue: 32 wait, the 33rd is BUSY; the guest takes all 32
    // through 4 list registers.
    for i in 0..32 {
        irq(100 + i, 0xa0)?;
    }
    expect(
        func::KEEL_VCPU_IRQ,
        [h, 0, 99, 0xa0],
        status::BUSY,
        "a 33rd interrupt",
    )?;
    let (history, n) = g.op(Op::Irqs, 0, IRQ_SPINS, 0)?;
    ensure_eq!(n, 32, "interrupts taken of 32 asked for");
    ensure!(
        taken(history, n).iter().all(|i| (100..132).contains(i)),
        "the last interrupts taken: {:?}",
        taken(history, n)
    );
    ensure_eq!(
        g.op(Op::Irqs, 0, IRQ_SPINS, 0)?,
        (0, 0),
        "interrupts once all were taken"
    );
    // The guest's own SGI (ICC_SGI1R_EL1: INTID 5 to itself, Aff0 0):
    // an SGI exit with what it wrote; delivered by the host, it takes it.
    let sgi1r = (5 << 24) | 1;
    match g.post(Op::Sgi, sgi1r, 0, 0)? {
        Event::Exit(exit::SGI, [v, which, 0]) if (v, which) == (sgi1r, exit::sgi::SGI1R) => {}
        e => fail!("the guest's SGI: {:x?}", e),
    }
    irq(5, 0xa0)?;
    match g.complete(0)? {
        Event::Report(0, 0) => {}
        e => fail!("the guest after its SGI: {:x?}", e),
    }
    ensure_eq!(
        g.op(Op::Irqs, 0, IRQ_SPINS, 0)?,
        (5, 1),
        "the SGI, delivered"
    );
    g.teardown()
}

/// The guest's virtual timer interrupts it, through keel alone (the host
/// never sees the timer): while it spins and in WFI, once per expiry (the
/// guest turns the timer off in its handler), with a host interrupt
/// alongside; never while the guest has it disabled (KEEL_VCPU_VTIMER),
/// and without ending every run meanwhile (the guest gets on to its
/// deadline); the physical PPI 27 is never left active for the host.
fn virtual_timer(boot: &BootInfo) -> TestResult {
    crate::smp::host_gic_init(boot)?;
    let mut g = Guest::new(slot(19), IPA, 16, 0x51)?;
    let h = g.handle;
    // The guest waits up to a second of its counter for what it expects:
    // QEMU's timer can fire late on a loaded machine.
    let second = cntfrq();
    let released = || {
        check(
            !crate::smp::vtimer_ppi_active(),
            format_args!("PPI 27 is left active for the host"),
        )
    };
    // 2000 ticks of the 62.5 MHz counter: 32 us.
    ensure_eq!(
        g.op(Op::Irqs, 2000, 1, second)?,
        (27, 1),
        "the timer, spinning"
    );
    released()?;
    ensure_eq!(g.op(Op::Irqs, 2000, 0, 0)?, (27, 1), "the timer, in WFI");
    released()?;
    ok(func::KEEL_VCPU_IRQ, [h, 0, 40, 0x80], "KEEL_VCPU_IRQ")?;
    let (history, n) = g.op(Op::Irqs, 2000, 2, second)?;
    ensure_eq!(
        taken(history, n)[..2],
        [40, 27],
        "a host interrupt, then the timer"
    );
    // The guest's own configuration of PPI 27, through its VMM.
    for (args, what) in [
        ([h, 0, 2, 0xa0], "enable 2"),
        ([h, 0, 1, 0x100], "priority 0x100"),
        ([h, 1, 1, 0xa0], "vCPU 1 of a 1-vCPU VM"),
        ([0, 0, 1, 0xa0], "handle 0"),
    ] {
        expect(
            func::KEEL_VCPU_VTIMER,
            args,
            status::INVALID_PARAMETER,
            what,
        )?;
    }
    ok(
        func::KEEL_VCPU_VTIMER,
        [h, 0, 0, 0xa0],
        "KEEL_VCPU_VTIMER off",
    )?;
    // 3000 ticks: the timer expires after 2000 and stays asserted.
    ensure_eq!(
        g.op(Op::Irqs, 2000, 1, 3000)?,
        (0, 0),
        "interrupts from a timer the guest disabled"
    );
    released()?;
    ok(
        func::KEEL_VCPU_VTIMER,
        [h, 0, 1, 0x40],
        "KEEL_VCPU_VTIMER on",
    )?;
    ensure_eq!(
        g.op(Op::Irqs, 2000, 1, second)?,
        (27, 1),
        "the timer, enabled again"
    );
    ensure_eq!(
        g.op(Op::Irqs, 0, IRQ_SPINS, 0)?,
        (0, 0),
        "interrupts with the timer off"
    );
    released()?;
    // Four host interrupts at 0xff, which the guest's priority mask keeps
    // out, fill QEMU's four list registers: the timer takes the place of
    // one (it neither waits behind them nor ends every run meanwhile), and
    // so does a host interrupt of higher priority.
    for i in 0..4 {
        ok(func::KEEL_VCPU_IRQ, [h, 0, 60 + i, 0xff], "KEEL_VCPU_IRQ")?;
    }
    ensure_eq!(
        g.op(Op::Irqs, 2000, 1, second)?,
        (27, 1),
        "the timer, with every list register holding a masked interrupt"
    );
    ok(func::KEEL_VCPU_IRQ, [h, 0, 50, 0x20], "KEEL_VCPU_IRQ")?;
    ensure_eq!(
        g.op(Op::Irqs, 0, 1, second)?,
        (50, 1),
        "a host interrupt, with every list register holding a masked one"
    );
    released()?;
    g.teardown()
}

/// CNTFRQ_EL0: counter ticks per second.
fn cntfrq() -> u64 {
    let v: u64;
    // SAFETY: reading the counter frequency has no side effects.
    unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) v, options(nomem, nostack)) };
    v
}

fn back_to_boot_state(_: &BootInfo) -> TestResult {
    // No VM of this suite is left: VM_MEM_STATE refuses every handle, and
    // the regions are the host's again.
    for i in 0..8 {
        expect(
            func::VM_MEM_STATE,
            [VM_HANDLE_BASE + i, IPA, 0, 0],
            status::INVALID_PARAMETER,
            "a handle after the suite",
        )?;
    }
    expect_host_view(PA_1G, (owner::HOST, 0, GB1), "the 1 GiB region")?;
    // Every slot a test of the suite used (slot(0) ..= slot(19)).
    for k in 0..20 {
        let (o, s, _) = host_view(slot(k))?;
        ensure!(o == owner::HOST && s == 0, "slot {} is not the host's", k);
    }
    Ok(())
}

// ---- figures for the bench suite (tests/bench.py) ----

/// `bench guest_1g_*`: what mapping a 1 GiB guest and converting one of
/// its pages costs in hypercalls and table pages. HYP_STATS 0 counts every
/// table: the host's stage 2, keel's stage 1 and each guest's;
/// KEEL_TABLE_PAGES (a keel extension) counts one stage 2's, so the
/// conversion's tables are measured per stage 2: the guest's (VM handle)
/// and the host's (0), each after MEM_SHARE less before.
pub(crate) fn bench_guest_1g_tables(_: &BootInfo) -> TestResult {
    let t0 = stat_of(stat::TABLE_PAGES)?;
    let g = Guest::create(PA_1G, IPA, GB1 / PAGE)?;
    // Guest::create made exactly one VM_DONATE for the whole GiB.
    expect_guest_view(&g, IPA + GB1 - PAGE, 0, GB1, "after one VM_DONATE")?;
    println!("bench guest_1g_map_hypercalls 1 calls");
    let mut g = g.start(1)?;
    let mapped = stat_of(stat::TABLE_PAGES)?;
    let (guest_mapped, host_mapped) = (table_pages(g.handle)?, table_pages(0)?);
    let ipa = IPA + 0x1234_5000;
    g.share(ipa, 0)?;
    let converted = stat_of(stat::TABLE_PAGES)?;
    let guest_converted = table_pages(g.handle)? as i64 - guest_mapped as i64;
    let host_converted = table_pages(0)? as i64 - host_mapped as i64;
    g.unshare(ipa, 0)?;
    let reverted = stat_of(stat::TABLE_PAGES)?;
    expect_guest_view(&g, ipa, 0, GB1, "after MEM_UNSHARE")?;
    g.share(ipa, 0)?;
    let again = stat_of(stat::TABLE_PAGES)?;
    // The root is one page (39-bit IPA, start level 1).
    let guest_root = 1;
    // VM_CREATE takes the root; a 1 GiB VM_DONATE adds the rest.
    let below_root = mapped - t0 - guest_root;
    println!("bench guest_1g_table_pages {} pages", below_root);
    println!(
        "bench guest_convert_4k_table_pages {} pages   (guest stage 2; HYP_STATS 0 grew by {}: {} in the host stage 2)",
        guest_converted,
        converted - mapped,
        host_converted
    );
    println!(
        "bench guest_convert_4k_table_pages_all {} pages",
        converted - mapped
    );
    println!(
        "bench guest_revert_table_pages_delta {} pages",
        reverted as i64 - mapped as i64
    );
    ensure_eq!(again, converted, "table pages after the second conversion");
    g.teardown()?;
    ensure_eq!(
        stat_of(stat::TABLE_PAGES)?,
        t0,
        "table pages after teardown"
    );
    Ok(())
}

/// Round trips per measurement of the null call and of the guest's pair.
const NULL_ROUNDS: u64 = 2000;
const SHARE_ROUNDS: u64 = 200;

/// `bench guest_share_unshare_4k_mticks` and `bench hvc_null_mticks`:
/// MEM_SHARE + MEM_UNSHARE of one 4K page of a 1 GiB block as the guest
/// times it (CNTVCT_EL0 around a loop of them), and the host's null call
/// (HYP_FEATURES) on the same clock; in thousandths of a tick per round.
pub(crate) fn bench_guest_share_unshare(_: &BootInfo) -> TestResult {
    let mut g = Guest::new(PA_1G, IPA, GB1 / PAGE, 2)?;
    let ipa = IPA + 0x1234_5000;
    // Warm up (the first conversion builds nothing the later ones reuse,
    // but the guest's code and keel's paths are cold).
    ensure_eq!(g.op(Op::ShareLoop, ipa, 4, 0)?.1, 0, "warm-up loop status");
    let mut per_pair = [0u64; 5];
    for v in per_pair.iter_mut() {
        let (t, s) = g.op(Op::ShareLoop, ipa, SHARE_ROUNDS, 0)?;
        ensure!(
            t != u64::MAX,
            "MEM_SHARE/UNSHARE in the loop: status {}",
            s as i64
        );
        *v = t * 1000 / SHARE_ROUNDS;
    }
    expect_guest_view(&g, ipa, 0, GB1, "after the loops")?;
    g.teardown()?;
    let mut null = [0u64; 5];
    for v in null.iter_mut() {
        let t0 = ticks();
        for _ in 0..NULL_ROUNDS {
            crate::hvc(func::HYP_FEATURES, [0; 5]);
        }
        *v = (ticks() - t0) * 1000 / NULL_ROUNDS;
    }
    per_pair.sort_unstable();
    null.sort_unstable();
    println!(
        "bench guest_share_unshare_4k_mticks {} mticks   (guest CNTVCT, per pair, median of 5 x {})",
        per_pair[2], SHARE_ROUNDS
    );
    println!(
        "bench hvc_null_mticks {} mticks   (host CNTVCT, HYP_FEATURES, median of 5 x {})",
        null[2], NULL_ROUNDS
    );
    ensure!(null[2] > 0 && per_pair[2] > 0, "a measurement took no time");
    Ok(())
}

/// `bench vm_destroy_{4k,1g}_guest`: VM_DESTROY of a VM with one 4 KiB
/// page and of one with 1 GiB (one block), on the bench clock. The guest
/// ran once (to its hello) before, so its vCPU has state too.
pub(crate) fn bench_vm_destroy(_: &BootInfo) -> TestResult {
    // Picks and starts the bench clock if no test did yet.
    crate::suites::bench::unit();
    for (name, pa, pages, rounds) in [
        ("vm_destroy_4k_guest", slot(0), 1u64, 11usize),
        ("vm_destroy_1g_guest", PA_1G, GB1 / PAGE, 3),
    ] {
        let mut v = [0u64; 11];
        for s in v.iter_mut().take(rounds) {
            let mut g = Guest::new(pa, IPA, pages, 3)?;
            let t0 = crate::suites::bench::now();
            let r = crate::hvc(func::VM_DESTROY, [g.handle, 0, 0, 0, 0]);
            let t1 = crate::suites::bench::now();
            ensure!(r.status() == 0, "VM_DESTROY: status {}", r.status());
            g.destroyed = true;
            *s = t1 - t0;
            g.teardown()?;
        }
        let v = &mut v[..rounds];
        v.sort_unstable();
        println!(
            "bench {} {} {}   (median of {}, includes reading the clock)",
            name,
            v[rounds / 2],
            crate::suites::bench::unit(),
            rounds
        );
    }
    Ok(())
}
