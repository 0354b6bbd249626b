//! `boot`: the host kernel arrives as ABI.md's Boot section promises, and
//! the discovery calls answer as its Discovery table says.

use crate::dt::{BootInfo, Range};
use crate::harness::{Suite, Test, TestResult};
use crate::{ensure, ensure_eq, fail};
use keel_abi::{call, func, status};

pub static SUITE: Suite = Suite {
    name: "boot",
    tests: &[
        Test {
            name: "entered_el1h_mmu_off",
            run: entered_el1h_mmu_off,
        },
        Test {
            name: "dtb_in_x0",
            run: dtb_in_x0,
        },
        Test {
            name: "memory_excludes_hypervisor",
            run: memory_excludes_hypervisor,
        },
        Test {
            name: "memory_covers_kernel_and_dtb",
            run: memory_covers_kernel_and_dtb,
        },
        Test {
            name: "bootargs_from_module",
            run: bootargs_from_module,
        },
        Test {
            name: "initrd_passed",
            run: initrd_passed,
        },
        Test {
            name: "multiboot_nodes_removed",
            run: multiboot_nodes_removed,
        },
        Test {
            name: "features_bitmap",
            run: features_bitmap,
        },
        Test {
            name: "call_uid",
            run: call_uid,
        },
        Test {
            name: "revision",
            run: revision,
        },
        Test {
            name: "hyp_features",
            run: hyp_features,
        },
        Test {
            name: "unknown_ids_not_supported",
            run: unknown_ids_not_supported,
        },
        Test {
            name: "nonzero_immediate_not_supported",
            run: nonzero_immediate_not_supported,
        },
        Test {
            name: "preserves_x4_to_x17",
            run: preserves_x4_to_x17,
        },
    ],
};

/// Where QEMU loads the hypervisor image (`-kernel`: RAM base + 2 MiB).
pub const HYP_LOAD_ADDR: u64 = 0x4020_0000;

/// The marker tests/run.py puts in this suite's bootargs.
const MARKER: &str = "keel-boot-7f3a";

/// The initrd tests/run.py generates and loads
/// (`-device guest-loader,addr=0x58000000,initrd=FILE`): an 8-byte magic,
/// the total length as a little-endian u64, then byte i (counted from the
/// start of the file) = (i * 131 + 7) mod 256. Keep in step with run.py.
const INITRD_ADDR: u64 = 0x5800_0000;
const INITRD_MAGIC: &[u8; 8] = b"KEELINRD";

fn initrd_byte(i: u64) -> u8 {
    (i.wrapping_mul(131).wrapping_add(7) & 0xff) as u8
}

fn entered_el1h_mmu_off(boot: &BootInfo) -> TestResult {
    ensure_eq!(crate::current_el(), 1, "CurrentEL");
    ensure_eq!(boot.entry.spsel, 1, "SPSel at entry (1 = EL1h)");
    ensure_eq!(boot.entry.sctlr & 1, 0, "SCTLR_EL1.M at entry");
    Ok(())
}

fn dtb_in_x0(boot: &BootInfo) -> TestResult {
    ensure!(
        boot.dtb_from_x0,
        "x0 = {:#x} does not point at a device tree",
        boot.entry.x[0]
    );
    ensure_eq!(boot.entry.x[1..], [0, 0, 0], "x1..x3 at entry");
    // The fdt crate checked the magic and size; the nodes every host needs:
    ensure!(boot.fdt.find_node("/chosen").is_some(), "no /chosen");
    ensure!(
        !boot.memory.is_empty(),
        "no memory node with a non-empty reg"
    );
    ensure!(
        !boot.memory_truncated,
        "more memory ranges than the test kernel can hold"
    );
    ensure!(boot.fdt.find_node("/cpus").is_some(), "no /cpus");
    Ok(())
}

