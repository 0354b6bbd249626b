#!/usr/bin/env python3
"""keel's QEMU suite runner.

Boots QEMU once per suite: the hypervisor image as `-kernel`, the host test
kernel (tests/hostkernel) as a multiboot kernel module whose bootargs name the
suite, and a generated initrd. Reads the UART, prints every test's result by
name, and ends with the plain line `N passed, N failed`; exits non-zero if
anything failed.

UART protocol (tests/hostkernel/src/harness.rs):
    plan SUITE: NAME NAME ...
    test SUITE::NAME ... ok
    test SUITE::NAME ... FAILED: reason
    FINISHED
A timeout, a non-zero QEMU exit, a missing plan or FINISHED, or a planned test
that never printed a result fails the run, and the UART's tail is shown.

Usage:
    python3 tests/run.py [--suite NAME ...] [--hyp out/hypervisor.img]
                         [--kernel out/testkernel.bin] [--timeout S] [-v]
                         [--print-cmd] [--list]
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field

from qemurun import TAIL_LINES, Boot, run_qemu, show_tail  # noqa: F401  (tests/qemurun.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The machine every suite boots. RAM is passed to the test kernel as
# ram=BASE:SIZE so it can find the hypervisor's memory as the part of RAM
# missing from its /memory nodes.
RAM_BASE = 0x4000_0000
RAM_SIZE = 2 << 30
QEMU_MACHINE = [
    "-M", "virt,virtualization=on,gic-version=3",
    "-cpu", "max",
    "-m", f"{RAM_SIZE >> 20}M",
    "-smp", "1",
    "-nographic",
    "-semihosting",
]
# Module addresses (docs/design.md, Module addresses): clear of the boot DTB
# QEMU puts at RAM base + 128 MiB and of the hypervisor's reservation.
KERNEL_ADDR = 0x5000_0000
# Must match INITRD_ADDR and the pattern in tests/hostkernel/src/suites/boot.rs.
INITRD_ADDR = 0x5800_0000
INITRD_MAGIC = b"KEELINRD"
INITRD_SIZE = 64 * 1024 + 123  # odd on purpose: an end rounded up shows
HYP_APPEND = "keel.log=info"

# The suites, machine-readable: name -> extra bootargs and what it is for.
# The tests of each suite are those its `plan` line announces.
SUITES = {
    "boot": {
        "bootargs": "marker=keel-boot-7f3a",
        "doc": "entry state, device tree, bootargs, initrd, discovery calls",
    },
    "isolation": {
        "bootargs": "",
        "doc": "host reads/writes/fetches of hypervisor memory abort and the host continues",
    },
    "host-abi": {
        "bootargs": "",
        "doc": "host memory calls: share/unshare/donate/reclaim, MEM_STATE, HYP_STATS, errors, invariants after every call",
    },
    "guests": {
        "bootargs": "",
        # keel's speculative-AT workaround (arch/src/errata.rs) is for CPUs
        # QEMU does not model: forced on here so the suite's world switches
        # and TLB maintenance run it, and its log line must show it on.
        "hyp_append": "keel.errata=speculative-at",
        "hyp_expect": "speculative-AT workaround on (keel.errata=speculative-at)",
        "doc": "protected VMs: a guest agent (tests/hostkernel/src/guest.S) run through VCPU_RUN; donate, share/unshare, block splits and merges, pins, teardown, isolation, exits",
    },
    "bench": {
        "bootargs": "",
        "doc": "costs of the host calls as `bench NAME VALUE UNIT` lines (tests/bench.py boots it with -icount)",
    },
    "fuzz": {
        # run.py adds seed=N: a fresh one per run unless --seed N.
        "bootargs": "",
        "doc": "random hypercalls from the host and from guests (seeded: --seed N replays), invariants after every call",
    },
    "selftest": {
        "bootargs": "",
        "doc": "one passing and one deliberately failing test (used by harness::catches_failing_test)",
    },
    "demo": {
        "bootargs": "",
        "doc": "the tour `make run` shows",
    },
    "crash": {
        "bootargs": "crash=exception",
        "doc": "ends the run abnormally on purpose (crash=exception|panic|hang; used by harness::catches_*)",
    },
    "smp": {
        "bootargs": "",
        "qemu": ["-smp", "4"],
        "doc": "PSCI CPU_ON/OFF/AFFINITY_INFO relayed on 4 CPUs; host memory calls from every CPU at once",
    },
}
# Tests of the runner itself, run as the pseudo-suite "harness".
HARNESS_TESTS = [
    "catches_failing_test",
    "catches_kernel_exception",
    "catches_kernel_panic",
    "catches_timeout",
    "catches_hyp_panic",
    "catches_stack_overflow",
    "missing_module_fails_cleanly",
    "malformed_dtb_fails_cleanly",
]
# harness::catches_timeout waits this long for a kernel that hangs.
HANG_TIMEOUT = 5.0
# The fuzz suite's timeout at least (its 100,000 calls and 43,750 invariant
# checks take about 2 minutes).
FUZZ_TIMEOUT = 300.0
# The smp suite: 4 emulated CPUs on 2 host cores take ~80 s when the machine is busy.
SMP_TIMEOUT = 300.0
DEFAULT_SUITES = ["boot", "isolation", "host-abi", "guests", "smp", "fuzz", "demo", "harness"]

PLAN_RE = re.compile(r"^plan (\S+):(.*)$")
RESULT_RE = re.compile(r"^test (\S+)::(\S+) \.\.\. (ok|FAILED(?::\s?(.*))?)$")


@dataclass
class Report:
    """Results of the runner: each test's name and outcome, in order."""

    results: list = field(default_factory=list)
    # Whether to print each result (not when the UART, which has the same
    # lines, is already shown as it runs).
    show: bool = True

    def add(self, name, ok, reason=""):
        self.results.append((name, ok, reason))
        if not self.show:
            pass
        elif ok:
            print(f"test {name} ... ok", flush=True)
        else:
            print(f"test {name} ... FAILED: {reason}", flush=True)

    def counts(self):
        passed = sum(1 for _, ok, _ in self.results if ok)
        return passed, len(self.results) - passed


