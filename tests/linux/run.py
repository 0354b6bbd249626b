#!/usr/bin/env python3
"""Debian's unmodified arm64 Linux as keel's host, under QEMU.

Modes:
  --shell   boots Linux under keel with an interactive busybox shell on the
            console (make run-linux); QEMU is attached to the terminal:
            `poweroff -f` ends it, or Ctrl-A X.
  --test    the Linux suite: boots under keel with tests/linux/init-test,
            which prints `test linux::NAME ... ok|FAILED: reason` lines and
            FINISHED, then powers off; the runner adds its own checks of the
            console (keel's log against what Linux saw), prints one line per
            test and ends with `N passed, N failed`.

The kernel and busybox come from Debian's packages (tests/linux/fetch.sh,
cached in .cache/linux/); the initramfs is built by mkinitramfs.sh.

With --no-keel the same kernel boots straight at EL1 (no hypervisor), the
reference that bench.py compares against.

Usage:
    python3 tests/linux/run.py --test [--smp N] [--timeout S] [-v]
    python3 tests/linux/run.py --shell [--smp N] [--no-keel]
    python3 tests/linux/run.py --print-cmd [--test|--shell] [--no-keel]
"""

import argparse
import os
import re
import shlex
import struct
import subprocess
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qemurun import run_qemu, show_tail  # noqa: E402  (tests/qemurun.py)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("KEEL_LINUX_CACHE", os.path.join(ROOT, ".cache", "linux"))

RAM_BASE = 0x4000_0000
# Where QEMU's -kernel loads keel (RAM base + 2 MiB): inside the
# hypervisor's reservation, the address the host must not reach.
HYP_LOAD = 0x4020_0000
# The host kernel's load address (docs/design.md, Module addresses): clear
# of the boot DTB QEMU puts at RAM base + 128 MiB and of the reservation.
KERNEL_ADDR = 0x5000_0000
# The initrd goes above the kernel's end (image_size from its header,
# ~32 MiB for Debian's Image), at this address or the next 16 MiB above.
INITRD_ADDR = 0x5800_0000
HYP_APPEND_TEST = "keel.log=debug"
HYP_APPEND_SHELL = "keel.log=info"

# A line of these on the console fails the run.
BAD_LINE_RE = re.compile(
    r"Kernel panic|Oops|WARNING:|BUG:|Internal error|Unable to handle kernel|"
    r"\[keel\] (WARN|ERROR|FATAL|panicked)"
)
RESULT_RE = re.compile(r"^test (\S+)::(\S+) \.\.\. (ok|FAILED(?::\s?(.*))?)$")
PLAN_RE = re.compile(r"^plan (\S+):(.*)$")
RESERVED_RE = re.compile(r"^\[keel\] INFO\s+reserved (0x[0-9a-f]+)\.\.(0x[0-9a-f]+)")
HOLE_RE = re.compile(r"^linux: iomem hole (0x[0-9a-f]+)\.\.(0x[0-9a-f]+)$")


def info(msg):
    print(f"run.py: {msg}", file=sys.stderr, flush=True)