fn memory_excludes_hypervisor(boot: &BootInfo) -> TestResult {
    for r in boot.memory.iter() {
        ensure!(
            !r.contains(HYP_LOAD_ADDR),
            "memory range {} covers the hypervisor at {:#x}",
            r,
            HYP_LOAD_ADDR
        );
    }
    // Memory ranges must not overlap each other either (sorted by start).
    let mut prev: Option<Range> = None;
    for r in boot.memory.iter() {
        if let Some(p) = prev {
            ensure!(p.end <= r.start, "memory ranges {} and {} overlap", p, r);
        }
        prev = Some(*r);
    }
    Ok(())
}

fn memory_covers_kernel_and_dtb(boot: &BootInfo) -> TestResult {
    ensure!(
        boot.memory.covers(&boot.image),
        "the kernel image {} is not in host memory",
        boot.image
    );
    ensure!(
        boot.memory.covers(&boot.dtb),
        "the device tree {} is not in host memory",
        boot.dtb
    );
    Ok(())
}

fn bootargs_from_module(boot: &BootInfo) -> TestResult {
    ensure_eq!(boot.arg("suite"), Some("boot"), "suite= in bootargs");
    ensure!(
        boot.arg("marker") == Some(MARKER),
        "bootargs {:?} lack marker={} that the kernel module carried",
        boot.bootargs,
        MARKER
    );
    // The hypervisor's own command line (QEMU -append) must not leak in.
    ensure!(
        !boot.bootargs.contains("keel."),
        "bootargs {:?} contain the hypervisor's command line",
        boot.bootargs
    );
    Ok(())
}

fn initrd_passed(boot: &BootInfo) -> TestResult {
    let Some(chosen) = boot.fdt.find_node("/chosen") else {
        fail!("no /chosen")
    };
    let prop = |name| {
        chosen
            .property(name)
            .and_then(|p| p.as_usize())
            .map(|v| v as u64)
    };
    let (Some(start), Some(end)) = (prop("linux,initrd-start"), prop("linux,initrd-end")) else {
        fail!("/chosen lacks linux,initrd-start or linux,initrd-end");
    };
    ensure_eq!(start, INITRD_ADDR, "linux,initrd-start");
    ensure!(
        end > start + 16,
        "initrd [{:#x}, {:#x}) too small for its header",
        start,
        end
    );
    let initrd = Range::new(start, end);
    ensure!(
        boot.memory.covers(&initrd),
        "the initrd {} is not in host memory",
        initrd
    );
    // SAFETY: the initrd lies in host memory (checked above), which the
    // stage-1 maps; nothing writes it while we read.
    let bytes = unsafe { core::slice::from_raw_parts(start as *const u8, initrd.len() as usize) };
    ensure!(
        &bytes[..8] == INITRD_MAGIC,
        "initrd magic {:02x?}",
        &bytes[..8]
    );
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    ensure_eq!(
        u64::from_le_bytes(len),
        initrd.len(),
        "initrd length (header vs linux,initrd-end - start)"
    );
    if let Some(i) = (16..initrd.len()).find(|&i| bytes[i as usize] != initrd_byte(i)) {
        fail!(
            "initrd byte {:#x} is {:#x}, expected {:#x}",
            i,
            bytes[i as usize],
            initrd_byte(i)
        );
    }
    Ok(())
}

fn multiboot_nodes_removed(boot: &BootInfo) -> TestResult {
    let Some(chosen) = boot.fdt.find_node("/chosen") else {
        fail!("no /chosen")
    };
    for node in chosen.children() {
        let multiboot = node
            .compatible()
            .is_some_and(|c| c.all().any(|s| s.starts_with("multiboot,")));
        ensure!(
            !multiboot && !node.name.starts_with("module"),
            "/chosen/{} is still present",
            node.name
        );
    }
    Ok(())
}

fn features_bitmap(_: &BootInfo) -> TestResult {
    ensure_eq!(call::features(), keel_abi::FEATURES_BITMAP, "FEATURES x0");
    Ok(())
}

fn call_uid(_: &BootInfo) -> TestResult {
    ensure_eq!(call::call_uid(), keel_abi::KVM_UID, "CALL_UID x0..x3");
    Ok(())
}

