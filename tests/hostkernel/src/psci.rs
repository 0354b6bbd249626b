//! Ending the run: PSCI SYSTEM_OFF, which the hypervisor relays to firmware
//! so QEMU exits 0.

use core::sync::atomic::{AtomicBool, Ordering};

const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;

/// Whether the device tree's /psci says `method = "hvc"`. Under keel it says
/// "smc" (QEMU with virtualization=on); "hvc" only appears when the kernel is
/// booted without a hypervisor, where EL2 is absent and SMC is undefined.
static USE_HVC: AtomicBool = AtomicBool::new(false);

pub fn set_conduit_hvc(hvc: bool) {
    USE_HVC.store(hvc, Ordering::Relaxed);
}

/// Powers the machine off. Never returns: if SYSTEM_OFF comes back, ends
/// QEMU with a failing semihosting exit so the runner does not wait for the
/// timeout.
pub fn system_off() -> ! {
    if USE_HVC.load(Ordering::Relaxed) {
        // SAFETY: PSCI SYSTEM_OFF does not return on success; on failure it
        // returns a status in x0, and SMCCC lets it clobber x0..x17.
        unsafe {
            core::arch::asm!("hvc #0", inout("x0") PSCI_SYSTEM_OFF => _,
                clobber_abi("C"), options(nostack));
        }
    } else {
        // SAFETY: as above, through the SMC conduit.
        unsafe {
            core::arch::asm!("smc #0", inout("x0") PSCI_SYSTEM_OFF => _,
                clobber_abi("C"), options(nostack));
        }
    }
    crate::println!("PSCI SYSTEM_OFF returned; ending with a semihosting exit");
    semihosting_exit(1)
}

/// Semihosting SYS_EXIT (QEMU runs with -semihosting): exit code `code`.
pub fn semihosting_exit(code: u64) -> ! {
    const SYS_EXIT: u64 = 0x18;
    const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x2_0026;
    let block = [ADP_STOPPED_APPLICATION_EXIT, code];
    loop {
        // SAFETY: HLT #0xF000 is the AArch64 semihosting trap; QEMU reads the
        // two-word parameter block at x1 and exits. Without semihosting it
        // is a debug halt that we simply retry.
        unsafe {
            core::arch::asm!("hlt #0xf000", in("x0") SYS_EXIT, in("x1") block.as_ptr(),
                options(nostack));
        }
    }
}
