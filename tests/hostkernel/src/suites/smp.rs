//! `smp`: the host's PSCI calls as keel relays them, and the host memory
//! calls on every CPU at once. tests/run.py boots it with `-smp 4`.
//!
//! PSCI: every CPU of /cpus is started with CPU_ON (SMC, relayed by keel
//! through its own entry) and must arrive at EL1h, MMU off, at the entry
//! point asked for, with the context id in x0; CPU_ON of a CPU that is on
//! is ALREADY_ON and of an MPIDR outside /cpus INVALID_PARAMETERS, as
//! firmware answers; AFFINITY_INFO follows CPU_OFF and CPU_ON; VERSION and
//! FEATURES are QEMU's own.
//!
//! CPU_SUSPEND on every CPU, the boot CPU too, woken by an SGI from another
//! CPU if the call has not returned after [`WAKE_DELAY_MS`]: standby must
//! return SUCCESS with x18..x30, d8..d15, SP, SP_EL0 and the caller's stack
//! intact; powerdown must either return as firmware does (QEMU idles the
//! CPU in WFI and returns SUCCESS) or resume at the entry point given, at
//! EL1h, MMU off, x0 = the context id; a PowerLevel other than the core's
//! is refused as firmware refuses it. No CPU enters at the CPU_ON entry.
//!
//! Concurrency: all CPUs issue HOST_SHARE_HYP/UNSHARE_HYP, DONATE_HYP/
//! RECLAIM and MEM_STATE together, on pages of their own (every call must
//! succeed) and on the same few pages (every status must be SUCCESS or
//! DENIED, MEM_STATE must always show a valid state, the successful calls
//! must be explainable in some order: see [`check_history`], and their
//! totals must agree with MEM_STATE at the end). Afterwards keel's invariant
//! checker is clean, the pool and tables are conserved, and HYP_STATS 5
//! counted exactly the calls that succeeded on all CPUs.
//!
//! Test pages: 2 MiB blocks from 0x7000_0000 (host-abi's TEST_BASE), one
//! per test. Donate/reclaim tests first donate the block's last page (the
//! anchor) and keep it donated: the block then stays split, so no call of
//! the test needs a table from the pool, which could otherwise be a page
//! another CPU just donated, and reclaiming that page would rightly fail.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use keel_abi::{func, owner, stat, status, Regs};

use crate::dt::BootInfo;
use crate::harness::{Failure, Suite, Test, TestResult};
use crate::smp::{self, psci, MAX_CPUS};
use crate::suites::host_abi::{test_block, BLOCK, PAGE, TEST_BASE};
use crate::{ensure, ensure_eq, fail};

pub static SUITE: Suite = Suite {
    name: "smp",
    tests: &[
        Test {
            name: "cpus_from_device_tree",
            run: cpus_from_device_tree,
        },
        Test {
            name: "psci_version_and_features",
            run: psci_version_and_features,
        },
        Test {
            name: "cpu_on_every_cpu",
            run: cpu_on_every_cpu,
        },
        Test {
            name: "cpu_on_already_on",
            run: cpu_on_already_on,
        },
        Test {
            name: "cpu_on_unknown_mpidr",
            run: cpu_on_unknown_mpidr,
        },
        Test {
            name: "cpu_off_then_on",
            run: cpu_off_then_on,
        },
        Test {
            name: "cpu_suspend_standby",
            run: cpu_suspend_standby,
        },
        Test {
            name: "cpu_suspend_powerdown",
            run: cpu_suspend_powerdown,
        },
        Test {
            name: "cpu_suspend_bad_power_state",
            run: cpu_suspend_bad_power_state,
        },
        Test {
            name: "concurrent_disjoint_share_unshare",
            run: concurrent_disjoint_share_unshare,
        },
        Test {
            name: "concurrent_disjoint_donate_reclaim",
            run: concurrent_disjoint_donate_reclaim,
        },
        Test {
            name: "concurrent_overlapping_share_unshare",
            run: concurrent_overlapping_share_unshare,
        },
        Test {
            name: "concurrent_overlapping_donate_reclaim",
            run: concurrent_overlapping_donate_reclaim,
        },
        Test {
            name: "concurrent_overlapping_mixed",
            run: concurrent_overlapping_mixed,
        },
        Test {
            name: "invariants_and_accounting_after",
            run: invariants_and_accounting_after,
        },
        // Last: a host abort it provokes ends the run.
        Test {
            name: "host_access_during_split_merge",
            run: host_access_during_split_merge,
        },
    ],
};

/// PSCI as QEMU 7.2's firmware answers it without keel (measured by
/// booting this suite on `-M virt` without virtualization, where PSCI is
/// QEMU's at EL2 through HVC; tests/README.md): keel must relay it as is.
const PSCI_VERSION_1_1: i64 = 0x1_0001;

/// Context ids: recognizable, and different for every CPU_ON.
const CONTEXT_BASE: u64 = 0x6b65_656c_0000_0000;
static CONTEXT_SEQ: AtomicU64 = AtomicU64::new(0);

fn next_context(slot: usize) -> u64 {
    CONTEXT_BASE | CONTEXT_SEQ.fetch_add(1, Ordering::Relaxed) << 8 | slot as u64
}

/// Virtual-time limits (ms): a CPU's arrival, a CPU_OFF, a whole workload.
const ARRIVAL_MS: u64 = 5_000;
const WORKLOAD_MS: u64 = 40_000;

fn cpus_from_device_tree(boot: &BootInfo) -> TestResult {
    let n = smp::init(boot)?;
    ensure!(
        n >= 2,
        "/cpus lists {} CPU(s); tests/run.py boots this suite with -smp 4",
        n
    );
    for slot in 0..n {
        for other in 0..slot {
            ensure!(
                smp::mpidr(slot) != smp::mpidr(other),
                "MPIDR {:#x} twice in /cpus",
                smp::mpidr(slot)
            );
        }
    }
    Ok(())
}

fn psci_version_and_features(_: &BootInfo) -> TestResult {
    let version = smp::psci_call(psci::VERSION, 0, 0, 0);
    ensure_eq!(version, PSCI_VERSION_1_1, "PSCI VERSION");
    // (function, FEATURES answer): QEMU's PSCI 1.1 offers these...
    let cases: [(u64, i64); 10] = [
        (psci::VERSION, psci::SUCCESS),
        (psci::CPU_ON, psci::SUCCESS),
        (psci::CPU_OFF, psci::SUCCESS),
        (psci::AFFINITY_INFO, psci::SUCCESS),
        (0xC400_0001, psci::SUCCESS), // CPU_SUSPEND (64-bit)
        (0x8400_0008, psci::SUCCESS), // SYSTEM_OFF
        (psci::FEATURES, psci::SUCCESS),
        // ...and not SYSTEM_SUSPEND (keel would refuse it: no host code may
        // run before keel's after a resume), nor an unknown function.
        (psci::SYSTEM_SUSPEND, psci::NOT_SUPPORTED),
        (0x8400_00ff, psci::NOT_SUPPORTED),
        // CPU_DEFAULT_SUSPEND takes an entry point keel would never see.
        (0xC400_000C, psci::NOT_SUPPORTED),
    ];
    // keel relays PSCI through an allow-list: what it passes on reaches
    // QEMU (MIGRATE_INFO_TYPE: 2, no Trusted OS to migrate), what it
    // refuses does not (CPU_DEFAULT_SUSPEND, CPU_FREEZE, MEM_PROTECT).
    ensure_eq!(
        smp::psci_call(0x8400_0006, 0, 0, 0),
        2,
        "PSCI MIGRATE_INFO_TYPE"
    );
    // An SMC firmware does not know (SiP, OEM, an undefined PSCI ID): an
    // SMCCC NOT_SUPPORTED for the host, and keel carries on.
    for fid in [0xC200_0001, 0x8300_0000, 0x8400_001F] {
        ensure_eq!(
            smp::psci_call(fid, 0, 0, 0),
            psci::NOT_SUPPORTED,
            "an SMC firmware does not know"
        );
    }
    for fid in [0xC400_000C, 0x8400_000B, 0x8400_0013] {
        ensure_eq!(
            smp::psci_call(fid, 0, 0, 0),
            psci::NOT_SUPPORTED,
            "a PSCI call keel does not relay"
        );
    }
    for (fid, want) in cases {
        let got = smp::psci_call(psci::FEATURES, fid, 0, 0);
        ensure!(
            got == want,
            "PSCI FEATURES({:#x}) = {}, expected {}",
            fid,
            got,
            want
        );
    }
    Ok(())
}

