//! Ending the run under QEMU with an exit code (semihosting).

use qemu_exit::QEMUExit;

/// Stops the machine; QEMU exits with `code` (needs `-semihosting`). Where
/// semihosting is not enabled the HLT is undefined and the CPU parks in the
/// fatal-exception path, which spins: the caller has already printed why.
pub fn exit(code: u32) -> ! {
    qemu_exit::AArch64::new().exit(code)
}

/// Writes a NUL-terminated string to the semihosting console (SYS_WRITE0),
/// for messages from before the UART is known. Needs `-semihosting`.
pub fn write0(s: &[u8]) {
    if s.last() != Some(&0) {
        return;
    }
    // SAFETY: SYS_WRITE0 only reads the NUL-terminated string at x1, which
    // we checked ends in NUL; QEMU returns to the next instruction.
    unsafe {
        core::arch::asm!("hlt #0xf000", inout("x0") 0x04u64 => _, in("x1") s.as_ptr(), options(nostack, readonly));
    }
}