fn revision(_: &BootInfo) -> TestResult {
    ensure_eq!(
        call::revision(),
        (keel_abi::REVISION_MAJOR, keel_abi::REVISION_MINOR),
        "REVISION (x0, x1)"
    );
    Ok(())
}

fn hyp_features(_: &BootInfo) -> TestResult {
    let r = crate::hvc(func::HYP_FEATURES, [0; 5]).0;
    ensure_eq!(r[0], 0, "HYP_FEATURES x0 (status)");
    ensure_eq!(r[1], keel_abi::BLOCK_SIZES, "HYP_FEATURES x1 (block sizes)");
    ensure!(r[2] != 0, "HYP_FEATURES x2 (max VMs) is 0");
    ensure!(r[3] != 0, "HYP_FEATURES x3 (max vCPUs per VM) is 0");
    Ok(())
}

fn unknown_ids_not_supported(_: &BootInfo) -> TestResult {
    // A vendor-hypervisor SMC64 number beyond the table, the one just past
    // HOST_UNPIN, a vendor function FEATURES reports absent (SMC32), a
    // yielding-call ID, and all ones.
    const UNKNOWN: [u64; 5] = [0xC600_0FFF, 0xC600_011A, 0x8600_0001, 0, 0xFFFF_FFFF];
    for id in UNKNOWN {
        let r = crate::hvc(id, [1, 2, 3, 4, 5]).0;
        ensure_eq!(
            r[0] as i64,
            status::NOT_SUPPORTED,
            format_args!("x0 for unknown ID {:#x}", id)
        );
    }
    Ok(())
}

fn nonzero_immediate_not_supported(_: &BootInfo) -> TestResult {
    let x0: u64;
    // SAFETY: HVC #1 traps to the hypervisor like HVC #0 and returns to the
    // next instruction; everything SMCCC lets it clobber is declared.
    unsafe {
        core::arch::asm!("hvc #1", inout("x0") func::FEATURES => x0, clobber_abi("C"), options(nostack));
    }
    ensure_eq!(
        x0 as i64,
        status::NOT_SUPPORTED,
        "x0 after HVC #1 with FEATURES"
    );
    Ok(())
}

/// Issues HVC #0 with `id` and known values in x4..x17; returns them after.
fn call_with_sentinels(id: u64, sentinels: &[u64; 14]) -> [u64; 14] {
    let mut r = *sentinels;
    // SAFETY: HVC #0 returns to the next instruction; x0..x3 are results
    // (declared clobbered) and x4..x17 are inout so their values after the
    // call are observed rather than assumed.
    unsafe {
        core::arch::asm!(
            "hvc #0",
            inout("x0") id => _,
            out("x1") _, out("x2") _, out("x3") _,
            inout("x4") r[0], inout("x5") r[1], inout("x6") r[2], inout("x7") r[3],
            inout("x8") r[4], inout("x9") r[5], inout("x10") r[6], inout("x11") r[7],
            inout("x12") r[8], inout("x13") r[9], inout("x14") r[10], inout("x15") r[11],
            inout("x16") r[12], inout("x17") r[13],
            options(nostack),
        );
    }
    r
}

fn preserves_x4_to_x17(_: &BootInfo) -> TestResult {
    let mut sentinels = [0u64; 14];
    for (i, s) in sentinels.iter_mut().enumerate() {
        // "KEEL" in the top half, the register number in the bottom.
        *s = 0x4b45_454c_0000_0000 | (i as u64 + 4) << 8 | 0xa5;
    }
    // A call that succeeds, one with results in x1..x3, and one refused.
    for id in [func::FEATURES, func::HYP_FEATURES, 0xC600_0FFF] {
        let after = call_with_sentinels(id, &sentinels);
        for (i, (got, want)) in after.iter().zip(sentinels.iter()).enumerate() {
            ensure!(
                got == want,
                "x{} changed across call {:#x}: {:#x} -> {:#x}",
                i + 4,
                id,
                want,
                got
            );
        }
    }
    Ok(())
}
