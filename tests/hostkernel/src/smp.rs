//! Secondary CPUs: started with PSCI CPU_ON at [`entry`], each on its own
//! stack and with the boot CPU's stage 1, reporting in when it arrives
//! ([`Arrival`]) and then running the jobs the boot CPU posts ([`run_on`]).
//!
//! Slot 0 is the boot CPU; slots 1.. are the other CPUs of the device
//! tree's /cpus, in its order. A CPU finds its slot at entry by looking its
//! MPIDR up in [`HANDOFF`], so any context id can be tested.
//!
//! The entry code runs with the MMU off, where data accesses are Device
//! memory and bypass the caches: what it reads before turning the MMU on
//! (the handoff block) is cleaned to the point of coherency by the boot CPU.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::dt::BootInfo;
use crate::harness::Failure;

pub const MAX_CPUS: usize = 8;
const STACK_SIZE: usize = 32 * 1024;
/// MPIDR_EL1 affinity fields Aff3, Aff2, Aff1, Aff0 (what PSCI calls take).
pub const MPIDR_AFFINITY: u64 = 0xff_00ff_ffff;
/// A free slot in the handoff table: no CPU has this affinity.
const NO_CPU: u64 = u64::MAX;

/// PSCI function IDs and return codes (Arm DEN 0022).
pub mod psci {
    pub const VERSION: u64 = 0x8400_0000;
    pub const CPU_OFF: u64 = 0x8400_0002;
    pub const CPU_ON: u64 = 0xC400_0003;
    pub const AFFINITY_INFO: u64 = 0xC400_0004;
    pub const FEATURES: u64 = 0x8400_000A;
    pub const SYSTEM_SUSPEND: u64 = 0xC400_000E;

    pub const SUCCESS: i64 = 0;
    pub const NOT_SUPPORTED: i64 = -1;
    pub const INVALID_PARAMETERS: i64 = -2;
    pub const ALREADY_ON: i64 = -4;

    /// AFFINITY_INFO answers.
    pub const AFF_ON: i64 = 0;
    pub const AFF_OFF: i64 = 1;
}

/// What the secondary entry reads: the boot CPU's translation regime and
/// the affinity of every slot. Offsets are used by the asm below.
#[repr(C, align(64))]
struct Handoff {
    mair: u64,
    tcr: u64,
    ttbr0: u64,
    sctlr: u64,
    mpidrs: [u64; MAX_CPUS],
}

struct HandoffCell(UnsafeCell<Handoff>);

// SAFETY: written only by the boot CPU in `init`, before any CPU_ON; the
// secondaries only read it, after the CPU_ON that orders those writes.
unsafe impl Sync for HandoffCell {}

static HANDOFF: HandoffCell = HandoffCell(UnsafeCell::new(Handoff {
    mair: 0,
    tcr: 0,
    ttbr0: 0,
    sctlr: 0,
    mpidrs: [NO_CPU; MAX_CPUS],
}));

#[repr(C, align(16))]
struct Stacks(UnsafeCell<[[u8; STACK_SIZE]; MAX_CPUS]>);

// SAFETY: slot i's stack is used only by the CPU in slot i (the entry code
// derives it from the CPU's own MPIDR); Rust never touches it otherwise.
unsafe impl Sync for Stacks {}

static STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK_SIZE]; MAX_CPUS]));

