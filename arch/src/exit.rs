//! Ending the run under QEMU with an exit code (semihosting).

use qemu_exit::QEMUExit;

/// Stops the machine; QEMU exits with `code` (needs `-semihosting`). Where
/// semihosting is not enabled the HLT is undefined and the CPU parks in the
/// fatal-exception path, which spins: the caller has already printed why.
pub fn exit(code: u32) -> ! {
    qemu_exit::AArch64::new().exit(code)
}
