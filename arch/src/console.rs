//! The PL011 console and the `log` backend that writes to it.

use core::fmt::{self, Write};
use core::ptr::NonNull;

use arm_pl011_uart::{PL011Registers, Uart, UniqueMmioPointer};
use spin::Mutex;

static CONSOLE: Mutex<Option<Uart<'static>>> = Mutex::new(None);

/// Starts using the PL011 at `base` (firmware or QEMU has set its line
/// configuration; keel only writes).
///
/// # Safety
/// `base` must be the physical (identity-mapped) address of a PL011 that
/// nothing else in the hypervisor accesses.
pub unsafe fn init(base: usize) {
    let Some(ptr) = NonNull::new(base as *mut PL011Registers) else {
        return;
    };
    // SAFETY: the caller promises `base` is a PL011 owned by us from now on.
    let regs = unsafe { UniqueMmioPointer::new(ptr) };
    *CONSOLE.lock() = Some(Uart::new(regs));
}

struct Writer<'a>(&'a mut Uart<'static>);

impl Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

impl Writer<'_> {
    fn put(&mut self, b: u8) {
        while self.0.is_tx_fifo_full() {
            core::hint::spin_loop();
        }
        self.0.write_word(b);
    }
}

/// Writes formatted text to the console; false (nothing written) before
/// `init`.
pub fn print(args: fmt::Arguments) -> bool {
    match CONSOLE.lock().as_mut() {
        Some(uart) => {
            let _ = Writer(uart).write_fmt(args);
            true
        }
        None => false,
    }
}

/// Writes to the console even if another path holds its lock (used when
/// the machine is about to stop: a panic or fatal exception must be seen).
pub fn print_forced(args: fmt::Arguments) -> bool {
    if CONSOLE.is_locked() {
        // SAFETY: only called on the way to stopping the machine; at worst
        // the output interleaves with that of the lock holder.
        unsafe { CONSOLE.force_unlock() };
    }
    print(args)
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            print(format_args!(
                "[keel] {:<5} {}\n",
                record.level(),
                record.args()
            ));
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the console as the `log` backend at `level`.
pub fn init_logger(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
