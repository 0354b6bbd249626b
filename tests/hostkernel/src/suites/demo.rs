//! `demo`: the tour `make run` shows. Prints what the host sees of keel and
//! one isolation probe, then powers off.

use crate::dt::BootInfo;
use crate::exception;
use crate::harness::{Suite, Test, TestResult};
use crate::{ensure, fail, println};
use keel_abi::call;

pub static SUITE: Suite = Suite {
    name: "demo",
    tests: &[Test {
        name: "tour",
        run: tour,
    }],
};

fn tour(boot: &BootInfo) -> TestResult {
    println!();
    println!("== keel demo: the host kernel's view ==");
    println!(
        "running at EL{}; device tree at {:#x} ({} bytes)",
        crate::current_el(),
        boot.dtb.start,
        boot.dtb.len()
    );
    println!("bootargs: {:?}", boot.bootargs);
    println!();
    println!("-- discovery --");
    let uid = call::call_uid();
    println!(
        "CALL_UID     = {:#010x} {:#010x} {:#010x} {:#010x}{}",
        uid[0],
        uid[1],
        uid[2],
        uid[3],
        if uid == keel_abi::KVM_UID {
            " (the KVM vendor-hypervisor UID)"
        } else {
            ""
        }
    );
    let (major, minor) = call::revision();
    println!("REVISION     = {}.{}", major, minor);
    let features = call::features();
    println!("FEATURES     = {:#x}", features);
    match call::hyp_features() {
        Ok(f) => println!(
            "HYP_FEATURES = block sizes {:#x} (4K {}, 2M {}, 1G {}), max VMs {}, max vCPUs/VM {}",
            f.block_sizes,
            f.block_sizes & (1 << 12) != 0,
            f.block_sizes & (1 << 21) != 0,
            f.block_sizes & (1 << 30) != 0,
            f.max_vms,
            f.max_vcpus
        ),
        Err(e) => println!("HYP_FEATURES = error {:?}", e),
    }
    println!();
    println!("-- memory as the host sees it --");
    let ram = boot.physical_ram();
    println!("physical RAM        {} ({} MiB)", ram, ram.len() >> 20);
    for r in boot.memory.iter() {
        println!("host memory         {} ({} KiB)", r, r.len() >> 10);
    }
    let hyp = boot.hyp_ranges();
    for r in hyp.iter() {
        println!("hypervisor (hidden) {} ({} KiB)", r, r.len() >> 10);
    }
    println!("this kernel         {}", boot.image);
    println!();
    println!("-- isolation --");
    let Some(target) = hyp.iter().next().map(|r| r.start) else {
        println!("no hypervisor memory found in RAM; nothing to probe");
        fail!("no memory hidden from the host to probe");
    };
    let counted = || call::hyp_stats(keel_abi::stat::HOST_ABORTS).ok();
    let before = counted();
    println!("host reads {:#x}, the hypervisor's first page ...", target);
    let result = exception::read(target);
    match result {
        Ok(v) => println!("  read returned {:#x}: ISOLATION IS BROKEN", v),
        Err(a) => println!("  synchronous external abort injected: {}", a),
    }
    if let (Some(b), Some(a)) = (before, counted()) {
        println!("  HYP_STATS aborts injected into the host: {} -> {}", b, a);
    }
    println!("... and carries on.");
    println!();
    ensure!(
        result.is_err(),
        "the host read hypervisor memory at {:#x}",
        target
    );
    Ok(())
}