/// A CPU's report on arrival must show the CPU_ON that started it.
fn check_arrival(slot: usize, a: &smp::Arrival, context: u64, alt_entry: bool) -> TestResult {
    let mpidr = smp::mpidr(slot);
    ensure!(
        a.mpidr & smp::MPIDR_AFFINITY == mpidr,
        "CPU {:#x} arrived as MPIDR {:#x}",
        mpidr,
        a.mpidr
    );
    ensure!(a.el == 1, "CPU {:#x} arrived at EL{}", mpidr, a.el);
    ensure!(
        a.context == context,
        "CPU {:#x}: x0 = {:#x} at entry, expected the context id {:#x}",
        mpidr,
        a.context,
        context
    );
    ensure!(
        a.entry == alt_entry as u64,
        "CPU {:#x} arrived at the other entry point",
        mpidr
    );
    ensure!(
        a.sctlr & 1 == 0,
        "CPU {:#x}: MMU on at entry (SCTLR_EL1 {:#x})",
        mpidr,
        a.sctlr
    );
    ensure!(
        a.spsel == 1,
        "CPU {:#x}: SPSel {} at entry (EL1t)",
        mpidr,
        a.spsel
    );
    Ok(())
}

/// CPU_ON of `slot` at the given entry, waiting for it to arrive.
fn start(slot: usize, alt_entry: bool) -> TestResult {
    let mpidr = smp::mpidr(slot);
    let context = next_context(slot);
    let before = smp::arrivals(slot);
    let r = smp::cpu_on(mpidr, smp::entry(alt_entry), context);
    ensure!(
        r == psci::SUCCESS,
        "CPU_ON({:#x}) = {}, expected SUCCESS",
        mpidr,
        r
    );
    let Some(a) = smp::wait_arrival(slot, before, ARRIVAL_MS) else {
        fail!(
            "CPU {:#x} never arrived after CPU_ON (AFFINITY_INFO {})",
            mpidr,
            smp::affinity_info(mpidr)
        )
    };
    check_arrival(slot, &a, context, alt_entry)?;
    let aff = smp::affinity_info(mpidr);
    ensure!(
        aff == psci::AFF_ON,
        "AFFINITY_INFO({:#x}) = {} with the CPU running, expected ON (0)",
        mpidr,
        aff
    );
    Ok(())
}

fn need_cpus() -> TestResult {
    ensure!(
        smp::count() >= 2,
        "no secondary CPUs (cpus_from_device_tree failed)"
    );
    Ok(())
}

fn cpu_on_every_cpu(_: &BootInfo) -> TestResult {
    need_cpus()?;
    let me = smp::mpidr(0);
    let aff = smp::affinity_info(me);
    ensure!(
        aff == psci::AFF_ON,
        "AFFINITY_INFO of the boot CPU {:#x} = {}",
        me,
        aff
    );
    for slot in 1..smp::count() {
        let aff = smp::affinity_info(smp::mpidr(slot));
        ensure!(
            aff == psci::AFF_OFF,
            "AFFINITY_INFO({:#x}) = {} before CPU_ON, expected OFF (1)",
            smp::mpidr(slot),
            aff
        );
        start(slot, false)?;
    }
    Ok(())
}

/// No CPU arrived again since `before` (taken per slot).
fn no_new_arrivals(before: &[u64; MAX_CPUS], after: &str) -> TestResult {
    // Give a wrongly started CPU time to show up.
    smp::wait_until(100, || false);
    for (slot, &b) in before.iter().enumerate().take(smp::count()) {
        ensure!(
            smp::arrivals(slot) == b,
            "CPU {:#x} entered the kernel again after {}",
            smp::mpidr(slot),
            after
        );
    }
    Ok(())
}

fn all_arrivals() -> [u64; MAX_CPUS] {
    core::array::from_fn(smp::arrivals)
}

fn cpu_on_already_on(_: &BootInfo) -> TestResult {
    need_cpus()?;
    let before = all_arrivals();
    for slot in 0..smp::count() {
        let mpidr = smp::mpidr(slot);
        let r = smp::cpu_on(mpidr, smp::entry(false), next_context(slot));
        ensure!(
            r == psci::ALREADY_ON,
            "CPU_ON({:#x}) of a running CPU = {}, expected ALREADY_ON (-4)",
            mpidr,
            r
        );
    }
    no_new_arrivals(&before, "CPU_ON of running CPUs")
}

fn cpu_on_unknown_mpidr(_: &BootInfo) -> TestResult {
    need_cpus()?;
    let before = all_arrivals();
    // Aff0 = 0xff, then each higher affinity level.
    for mpidr in [0xff, 0x100, 0x1_0000, 0x1_0000_0000] {
        let known = (0..smp::count()).any(|s| smp::mpidr(s) == mpidr);
        if known {
            continue;
        }
        let r = smp::cpu_on(mpidr, smp::entry(false), next_context(0));
        ensure!(
            r == psci::INVALID_PARAMETERS,
            "CPU_ON({:#x}), not in /cpus, = {}, expected INVALID_PARAMETERS (-2)",
            mpidr,
            r
        );
    }
    no_new_arrivals(&before, "CPU_ON of unknown MPIDRs")
}

/// What CPU_OFF returned, if it did (it must not).
static CPU_OFF_RETURNED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn job_cpu_off(slot: usize) {
    let r = smp::psci_call(psci::CPU_OFF, 0, 0, 0);
    CPU_OFF_RETURNED[slot].store(r as u64 | 1 << 63, Ordering::Release);
}

fn job_nothing(_: usize) {}

/// CPU_OFF on `slot` (a job it runs), waiting for AFFINITY_INFO to say OFF.
fn stop(slot: usize) -> TestResult {
    let mpidr = smp::mpidr(slot);
    CPU_OFF_RETURNED[slot].store(0, Ordering::Release);
    smp::post(slot, job_cpu_off);
    let off = smp::wait_until(ARRIVAL_MS, || {
        smp::affinity_info(mpidr) == psci::AFF_OFF
            || CPU_OFF_RETURNED[slot].load(Ordering::Acquire) != 0
    });
    let returned = CPU_OFF_RETURNED[slot].load(Ordering::Acquire);
    ensure!(
        returned == 0,
        "CPU_OFF on CPU {:#x} returned {}",
        mpidr,
        returned as u32 as i32
    );
    ensure!(
        off,
        "AFFINITY_INFO({:#x}) = {} after CPU_OFF, expected OFF (1)",
        mpidr,
        smp::affinity_info(mpidr)
    );
    Ok(())
}