core::arch::global_asm!(
    r#"
.section .text.smp_entry, "ax"
.balign 4
/* PSCI CPU_ON entry: EL1h, MMU off, x0 = context id. */
.global smp_secondary_entry
smp_secondary_entry:
    mov     x9, #0
    b       1f
/* The same with x9 = 1, to tell which entry point a CPU_ON used. */
.global smp_secondary_entry_alt
smp_secondary_entry_alt:
    mov     x9, #1
1:  msr     daifset, #0xf
    mov     x19, x0
    mov     x20, x9
    mrs     x21, CurrentEL
    mrs     x22, sctlr_el1
    mrs     x23, mpidr_el1
    mrs     x24, spsel
    mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    adrp    x1, vectors
    add     x1, x1, :lo12:vectors
    msr     vbar_el1, x1

    adrp    x1, {handoff}
    add     x1, x1, :lo12:{handoff}
    ldr     x2, [x1, #{mair}]
    msr     mair_el1, x2
    ldr     x2, [x1, #{tcr}]
    msr     tcr_el1, x2
    ldr     x2, [x1, #{ttbr0}]
    msr     ttbr0_el1, x2
    isb
    tlbi    vmalle1
    ic      iallu
    dsb     nsh
    isb
    ldr     x2, [x1, #{sctlr}]
    msr     sctlr_el1, x2
    isb

    /* Our slot: the index of our affinity in the handoff table. */
    mov     x2, #0xffffff
    movk    x2, #0xff, lsl #32
    and     x2, x23, x2
    add     x3, x1, #{mpidrs}
    mov     x4, #0
2:  cmp     x4, #{max_cpus}
    b.hs    4f
    ldr     x5, [x3, x4, lsl #3]
    cmp     x5, x2
    b.eq    3f
    add     x4, x4, #1
    b       2b
3:  adrp    x5, {stacks}
    add     x5, x5, :lo12:{stacks}
    add     x6, x4, #1
    mov     x7, #{stack_size}
    madd    x5, x6, x7, x5
    mov     sp, x5
    mov     x0, x4
    mov     x1, x19
    mov     x2, x20
    mov     x3, x21
    mov     x4, x22
    mov     x5, x23
    mov     x6, x24
    bl      {main}
    /* Not in the table: nothing to report to; park. */
4:  wfe
    b       4b
"#,
    handoff = sym HANDOFF,
    stacks = sym STACKS,
    main = sym secondary_main,
    mair = const core::mem::offset_of!(Handoff, mair),
    tcr = const core::mem::offset_of!(Handoff, tcr),
    ttbr0 = const core::mem::offset_of!(Handoff, ttbr0),
    sctlr = const core::mem::offset_of!(Handoff, sctlr),
    mpidrs = const core::mem::offset_of!(Handoff, mpidrs),
    max_cpus = const MAX_CPUS,
    stack_size = const STACK_SIZE,
);

extern "C" {
    fn smp_secondary_entry();
    fn smp_secondary_entry_alt();
}

/// The physical address (= virtual: the map is the identity) of the entry
/// point; `alt` picks the second one, which reports `entry == 1`.
pub fn entry(alt: bool) -> u64 {
    if alt {
        smp_secondary_entry_alt as *const () as u64
    } else {
        smp_secondary_entry as *const () as u64
    }
}

/// What a CPU saw when it arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// x0 at entry: the context id of the CPU_ON.
    pub context: u64,
    /// 0: [`entry`]`(false)`, 1: [`entry`]`(true)`.
    pub entry: u64,
    /// CurrentEL.EL.
    pub el: u64,
    /// SCTLR_EL1 at entry (before the kernel set it).
    pub sctlr: u64,
    /// MPIDR_EL1, whole.
    pub mpidr: u64,
    pub spsel: u64,
}

/// Per-CPU state the boot CPU reads: arrivals and the job mailbox.
struct Cpu {
    /// How many times the CPU has entered; the fields below are those of
    /// the last entry (written before the count, Release).
    arrivals: AtomicU64,
    report: [AtomicU64; 6],
    /// The job to run (a `fn(usize)`), posted by bumping `posted`.
    job: AtomicUsize,
    posted: AtomicU64,
    done: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const CPU_INIT: Cpu = Cpu {
    arrivals: AtomicU64::new(0),
    report: [const { AtomicU64::new(0) }; 6],
    job: AtomicUsize::new(0),
    posted: AtomicU64::new(0),
    done: AtomicU64::new(0),
};

static CPUS: [Cpu; MAX_CPUS] = [CPU_INIT; MAX_CPUS];
static NR_CPUS: AtomicUsize = AtomicUsize::new(1);
static USE_HVC: AtomicUsize = AtomicUsize::new(0);

/// A secondary's Rust entry: MMU on, own stack. Reports, then runs jobs.
extern "C" fn secondary_main(
    slot: usize,
    context: u64,
    entry: u64,
    current_el: u64,
    sctlr: u64,
    mpidr: u64,
    spsel: u64,
) -> ! {
    let cpu = &CPUS[slot];
    let seen = [context, entry, (current_el >> 2) & 3, sctlr, mpidr, spsel];
    for (r, v) in cpu.report.iter().zip(seen) {
        r.store(v, Ordering::Relaxed);
    }
    // A CPU that comes back after CPU_OFF must not rerun an old job.
    cpu.done
        .store(cpu.posted.load(Ordering::Acquire), Ordering::Release);
    cpu.arrivals.fetch_add(1, Ordering::Release);
    sev();
    loop {
        let posted = cpu.posted.load(Ordering::Acquire);
        if posted == cpu.done.load(Ordering::Relaxed) {
            wfe();
            continue;
        }
        let job = cpu.job.load(Ordering::Relaxed);
        // SAFETY: `post` stores only `fn(usize)` pointers, before `posted`.
        let job: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(job) };
        job(slot);
        cpu.done.store(posted, Ordering::Release);
        sev();
    }
}

fn sev() {
    // SAFETY: a barrier and an event; no memory is accessed.
    unsafe { core::arch::asm!("dsb ish", "sev", options(nostack)) };
}

fn wfe() {
    // SAFETY: waits for an event (or returns early); nothing else.
    unsafe { core::arch::asm!("wfe", options(nomem, nostack)) };
}

fn read_sysreg_mpidr() -> u64 {
    let v;
    // SAFETY: reading an ID register has no side effects.
    unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack)) };
    v
}

/// This CPU's affinity.
pub fn my_mpidr() -> u64 {
    read_sysreg_mpidr() & MPIDR_AFFINITY
}

/// Reads /cpus and /psci, and fills the handoff block from this (the boot)
/// CPU's stage 1. Call once, before any CPU_ON.
pub fn init(boot: &BootInfo) -> Result<usize, Failure> {
    let cpus = boot
        .fdt
        .find_node("/cpus")
        .ok_or_else(|| Failure::new(format_args!("no /cpus")))?;
    let me = my_mpidr();
    let mut list = [NO_CPU; MAX_CPUS];
    list[0] = me;
    let mut n = 1;
    let mut found_me = false;
    for node in cpus.children() {
        let is_cpu = node.name == "cpu" || node.name.starts_with("cpu@");
        if !is_cpu {
            continue;
        }
        let reg = node
            .property("reg")
            .ok_or_else(|| Failure::new(format_args!("{} has no reg", node.name)))?;
        let mpidr = match reg.value.len() {
            4 => u64::from(u32::from_be_bytes(reg.value.try_into().unwrap())),
            8 => u64::from_be_bytes(reg.value.try_into().unwrap()),
            l => {
                return Err(Failure::new(format_args!(
                    "{}: reg of {l} bytes",
                    node.name
                )))
            }
        };
        let method = node.property("enable-method").and_then(|p| p.as_str());
        if method != Some("psci") {
            return Err(Failure::new(format_args!(
                "{}: enable-method {:?}, not psci",
                node.name, method
            )));
        }
        if mpidr & MPIDR_AFFINITY == me {
            found_me = true;
        } else if n < MAX_CPUS {
            list[n] = mpidr & MPIDR_AFFINITY;
            n += 1;
        }
    }
    if !found_me {
        return Err(Failure::new(format_args!(
            "the boot CPU's MPIDR {me:#x} is not in /cpus"
        )));
    }
    let hvc = boot
        .fdt
        .find_node("/psci")
        .and_then(|n| n.property("method"))
        .and_then(|p| p.as_str())
        == Some("hvc");
    USE_HVC.store(hvc as usize, Ordering::Relaxed);

    let h = HANDOFF.0.get();
    // SAFETY: no secondary runs yet (they start only through `cpu_on`), so
    // the boot CPU is the only one touching the block.
    unsafe {
        core::arch::asm!(
            "mrs {mair}, mair_el1",
            "mrs {tcr}, tcr_el1",
            "mrs {ttbr}, ttbr0_el1",
            "mrs {sctlr}, sctlr_el1",
            mair = out(reg)(*h).mair,
            tcr = out(reg)(*h).tcr,
            ttbr = out(reg)(*h).ttbr0,
            sctlr = out(reg)(*h).sctlr,
            options(nomem, nostack),
        );
        (*h).mpidrs = list;
        clean_to_poc(h as u64, core::mem::size_of::<Handoff>() as u64);
    }
    NR_CPUS.store(n, Ordering::Release);
    Ok(n)
}

/// Cleans the data cache lines of [addr, addr + len) to the point of
/// coherency, so a CPU with its MMU (and so its caches) off reads them.
fn clean_to_poc(addr: u64, len: u64) {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    let line = 4u64 << ((ctr >> 16) & 0xf);
    let mut a = addr & !(line - 1);
    while a < addr + len {
        // SAFETY: cache maintenance by VA of memory we own; no data changes.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack)) };
        a += line;
    }
    // SAFETY: a barrier only.
    unsafe { core::arch::asm!("dsb sy", options(nostack)) };
}

/// CPUs known from the device tree (after [`init`]), boot CPU included.
pub fn count() -> usize {
    NR_CPUS.load(Ordering::Acquire)
}

/// The affinity of slot `i` (slot 0: the boot CPU).
pub fn mpidr(slot: usize) -> u64 {
    // SAFETY: written only by `init`, before this can be called for a slot.
    unsafe { (*HANDOFF.0.get()).mpidrs[slot] }
}

/// A PSCI call through the device tree's conduit (SMC under keel). x0..x3.
pub fn psci_call(fid: u64, a1: u64, a2: u64, a3: u64) -> i64 {
    let r0: u64;
    if USE_HVC.load(Ordering::Relaxed) != 0 {
        // SAFETY: an SMCCC call: may clobber x0..x17, touches none of our
        // memory (CPU_OFF does not return, which is fine for the caller).
        unsafe {
            core::arch::asm!("hvc #0", inout("x0") fid => r0, inout("x1") a1 => _,
                inout("x2") a2 => _, inout("x3") a3 => _, clobber_abi("C"), options(nostack));
        }
    } else {
        // SAFETY: as above, through SMC.
        unsafe {
            core::arch::asm!("smc #0", inout("x0") fid => r0, inout("x1") a1 => _,
                inout("x2") a2 => _, inout("x3") a3 => _, clobber_abi("C"), options(nostack));
        }
    }
    r0 as i64
}

/// PSCI CPU_ON of `mpidr` at `entry` with `context` in x0.
pub fn cpu_on(mpidr: u64, entry: u64, context: u64) -> i64 {
    psci_call(psci::CPU_ON, mpidr, entry, context)
}

pub fn affinity_info(mpidr: u64) -> i64 {
    psci_call(psci::AFFINITY_INFO, mpidr, 0, 0)
}

/// How many times slot `i` has arrived, and its last report.
pub fn arrivals(slot: usize) -> u64 {
    CPUS[slot].arrivals.load(Ordering::Acquire)
}

pub fn arrival(slot: usize) -> Arrival {
    let cpu = &CPUS[slot];
    cpu.arrivals.load(Ordering::Acquire);
    let r = |i: usize| cpu.report[i].load(Ordering::Relaxed);
    Arrival {
        context: r(0),
        entry: r(1),
        el: r(2),
        sctlr: r(3),
        mpidr: r(4),
        spsel: r(5),
    }
}

/// The virtual counter, and its frequency.
pub fn now() -> u64 {
    let v;
    // SAFETY: reading the virtual counter has no side effects; the ISBs keep
    // the read in program order with the code around it.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", "isb", out(reg) v, options(nostack)) };
    v
}

fn ticks_per_ms() -> u64 {
    let f: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects.
    unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) f, options(nomem, nostack)) };
    (f / 1000).max(1)
}

