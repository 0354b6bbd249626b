//! `host-abi`: the host's memory calls as ABI.md's Host calls table and
//! docs/abi.md describe them: HOST_SHARE_HYP, HOST_UNSHARE_HYP,
//! HOST_DONATE_HYP, HOST_RECLAIM (of free donated pages), MEM_STATE and
//! HYP_STATS; each call's success path with MEM_STATE before and after,
//! every error status, all-or-nothing, host access to donated pages,
//! zeroing on reclaim, the host's mapping sizes and the counters.
//!
//! Every hypercall of this suite goes through [`gate`], which runs keel's
//! invariant checker (KEEL_CHECK_INVARIANTS, a keel extension) after it and
//! fails the test at the first call that leaves the hypervisor's tables,
//! pool and ownership records disagreeing.
//!
//! Test pages: 2 MiB blocks from [`TEST_BASE`] up, one block per test so
//! that each test starts from a block the host stage 2 maps whole. The
//! runner gives QEMU 2 GiB at 0x4000_0000; this kernel is at 0x5000_0000,
//! the initrd at 0x5800_0000 and the device tree near the hypervisor, so
//! nothing of ours lives there ([`test_block`] checks it all the same).

use core::sync::atomic::{AtomicU64, Ordering};

use keel_abi::call::{self, MemState};
use keel_abi::{func, owner, stat, status, Error, Regs};

use crate::dt::{BootInfo, Range};
use crate::exception::{self, ec};
use crate::harness::{Failure, Suite, Test, TestResult};
use crate::suites::boot::HYP_LOAD_ADDR;
use crate::suites::isolation::{check_abort, in_initrd};
use crate::{ensure, ensure_eq, fail};

pub static SUITE: Suite = Suite {
    name: "host-abi",
    tests: &[
        Test {
            name: "invariants_at_boot",
            run: invariants_at_boot,
        },
        Test {
            name: "mem_state_of_hyp_and_host",
            run: mem_state_of_hyp_and_host,
        },
        Test {
            name: "share_unshare",
            run: share_unshare,
        },
        Test {
            name: "share_keeps_host_mapping",
            run: share_keeps_host_mapping,
        },
        Test {
            name: "donate_reclaim",
            run: donate_reclaim,
        },
        Test {
            name: "donate_reclaim_whole_block",
            run: donate_reclaim_whole_block,
        },
        Test {
            name: "donate_reclaim_64m",
            run: donate_reclaim_64m,
        },
        Test {
            name: "invalid_parameter",
            run: invalid_parameter,
        },
        Test {
            name: "denied_hyp_pages",
            run: denied_hyp_pages,
        },
        Test {
            name: "denied_wrong_state",
            run: denied_wrong_state,
        },
        Test {
            name: "guest_calls_not_supported",
            run: guest_calls_not_supported,
        },
        Test {
            name: "all_or_nothing",
            run: all_or_nothing,
        },
        Test {
            name: "stats_pool_accounting",
            run: stats_pool_accounting,
        },
        Test {
            name: "stats_pool_conserved_fresh_block",
            run: stats_pool_conserved_fresh_block,
        },
        Test {
            name: "stats_hypercall_counter",
            run: stats_hypercall_counter,
        },
        Test {
            name: "stats_bad_index",
            run: stats_bad_index,
        },
        // Last: it leaves the hypervisor's boot pool used up.
        Test {
            name: "no_memory_then_donate",
            run: no_memory_then_donate,
        },
    ],
};

pub const PAGE: u64 = 4096;
pub const BLOCK: u64 = 2 << 20;
/// Pages per 2 MiB block.
pub const BLOCK_PAGES: u64 = BLOCK / PAGE;
/// The first test block: host RAM far from everything the kernel uses.
pub const TEST_BASE: u64 = 0x7000_0000;

/// A call's outcome as the typed client reports it.
type Status = Result<(), Error>;
const OK: Status = Ok(());
const INVALID: Status = Err(Error::InvalidParameter);
const DENIED: Status = Err(Error::Denied);

/// (owner, host state, host mapping size) as MEM_STATE x1..x3.
type PageView = (u64, u64, u64);
const HOST_OWNED_2M: PageView = (owner::HOST, 0, BLOCK);
const HOST_OWNED_4K: PageView = (owner::HOST, 0, PAGE);
const SHARED_2M: PageView = (owner::HOST, 1, BLOCK);
const HYP_NOPAGE: PageView = (owner::HYP, 3, 0);

/// Calls through [`gate`] that returned SUCCESS, the invariant checks
/// included: what HYP_STATS 5 must count ([`stats_hypercall_counter`]).
static SUCCESSES: AtomicU64 = AtomicU64::new(0);

fn call_name(id: u64) -> &'static str {
    match id {
        func::HOST_SHARE_HYP => "HOST_SHARE_HYP",
        func::HOST_UNSHARE_HYP => "HOST_UNSHARE_HYP",
        func::HOST_DONATE_HYP => "HOST_DONATE_HYP",
        func::HOST_RECLAIM => "HOST_RECLAIM",
        func::MEM_STATE => "MEM_STATE",
        func::HYP_STATS => "HYP_STATS",
        func::MEM_SHARE => "MEM_SHARE",
        func::MEM_UNSHARE => "MEM_UNSHARE",
        func::MEM_RELINQUISH => "MEM_RELINQUISH",
        _ => "call",
    }
}

