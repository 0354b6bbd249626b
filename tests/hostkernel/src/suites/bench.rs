//! `bench`: costs of the host's calls, measured from EL1 and printed as
//! `bench NAME VALUE UNIT` lines that tests/bench.py turns into figures.
//!
//! The clock is the PMU cycle counter PMCCNTR_EL0 when the CPU has a PMU
//! (keel leaves the host every counter: MDCR_EL2.HPMN = PMCR_EL0.N, no
//! traps), set to count at EL2 too (PMCCFILTR_EL0.NSH), so a call's time
//! includes the hypervisor's; otherwise the generic timer's CNTVCT_EL0.
//! QEMU's TCG derives PMCCNTR from its virtual clock at 1 GHz: tests/bench.py
//! boots this suite with `-icount shift=0`, where that clock advances one
//! nanosecond per instruction, so the cycle counts are instruction counts,
//! the same on every run and every host.
//!
//! Each figure is the median of many samples, less the cost of reading the
//! clock twice (`bench clock_overhead`).

use core::sync::atomic::{AtomicU8, Ordering};

use keel_abi::func;

use crate::dt::BootInfo;
use crate::harness::{Failure, Suite, Test, TestResult};
use crate::suites::host_abi::{test_block, BLOCK_PAGES, PAGE};
use crate::{ensure, fail, println};

pub static SUITE: Suite = Suite {
    name: "bench",
    tests: &[
        Test {
            name: "hvc_null",
            run: hvc_null,
        },
        Test {
            name: "share_unshare_4k",
            run: share_unshare_4k,
        },
        Test {
            name: "donate_reclaim_4k",
            run: donate_reclaim_4k,
        },
        Test {
            name: "donate_reclaim_2m",
            run: donate_reclaim_2m,
        },
        Test {
            name: "guest_1g_tables",
            run: crate::suites::guests::bench_guest_1g_tables,
        },
        Test {
            name: "guest_share_unshare",
            run: crate::suites::guests::bench_guest_share_unshare,
        },
        Test {
            name: "vm_destroy",
            run: crate::suites::guests::bench_vm_destroy,
        },
    ],
};

/// Test blocks (host_abi::test_block numbering) of the bench, clear of
/// the host-abi suite's.
const BLOCK_4K_SHARE: u64 = 16;
const BLOCK_4K_DONATE: u64 = 17;
const BLOCK_4K_DONATE_SPLIT: u64 = 18;
const BLOCK_2M: u64 = 19;

const MAX_SAMPLES: usize = 1024;
/// Unmeasured rounds before sampling: the first call into a new 2 MiB
/// region also builds the hypervisor's stage-1 table for it.
const WARMUP: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Clock {
    Cycles = 1,
    Ticks = 2,
}

/// The clock `clock()` chose: 0 before, else a `Clock`.
static CLOCK: AtomicU8 = AtomicU8::new(0);

fn has_pmu() -> bool {
    let dfr0: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { core::arch::asm!("mrs {}, id_aa64dfr0_el1", out(reg) dfr0, options(nomem, nostack)) };
    let pmuver = (dfr0 >> 8) & 0xf;
    pmuver != 0 && pmuver != 0xf
}

/// Picks and starts the clock (once).
fn clock() -> Clock {
    match CLOCK.load(Ordering::Relaxed) {
        1 => return Clock::Cycles,
        2 => return Clock::Ticks,
        _ => {}
    }
    let c = if has_pmu() {
        // SAFETY: EL1 owns the PMU here (keel sets no MDCR_EL2 trap).
        // PMCCFILTR_EL0: count at EL1 and EL2 (NSH), not at EL0 (U).
        // PMCR_EL0: E (enable), C (reset the cycle counter), LC (64-bit
        // overflow). PMCNTENSET_EL0.C enables the cycle counter.
        unsafe {
            core::arch::asm!(
                "msr pmccfiltr_el0, {filt}",
                "mrs {t}, pmcr_el0",
                "orr {t}, {t}, {bits}",
                "msr pmcr_el0, {t}",
                "msr pmcntenset_el0, {en}",
                "isb",
                filt = in(reg) (1u64 << 27) | (1 << 30),
                bits = in(reg) 1u64 | (1 << 2) | (1 << 6),
                en = in(reg) 1u64 << 31,
                t = out(reg) _,
                options(nostack),
            );
        }
        Clock::Cycles
    } else {
        Clock::Ticks
    };
    CLOCK.store(c as u8, Ordering::Relaxed);
    c
}

pub(crate) fn unit() -> &'static str {
    match clock() {
        Clock::Cycles => "cycles",
        Clock::Ticks => "ticks",
    }
}

/// The clock, with the instruction stream synchronised on both sides so
/// nothing of the measured code moves across the read.
#[inline(always)]
pub(crate) fn now() -> u64 {
    let v: u64;
    // SAFETY: reading the counters has no side effects; `clock()` enabled
    // the one read here before any measurement.
    unsafe {
        if CLOCK.load(Ordering::Relaxed) == Clock::Cycles as u8 {
            core::arch::asm!("isb", "mrs {}, pmccntr_el0", "isb", out(reg) v, options(nostack));
        } else {
            core::arch::asm!("isb", "mrs {}, cntvct_el0", "isb", out(reg) v, options(nostack));
        }
    }
    v
}