fn cpu_off_then_on(_: &BootInfo) -> TestResult {
    need_cpus()?;
    let n = smp::count();
    // Every secondary off and on again, at the other entry point; the last
    // one three times, alternating entries.
    for slot in 1..n {
        let rounds = if slot == n - 1 { 3 } else { 1 };
        for round in 0..rounds {
            stop(slot)?;
            let before = all_arrivals();
            no_new_arrivals(&before, "CPU_OFF")?;
            start(slot, round % 2 == 0)?;
            // It works, not only arrives: it runs a job.
            smp::post(slot, job_nothing);
            ensure!(
                smp::wait_until(ARRIVAL_MS, || smp::idle(slot)),
                "CPU {:#x} restarted but runs no job",
                smp::mpidr(slot)
            );
        }
    }
    // Everything back at the usual entry for the rest of the suite.
    for slot in 1..n {
        if smp::arrival(slot).entry != 0 {
            stop(slot)?;
            start(slot, false)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------
// CPU_SUSPEND.

/// power_state in PSCI's original format (QEMU's PSCI answers
/// FEATURES(CPU_SUSPEND) with bit 1 clear): StateType (bit 16) 0 for
/// standby, 1 for powerdown; StateID 0; PowerLevel (bits 24..25) 0, the
/// core.
const STANDBY: u64 = 0;
const POWERDOWN: u64 = 1 << 16;
/// PowerLevel 1 (the cluster): QEMU's PSCI refuses any level but the core.
const CLUSTER_STANDBY: u64 = 1 << 24;

/// What QEMU's PSCI answers without keel (measured as for VERSION): it
/// never powers a CPU down, it idles it in WFI and returns SUCCESS, for
/// standby and powerdown alike; a PowerLevel other than 0 is refused at
/// once.
const POWERDOWN_RETURNS: i64 = psci::SUCCESS;
const CLUSTER_ANSWER: i64 = psci::INVALID_PARAMETERS;

/// How long the waker lets the suspended CPU idle before it sends the SGI
/// (virtual ms), unless the call has returned by then.
const WAKE_DELAY_MS: u64 = 20;

/// One CPU_SUSPEND: its arguments, set by the boot CPU; where the suspended
/// CPU is (0: not yet called, 1: calling, 2: back), when it called and came
/// back, and the SGI's time (0: none sent).
static SUSPEND_POWER_STATE: AtomicU64 = AtomicU64::new(0);
static SUSPEND_CONTEXT: AtomicU64 = AtomicU64::new(0);
static SUSPEND_TARGET: AtomicUsize = AtomicUsize::new(0);
static SUSPEND_PHASE: AtomicU64 = AtomicU64::new(0);
static SUSPEND_T0: AtomicU64 = AtomicU64::new(0);
static SUSPEND_T1: AtomicU64 = AtomicU64::new(0);
static SUSPEND_SGI_AT: AtomicU64 = AtomicU64::new(0);
/// The outcome ([`encode_suspended`]) and the interrupts acknowledged after
/// it: (wake SGIs, others).
static SUSPEND_OUTCOME: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
static SUSPEND_ACKED: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

fn encode_suspended(s: smp::Suspended) -> [u64; 6] {
    match s {
        smp::Suspended::Returned { status, changed } => [1, status as u64, changed, 0, 0, 0],
        smp::Suspended::Resumed(a) => [2, a.context, a.el, a.sctlr, a.mpidr, a.spsel],
    }
}

fn decode_suspended(v: [u64; 6]) -> smp::Suspended {
    if v[0] == 1 {
        smp::Suspended::Returned {
            status: v[1] as i64,
            changed: v[2],
        }
    } else {
        smp::Suspended::Resumed(smp::Arrival {
            context: v[1],
            entry: 0,
            el: v[2],
            sctlr: v[3],
            mpidr: v[4],
            spsel: v[5],
        })
    }
}

/// The suspended CPU's part: CPU_SUSPEND with the posted arguments, then
/// the pending interrupts taken, the outcome published.
fn suspend_here(slot: usize) {
    smp::ack_sgis();
    let power_state = SUSPEND_POWER_STATE.load(Ordering::Relaxed);
    let context = SUSPEND_CONTEXT.load(Ordering::Relaxed);
    SUSPEND_T0.store(smp::now(), Ordering::Relaxed);
    SUSPEND_PHASE.store(1, Ordering::Release);
    let outcome = smp::cpu_suspend(slot, power_state, context);
    SUSPEND_T1.store(smp::now(), Ordering::Relaxed);
    if matches!(outcome, smp::Suspended::Resumed(_)) {
        // A CPU that really powered down lost its GIC interface's state.
        smp::gic_cpu_init();
    }
    let (wake, other) = smp::ack_sgis();
    SUSPEND_ACKED[0].store(wake.into(), Ordering::Relaxed);
    SUSPEND_ACKED[1].store(other.into(), Ordering::Relaxed);
    for (o, v) in SUSPEND_OUTCOME.iter().zip(encode_suspended(outcome)) {
        o.store(v, Ordering::Relaxed);
    }
    SUSPEND_PHASE.store(2, Ordering::Release);
}

fn job_suspend(slot: usize) {
    suspend_here(slot);
}

/// The waker's part: once the target has called CPU_SUSPEND and not come
/// back within [`WAKE_DELAY_MS`], an SGI to it; then wait for it.
fn wake_target() {
    let target = SUSPEND_TARGET.load(Ordering::Relaxed);
    let phase = || SUSPEND_PHASE.load(Ordering::Acquire);
    if !smp::wait_until(ARRIVAL_MS, || phase() >= 1) {
        return;
    }
    if !smp::wait_until(WAKE_DELAY_MS, || phase() == 2) {
        SUSPEND_SGI_AT.store(smp::now(), Ordering::Relaxed);
        smp::send_wake_sgi(target);
    }
    smp::wait_until(ARRIVAL_MS, || phase() == 2);
}

fn job_wake(_: usize) {
    wake_target();
}

/// The GIC set up for the wake SGI, on every CPU (again for each test: a
/// CPU_ON resets a CPU's interface).
fn suspend_setup(boot: &BootInfo) -> TestResult {
    need_cpus()?;
    smp::gic_init(boot)?;
    smp::gic_cpu_init();
    for slot in 1..smp::count() {
        smp::post(slot, |_| smp::gic_cpu_init());
    }
    ensure!(
        smp::wait_until(ARRIVAL_MS, || (1..smp::count()).all(smp::idle)),
        "a CPU did not set up its GIC interface"
    );
    // CPU_SUSPEND must take the original power_state format.
    let features = smp::psci_call(psci::FEATURES, psci::CPU_SUSPEND, 0, 0);
    ensure!(
        features >= 0 && features & 2 == 0,
        "FEATURES(CPU_SUSPEND) = {:#x}: not the original power_state format",
        features
    );
    Ok(())
}

/// The registers a [`smp::Suspended::Returned`] says were changed.
struct Changed(u64);

impl core::fmt::Display for Changed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use smp::changed::{D8, SP, SP_EL0, STACK};
        for bit in 0..64 {
            if self.0 & 1 << bit == 0 {
                continue;
            }
            match bit {
                SP_EL0 => write!(f, " SP_EL0")?,
                SP => write!(f, " SP")?,
                STACK => write!(f, " stack-words")?,
                b if (D8..D8 + 8).contains(&b) => write!(f, " d{}", b - D8 + 8)?,
                b => write!(f, " x{}", b)?,
            }
        }
        Ok(())
    }
}

/// How a CPU_SUSPEND ended, for the measurement line.
struct How(smp::Suspended);

impl core::fmt::Display for How {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            smp::Suspended::Returned { status, .. } => write!(f, "returned {}", status),
            smp::Suspended::Resumed(_) => write!(f, "resumed at the entry point"),
        }
    }
}