/// Runs KEEL_CHECK_INVARIANTS; `after` names the call it follows.
fn check_invariants(after: core::fmt::Arguments) -> TestResult {
    match call::keel_check_invariants() {
        Ok(()) => {
            SUCCESSES.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err((Error::Denied, addr)) => fail!(
            "invariant violated at {:#x} after {} (the hypervisor's log says which)",
            addr,
            after
        ),
        Err((e, _)) => fail!("KEEL_CHECK_INVARIANTS after {}: {:?}", after, e),
    }
}

/// Every call of this suite: issues it, counts it if it succeeded, then
/// checks the hypervisor's invariants.
fn gate(id: u64, a1: u64, a2: u64) -> Result<Regs, Failure> {
    let r = crate::hvc(id, [a1, a2, 0, 0, 0]);
    if r.status() == status::SUCCESS {
        SUCCESSES.fetch_add(1, Ordering::Relaxed);
    }
    check_invariants(format_args!("{}({:#x}, {:#x})", call_name(id), a1, a2))?;
    Ok(r)
}

/// KEEL_TABLE_PAGES 0 (a keel extension), through the typed client: the
/// host stage 2's table pages, root included. Counted and followed by the
/// invariant check like every call of [`gate`].
fn host_stage2_tables() -> Result<u64, Failure> {
    let r = call::keel_table_pages(owner::HOST);
    if r.is_ok() {
        SUCCESSES.fetch_add(1, Ordering::Relaxed);
    }
    check_invariants(format_args!("KEEL_TABLE_PAGES(0)"))?;
    match r {
        Ok(n) => Ok(n),
        Err(e) => fail!("KEEL_TABLE_PAGES(0): {:?}", e),
    }
}

/// The range calls, by what they do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Share,
    Unshare,
    Donate,
    Reclaim,
}
use Op::*;

impl Op {
    const ALL: [Op; 4] = [Share, Unshare, Donate, Reclaim];

    fn id(self) -> u64 {
        match self {
            Share => func::HOST_SHARE_HYP,
            Unshare => func::HOST_UNSHARE_HYP,
            Donate => func::HOST_DONATE_HYP,
            Reclaim => func::HOST_RECLAIM,
        }
    }
}

fn op(op: Op, pfn: u64, nr: u64) -> Result<Status, Failure> {
    Ok(gate(op.id(), pfn, nr)?.ok().map(drop))
}

/// `op(pfn, nr)` must return `want`.
fn expect(op_: Op, pfn: u64, nr: u64, want: Status) -> TestResult {
    let got = op(op_, pfn, nr)?;
    ensure!(
        got == want,
        "{}(pfn {:#x}, nr {:#x}): got {:?}, expected {:?}",
        call_name(op_.id()),
        pfn,
        nr,
        got,
        want
    );
    Ok(())
}

fn ok(op_: Op, pfn: u64, nr: u64) -> TestResult {
    expect(op_, pfn, nr, OK)
}

fn mem_state(pfn: u64) -> Result<Result<MemState, Error>, Failure> {
    let r = gate(func::MEM_STATE, pfn, 0)?;
    Ok(r.ok().map(|r| MemState {
        owner_or_pfn: r.0[1],
        state: r.0[2],
        map_size: r.0[3],
    }))
}

/// MEM_STATE of `pfn`, which must succeed.
fn view(pfn: u64) -> Result<PageView, Failure> {
    match mem_state(pfn)? {
        Ok(s) => Ok((s.owner_or_pfn, s.state, s.map_size)),
        Err(e) => fail!("MEM_STATE(pfn {:#x}): {:?}", pfn, e),
    }
}

/// A [`PageView`] as a failure message shows it.
struct Shown(PageView);

impl core::fmt::Display for Shown {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (owner, state, size) = self.0;
        write!(f, "(owner {owner:#x}, state {state}, size {size:#x})")
    }
}

/// MEM_STATE of each page of [pfn, pfn + nr) must be `want`.
fn expect_view(pfn: u64, nr: u64, want: PageView, when: &str) -> TestResult {
    for p in pfn..pfn + nr {
        let got = view(p)?;
        ensure!(
            got == want,
            "{}: MEM_STATE(pfn {:#x}) = {}, expected {}",
            when,
            p,
            Shown(got),
            Shown(want)
        );
    }
    Ok(())
}

/// HYP_STATS `index`, which must succeed.
fn stat(index: u64) -> Result<u64, Failure> {
    let r = gate(func::HYP_STATS, index, 0)?;
    match r.ok() {
        Ok(r) => Ok(r.0[1]),
        Err(e) => fail!("HYP_STATS({}): {:?}", index, e),
    }
}

/// Counters 0..=4 (table pages, free pool pages, splits, merges, aborts).
fn counters() -> Result<[u64; 5], Failure> {
    let mut c = [0; 5];
    for (i, v) in c.iter_mut().enumerate() {
        *v = stat(i as u64)?;
    }
    Ok(c)
}

fn pfn(pa: u64) -> u64 {
    pa / PAGE
}

