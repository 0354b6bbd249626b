//! Entering and leaving a guest: the register state that belongs to
//! whoever runs at EL1 (host or guest) and the world switch itself.
//!
//! `enter` saves the hypervisor's callee-saved registers and stack pointer,
//! loads the guest's x0..x30 and ERETs. When the guest next traps, the
//! vectors save its registers as for any lower-EL exception and the handler
//! sees that a guest was running; it copies the frame out and calls `leave`,
//! which restores the saved registers and stack pointer and returns from
//! `enter` with the exit code. The stack between the two is simply dropped.

use crate::features::ExtFeatures;
use crate::TrapFrame;

/// The EL1 (and EL0) system registers switched between host and guest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct El1Regs {
    pub r: [u64; EL1_REGS],
}

macro_rules! el1_regs {
    ($($idx:literal $name:ident $reg:literal),* $(,)?) => {
        /// Index of each register in [`El1Regs::r`].
        pub mod el1 { $(pub const $name: usize = $idx;)* }
        pub const EL1_REGS: usize = [$($idx),*].len();

        impl El1Regs {
            /// Reads the live registers.
            pub fn save() -> Self {
                let mut s = El1Regs::default();
                $(
                    // SAFETY: reading an EL1 register from EL2 has no side effects.
                    unsafe { core::arch::asm!(concat!("mrs {}, ", $reg), out(reg) s.r[$idx], options(nomem, nostack, preserves_flags)) };
                )*
                s
            }

            /// Writes the registers back.
            ///
            /// # Safety
            /// Only while the EL1 they belong to is about to run (the values
            /// configure its translation and exception handling, not EL2's).
            pub unsafe fn restore(&self) {
                $(
                    // SAFETY: see the function's contract.
                    unsafe { core::arch::asm!(concat!("msr ", $reg, ", {}"), in(reg) self.r[$idx], options(nostack, preserves_flags)) };
                )*
            }
        }
    };
}

el1_regs! {
    0 SCTLR "sctlr_el1",
    1 TTBR0 "ttbr0_el1",
    2 TTBR1 "ttbr1_el1",
    3 TCR "tcr_el1",
    4 MAIR "mair_el1",
    5 AMAIR "amair_el1",
    6 VBAR "vbar_el1",
    7 CONTEXTIDR "contextidr_el1",
    8 TPIDR_EL0 "tpidr_el0",
    9 TPIDRRO_EL0 "tpidrro_el0",
    10 TPIDR_EL1 "tpidr_el1",
    11 CPACR "cpacr_el1",
    12 ESR "esr_el1",
    13 FAR "far_el1",
    14 AFSR0 "afsr0_el1",
    15 AFSR1 "afsr1_el1",
    16 PAR "par_el1",
    17 CNTKCTL "cntkctl_el1",
    18 CSSELR "csselr_el1",
    19 SP_EL0 "sp_el0",
    20 SP_EL1 "sp_el1",
    21 ELR "elr_el1",
    22 SPSR "spsr_el1",
    23 CNTV_CTL "cntv_ctl_el0",
    24 CNTV_CVAL "cntv_cval_el0",
    25 MDSCR "mdscr_el1",
}

/// TCR_EL1.EPD0 and EPD1: no stage-1 walk through TTBR0_EL1 or TTBR1_EL1.
const TCR_EPD: u64 = (1 << 7) | (1 << 23);
/// SCTLR_EL1.M: the EL1&0 stage-1 MMU on.
const SCTLR_M: u64 = 1;