def make_initrd(path):
    """The initrd the boot suite checks: magic, total length, then byte i is
    (i * 131 + 7) mod 256 for every offset i from 16 on."""
    data = bytearray(INITRD_SIZE)
    data[0:8] = INITRD_MAGIC
    data[8:16] = INITRD_SIZE.to_bytes(8, "little")
    for i in range(16, INITRD_SIZE):
        data[i] = (i * 131 + 7) & 0xFF
    with open(path, "wb") as f:
        f.write(data)


def suite_bootargs(suite, extra=None):
    if extra is None:
        extra = SUITES.get(suite, {}).get("bootargs", "")
    args = f"suite={suite} ram={RAM_BASE:#x}:{RAM_SIZE:#x} {extra}".strip()
    if "," in args:
        raise ValueError("QEMU -device options cannot carry commas in bootargs")
    return args


def suite_machine(suite):
    """QEMU_MACHINE with the suite's own options (SUITES[suite]["qemu"]):
    one that QEMU_MACHINE already has (e.g. -smp) replaces its value."""
    machine = list(QEMU_MACHINE)
    extra = SUITES.get(suite, {}).get("qemu", [])
    i = 0
    while i < len(extra):
        opt = extra[i]
        has_value = i + 1 < len(extra) and not extra[i + 1].startswith("-")
        if has_value and opt in machine:
            machine[machine.index(opt) + 1] = extra[i + 1]
        else:
            machine += extra[i:i + 1 + has_value]
        i += 1 + has_value
    return machine


def fuzz_bootargs(opts):
    """The fuzz suite's bootargs: its seed (a fresh one per run of run.py
    unless --seed), then --fuzz-args."""
    if getattr(opts, "seed", None) is None:
        opts.seed = int.from_bytes(os.urandom(4), "little")
    extra = getattr(opts, "fuzz_args", None) or SUITES["fuzz"]["bootargs"]
    return f"seed={opts.seed:#x} {extra}".strip()


def qemu_cmd(opts, suite, initrd, append=None, bootargs=None):
    if suite == "fuzz" and bootargs is None:
        bootargs = fuzz_bootargs(opts)
    if append is None:
        append = f"{HYP_APPEND} {SUITES.get(suite, {}).get('hyp_append', '')}".strip()
    return [
        opts.qemu,
        *suite_machine(suite),
        "-kernel", opts.hyp,
        "-append", append,
        "-device", f"guest-loader,addr={KERNEL_ADDR:#x},kernel={opts.kernel},bootargs={suite_bootargs(suite, bootargs)}",
        "-device", f"guest-loader,addr={INITRD_ADDR:#x},initrd={initrd}",
    ]