/// The physical address of test block `k`, checked to be host RAM that
/// nothing of ours uses and that the host stage 2 maps as one 2 MiB block.
pub(crate) fn test_block(boot: &BootInfo, k: u64) -> Result<u64, Failure> {
    let base = TEST_BASE + k * BLOCK;
    let block = Range::new(base, base + BLOCK);
    ensure!(
        boot.memory.covers(&block),
        "test block {} is not host memory",
        block
    );
    let overlaps = |r: &Range| r.start < block.end && block.start < r.end;
    ensure!(
        !overlaps(&boot.image) && !overlaps(&boot.dtb),
        "test block {} overlaps the kernel {} or the device tree {}",
        block,
        boot.image,
        boot.dtb
    );
    ensure!(
        !in_initrd(boot, block.start) && !in_initrd(boot, block.end - 1),
        "test block {} overlaps the initrd",
        block
    );
    expect_view(pfn(base), 1, HOST_OWNED_2M, "test block at the start")?;
    expect_view(
        pfn(block.end) - 1,
        1,
        HOST_OWNED_2M,
        "test block's last page at the start",
    )?;
    Ok(base)
}

/// A value that differs per address, so a page read back from the wrong
/// place or left unzeroed shows.
fn pattern(addr: u64) -> u64 {
    addr.rotate_left(17) ^ 0x6b65_656c_7465_7374
}

fn fill(start: u64, len: u64) {
    for a in (start..start + len).step_by(8) {
        // SAFETY: test pages are host RAM that nothing else uses
        // (`test_block`), mapped Normal by our stage 1 and by stage 2.
        unsafe { core::ptr::write_volatile(a as *mut u64, pattern(a)) };
    }
}

/// Checks that [start, start + len) holds `pattern` (or zero, if `zero`).
fn check_contents(start: u64, len: u64, zero: bool, what: &str) -> TestResult {
    for a in (start..start + len).step_by(8) {
        // SAFETY: as in `fill`; the callers only read pages the host owns.
        let v = unsafe { core::ptr::read_volatile(a as *const u64) };
        let want = if zero { 0 } else { pattern(a) };
        ensure!(
            v == want,
            "{}: {:#x} holds {:#x}, expected {:#x}",
            what,
            a,
            v,
            want
        );
    }
    Ok(())
}

/// Host read, write and fetch of `addr` each abort as ABI.md's Host faults
/// says. Returns how many aborts were taken (3).
fn access_aborts(addr: u64) -> Result<u64, Failure> {
    match exception::read(addr) {
        Ok(v) => fail!("host read of donated {:#x} succeeded: {:#x}", addr, v),
        Err(a) => check_abort(&a, ec::DATA_ABORT_SAME, addr, "read")?,
    }
    // SAFETY: the read aborted, so stage 2 does not map the page; the store
    // aborts (caught) or is the failure reported below.
    match unsafe { exception::write(addr, 0xbad0_bad0_bad0_bad0) } {
        None => fail!("host write to donated {:#x} succeeded", addr),
        Some(a) => check_abort(&a, ec::DATA_ABORT_SAME, addr, "write")?,
    }
    // SAFETY: as above; the fetch aborts unless isolation is broken in a
    // way the read did not show.
    match unsafe { exception::exec(addr) } {
        None => fail!("host executed donated {:#x} and returned", addr),
        Some(a) => check_abort(&a, ec::INSTR_ABORT_SAME, addr, "fetch")?,
    }
    Ok(3)
}

/// The host can read and write `addr` (a page it owns or shares).
fn host_can_use(addr: u64) -> TestResult {
    let v = match exception::read(addr) {
        Ok(v) => v,
        Err(a) => fail!("host read of its own {:#x} aborted: {}", addr, a),
    };
    // SAFETY: a host test page (see `fill`); the old value is put back.
    if let Some(a) = unsafe { exception::write(addr, !v) } {
        fail!("host write to its own {:#x} aborted: {}", addr, a);
    }
    ensure_eq!(exception::read(addr), Ok(!v), "value written back");
    // SAFETY: as above.
    unsafe { exception::write(addr, v) };
    Ok(())
}

// ---- the tests ----

fn invariants_at_boot(_: &BootInfo) -> TestResult {
    check_invariants(format_args!("boot"))
}

fn mem_state_of_hyp_and_host(boot: &BootInfo) -> TestResult {
    let holes = boot.hyp_ranges();
    ensure!(
        holes.contains(HYP_LOAD_ADDR),
        "the hypervisor's memory (holes of /memory) lacks {:#x}",
        HYP_LOAD_ADDR
    );
    expect_view(pfn(HYP_LOAD_ADDR), 1, HYP_NOPAGE, "hypervisor load address")?;
    for h in holes.iter() {
        expect_view(pfn(h.start), 1, HYP_NOPAGE, "hypervisor's first page")?;
        expect_view(pfn(h.end) - 1, 1, HYP_NOPAGE, "hypervisor's last page")?;
    }
    // Host pages: a test block, this kernel's first page, RAM's last page.
    test_block(boot, 0)?;
    let (o, s, size) = view(pfn(boot.image.start))?;
    ensure!(
        o == owner::HOST && s == 0 && size >= PAGE,
        "MEM_STATE of the kernel image {:#x}: ({}, {}, {:#x})",
        boot.image.start,
        o,
        s,
        size
    );
    let last = pfn(boot.physical_ram().end) - 1;
    let (o, s, size) = view(last)?;
    ensure!(
        o == owner::HOST && s == 0 && size >= PAGE,
        "MEM_STATE of RAM's last page {:#x}: ({}, {}, {:#x})",
        last,
        o,
        s,
        size
    );
    Ok(())
}

