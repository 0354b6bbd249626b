//! Where the cost of a guest's 4K conversion inside a 1 GiB block goes, on
//! the build machine: MEM_SHARE + MEM_UNSHARE through the real dispatcher,
//! against the host's null call (HYP_FEATURES). For profiling
//! (`valgrind --tool=callgrind`), not a figure.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{slot, Config, Machine};
use keel_abi::func;

const GIB: u64 = 1 << 30;

fn main() {
    let m = Machine::new(Config::new(2 * GIB, 1 << 20));
    let r = m.call(func::VM_CREATE, &[1, 0]);
    let h = r.regs[1];
    assert_eq!(
        m.st(func::VM_DONATE, &[h, 0x8000_0000 >> 12, GIB, GIB >> 12]),
        0
    );
    let rounds = 2000;
    let t = std::time::Instant::now();
    for _ in 0..rounds {
        m.call(func::HYP_FEATURES, &[]);
    }
    let null = t.elapsed().as_nanos() as f64 / rounds as f64;
    let t = std::time::Instant::now();
    for i in 0..rounds {
        let ipa = GIB + ((i % 512) << 21) + 0x5000;
        assert_eq!(m.guest_st(slot(h), func::MEM_SHARE, ipa, 1), 0);
        assert_eq!(m.guest_st(slot(h), func::MEM_UNSHARE, ipa, 1), 0);
    }
    let convert = t.elapsed().as_nanos() as f64 / rounds as f64;
    println!(
        "null {null:.0} ns, share+unshare {convert:.0} ns, ratio {:.1}",
        convert / null
    );
}
