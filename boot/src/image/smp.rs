//! Secondary CPUs: the host starts them (and resumes them from powerdown
//! suspend) through PSCI, which keel relays to firmware with its own entry
//! point, so that every CPU sets up EL2 — stacks, vectors, stage 1, the host
//! stage 2 — before it runs a single host instruction.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use keel_arch::firmware;
use keel_arch::firmware::psci::{self, Relay};
use keel_arch::{exception, sysreg, CpuLocal, TrapFrame};
use log::info;

use super::{host, mmu, this_cpu, HYP, KEEL_CPU_LOCAL};

/// CPUs keel knows (from the device tree), boot CPU first.
pub static NR_CPUS: AtomicUsize = AtomicUsize::new(1);
/// The registers every CPU loads: keel's stage 1, the host stage 2.
pub static HYP_TTBR: AtomicU64 = AtomicU64::new(0);
pub static HOST_VTTBR: AtomicU64 = AtomicU64::new(0);
pub static HOST_VTCR: AtomicU64 = AtomicU64::new(0);

/// MPIDR affinity fields (Aff3, Aff2, Aff1, Aff0).
pub const MPIDR_AFFINITY: u64 = 0xff_00ff_ffff;
const PSCI_INVALID_PARAMETERS: i64 = -2;

extern "C" {
    fn keel_secondary_entry();
}

fn cpu_local(index: usize) -> *mut CpuLocal {
    // SAFETY: only the address of an element is formed.
    unsafe { core::ptr::addr_of_mut!(KEEL_CPU_LOCAL[index]) }
}

/// The index of the CPU with affinity `mpidr`, if the device tree has it.
pub fn index_of(mpidr: u64) -> Option<usize> {
    let n = NR_CPUS.load(Ordering::Acquire);
    // SAFETY: the mpidr fields are written once at boot before any
    // secondary CPU starts, and only read afterwards.
    (0..n).find(|&i| unsafe { (*cpu_local(i)).mpidr } == mpidr & MPIDR_AFFINITY)
}

fn record_host_entry(index: usize, entry: u64, context: u64) {
    let cpu = cpu_local(index);
    // SAFETY: the fields are read only by that CPU when it next starts,
    // which the firmware call below orders after these stores.
    unsafe {
        core::ptr::addr_of_mut!((*cpu).host_entry).write_volatile(entry);
        core::ptr::addr_of_mut!((*cpu).host_context).write_volatile(context);
    }
}

/// PSCI CPU_ON from the host: the CPU starts in keel, then enters the host
/// at `entry` with `context` in x0. Firmware's answer is returned as is
/// (ALREADY_ON for a CPU that is on, ...); an MPIDR the device tree does not
/// list is refused with INVALID_PARAMETERS.
pub fn cpu_on(fid: u32, target: u64, entry: u64, context: u64) -> i64 {
    let Some(index) = index_of(target) else {
        return PSCI_INVALID_PARAMETERS;
    };
    record_host_entry(index, entry, context);
    let mut args = [0u64; 17];
    args[0] = target;
    args[1] = keel_secondary_entry as *const () as u64;
    args[2] = index as u64;
    firmware::smc(fid, args)[0] as i64
}

/// PSCI CPU_SUSPEND from the host: if the CPU powers down, it comes back
/// through keel's entry (and then to the host's); if it only idles,
/// firmware returns here and so does the call.
pub fn cpu_suspend(fid: u32, power_state: u64, entry: u64, context: u64) -> i64 {
    let index = this_cpu().cpu_index as usize;
    record_host_entry(index, entry, context);
    let mut args = [0u64; 17];
    args[0] = power_state;
    args[1] = keel_secondary_entry as *const () as u64;
    args[2] = index as u64;
    firmware::smc(fid, args)[0] as i64
}

/// Fills every CPU's per-CPU data (boot CPU at index 0, the others in
/// device-tree order).
pub fn init_cpus(mpidrs: &[u64], stack_for: impl Fn(usize) -> (u64, u64, u64)) {
    let boot = sysreg::mpidr_el1() & MPIDR_AFFINITY;
    let others = mpidrs
        .iter()
        .map(|m| m & MPIDR_AFFINITY)
        .filter(|&m| m != boot);
    let mut n = 0;
    for mpidr in core::iter::once(boot)
        .chain(others)
        .take(super::layout::MAX_CPUS)
    {
        let (guard, stack_top, emergency_top) = stack_for(n);
        let cpu = cpu_local(n);
        // SAFETY: only the boot CPU runs; no other CPU reads these yet.
        unsafe {
            (*cpu).cpu_index = n as u64;
            (*cpu).mpidr = mpidr;
            (*cpu).guard_page = guard;
            (*cpu).stack_top = stack_top;
            (*cpu).emergency_sp = emergency_top;
        }
        n += 1;
    }
    NR_CPUS.store(n, Ordering::Release);
}

/// A secondary CPU's Rust entry (from entry.S), on its own stack.
#[no_mangle]
extern "C" fn keel_secondary_main(index: u64) -> ! {
    mmu::enable_ttbr(HYP_TTBR.load(Ordering::Acquire));
    host::configure_el2_for_host(
        HOST_VTCR.load(Ordering::Acquire),
        HOST_VTTBR.load(Ordering::Acquire),
    );
    // Guests are told only what every CPU has (CPUs may differ). A CPU
    // with less than guests have already been told stays off: their vCPUs
    // could run here.
    if let Some(hyp) = HYP.get() {
        if hyp
            .guest_ids
            .lock()
            .add_cpu(&sysreg::aa64_id_regs())
            .is_err()
        {
            log::error!(
                "CPU {index} (MPIDR {:#x}) lacks a feature guests were told of: it stays off",
                this_cpu().mpidr
            );
            firmware::cpu_off();
            log::error!("CPU {index}: firmware kept it on; parked");
            loop {
                // SAFETY: waiting for an event touches nothing.
                unsafe { core::arch::asm!("wfe", options(nomem, nostack, preserves_flags)) };
            }
        }
        keel_arch::gic::note_cpu();
        if keel_arch::errata::note_cpu(sysreg::midr_el1()) {
            info!(
                "speculative-AT workaround on (this CPU, MIDR {:#x})",
                sysreg::midr_el1()
            );
        }
    }
    let cpu = this_cpu();
    info!(
        "CPU {index} (MPIDR {:#x}) up; entering host at {:#x}",
        cpu.mpidr, cpu.host_entry
    );
    let mut frame = TrapFrame::default();
    frame.x[0] = cpu.host_context;
    // SAFETY: this CPU's EL2 is set up and the host stage 2 is in force;
    // the host starts at EL1h, MMU off, at the entry it asked for.
    unsafe {
        sysreg::set_elr_el2(cpu.host_entry);
        sysreg::set_spsr_el2(0x3c5);
        exception::enter_lower(&frame, cpu.stack_top)
    }
}

/// The host's PSCI call, as keel relays it (`psci::host_relay`, an
/// allow-list); None when the SMC goes to firmware unchanged.
pub fn psci_call(frame: &TrapFrame) -> Option<i64> {
    let fid = frame.x[0] as u32;
    let [a1, a2, a3] = [frame.x[1], frame.x[2], frame.x[3]];
    Some(match psci::host_relay(fid, a1) {
        Relay::CpuOn => cpu_on(fid, a1, a2, a3),
        Relay::CpuSuspend => cpu_suspend(fid, a1, a2, a3),
        Relay::Refuse => psci::NOT_SUPPORTED,
        Relay::Firmware | Relay::Forward => return None,
    })
}
