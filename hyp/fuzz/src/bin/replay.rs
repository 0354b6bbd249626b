//! Runs the `hypercalls` fuzz target without libFuzzer (stable Rust):
//! replays the files given (or every file of the directories given), then,
//! with `--random N`, N random inputs from a seed (`--seed S`, default the
//! time), printing the seed so a failure can be replayed. `-v` prints every
//! call of the inputs it replays.
//!
//!   cargo run --release --bin hypercalls-replay -- corpus/hypercalls
//!   cargo run --release --bin hypercalls-replay -- --random 20000
//!   cargo run --release --bin hypercalls-replay -- -v crash-1234

use std::path::Path;

fn files(path: &Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            files(&e, out);
        }
    } else {
        out.push(path.to_path_buf());
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut paths, mut random, mut seed, mut verbose) = (Vec::new(), 0u64, None, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--random" => {
                random = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--random N")
            }
            "--seed" => seed = args.next().and_then(|v| parse(&v)),
            "-v" => verbose = true,
            _ => files(Path::new(&a), &mut paths),
        }
    }
    for p in &paths {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if verbose {
            println!("== {} ({} bytes)", p.display(), data.len());
        }
        keel_hyp_fuzz::run(&data, verbose);
    }
    println!("replayed {} inputs", paths.len());
    if random > 0 {
        let seed = seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
        println!("random inputs from seed {seed:#x} (replay: --random {random} --seed {seed:#x})");
        let mut state = seed;
        let mut next = move || {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut calls = 0usize;
        let start = std::time::Instant::now();
        for i in 0..random {
            let len = 16 + (next() % 2048) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            std::panic::set_hook(Box::new(move |info| {
                eprintln!("input {i} of seed {seed:#x} failed: {info}");
            }));
            calls += keel_hyp_fuzz::run(&data, false);
        }
        println!(
            "{random} random inputs, {calls} calls in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
}

fn parse(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}