fn share_unshare(boot: &BootInfo) -> TestResult {
    let p = pfn(test_block(boot, 1)?);
    ok(Share, p, 1)?;
    expect_view(p, 1, SHARED_2M, "after sharing one page")?;
    expect_view(p + 1, 1, HOST_OWNED_2M, "its neighbour")?;
    host_can_use(p * PAGE)?;
    ok(Share, p + 1, 8)?;
    expect_view(p, 9, SHARED_2M, "after sharing 8 more")?;
    expect_view(p + 9, 1, HOST_OWNED_2M, "the page after them")?;
    host_can_use((p + 8) * PAGE)?;
    ok(Unshare, p, 9)?;
    expect_view(p, 10, HOST_OWNED_2M, "after unsharing all 9")?;
    host_can_use(p * PAGE)
}

fn share_keeps_host_mapping(boot: &BootInfo) -> TestResult {
    let base = test_block(boot, 2)?;
    let p = pfn(base);
    let before = counters()?;
    ok(Share, p + 7, 1)?;
    expect_view(p + 7, 1, SHARED_2M, "one page shared")?;
    ok(Share, p, 7)?;
    ok(Share, p + 8, BLOCK_PAGES - 8)?;
    for q in [p, p + 8, p + BLOCK_PAGES / 2, p + BLOCK_PAGES - 1] {
        expect_view(q, 1, SHARED_2M, "whole block shared")?;
    }
    host_can_use(base + BLOCK / 2)?;
    let after = counters()?;
    ensure_eq!(
        after[stat::BLOCK_SPLITS as usize],
        before[stat::BLOCK_SPLITS as usize],
        "block splits after sharing (the host stage 2 must not change)"
    );
    ok(Unshare, p, BLOCK_PAGES)?;
    expect_view(p, 1, HOST_OWNED_2M, "after unsharing the block")?;
    expect_view(p + BLOCK_PAGES - 1, 1, HOST_OWNED_2M, "after unsharing")?;
    let end = counters()?;
    ensure_eq!(
        [end[2], end[3]],
        [before[2], before[3]],
        "block splits and merges after share + unshare"
    );
    Ok(())
}

fn donate_reclaim(boot: &BootInfo) -> TestResult {
    let base = test_block(boot, 3)?;
    let p = pfn(base);
    // Pages p+1..p+5 are donated; p and p+5 are their neighbours.
    const N: u64 = 4;
    fill(base, (N + 2) * PAGE);
    let before = counters()?;
    ok(Donate, p + 1, N)?;
    expect_view(p + 1, N, HYP_NOPAGE, "donated pages")?;
    expect_view(p, 1, HOST_OWNED_4K, "page before the donated ones")?;
    expect_view(p + 1 + N, 1, HOST_OWNED_4K, "page after the donated ones")?;
    let split = counters()?;
    ensure!(
        split[2] > before[2],
        "block splits did not increase ({} -> {}) although a 2 MiB block lost pages",
        before[2],
        split[2]
    );
    let mut aborts = 0;
    for q in p + 1..p + 1 + N {
        aborts += access_aborts(q * PAGE + 8 * (q - p))?;
    }
    let after_aborts = stat(stat::HOST_ABORTS)?;
    ensure_eq!(
        after_aborts - split[stat::HOST_ABORTS as usize],
        aborts,
        "HYP_STATS 4 increase over the probes"
    );
    // The neighbours are untouched and still the host's.
    check_contents(base, PAGE, false, "page before the donated ones")?;
    check_contents((p + 1 + N) * PAGE, PAGE, false, "page after")?;
    host_can_use(base)?;
    ok(Reclaim, p + 1, N)?;
    expect_view(p, N + 2, HOST_OWNED_2M, "after reclaim")?;
    check_contents((p + 1) * PAGE, N * PAGE, true, "reclaimed pages")?;
    check_contents(base, PAGE, false, "page before the reclaimed ones")?;
    check_contents((p + 1 + N) * PAGE, PAGE, false, "page after")?;
    host_can_use((p + 1) * PAGE)?;
    let end = counters()?;
    ensure!(
        end[3] > split[3],
        "block merges did not increase ({} -> {}) although the block is whole again",
        split[3],
        end[3]
    );
    Ok(())
}

fn donate_reclaim_whole_block(boot: &BootInfo) -> TestResult {
    let base = test_block(boot, 4)?;
    let p = pfn(base);
    fill(base, BLOCK);
    let before = counters()?;
    ok(Donate, p, BLOCK_PAGES)?;
    for q in [p, p + 1, p + BLOCK_PAGES / 2, p + BLOCK_PAGES - 1] {
        expect_view(q, 1, HYP_NOPAGE, "donated block")?;
    }
    let donated = counters()?;
    ensure_eq!(
        donated[2],
        before[2],
        "block splits after donating a whole 2 MiB block"
    );
    let mut aborts = access_aborts(base)?;
    aborts += access_aborts(base + BLOCK - 8)?;
    ensure_eq!(
        stat(stat::HOST_ABORTS)? - donated[4],
        aborts,
        "HYP_STATS 4 increase over the probes"
    );
    ok(Reclaim, p, BLOCK_PAGES)?;
    for q in [p, p + BLOCK_PAGES / 2, p + BLOCK_PAGES - 1] {
        expect_view(q, 1, HOST_OWNED_2M, "reclaimed block")?;
    }
    check_contents(base, BLOCK, true, "reclaimed block")?;
    host_can_use(base + BLOCK - 8)?;
    let end = counters()?;
    ensure_eq!(
        end[0] + end[1],
        before[0] + before[1],
        "table + free pool pages after donating and reclaiming a block"
    );
    Ok(())
}