def echo_mode(opts):
    """How the UART is echoed while QEMU runs: None, "prefixed" or "plain"."""
    return getattr(opts, "echo", None) or ("prefixed" if opts.verbose else None)


def parse(lines):
    """Returns (plan: {suite: [names]}, results: {suite::name: (ok, reason)},
    finished, aborted line or None)."""
    plan, results, finished, aborted = {}, {}, False, None
    for line in lines:
        m = PLAN_RE.match(line)
        if m:
            plan[m.group(1)] = m.group(2).split()
            continue
        m = RESULT_RE.match(line)
        if m:
            key = f"{m.group(1)}::{m.group(2)}"
            # The first result counts: a later line cannot turn a failure ok.
            results.setdefault(key, (m.group(3) == "ok", m.group(4) or ""))
            continue
        if line == "FINISHED":
            finished = True
        elif line.startswith("ABORTED"):
            aborted = line
    return plan, results, finished, aborted


def run_problem(boot, suite, plan, finished, aborted):
    """Why a suite's boot as a whole failed, or None."""
    if boot.timed_out:
        return f"timed out after {boot.seconds:.0f} s"
    if aborted:
        return aborted
    if suite not in plan:
        return "no plan line: the test kernel did not start the suite"
    if not finished:
        return "no FINISHED line: the run ended early"
    if boot.rc != 0:
        return f"QEMU exited with status {boot.rc}"
    return None


# The default fuzz run: shards of FUZZ_SHARD_CALLS calls, one per host core,
# in parallel, each checking the invariants after every call (the seeds
# are the run's seed + shard number).
FUZZ_SHARDS = 2
FUZZ_SHARD_CALLS = 50_000


