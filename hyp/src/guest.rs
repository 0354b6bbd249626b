//! What a trap from a running guest means: a call keel answers itself (the
//! guest resumes at once, without leaving its context), or an exit that
//! VCPU_RUN returns to the host.

use keel_abi::{exit, func, status};
use keel_arch::esr::{ec, Esr};
use keel_arch::psci;
use keel_mm::TlbMaintenance;

use crate::host::Hyp;
use crate::hvc::{self, Call, Return};
use crate::mem::{CallError, HypMmu};
use crate::sysreg::{self, SysregAccess};
use crate::vm::{Pending, Slot, Vcpu, VcpuState, VmOps, GUEST_IPA_BITS};

/// What trapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapKind {
    Sync,
    /// A physical IRQ or FIQ: the host's, an IRQ exit.
    Irq,
    /// SError: nothing a guest may cause and continue from (a FAULT exit
    /// with ESR_EL2, which describes it).
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

/// Calls keel answers itself, whatever the conduit: SMCCC fast calls (w0,
/// bit 31) owned by the Arm architecture (owner 0: SMCCC_VERSION,
/// SMCCC_ARCH_FEATURES, the workaround calls) or by the standard secure
/// services (owner 4: PSCI, TRNG, SDEI, ...). A host answering those could
/// steer a protected guest (the entropy it seeds its RNG with, its view of
/// the firmware); the ones keel does not offer are NOT_SUPPORTED.
fn keel_answers(id: u64) -> bool {
    let w0 = id as u32;
    w0 >> 31 == 1 && matches!((w0 >> 24) & 0x3f, 0 | 4)
}

/// SMCCC_VERSION and SMCCC_ARCH_FEATURES: what a guest asks of the conduit
/// itself.
const SMCCC_VERSION: u32 = 0x8000_0000;
const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;
/// SMCCC 1.1: the version whose HVC conduit (results in x0..x3, x4..x17
/// kept) keel's guest calls follow.
const SMCCC_1_1: u64 = 0x1_0001;

