//! Exception handling and the probes that tests use to touch memory they
//! expect to abort.
//!
//! A probe arms the handler, performs exactly one access, and disarms. A
//! synchronous abort of the armed kind is recorded (ESR_EL1, FAR_EL1) and the
//! probe resumes: a data abort skips the faulting load or store (ELR += 4),
//! an instruction abort returns to the probe's caller through the link
//! register, as if the branch had returned. Any other exception ends the run
//! after printing the syndrome, because a test kernel that took an exception
//! it did not expect cannot be trusted to report anything else.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// Exception classes (ESR_EL1.EC) the probes and tests name.
pub mod ec {
    pub const INSTR_ABORT_SAME: u64 = 0x21;
    pub const DATA_ABORT_SAME: u64 = 0x25;
}

/// DFSC/IFSC of a synchronous external abort not on a table walk.
pub const FSC_SYNC_EXTERNAL: u64 = 0x10;

/// The frame `entry.S` builds on the stack.
#[repr(C)]
pub struct Frame {
    pub x: [u64; 31],
    pub elr: u64,
    pub spsr: u64,
    _pad: u64,
    q: [u128; 32],
    fpcr: u64,
    fpsr: u64,
}

const _: () = assert!(core::mem::size_of::<Frame>() == 800);
const _: () = assert!(core::mem::offset_of!(Frame, q) == 272);

/// An abort a probe caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort {
    pub esr: u64,
    pub far: u64,
}

impl Abort {
    pub fn ec(&self) -> u64 {
        (self.esr >> 26) & 0x3f
    }
    /// DFSC or IFSC.
    pub fn fsc(&self) -> u64 {
        self.esr & 0x3f
    }
    /// ESR.FnV: FAR is not valid.
    pub fn far_not_valid(&self) -> bool {
        self.esr & (1 << 10) != 0
    }
}

impl core::fmt::Display for Abort {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ESR={:#x} (EC {:#x}, FSC {:#x}) FAR={:#x}",
            self.esr,
            self.ec(),
            self.fsc(),
            self.far
        )
    }
}

const ARMED_NONE: u8 = 0;
const ARMED_DATA: u8 = 1;
const ARMED_INSTR: u8 = 2;

// Single CPU: plain loads and stores suffice, and they compile to ordinary
// LDR/STR (no exclusives), so they work even before the MMU is on.
static ARMED: AtomicU8 = AtomicU8::new(ARMED_NONE);
static HIT: AtomicBool = AtomicBool::new(false);
static ESR: AtomicU64 = AtomicU64::new(0);
static FAR: AtomicU64 = AtomicU64::new(0);

fn arm(kind: u8) {
    HIT.store(false, Ordering::SeqCst);
    ARMED.store(kind, Ordering::SeqCst);
}

fn disarm() -> Option<Abort> {
    ARMED.store(ARMED_NONE, Ordering::SeqCst);
    HIT.load(Ordering::SeqCst).then(|| Abort {
        esr: ESR.load(Ordering::SeqCst),
        far: FAR.load(Ordering::SeqCst),
    })
}

/// Loads 8 bytes from `addr`: `Ok(value)`, or the abort it took.
pub fn read(addr: u64) -> Result<u64, Abort> {
    arm(ARMED_DATA);
    let value: u64;
    // SAFETY: the handler is armed, so an abort on this load is caught and
    // the load skipped (`value` is then garbage and discarded). A load that
    // succeeds only reads. The asm has no `nomem`, so it is a compiler
    // barrier: the arming stores happen before it and the check after.
    unsafe {
        core::arch::asm!("ldr {v}, [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack))
    };
    match disarm() {
        Some(abort) => Err(abort),
        None => Ok(value),
    }
}

/// Stores `value` (8 bytes) at `addr`; the abort it took, if any.
///
/// # Safety
/// If the store does not abort, it writes memory: `addr` must be memory the
/// caller may clobber, or memory expected to abort.
pub unsafe fn write(addr: u64, value: u64) -> Option<Abort> {
    arm(ARMED_DATA);
    // SAFETY: the caller guarantees the address may be written or aborts;
    // an abort is caught and the store skipped.
    unsafe {
        core::arch::asm!("str {v}, [{a}]", a = in(reg) addr, v = in(reg) value, options(nostack))
    };
    disarm()
}

/// Branches to `addr` with a link; the abort the instruction fetch took, if
/// any. The handler resumes an instruction abort at the link register.
///
/// # Safety
/// If the fetch does not abort, whatever is at `addr` runs: it must be code
/// that returns (or memory expected to abort on fetch).
pub unsafe fn exec(addr: u64) -> Option<Abort> {
    arm(ARMED_INSTR);
    // SAFETY: the caller guarantees `addr` aborts or returns; every register
    // the C ABI lets a callee clobber, including x30, is declared clobbered.
    unsafe { core::arch::asm!("blr {a}", a = in(reg) addr, clobber_abi("C")) };
    disarm()
}

fn esr_el1() -> u64 {
    let v;
    // SAFETY: reading a system register of our own EL has no side effects.
    unsafe { core::arch::asm!("mrs {}, esr_el1", out(reg) v, options(nomem, nostack)) };
    v
}

fn far_el1() -> u64 {
    let v;
    // SAFETY: as above.
    unsafe { core::arch::asm!("mrs {}, far_el1", out(reg) v, options(nomem, nostack)) };
    v
}

const VECTOR_NAMES: [&str; 16] = [
    "sync, EL1t",
    "IRQ, EL1t",
    "FIQ, EL1t",
    "SError, EL1t",
    "sync, EL1h",
    "IRQ, EL1h",
    "FIQ, EL1h",
    "SError, EL1h",
    "sync, EL0 AArch64",
    "IRQ, EL0 AArch64",
    "FIQ, EL0 AArch64",
    "SError, EL0 AArch64",
    "sync, EL0 AArch32",
    "IRQ, EL0 AArch32",
    "FIQ, EL0 AArch32",
    "SError, EL0 AArch32",
];

/// Vector index of a synchronous exception taken from EL1h, the only kind a
/// probe causes.
const SYNC_EL1H: u64 = 4;

/// Called by `entry.S` for every exception.
#[no_mangle]
extern "C" fn exception_handler(index: u64, frame: &mut Frame) {
    let esr = esr_el1();
    let far = far_el1();
    let armed = ARMED.load(Ordering::SeqCst);
    if index == SYNC_EL1H && armed != ARMED_NONE {
        let class = (esr >> 26) & 0x3f;
        let resume = match (armed, class) {
            (ARMED_DATA, ec::DATA_ABORT_SAME) => Some(frame.elr + 4),
            (ARMED_INSTR, ec::INSTR_ABORT_SAME) => Some(frame.x[30]),
            _ => None,
        };
        if let Some(elr) = resume {
            ESR.store(esr, Ordering::SeqCst);
            FAR.store(far, Ordering::SeqCst);
            HIT.store(true, Ordering::SeqCst);
            // One abort per arming: a second one would be a real fault.
            ARMED.store(ARMED_NONE, Ordering::SeqCst);
            frame.elr = elr;
            return;
        }
    }
    let why = crate::harness::Failure::new(format_args!(
        "unexpected exception ({}): ESR={:#x} (EC {:#x}) ELR={:#x} FAR={:#x} SPSR={:#x}",
        VECTOR_NAMES[index as usize & 15],
        esr,
        (esr >> 26) & 0x3f,
        frame.elr,
        far,
        frame.spsr
    ));
    crate::println!();
    crate::println!("{}", why.as_str());
    crate::harness::abort_run(why.as_str());
}
