//! `isolation`: the host cannot read, write or execute the hypervisor's
//! memory; each attempt gets a synchronous external abort at the address,
//! and the host carries on (ABI.md, Host faults).
//!
//! The hypervisor's memory is what RAM has and the host's /memory lacks:
//! RAM is `ram=BASE:SIZE` from the bootargs (the runner passes QEMU's -m),
//! and ABI.md has the hypervisor remove its own memory from the host's
//! memory nodes. The image QEMU loaded at 0x40200000 must be in that hole.

use crate::dt::{BootInfo, Range, Ranges};
use crate::exception::{self, ec, Abort, FSC_SYNC_EXTERNAL};
use crate::harness::{Failure, Suite, Test, TestResult};
use crate::suites::boot::HYP_LOAD_ADDR;
use crate::{ensure, ensure_eq, fail};

pub static SUITE: Suite = Suite {
    name: "isolation",
    tests: &[
        Test {
            name: "hypervisor_memory_hidden",
            run: hypervisor_memory_hidden,
        },
        Test {
            name: "read_aborts",
            run: read_aborts,
        },
        Test {
            name: "write_aborts",
            run: write_aborts,
        },
        Test {
            name: "exec_aborts",
            run: exec_aborts,
        },
        Test {
            name: "repeated_reads_abort",
            run: repeated_reads_abort,
        },
        Test {
            name: "memory_works_after_aborts",
            run: memory_works_after_aborts,
        },
    ],
};

/// At most this many probe addresses (spread over every hole).
const MAX_SAMPLES: usize = 48;

/// Addresses spread over the hypervisor's memory: each hole's first and last
/// word, its second page, eighths in between, and the hypervisor's load
/// address. 8-byte aligned (so also 4-byte aligned for fetches).
struct Samples {
    addrs: [u64; MAX_SAMPLES],
    len: usize,
}

impl Samples {
    fn of(holes: &Ranges) -> Samples {
        let mut s = Samples {
            addrs: [0; MAX_SAMPLES],
            len: 0,
        };
        s.add(HYP_LOAD_ADDR, holes);
        for h in holes.iter() {
            s.add(h.start, holes);
            s.add(h.start + 0x1000 + 0x18, holes);
            for k in 1..8 {
                s.add(h.start + h.len() / 8 * k, holes);
            }
            s.add(h.end - 8, holes);
        }
        s
    }

