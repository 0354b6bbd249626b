//! What a trap from a running guest means: a call keel answers itself (the
//! guest resumes at once, without leaving its context), or an exit that
//! VCPU_RUN returns to the host.

use keel_abi::{exit, func, status};
use keel_arch::esr::{ec, Esr};
use keel_mm::TlbMaintenance;

use crate::host::Hyp;
use crate::hvc::{self, Call, Return};
use crate::mem::{CallError, HypMmu};
use crate::sysreg::{self, SysregAccess};
use crate::vm::{Pending, Slot, Vcpu, VcpuState, VmOps};

/// What trapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapKind {
    Sync,
    Irq,
    /// FIQ or SError: nothing a guest may cause and continue from.
    Other,
}

/// The syndrome registers of a guest trap.
#[derive(Clone, Copy, Debug)]
pub struct Trap {
    pub kind: TrapKind,
    pub esr: u64,
    pub far: u64,
    pub hpfar: u64,
}

/// What to do after a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Return to the guest.
    Resume,
    /// Return to the host from VCPU_RUN with x1..x4.
    Exit([u64; 4]),
    /// Enter the guest's own undefined-instruction exception (EC 0) for
    /// the instruction at `vcpu.pc`, which keel does not emulate: what a
    /// CPU without the feature would do. The ESR is the trap's, for a
    /// FAULT exit if the guest's state allows no injection.
    Undefined(u64),
}

/// PSCI function IDs a guest may use.
mod psci {
    pub const VERSION: u32 = 0x8400_0000;
    pub const FEATURES: u32 = 0x8400_000A;
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    pub const NOT_SUPPORTED: i64 = -1;
}

/// DC ISW, DC CSW, DC CISW: a trapped system instruction (EC 0x18) with
/// Op0 = 1, Op1 = 0, CRn = 7, CRm = 6/10/14, Op2 = 2.
fn is_set_way_maintenance(esr: u64) -> bool {
    let iss = esr & 0x1ff_ffff;
    let (op0, op2, op1, crn, crm) = (
        (iss >> 20) & 3,
        (iss >> 17) & 7,
        (iss >> 14) & 7,
        (iss >> 10) & 0xf,
        (iss >> 1) & 0xf,
    );
    op0 == 1 && op1 == 0 && crn == 7 && op2 == 2 && matches!(crm, 6 | 10 | 14)
}

/// PSCI function IDs (SMC32 0x8400_00xx, SMC64 0xC400_00xx).
fn is_psci(id: u64) -> bool {
    u32::try_from(id).is_ok_and(keel_arch::psci::is_psci)
}

/// SMCCC_VERSION and SMCCC_ARCH_FEATURES: what a guest asks of the conduit
/// itself, answered by keel (the conduit's owner), not by the host.
const SMCCC_VERSION: u32 = 0x8000_0000;
const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;
/// SMCCC 1.1: the version whose HVC conduit (results in x0..x3, x4..x17
/// kept) keel's guest calls follow.
const SMCCC_1_1: u64 = 0x1_0001;

fn set_status(x: &mut [u64; 31], r: Result<(), CallError>) {
    x[0] = match r {
        Ok(()) => status::SUCCESS as u64,
        Err(e) => e.status() as u64,
    };
}

impl<T: TlbMaintenance, M: HypMmu, G: crate::vm::GuestTlb> Hyp<T, M, G> {
    /// Handles a trap from vCPU `vcpu` of VM slot `slot`. The vCPU's
    /// registers (pc = ELR_EL2 of the trap) are in `vcpu`.
    pub fn guest_trap(&self, slot: usize, vcpu: &mut Vcpu, trap: &Trap) -> Action {
        let mut x = vcpu.x;
        let action = self.guest_trap_in(slot, vcpu, &mut x, trap);
        vcpu.x = x;
        action
    }