/// First test block of [`donate_reclaim_64m`]'s 32 (64 MiB), above every
/// other test's.
const BLOCKS_64M: u64 = 32;

/// 64 MiB (16384 pages, twice what keel once tracked) donated in one call
/// and reclaimed in one call: the pool grows by every page, the host sees
/// none of them meanwhile, and afterwards it has its 2 MiB blocks back,
/// zeroed, with the pool and tables where they were.
fn donate_reclaim_64m(boot: &BootInfo) -> TestResult {
    let blocks = 32;
    let base = test_block(boot, BLOCKS_64M)?;
    for k in 1..blocks {
        test_block(boot, BLOCKS_64M + k)?;
    }
    let (p, nr) = (pfn(base), blocks * BLOCK_PAGES);
    let last = base + blocks * BLOCK - BLOCK;
    fill(base, BLOCK);
    fill(last, BLOCK);
    let before = counters()?;
    ok(Donate, p, nr)?;
    for q in [p, p + nr / 2, p + nr - 1] {
        expect_view(q, 1, HYP_NOPAGE, "donated 64 MiB")?;
    }
    let donated = counters()?;
    ensure_eq!(
        donated[1] + (donated[0] - before[0]),
        before[1] + nr,
        "free pool pages after donating 16384 pages (less the host tables the donation took)"
    );
    // The host's accesses to the last donated page abort.
    access_aborts(last + BLOCK - 8)?;
    ok(Reclaim, p, nr)?;
    for q in [p, p + nr / 2, p + nr - 1] {
        expect_view(q, 1, HOST_OWNED_2M, "reclaimed 64 MiB")?;
    }
    check_contents(base, BLOCK, true, "first reclaimed block")?;
    check_contents(last, BLOCK, true, "last reclaimed block")?;
    let end = counters()?;
    ensure_eq!(
        end[0] + end[1],
        before[0] + before[1],
        "table + free pool pages after donating and reclaiming 64 MiB"
    );
    Ok(())
}

fn invalid_parameter(boot: &BootInfo) -> TestResult {
    let base = test_block(boot, 5)?;
    let p = pfn(base);
    let ram = boot.physical_ram();
    let (ram_first, ram_end) = (pfn(ram.start), pfn(ram.end));
    let last_page = view(ram_end - 1)?;
    let before = counters()?;
    // (pfn, nr, why)
    let cases: [(u64, u64, &str); 11] = [
        (p, 0, "nr = 0"),
        (1 << 52, 1, "pfn * 4096 overflows"),
        (u64::MAX, 1, "pfn * 4096 overflows (all ones)"),
        (p, 1 << 52, "nr * 4096 overflows"),
        (p, (1 << 52) - 1, "start + length overflows"),
        (pfn(0x0900_0000), 1, "device memory (the UART)"),
        (0, 1, "below RAM"),
        (ram_end, 1, "the first page after RAM"),
        (pfn(1 << 40), 1, "beyond the IPA space"),
        (ram_end - 1, 2, "across the end of RAM"),
        (ram_first - 1, 2, "across the start of RAM"),
    ];
    for (pfn, nr, why) in cases {
        for o in Op::ALL {
            let got = op(o, pfn, nr)?;
            ensure!(
                got == INVALID,
                "{}(pfn {:#x}, nr {:#x}) ({}): got {:?}, expected INVALID_PARAMETER",
                call_name(o.id()),
                pfn,
                nr,
                why,
                got
            );
        }
    }
    for (pfn, why) in [
        (ram_end, "first page after RAM"),
        (0, "below RAM"),
        (1 << 52, "overflowing pfn"),
    ] {
        let got = mem_state(pfn)?;
        ensure!(
            got == Err(Error::InvalidParameter),
            "MEM_STATE(pfn {:#x}) ({}): got {:?}, expected INVALID_PARAMETER",
            pfn,
            why,
            got
        );
    }
    // Refused calls change nothing.
    expect_view(p, 1, HOST_OWNED_2M, "after the refused calls")?;
    expect_view(ram_end - 1, 1, last_page, "RAM's last page")?;
    ensure_eq!(counters()?, before, "HYP_STATS 0..4 after refused calls");
    Ok(())
}

