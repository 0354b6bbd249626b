//! Boot: from `entry.S` to the suite, and the panic handler.

use crate::dt::{self, Range};
use crate::println;
use crate::{console, harness, mmu, psci, suites};

core::arch::global_asm!(include_str!("entry.S"));

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

fn image_range() -> Range {
    // Only the addresses of the linker symbols are taken, never their values.
    let (start, end) = (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    );
    Range::new(start, end)
}

/// Entered from `entry.S` with BSS cleared and a stack: x0..x3 as the
/// hypervisor passed them, and SCTLR_EL1 and SPSel as they were at entry.
#[no_mangle]
extern "C" fn kernel_main(x0: u64, x1: u64, x2: u64, x3: u64, sctlr: u64, spsel: u64) -> ! {
    let entry = dt::EntryState {
        x: [x0, x1, x2, x3],
        sctlr,
        spsel,
    };
    let image = image_range();
    let located = dt::locate(x0).map(|(addr, _)| addr);
    // SAFETY: called once, first, with the MMU off; the map covers the image
    // (code, data, stack) and the block where the device tree lies.
    unsafe { mmu::enable(image.start, located.unwrap_or(image.start)) };

    println!();
    println!(
        "keel-testkernel: entered at EL{} with x0={:#x}",
        current_el(),
        x0
    );
    let Some((addr, from_x0)) = dt::locate(x0) else {
        harness::abort_run("no device tree in x0 (nor at the fallback address)")
    };
    if !from_x0 {
        println!(
            "keel-testkernel: WARNING: x0 holds no device tree; using {:#x} (booted without keel?)",
            dt::fallback_address()
        );
    }
    let boot = match dt::parse(addr, from_x0, entry, image) {
        Ok(b) => b,
        Err(e) => {
            println!("keel-testkernel: bad device tree at {:#x}: {:?}", addr, e);
            harness::abort_run("bad device tree")
        }
    };
    configure_from_dt(&boot);
    for r in boot.memory.iter() {
        mmu::map_ram(r.start, r.end);
    }
    // The block holding the hypervisor's memory is already mapped with the
    // RAM around it; if all of RAM is missing from /memory, map it anyway so
    // isolation probes reach stage 2 rather than fault in our stage 1.
    let ram = boot.physical_ram();
    mmu::map_ram(ram.start, ram.end);

    let Some(name) = boot.arg("suite") else {
        println!("keel-testkernel: no suite= in bootargs {:?}", boot.bootargs);
        harness::abort_run("no suite= in bootargs")
    };
    let Some(suite) = suites::find(name) else {
        println!("keel-testkernel: unknown suite {:?}; known:", name);
        for s in suites::ALL {
            println!("  {}", s.name);
        }
        harness::abort_run("unknown suite")
    };
    harness::run_suite(suite, &boot);
    psci::system_off()
}

/// Takes the UART and the PSCI conduit from the device tree.
fn configure_from_dt(boot: &dt::BootInfo) {
    if let Some(uart) = boot.fdt.chosen().stdout() {
        let is_pl011 = uart
            .compatible()
            .is_some_and(|c| c.all().any(|s| s == "arm,pl011"));
        let base = uart
            .reg()
            .and_then(|mut r| r.next())
            .map(|r| r.starting_address as u64);
        if let (true, Some(base)) = (is_pl011, base) {
            // Only the Device block [0, 1 GiB) maps peripherals.
            if base < mmu::BLOCK_SIZE {
                console::set_base(base as usize);
            }
        }
    }
    let method = boot
        .fdt
        .find_node("/psci")
        .and_then(|n| n.property("method"))
        .and_then(|p| p.as_str());
    psci::set_conduit_hvc(method == Some("hvc"));
}

pub fn current_el() -> u64 {
    let el: u64;
    // SAFETY: reading CurrentEL has no side effects.
    unsafe { core::arch::asm!("mrs {}, CurrentEL", out(reg) el, options(nomem, nostack)) };
    (el >> 2) & 3
}

macro_rules! id_reg {
    ($($name:ident => $reg:literal),*) => {$(
        #[doc = concat!("The host's ", $reg, " (EL1 reads it untrapped).")]
        pub fn $name() -> u64 {
            let v: u64;
            // SAFETY: reading an ID register has no side effects.
            unsafe { core::arch::asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nomem, nostack)) };
            v
        }
    )*};
}

id_reg! {
    id_aa64pfr0 => "id_aa64pfr0_el1",
    id_aa64dfr0 => "id_aa64dfr0_el1",
    id_aa64isar0 => "id_aa64isar0_el1",
    id_aa64mmfr0 => "id_aa64mmfr0_el1",
    id_aa64isar1 => "id_aa64isar1_el1",
    id_aa64pfr1 => "id_aa64pfr1_el1"
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // One line, so the runner's tail and the FAILED reason both carry it.
    let why = match info.location() {
        Some(l) => harness::Failure::new(format_args!(
            "panicked at {}:{}:{}: {}",
            l.file(),
            l.line(),
            l.column(),
            info.message()
        )),
        None => harness::Failure::new(format_args!("panicked: {}", info.message())),
    };
    println!();
    println!("keel-testkernel {}", why.as_str());
    harness::abort_run(why.as_str())
}