    /// [`guest_trap`](Self::guest_trap) with the general registers where
    /// the trap left them (`x`, e.g. the trap frame), not in `vcpu.x`,
    /// which this neither reads nor writes: a call answered in place needs
    /// no copy of the registers either way.
    pub fn guest_trap_in(
        &self,
        slot: usize,
        vcpu: &mut Vcpu,
        x: &mut [u64; 31],
        trap: &Trap,
    ) -> Action {
        let esr = Esr(trap.esr);
        match trap.kind {
            TrapKind::Irq => return Action::Exit([exit::IRQ, 0, 0, 0]),
            TrapKind::Other => return self.fault(vcpu, trap.esr),
            TrapKind::Sync => {}
        }
        let stage2_fault =
            matches!(esr.ec(), ec::DABT_LOWER | ec::IABT_LOWER) && matches!(esr.fsc(), 0x04..=0x0b);
        if stage2_fault && self.guest_maps(slot, ((trap.hpfar >> 4) << 12) | (trap.far & 0xfff)) {
            // The entry was being replaced on another CPU (break-before-make);
            // the change is done now: retry the access.
            return Action::Resume;
        }
        match esr.ec() {
            ec::HVC64 => self.guest_hvc(slot, vcpu, x, esr.imm16()),
            ec::SMC64 => {
                // A trapped SMC returns to itself: step over it.
                vcpu.pc += 4;
                self.guest_psci(slot, x)
            }
            ec::DABT_LOWER => self.guest_data_abort(vcpu, x, trap),
            ec::SYSREG if is_set_way_maintenance(trap.esr) => {
                // Caches are coherent for everything keel maps, and a guest
                // must not invalidate lines by set/way that could hold the
                // host's data: done, as far as the guest can tell.
                vcpu.pc += 4;
                Action::Resume
            }
            ec::SYSREG => {
                let access = SysregAccess::from_esr(trap.esr);
                let emulated = sysreg::emulate(&self.guest_ids.lock(), &access);
                let Some(value) = emulated else {
                    return Action::Undefined(trap.esr);
                };
                if access.read && access.rt < 31 {
                    x[usize::from(access.rt)] = value;
                }
                vcpu.pc += 4;
                Action::Resume
            }
            // Features guests are told they do not have (keel_hyp::sysreg).
            ec::SVE | ec::SME | ec::LS64 => Action::Undefined(trap.esr),
            _ => self.fault(vcpu, trap.esr),
        }
    }

    /// Ends the vCPU's run for good: a FAULT exit with `esr`, and every
    /// later VCPU_RUN exits the same way (VCPU_INIT is DENIED once the VM
    /// has run, so only VM_DESTROY ends it).
    pub fn fault(&self, vcpu: &mut Vcpu, esr: u64) -> Action {
        vcpu.state = VcpuState::Failed(esr);
        Action::Exit([exit::FAULT, esr, 0, 0])
    }

    fn guest_hvc(&self, slot: usize, vcpu: &mut Vcpu, x: &mut [u64; 31], imm: u64) -> Action {
        let call = Call {
            id: x[0],
            args: [x[1], x[2], x[3], x[4], x[5]],
        };
        if imm != 0 {
            x[0] = status::NOT_SUPPORTED as u64;
            return Action::Resume;
        }
        if let Some(ret) = hvc::discovery(&call, &self.limits) {
            self.stats.count_hypercall();
            ret.apply(x);
            return Action::Resume;
        }
        let [ipa, nr, ..] = call.args;
        let op = match call.id {
            // x1 and x2 must be 0, as pKVM requires.
            func::HYP_MEMINFO if ipa != 0 || nr != 0 => {
                x[0] = status::INVALID_PARAMETER as u64;
                return Action::Resume;
            }
            func::HYP_MEMINFO => {
                self.stats.count_hypercall();
                Return::raw(&[keel_abi::GRANULE]).apply(x);
                return Action::Resume;
            }
            func::MEM_SHARE => VmOps::guest_share,
            func::MEM_UNSHARE => VmOps::guest_unshare,
            func::MEM_RELINQUISH => VmOps::guest_relinquish,
            id if func::HOST_CALLS.contains(&id) || func::KEEL_CALLS.contains(&id) => {
                x[0] = status::NOT_SUPPORTED as u64;
                return Action::Resume;
            }
            // PSCI through HVC, the conduit pKVM and KVM guests are given,
            // and SMCCC's own calls about that conduit.
            id if is_psci(id)
                || id == u64::from(SMCCC_VERSION)
                || id == u64::from(SMCCC_ARCH_FEATURES) =>
            {
                return self.guest_psci(slot, x)
            }
            id => {
                vcpu.pending = Pending::Hypercall;
                return Action::Exit([exit::HYPERCALL, id, x[1], x[2]]);
            }
        };
        let r = {
            let mut vms = self.vms.lock();
            let mut mem = self.mem.lock();
            op(
                &mut VmOps {
                    vms: &mut vms,
                    mem: &mut mem,
                },
                slot,
                ipa,
                nr,
            )
        };
        if r.is_ok() {
            self.stats.count_hypercall();
        }
        set_status(x, r);
        Action::Resume
    }

