//! `crash`: a test that ends the run the way a broken test kernel or
//! hypervisor would, so the runner can prove it notices (harness::catches_*
//! in tests/run.py). What it does is chosen by `crash=` in the bootargs:
//! `exception` (an undefined instruction), `panic`, or `hang`.

use crate::dt::BootInfo;
use crate::fail;
use crate::harness::{Suite, Test, TestResult};

pub static SUITE: Suite = Suite {
    name: "crash",
    tests: &[Test {
        name: "crashes",
        run: crashes,
    }],
};

fn crashes(boot: &BootInfo) -> TestResult {
    match boot.arg("crash") {
        Some("exception") => {
            // SAFETY: UDF raises an undefined-instruction exception, which
            // the handler reports and then powers off; nothing returns here.
            unsafe { core::arch::asm!("udf #0", options(nostack, noreturn)) }
        }
        Some("panic") => panic!("deliberate panic (crash=panic)"),
        Some("hang") => loop {
            core::hint::spin_loop();
        },
        other => fail!("crash={:?}: expected exception, panic or hang", other),
    }
}
