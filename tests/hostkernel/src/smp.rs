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
//!
//! [`cpu_suspend`] makes a PSCI CPU_SUSPEND and checks that the registers
//! and stack survive it; if the CPU powers down instead of returning, it
//! comes back at `smp_resume_entry` and out of [`cpu_suspend`] all the same.
//! [`gic_init`], [`gic_cpu_init`] and [`send_wake_sgi`] set up just enough
//! of the GICv3 for one CPU to wake another from the WFI of a suspend.

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
    pub const CPU_SUSPEND: u64 = 0xC400_0001;
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
    bl      smp_el1_setup
    cmp     x4, #{max_cpus}
    b.hs    smp_park
    adrp    x5, {stacks}
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
smp_park:
    wfe
    b       smp_park

/* With x23 = MPIDR_EL1: FP on, our vectors, the boot CPU's stage 1 and
 * MMU on. Returns x4 = this CPU's slot ({max_cpus}: not in the table).
 * Clobbers x1..x8. */
smp_el1_setup:
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
    b.hs    3f
    ldr     x5, [x3, x4, lsl #3]
    cmp     x5, x2
    b.eq    3f
    add     x4, x4, #1
    b       2b
3:  ret

/* smp_pat REG, N: REG = the recognizable value 0x6b65656c5eed00NN. */
.macro smp_pat reg, n
    movz    \reg, #0x6b65, lsl #48
    movk    \reg, #0x656c, lsl #32
    movk    \reg, #0x5eed, lsl #16
    movk    \reg, #\n
.endm

/* smp_differs REG, N, BIT: x1 |= (REG != pattern N) << BIT. Uses x2, x3. */
.macro smp_differs reg, n, bit
    smp_pat x2, \n
    cmp     \reg, x2
    cset    x3, ne
    orr     x1, x1, x3, lsl #\bit
.endm

/* u64 smp_suspend(fid, power_state, entry, context, save, hvc): PSCI
 * CPU_SUSPEND (through HVC if hvc != 0) with recognizable values in x18..x30,
 * d8..d15, SP_EL0 and two words on the stack. If the call returns, the
 * status and which of them changed go to the save area and the result is 1.
 * If the CPU resumes at smp_resume_entry instead, that restores what was
 * saved here and returns 2. Either way the caller's registers are back. */
.global smp_suspend
smp_suspend:
    stp     x19, x20, [x4, #{regs}]
    stp     x21, x22, [x4, #{regs} + 16]
    stp     x23, x24, [x4, #{regs} + 32]
    stp     x25, x26, [x4, #{regs} + 48]
    stp     x27, x28, [x4, #{regs} + 64]
    stp     x29, x30, [x4, #{regs} + 80]
    stp     d8, d9, [x4, #{fpregs}]
    stp     d10, d11, [x4, #{fpregs} + 16]
    stp     d12, d13, [x4, #{fpregs} + 32]
    stp     d14, d15, [x4, #{fpregs} + 48]
    mov     x6, sp
    str     x6, [x4, #{sp}]
    mrs     x6, sp_el0
    str     x6, [x4, #{sp_el0}]
    mrs     x6, tpidr_el1
    str     x6, [x4, #{tpidr}]
    str     x18, [x4, #{x18}]
    /* The save area, where the call cannot take it: it must keep TPIDR_EL1. */
    msr     tpidr_el1, x4
    sub     sp, sp, #16
    smp_pat x6, 0x50
    smp_pat x7, 0x51
    stp     x6, x7, [sp]
    smp_pat x6, 0x40
    msr     sp_el0, x6
    smp_pat x6, 0x48
    fmov    d8, x6
    smp_pat x6, 0x49
    fmov    d9, x6
    smp_pat x6, 0x4a
    fmov    d10, x6
    smp_pat x6, 0x4b
    fmov    d11, x6
    smp_pat x6, 0x4c
    fmov    d12, x6
    smp_pat x6, 0x4d
    fmov    d13, x6
    smp_pat x6, 0x4e
    fmov    d14, x6
    smp_pat x6, 0x4f
    fmov    d15, x6
    smp_pat x18, 18
    smp_pat x19, 19
    smp_pat x20, 20
    smp_pat x21, 21
    smp_pat x22, 22
    smp_pat x23, 23
    smp_pat x24, 24
    smp_pat x25, 25
    smp_pat x26, 26
    smp_pat x27, 27
    smp_pat x28, 28
    smp_pat x29, 29
    smp_pat x30, 30
    cbnz    x5, 1f
    smc     #0
    b       2f
1:  hvc     #0
2:  mov     x1, #0
    smp_differs x18, 18, 18
    smp_differs x19, 19, 19
    smp_differs x20, 20, 20
    smp_differs x21, 21, 21
    smp_differs x22, 22, 22
    smp_differs x23, 23, 23
    smp_differs x24, 24, 24
    smp_differs x25, 25, 25
    smp_differs x26, 26, 26
    smp_differs x27, 27, 27
    smp_differs x28, 28, 28
    smp_differs x29, 29, 29
    smp_differs x30, 30, 30
    mrs     x4, sp_el0
    smp_differs x4, 0x40, {bit_sp_el0}
    fmov    x4, d8
    smp_differs x4, 0x48, {bit_d8}
    fmov    x4, d9
    smp_differs x4, 0x49, {bit_d8}+1
    fmov    x4, d10
    smp_differs x4, 0x4a, {bit_d8}+2
    fmov    x4, d11
    smp_differs x4, 0x4b, {bit_d8}+3
    fmov    x4, d12
    smp_differs x4, 0x4c, {bit_d8}+4
    fmov    x4, d13
    smp_differs x4, 0x4d, {bit_d8}+5
    fmov    x4, d14
    smp_differs x4, 0x4e, {bit_d8}+6
    fmov    x4, d15
    smp_differs x4, 0x4f, {bit_d8}+7
    mrs     x4, tpidr_el1
    /* SP, and the words at where it should be (read there, not at SP). */
    ldr     x5, [x4, #{sp}]
    sub     x5, x5, #16
    mov     x6, sp
    cmp     x5, x6
    cset    x3, ne
    orr     x1, x1, x3, lsl #{bit_sp}
    ldp     x6, x7, [x5]
    smp_differs x6, 0x50, {bit_stack}
    smp_differs x7, 0x51, {bit_stack}
    str     x0, [x4, #{status}]
    str     x1, [x4, #{changed}]
    mov     x0, #1

/* x4 = the save area, x0 = what smp_suspend returns: back to its caller. */
smp_suspend_restore:
    str     x0, [x4, #{how}]
    ldp     x19, x20, [x4, #{regs}]
    ldp     x21, x22, [x4, #{regs} + 16]
    ldp     x23, x24, [x4, #{regs} + 32]
    ldp     x25, x26, [x4, #{regs} + 48]
    ldp     x27, x28, [x4, #{regs} + 64]
    ldp     x29, x30, [x4, #{regs} + 80]
    ldp     d8, d9, [x4, #{fpregs}]
    ldp     d10, d11, [x4, #{fpregs} + 16]
    ldp     d12, d13, [x4, #{fpregs} + 32]
    ldp     d14, d15, [x4, #{fpregs} + 48]
    ldr     x6, [x4, #{sp}]
    mov     sp, x6
    ldr     x6, [x4, #{sp_el0}]
    msr     sp_el0, x6
    ldr     x6, [x4, #{tpidr}]
    msr     tpidr_el1, x6
    ldr     x18, [x4, #{x18}]
    ret

/* Where a CPU_SUSPEND of smp_suspend resumes if the CPU did power down:
 * EL1h, MMU off, x0 = context id. Reports like the CPU_ON entry, into the
 * save area of its slot, then returns from smp_suspend with 2. */
.global smp_resume_entry
smp_resume_entry:
    msr     daifset, #0xf
    mov     x19, x0
    mrs     x21, CurrentEL
    mrs     x22, sctlr_el1
    mrs     x23, mpidr_el1
    mrs     x24, spsel
    bl      smp_el1_setup
    cmp     x4, #{max_cpus}
    b.hs    smp_park
    adrp    x5, {saves}
    add     x5, x5, :lo12:{saves}
    mov     x6, #{save_size}
    madd    x4, x4, x6, x5
    str     x19, [x4, #{r_x0}]
    str     x21, [x4, #{r_el}]
    str     x22, [x4, #{r_sctlr}]
    str     x23, [x4, #{r_mpidr}]
    str     x24, [x4, #{r_spsel}]
    mov     x0, #2
    b       smp_suspend_restore
"#,
    handoff = sym HANDOFF,
    stacks = sym STACKS,
    saves = sym SAVES,
    main = sym secondary_main,
    mair = const core::mem::offset_of!(Handoff, mair),
    tcr = const core::mem::offset_of!(Handoff, tcr),
    ttbr0 = const core::mem::offset_of!(Handoff, ttbr0),
    sctlr = const core::mem::offset_of!(Handoff, sctlr),
    mpidrs = const core::mem::offset_of!(Handoff, mpidrs),
    max_cpus = const MAX_CPUS,
    stack_size = const STACK_SIZE,
    regs = const core::mem::offset_of!(SuspendSave, regs),
    fpregs = const core::mem::offset_of!(SuspendSave, fpregs),
    sp = const core::mem::offset_of!(SuspendSave, sp),
    sp_el0 = const core::mem::offset_of!(SuspendSave, sp_el0),
    tpidr = const core::mem::offset_of!(SuspendSave, tpidr),
    x18 = const core::mem::offset_of!(SuspendSave, x18),
    how = const core::mem::offset_of!(SuspendSave, how),
    status = const core::mem::offset_of!(SuspendSave, status),
    changed = const core::mem::offset_of!(SuspendSave, changed),
    r_x0 = const core::mem::offset_of!(SuspendSave, resume_x0),
    r_el = const core::mem::offset_of!(SuspendSave, resume_el),
    r_sctlr = const core::mem::offset_of!(SuspendSave, resume_sctlr),
    r_mpidr = const core::mem::offset_of!(SuspendSave, resume_mpidr),
    r_spsel = const core::mem::offset_of!(SuspendSave, resume_spsel),
    save_size = const core::mem::size_of::<SuspendSave>(),
    bit_sp_el0 = const changed::SP_EL0,
    bit_d8 = const changed::D8,
    bit_sp = const changed::SP,
    bit_stack = const changed::STACK,
);

extern "C" {
    fn smp_secondary_entry();
    fn smp_secondary_entry_alt();
}

/// What [`cpu_suspend`] saves before the call and reports after it, one
/// per slot. Offsets are used by the asm above.
#[repr(C, align(64))]
struct SuspendSave {
    /// x19..x30 of the caller.
    regs: [u64; 12],
    /// d8..d15 of the caller.
    fpregs: [u64; 8],
    sp: u64,
    sp_el0: u64,
    tpidr: u64,
    x18: u64,
    /// 1: the call returned; 2: the CPU resumed at `smp_resume_entry`.
    how: u64,
    /// x0 after the call, and which registers it changed (see [`changed`]).
    status: u64,
    changed: u64,
    /// What the CPU saw at `smp_resume_entry` (x0, CurrentEL, SCTLR_EL1,
    /// MPIDR_EL1, SPSel).
    resume_x0: u64,
    resume_el: u64,
    resume_sctlr: u64,
    resume_mpidr: u64,
    resume_spsel: u64,
}

struct Saves(UnsafeCell<[SuspendSave; MAX_CPUS]>);

// SAFETY: slot i's area is used only by the CPU in slot i, in
// `cpu_suspend` (the resume entry finds it by the CPU's own MPIDR).
unsafe impl Sync for Saves {}

#[allow(clippy::declare_interior_mutable_const)]
const SAVE_INIT: SuspendSave = SuspendSave {
    regs: [0; 12],
    fpregs: [0; 8],
    sp: 0,
    sp_el0: 0,
    tpidr: 0,
    x18: 0,
    how: 0,
    status: 0,
    changed: 0,
    resume_x0: 0,
    resume_el: 0,
    resume_sctlr: 0,
    resume_mpidr: 0,
    resume_spsel: 0,
};

static SAVES: Saves = Saves(UnsafeCell::new([SAVE_INIT; MAX_CPUS]));

/// The bits of [`Suspended::Returned`]'s `changed`: bit n for xn (18..30),
/// and these.
pub mod changed {
    pub const SP_EL0: u32 = 31;
    pub const SP: u32 = 32;
    /// The two words the caller left on its stack.
    pub const STACK: u32 = 33;
    /// d8..d15: bits 40..47.
    pub const D8: u32 = 40;
}

extern "C" {
    fn smp_suspend(
        fid: u64,
        power_state: u64,
        entry: u64,
        context: u64,
        save: *mut SuspendSave,
        hvc: u64,
    ) -> u64;
    fn smp_resume_entry();
}

/// The entry point [`cpu_suspend`] gives CPU_SUSPEND.
pub fn resume_entry() -> u64 {
    smp_resume_entry as *const () as u64
}

/// How a CPU_SUSPEND ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suspended {
    /// The call returned x0 = `status`; `changed` has a bit for each checked
    /// register or stack word it did not preserve ([`changed`]).
    Returned { status: i64, changed: u64 },
    /// The CPU powered down and came back at [`resume_entry`], seeing this
    /// there (`entry` unused).
    Resumed(Arrival),
}

/// PSCI CPU_SUSPEND(`power_state`, [`resume_entry`], `context`) on this
/// CPU, which must be the one in `slot`. Returns when the call does, or
/// when the CPU resumes at the entry point: in both cases with the caller's
/// registers and stack as they were.
pub fn cpu_suspend(slot: usize, power_state: u64, context: u64) -> Suspended {
    assert_eq!(my_mpidr(), mpidr(slot), "cpu_suspend on another CPU's slot");
    let hvc = USE_HVC.load(Ordering::Relaxed) as u64;
    // SAFETY: only this CPU uses its slot's save area (`Saves`).
    let save = unsafe { core::ptr::addr_of_mut!((*SAVES.0.get())[slot]) };
    // SAFETY: smp_suspend returns to us with every callee-saved register,
    // SP_EL0 and TPIDR_EL1 as they were, on either path, and writes only
    // `save` and its own 16 bytes below our SP.
    let how = unsafe {
        smp_suspend(
            psci::CPU_SUSPEND,
            power_state,
            resume_entry(),
            context,
            save,
            hvc,
        )
    };
    // SAFETY: as above; smp_suspend has finished with it.
    let s = unsafe { core::ptr::read_volatile(save) };
    if how == 1 {
        Suspended::Returned {
            status: s.status as i64,
            changed: s.changed,
        }
    } else {
        Suspended::Resumed(Arrival {
            context: s.resume_x0,
            entry: 0,
            el: (s.resume_el >> 2) & 3,
            sctlr: s.resume_sctlr,
            mpidr: s.resume_mpidr,
            spsel: s.resume_spsel,
        })
    }
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

// ---------------------------------------------------------------------
// GICv3, enough for one CPU to wake another from WFI with an SGI.

/// The SGI that wakes a suspended CPU.
pub const WAKE_SGI: u64 = 8;

const GICD_CTLR: u64 = 0x0;
const GICD_CTLR_RWP: u32 = 1 << 31;
/// EnableGrp1 (EnableGrp1NS in the non-secure view of a GIC with two
/// security states), EnableGrp1A there, ARE (ARE_NS there).
const GICD_CTLR_ENABLE: u32 = 1 | 1 << 1 | 1 << 4;
const GICR_FRAME: u64 = 0x2_0000;
const GICR_CTLR: u64 = 0x0;
const GICR_CTLR_RWP: u32 = 1 << 3;
const GICR_TYPER: u64 = 0x8;
const GICR_TYPER_VLPIS: u64 = 1 << 1;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_WAKER: u64 = 0x14;
const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
const SGI_BASE: u64 = 0x1_0000;
const GICR_IGROUPR0: u64 = SGI_BASE + 0x80;
const GICR_ISENABLER0: u64 = SGI_BASE + 0x100;
const GICR_IPRIORITYR: u64 = SGI_BASE + 0x400;

/// Each slot's redistributor (RD frame), from [`gic_init`].
static GICR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: a GIC register the device tree lists, mapped Device by the
    // kernel's stage 1 (below 1 GiB); reads of these have no side effects.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as above; callers write only the SGI configuration.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn wait_clear(addr: u64, bits: u32, what: &str) -> Result<(), Failure> {
    if wait_until(100, || mmio_read32(addr) & bits == 0) {
        Ok(())
    } else {
        Err(Failure::new(format_args!(
            "GIC: {what} ({addr:#x} = {:#x}) stays set",
            mmio_read32(addr)
        )))
    }
}

/// Finds the GICv3 in the device tree, passes each redistributor frame
/// to `found` with its CPU's affinity, and enables the distributor's group
/// 1 with affinity routing.
fn gic_enable(boot: &BootInfo, mut found: impl FnMut(u64, u64)) -> Result<(), Failure> {
    let node = boot
        .fdt
        .find_compatible(&["arm,gic-v3"])
        .ok_or_else(|| Failure::new(format_args!("no arm,gic-v3 node")))?;
    let mut reg = node
        .reg()
        .ok_or_else(|| Failure::new(format_args!("{} has no reg", node.name)))?;
    let (Some(gicd), Some(gicr)) = (reg.next(), reg.next()) else {
        return Err(Failure::new(format_args!("{}: reg too short", node.name)));
    };
    let gicd = gicd.starting_address as u64;
    let (start, size) = (gicr.starting_address as u64, gicr.size.unwrap_or(0) as u64);
    let mut frame = start;
    while frame + GICR_FRAME <= start + size {
        // SAFETY: a redistributor frame of the device tree; GICR_TYPER is a
        // read-only identification register.
        let typer = unsafe { core::ptr::read_volatile((frame + GICR_TYPER) as *const u64) };
        let aff = typer >> 32;
        found((aff & 0xff_ffff) | (aff >> 24) << 32, frame);
        if typer & GICR_TYPER_LAST != 0 {
            break;
        }
        frame += if typer & GICR_TYPER_VLPIS != 0 {
            2 * GICR_FRAME
        } else {
            GICR_FRAME
        };
    }
    let ctlr = mmio_read32(gicd + GICD_CTLR);
    mmio_write32(gicd + GICD_CTLR, ctlr | GICD_CTLR_ENABLE);
    wait_clear(gicd + GICD_CTLR, GICD_CTLR_RWP, "GICD_CTLR.RWP")
}

/// Wakes the redistributor at `rd` (GICR_WAKER).
fn gicr_wake(rd: u64) -> Result<(), Failure> {
    let waker = mmio_read32(rd + GICR_WAKER);
    mmio_write32(rd + GICR_WAKER, waker & !GICR_WAKER_PROCESSOR_SLEEP);
    wait_clear(
        rd + GICR_WAKER,
        GICR_WAKER_CHILDREN_ASLEEP,
        "GICR_WAKER.ChildrenAsleep",
    )
}

/// Finds the GICv3 distributor and every slot's redistributor in the
/// device tree, enables group 1 with affinity routing and [`WAKE_SGI`]
/// (group 1, priority 0x80) in every redistributor, and wakes them. Each
/// CPU must then run [`gic_cpu_init`]. After [`init`].
pub fn gic_init(boot: &BootInfo) -> Result<(), Failure> {
    gic_enable(boot, |affinity, frame| {
        if let Some(slot) = (0..count()).find(|&s| mpidr(s) == affinity) {
            GICR[slot].store(frame, Ordering::Relaxed);
        }
    })?;
    let bit = 1u32 << WAKE_SGI;
    for (slot, rd) in GICR.iter().enumerate().take(count()) {
        let rd = rd.load(Ordering::Relaxed);
        if rd == 0 {
            return Err(Failure::new(format_args!(
                "no GIC redistributor for CPU {:#x}",
                mpidr(slot)
            )));
        }
        gicr_wake(rd)?;
        let group = mmio_read32(rd + GICR_IGROUPR0);
        mmio_write32(rd + GICR_IGROUPR0, group | bit);
        // SAFETY: the byte of WAKE_SGI in GICR_IPRIORITYR (byte-accessible).
        unsafe { core::ptr::write_volatile((rd + GICR_IPRIORITYR + WAKE_SGI) as *mut u8, 0x80) };
        mmio_write32(rd + GICR_ISENABLER0, bit);
        wait_clear(rd + GICR_CTLR, GICR_CTLR_RWP, "GICR_CTLR.RWP")?;
    }
    Ok(())
}

/// The EL1 virtual timer's interrupt (PPI 27).
pub const VTIMER_PPI: u64 = 27;
/// This CPU's redistributor, from [`host_gic_init`].
static HOST_GICR: AtomicU64 = AtomicU64::new(0);

/// Sets up this (the boot) CPU's side of the GIC as Linux sets it up for
/// itself: [`gic_init`], then every SGI and PPI group 1 at priority 0xa0
/// ([`WAKE_SGI`] keeps 0x80) in this CPU's redistributor, PPI 27 (the
/// virtual timer's) enabled, and [`gic_cpu_init`]. keel's own PPIs during
/// guest runs (the maintenance interrupt, its EL2 timer) rely on this
/// configuration, as they rely on Linux's. IRQs stay masked in PSTATE, so
/// the kernel itself is never interrupted; an interrupt while a guest runs
/// ends the run (keel routes physical IRQs to EL2 during runs).
pub fn host_gic_init(boot: &BootInfo) -> Result<(), Failure> {
    let me = my_mpidr();
    let mut mine = 0;
    gic_enable(boot, |affinity, frame| {
        if affinity == me {
            mine = frame;
        }
    })?;
    if mine == 0 {
        return Err(Failure::new(format_args!(
            "no GIC redistributor for this CPU ({me:#x})"
        )));
    }
    HOST_GICR.store(mine, Ordering::Relaxed);
    let rd = mine;
    gicr_wake(rd)?;
    mmio_write32(rd + GICR_IGROUPR0, !0);
    for i in 0..8 {
        mmio_write32(rd + GICR_IPRIORITYR + 4 * i, 0xa0a0_a0a0);
    }
    // SAFETY: the byte of WAKE_SGI in GICR_IPRIORITYR (byte-accessible).
    unsafe { core::ptr::write_volatile((rd + GICR_IPRIORITYR + WAKE_SGI) as *mut u8, 0x80) };
    mmio_write32(rd + GICR_ISENABLER0, 1 << VTIMER_PPI);
    wait_clear(rd + GICR_CTLR, GICR_CTLR_RWP, "GICR_CTLR.RWP")?;
    gic_cpu_init();
    Ok(())
}

/// Whether PPI 27 is active in this CPU's redistributor (GICR_ISACTIVER0),
/// after [`host_gic_init`].
pub fn vtimer_ppi_active() -> bool {
    let rd = HOST_GICR.load(Ordering::Relaxed);
    mmio_read32(rd + SGI_BASE + 0x300) & (1 << VTIMER_PPI) != 0
}

/// This CPU's GIC CPU interface: system registers on, every priority let
/// through, group 1 on. IRQs stay masked in PSTATE: a pending SGI only
/// ends a WFI, and [`ack_sgis`] takes it.
pub fn gic_cpu_init() {
    // SAFETY: GIC CPU interface registers of this CPU; no memory accessed.
    unsafe {
        core::arch::asm!(
            "mrs {t}, s3_0_c12_c12_5", // ICC_SRE_EL1
            "orr {t}, {t}, #1",
            "msr s3_0_c12_c12_5, {t}",
            "isb",
            "mov {t}, #0xff",
            "msr s3_0_c4_c6_0, {t}", // ICC_PMR_EL1
            "mov {t}, #1",
            "msr s3_0_c12_c12_7, {t}", // ICC_IGRPEN1_EL1
            "isb",
            t = out(reg) _,
            options(nomem, nostack),
        );
    }
}

/// Sends [`WAKE_SGI`] to the CPU in `slot`.
pub fn send_wake_sgi(slot: usize) {
    let m = mpidr(slot);
    let (aff0, aff1, aff2, aff3) = (
        m & 0xff,
        (m >> 8) & 0xff,
        (m >> 16) & 0xff,
        (m >> 32) & 0xff,
    );
    // ICC_SGI1R_EL1: Aff3, RS (Aff0 / 16), Aff2, INTID, Aff1, target list.
    let v = aff3 << 48
        | (aff0 >> 4) << 44
        | aff2 << 32
        | WAKE_SGI << 24
        | aff1 << 16
        | 1 << (aff0 & 0xf);
    // SAFETY: generates an SGI; no memory accessed.
    unsafe {
        core::arch::asm!("dsb sy", "msr s3_0_c12_c11_5, {}", "isb", in(reg) v, options(nostack));
    }
}

/// Acknowledges and ends every interrupt pending for this CPU's interface:
/// (how many were [`WAKE_SGI`], how many something else).
pub fn ack_sgis() -> (u32, u32) {
    let (mut wake, mut other) = (0, 0);
    for _ in 0..64 {
        let iar: u64;
        // SAFETY: ICC_IAR1_EL1 acknowledges this CPU's highest-priority
        // pending group-1 interrupt; no memory accessed.
        unsafe {
            core::arch::asm!("mrs {}, s3_0_c12_c12_0", out(reg) iar, options(nomem, nostack))
        };
        let intid = iar & 0xff_ffff;
        if intid >= 1020 {
            break;
        }
        // SAFETY: ICC_EOIR1_EL1: ends (drops priority and deactivates) the
        // interrupt just acknowledged.
        unsafe {
            core::arch::asm!("msr s3_0_c12_c12_1, {}", "isb", in(reg) iar, options(nomem, nostack))
        };
        if intid == WAKE_SGI {
            wake += 1;
        } else {
            other += 1;
        }
    }
    (wake, other)
}

/// Virtual-counter ticks as microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    ticks * 1000 / ticks_per_ms()
}