/// When the wake SGI went out (counter value; 0: none), after `t0`.
struct SgiAt(u64, u64);

impl core::fmt::Display for SgiAt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            0 => write!(f, "no SGI sent"),
            t => write!(
                f,
                "SGI sent at {} us",
                smp::ticks_to_us(t.wrapping_sub(self.1))
            ),
        }
    }
}

/// CPU_SUSPEND(`power_state`) on the CPU in `slot`, woken by an SGI from
/// another CPU if it does not return by itself: its outcome, once the CPU
/// is back. The CPU must then still run jobs and be ON.
fn suspend_once(slot: usize, power_state: u64) -> Result<(smp::Suspended, u64), Failure> {
    let mpidr = smp::mpidr(slot);
    let context = next_context(slot);
    SUSPEND_POWER_STATE.store(power_state, Ordering::Relaxed);
    SUSPEND_CONTEXT.store(context, Ordering::Relaxed);
    SUSPEND_TARGET.store(slot, Ordering::Relaxed);
    SUSPEND_SGI_AT.store(0, Ordering::Relaxed);
    SUSPEND_PHASE.store(0, Ordering::Release);
    // The boot CPU is woken by slot 1, the others by the boot CPU.
    let helper = if slot == 0 { 1 } else { slot };
    if slot == 0 {
        smp::post(1, job_wake);
        suspend_here(0);
    } else {
        smp::post(slot, job_suspend);
        wake_target();
    }
    let phase = SUSPEND_PHASE.load(Ordering::Acquire);
    ensure!(
        phase == 2,
        "CPU {:#x}: CPU_SUSPEND({:#x}) {} (AFFINITY_INFO {})",
        mpidr,
        power_state,
        if phase == 0 {
            "never called"
        } else {
            "never came back, SGI or not"
        },
        smp::affinity_info(mpidr)
    );
    ensure!(
        smp::wait_until(ARRIVAL_MS, || smp::idle(helper)),
        "CPU {:#x} did not finish its part after CPU_SUSPEND",
        smp::mpidr(helper)
    );
    // The suspended CPU works: it runs a job, and it is ON.
    if slot != 0 {
        smp::post(slot, job_nothing);
        ensure!(
            smp::wait_until(ARRIVAL_MS, || smp::idle(slot)),
            "CPU {:#x} runs no job after CPU_SUSPEND",
            mpidr
        );
    }
    let aff = smp::affinity_info(mpidr);
    ensure!(
        aff == psci::AFF_ON,
        "AFFINITY_INFO({:#x}) = {} after CPU_SUSPEND, expected ON (0)",
        mpidr,
        aff
    );
    let outcome = decode_suspended(core::array::from_fn(|i| {
        SUSPEND_OUTCOME[i].load(Ordering::Relaxed)
    }));
    let (t0, t1) = (
        SUSPEND_T0.load(Ordering::Relaxed),
        SUSPEND_T1.load(Ordering::Relaxed),
    );
    let sgi = SUSPEND_SGI_AT.load(Ordering::Relaxed);
    crate::println!(
        "smp: CPU_SUSPEND({:#x}) on CPU {:#x} {} after {} us ({}); acked {} wake SGI(s), {} other(s)",
        power_state,
        mpidr,
        How(outcome),
        smp::ticks_to_us(t1.wrapping_sub(t0)),
        SgiAt(sgi, t0),
        SUSPEND_ACKED[0].load(Ordering::Relaxed),
        SUSPEND_ACKED[1].load(Ordering::Relaxed)
    );
    Ok((outcome, context))
}

/// A CPU_SUSPEND that returned must return `want` with every checked
/// register and stack word intact.
fn check_returned(slot: usize, power_state: u64, outcome: smp::Suspended, want: i64) -> TestResult {
    let mpidr = smp::mpidr(slot);
    match outcome {
        smp::Suspended::Returned { status, changed } => {
            ensure!(
                status == want,
                "CPU_SUSPEND({:#x}) on CPU {:#x} = {}, expected {} (firmware's)",
                power_state,
                mpidr,
                status,
                want
            );
            ensure!(
                changed == 0,
                "CPU_SUSPEND({:#x}) on CPU {:#x} changed:{}",
                power_state,
                mpidr,
                Changed(changed)
            );
            Ok(())
        }
        smp::Suspended::Resumed(_) => fail!(
            "CPU {:#x}: CPU_SUSPEND({:#x}) came back at the entry point; it must return",
            mpidr,
            power_state
        ),
    }
}

/// Every CPU (the boot CPU last), then no CPU entered at the CPU_ON entry.
fn suspend_every_cpu(
    power_state: u64,
    check: impl Fn(usize, smp::Suspended, u64) -> TestResult,
) -> TestResult {
    let before = all_arrivals();
    for slot in (1..smp::count()).chain([0]) {
        let (outcome, context) = suspend_once(slot, power_state)?;
        check(slot, outcome, context)?;
    }
    no_new_arrivals(&before, "CPU_SUSPEND")
}

fn cpu_suspend_standby(boot: &BootInfo) -> TestResult {
    suspend_setup(boot)?;
    suspend_every_cpu(STANDBY, |slot, outcome, _| {
        check_returned(slot, STANDBY, outcome, psci::SUCCESS)
    })
}

fn cpu_suspend_powerdown(boot: &BootInfo) -> TestResult {
    suspend_setup(boot)?;
    suspend_every_cpu(POWERDOWN, |slot, outcome, context| match outcome {
        smp::Suspended::Returned { .. } => {
            check_returned(slot, POWERDOWN, outcome, POWERDOWN_RETURNS)
        }
        // A real powerdown: back at the entry given, as CPU_ON arrives.
        smp::Suspended::Resumed(a) => check_arrival(slot, &a, context, false),
    })
}

fn cpu_suspend_bad_power_state(boot: &BootInfo) -> TestResult {
    suspend_setup(boot)?;
    suspend_every_cpu(CLUSTER_STANDBY, |slot, outcome, _| {
        check_returned(slot, CLUSTER_STANDBY, outcome, CLUSTER_ANSWER)
    })
}

// ---------------------------------------------------------------------
// Concurrent host calls.

/// Test blocks (block k at TEST_BASE + k × 2 MiB).
const B_DISJOINT_SHARE: u64 = 0;
const B_DISJOINT_DONATE: u64 = 1;
const B_CONTEST_SHARE: u64 = 2;
const B_CONTEST_DONATE: u64 = 3;
const B_CONTEST_MIXED: u64 = 4;
const B_SPLIT_MERGE: u64 = 5;
const NR_BLOCKS: u64 = 6;
/// The anchor page that keeps a donate/reclaim block split.
const ANCHOR: u64 = BLOCK / PAGE - 1;

/// Pages of its own each CPU uses in the disjoint tests.
const OWN_PAGES: u64 = 8;
const DISJOINT_ITERS: u64 = 1500;
/// Pages every CPU fights over, and rounds of the contests.
const CONTEST_PAGES: u64 = 3;
const CONTEST_ITERS: usize = 1500;

fn pfn(block: u64, page: u64) -> u64 {
    (TEST_BASE + block * BLOCK) / PAGE + page
}

/// Successful hypercalls of this suite, on every CPU: what HYP_STATS 5
/// must have counted.
static OK_CALLS: AtomicU64 = AtomicU64::new(0);

/// Calls under way on all CPUs, and the most there ever were at once since
/// the workload began: proof that the CPUs' calls overlapped.
static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
static MAX_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

fn hc(id: u64, a1: u64, a2: u64) -> Regs {
    let now = IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1;
    MAX_IN_FLIGHT.fetch_max(now, Ordering::Relaxed);
    let r = crate::hvc(id, [a1, a2, 0, 0, 0]);
    IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    if r.status() == status::SUCCESS {
        OK_CALLS.fetch_add(1, Ordering::Relaxed);
    }
    r
}

