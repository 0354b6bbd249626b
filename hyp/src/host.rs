//! The hypervisor as the host sees it: its state behind two locks (VMs,
//! then memory: always taken in that order) and the dispatch of the host's
//! hypercalls onto it.

use keel_abi::{func, owner, stat, status};
use keel_mm::TlbMaintenance;
use spin::Mutex;

use crate::hvc::{self, Call, Caller, Limits, Return};
use crate::mem::{CallError, Guests, HypMmu, Memory};
use crate::stats::Stats;
use crate::sysreg::GuestIdRegs;
use crate::vm::{GuestTlb, Pending, Slot, Vcpu, VcpuState, VmOps, Vms, MAX_VCPUS, MAX_VMS};

/// Everything the hypervisor keeps.
pub struct Hyp<T: TlbMaintenance, M: HypMmu, G: GuestTlb> {
    pub limits: Limits,
    pub stats: Stats,
    /// The ID registers guests read: what every CPU up so far has (each
    /// CPU adds its own as it comes up).
    pub guest_ids: Mutex<GuestIdRegs>,
    pub vms: &'static Mutex<Vms<G>>,
    pub mem: Mutex<Memory<T, M>>,
}

fn result(r: Result<(), CallError>) -> Return {
    match r {
        Ok(()) => Return::success(&[]),
        Err(e) => Return::status(e.status()),
    }
}

fn values(r: Result<(u64, u64, u64), CallError>) -> Return {
    match r {
        Ok((a, b, c)) => Return::success(&[a, b, c]),
        Err(e) => Return::status(e.status()),
    }
}

/// A vCPU VCPU_RUN may enter: its registers (exclusively the caller's
/// while it is marked Running), its VM's slot and stage-2 registers.
pub struct RunTicket {
    pub vcpu: *mut Vcpu,
    pub slot: usize,
    pub vttbr: u64,
    pub vtcr: u64,
    /// Another vCPU of the same VM ran last on this physical CPU: its TLB
    /// entries for the VMID must go (locally) before this vCPU runs. A
    /// guest may give each of its CPUs its own translations under one ASID
    /// (per-CPU ASID allocation, say) and rely on each CPU's TLB holding
    /// only its own: the vCPUs share a VMID, so one would hit the other's
    /// entries. Its own invalidations are broadcast (HCR_EL2.FB), which does
    /// not cover entries it never invalidates because, on hardware, another
    /// CPU's TLB never had them.
    pub flush_local: bool,
}

impl<T: TlbMaintenance, M: HypMmu, G: GuestTlb> Hyp<T, M, G> {
    pub fn new(mem: Memory<T, M>, vms: &'static Mutex<Vms<G>>) -> Self {
        Hyp {
            limits: Limits {
                max_vms: MAX_VMS as u64,
                max_vcpus: MAX_VCPUS as u64,
            },
            stats: Stats::new(),
            guest_ids: Mutex::new(GuestIdRegs::default()),
            vms,
            mem: Mutex::new(mem),
        }
    }

    /// Handles one HVC from the host, except VCPU_RUN (which the image runs
    /// through [`begin_run`](Self::begin_run)). Counts it (HYP_STATS 5) only
    /// when it succeeds: a refused call changes no counter.
    pub fn host_hvc(&self, imm: u64, call: &Call) -> Return {
        let ret = self.host_call(imm, call);
        let raw = matches!(call.id, func::FEATURES | func::CALL_UID | func::REVISION);
        if imm == 0 && (raw || ret.regs[0] == status::SUCCESS as u64) {
            self.stats.count_hypercall();
        }
        ret
    }

