//! Boot of the image, in order: device tree, console, plan, page pool, host
//! device tree, stage 1 and MMU, host stage 2, EL2 configuration, host entry.

mod fatal;
mod guest;
mod host;
mod mmu;
mod smp;
mod timer;
mod traps;

use core::fmt::Write;

use keel_arch::{console, exit, CpuLocal};
use keel_boot::dt::BootInfo;
use keel_boot::layout::{self, Range, MAX_CPUS};
use log::info;

core::arch::global_asm!(include_str!("../entry.S"));

/// The hypervisor's state once booted.
pub type Hyp = keel_hyp::host::Hyp<host::HwTlb, host::HwMmu, host::HwTlb>;

pub static HYP: spin::Once<Hyp> = spin::Once::new();

/// Per-CPU data; entry.S fills CPU 0's `emergency_sp` and points TPIDR_EL2
/// at it before any Rust runs.
#[no_mangle]
static mut KEEL_CPU_LOCAL: [CpuLocal; MAX_CPUS] = [const { CpuLocal::new() }; MAX_CPUS];

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static __text_end: u8;
    static __rodata_end: u8;
}

/// Addresses of the image's sections at run time.
pub struct ImageSections {
    pub start: u64,
    pub text_end: u64,
    pub rodata_end: u64,
    pub end: u64,
}

fn image_sections() -> ImageSections {
    ImageSections {
        start: core::ptr::addr_of!(__image_start) as u64,
        text_end: core::ptr::addr_of!(__text_end) as u64,
        rodata_end: core::ptr::addr_of!(__rodata_end) as u64,
        end: core::ptr::addr_of!(__image_end) as u64,
    }
}

/// Exit codes of a failed run (QEMU's exit status with -semihosting).
pub mod exit_code {
    pub const PANIC: u32 = 101;
    pub const FATAL_EXCEPTION: u32 = 102;
    pub const BOOT_ERROR: u32 = 103;
}

/// Stops the run with `code` after printing `msg` to the console, or through
/// semihosting when there is no console yet.
pub fn boot_fail(msg: core::fmt::Arguments) -> ! {
    report(format_args!("[keel] boot failed: {msg}\n"));
    exit::exit(exit_code::BOOT_ERROR)
}

/// Prints on the way to stopping the machine: to the console, or before
/// there is one, to the semihosting console (QEMU's stdout).
pub fn report(msg: core::fmt::Arguments) {
    if !console::print_forced(msg) {
        semihost_print(msg);
    }
}

fn semihost_print(msg: core::fmt::Arguments) {
    struct Buf([u8; 256], usize);
    impl Write for Buf {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for &b in s.as_bytes() {
                if self.1 < self.0.len() - 2 {
                    self.0[self.1] = b;
                    self.1 += 1;
                }
            }
            Ok(())
        }
    }
    let mut buf = Buf([0; 256], 0);
    let _ = buf.write_fmt(msg);
    let end = buf.1;
    buf.0[end] = 0;
    keel_arch::exit::write0(&buf.0[..=end]);
}

/// The boot DTB as a byte slice: checks the magic and bounds the size before
/// trusting the header's `totalsize` (the parser checks everything else).
fn boot_dtb(pa: u64) -> Result<&'static mut [u8], &'static str> {
    const FDT_MAGIC: u32 = 0xd00d_feed;
    // Far above any real tree; only a sanity bound before the parser's checks.
    const MAX_DTB: u32 = 64 << 20;
    if pa == 0 || !pa.is_multiple_of(8) {
        return Err("no 8-byte-aligned address");
    }
    // SAFETY: with the MMU off every physical address is accessible; x0
    // points at the DTB per the boot protocol; only 8 header bytes are read
    // before the magic is known.
    let (magic, size) = unsafe {
        let p = pa as *const u32;
        (
            u32::from_be(p.read_volatile()),
            u32::from_be(p.add(1).read_volatile()),
        )
    };
    if magic != FDT_MAGIC {
        return Err("no flattened device tree (bad magic)");
    }
    if !(40..=MAX_DTB).contains(&size) {
        return Err("a device tree header with an impossible size");
    }
    // SAFETY: the header says the tree is `size` bytes of RAM the loader
    // gave us; keel edits it only to drop FDT_NOP tokens, and it stays
    // untouched otherwise until the host's copy has been written.
    Ok(unsafe { core::slice::from_raw_parts_mut(pa as *mut u8, size as usize) })
}