fn call_name(id: u64) -> &'static str {
    match id {
        func::HOST_SHARE_HYP => "HOST_SHARE_HYP",
        func::HOST_UNSHARE_HYP => "HOST_UNSHARE_HYP",
        func::HOST_DONATE_HYP => "HOST_DONATE_HYP",
        func::HOST_RECLAIM => "HOST_RECLAIM",
        func::MEM_STATE => "MEM_STATE",
        _ => "call",
    }
}

/// (owner, host state) as MEM_STATE x1, x2.
const OWNED: (u64, u64) = (owner::HOST, 0);
const SHARED: (u64, u64) = (owner::HOST, 1);
const DONATED: (u64, u64) = (owner::HYP, 3);

/// The first thing that went wrong on each CPU during a workload.
struct Problem {
    set: AtomicU64,
    iter: AtomicU64,
    id: AtomicU64,
    a1: AtomicU64,
    a2: AtomicU64,
    got: AtomicU64,
    /// What was expected: one of the `WANT_*`.
    want: AtomicU64,
}

/// What a [`Problem`] expected.
const WANT_SUCCESS: u64 = 0;
const WANT_SUCCESS_OR_DENIED: u64 = 1;
/// MEM_STATE (a1 = pfn, a2 = size, got = packed (owner, state)).
const WANT_VALID_STATE: u64 = 2;
/// A reclaimed page reads zero (a1 = pfn, got = the value read).
const WANT_ZERO: u64 = 3;
/// A write of the host's own page read back: `a2` holds what was written.
const WANT_READBACK: u64 = 4;

#[allow(clippy::declare_interior_mutable_const)]
const PROBLEM_INIT: Problem = Problem {
    set: AtomicU64::new(0),
    iter: AtomicU64::new(0),
    id: AtomicU64::new(0),
    a1: AtomicU64::new(0),
    a2: AtomicU64::new(0),
    got: AtomicU64::new(0),
    want: AtomicU64::new(0),
};

static PROBLEMS: [Problem; MAX_CPUS] = [PROBLEM_INIT; MAX_CPUS];
/// Iterations each CPU has completed in the current workload.
static PROGRESS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Records the first problem of `slot`; always `Err` so jobs can `?` it.
fn problem(slot: usize, iter: u64, id: u64, a: (u64, u64), got: u64, want: u64) -> Result<(), ()> {
    let p = &PROBLEMS[slot];
    if p.set.load(Ordering::Relaxed) == 0 {
        p.iter.store(iter, Ordering::Relaxed);
        p.id.store(id, Ordering::Relaxed);
        p.a1.store(a.0, Ordering::Relaxed);
        p.a2.store(a.1, Ordering::Relaxed);
        p.got.store(got, Ordering::Relaxed);
        p.want.store(want, Ordering::Relaxed);
        p.set.store(1, Ordering::Release);
    }
    Err(())
}

fn pack(v: (u64, u64)) -> u64 {
    v.0 << 32 | v.1
}

/// `id(a1, a2)` must return SUCCESS.
fn must(slot: usize, iter: u64, id: u64, a1: u64, a2: u64) -> Result<Regs, ()> {
    let r = hc(id, a1, a2);
    if r.status() != status::SUCCESS {
        problem(slot, iter, id, (a1, a2), r.0[0], WANT_SUCCESS)?;
    }
    Ok(r)
}

/// MEM_STATE(p) must succeed and show one of `allowed`.
fn state_in(slot: usize, iter: u64, p: u64, allowed: &[(u64, u64)]) -> Result<(u64, u64), ()> {
    let r = must(slot, iter, func::MEM_STATE, p, 0)?;
    let got = (r.0[1], r.0[2]);
    let sized_right = match got {
        DONATED => r.0[3] == 0,
        _ => r.0[3] != 0,
    };
    if !allowed.contains(&got) || !sized_right {
        problem(
            slot,
            iter,
            func::MEM_STATE,
            (p, r.0[3]),
            pack(got),
            WANT_VALID_STATE,
        )?;
    }
    Ok(got)
}

/// Reports the CPUs' first problems and any CPU that did not finish.
fn workload_result(name: &str, finished: Result<(), u64>) -> TestResult {
    for (slot, p) in PROBLEMS.iter().enumerate().take(smp::count()) {
        if p.set.load(Ordering::Acquire) == 0 {
            continue;
        }
        let id = p.id.load(Ordering::Relaxed);
        let (a1, a2) = (p.a1.load(Ordering::Relaxed), p.a2.load(Ordering::Relaxed));
        let (got, want) = (
            p.got.load(Ordering::Relaxed),
            p.want.load(Ordering::Relaxed),
        );
        let iter = p.iter.load(Ordering::Relaxed);
        let cpu = smp::mpidr(slot);
        match want {
            WANT_VALID_STATE => fail!(
                "{}: CPU {:#x}, round {}: MEM_STATE({:#x}) = (owner {}, state {}, size {:#x}), not a state this workload allows",
                name, cpu, iter, a1, got >> 32, got as u32, a2
            ),
            WANT_READBACK => fail!(
                "{}: CPU {:#x}, round {}: the host's own page {:#x} read back {:#x} after writing {:#x}",
                name, cpu, iter, a1, got, a2
            ),
            WANT_ZERO => fail!(
                "{}: CPU {:#x}, round {}: page {:#x} reads {:#x} after HOST_RECLAIM, expected zero",
                name, cpu, iter, a1, got
            ),
            _ => fail!(
                "{}: CPU {:#x}, round {}: {}({:#x}, {}) = {}, expected {}",
                name,
                cpu,
                iter,
                call_name(id),
                a1,
                a2,
                got as i64,
                if want == WANT_SUCCESS { "SUCCESS" } else { "SUCCESS or DENIED" }
            ),
        }
    }
    if let Err(stuck) = finished {
        let slot = stuck.trailing_zeros() as usize;
        fail!(
            "{}: CPU {:#x} did not finish in {} ms (at round {}): deadlock or livelock",
            name,
            smp::mpidr(slot),
            WORKLOAD_MS,
            PROGRESS[slot].load(Ordering::Relaxed)
        );
    }
    Ok(())
}

/// Start line: every CPU waits here so the workload really overlaps.
static READY: AtomicUsize = AtomicUsize::new(0);

fn start_together() {
    READY.fetch_add(1, Ordering::AcqRel);
    let n = smp::count();
    smp::wait_until(ARRIVAL_MS, || READY.load(Ordering::Acquire) >= n);
}

/// Runs `job` on every CPU at once and reports how it went.
fn workload(name: &str, job: fn(usize)) -> TestResult {
    workload_of(name, job, true)
}

/// [`workload`]; `calls_overlap`: whether several CPUs make calls (then
/// some of their calls must have been under way at once).
fn workload_of(name: &str, job: fn(usize), calls_overlap: bool) -> TestResult {
    for slot in 0..MAX_CPUS {
        PROBLEMS[slot].set.store(0, Ordering::Relaxed);
        PROGRESS[slot].store(0, Ordering::Relaxed);
        LOG_LEN[slot].store(0, Ordering::Relaxed);
    }
    READY.store(0, Ordering::Release);
    MAX_IN_FLIGHT.store(0, Ordering::Relaxed);
    let finished = smp::run_on_all(job, WORKLOAD_MS);
    workload_result(name, finished)?;
    let most = MAX_IN_FLIGHT.load(Ordering::Relaxed);
    ensure!(
        most >= 2 || !calls_overlap,
        "{}: the CPUs' calls never overlapped (at most {} at once)",
        name,
        most
    );
    Ok(())
}