fn denied_hyp_pages(boot: &BootInfo) -> TestResult {
    let holes = boot.hyp_ranges();
    let Some(hole) = holes.iter().find(|h| h.contains(HYP_LOAD_ADDR)).copied() else {
        fail!("no hypervisor memory at {:#x}", HYP_LOAD_ADDR)
    };
    let before = counters()?;
    let h = pfn(hole.start);
    for o in Op::ALL {
        expect(o, pfn(HYP_LOAD_ADDR), 1, DENIED)?;
        expect(o, h, pfn(hole.len()), DENIED)?;
        expect(o, pfn(hole.end) - 1, 1, DENIED)?;
    }
    // A range that starts in host memory and ends in the hypervisor's (one
    // RAM region, so not INVALID_PARAMETER): DENIED, the host page unchanged.
    let host_page = h - 1;
    let was = view(host_page)?;
    ensure_eq!(was.0, owner::HOST, "owner of the page below the hypervisor");
    for o in [Share, Donate] {
        expect(o, host_page, 2, DENIED)?;
    }
    expect_view(host_page, 1, was, "page below the hypervisor")?;
    expect_view(h, 1, HYP_NOPAGE, "hypervisor's first page")?;
    ensure_eq!(counters()?, before, "HYP_STATS 0..4 after refused calls");
    Ok(())
}

fn denied_wrong_state(boot: &BootInfo) -> TestResult {
    let p = pfn(test_block(boot, 6)?);
    // Host OWNED: only share and donate apply.
    expect(Unshare, p, 1, DENIED)?;
    expect(Reclaim, p, 1, DENIED)?;
    expect_view(p, 1, HOST_OWNED_2M, "after unshare/reclaim of a host page")?;
    // Shared with the hypervisor.
    ok(Share, p, 1)?;
    expect(Share, p, 1, DENIED)?;
    expect(Donate, p, 1, DENIED)?;
    expect(Reclaim, p, 1, DENIED)?;
    expect_view(p, 1, SHARED_2M, "after the refused calls on a shared page")?;
    ok(Unshare, p, 1)?;
    expect(Unshare, p, 1, DENIED)?;
    expect_view(p, 1, HOST_OWNED_2M, "after unshare")?;
    // Donated (and free in the pool).
    ok(Donate, p, 1)?;
    expect(Donate, p, 1, DENIED)?;
    expect(Share, p, 1, DENIED)?;
    expect(Unshare, p, 1, DENIED)?;
    expect_view(
        p,
        1,
        HYP_NOPAGE,
        "after the refused calls on a donated page",
    )?;
    ok(Reclaim, p, 1)?;
    expect(Reclaim, p, 1, DENIED)?;
    expect_view(p, 1, HOST_OWNED_2M, "after reclaim")
}

fn guest_calls_not_supported(boot: &BootInfo) -> TestResult {
    let base = test_block(boot, 7)?;
    let before = counters()?;
    for id in [func::MEM_SHARE, func::MEM_UNSHARE, func::MEM_RELINQUISH] {
        for nr in [0, 1] {
            let got = gate(id, base, nr)?.status();
            ensure!(
                got == status::NOT_SUPPORTED,
                "{}({:#x}, {}) from the host: status {}, expected NOT_SUPPORTED",
                call_name(id),
                base,
                nr,
                got
            );
        }
    }
    expect_view(pfn(base), 1, HOST_OWNED_2M, "after the guest calls")?;
    ensure_eq!(counters()?, before, "HYP_STATS 0..4 after refused calls");
    Ok(())
}

fn all_or_nothing(boot: &BootInfo) -> TestResult {
    let base = test_block(boot, 8)?;
    let p = pfn(base);
    // Shares: [p, p+3) where only p+2 is shared.
    ok(Share, p + 2, 1)?;
    let before = counters()?;
    expect(Share, p, 3, DENIED)?;
    expect_view(p, 2, HOST_OWNED_2M, "first pages after a refused share")?;
    expect_view(p + 2, 1, SHARED_2M, "the shared page")?;
    expect(Donate, p, 3, DENIED)?;
    expect_view(p, 2, HOST_OWNED_2M, "first pages after a refused donate")?;
    expect(Unshare, p, 3, DENIED)?;
    expect_view(p + 2, 1, SHARED_2M, "last page after a refused unshare")?;
    ensure_eq!(counters()?, before, "HYP_STATS 0..4 after refused calls");
    ok(Unshare, p + 2, 1)?;
    expect_view(p, 3, HOST_OWNED_2M, "after unsharing")?;

    // Reclaims: [q, q+3) where q and q+1 are donated and q+2 is the host's.
    let q = p + 16;
    fill(q * PAGE, 3 * PAGE);
    ok(Donate, q, 2)?;
    let before = counters()?;
    expect(Reclaim, q, 3, DENIED)?;
    expect(Reclaim, q - 1, 3, DENIED)?;
    expect_view(q, 2, HYP_NOPAGE, "donated pages after a refused reclaim")?;
    expect_view(q + 2, 1, HOST_OWNED_4K, "the host's page")?;
    check_contents((q + 2) * PAGE, PAGE, false, "the host's page")?;
    // Still the hypervisor's: the host cannot reach them.
    let aborts = access_aborts(q * PAGE)? + access_aborts((q + 1) * PAGE)?;
    // Donating [q+2, q+4) would leave the block split anyway; donating
    // [q-1, q+1) is refused on its last page.
    expect(Donate, q - 1, 2, DENIED)?;
    expect_view(
        q - 1,
        1,
        HOST_OWNED_4K,
        "page before after a refused donate",
    )?;
    let mut want = before;
    want[stat::HOST_ABORTS as usize] += aborts;
    ensure_eq!(counters()?, want, "HYP_STATS 0..4 after refused calls");
    ok(Reclaim, q, 2)?;
    expect_view(q - 1, 4, HOST_OWNED_2M, "after reclaim")?;
    check_contents(q * PAGE, 2 * PAGE, true, "reclaimed pages")?;
    check_contents((q + 2) * PAGE, PAGE, false, "the host's page")
}