    fn add(&mut self, addr: u64, holes: &Ranges) {
        let addr = addr & !7;
        if holes.contains(addr) && self.len < MAX_SAMPLES && !self.addrs[..self.len].contains(&addr)
        {
            self.addrs[self.len] = addr;
            self.len += 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.addrs[..self.len].iter().copied()
    }
}

fn hyp_memory(boot: &BootInfo) -> Result<Ranges, Failure> {
    let holes = boot.hyp_ranges();
    ensure!(
        !holes.is_empty(),
        "RAM {} has no part missing from host memory",
        boot.physical_ram()
    );
    ensure!(
        holes.contains(HYP_LOAD_ADDR),
        "the hypervisor's load address {:#x} is not in the memory hidden from the host",
        HYP_LOAD_ADDR
    );
    Ok(holes)
}

/// An abort is the one ABI.md promises: a synchronous external abort from
/// the current EL, of the expected class, reporting the address.
pub(crate) fn check_abort(abort: &Abort, class: u64, addr: u64, what: &str) -> TestResult {
    ensure!(
        abort.ec() == class,
        "{} {:#x}: EC {:#x}, expected {:#x} ({})",
        what,
        addr,
        abort.ec(),
        class,
        abort
    );
    ensure!(
        abort.fsc() == FSC_SYNC_EXTERNAL,
        "{} {:#x}: FSC {:#x}, expected a synchronous external abort {:#x} ({})",
        what,
        addr,
        abort.fsc(),
        FSC_SYNC_EXTERNAL,
        abort
    );
    ensure!(
        !abort.far_not_valid(),
        "{} {:#x}: ESR.FnV set ({})",
        what,
        addr,
        abort
    );
    ensure!(
        abort.far == addr,
        "{} {:#x}: FAR {:#x}",
        what,
        addr,
        abort.far
    );
    Ok(())
}

/// Reads `addr` expecting the isolation abort.
fn read_must_abort(addr: u64) -> TestResult {
    match exception::read(addr) {
        Ok(v) => fail!(
            "host read of hypervisor memory {:#x} succeeded: {:#x}",
            addr,
            v
        ),
        Err(abort) => check_abort(&abort, ec::DATA_ABORT_SAME, addr, "read"),
    }
}

fn hypervisor_memory_hidden(boot: &BootInfo) -> TestResult {
    let holes = hyp_memory(boot)?;
    // Nothing the host was handed may lie in the hypervisor's memory.
    for h in holes.iter() {
        let overlaps = |r: &Range| r.start < h.end && h.start < r.end;
        ensure!(
            !overlaps(&boot.image),
            "kernel image {} overlaps hypervisor memory {}",
            boot.image,
            h
        );
        ensure!(
            !overlaps(&boot.dtb),
            "device tree {} overlaps hypervisor memory {}",
            boot.dtb,
            h
        );
    }
    Ok(())
}

fn read_aborts(boot: &BootInfo) -> TestResult {
    let holes = hyp_memory(boot)?;
    for addr in Samples::of(&holes).iter() {
        read_must_abort(addr)?;
    }
    Ok(())
}

fn write_aborts(boot: &BootInfo) -> TestResult {
    let holes = hyp_memory(boot)?;
    for addr in Samples::of(&holes).iter() {
        // Only write where a read aborts: if isolation is broken, a write
        // would corrupt the hypervisor and hide the real failure.
        read_must_abort(addr)?;
        // SAFETY: the read aborted, so this address is not host memory; the
        // store either aborts (caught) or is the failure we report.
        let abort = unsafe { exception::write(addr, 0xdead_beef_0bad_cafe) };
        let Some(abort) = abort else {
            fail!("host write to hypervisor memory {:#x} succeeded", addr)
        };
        check_abort(&abort, ec::DATA_ABORT_SAME, addr, "write")?;
        ensure!(
            abort.esr & (1 << 6) != 0,
            "write {:#x}: ESR.WnR clear ({})",
            addr,
            abort
        );
    }
    Ok(())
}

fn exec_aborts(boot: &BootInfo) -> TestResult {
    let holes = hyp_memory(boot)?;
    for addr in Samples::of(&holes).iter() {
        // As for writes: never branch into memory that does not abort reads.
        read_must_abort(addr)?;
        // SAFETY: the read aborted, so the host's stage-2 does not map this
        // address and the fetch aborts too (caught) unless isolation is
        // broken in a way the read did not show.
        let abort = unsafe { exception::exec(addr) };
        let Some(abort) = abort else {
            fail!("host executed hypervisor memory {:#x} and returned", addr)
        };
        check_abort(&abort, ec::INSTR_ABORT_SAME, addr, "fetch")?;
    }
    Ok(())
}

fn repeated_reads_abort(boot: &BootInfo) -> TestResult {
    hyp_memory(boot)?;
    const TIMES: u32 = 100;
    let injected = host_aborts()?;
    let mut aborts = 0;
    for _ in 0..TIMES {
        match exception::read(HYP_LOAD_ADDR) {
            Ok(v) => fail!(
                "read {} of {:#x} succeeded: {:#x}",
                aborts + 1,
                HYP_LOAD_ADDR,
                v
            ),
            Err(abort) => check_abort(&abort, ec::DATA_ABORT_SAME, HYP_LOAD_ADDR, "read")?,
        }
        aborts += 1;
    }
    ensure_eq!(aborts, TIMES, "aborts taken");
    // Each was keel's: it counts every abort it injects (HYP_STATS 4).
    ensure_eq!(
        host_aborts()? - injected,
        u64::from(TIMES),
        "aborts keel counted (HYP_STATS 4)"
    );
    Ok(())
}

/// HYP_STATS 4: aborts keel has injected into the host.
fn host_aborts() -> Result<u64, crate::harness::Failure> {
    match crate::hvc(
        keel_abi::func::HYP_STATS,
        [keel_abi::stat::HOST_ABORTS, 0, 0, 0, 0],
    )
    .ok()
    {
        Ok(r) => Ok(r.0[1]),
        Err(e) => fail!("HYP_STATS(HOST_ABORTS): {:?}", e),
    }
}

/// Writes a pattern over `addr`, reads it back and restores the old value.
fn scratch_check(addr: u64) -> TestResult {
    let p = addr as *mut u64;
    // SAFETY: `addr` is 8-byte aligned host memory that holds nothing of ours
    // that is live (the callers choose it); the old value is put back.
    let (old, got) = unsafe {
        let old = core::ptr::read_volatile(p);
        core::ptr::write_volatile(p, !old ^ 0x5a5a_5a5a_5a5a_5a5a);
        let got = core::ptr::read_volatile(p);
        core::ptr::write_volatile(p, old);
        (old, got)
    };
    ensure_eq!(
        got,
        !old ^ 0x5a5a_5a5a_5a5a_5a5a,
        format_args!("value read back at {:#x}", addr)
    );
    Ok(())
}

/// Whether `addr` is in the initrd /chosen describes (not to be scribbled on,
/// even temporarily: the boot suite reads it).
pub(crate) fn in_initrd(boot: &BootInfo, addr: u64) -> bool {
    let Some(chosen) = boot.fdt.find_node("/chosen") else {
        return false;
    };
    let prop = |name| {
        chosen
            .property(name)
            .and_then(|p| p.as_usize())
            .map(|v| v as u64)
    };
    match (prop("linux,initrd-start"), prop("linux,initrd-end")) {
        (Some(start), Some(end)) => Range::new(start, end).contains(addr),
        _ => false,
    }
}

fn memory_works_after_aborts(boot: &BootInfo) -> TestResult {
    let holes = hyp_memory(boot)?;
    // The stack and static data still work after all those aborts ...
    static mut CELL: u64 = 0;
    let cell = core::ptr::addr_of_mut!(CELL) as u64;
    scratch_check(cell)?;
    let on_stack = 0u64;
    scratch_check(core::ptr::addr_of!(on_stack) as u64)?;
    // ... and so does host memory right next to the hypervisor's, which
    // would break if an abort had been handled by unmapping more than the
    // offending page or if a stage-2 block had been split badly.
    let mut checked = 0;
    for h in holes.iter() {
        for addr in [h.start.wrapping_sub(8), h.end] {
            let in_use =
                boot.image.contains(addr) || boot.dtb.contains(addr) || in_initrd(boot, addr);
            if boot.memory.contains(addr) && !in_use {
                scratch_check(addr)?;
                checked += 1;
            }
        }
    }
    ensure!(
        checked > 0,
        "no host memory next to the hypervisor's to check"
    );
    Ok(())
}
