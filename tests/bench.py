#!/usr/bin/env python3
"""keel's figures for `make bench`: one JSON line per figure on stdout,
{"metric": NAME, "value": N, "unit": U}; progress and detail on stderr.

Call costs come from the test kernel's `bench` suite
(tests/hostkernel/src/suites/bench.rs), which prints `bench NAME VALUE UNIT`
lines: medians of many samples of the PMU cycle counter PMCCNTR_EL0, read at
EL1 and counting EL1 and EL2. The suite is booted with `-icount
shift=0,sleep=off`: QEMU's TCG derives PMCCNTR from its virtual clock
(1 GHz), which then advances one nanosecond per instruction, so the counts are
instructions executed by the host and the hypervisor, identical on every run
and every build machine (without -icount the virtual clock is wall time and
the same figures vary by 2x from run to run). Ratios of instruction counts are
what the figures report; a TLB invalidation or an exception entry counts as
one instruction there, however long real hardware takes.

  hvc_null_ticks                 HYP_FEATURES round trip (cycles = instructions)
  host_share_unshare_4k_ratio    HOST_SHARE_HYP + HOST_UNSHARE_HYP of one 4K page / null call
  host_donate_reclaim_4k_ratio   HOST_DONATE_HYP + HOST_RECLAIM of one 4K page of a whole
                                 2 MiB host block (so a split and a merge each time) / null call
  host_donate_reclaim_2m_ratio   the same for a 2 MiB range, one call each / null call
  guest_1g_map_hypercalls        hypercalls to give a guest 1 GiB of memory (one VM_DONATE)
  guest_1g_table_pages           table pages below the guest's root that the 1 GiB needs
                                 (HYP_STATS 0 after VM_DONATE less after VM_CREATE, whose root
                                 is its one page; the host stage 2 only loses a 1G block)
  guest_convert_4k_table_pages   guest stage-2 tables added by the guest's MEM_SHARE of one
                                 4K page inside its 1G block (the keel extension
                                 KEEL_TABLE_PAGES on the VM after MEM_SHARE less before: an L2
                                 and an L3 table, so 2); guest_convert_4k_table_pages_all is all
                                 of HYP_STATS 0's growth, the host stage 2's tables for the page
                                 it now borrows included (KEEL_TABLE_PAGES 0, shown in the
                                 suite's line)
  guest_revert_table_pages_delta HYP_STATS 0 after MEM_UNSHARE less before MEM_SHARE (0: both
                                 stage 2s are back to one block)
  guest_share_unshare_4k_ratio   MEM_SHARE + MEM_UNSHARE of that page, timed by the guest on
                                 CNTVCT_EL0 over a loop, / the host's null call on the same clock
  vm_destroy_ticks_4k_guest      VM_DESTROY of a VM with one 4K page (bench clock, median of 11)
  vm_destroy_ticks_1g_guest      VM_DESTROY of a VM with 1 GiB in one block (median of 3)
  hyp_reserved_bytes             the hypervisor's reservation on a 2 GiB, 1-CPU machine
  host_stage2_table_pages        host stage-2 table pages (roots included) at boot, same machine
  boot_to_host_ms                wall time from starting QEMU to the test kernel's first output
                                 line (it prints right after turning its MMU on, a few hundred
                                 instructions after the hypervisor's ERET), median of 5 boots
                                 without -icount
  fuzz_calls_per_second_qemu     host + guest hypercalls per second of wall time in the fuzz
                                 suite (seed 1, 100,000 host calls, invariant checks after the
                                 first 2000 then every 16th, not counted), without -icount: one
                                 run, varies with the machine

The boot figures are parsed from the hypervisor's boot log line
`[keel] INFO  figures: hyp_reserved_bytes=N host_stage2_table_pages=M`.

Usage: python3 tests/bench.py [--hyp out/hypervisor.img] [--kernel out/testkernel.bin] [-v]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# No tests/__pycache__ from importing run.py.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (tests/run.py: the machine, command line and UART protocol)

ICOUNT = ["-icount", "shift=0,sleep=off"]
BOOTS = 5
# The suite booted for the boot figures: any suite would do; this one is short.
BOOT_SUITE = "selftest"
BENCH_RE = re.compile(r"^bench (\S+) (-?\d+) (\S+)")
FIGURES_RE = re.compile(r"figures: hyp_reserved_bytes=(\d+) host_stage2_table_pages=(\d+)")
ENTERING_HOST = "entering host"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def timed_boot(cmd, timeout):
    """Runs QEMU; returns (rc or None on timeout, [(seconds since start, line)])."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines = []

    def reader():
        for raw in iter(proc.stdout.readline, b""):
            t = time.monotonic() - start
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            lines.append((t, line))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        rc = None
    th.join(timeout=5)
    return rc, lines