fn stats_pool_accounting(boot: &BootInfo) -> TestResult {
    let p = pfn(test_block(boot, 9)?);
    // The hypervisor maps shared and donated pages in its own stage 1, and
    // frees those tables once nothing in them is mapped: a share and an
    // unshare leave no trace.
    let start = counters()?;
    ok(Share, p, 1)?;
    ok(Unshare, p, 1)?;
    ensure_eq!(
        [counters()?[0], counters()?[1]],
        [start[0], start[1]],
        "table and free pages after share + unshare"
    );
    const N: u64 = 16;
    let before = counters()?;
    let host_before = host_stage2_tables()?;
    ok(Donate, p, N)?;
    let donated = counters()?;
    let host_donated = host_stage2_tables()?;
    let tables = donated[0] as i64 - before[0] as i64;
    let free = donated[1] as i64 - before[1] as i64;
    ensure!(
        free == N as i64 - tables,
        "donating {} pages: free pool pages {:+}, table pages {:+}; expected free = {} - tables",
        N,
        free,
        tables,
        N
    );
    // One table for the host stage-2 split, one for the pages in the
    // hypervisor's stage 1 (freed again when they are unmapped).
    ensure!(
        tables == 2 && donated[2] == before[2] + 1 && host_donated == host_before + 1,
        "donating {} pages of a 2 MiB block: table pages {:+} (host stage 2 {:+}), splits {:+}; expected one split and two tables, one of them the host stage 2's",
        N,
        tables,
        host_donated as i64 - host_before as i64,
        donated[2] - before[2]
    );
    ok(Reclaim, p, N)?;
    ensure_eq!(
        host_stage2_tables()?,
        host_before,
        "host stage-2 table pages (KEEL_TABLE_PAGES 0) after reclaim"
    );
    let end = counters()?;
    ensure_eq!(
        [end[0], end[1]],
        [before[0], before[1]],
        "table pages and free pool pages after reclaim (before donating: hex)"
    );
    ensure_eq!(end[3], before[3] + 1, "block merges after reclaim");
    expect_view(p, 1, HOST_OWNED_2M, "after reclaim")
}

fn stats_pool_conserved_fresh_block(boot: &BootInfo) -> TestResult {
    // A block the hypervisor never mapped: its stage 1 needs tables too.
    // Every pool page is free or a table page, so free + tables grows by
    // exactly the pages donated, and is back where it was after reclaim.
    let p = pfn(test_block(boot, 10)?);
    const N: u64 = 8;
    let before = counters()?;
    ok(Donate, p + 3, N)?;
    let donated = counters()?;
    ensure_eq!(
        donated[0] + donated[1],
        before[0] + before[1] + N,
        "table + free pool pages after donating 8 (before + 8)"
    );
    ensure!(
        donated[0] > before[0],
        "table pages did not grow ({} -> {}) although the block was split",
        before[0],
        donated[0]
    );
    ok(Reclaim, p + 3, N)?;
    let end = counters()?;
    ensure_eq!(
        end[0] + end[1],
        before[0] + before[1],
        "table + free pool pages after reclaim"
    );
    ensure!(
        end[1] <= before[1] && end[0] >= before[0],
        "reclaim gave back more than was donated: tables {} -> {}, free {} -> {}",
        before[0],
        end[0],
        before[1],
        end[1]
    );
    expect_view(p, 1, HOST_OWNED_2M, "after reclaim")
}

fn stats_hypercall_counter(boot: &BootInfo) -> TestResult {
    let p = pfn(test_block(boot, 11)?);
    // HYP_STATS 5 reads the count before the call itself is counted, so
    // over any stretch of gated calls it grows by exactly the successes the
    // gate saw (the HYP_STATS calls and invariant checks included), and
    // refused calls add nothing.
    let c0 = SUCCESSES.load(Ordering::Relaxed);
    let h0 = stat(stat::HYPERCALLS)?;
    ok(Share, p, 2)?;
    expect(Share, p, 2, DENIED)?;
    view(p)?;
    ensure_eq!(mem_state(0)?, Err(Error::InvalidParameter), "MEM_STATE(0)");
    expect(Donate, p, 0, INVALID)?;
    ok(Unshare, p, 2)?;
    expect(Unshare, p, 2, DENIED)?;
    ensure_eq!(
        gate(func::HYP_STATS, stat::COUNT, 0)?.status(),
        status::INVALID_PARAMETER,
        "HYP_STATS(6)"
    );
    ensure_eq!(
        gate(func::MEM_SHARE, p * PAGE, 1)?.status(),
        status::NOT_SUPPORTED,
        "MEM_SHARE"
    );
    ok(Donate, p, 1)?;
    ok(Reclaim, p, 1)?;
    let c1 = SUCCESSES.load(Ordering::Relaxed);
    let h1 = stat(stat::HYPERCALLS)?;
    ensure!(
        h1 - h0 == c1 - c0,
        "HYP_STATS 5 grew by {} over a stretch of {} successful calls",
        h1 - h0,
        c1 - c0
    );
    // Refused calls alone: only the invariant checks after them count.
    let h2 = stat(stat::HYPERCALLS)?;
    for _ in 0..5 {
        expect(Reclaim, p, 1, DENIED)?;
    }
    let h3 = stat(stat::HYPERCALLS)?;
    ensure_eq!(
        h3 - h2,
        2 + 5,
        "HYP_STATS 5 over 5 refused calls (1 HYP_STATS + 6 invariant checks)"
    );
    Ok(())
}

