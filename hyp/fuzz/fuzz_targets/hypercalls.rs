//! libFuzzer target: the input bytes are a sequence of host calls and guest
//! traps on a fresh simulated machine (see `keel_hyp_fuzz::run`); any
//! panic (an invariant violation, an impossible status, a page that comes
//! back unzeroed, a panic inside the hypervisor) is a crash.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keel_hyp_fuzz::run(data, false);
});