def check_run(suite, rc, lines):
    """Fails (exit 1) unless the suite's boot ended cleanly."""
    text = [l for _, l in lines]
    plan, results, finished, aborted = run.parse(text)
    boot = run.Boot([], rc, text, 0.0)
    problem = run.run_problem(boot, suite, plan, finished, aborted)
    failed = [k for k, (ok, _) in results.items() if not ok]
    if suite == "bench" and failed:
        problem = problem or f"failed: {', '.join(failed)}"
    if problem:
        log(f"bench.py: the {suite} boot failed: {problem}")
        for l in text[-run.TAIL_LINES:]:
            log(f"  | {l}")
        sys.exit(1)


def call_costs(opts, initrd):
    cmd = run.qemu_cmd(opts, "bench", initrd) + ICOUNT
    rc, lines = timed_boot(cmd, opts.timeout)
    check_run("bench", rc, lines)
    figures = {}
    for _, line in lines:
        m = BENCH_RE.match(line)
        if m:
            figures[m.group(1)] = (int(m.group(2)), m.group(3))
            if opts.verbose:
                log(f"  {line}")
    for name in ["hvc_null", "share_unshare_4k", "donate_reclaim_4k", "donate_reclaim_2m",
                 "guest_1g_map_hypercalls", "guest_1g_table_pages", "guest_convert_4k_table_pages",
                 "guest_convert_4k_table_pages_all", "guest_revert_table_pages_delta",
                 "guest_share_unshare_4k_mticks", "hvc_null_mticks", "vm_destroy_4k_guest",
                 "vm_destroy_1g_guest"]:
        if name not in figures:
            log(f"bench.py: the bench suite printed no `bench {name}` line")
            sys.exit(1)
    return figures


FUZZ_RE = re.compile(r"^bench fuzz_calls_per_second_qemu (\d+) calls/s")
# The fuzz suite's run for fuzz_calls_per_second_qemu: always the same calls,
# and the invariant checks the suite made by default until it checked more
# often (after the first 2000 calls, every 16th), so the figure stays
# comparable.
FUZZ_SEED = 1
FUZZ_ARGS = "check_first=2000 check_every=16"


def fuzz_rate(opts, initrd):
    """Host + guest calls per second of wall time of the fuzz suite (its
    default 100,000 host calls, seed FUZZ_SEED; invariant checks as
    FUZZ_ARGS says, not counted as calls), without -icount."""
    opts.seed = FUZZ_SEED
    opts.fuzz_args = FUZZ_ARGS
    cmd = run.qemu_cmd(opts, "fuzz", initrd)
    rc, lines = timed_boot(cmd, max(opts.timeout, run.FUZZ_TIMEOUT))
    check_run("fuzz", rc, lines)
    for _, line in lines:
        m = FUZZ_RE.match(line)
        if m:
            if opts.verbose:
                log(f"  {line}")
            return int(m.group(1))
    log("bench.py: the fuzz suite printed no `bench fuzz_calls_per_second_qemu` line")
    sys.exit(1)