    /// A guest's PSCI call (through HVC or SMC), or SMCCC_VERSION and
    /// SMCCC_ARCH_FEATURES.
    fn guest_psci(&self, slot: usize, x: &mut [u64; 31]) -> Action {
        // SMCCC passes function IDs in w0 (and PSCI_FEATURES its argument
        // in w1).
        let fid = x[0] as u32;
        match fid {
            // SMCCC 1.1 (which Linux needs before it looks for the KVM
            // vendor services); no architectural workaround call is offered.
            SMCCC_VERSION => {
                x[0] = SMCCC_1_1;
                Action::Resume
            }
            SMCCC_ARCH_FEATURES => {
                x[0] = psci::NOT_SUPPORTED as u64;
                Action::Resume
            }
            psci::SYSTEM_OFF | psci::SYSTEM_RESET => {
                let how = u64::from(fid == psci::SYSTEM_RESET);
                if let Slot::Used(vm) = &mut self.vms.lock().slots[slot] {
                    vm.off = Some(how);
                }
                Action::Exit([exit::SYSTEM_OFF, how, 0, 0])
            }
            psci::VERSION => {
                x[0] = 0x1_0000;
                Action::Resume
            }
            psci::FEATURES => {
                let known = [
                    psci::VERSION,
                    psci::FEATURES,
                    psci::SYSTEM_OFF,
                    psci::SYSTEM_RESET,
                ];
                let asked = x[1] as u32;
                x[0] = if asked == SMCCC_VERSION || known.contains(&asked) {
                    0
                } else {
                    psci::NOT_SUPPORTED as u64
                };
                Action::Resume
            }
            _ => {
                x[0] = psci::NOT_SUPPORTED as u64;
                Action::Resume
            }
        }
    }

    /// A stage-2 fault on an IPA the guest has no memory at is an MMIO
    /// access for the host to emulate, when the syndrome describes it.
    fn guest_data_abort(&self, vcpu: &mut Vcpu, x: &[u64; 31], trap: &Trap) -> Action {
        let esr = Esr(trap.esr);
        let translation_or_access = matches!(esr.fsc(), 0x04..=0x0b);
        if !translation_or_access || !esr.isv() {
            return self.fault(vcpu, trap.esr);
        }
        let ipa = ((trap.hpfar >> 4) << 12) | (trap.far & 0xfff);
        let size = esr.access_size();
        let reg = esr.srt() as u8;
        let write = esr.is_write();
        let value = if write && reg < 31 {
            let v = x[reg as usize];
            if size >= 8 {
                v
            } else {
                v & ((1 << (size * 8)) - 1)
            }
        } else {
            0
        };
        vcpu.pending = Pending::Mmio {
            read: !write,
            reg,
            size: size as u8,
            sign: trap.esr & (1 << 21) != 0,
            sf: trap.esr & (1 << 15) != 0,
        };
        let details = u64::from(write) | (size << 8) | (u64::from(reg) << 16);
        Action::Exit([exit::MMIO, ipa, details, value])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An MSR, with x0, of (`op0`, `op1`, `crn`, `crm`, `op2`).
    fn sysreg_esr(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> u64 {
        sysreg::sysreg_esr(op0, op1, crn, crm, op2, 0, false)
    }

    #[test]
    fn set_way_maintenance_is_recognized() {
        assert!(is_set_way_maintenance(sysreg_esr(1, 0, 7, 6, 2)), "DC ISW");
        assert!(is_set_way_maintenance(sysreg_esr(1, 0, 7, 10, 2)), "DC CSW");
        assert!(
            is_set_way_maintenance(sysreg_esr(1, 0, 7, 14, 2)),
            "DC CISW"
        );
        assert!(
            !is_set_way_maintenance(sysreg_esr(1, 3, 7, 14, 1)),
            "DC CIVAC"
        );
        assert!(
            !is_set_way_maintenance(sysreg_esr(3, 0, 1, 0, 1)),
            "ACTLR_EL1"
        );
    }
}