/// Polls `cond` until it holds or `ms` milliseconds of virtual time pass.
pub fn wait_until(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = now() + ms * ticks_per_ms();
    loop {
        if cond() {
            return true;
        }
        if now() > deadline {
            return cond();
        }
        core::hint::spin_loop();
    }
}

/// Waits until slot `i` has arrived more than `before` times.
pub fn wait_arrival(slot: usize, before: u64, ms: u64) -> Option<Arrival> {
    wait_until(ms, || arrivals(slot) > before).then(|| arrival(slot))
}

/// Posts `job` to the running secondary in `slot`.
pub fn post(slot: usize, job: fn(usize)) {
    let cpu = &CPUS[slot];
    cpu.job.store(job as usize, Ordering::Relaxed);
    cpu.posted.fetch_add(1, Ordering::Release);
    sev();
}

/// Whether slot `i` has finished every job posted to it.
pub fn idle(slot: usize) -> bool {
    let cpu = &CPUS[slot];
    cpu.done.load(Ordering::Acquire) == cpu.posted.load(Ordering::Relaxed)
}

/// Runs `job(slot)` on every CPU at once (this one as slot 0) and waits up
/// to `ms` for the others: Err(slots that did not finish, as a bitmap).
pub fn run_on_all(job: fn(usize), ms: u64) -> Result<(), u64> {
    let n = count();
    for slot in 1..n {
        post(slot, job);
    }
    job(0);
    let all_done = || (1..n).all(idle);
    if wait_until(ms, all_done) {
        Ok(())
    } else {
        Err((1..n).filter(|&s| !idle(s)).fold(0, |m, s| m | 1 << s))
    }
}
