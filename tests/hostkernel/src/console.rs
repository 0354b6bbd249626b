//! Output through the PL011 UART, the only channel the runner reads.
//!
//! No lock: the test kernel runs on one CPU with interrupts masked, and the
//! exception handler must be able to print even if it interrupted a print.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

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
    let _ = Console.write_fmt(args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => {{
        $crate::console::print(format_args!($($arg)*));
        $crate::console::print(format_args!("\n"));
    }};
}
