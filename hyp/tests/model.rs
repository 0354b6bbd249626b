//! The reference model of ownership (tests/common/model.rs) against the
//! real hypervisor: seeded random host and guest calls, statuses compared
//! call by call, every page compared periodically, the invariant checker
//! after every call.
//!
//! `KEEL_MODEL_SEED=<n>` replays one seed (printed on failure),
//! `KEEL_MODEL_CALLS=<n>` sets the number of calls per seed. By default a
//! release run (`cargo test --release`) makes 1,000,000 calls in all, a
//! debug run 40,000.

mod common;

use common::model::{run, Mode};

fn env(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

/// Calls per test function (two of them run in parallel).
fn calls() -> u64 {
    env("KEEL_MODEL_CALLS").unwrap_or(if cfg!(debug_assertions) {
        20_000
    } else {
        500_000
    })
}

fn drive(default_seed: u64, mode: Mode) {
    let seed = env("KEEL_MODEL_SEED").unwrap_or(default_seed);
    let calls = calls();
    let check_every = (calls / 50).clamp(100, 5_000);
    let t = std::time::Instant::now();
    match run(seed, calls, check_every, mode) {
        Ok(r) => eprintln!(
            "model {mode:?} seed {seed:#x}: {} calls ({} succeeded, {} NO_MEMORY, {} known deviations), {} full checks, {:.1?}",
            r.calls,
            r.succeeded,
            r.no_memory,
            r.tolerated,
            r.full_checks,
            t.elapsed()
        ),
        Err(e) => panic!("seed {seed:#x}: {e}"),
    }
}

#[test]
fn model_agrees_with_the_hypervisor_seed_a() {
    drive(0x6b65_656c_0001, Mode::Strict);
}

#[test]
fn model_agrees_with_the_hypervisor_seed_b() {
    drive(0x6b65_656c_0002, Mode::Strict);
}

// Mode::Tolerant (the four deviations of tests/guests.rs `fixed_*`,
// accepted as well as the ABI's answers) was the default until 6000d8e
// fixed them; keep it for bisecting across that commit.
#[test]
#[ignore]
fn tolerant_model_agrees_with_the_hypervisor() {
    drive(0x6b65_656c_0003, Mode::Tolerant);
}