impl El1Regs {
    /// [`restore`](Self::restore), with the EL1&0 stage-1 walks off until
    /// every other register holds its value: TCR_EL1 is written first with
    /// EPD0/EPD1 set and last with its own value. On CPUs whose speculative
    /// address translation can walk a half-switched context (Cortex-A76
    /// erratum 1165522, A55 1530923, A57/A72 1319367), nothing is then
    /// walked with one world's stage 1 under the other's stage 2, which
    /// would leave TLB entries for the VMID that did not make them. The
    /// caller loads the matching VTTBR_EL2 first. On CPUs without such an
    /// erratum ([`crate::errata::speculative_at`]) this is `restore`.
    ///
    /// # Safety
    /// As [`restore`](Self::restore).
    pub unsafe fn restore_quiesced(&self) {
        if !crate::errata::speculative_at() {
            // SAFETY: the caller's contract.
            unsafe { self.restore() };
            return;
        }
        let mut quiet = *self;
        quiet.r[el1::TCR] |= TCR_EPD;
        // SAFETY: the caller's contract; with the walks off, the order of
        // the other writes does not matter.
        unsafe {
            write_tcr(quiet.r[el1::TCR]);
            quiet.restore();
            // Every other register in place before the walks resume: the
            // walker sees system-register writes only after a context
            // synchronization, in no particular order before it.
            crate::barrier::isb();
            write_tcr(self.r[el1::TCR]);
        }
    }

    /// Stops the live EL1&0 stage 1 from walking (TCR_EL1.EPD0/EPD1, then
    /// SCTLR_EL1.M, so that no flat mapping stands in for it either) before
    /// VTTBR_EL2 changes to another world's: see
    /// [`restore_quiesced`](Self::restore_quiesced). Returns what the two
    /// registers held, for [`resume`](Self::resume). Does nothing where the
    /// workaround is off.
    ///
    /// # Safety
    /// Only while nothing runs at EL1, until the registers are written back
    /// ([`resume`](Self::resume), or the next world's
    /// [`restore_quiesced`](Self::restore_quiesced)).
    pub unsafe fn quiesce() -> Quiesced {
        if !crate::errata::speculative_at() {
            return Quiesced {
                tcr: 0,
                sctlr: 0,
                active: false,
            };
        }
        let (tcr, sctlr): (u64, u64);
        // SAFETY: the caller's contract: nothing runs at EL1 meanwhile.
        unsafe {
            core::arch::asm!("mrs {}, tcr_el1", out(reg) tcr, options(nomem, nostack, preserves_flags));
            write_tcr(tcr | TCR_EPD);
            core::arch::asm!("mrs {}, sctlr_el1", out(reg) sctlr, options(nomem, nostack, preserves_flags));
            write_sctlr(sctlr | SCTLR_M);
        }
        Quiesced {
            tcr,
            sctlr,
            active: true,
        }
    }

    /// Undoes [`quiesce`](Self::quiesce) once VTTBR_EL2 is the live
    /// world's again: SCTLR_EL1 first, while the walks are still off.
    ///
    /// # Safety
    /// As [`quiesce`](Self::quiesce), with its result.
    pub unsafe fn resume(q: Quiesced) {
        if !q.active {
            return;
        }
        // SAFETY: the values the live world had.
        unsafe {
            write_sctlr(q.sctlr);
            write_tcr(q.tcr);
        }
    }
}

/// TCR_EL1 and SCTLR_EL1 as [`El1Regs::quiesce`] found them.
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct Quiesced {
    tcr: u64,
    sctlr: u64,
    /// False where the workaround is off: nothing was changed.
    active: bool,
}

/// Writes SCTLR_EL1 and waits for it to take effect.
///
/// # Safety
/// As [`El1Regs::restore`].
unsafe fn write_sctlr(value: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!("msr sctlr_el1, {}", "isb", in(reg) value, options(nostack, preserves_flags))
    };
}

/// Writes TCR_EL1 and waits for it to take effect.
///
/// # Safety
/// As [`El1Regs::restore`].
unsafe fn write_tcr(value: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!("msr tcr_el1, {}", "isb", in(reg) value, options(nostack, preserves_flags))
    };
}

/// The pointer-authentication keys (APIA, APIB, APDA, APDB, APGA; Lo then
/// Hi) and TPIDR2_EL0: switched between host and guest where the CPU has
/// them ([`ExtFeatures`]), or a guest would read the host's keys (and forge
/// its pointers) and leave its own for the host to run with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtRegs {
    /// The ten key halves, then TPIDR2_EL0.
    pub r: [u64; EXT_REGS],
}

/// Registers in [`ExtRegs::r`].
pub const EXT_REGS: usize = 11;
const TPIDR2: usize = 10;

