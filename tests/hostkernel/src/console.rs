//! Output through the PL011 UART, the only channel the runner reads.
//!
//! Each `print!`/`println!` holds a lock for its whole output, so lines of
//! different CPUs (the smp suite's secondaries) do not interleave. The lock
//! is re-entrant for the CPU holding it, so the exception handler can print
//! even if it interrupted a print, and a CPU that waits too long for it
//! prints anyway rather than hang the run.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The QEMU `virt` PL011, used until the device tree names another.
const DEFAULT_PL011: usize = 0x0900_0000;
const UARTDR: usize = 0x000;
const UARTFR: usize = 0x018;
const UARTFR_TXFF: u32 = 1 << 5;

static BASE: AtomicUsize = AtomicUsize::new(DEFAULT_PL011);

/// Switches output to the PL011 at `base` (taken from /chosen/stdout-path).
pub fn set_base(base: usize) {
    BASE.store(base, Ordering::Relaxed);
}

fn put_byte(b: u8) {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: `base` is a PL011 (the QEMU virt default or the device tree's
    // stdout), identity-mapped as Device memory; FR and DR are its registers.
    unsafe {
        while core::ptr::read_volatile((base + UARTFR) as *const u32) & UARTFR_TXFF != 0 {}
        core::ptr::write_volatile((base + UARTDR) as *mut u32, u32::from(b));
    }
}

pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // CR before LF so an interactive terminal in raw mode (QEMU
            // -nographic) does not staircase; the runner strips the CR.
            if b == b'\n' {
                put_byte(b'\r');
            }
            put_byte(b);
        }
        Ok(())
    }
}

pub fn print(args: fmt::Arguments) {
    let _guard = lock();
    let _ = Console.write_fmt(args);
}

/// The CPU printing (its MPIDR + 1), or 0.
static OWNER: AtomicU64 = AtomicU64::new(0);

/// Holds the console until dropped (unless this CPU already held it).
pub struct Guard {
    release: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.release {
            OWNER.store(0, Ordering::Release);
        }
    }
}

pub fn lock() -> Guard {
    let mpidr: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) mpidr, options(nomem, nostack)) };
    let me = (mpidr & 0xff_00ff_ffff) + 1;
    if OWNER.load(Ordering::Relaxed) == me {
        return Guard { release: false };
    }
    // Long enough for any line; a holder that died must not silence us.
    for _ in 0..10_000_000 {
        if OWNER
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Guard { release: true };
        }
        core::hint::spin_loop();
    }
    Guard { release: false }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => {{
        let _guard = $crate::console::lock();
        $crate::console::print(format_args!($($arg)*));
        $crate::console::print(format_args!("\n"));
    }};
}
