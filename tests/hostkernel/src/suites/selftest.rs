//! `selftest`: proves the harness reports both outcomes. The runner's
//! `harness::catches_failing_test` passes only if exactly
//! `deliberate_failure` is reported FAILED and the probe test ok.

use crate::dt::BootInfo;
use crate::exception::{self, ec, Abort};
use crate::harness::{Suite, Test, TestResult};
use crate::mmu;
use crate::{ensure, ensure_eq, fail};

pub static SUITE: Suite = Suite {
    name: "selftest",
    tests: &[
        Test {
            name: "probe_catches_translation_fault",
            run: probe_catches_translation_fault,
        },
        Test {
            name: "deliberate_failure",
            run: deliberate_failure,
        },
    ],
};

/// The probe machinery, independent of the hypervisor: a load, a store and a
/// branch to a VA our own stage-1 does not map each take a translation fault
/// at EL1, which the probe must catch with the right syndrome and address,
/// and the kernel continues. (isolation relies on exactly this path.)
fn probe_catches_translation_fault(_: &BootInfo) -> TestResult {
    // Beyond the 39-bit VA space TTBR0 covers: a level-0 translation fault.
    let addr = mmu::VA_LIMIT + 0x1238;
    // DFSC/IFSC 0b0001xx is a translation fault at level xx.
    let is_translation = |a: &Abort| a.fsc() & 0x3c == 0x04;

    let abort = match exception::read(addr) {
        Ok(v) => fail!("read of unmapped VA {:#x} returned {:#x}", addr, v),
        Err(a) => a,
    };
    ensure_eq!(abort.ec(), ec::DATA_ABORT_SAME, "read: EC");
    ensure!(
        is_translation(&abort),
        "read: not a translation fault ({})",
        abort
    );
    ensure_eq!(abort.far, addr, "read: FAR");

    // SAFETY: the address is unmapped in our stage-1, so the store cannot
    // reach memory; it faults and is skipped.
    let Some(abort) = (unsafe { exception::write(addr, 1) }) else {
        fail!("write to unmapped VA {:#x} did not abort", addr)
    };
    ensure_eq!(abort.ec(), ec::DATA_ABORT_SAME, "write: EC");
    ensure!(
        is_translation(&abort) && abort.esr & (1 << 6) != 0,
        "write: not a write translation fault ({})",
        abort
    );
    ensure_eq!(abort.far, addr, "write: FAR");

    // SAFETY: as above, the fetch faults before anything runs.
    let Some(abort) = (unsafe { exception::exec(addr & !3) }) else {
        fail!("branch to unmapped VA {:#x} did not abort", addr)
    };
    ensure_eq!(abort.ec(), ec::INSTR_ABORT_SAME, "fetch: EC");
    ensure!(
        is_translation(&abort),
        "fetch: not a translation fault ({})",
        abort
    );
    ensure_eq!(abort.far, addr & !3, "fetch: FAR");

    // And the probe reports no abort where there is none.
    let word: u64 = 0x5eed_0000_1234_5678;
    let got = exception::read(core::ptr::addr_of!(word) as u64);
    ensure!(got == Ok(word), "read of a stack word gave {:?}", got);
    Ok(())
}

fn deliberate_failure(_: &BootInfo) -> TestResult {
    fail!("deliberate failure: the runner must report this test as FAILED")
}