/// The key registers, listed once for both directions: `save_keys` and
/// `restore_keys` move them between the CPU and `r[0..10]`.
macro_rules! pauth_keys {
    ($($i:literal $reg:literal),* $(,)?) => {
        /// # Safety
        /// The CPU must implement FEAT_PAuth (else the reads are undefined).
        unsafe fn save_keys(r: &mut [u64; EXT_REGS]) {
            $(
                // SAFETY: the register exists (the caller's contract);
                // reading it from EL2 has no side effects.
                unsafe { core::arch::asm!(concat!("mrs {}, ", $reg), out(reg) r[$i], options(nomem, nostack, preserves_flags)) };
            )*
        }

        /// # Safety
        /// As [`ExtRegs::restore`], on a CPU with FEAT_PAuth.
        unsafe fn restore_keys(r: &[u64; EXT_REGS]) {
            $(
                // SAFETY: see the function's contract.
                unsafe { core::arch::asm!(concat!("msr ", $reg, ", {}"), in(reg) r[$i], options(nostack, preserves_flags)) };
            )*
        }
    };
}

pauth_keys! {
    0 "s3_0_c2_c1_0", 1 "s3_0_c2_c1_1", 2 "s3_0_c2_c1_2", 3 "s3_0_c2_c1_3",
    4 "s3_0_c2_c2_0", 5 "s3_0_c2_c2_1", 6 "s3_0_c2_c2_2", 7 "s3_0_c2_c2_3",
    8 "s3_0_c2_c3_0", 9 "s3_0_c2_c3_1",
}

impl ExtRegs {
    /// Reads the live registers of the features `has` names (the others
    /// stay 0).
    pub fn save(has: ExtFeatures) -> Self {
        let mut s = ExtRegs::default();
        if has.pauth {
            // SAFETY: `has` says the CPU has FEAT_PAuth.
            unsafe { save_keys(&mut s.r) };
        }
        if has.sme {
            // SAFETY: TPIDR2_EL0 exists (FEAT_SME); reading it has no side
            // effects.
            unsafe {
                core::arch::asm!("mrs {}, s3_3_c13_c0_5", out(reg) s.r[TPIDR2], options(nomem, nostack, preserves_flags))
            };
        }
        s
    }

    /// Writes the registers of the features `has` names back.
    ///
    /// # Safety
    /// As [`El1Regs::restore`]: only while the EL1 they belong to is about
    /// to run (keel itself signs no pointers and uses no SME).
    pub unsafe fn restore(&self, has: ExtFeatures) {
        if has.pauth {
            // SAFETY: the function's contract, and `has` says the CPU has
            // FEAT_PAuth.
            unsafe { restore_keys(&self.r) };
        }
        if has.sme {
            // SAFETY: see the function's contract; TPIDR2_EL0 exists.
            unsafe {
                core::arch::asm!("msr s3_3_c13_c0_5, {}", in(reg) self.r[TPIDR2], options(nostack, preserves_flags))
            };
        }
    }
}

/// FP/SIMD registers: V0..V31, FPSR, FPCR.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
pub struct FpRegs {
    pub v: [u128; 32],
    pub fpsr: u64,
    pub fpcr: u64,
}

/// The hypervisor's callee-saved state across a guest run.
#[repr(C)]
#[derive(Debug, Default)]
pub struct HostSave {
    /// x19..x30
    x: [u64; 12],
    sp: u64,
}

