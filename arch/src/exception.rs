//! The EL2 exception vectors, trap-frame save/restore, and the first entry
//! into a lower exception level.
//!
//! Exceptions from a lower EL save x0..x30 on the hypervisor stack and call
//! `keel_lower_exception(kind, frame)`, which the image defines; the frame is
//! restored and ERET returns to the interrupted context. Exceptions taken at
//! EL2 itself are never expected: the vector switches to the per-CPU
//! emergency stack (CpuLocal::emergency_sp via TPIDR_EL2, on SP_EL0, so it
//! works even when SP_EL2 ran into its guard page) and calls
//! `keel_fatal_exception(kind)`, which reports and stops the machine.

use crate::TrapFrame;

/// Kinds passed to the handlers: the vector's index in the table.
pub mod kind {
    pub const CUR_SP0_SYNC: u64 = 0;
    pub const CUR_SPX_SYNC: u64 = 4;
    pub const LOWER64_SYNC: u64 = 8;
    pub const LOWER64_IRQ: u64 = 9;
    pub const LOWER64_FIQ: u64 = 10;
    pub const LOWER64_SERROR: u64 = 11;

    /// Human-readable vector name.
    pub fn name(kind: u64) -> &'static str {
        const NAMES: [&str; 16] = [
            "EL2t sync",
            "EL2t IRQ",
            "EL2t FIQ",
            "EL2t SError",
            "EL2h sync",
            "EL2h IRQ",
            "EL2h FIQ",
            "EL2h SError",
            "lower AArch64 sync",
            "lower AArch64 IRQ",
            "lower AArch64 FIQ",
            "lower AArch64 SError",
            "lower AArch32 sync",
            "lower AArch32 IRQ",
            "lower AArch32 FIQ",
            "lower AArch32 SError",
        ];
        NAMES.get(kind as usize).copied().unwrap_or("?")
    }
}

core::arch::global_asm!(
    r#"
.macro fatal_vector kind
    .balign 0x80
    msr     spsel, #0
    mrs     x0, tpidr_el2
    ldr     x0, [x0]
    mov     sp, x0
    mov     x0, #\kind
    bl      keel_fatal_exception
1:  wfe
    b       1b
.endm

.macro lower_vector kind
    .balign 0x80
    sub     sp, sp, #256
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       keel_lower_common
.endm

    .section .text.vectors, "ax"
    .balign 2048
    .global keel_vectors
keel_vectors:
    fatal_vector 0
    fatal_vector 1
    fatal_vector 2
    fatal_vector 3
    fatal_vector 4
    fatal_vector 5
    fatal_vector 6
    fatal_vector 7
    lower_vector 8
    lower_vector 9
    lower_vector 10
    lower_vector 11
    fatal_vector 12
    fatal_vector 13
    fatal_vector 14
    fatal_vector 15

keel_lower_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    str     x30, [sp, #240]
    mov     x1, sp
    bl      keel_lower_exception
    mov     x0, sp
    b       keel_restore_frame_and_eret

    // x0 = a TrapFrame; SP is 256 bytes below where it must be after the
    // ERET (keel_lower_common: those 256 bytes are the frame itself, popped
    // here; keel_enter_lower and keel_guest_enter make room for it).
    .global keel_restore_frame_and_eret
keel_restore_frame_and_eret:
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0, #0]
    add     sp, sp, #256
    eret

    // x0 = TrapFrame to load, x1 = stack top for later traps.
    .global keel_enter_lower
keel_enter_lower:
    sub     sp, x1, #256
    b       keel_restore_frame_and_eret
"#
);

extern "C" {
    static keel_vectors: u8;
    fn keel_enter_lower(frame: *const TrapFrame, stack_top: u64) -> !;
}

/// Address of the vector table, for VBAR_EL2.
pub fn vectors() -> u64 {
    core::ptr::addr_of!(keel_vectors) as u64
}

/// Loads `frame` into x0..x30 and ERETs to ELR_EL2/SPSR_EL2; later traps
/// use the stack that ends at `stack_top`.
///
/// # Safety
/// ELR_EL2, SPSR_EL2 and the lower EL's configuration (HCR_EL2, stage 2)
/// must be ready, and nothing on the current stack may be needed again.
pub unsafe fn enter_lower(frame: &TrapFrame, stack_top: u64) -> ! {
    // SAFETY: the caller guarantees the lower EL is ready to run.
    unsafe { keel_enter_lower(frame, stack_top) }
}