    fn host_call(&self, imm: u64, call: &Call) -> Return {
        if imm != 0 {
            return Return::status(status::NOT_SUPPORTED);
        }
        if let Some(ret) = hvc::discovery(call, &self.limits) {
            return ret;
        }
        let [a1, a2, a3, a4, _] = call.args;
        let mut vms = self.vms.lock();
        let mut mem = self.mem.lock();
        let g: &Vms<G> = &vms;
        match call.id {
            func::HOST_SHARE_HYP => result(mem.host_share_hyp(a1, a2, g)),
            func::HOST_UNSHARE_HYP => result(mem.host_unshare_hyp(a1, a2, g)),
            func::HOST_DONATE_HYP => result(mem.host_donate_hyp(a1, a2, g)),
            func::MEM_STATE => values(mem.mem_state(a1, g)),
            func::HYP_STATS => match Self::stat(&self.stats, &mem, g, a1) {
                Some(v) => Return::success(&[v]),
                None => Return::status(status::INVALID_PARAMETER),
            },
            func::KEEL_CHECK_INVARIANTS => match mem.check_invariants(g) {
                Ok(()) => Return::success(&[]),
                Err(v) => {
                    log::error!("invariant violated at {:#x}: {}", v.addr, v.what);
                    Return {
                        regs: [status::DENIED as u64, v.addr, 0, 0, 0],
                        count: 2,
                    }
                }
            },
            func::KEEL_TABLE_PAGES => match Self::table_pages(&mem, g, a1) {
                Ok(n) => Return::success(&[n]),
                Err(e) => Return::status(e.status()),
            },
            _ => {
                let mut ops = VmOps {
                    vms: &mut vms,
                    mem: &mut mem,
                };
                match call.id {
                    func::HOST_RECLAIM => result(ops.reclaim(a1, a2)),
                    func::VM_CREATE => match ops.create(a1, a2) {
                        Ok(h) => Return::success(&[h]),
                        Err(e) => Return::status(e.status()),
                    },
                    func::VM_DESTROY => result(ops.destroy(a1)),
                    func::VCPU_INIT => result(ops.vcpu_init(a1, a2, a3, a4)),
                    func::VM_DONATE => result(ops.donate(a1, a2, a3, a4)),
                    func::VM_SHARE => result(ops.share(a1, a2, a3, a4)),
                    func::VM_UNSHARE => result(ops.unshare(a1, a2, a3)),
                    func::VM_MEM_STATE => values(ops.mem_state(a1, a2)),
                    func::HOST_PIN => result(ops.pin(a1, a2, true)),
                    func::HOST_UNPIN => result(ops.pin(a1, a2, false)),
                    func::KEEL_VCPU_IRQ => result(ops.vcpu_irq(a1, a2, a3, a4)),
                    func::KEEL_VCPU_VTIMER => result(ops.vcpu_vtimer(a1, a2, a3, a4)),
                    _ => hvc::dispatch(Caller::Host, imm, call, &self.limits),
                }
            }
        }
    }

    /// HYP_STATS counter `index`.
    fn stat(stats: &Stats, mem: &Memory<T, M>, vms: &Vms<G>, index: u64) -> Option<u64> {
        use core::sync::atomic::Ordering::Relaxed;
        let mut splits = mem.host.stats().splits + vms.retired_splits;
        let mut merges = mem.host.stats().merges + vms.retired_merges;
        for s in &vms.slots {
            if let Slot::Used(vm) = s {
                splits += vm.s2.stats().splits;
                merges += vm.s2.stats().merges;
            }
        }
        Some(match index {
            stat::TABLE_PAGES => mem.table_pages() + vms.table_pages(),
            stat::FREE_POOL_PAGES => mem.pool.free_pages() as u64,
            stat::BLOCK_SPLITS => splits,
            stat::BLOCK_MERGES => merges,
            stat::HOST_ABORTS => stats.host_aborts.load(Relaxed),
            stat::HYPERCALLS => stats.hypercalls.load(Relaxed),
            _ => return None,
        })
    }

    /// KEEL_TABLE_PAGES: the table pages, root included, of the stage 2 of
    /// owner `which`, as MEM_STATE names owners: the host (0) or a VM (its
    /// handle). A destroyed VM keeps its slot, and its tables, until its
    /// last page is reclaimed: those are reported too. A handle without a
    /// VM: INVALID_PARAMETER, as the VM calls answer it.
    fn table_pages(mem: &Memory<T, M>, vms: &Vms<G>, which: u64) -> Result<u64, CallError> {
        let s = if which == owner::HOST {
            mem.host.stats()
        } else {
            match &vms.slots[Vms::<G>::index(which)?] {
                Slot::Used(vm) => vm.s2.stats(),
                Slot::Free => return Err(CallError::Invalid),
            }
        };
        Ok((s.root_pages + s.table_pages) as u64)
    }

    /// Whether the host stage 2 maps `ipa` now. A host stage-2 fault on such
    /// an address happened while another CPU was replacing the entry
    /// (break-before-make); taking the lock waits for that change to finish,
    /// and the host's access is simply retried.
    pub fn host_maps(&self, ipa: u64) -> bool {
        let mem = self.mem.lock();
        matches!(mem.host.lookup(&mem.pool, ipa), Ok(leaf) if matches!(leaf.kind, keel_mm::LeafKind::Mapped { .. }))
    }