def boot_figures(opts, initrd):
    """(hyp_reserved_bytes, host_stage2_table_pages, [ms to host output])."""
    assert run.RAM_SIZE == 2 << 30 and "-smp" in run.QEMU_MACHINE and \
        run.QEMU_MACHINE[run.QEMU_MACHINE.index("-smp") + 1] == "1", \
        "the boot figures are defined for a 2 GiB, 1-CPU machine"
    cmd = run.qemu_cmd(opts, BOOT_SUITE, initrd)
    found, times = set(), []
    for i in range(BOOTS):
        rc, lines = timed_boot(cmd, opts.timeout)
        check_run(BOOT_SUITE, rc, lines)
        texts = [l for _, l in lines]
        m = next((FIGURES_RE.search(l) for l in texts if FIGURES_RE.search(l)), None)
        if not m:
            log("bench.py: no `figures:` line in the hypervisor's boot log")
            sys.exit(1)
        found.add((int(m.group(1)), int(m.group(2))))
        entered = next((k for k, l in enumerate(texts) if ENTERING_HOST in l), None)
        if entered is None or entered + 1 >= len(lines):
            log(f"bench.py: no host output after `{ENTERING_HOST}`")
            sys.exit(1)
        t_hyp, t_host = lines[entered][0], lines[entered + 1][0]
        times.append(t_host * 1000)
        if opts.verbose:
            log(f"  boot {i + 1}: `{ENTERING_HOST}` at {t_hyp * 1000:.1f} ms, "
                f"first host line at {t_host * 1000:.1f} ms")
    if len(found) != 1:
        log(f"bench.py: the boot figures differ between boots: {sorted(found)}")
        sys.exit(1)
    reserved, tables = found.pop()
    return reserved, tables, times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hyp", default=os.path.join(run.ROOT, "out", "hypervisor.img"))
    ap.add_argument("--kernel", default=os.path.join(run.ROOT, "out", "testkernel.bin"))
    ap.add_argument("--qemu", default="qemu-system-aarch64")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per QEMU boot")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the bench lines and boot times")
    opts = ap.parse_args()
    for path in (opts.hyp, opts.kernel):
        if not os.path.isfile(path):
            log(f"bench.py: {path} is missing (make image testkernel)")
            return 2

    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp:
        initrd = os.path.join(tmp, "initrd.bin")
        run.make_initrd(initrd)
        costs = call_costs(opts, initrd)
        reserved, tables, times = boot_figures(opts, initrd)
        fuzz_calls = fuzz_rate(opts, initrd)

    null, unit = costs["hvc_null"]
    if null <= 0:
        log("bench.py: the null call measured 0")
        return 1

    def ratio(name):
        return round(costs[name][0] / null, 2)

    out = [
        ("hvc_null_ticks", null, unit),
        ("host_share_unshare_4k_ratio", ratio("share_unshare_4k"), "ratio"),
        ("host_donate_reclaim_4k_ratio", ratio("donate_reclaim_4k"), "ratio"),
        ("host_donate_reclaim_2m_ratio", ratio("donate_reclaim_2m"), "ratio"),
        ("guest_1g_map_hypercalls", costs["guest_1g_map_hypercalls"][0], "calls"),
        ("guest_1g_table_pages", costs["guest_1g_table_pages"][0], "pages"),
        ("guest_convert_4k_table_pages", costs["guest_convert_4k_table_pages"][0], "pages"),
        ("guest_convert_4k_table_pages_all", costs["guest_convert_4k_table_pages_all"][0], "pages"),
        ("guest_revert_table_pages_delta", costs["guest_revert_table_pages_delta"][0], "pages"),
        ("guest_share_unshare_4k_ratio",
         round(costs["guest_share_unshare_4k_mticks"][0] / max(costs["hvc_null_mticks"][0], 1), 2),
         "x hvc_null (CNTVCT)"),
        ("vm_destroy_ticks_4k_guest", *costs["vm_destroy_4k_guest"]),
        ("vm_destroy_ticks_1g_guest", *costs["vm_destroy_1g_guest"]),
        ("hyp_reserved_bytes", reserved, "bytes"),
        ("host_stage2_table_pages", tables, "pages"),
        ("boot_to_host_ms", round(statistics.median(times), 1), "ms"),
        ("fuzz_calls_per_second_qemu", fuzz_calls, "calls/s"),
    ]
    for metric, value, unit in out:
        print(json.dumps({"metric": metric, "value": value, "unit": unit}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