fn stats_bad_index(_: &BootInfo) -> TestResult {
    for i in 0..stat::COUNT {
        stat(i)?;
    }
    for i in [stat::COUNT, stat::COUNT + 1, 64, 1 << 32, u64::MAX] {
        let got = gate(func::HYP_STATS, i, 0)?.status();
        ensure!(
            got == status::INVALID_PARAMETER,
            "HYP_STATS({:#x}): status {}, expected INVALID_PARAMETER",
            i,
            got
        );
    }
    Ok(())
}

/// Most fresh 2 MiB regions `no_memory_then_donate` shares a page of.
const MAX_REGIONS: usize = 128;

fn no_memory_then_donate(boot: &BootInfo) -> TestResult {
    // Sharing a page of a 2 MiB region the hypervisor never mapped costs
    // it a stage-1 table page, which it keeps: share one page in fresh
    // regions of the second GiB until the boot pool runs out.
    let mut shared = [0u64; MAX_REGIONS];
    let mut n = 0;
    let refused = loop {
        let pa = 0x8000_0000 + n as u64 * BLOCK;
        ensure!(
            boot.memory.covers(&Range::new(pa, pa + BLOCK)),
            "{:#x}: out of host memory before the pool ran out ({} regions shared)",
            pa,
            n
        );
        ensure!(n < MAX_REGIONS, "no NO_MEMORY after sharing {} regions", n);
        let was = view(pfn(pa))?;
        let before = counters()?;
        match op(Share, pfn(pa), 1)? {
            Ok(()) => {
                shared[n] = pfn(pa);
                n += 1;
            }
            Err(Error::NoMemory) => {
                // All or nothing: NO_MEMORY changes no page and no counter.
                expect_view(pfn(pa), 1, was, "page of a share refused with NO_MEMORY")?;
                ensure_eq!(counters()?, before, "HYP_STATS 0..4 after NO_MEMORY");
                break pfn(pa);
            }
            Err(e) => fail!("HOST_SHARE_HYP({:#x}, 1): {:?}", pfn(pa), e),
        }
    };
    let free = stat(stat::FREE_POOL_PAGES)?;
    ensure!(
        free < 2,
        "{} free pool pages after NO_MEMORY on a share that needs at most 2",
        free
    );
    // Donating is how the host refills the pool, so it works even now: its
    // own tables (a host split, a stage-1 table) come from the pool's
    // reserve, which nothing else may use.
    let fresh = pfn(test_block(boot, 12)?);
    ok(Donate, fresh, 1)?;
    expect_view(
        fresh,
        1,
        HYP_NOPAGE,
        "page donated while the pool was exhausted",
    )?;
    // A whole block: its 512 pages join the pool, mapped by the hypervisor
    // as one 2 MiB block (no table needed).
    let b = pfn(TEST_BASE + 4 * BLOCK);
    expect_view(b, 1, HOST_OWNED_2M, "block 4 before donating it")?;
    ok(Donate, b, BLOCK_PAGES)?;
    let refilled = stat(stat::FREE_POOL_PAGES)?;
    ensure!(
        refilled > free + BLOCK_PAGES / 2,
        "free pool pages {} -> {} after donating a whole block",
        free,
        refilled
    );
    // The refused share now succeeds.
    ok(Share, refused, 1)?;
    ensure_eq!(
        view(refused)?.1,
        1,
        "host state of the page shared on retry"
    );
    ok(Reclaim, fresh, 1)?;
    expect_view(fresh, 1, HOST_OWNED_2M, "reclaimed page")?;
    // Reclaiming the block whole works if the hypervisor took none of its
    // pages for tables, and is refused, changing nothing, if it did.
    let before = counters()?;
    match op(Reclaim, b, BLOCK_PAGES)? {
        Ok(()) => {
            expect_view(b, 1, HOST_OWNED_2M, "reclaimed block")?;
            ok(Donate, b, BLOCK_PAGES)?;
        }
        Err(Error::Denied) => {
            for q in [b, b + BLOCK_PAGES / 2, b + BLOCK_PAGES - 1] {
                expect_view(q, 1, HYP_NOPAGE, "donated block after a refused reclaim")?;
            }
            ensure_eq!(
                counters()?,
                before,
                "HYP_STATS 0..4 after a refused reclaim"
            );
        }
        Err(e) => fail!("HOST_RECLAIM of the donated block: {:?}", e),
    }
    // Unshare everything again.
    ok(Unshare, refused, 1)?;
    for &p in &shared[..n] {
        ok(Unshare, p, 1)?;
        expect_view(p, 1, (owner::HOST, 0, view(p)?.2), "unshared page")?;
    }
    Ok(())
}
