//! Running a suite and reporting on the UART in the protocol the runner
//! (tests/run.py) parses:
//!
//! ```text
//! plan SUITE: NAME NAME ...          the tests about to run, in order
//! test SUITE::NAME ... ok
//! test SUITE::NAME ... FAILED: reason
//! FINISHED                           every test reported; PSCI SYSTEM_OFF follows
//! ```
//!
//! A panic or an unexpected exception prints `test SUITE::NAME ... FAILED:`
//! for the running test, then `ABORTED: why`, and powers off without
//! `FINISHED`, so the runner counts the run as failed.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::dt::BootInfo;

/// Why a test failed: a message in a fixed buffer (the kernel has no heap).
pub struct Failure {
    buf: [u8; 200],
    len: usize,
}

impl Failure {
    pub fn new(args: fmt::Arguments) -> Self {
        let mut f = Failure {
            buf: [0; 200],
            len: 0,
        };
        let _ = f.write_fmt(args);
        f
    }

    pub fn as_str(&self) -> &str {
        // Truncation in `write_str` keeps whole characters, so this holds.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<message not UTF-8>")
    }
}

impl Write for Failure {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut tmp = [0; 4];
            let enc = c.encode_utf8(&mut tmp);
            // Newlines would break the one-line-per-test protocol.
            let enc = if c == '\n' || c == '\r' { " " } else { enc };
            if self.len + enc.len() > self.buf.len() {
                break;
            }
            self.buf[self.len..self.len + enc.len()].copy_from_slice(enc.as_bytes());
            self.len += enc.len();
        }
        Ok(())
    }
}

pub type TestResult = Result<(), Failure>;

/// Fails the test with a formatted message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::harness::Failure::new(format_args!($($arg)+)));
        }
    };
}

/// Fails the test unless `left == right`, printing both in hex (`{:x?}`, so
/// arrays and tuples stay on one line).
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $what:expr) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err($crate::harness::Failure::new(format_args!(
                "{}: got {:x?}, expected {:x?} (hex)",
                $what, l, r
            )));
        }
    }};
}

/// Fails the test now with a formatted message.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)+) => {
        return Err($crate::harness::Failure::new(format_args!($($arg)+)))
    };
}

pub struct Test {
    pub name: &'static str,
    pub run: fn(&BootInfo) -> TestResult,
}

pub struct Suite {
    pub name: &'static str,
    pub tests: &'static [Test],
}

static CURRENT_SUITE: AtomicPtr<Suite> = AtomicPtr::new(core::ptr::null_mut());
static CURRENT_TEST: AtomicPtr<Test> = AtomicPtr::new(core::ptr::null_mut());

fn current() -> Option<(&'static Suite, &'static Test)> {
    let s = CURRENT_SUITE.load(Ordering::SeqCst);
    let t = CURRENT_TEST.load(Ordering::SeqCst);
    // SAFETY: both pointers are null or were made from `&'static` references
    // in `run_suite`, and are only ever read as shared references.
    unsafe { Some((s.cast_const().as_ref()?, t.cast_const().as_ref()?)) }
}

/// Runs every test of `suite`, reports each, then `FINISHED`.
pub fn run_suite(suite: &'static Suite, boot: &BootInfo) {
    // `only=NAME` in the bootargs runs that one test (for profiling).
    let only = boot.arg("only");
    let chosen = || {
        suite
            .tests
            .iter()
            .filter(move |t| only.is_none_or(|o| o == t.name))
    };
    crate::print!("plan {}:", suite.name);
    for t in chosen() {
        crate::print!(" {}", t.name);
    }
    crate::println!();
    CURRENT_SUITE.store((suite as *const Suite).cast_mut(), Ordering::SeqCst);
    for test in chosen() {
        CURRENT_TEST.store((test as *const Test).cast_mut(), Ordering::SeqCst);
        let result = (test.run)(boot);
        CURRENT_TEST.store(core::ptr::null_mut(), Ordering::SeqCst);
        match result {
            Ok(()) => crate::println!("test {}::{} ... ok", suite.name, test.name),
            Err(f) => crate::println!(
                "test {}::{} ... FAILED: {}",
                suite.name,
                test.name,
                f.as_str()
            ),
        }
    }
    crate::println!("FINISHED");
}

/// A function a suite registers to print its own context (the fuzz
/// suite's seed and last calls) when the run ends early; 0 for none.
static ON_ABORT: AtomicUsize = AtomicUsize::new(0);

/// Registers `f` to run once, first, if the run is aborted (see
/// [`abort_run`]); `None` unregisters.
pub fn set_on_abort(f: Option<fn()>) {
    ON_ABORT.store(f.map_or(0, |f| f as usize), Ordering::SeqCst);
}

/// Ends the run early: reports the running test (if any) as failed with
/// `why`, prints `ABORTED`, and powers off without `FINISHED`.
pub fn abort_run(why: &str) -> ! {
    // Taken, so that an abort inside the hook cannot recurse.
    let hook = ON_ABORT.swap(0, Ordering::SeqCst);
    if hook != 0 {
        // SAFETY: only `set_on_abort` stores a non-zero value, and it
        // stores a `fn()` pointer.
        let f: fn() = unsafe { core::mem::transmute::<usize, fn()>(hook) };
        f();
    }
    if let Some((suite, test)) = current() {
        crate::println!("test {}::{} ... FAILED: {}", suite.name, test.name, why);
    }
    crate::println!("ABORTED: {}", why);
    crate::psci::system_off()
}
