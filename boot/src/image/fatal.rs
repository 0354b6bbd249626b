//! Exceptions taken at EL2 itself: always a hypervisor bug (or a stack
//! overflow into a guard page). Reported, then the machine stops.

use keel_arch::esr::Esr;
use keel_arch::exception::kind;
use keel_arch::{exit, sysreg};

use super::{exit_code, report};

/// Called by the vectors on the CPU's emergency stack.
#[no_mangle]
extern "C" fn keel_fatal_exception(k: u64) -> ! {
    let esr = Esr(sysreg::esr_el2());
    let (elr, far) = (sysreg::elr_el2(), sysreg::far_el2());
    let cpu = super::this_cpu();
    if far & !0xfff == cpu.guard_page && cpu.guard_page != 0 {
        report(format_args!(
            "[keel] FATAL: stack overflow on CPU {} (guard page {:#x} hit at ELR {elr:#x})\n",
            cpu.cpu_index, cpu.guard_page
        ));
    }
    report(format_args!(
        "[keel] FATAL: unexpected exception ({}) at EL2: {} ESR={:#x} ELR={elr:#x} FAR={far:#x}\n",
        kind::name(k),
        esr.class_name(),
        esr.0
    ));
    exit::exit(exit_code::FATAL_EXCEPTION)
}
