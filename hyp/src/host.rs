//! The hypervisor as the host sees it: one state behind one lock, and the
//! dispatch of the host's hypercalls onto it.

use keel_abi::{func, stat, status};
use keel_mm::TlbMaintenance;
use spin::Mutex;

use crate::hvc::{self, Call, Caller, Limits, Return};
use crate::mem::{CallError, Guests, HypMmu, Memory, NoGuests};
use crate::stats::Stats;

/// Most VMs and vCPUs per VM (HYP_FEATURES).
pub const MAX_VMS: u64 = 8;
pub const MAX_VCPUS: u64 = 4;

/// Everything the hypervisor keeps.
pub struct Hyp<T: TlbMaintenance, M: HypMmu> {
    pub limits: Limits,
    pub stats: Stats,
    pub mem: Mutex<Memory<T, M>>,
}

fn result(r: Result<(), CallError>) -> Return {
    match r {
        Ok(()) => Return::success(&[]),
        Err(e) => Return::status(e.status()),
    }
}

impl<T: TlbMaintenance, M: HypMmu> Hyp<T, M> {
    pub fn new(mem: Memory<T, M>) -> Self {
        Hyp {
            limits: Limits {
                max_vms: MAX_VMS,
                max_vcpus: MAX_VCPUS,
            },
            stats: Stats::new(),
            mem: Mutex::new(mem),
        }
    }

    /// Handles one HVC from the host. Counts it (HYP_STATS 5) only when it
    /// succeeds: a refused call changes no counter.
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
        let g: &dyn Guests = &NoGuests;
        let [a1, a2, ..] = call.args;
        match call.id {
            func::HOST_SHARE_HYP => result(self.mem.lock().host_share_hyp(a1, a2, g)),
            func::HOST_UNSHARE_HYP => result(self.mem.lock().host_unshare_hyp(a1, a2, g)),
            func::HOST_DONATE_HYP => result(self.mem.lock().host_donate_hyp(a1, a2, g)),
            func::HOST_RECLAIM => {
                // Only donated pages until guests exist; their pages are
                // zeroed through the guest code.
                result(self.mem.lock().host_reclaim(a1, a2, g, &mut |_, _| {}))
            }
            func::MEM_STATE => match self.mem.lock().mem_state(a1, g) {
                Ok((owner, state, size)) => Return::success(&[owner, state, size]),
                Err(e) => Return::status(e.status()),
            },
            func::HYP_STATS => match self.stat(a1, g) {
                Some(v) => Return::success(&[v]),
                None => Return::status(status::INVALID_PARAMETER),
            },
            func::KEEL_CHECK_INVARIANTS => match self.mem.lock().check_invariants(g) {
                Ok(()) => Return::success(&[]),
                Err(v) => {
                    log::error!("invariant violated at {:#x}: {}", v.addr, v.what);
                    Return {
                        regs: [status::DENIED as u64, v.addr, 0, 0, 0],
                        count: 2,
                    }
                }
            },
            _ => hvc::dispatch(Caller::Host, imm, call, &self.limits),
        }
    }

    /// HYP_STATS counter `index`.
    pub fn stat(&self, index: u64, g: &dyn Guests) -> Option<u64> {
        use core::sync::atomic::Ordering::Relaxed;
        let mem = self.mem.lock();
        let s2 = mem.host.stats();
        Some(match index {
            stat::TABLE_PAGES => mem.table_pages() + g.table_pages(),
            stat::FREE_POOL_PAGES => mem.pool.free_pages() as u64,
            stat::BLOCK_SPLITS => s2.splits,
            stat::BLOCK_MERGES => s2.merges,
            stat::HOST_ABORTS => self.stats.host_aborts.load(Relaxed),
            stat::HYPERCALLS => self.stats.hypercalls.load(Relaxed),
            _ => return None,
        })
    }
}