/// A small per-CPU pseudo-random sequence (xorshift64).
struct Rng(u64);

impl Rng {
    fn new(slot: usize, salt: u64) -> Self {
        Rng((slot as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Snapshot before the first workload, for the accounting at the end.
static BASE_FREE: AtomicU64 = AtomicU64::new(u64::MAX);
static BASE_TABLES: AtomicU64 = AtomicU64::new(0);
static BASE_HYPERCALLS: AtomicU64 = AtomicU64::new(0);
static BASE_OK_CALLS: AtomicU64 = AtomicU64::new(0);

fn stat_of(index: u64) -> Result<u64, Failure> {
    let r = hc(func::HYP_STATS, index, 0);
    ensure!(
        r.status() == status::SUCCESS,
        "HYP_STATS({}) = {}",
        index,
        r.status()
    );
    Ok(r.0[1])
}

fn invariants(after: &str) -> TestResult {
    let r = hc(func::KEEL_CHECK_INVARIANTS, 0, 0);
    ensure!(
        r.status() == status::SUCCESS,
        "KEEL_CHECK_INVARIANTS after {} = {} (address {:#x}; the hypervisor's log says which)",
        after,
        r.status(),
        r.0[1]
    );
    Ok(())
}

/// Before the first workload: the test blocks are host memory, mapped
/// whole; the pool and counters are recorded.
fn baseline(boot: &BootInfo) -> TestResult {
    if BASE_FREE.load(Ordering::Relaxed) != u64::MAX {
        return Ok(());
    }
    for k in 0..NR_BLOCKS {
        test_block(boot, k)?;
    }
    invariants("boot")?;
    // HYP_STATS 5 does not count the call that reads it (it is counted
    // after answering), so the count starts with that call.
    BASE_OK_CALLS.store(OK_CALLS.load(Ordering::Relaxed), Ordering::Relaxed);
    BASE_HYPERCALLS.store(stat_of(stat::HYPERCALLS)?, Ordering::Relaxed);
    BASE_TABLES.store(stat_of(stat::TABLE_PAGES)?, Ordering::Relaxed);
    BASE_FREE.store(stat_of(stat::FREE_POOL_PAGES)?, Ordering::Relaxed);
    Ok(())
}

/// After a workload: every page of `block` back to the host (unshared,
/// reclaimed, the anchor too), the block mapped whole again, invariants.
fn restore_block(block: u64, name: &str) -> TestResult {
    for page in 0..BLOCK / PAGE {
        let p = pfn(block, page);
        let r = hc(func::MEM_STATE, p, 0);
        ensure!(
            r.status() == status::SUCCESS,
            "MEM_STATE({:#x}) = {}",
            p,
            r.status()
        );
        let undo = match (r.0[1], r.0[2]) {
            SHARED => func::HOST_UNSHARE_HYP,
            DONATED => func::HOST_RECLAIM,
            _ => continue,
        };
        let r = hc(undo, p, 1);
        ensure!(
            r.status() == status::SUCCESS,
            "{}: cleaning up, {}({:#x}, 1) = {}",
            name,
            call_name(undo),
            p,
            r.status()
        );
    }
    for p in [pfn(block, 0), pfn(block, ANCHOR)] {
        let r = hc(func::MEM_STATE, p, 0);
        ensure!(
            (r.0[1], r.0[2], r.0[3]) == (owner::HOST, 0, BLOCK),
            "{}: after clean-up MEM_STATE({:#x}) = ({}, {}, {:#x}), expected the host's, 2 MiB",
            name,
            p,
            r.0[1],
            r.0[2],
            r.0[3]
        );
    }
    invariants(name)
}

/// Donates the anchor page of `block` (and warms up: the hypervisor's
/// stage 1 for the block is built now, not during the workload).
fn anchor(block: u64) -> TestResult {
    let r = hc(func::HOST_DONATE_HYP, pfn(block, ANCHOR), 1);
    ensure!(
        r.status() == status::SUCCESS,
        "donating the anchor page {:#x} = {}",
        pfn(block, ANCHOR),
        r.status()
    );
    for page in 0..ANCHOR {
        for id in [func::HOST_DONATE_HYP, func::HOST_RECLAIM] {
            let r = hc(id, pfn(block, page), 1);
            ensure!(
                r.status() == status::SUCCESS,
                "warm-up {}({:#x}) = {}",
                call_name(id),
                pfn(block, page),
                r.status()
            );
        }
    }
    Ok(())
}

fn job_disjoint_share(slot: usize) {
    let _ = disjoint_share(slot);
}

fn disjoint_share(slot: usize) -> Result<(), ()> {
    let first = pfn(B_DISJOINT_SHARE, slot as u64 * OWN_PAGES);
    let mut rng = Rng::new(slot, 1);
    start_together();
    for it in 0..DISJOINT_ITERS {
        let nr = 1 + rng.below(4);
        let p = first + rng.below(OWN_PAGES - nr + 1);
        must(slot, it, func::HOST_SHARE_HYP, p, nr)?;
        state_in(slot, it, p + rng.below(nr), &[SHARED])?;
        must(slot, it, func::HOST_UNSHARE_HYP, p, nr)?;
        state_in(slot, it, p + rng.below(nr), &[OWNED])?;
        PROGRESS[slot].store(it + 1, Ordering::Relaxed);
    }
    Ok(())
}

fn concurrent_disjoint_share_unshare(boot: &BootInfo) -> TestResult {
    need_cpus()?;
    baseline(boot)?;
    workload("disjoint share/unshare", job_disjoint_share)?;
    restore_block(B_DISJOINT_SHARE, "disjoint share/unshare")
}

/// A value per address, so a page read back unzeroed shows.
fn pattern(addr: u64) -> u64 {
    addr.rotate_left(23) ^ 0x736d_705f_7465_7374
}

/// Words of a page the donate test writes and reads back.
const PROBED_WORDS: [u64; 3] = [0, 2048, PAGE - 8];

fn job_disjoint_donate(slot: usize) {
    let _ = disjoint_donate(slot);
}

fn disjoint_donate(slot: usize) -> Result<(), ()> {
    let first = pfn(B_DISJOINT_DONATE, slot as u64 * OWN_PAGES);
    let mut rng = Rng::new(slot, 2);
    start_together();
    for it in 0..DISJOINT_ITERS {
        let nr = 1 + rng.below(4);
        let p = first + rng.below(OWN_PAGES - nr + 1);
        for page in p..p + nr {
            for w in PROBED_WORDS {
                let a = page * PAGE + w;
                // SAFETY: this CPU's own test page, host memory that
                // nothing else uses, mapped Normal by stage 1 and 2.
                unsafe { core::ptr::write_volatile(a as *mut u64, pattern(a)) };
            }
        }
        must(slot, it, func::HOST_DONATE_HYP, p, nr)?;
        state_in(slot, it, p + rng.below(nr), &[DONATED])?;
        must(slot, it, func::HOST_RECLAIM, p, nr)?;
        state_in(slot, it, p + rng.below(nr), &[OWNED])?;
        for page in p..p + nr {
            for w in PROBED_WORDS {
                let a = page * PAGE + w;
                // SAFETY: as above; the page is the host's again.
                let v = unsafe { core::ptr::read_volatile(a as *const u64) };
                if v != 0 {
                    problem(slot, it, func::HOST_RECLAIM, (page, nr), v, WANT_ZERO)?;
                }
            }
        }
        PROGRESS[slot].store(it + 1, Ordering::Relaxed);
    }
    Ok(())
}

fn concurrent_disjoint_donate_reclaim(boot: &BootInfo) -> TestResult {
    need_cpus()?;
    baseline(boot)?;
    anchor(B_DISJOINT_DONATE)?;
    workload("disjoint donate/reclaim", job_disjoint_donate)?;
    restore_block(B_DISJOINT_DONATE, "disjoint donate/reclaim")
}

// The contests: every CPU on the same pages.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Share = 0,
    Unshare = 1,
    Donate = 2,
    Reclaim = 3,
}

impl Op {
    fn id(self) -> u64 {
        match self {
            Op::Share => func::HOST_SHARE_HYP,
            Op::Unshare => func::HOST_UNSHARE_HYP,
            Op::Donate => func::HOST_DONATE_HYP,
            Op::Reclaim => func::HOST_RECLAIM,
        }
    }
}

/// One successful call: when it was issued and when it returned (virtual
/// counter), what and on which pages (as page index, count, op).
#[derive(Clone, Copy)]
struct Entry {
    t0: u64,
    t1: u64,
    op: u8,
    first: u8,
    nr: u8,
}

const LOG_CAP: usize = 2 * CONTEST_ITERS;

struct Log(UnsafeCell<[[Entry; LOG_CAP]; MAX_CPUS]>);

// SAFETY: row i is written only by the CPU in slot i during a workload and
// read by the boot CPU only after the workload's end, which `run_on_all`
// orders (Release by the worker, Acquire by the boot CPU).
unsafe impl Sync for Log {}

const NO_ENTRY: Entry = Entry {
    t0: 0,
    t1: 0,
    op: 0,
    first: 0,
    nr: 0,
};
static LOG: Log = Log(UnsafeCell::new([[NO_ENTRY; LOG_CAP]; MAX_CPUS]));
static LOG_LEN: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

fn log(slot: usize, e: Entry) {
    let len = LOG_LEN[slot].load(Ordering::Relaxed);
    if len < LOG_CAP {
        // SAFETY: slot's own row (see `Log`).
        unsafe { (*LOG.0.get())[slot][len] = e };
        LOG_LEN[slot].store(len + 1, Ordering::Relaxed);
    }
}

/// Which calls the contest makes; the states MEM_STATE may show.
static CONTEST_OPS: AtomicUsize = AtomicUsize::new(0);
const OPS_SHARE: usize = 0;
const OPS_DONATE: usize = 1;
const OPS_MIXED: usize = 2;
static CONTEST_BLOCK: AtomicU64 = AtomicU64::new(0);
/// Calls of the contest refused with DENIED (the others' doing).
static DENIALS: AtomicU64 = AtomicU64::new(0);

fn job_contest(slot: usize) {
    let _ = contest(slot);
}

fn contest(slot: usize) -> Result<(), ()> {
    let ops = CONTEST_OPS.load(Ordering::Relaxed);
    let block = CONTEST_BLOCK.load(Ordering::Relaxed);
    let (pair, allowed): ([Op; 2], &[(u64, u64)]) = match ops {
        OPS_SHARE => ([Op::Share, Op::Unshare], &[OWNED, SHARED]),
        OPS_DONATE => ([Op::Donate, Op::Reclaim], &[OWNED, DONATED]),
        _ => ([Op::Share, Op::Unshare], &[OWNED, SHARED, DONATED]),
    };
    let mut rng = Rng::new(slot, 3 + ops as u64);
    start_together();
    for it in 0..CONTEST_ITERS {
        for paired in pair {
            let op = if ops == OPS_MIXED {
                [Op::Share, Op::Unshare, Op::Donate, Op::Reclaim][rng.below(4) as usize]
            } else {
                paired
            };
            let nr = 1 + rng.below(2);
            let first = rng.below(CONTEST_PAGES - nr + 1);
            let p = pfn(block, first);
            let t0 = smp::now();
            let r = hc(op.id(), p, nr);
            let t1 = smp::now();
            match r.status() {
                status::SUCCESS => log(
                    slot,
                    Entry {
                        t0,
                        t1,
                        op: op as u8,
                        first: first as u8,
                        nr: nr as u8,
                    },
                ),
                status::DENIED => {
                    DENIALS.fetch_add(1, Ordering::Relaxed);
                }
                s => problem(
                    slot,
                    it as u64,
                    op.id(),
                    (p, nr),
                    s as u64,
                    WANT_SUCCESS_OR_DENIED,
                )?,
            }
            state_in(
                slot,
                it as u64,
                pfn(block, rng.below(CONTEST_PAGES)),
                allowed,
            )?;
        }
        PROGRESS[slot].store(it as u64 + 1, Ordering::Relaxed);
    }
    Ok(())
}

/// Scratch for [`check_history`] (boot CPU only).
struct Scratch(UnsafeCell<[[u64; LOG_CAP * MAX_CPUS]; 4]>);
// SAFETY: used only by the boot CPU, in `check_history`.
unsafe impl Sync for Scratch {}
static SCRATCH: Scratch = Scratch(UnsafeCell::new([[0; LOG_CAP * MAX_CPUS]; 4]));

/// Checks that the successful `raise`/`lower` calls on `page` (e.g.
/// share/unshare) can be put in one order in which they alternate,
/// starting with `raise`, consistent with when each was issued and
/// returned: at any moment t, the raises that had returned can exceed the
/// lowers that had been issued by at most one (never two shares without an
/// unshare between), and the lowers that had returned cannot exceed the
/// raises that had been issued. Returns raises − lowers, which is 1 iff
/// the page ends raised.
fn check_history(page: u64, raise: Op, lower: Op) -> Result<i64, Failure> {
    // SAFETY: the boot CPU alone uses the scratch, and the workers have
    // finished writing their logs (see `Log`).
    let [raise_t0, raise_t1, lower_t0, lower_t1] = unsafe { &mut *SCRATCH.0.get() };
    let (mut nr_raise, mut nr_lower) = (0, 0);
    for slot in 0..smp::count() {
        let len = LOG_LEN[slot].load(Ordering::Acquire);
        // SAFETY: see `Log`.
        let rows = unsafe { &*LOG.0.get() };
        let row = &rows[slot][..len];
        for e in row {
            if !(u64::from(e.first)..u64::from(e.first + e.nr)).contains(&page) {
                continue;
            }
            if e.op == raise as u8 {
                raise_t0[nr_raise] = e.t0;
                raise_t1[nr_raise] = e.t1;
                nr_raise += 1;
            } else if e.op == lower as u8 {
                lower_t0[nr_lower] = e.t0;
                lower_t1[nr_lower] = e.t1;
                nr_lower += 1;
            }
        }
    }
    let (raise_t0, raise_t1) = (&mut raise_t0[..nr_raise], &mut raise_t1[..nr_raise]);
    let (lower_t0, lower_t1) = (&mut lower_t0[..nr_lower], &mut lower_t1[..nr_lower]);
    for s in [
        &mut *raise_t0,
        &mut *raise_t1,
        &mut *lower_t0,
        &mut *lower_t1,
    ] {
        s.sort_unstable();
    }
    let upto = |s: &[u64], t: u64| s.partition_point(|&v| v <= t);
    let name = |op: Op| call_name(op.id());
    for &t in raise_t1.iter() {
        let (done, begun) = (upto(raise_t1, t), upto(lower_t0, t));
        ensure!(
            done <= begun + 1,
            "page {}: by tick {}, {} successful {} had returned but only {} {} had been issued: two without one between",
            page, t, done, name(raise), begun, name(lower)
        );
    }
    for &t in lower_t1.iter() {
        let (done, begun) = (upto(lower_t1, t), upto(raise_t0, t));
        ensure!(
            done <= begun,
            "page {}: by tick {}, {} successful {} had returned but only {} {} had been issued",
            page,
            t,
            done,
            name(lower),
            begun,
            name(raise)
        );
    }
    Ok(nr_raise as i64 - nr_lower as i64)
}

/// Runs a contest on `block`, then checks each page's history and that
/// the totals agree with the page's final state.
fn run_contest(name: &str, ops: usize, block: u64) -> TestResult {
    CONTEST_OPS.store(ops, Ordering::Relaxed);
    CONTEST_BLOCK.store(block, Ordering::Relaxed);
    DENIALS.store(0, Ordering::Relaxed);
    workload(name, job_contest)?;
    let mut total = 0;
    for (slot, len) in LOG_LEN.iter().enumerate().take(smp::count()) {
        let len = len.load(Ordering::Acquire);
        ensure!(
            len > 0,
            "{}: CPU {:#x} never succeeded",
            name,
            smp::mpidr(slot)
        );
        total += len;
    }
    let denied = DENIALS.load(Ordering::Relaxed);
    crate::println!(
        "smp: {}: {} CPUs x {} rounds on {} pages: {} calls succeeded, {} denied, up to {} at once",
        name,
        smp::count(),
        CONTEST_ITERS,
        CONTEST_PAGES,
        total,
        denied,
        MAX_IN_FLIGHT.load(Ordering::Relaxed)
    );
    ensure!(total >= 100, "{}: only {} calls succeeded", name, total);
    for page in 0..CONTEST_PAGES {
        let shared = check_history(page, Op::Share, Op::Unshare)?;
        let donated = check_history(page, Op::Donate, Op::Reclaim)?;
        let p = pfn(block, page);
        let r = hc(func::MEM_STATE, p, 0);
        let now = (r.0[1], r.0[2]);
        let want = match (shared, donated) {
            (0, 0) => OWNED,
            (1, 0) => SHARED,
            (0, 1) => DONATED,
            _ => fail!(
                "{}: page {:#x}: successful shares − unshares = {}, donates − reclaims = {}",
                name,
                p,
                shared,
                donated
            ),
        };
        ensure!(
            now == want,
            "{}: page {:#x} ends as (owner {}, state {}), but the successful calls say ({}, {})",
            name,
            p,
            now.0,
            now.1,
            want.0,
            want.1
        );
    }
    restore_block(block, name)
}

fn concurrent_overlapping_share_unshare(boot: &BootInfo) -> TestResult {
    need_cpus()?;
    baseline(boot)?;
    run_contest("overlapping share/unshare", OPS_SHARE, B_CONTEST_SHARE)
}

fn concurrent_overlapping_donate_reclaim(boot: &BootInfo) -> TestResult {
    need_cpus()?;
    baseline(boot)?;
    anchor(B_CONTEST_DONATE)?;
    run_contest("overlapping donate/reclaim", OPS_DONATE, B_CONTEST_DONATE)
}

fn concurrent_overlapping_mixed(boot: &BootInfo) -> TestResult {
    need_cpus()?;
    baseline(boot)?;
    anchor(B_CONTEST_MIXED)?;
    run_contest("overlapping mixed", OPS_MIXED, B_CONTEST_MIXED)
}

fn invariants_and_accounting_after(_: &BootInfo) -> TestResult {
    need_cpus()?;
    ensure!(
        BASE_FREE.load(Ordering::Relaxed) != u64::MAX,
        "no workload ran"
    );
    invariants("every workload")?;
    let calls = OK_CALLS.load(Ordering::Relaxed) - BASE_OK_CALLS.load(Ordering::Relaxed);
    let counted = stat_of(stat::HYPERCALLS)? - BASE_HYPERCALLS.load(Ordering::Relaxed);
    ensure!(
        counted == calls,
        "HYP_STATS 5 grew by {} while the CPUs made {} successful calls",
        counted,
        calls
    );
    let (tables, free) = (stat_of(stat::TABLE_PAGES)?, stat_of(stat::FREE_POOL_PAGES)?);
    let (base_tables, base_free) = (
        BASE_TABLES.load(Ordering::Relaxed),
        BASE_FREE.load(Ordering::Relaxed),
    );
    ensure!(
        tables + free == base_tables + base_free,
        "pool not conserved: tables {} + free {} before, {} + {} after every page came back",
        base_tables,
        base_free,
        tables,
        free
    );
    // Every CPU is still alive and answering.
    for slot in 1..smp::count() {
        smp::post(slot, job_nothing);
    }
    ensure!(
        smp::wait_until(ARRIVAL_MS, || (1..smp::count()).all(smp::idle)),
        "a CPU stopped answering after the workloads"
    );
    Ok(())
}

/// Set by the boot CPU when its donate/reclaim rounds are over.
static STOP: AtomicU64 = AtomicU64::new(0);
const SPLIT_MERGE_ROUNDS: u64 = 2000;

fn job_split_merge(slot: usize) {
    let _ = if slot == 0 {
        split_merge(slot)
    } else {
        touch_own_pages(slot)
    };
}

/// The boot CPU: donate and reclaim the block's last page, so that every
/// donate splits the 2 MiB block and every reclaim merges it again.
fn split_merge(slot: usize) -> Result<(), ()> {
    let p = pfn(B_SPLIT_MERGE, ANCHOR);
    start_together();
    let result = (|| {
        for it in 0..SPLIT_MERGE_ROUNDS {
            must(slot, it, func::HOST_DONATE_HYP, p, 1)?;
            must(slot, it, func::HOST_RECLAIM, p, 1)?;
            PROGRESS[slot].store(it + 1, Ordering::Relaxed);
        }
        Ok(())
    })();
    STOP.store(1, Ordering::Release);
    result
}

/// The others: write and read back pages of their own in the same block
/// until the boot CPU is done.
fn touch_own_pages(slot: usize) -> Result<(), ()> {
    let first = TEST_BASE + B_SPLIT_MERGE * BLOCK + slot as u64 * OWN_PAGES * PAGE;
    start_together();
    let mut rounds = 0;
    while STOP.load(Ordering::Acquire) == 0 {
        for a in (first..first + OWN_PAGES * PAGE).step_by(PAGE as usize) {
            let v = pattern(a) ^ rounds;
            // SAFETY: this CPU's own test page: host memory nothing else
            // uses, which stays the host's throughout.
            let back = unsafe {
                core::ptr::write_volatile(a as *mut u64, v);
                core::ptr::read_volatile(a as *const u64)
            };
            if back != v {
                problem(slot, rounds, 0, (a / PAGE, v), back, WANT_READBACK)?;
            }
        }
        rounds += 1;
        PROGRESS[slot].store(rounds, Ordering::Relaxed);
    }
    Ok(())
}

/// Host accesses to host pages must work while another CPU splits or
/// merges the 2 MiB block they are in. keel replaces the block entry with
/// break-before-make, so such an access can fault to EL2 in that window;
/// keel must then let the access retry (the page is the host's), not
/// inject an abort. An injected abort shows as an unexpected exception
/// (EC 0x25, FSC 0x10, FAR in block 5) on a secondary, which ends the run.
fn host_access_during_split_merge(boot: &BootInfo) -> TestResult {
    need_cpus()?;
    baseline(boot)?;
    STOP.store(0, Ordering::Release);
    workload_of("host access during split/merge", job_split_merge, false)?;
    for (slot, progress) in PROGRESS.iter().enumerate().take(smp::count()).skip(1) {
        ensure!(
            progress.load(Ordering::Relaxed) > 0,
            "CPU {:#x} never touched its pages while the block was split and merged",
            smp::mpidr(slot)
        );
    }
    restore_block(B_SPLIT_MERGE, "host access during split/merge")
}