/// Bytes the host kernel will occupy: for an arm64 Image, the header's
/// image_size (its bss and early page tables lie beyond the file), else the
/// module's size.
fn kernel_footprint(module: Range) -> u64 {
    const ARM64_MAGIC: u32 = 0x644d_5241; // "ARM\x64"
    if module.size() < 64 {
        return module.size();
    }
    // SAFETY: the module lies in RAM (the loader put it there) and is at
    // least 64 bytes long; the MMU is off, so its address is readable.
    let (magic, image_size) = unsafe {
        let base = module.start as *const u8;
        (
            (base.add(56) as *const u32).read_unaligned(),
            (base.add(16) as *const u64).read_unaligned(),
        )
    };
    if magic == ARM64_MAGIC {
        image_size.max(module.size())
    } else {
        module.size()
    }
}

/// This CPU's per-CPU data.
pub fn this_cpu() -> &'static CpuLocal {
    // SAFETY: TPIDR_EL2 is set (entry.S, CPU bring-up) to this CPU's
    // element of KEEL_CPU_LOCAL before any Rust runs.
    unsafe { &*(keel_arch::sysreg::tpidr_el2() as *const CpuLocal) }
}

fn log_level(cmdline: &str) -> log::LevelFilter {
    match cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("keel.log="))
    {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    }
}

pub fn has_flag(cmdline: &str, flag: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == flag)
}

/// The boot CPU's Rust entry (from entry.S): x0 = DTB, x1 = load address.
#[no_mangle]
extern "C" fn keel_main(dtb_pa: u64, load_base: u64) -> ! {
    let sections = image_sections();
    debug_assert_eq!(sections.start, load_base);

    let dtb = match boot_dtb(dtb_pa) {
        Ok(d) => d,
        Err(why) => boot_fail(format_args!("device tree at x0 = {dtb_pa:#x}: {why}")),
    };
    // Boot loaders leave FDT_NOP tokens where they deleted things.
    if let Err(e) = keel_boot::dt::strip_nops(dtb) {
        boot_fail(format_args!("device tree at {dtb_pa:#x}: {e}"));
    }
    let dtb: &'static [u8] = dtb;
    let info = match BootInfo::parse(dtb) {
        Ok(i) => i,
        Err(e) => boot_fail(format_args!("device tree at {dtb_pa:#x}: {e}")),
    };
    // SAFETY: the device tree names this PL011 as the console; nothing else
    // in keel touches it.
    unsafe { console::init(info.uart.start as usize) };
    console::init_logger(log_level(info.bootargs));
    info!(
        "keel {} at EL2, loaded at {load_base:#x}",
        env!("CARGO_PKG_VERSION")
    );
    if has_flag(info.bootargs, "keel.errata=speculative-at") {
        keel_arch::errata::force_speculative_at();
        info!("speculative-AT workaround on (keel.errata=speculative-at)");
    }
    if has_flag(info.bootargs, "keel.selftest=panic") {
        panic!("deliberate panic (keel.selftest=panic)");
    }

    let image = Range::new(sections.start, sections.end);
    let kernel = Range::new(
        info.kernel.range.start,
        info.kernel.range.start + kernel_footprint(info.kernel.range),
    );
    let mut avoid = [
        Range::new(dtb_pa, dtb_pa + dtb.len() as u64),
        kernel,
        kernel,
    ];
    if let Some(rd) = info.ramdisk {
        avoid[2] = rd;
    }
    // The host's tree is the boot tree plus its bootargs and initrd
    // properties, a few split memory entries, and alignment.
    let host_dtb_size = dtb.len() as u64 + info.kernel.bootargs.len() as u64 + 1024;
    let plan = match layout::plan(
        image,
        info.ram.as_slice(),
        info.cpus.len(),
        &avoid,
        host_dtb_size,
    ) {
        Ok(p) => p,
        Err(e) => boot_fail(format_args!("{e}")),
    };
    info!(
        "reserved {:#x}..{:#x} ({} KiB: image {} KiB, stacks {} KiB, pool {} KiB, lent-page table {} KiB, donated-page table {} KiB)",
        plan.reserved.start,
        plan.reserved.end,
        plan.reserved.size() / 1024,
        plan.image.size() / 1024,
        plan.stacks.size() / 1024,
        plan.pool.size() / 1024,
        plan.lent.size() / 1024,
        plan.donated.size() / 1024
    );

    host::init(&info, &plan, dtb)
}

#[panic_handler]
fn panic(panic: &core::panic::PanicInfo) -> ! {
    match panic.location() {
        Some(l) => report(format_args!(
            "[keel] panicked at {}:{}:{}: {}\n",
            l.file(),
            l.line(),
            l.column(),
            panic.message()
        )),
        None => report(format_args!("[keel] panicked: {}\n", panic.message())),
    }
    exit::exit(exit_code::PANIC)
}
