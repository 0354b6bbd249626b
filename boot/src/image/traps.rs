//! Exceptions from the host (lower EL): hypercalls, SMCs, and stage-2
//! faults.

use keel_arch::esr::{ec, Esr};
use keel_arch::exception::kind;
use keel_arch::firmware::{self, psci};
use keel_arch::{exit, inject, sysreg, TrapFrame};
use keel_hyp::hvc::Call;
use log::{debug, info, warn};

use super::{exit_code, report, HYP};

/// Called by the vectors with the interrupted context's registers.
#[no_mangle]
extern "C" fn keel_lower_exception(k: u64, frame: &mut TrapFrame) {
    if super::this_cpu().guest_run != 0 {
        return super::guest::trap(k, frame);
    }
    if k != kind::LOWER64_SYNC {
        let esr = sysreg::esr_el2();
        report(format_args!(
            "[keel] FATAL: unexpected {} from the host: ESR={esr:#x} ELR={:#x} FAR={:#x}\n",
            kind::name(k),
            sysreg::elr_el2(),
            sysreg::far_el2()
        ));
        exit::exit(exit_code::FATAL_EXCEPTION);
    }
    let esr = Esr(sysreg::esr_el2());
    match esr.ec() {
        ec::HVC64 => {
            let Some(hyp) = HYP.get() else {
                report(format_args!(
                    "[keel] FATAL: host HVC before the hypervisor was ready\n"
                ));
                exit::exit(exit_code::FATAL_EXCEPTION);
            };
            if frame.x[0] == keel_abi::func::VCPU_RUN && esr.imm16() == 0 {
                super::guest::vcpu_run(hyp, frame);
            } else {
                hyp.host_hvc(esr.imm16(), &Call::from_regs(&frame.x))
                    .apply(&mut frame.x);
            }
        }
        ec::SMC64 => handle_smc(frame),
        ec::DABT_LOWER | ec::IABT_LOWER => refuse_access(esr),
        _ => {
            warn!(
                "host: unexpected trap ({}, ESR {:#x}) at {:#x}: undefined instruction injected",
                esr.class_name(),
                esr.0,
                sysreg::elr_el2()
            );
            inject_into_host(
                inject::undefined(sysreg::spsr_el2(), sysreg::sctlr_el1(), sysreg::vbar_el1()),
                None,
            );
        }
    }
}

/// A trapped SMC: the return address is the SMC itself, so step over it,
/// then relay to firmware what may be relayed.
fn handle_smc(frame: &mut TrapFrame) {
    // SAFETY: ELR_EL2 points at the 4-byte SMC; the host resumes after it.
    unsafe { sysreg::set_elr_el2(sysreg::elr_el2() + 4) };
    let fid = frame.x[0] as u32;
    if fid == psci::SYSTEM_OFF || fid == psci::SYSTEM_RESET {
        info!(
            "host asked for PSCI {}",
            if fid == psci::SYSTEM_OFF {
                "SYSTEM_OFF"
            } else {
                "SYSTEM_RESET"
            }
        );
    }
    if let Some(r) = super::smp::psci_call(frame) {
        frame.x[0] = r as u64;
        return;
    }
    let mut args = [0u64; 17];
    args.copy_from_slice(&frame.x[1..18]);
    let r = firmware::smc(fid, args);
    frame.x[..18].copy_from_slice(&r);
}

/// The host touched memory it neither owns nor borrows (a stage-2 fault):
/// the access never happens; the host gets a synchronous external abort at
/// the faulting address and carries on.
fn refuse_access(esr: Esr) {
    let far = sysreg::far_el2();
    let ipa = ((sysreg::hpfar_el2() >> 4) << 12) | (far & 0xfff);
    // A translation or access-flag fault on a page the host may use happens
    // when another CPU is replacing its entry (break-before-make): once
    // that change is done (host_maps takes the lock), retry the access.
    let transient = matches!(esr.fsc(), 0x04..=0x0b);
    if transient && HYP.get().is_some_and(|h| h.host_maps(ipa)) {
        return;
    }
    let injection = inject::external_abort(
        esr.0,
        sysreg::spsr_el2(),
        sysreg::sctlr_el1(),
        sysreg::vbar_el1(),
    );
    if let Some(hyp) = HYP.get() {
        hyp.stats.count_host_abort();
    }
    debug!(
        "host {} at {ipa:#x} (VA {far:#x}) refused",
        esr.class_name()
    );
    inject_into_host(injection, Some(far));
}

fn inject_into_host(injection: Option<inject::Injection>, far: Option<u64>) {
    let Some(i) = injection else {
        report(format_args!(
            "[keel] FATAL: cannot inject into a host context with SPSR {:#x}\n",
            sysreg::spsr_el2()
        ));
        exit::exit(exit_code::FATAL_EXCEPTION);
    };
    // SAFETY: this emulates the architecture's exception entry to EL1: the
    // interrupted PC and PSTATE go to ELR_EL1/SPSR_EL1, the syndrome to
    // ESR_EL1/FAR_EL1, and the ERET lands on the host's own vector.
    unsafe {
        sysreg::set_elr_el1(sysreg::elr_el2());
        sysreg::set_spsr_el1(sysreg::spsr_el2());
        sysreg::set_esr_el1(i.esr);
        if let Some(far) = far {
            sysreg::set_far_el1(far);
        }
        sysreg::set_elr_el2(i.vector);
        sysreg::set_spsr_el2(i.spsr);
    }
}