def fetch():
    """Runs fetch.sh (a no-op once cached); returns {IMAGE, BUSYBOX, KERNEL_VERSION}."""
    out = subprocess.run([os.path.join(HERE, "fetch.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


def keel_files():
    """Builds the driver, the VMM and its guest (build-keel.sh); returns
    their SRC=DEST arguments for mkinitramfs.sh (under /keel)."""
    out = subprocess.run([os.path.join(HERE, "build-keel.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    d = dict(line.split("=", 1) for line in out.split() if "=" in line)["DIR"]
    return [f"{os.path.join(d, name)}=/keel/{name}" for name in ("keel.ko", "keel-vmm", "guest.bin")]


def initramfs(init_name, busybox):
    """The initramfs for tests/linux/INIT_NAME with keel's driver, VMM and
    guest in /keel, rebuilt when the init script, the builder, busybox or
    one of those is newer than the cached archive."""
    init = os.path.join(HERE, init_name)
    builder = os.path.join(HERE, "mkinitramfs.sh")
    out = os.path.join(CACHE, f"initramfs-{init_name}.cpio.gz")
    extras = keel_files()
    sources = [init, builder, busybox] + [e.split("=", 1)[0] for e in extras]
    newest = max(os.path.getmtime(p) for p in sources)
    if not os.path.isfile(out) or os.path.getmtime(out) < newest:
        subprocess.run([builder, init, out] + extras, check=True, stdout=subprocess.DEVNULL)
    return out


def image_end(image):
    """Load address + image_size of an arm64 Image header (includes BSS)."""
    with open(image, "rb") as f:
        header = f.read(64)
    if header[0x38:0x3C] != b"ARMd":
        raise SystemExit(f"run.py: {image} is not an arm64 Image")
    _text_offset, image_size = struct.unpack_from("<QQ", header, 8)
    return KERNEL_ADDR + max(image_size, os.path.getsize(image))


def initrd_addr(image):
    end = image_end(image)
    step = 16 << 20
    return max(INITRD_ADDR, (end + step - 1) // step * step)


@dataclass
class Machine:
    smp: int = 4
    mem_mib: int = 2048
    keel: bool = True
    hyp: str = os.path.join(ROOT, "out", "hypervisor.img")
    hyp_append: str = HYP_APPEND_TEST
    qemu: str = "qemu-system-aarch64"
    deterministic: bool = False  # -icount, single-threaded TCG (bench.py)

    @property
    def ram_size(self):
        return self.mem_mib << 20


def carveout(m):
    """(mem= for Linux, keel.carveout=): the upper half of RAM is left to
    keel.ko's carveout for guests, so that /dev/mem may name guest pages
    (it refuses System RAM); Linux gets the lower half less 64 MiB, which
    covers keel's own reservation in it."""
    half = m.ram_size // 2
    return f"{(half >> 20) - 64}M", f"{half >> 20}M@{RAM_BASE + half:#x}"


def kernel_bootargs(m, extra=""):
    mem, co = carveout(m)
    args = (f"console=ttyAMA0 earlycon printk.time=1 panic=-1 mem={mem} "
            f"keel.expect_cpus={m.smp} keel.ram={RAM_BASE:#x}:{m.ram_size:#x} "
            f"keel.probe={HYP_LOAD:#x} keel.carveout={co} {extra}").strip()
    if "," in args:
        raise ValueError("QEMU -device options cannot carry commas in bootargs")
    return args


def qemu_cmd(m, image, initrd, extra_bootargs=""):
    gic = "gic-version=3"
    cmd = [m.qemu,
           "-M", f"virt,virtualization=on,{gic}" if m.keel else f"virt,{gic}",
           "-cpu", "max", "-m", f"{m.mem_mib}M", "-smp", str(m.smp),
           "-nographic", "-no-reboot"]
    if m.deterministic:
        cmd += ["-icount", "shift=0,sleep=off", "-accel", "tcg,thread=single"]
    bootargs = kernel_bootargs(m, extra_bootargs)
    if m.keel:
        cmd += ["-semihosting",
                "-kernel", m.hyp, "-append", m.hyp_append,
                "-device", f"guest-loader,addr={KERNEL_ADDR:#x},kernel={image},bootargs={bootargs}",
                "-device", f"guest-loader,addr={initrd_addr(image):#x},initrd={initrd}"]
    else:
        cmd += ["-kernel", image, "-initrd", initrd, "-append", bootargs]
    return cmd


def init_test_names():
    """The test names init-test plans (its NAMES="..." line)."""
    with open(os.path.join(HERE, "init-test")) as f:
        m = re.search(r'^NAMES="([^"]*)"', f.read(), re.M)
    return m.group(1).split() if m else []


def judge(boot, m):
    """[(name, ok, reason)]: init-test's own results, then the runner's
    checks of the whole console."""
    results, planned, finished = [], [], False
    seen = set()
    for line in boot.lines:
        p = PLAN_RE.match(line)
        if p and p.group(1) == "linux":
            planned = p.group(2).split()
        r = RESULT_RE.match(line)
        if r and r.group(1) == "linux" and r.group(2) not in seen:
            seen.add(r.group(2))
            results.append((f"linux::{r.group(2)}", r.group(3) == "ok", r.group(4) or ""))
        if line == "FINISHED":
            finished = True
    # Without a plan line (init-test never ran), the tests init-test declares.
    for name in planned or init_test_names():
        if name not in seen:
            results.append((f"linux::{name}", False, "never printed a result"))

    # The hole Linux sees in System RAM covers what keel reserved.
    reserved = next((RESERVED_RE.match(l) for l in boot.lines if RESERVED_RE.match(l)), None)
    hole = next((HOLE_RE.match(l) for l in boot.lines if HOLE_RE.match(l)), None)
    if not reserved:
        results.append(("linux::hole_covers_reservation", False, "keel logged no `reserved A..B` line"))
    elif not hole:
        results.append(("linux::hole_covers_reservation", False, "init-test printed no iomem hole"))
    else:
        rs, re_ = (int(x, 16) for x in reserved.groups())
        hs, he = (int(x, 16) for x in hole.groups())
        ok = hs <= rs and re_ <= he
        results.append(("linux::hole_covers_reservation", ok,
                        "" if ok else f"iomem hole {hs:#x}..{he:#x} does not cover keel's {rs:#x}..{re_:#x}"))

    # The SIGBUS came from keel refusing the access at stage 2 (debug log).
    refused = re.compile(rf"^\[keel\] DEBUG\s+host data abort at {HYP_LOAD:#x} .*refused")
    if m.hyp_append.find("keel.log=debug") >= 0:
        ok = any(refused.match(l) for l in boot.lines)
        results.append(("linux::keel_refused_devmem", ok,
                        "" if ok else f"no `[keel] DEBUG host data abort at {HYP_LOAD:#x} ... refused` line"))

    bad = next((l for l in boot.lines if BAD_LINE_RE.search(l)), None)
    results.append(("linux::console_clean", bad is None, f"console: {bad.strip()}" if bad else ""))

    if boot.timed_out:
        problem = f"timed out after {boot.seconds:.0f} s"
    elif not planned:
        problem = "no `plan linux:` line: init-test never ran"
    elif not finished:
        problem = "no FINISHED line: the run ended early"
    elif boot.rc != 0:
        problem = f"QEMU exited with status {boot.rc}"
    elif not any("host asked for PSCI SYSTEM_OFF" in l for l in boot.lines):
        problem = "keel did not see the host's PSCI SYSTEM_OFF"
    else:
        problem = None
    results.append(("linux::powered_off", problem is None, problem or ""))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--shell", action="store_true", help="interactive shell (make run-linux)")
    mode.add_argument("--test", action="store_true", help="the Linux suite (default)")
    ap.add_argument("--smp", type=int, default=None,
                    help="CPUs (default: 4 for --test, 1 for --shell); init-test expects all of them online")
    ap.add_argument("--mem", type=int, default=2048, metavar="MIB", help="RAM in MiB (default 2048)")
    ap.add_argument("--no-keel", action="store_true", help="boot the kernel straight at EL1 (reference)")
    ap.add_argument("--hyp", default=os.path.join(ROOT, "out", "hypervisor.img"))
    ap.add_argument("--qemu", default="qemu-system-aarch64")
    ap.add_argument("--bootargs", default="", help="extra kernel command-line words (no commas)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for --test (default 120)")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo the console as it arrives")
    ap.add_argument("--print-cmd", action="store_true", help="print the QEMU command line and exit")
    opts = ap.parse_args()
    shell = opts.shell
    if opts.no_keel and not shell and not opts.print_cmd:
        ap.error("--no-keel boots the reference kernel for --shell (and bench.py); the suite needs keel")
    smp = opts.smp if opts.smp is not None else (1 if shell else 4)
    m = Machine(smp=smp, mem_mib=opts.mem, keel=not opts.no_keel, hyp=opts.hyp,
                hyp_append=HYP_APPEND_SHELL if shell else HYP_APPEND_TEST, qemu=opts.qemu)

    if m.keel and not os.path.isfile(m.hyp):
        print(f"run.py: {m.hyp} is missing (build it with `make image`)", file=sys.stderr)
        if not shell:
            print("0 passed, 1 failed")
        return 2
    paths = fetch()
    initrd = initramfs("init-shell" if shell else "init-test", paths["BUSYBOX"])
    cmd = qemu_cmd(m, paths["IMAGE"], initrd, opts.bootargs)
    if opts.print_cmd:
        print(shlex.join(cmd))
        return 0

    if shell:
        info(f"Linux {paths['KERNEL_VERSION']} {'under keel' if m.keel else 'at EL1 without keel'}, "
             f"{smp} CPU(s); `poweroff -f` or Ctrl-A X ends QEMU")
        return subprocess.call(cmd)

    info(f"Linux {paths['KERNEL_VERSION']} under keel, {smp} CPU(s), {opts.mem} MiB")
    boot = run_qemu(cmd, opts.timeout, "prefixed" if opts.verbose else None)
    results = judge(boot, m)
    for name, ok, reason in results:
        print(f"test {name} ... ok" if ok else f"test {name} ... FAILED: {reason}", flush=True)
    failed = [r for r in results if not r[1]]
    if failed:
        show_tail(boot, "console")
        print("\nfailures:")
        for name, _, reason in failed:
            print(f"  {name}: {reason}")
    elif opts.verbose:
        print(f"  (linux: {boot.seconds:.1f} s)")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