/// Samples of one measurement.
struct Samples {
    v: [u64; MAX_SAMPLES],
    len: usize,
}

impl Samples {
    /// Runs `f` `WARMUP + n` times; `f` returns the clock delta of its
    /// measured part.
    fn take(n: usize, mut f: impl FnMut() -> Result<u64, Failure>) -> Result<Self, Failure> {
        let mut s = Samples {
            v: [0; MAX_SAMPLES],
            len: 0,
        };
        for _ in 0..WARMUP {
            f()?;
        }
        for _ in 0..n.min(MAX_SAMPLES) {
            s.v[s.len] = f()?;
            s.len += 1;
        }
        Ok(s)
    }

    fn median(&mut self) -> u64 {
        let v = &mut self.v[..self.len];
        v.sort_unstable();
        v[v.len() / 2]
    }

    fn min_max(&self) -> (u64, u64) {
        let v = &self.v[..self.len];
        (
            v.iter().copied().min().unwrap_or(0),
            v.iter().copied().max().unwrap_or(0),
        )
    }
}

/// Median of two clock reads with nothing between them.
fn clock_overhead() -> u64 {
    let mut s = Samples::take(101, || {
        let t0 = now();
        let t1 = now();
        Ok(t1 - t0)
    })
    .unwrap_or(Samples {
        v: [0; MAX_SAMPLES],
        len: 1,
    });
    s.median()
}

/// Prints `bench NAME MEDIAN UNIT` (less the clock's own cost) and, for
/// people, the spread.
fn report(name: &str, s: &mut Samples) -> u64 {
    let overhead = clock_overhead();
    let m = s.median().saturating_sub(overhead);
    let (lo, hi) = s.min_max();
    println!(
        "bench {} {} {}   (n={}, min {}, max {}, clock overhead {})",
        name,
        m,
        unit(),
        s.len,
        lo.saturating_sub(overhead),
        hi.saturating_sub(overhead),
        overhead
    );
    m
}

/// One host call that must succeed.
#[inline(always)]
fn must(id: u64, pfn: u64, nr: u64) -> TestResult {
    let r = crate::hvc(id, [pfn, nr, 0, 0, 0]);
    if r.status() != 0 {
        fail!(
            "call {:#x}(pfn {:#x}, nr {}): status {}",
            id,
            pfn,
            nr,
            r.status()
        );
    }
    Ok(())
}

fn hvc_null(_: &BootInfo) -> TestResult {
    println!(
        "bench clock {} ({})",
        unit(),
        if clock() == Clock::Cycles {
            "PMCCNTR_EL0, EL1+EL2"
        } else {
            "CNTVCT_EL0"
        }
    );
    println!("bench clock_overhead {} {}", clock_overhead(), unit());
    let mut s = Samples::take(1001, || {
        let t0 = now();
        let r = crate::hvc(func::HYP_FEATURES, [0; 5]);
        let t1 = now();
        ensure!(r.status() == 0, "HYP_FEATURES: status {}", r.status());
        Ok(t1 - t0)
    })?;
    let m = report("hvc_null", &mut s);
    ensure!(m > 0, "a hypercall took no time: is the clock running?");
    Ok(())
}

fn share_unshare_4k(boot: &BootInfo) -> TestResult {
    let p = test_block(boot, BLOCK_4K_SHARE)? / PAGE;
    let mut s = Samples::take(301, || {
        let t0 = now();
        must(func::HOST_SHARE_HYP, p, 1)?;
        must(func::HOST_UNSHARE_HYP, p, 1)?;
        Ok(now() - t0)
    })?;
    report("share_unshare_4k", &mut s);
    Ok(())
}

fn donate_reclaim_4k(boot: &BootInfo) -> TestResult {
    // A whole 2 MiB host block: each donation splits it, each reclaim
    // merges it back (what a host giving the hypervisor a page costs).
    let p = test_block(boot, BLOCK_4K_DONATE)? / PAGE;
    let mut s = Samples::take(301, || {
        let t0 = now();
        must(func::HOST_DONATE_HYP, p, 1)?;
        must(func::HOST_RECLAIM, p, 1)?;
        Ok(now() - t0)
    })?;
    report("donate_reclaim_4k", &mut s);
    // The same in a block that stays split (a neighbour stays donated):
    // the cost without the split and the merge.
    let q = test_block(boot, BLOCK_4K_DONATE_SPLIT)? / PAGE;
    must(func::HOST_DONATE_HYP, q + 1, 1)?;
    let mut s = Samples::take(301, || {
        let t0 = now();
        must(func::HOST_DONATE_HYP, q, 1)?;
        must(func::HOST_RECLAIM, q, 1)?;
        Ok(now() - t0)
    })?;
    report("donate_reclaim_4k_split_block", &mut s);
    must(func::HOST_RECLAIM, q + 1, 1)
}

fn donate_reclaim_2m(boot: &BootInfo) -> TestResult {
    let p = test_block(boot, BLOCK_2M)? / PAGE;
    let mut s = Samples::take(31, || {
        let t0 = now();
        must(func::HOST_DONATE_HYP, p, BLOCK_PAGES)?;
        must(func::HOST_RECLAIM, p, BLOCK_PAGES)?;
        Ok(now() - t0)
    })?;
    report("donate_reclaim_2m", &mut s);
    Ok(())
}