def run_fuzz_shards(opts, initrd, report):
    seeds = [opts.seed + i for i in range(FUZZ_SHARDS)]
    boots = [None] * FUZZ_SHARDS
    timeout = None if opts.timeout is None else max(opts.timeout, FUZZ_TIMEOUT)

    def shard(i):
        args = f"seed={seeds[i]:#x} calls={FUZZ_SHARD_CALLS} check_first={FUZZ_SHARD_CALLS}"
        cmd = qemu_cmd(opts, "fuzz", initrd, bootargs=args) + opts.extra_qemu
        boots[i] = run_qemu(cmd, timeout, None)

    print(f"fuzz: {FUZZ_SHARDS} shards of {FUZZ_SHARD_CALLS} calls, invariants after every call, "
          f"seeds {', '.join(f'{x:#x}' for x in seeds)}", flush=True)
    threads = [threading.Thread(target=shard, args=(i,)) for i in range(FUZZ_SHARDS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, boot in enumerate(boots):
        plan, results, finished, aborted = parse(boot.lines)
        problem = run_problem(boot, "fuzz", plan, finished, aborted)
        name = f"fuzz.{i}"
        all_ok = True
        for n in plan.get("fuzz", []):
            ok, reason = results.get(f"fuzz::{n}", (False, "never printed a result"))
            report.add(f"{name}::{n}", ok, reason)
            all_ok &= ok
        if problem:
            report.add(name, False, problem)
        if problem or not all_ok:
            show_tail(boot)
            print(f"fuzz: replay shard {i} with: python3 tests/run.py --suite fuzz --seed {seeds[i]:#x} "
                  f"--fuzz-args 'calls={FUZZ_SHARD_CALLS} check_first={FUZZ_SHARD_CALLS}'", flush=True)


def run_suite(opts, suite, initrd, report):
    if suite == "fuzz" and not getattr(opts, "fuzz_args", None) and getattr(opts, "shards", True):
        if getattr(opts, "seed", None) is None:
            opts.seed = int.from_bytes(os.urandom(4), "little")
        return run_fuzz_shards(opts, initrd, report)
    cmd = qemu_cmd(opts, suite, initrd) + opts.extra_qemu
    timeout = opts.timeout
    if suite == "fuzz":
        print(f"fuzz: seed {opts.seed:#x} (replay: python3 tests/run.py --suite fuzz --seed {opts.seed:#x})",
              flush=True)
        if timeout is not None:
            timeout = max(timeout, FUZZ_TIMEOUT)
    if suite == "smp" and timeout is not None:
        timeout = max(timeout, SMP_TIMEOUT)
    boot = run_qemu(cmd, timeout, echo_mode(opts))
    plan, results, finished, aborted = parse(boot.lines)
    problem = run_problem(boot, suite, plan, finished, aborted)
    names = plan.get(suite, [])
    planned = {f"{suite}::{n}" for n in names}
    all_ok = True
    for name in names:
        key = f"{suite}::{name}"
        ok, reason = results.get(key, (False, "never printed a result"))
        report.add(key, ok, reason)
        all_ok &= ok
    # Results the plan did not announce still count.
    for key, (ok, reason) in results.items():
        if key not in planned:
            report.add(key, ok, reason)
            all_ok &= ok
    expect = SUITES.get(suite, {}).get("hyp_expect")
    if expect and not any(expect in line for line in boot.lines):
        problem = problem or f"the hypervisor never logged {expect!r}"
    if problem:
        report.add(suite, False, problem)
    if problem or not all_ok:
        show_tail(boot)
        if suite == "fuzz":
            print(f"fuzz: replay with: python3 tests/run.py --suite fuzz --seed {opts.seed:#x}"
                  " (add --fuzz-args fuzz_trace=1 to print every call)", flush=True)
    elif opts.verbose:
        print(f"  ({suite}: {boot.seconds:.1f} s)")


def harness_catches_failing_test(opts, initrd):
    """The selftest suite must come out as exactly one failure, the
    deliberate one: proves the kernel reports failures and the runner sees them."""
    boot = run_qemu(qemu_cmd(opts, "selftest", initrd) + opts.extra_qemu, opts.timeout, echo_mode(opts))
    plan, results, finished, aborted = parse(boot.lines)
    problem = run_problem(boot, "selftest", plan, finished, aborted)
    if problem:
        return boot, f"selftest run failed: {problem}"
    names = plan["selftest"]
    if "deliberate_failure" not in names:
        return boot, "selftest plan lacks deliberate_failure"
    got = {n: results.get(f"selftest::{n}") for n in names}
    missing = [n for n, r in got.items() if r is None]
    if missing:
        return boot, f"no result for {', '.join(missing)}"
    if got["deliberate_failure"][0]:
        return boot, "selftest::deliberate_failure was reported ok"
    wrong = [n for n, (ok, _) in got.items() if n != "deliberate_failure" and not ok]
    if wrong:
        return boot, f"passing self-tests failed: {', '.join(wrong)}"
    if len(names) < 2:
        return boot, "selftest has no passing test"
    return boot, None


def run_crash(opts, initrd, how, timeout=None):
    cmd = qemu_cmd(opts, "crash", initrd, bootargs=f"crash={how}") + opts.extra_qemu
    boot = run_qemu(cmd, timeout or opts.timeout, echo_mode(opts))
    plan, results, finished, aborted = parse(boot.lines)
    return boot, results, run_problem(boot, "crash", plan, finished, aborted)


def harness_catches_kernel_exception(opts, initrd):
    """An exception the test kernel did not expect must fail the running
    test and the run, with the syndrome on the UART."""
    boot, results, problem = run_crash(opts, initrd, "exception")
    ok, reason = results.get("crash::crashes", (True, ""))
    if ok or "unexpected exception" not in reason:
        return boot, f"crash::crashes not reported FAILED for the exception (got {ok}, {reason!r})"
    if not problem or "ABORTED" not in problem:
        return boot, f"the run was not judged aborted (problem: {problem!r})"
    if not any(line.startswith("unexpected exception") and "EC 0x0" in line for line in boot.lines):
        return boot, "no 'unexpected exception ... EC 0x0' line with the syndrome"
    return boot, None


def harness_catches_kernel_panic(opts, initrd):
    """A panic in the test kernel must fail the running test and the run."""
    boot, results, problem = run_crash(opts, initrd, "panic")
    ok, reason = results.get("crash::crashes", (True, ""))
    if ok:
        return boot, "crash::crashes not reported FAILED for the panic"
    if not problem or "ABORTED" not in problem:
        return boot, f"the run was not judged aborted (problem: {problem!r})"
    if not any("panicked at" in line and "deliberate panic" in line for line in boot.lines):
        return boot, "no 'panicked at' line with the panic message"
    return boot, None


def harness_catches_timeout(opts, initrd):
    """A kernel that hangs must be killed at the timeout and fail the run,
    its planned test reported as never finished."""
    timeout = HANG_TIMEOUT if opts.timeout is None else min(HANG_TIMEOUT, opts.timeout)
    boot, results, problem = run_crash(opts, initrd, "hang", timeout)
    # The kernel got as far as its test (a hang of keel's own before it
    # would time out too, and prove nothing of the harness).
    if not any(line.startswith("plan crash:") for line in boot.lines):
        return boot, "no 'plan crash:' line: the test kernel never started its test"
    if not boot.timed_out:
        return boot, f"QEMU ended by itself (status {boot.rc}) instead of hanging"
    if not problem or "timed out" not in problem:
        return boot, f"the run was not judged timed out (problem: {problem!r})"
    if "crash::crashes" in results:
        return boot, "the hanging test printed a result"
    return boot, None


def harness_catches_hyp_panic(opts, initrd):
    """A hypervisor that panics at boot must end QEMU non-zero with its
    panic message: proves a crash cannot pass for a clean run."""
    cmd = qemu_cmd(opts, "selftest", initrd, append=f"{HYP_APPEND} keel.selftest=panic")
    boot = run_qemu(cmd + opts.extra_qemu, opts.timeout, echo_mode(opts))
    if boot.timed_out:
        return boot, f"timed out after {boot.seconds:.0f} s instead of exiting"
    if boot.rc == 0:
        return boot, "QEMU exited 0 although the hypervisor was told to panic"
    if not any("panicked at" in line for line in boot.lines):
        return boot, f"QEMU exited {boot.rc} but printed no 'panicked at'"
    return boot, None


def hyp_fails_cleanly(boot, what, needles):
    """A boot the hypervisor must refuse: QEMU exits by itself, non-zero,
    with a line naming the reason (any of `needles`)."""
    if boot.timed_out:
        return f"{what}: timed out after {boot.seconds:.0f} s instead of failing"
    if boot.rc == 0:
        return f"{what}: QEMU exited 0"
    if not any(n in line for line in boot.lines for n in needles):
        return f"{what}: QEMU exited {boot.rc} with no line containing {' or '.join(map(repr, needles))}"
    return None


def harness_catches_stack_overflow(opts, initrd):
    """keel.selftest=stack-overflow overflows the boot CPU's stack into its
    guard page: the hypervisor must say so and end QEMU non-zero."""
    cmd = qemu_cmd(opts, "selftest", initrd, append=f"{HYP_APPEND} keel.selftest=stack-overflow")
    boot = run_qemu(cmd + opts.extra_qemu, opts.timeout, echo_mode(opts))
    return boot, hyp_fails_cleanly(boot, "stack overflow", ["stack overflow on CPU 0"])


def harness_missing_module_fails_cleanly(opts, initrd):
    """No guest-loader module at all: keel has no host to start and must
    stop with a clear message, not hang or crash."""
    cmd = [opts.qemu, *QEMU_MACHINE, "-kernel", opts.hyp, "-append", HYP_APPEND]
    boot = run_qemu(cmd + opts.extra_qemu, opts.timeout, echo_mode(opts))
    return boot, hyp_fails_cleanly(boot, "no kernel module", ["no multiboot", "kernel module"])


def malformed_dtb(opts, path):
    """Writes a corrupted copy of the machine's DTB to `path`: QEMU dumps
    it, the padding QEMU leaves after it is cut off (QEMU grows a -dtb file
    to twice its size, which would exceed keel's 2 MiB limit), and in a
    node neither QEMU nor keel's boot reads for its own needs, a one-cell
    `#address-cells` property becomes empty, its cell an FDT_NOP token, so
    the structure stays walkable for QEMU's libfdt."""
    dump = path + ".dump"
    assert QEMU_MACHINE[0] == "-M"
    subprocess.run([opts.qemu, "-M", f"{QEMU_MACHINE[1]},dumpdtb={dump}", *QEMU_MACHINE[2:]],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=30)
    d = bytearray(open(dump, "rb").read())
    be = lambda off: int.from_bytes(d[off:off + 4], "big")  # noqa: E731
    off_struct, off_strings, size_strings, size_struct = be(8), be(12), be(32), be(36)
    end = max(off_struct + size_struct, off_strings + size_strings)
    d = d[:end]
    d[4:8] = end.to_bytes(4, "big")
    strings = bytes(d[off_strings:off_strings + size_strings])
    p, depth, target = off_struct, 0, None
    while p < off_struct + size_struct:
        tok = be(p)
        if tok == 1:  # FDT_BEGIN_NODE
            depth += 1
            p = (d.index(0, p + 4) + 1 + 3) & ~3
        elif tok == 2:  # FDT_END_NODE
            depth -= 1
            p += 4
        elif tok == 3:  # FDT_PROP
            length, nameoff = be(p + 4), be(p + 8)
            name = strings[nameoff:strings.index(b"\0", nameoff)]
            if depth > 1 and name == b"#address-cells" and length == 4:
                target = p
            p = (p + 12 + length + 3) & ~3
        elif tok == 9:  # FDT_END
            break
        else:
            p += 4
    if target is None:
        raise RuntimeError("no #address-cells property below the root in the dumped DTB")
    d[target + 4:target + 8] = (0).to_bytes(4, "big")
    d[target + 12:target + 16] = (4).to_bytes(4, "big")
    with open(path, "wb") as f:
        f.write(d)


def harness_malformed_dtb_fails_cleanly(opts, initrd):
    """A corrupted device tree (-dtb): keel must stop with a clear line
    about the device tree, non-zero, never hang."""
    with tempfile.TemporaryDirectory(prefix="keel-dtb-") as tmp:
        bad = os.path.join(tmp, "bad.dtb")
        malformed_dtb(opts, bad)
        cmd = qemu_cmd(opts, "selftest", initrd) + ["-dtb", bad]
        boot = run_qemu(cmd + opts.extra_qemu, opts.timeout, echo_mode(opts))
    return boot, hyp_fails_cleanly(boot, "malformed DTB", ["device tree"])


def run_harness(opts, initrd, report):
    for name in HARNESS_TESTS:
        boot, problem = globals()[f"harness_{name}"](opts, initrd)
        report.add(f"harness::{name}", problem is None, problem or "")
        if problem:
            show_tail(boot)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", metavar="NAME",
                    help=f"suite to run (repeatable): {', '.join(SUITES)}, harness; default: {' '.join(DEFAULT_SUITES)}")
    ap.add_argument("--hyp", default=os.path.join(ROOT, "out", "hypervisor.img"))
    ap.add_argument("--kernel", default=os.path.join(ROOT, "out", "testkernel.bin"))
    ap.add_argument("--qemu", default="qemu-system-aarch64")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per QEMU boot (default 60)")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo the UART as it arrives")
    ap.add_argument("--demo", action="store_true",
                    help="boot the demo suite and show its UART as it runs (make run)")
    ap.add_argument("--gdb", action="store_true",
                    help="start QEMU halted with a gdb stub on :1234 (-s -S); no timeout")
    ap.add_argument("--seed", type=lambda s: int(s, 0), default=None,
                    help="the fuzz suite's seed (default: a fresh random one, printed)")
    ap.add_argument("--fuzz-args", default=None, metavar="ARGS",
                    help="more bootargs for the fuzz suite, e.g. 'calls=1000000 fuzz_trace=1'")
    ap.add_argument("--print-cmd", action="store_true", help="print the QEMU command lines and exit")
    ap.add_argument("--list", action="store_true", help="list the suites and exit")
    opts = ap.parse_args()

    if opts.list:
        for name, s in SUITES.items():
            print(f"{name:10} {s['doc']}")
        print(f"{'harness':10} tests of this runner: {', '.join(HARNESS_TESTS)}")
        return 0

    opts.extra_qemu = []
    if opts.gdb:
        opts.extra_qemu = ["-s", "-S"]
        opts.timeout = None
    if opts.demo:
        opts.suite = ["demo"]
        opts.echo = "plain"
    suites = opts.suite or DEFAULT_SUITES
    for s in suites:
        if s not in SUITES and s != "harness":
            ap.error(f"unknown suite {s!r}; known: {', '.join(SUITES)}, harness")

    with tempfile.TemporaryDirectory(prefix="keel-run-") as tmp:
        initrd = os.path.join(tmp, "initrd.bin")
        if opts.print_cmd:
            initrd = "INITRD"
            for s in suites:
                for suite in (["selftest"] if s == "harness" else [s]):
                    print(shlex.join(qemu_cmd(opts, suite, initrd) + opts.extra_qemu))
            return 0
        for path, how in [(opts.hyp, "make image"), (opts.kernel, "tests/build-testkernel.sh")]:
            if not os.path.isfile(path):
                print(f"run.py: {path} is missing (build it with `{how}`)", file=sys.stderr)
                print("0 passed, 1 failed")
                return 2
        make_initrd(initrd)
        report = Report(show=echo_mode(opts) != "plain")
        for s in suites:
            if s == "harness":
                run_harness(opts, initrd, report)
            else:
                run_suite(opts, s, initrd, report)
    passed, failed = report.counts()
    if failed:
        print("\nfailures:")
        for name, ok, reason in report.results:
            if not ok:
                print(f"  {name}: {reason}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