/// The index of the vCPU with MPIDR affinity `mpidr` in a VM of `nr`
/// vCPUs (vCPU i has Aff0 = i and the other affinity fields 0), for PSCI
/// call `fid` (an SMC32 call passes 32 bits).
fn target_index(nr: usize, mpidr: u64, fid: u32) -> Option<usize> {
    let mpidr = if fid & 0x4000_0000 == 0 {
        mpidr & 0xffff_ffff
    } else {
        mpidr
    };
    usize::try_from(mpidr).ok().filter(|&i| i < nr)
}

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
                self.guest_smccc(slot, vcpu, x)
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
                if let Some(which) = access.sgi_register() {
                    // The guest's SGI: done as far as it can tell; its VMM
                    // routes it (KEEL_VCPU_IRQ) as its emulated GIC says.
                    let value = if access.rt < 31 {
                        x[usize::from(access.rt)]
                    } else {
                        0
                    };
                    vcpu.pc += 4;
                    return Action::Exit([exit::SGI, value, which, 0]);
                }
                let emulated = {
                    let mut ids = self.guest_ids.lock();
                    // What a guest reads (or could have) is what its vCPUs
                    // may rely on, on any CPU: a CPU with less stays off.
                    ids.freeze();
                    sysreg::emulate(&ids, &access)
                };
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
        // Failed once the run ends (end_run, under the lock): it is Running
        // until then, and another CPU must not destroy its VM meanwhile.
        vcpu.pending = Pending::Fault(esr);
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
            // x1..x3 are 0 on return, as pKVM returns them.
            func::HYP_MEMINFO => {
                self.stats.count_hypercall();
                Return::raw(&[keel_abi::GRANULE, 0, 0, 0]).apply(x);
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
            // SMCCC's own calls about that conduit, and the other standard
            // secure services.
            id if keel_answers(id) => return self.guest_smccc(slot, vcpu, x),
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

    /// A guest call `keel_answers` (through HVC or SMC): PSCI,
    /// SMCCC_VERSION and SMCCC_ARCH_FEATURES, or another of the Arm
    /// architecture's and the standard secure services' (NOT_SUPPORTED).
    fn guest_smccc(&self, slot: usize, vcpu: &mut Vcpu, x: &mut [u64; 31]) -> Action {
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
            psci::CPU_ON | psci::CPU_ON_32 => self.guest_cpu_on(slot, vcpu, x),
            psci::CPU_OFF => {
                // Off once this run ends (the host's run of it returns);
                // the host learns it from the exit, whose completion value
                // goes nowhere.
                vcpu.pending = Pending::Off;
                // CPU_OFF takes no arguments: nothing else of the guest's.
                Action::Exit([exit::HYPERCALL, u64::from(fid), 0, 0])
            }
            // x1 target MPIDR, x2 lowest affinity level (0: one vCPU).
            psci::AFFINITY_INFO | psci::AFFINITY_INFO_32 => {
                let vms = self.vms.lock();
                let Slot::Used(vm) = &vms.slots[slot] else {
                    x[0] = psci::INVALID_PARAMETERS as u64;
                    return Action::Resume;
                };
                x[0] = match (target_index(vm.nr_vcpus, x[1], fid), x[2]) {
                    (Some(t), 0) if core::ptr::eq(&vm.vcpus[t], vcpu) => psci::AFFINITY_ON,
                    // A vCPU turning itself off is on until its run ends.
                    (Some(t), 0) => match vm.vcpus[t].state {
                        VcpuState::Uninit => psci::AFFINITY_OFF,
                        _ => psci::AFFINITY_ON,
                    },
                    _ => psci::INVALID_PARAMETERS as u64,
                };
                Action::Resume
            }
            psci::VERSION => {
                x[0] = 0x1_0000;
                Action::Resume
            }
            psci::FEATURES => {
                let known = [
                    psci::VERSION,
                    psci::FEATURES,
                    psci::CPU_ON,
                    psci::CPU_ON_32,
                    psci::CPU_OFF,
                    psci::AFFINITY_INFO,
                    psci::AFFINITY_INFO_32,
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

    /// PSCI CPU_ON from a guest (x1 target MPIDR, x2 entry IPA, x3 context
    /// ID): an off vCPU of its VM becomes ready to start at the entry, EL1h
    /// with its MMU off and x0 = the context ID, as VCPU_INIT would set it
    /// (the guest chooses, not the host). Refused in place: a target that
    /// is not a vCPU of the VM (INVALID_PARAMETERS), one that is on
    /// (ALREADY_ON), an entry outside the IPA space or not 4-byte aligned
    /// (INVALID_ADDRESS). Done: a HYPERCALL exit tells the host (x2 the
    /// function, x3 the target, x4 the entry) so that it runs the vCPU;
    /// the completion value is the guest's x0, and a host that started it
    /// passes 0 (SUCCESS).
    fn guest_cpu_on(&self, slot: usize, vcpu: &mut Vcpu, x: &mut [u64; 31]) -> Action {
        let fid = x[0] as u32;
        let (target, mut entry, mut context) = (x[1], x[2], x[3]);
        if fid == psci::CPU_ON_32 {
            // SMC32: w2 and w3.
            entry &= 0xffff_ffff;
            context &= 0xffff_ffff;
        }
        let mut vms = self.vms.lock();
        let status = match &mut vms.slots[slot] {
            Slot::Used(vm) => match target_index(vm.nr_vcpus, target, fid) {
                None => psci::INVALID_PARAMETERS,
                Some(t) if core::ptr::eq(&vm.vcpus[t], vcpu) => psci::ALREADY_ON,
                Some(_) if !entry.is_multiple_of(4) || entry >= 1 << GUEST_IPA_BITS => {
                    psci::INVALID_ADDRESS
                }
                Some(t) if vm.vcpus[t].state != VcpuState::Uninit => psci::ALREADY_ON,
                Some(t) => {
                    vm.vcpus[t] = Vcpu::start_at(entry, context);
                    psci::SUCCESS
                }
            },
            Slot::Free => psci::INVALID_PARAMETERS,
        };
        if status != psci::SUCCESS {
            x[0] = status as u64;
            return Action::Resume;
        }
        vcpu.pending = Pending::Hypercall;
        Action::Exit([exit::HYPERCALL, u64::from(fid), target, entry])
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