core::arch::global_asm!(
    r#"
    .arch_extension fp
    .arch_extension simd

    // x0 = &FpRegs
    .global keel_fp_save
keel_fp_save:
    stp q0, q1, [x0, #0]
    stp q2, q3, [x0, #32]
    stp q4, q5, [x0, #64]
    stp q6, q7, [x0, #96]
    stp q8, q9, [x0, #128]
    stp q10, q11, [x0, #160]
    stp q12, q13, [x0, #192]
    stp q14, q15, [x0, #224]
    stp q16, q17, [x0, #256]
    stp q18, q19, [x0, #288]
    stp q20, q21, [x0, #320]
    stp q22, q23, [x0, #352]
    stp q24, q25, [x0, #384]
    stp q26, q27, [x0, #416]
    stp q28, q29, [x0, #448]
    stp q30, q31, [x0, #480]
    mrs x1, fpsr
    mrs x2, fpcr
    add x0, x0, #512
    stp x1, x2, [x0]
    ret

    .global keel_fp_restore
keel_fp_restore:
    ldp q0, q1, [x0, #0]
    ldp q2, q3, [x0, #32]
    ldp q4, q5, [x0, #64]
    ldp q6, q7, [x0, #96]
    ldp q8, q9, [x0, #128]
    ldp q10, q11, [x0, #160]
    ldp q12, q13, [x0, #192]
    ldp q14, q15, [x0, #224]
    ldp q16, q17, [x0, #256]
    ldp q18, q19, [x0, #288]
    ldp q20, q21, [x0, #320]
    ldp q22, q23, [x0, #352]
    ldp q24, q25, [x0, #384]
    ldp q26, q27, [x0, #416]
    ldp q28, q29, [x0, #448]
    ldp q30, q31, [x0, #480]
    add x0, x0, #512
    ldp x1, x2, [x0]
    msr fpsr, x1
    msr fpcr, x2
    ret

    // x0 = &TrapFrame (guest x0..x30), x1 = &HostSave. ELR/SPSR_EL2,
    // VTTBR_EL2, HCR_EL2 and the guest's EL1 state are already loaded.
    .global keel_guest_enter
keel_guest_enter:
    stp x19, x20, [x1, #0]
    stp x21, x22, [x1, #16]
    stp x23, x24, [x1, #32]
    stp x25, x26, [x1, #48]
    stp x27, x28, [x1, #64]
    stp x29, x30, [x1, #80]
    mov x2, sp
    str x2, [x1, #96]
    // The shared restore path pops 256 bytes before its ERET: make room so
    // that SP_EL2 is back at the saved value while the guest runs.
    sub sp, sp, #256
    b keel_restore_frame_and_eret

    // x0 = &HostSave, x1 = value for keel_guest_enter to return.
    .global keel_guest_leave
keel_guest_leave:
    ldp x19, x20, [x0, #0]
    ldp x21, x22, [x0, #16]
    ldp x23, x24, [x0, #32]
    ldp x25, x26, [x0, #48]
    ldp x27, x28, [x0, #64]
    ldp x29, x30, [x0, #80]
    ldr x2, [x0, #96]
    mov sp, x2
    mov x0, x1
    ret
"#
);

extern "C" {
    fn keel_fp_save(regs: *mut FpRegs);
    fn keel_fp_restore(regs: *const FpRegs);
    fn keel_guest_enter(frame: *const TrapFrame, save: *mut HostSave) -> u64;
    fn keel_guest_leave(save: *const HostSave, code: u64) -> !;
}

impl FpRegs {
    /// Reads the live FP/SIMD registers (the hypervisor itself never uses
    /// them: it is built soft-float).
    pub fn save(&mut self) {
        // SAFETY: stores 528 bytes into `self`, which is that large and
        // 16-byte aligned.
        unsafe { keel_fp_save(self) }
    }
    /// Loads them.
    pub fn restore(&self) {
        // SAFETY: reads 528 bytes of `self`; FP/SIMD registers belong to the
        // lower EL, which is what is being switched.
        unsafe { keel_fp_restore(self) }
    }
}

/// Runs the guest whose registers are in `frame` until `leave` is called
/// from the trap handler; returns the code passed to it.
///
/// # Safety
/// ELR/SPSR_EL2, HCR_EL2, VTTBR_EL2 and the guest's EL1 state must be
/// loaded; `save` must stay valid until `leave` uses it.
pub unsafe fn enter(frame: &TrapFrame, save: &mut HostSave) -> u64 {
    // SAFETY: see the function's contract.
    unsafe { keel_guest_enter(frame, save) }
}

/// Returns from the `enter` that `save` belongs to, with `code`.
///
/// # Safety
/// Called from the exception handler of a trap taken from the guest that
/// `enter` started, on the same CPU; everything on the stack below
/// `enter`'s frame is abandoned.
pub unsafe fn leave(save: &HostSave, code: u64) -> ! {
    // SAFETY: see the function's contract.
    unsafe { keel_guest_leave(save, code) }
}