    /// Whether VM slot `slot`'s stage 2 maps `ipa` now (see [`host_maps`](Self::host_maps)).
    pub fn guest_maps(&self, slot: usize, ipa: u64) -> bool {
        let vms = self.vms.lock();
        let mem = self.mem.lock();
        match vms.slots.get(slot) {
            Some(Slot::Used(vm)) if vm.alive => {
                matches!(vm.s2.lookup(&mem.pool, ipa), Ok(leaf) if matches!(leaf.kind, keel_mm::LeafKind::Mapped { .. }))
            }
            _ => false,
        }
    }

    /// Starts VCPU_RUN: checks the handle and index, applies the completion
    /// value of the previous exit and marks the vCPU Running. On refusal, or
    /// when the vCPU cannot run any more, the Return to give the host.
    pub fn begin_run(&self, handle: u64, index: u64, completion: u64) -> Result<RunTicket, Return> {
        self.begin_run_on(handle, index, completion, usize::MAX)
    }

    /// [`begin_run`](Self::begin_run) on physical CPU `cpu`, which decides
    /// [`RunTicket::flush_local`] (a CPU index past
    /// [`MAX_CPUS`](crate::vm::MAX_CPUS) always flushes once another vCPU
    /// could have run there).
    pub fn begin_run_on(
        &self,
        handle: u64,
        index: u64,
        completion: u64,
        cpu: usize,
    ) -> Result<RunTicket, Return> {
        let mut vms = self.vms.lock();
        let slot = Vms::<G>::index(handle).map_err(|e| Return::status(e.status()))?;
        let vm = vms
            .live_mut(handle)
            .map_err(|e| Return::status(e.status()))?;
        if index >= vm.nr_vcpus as u64 {
            return Err(Return::status(status::INVALID_PARAMETER));
        }
        let (vttbr, vtcr, off) = (vm.s2.vttbr(), vm.s2.vtcr(), vm.off);
        // A run that ends before the guest (a failed vCPU, a VM that is
        // off) still succeeds with its exit, and counts as a call handled.
        let exit = |r: [u64; 4]| {
            self.stats.count_hypercall();
            Err(Return {
                regs: [0, r[0], r[1], r[2], r[3]],
                count: 5,
            })
        };
        match vm.vcpus[index as usize].state {
            VcpuState::Uninit => return Err(Return::status(status::INVALID_PARAMETER)),
            VcpuState::Running => return Err(Return::status(status::BUSY)),
            VcpuState::Failed(esr) => return exit([keel_abi::exit::FAULT, esr, 0, 0]),
            VcpuState::Ready => {}
        }
        if let Some(how) = off {
            return exit([keel_abi::exit::SYSTEM_OFF, how, 0, 0]);
        }
        vm.started = true;
        // No vCPU of the VM has run on this CPU since VM_CREATE: any entry
        // of its VMID there went with the previous VM of the slot
        // (VM_DESTROY invalidates the VMID everywhere).
        let me = index as u8 + 1;
        let flush_local = match vm.last_ran.get_mut(cpu) {
            Some(last) => {
                let other = *last != 0 && *last != me;
                *last = me;
                other
            }
            None => vm.nr_vcpus > 1,
        };
        let vcpu = &mut vm.vcpus[index as usize];
        vcpu.complete(completion);
        vcpu.state = VcpuState::Running;
        self.stats.count_hypercall();
        Ok(RunTicket {
            vcpu,
            slot,
            vttbr,
            vtcr,
            flush_local,
        })
    }

    /// Ends VCPU_RUN: the vCPU may be run again, or its VM destroyed.
    pub fn end_run(&self, ticket: &RunTicket) {
        let _vms = self.vms.lock();
        // SAFETY: the ticket's vCPU lives in the static VM table, and only
        // the holder of the ticket touches it while it is Running.
        let vcpu = unsafe { &mut *ticket.vcpu };
        match vcpu.pending {
            // The guest's CPU_OFF: nothing of the vCPU is kept.
            Pending::Off => *vcpu = Vcpu::new(),
            Pending::Fault(esr) => {
                vcpu.state = VcpuState::Failed(esr);
                vcpu.pending = Pending::None;
            }
            _ if vcpu.state == VcpuState::Running => vcpu.state = VcpuState::Ready,
            _ => {}
        }
    }
}
