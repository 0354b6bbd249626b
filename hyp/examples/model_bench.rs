//! Drives the reference model of ownership and the real hypervisor together
//! (tests/common/model.rs) and prints the rate as one JSON line:
//! `cargo run --release -p keel-hyp --example model_bench`.
//! `KEEL_MODEL_CALLS` sets the number of calls (default 200,000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::model::{run, Mode};

fn main() {
    let calls = std::env::var("KEEL_MODEL_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000u64);
    let seed = 0x6b65_656c_b00c;
    eprintln!("model_bench: seed {seed:#x}, {calls} calls");
    let t = std::time::Instant::now();
    let report = run(seed, calls, 5_000, Mode::Strict).unwrap_or_else(|e| panic!("{e}"));
    let rate = report.calls as f64 / t.elapsed().as_secs_f64();
    println!(
        "{{\"metric\": \"model_calls_per_second_host\", \"value\": {}, \"unit\": \"calls/s\"}}",
        rate.round() as u64
    );
}
