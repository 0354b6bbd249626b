#!/usr/bin/env python3
"""Figures of Debian's Linux as keel's host, for `make bench`.

Prints JSON lines on stdout (progress goes to stderr):
  {"metric": "linux_boot_to_init_ratio", "value": R, "unit": "ratio"}
      the kernel's printk timestamp of `Run /init` under keel, divided by
      the same kernel's booted straight at EL1 without keel; median of
      --boots boots each. QEMU runs with -icount shift=0,sleep=off and
      single-threaded TCG, so the timestamps count guest instructions, not
      the build machine's load (its wall time varies by 20%).
  {"metric": "hyp_reserved_bytes_linux", "value": N, "unit": "bytes"}
      keel's `figures: hyp_reserved_bytes=N` for this machine (--smp CPUs).
  {"metric": "linux_vmm_guest_start_ms", "value": MS, "unit": "ms"}
      keel-vmm's start to its guest's first console line (init-test's demo
      guest: 16 MiB of carveout memory, zeroed, donated), median of the
      keel boots; the clock is the guest's, so under -icount it counts
      instructions too.
  {"metric": "linux_vmm_hypercalls_to_map_256m", "value": N, "unit": "hypercalls"}
      hypercalls keel.ko made to give a 256 MiB guest its memory from
      Linux's pages (`keel-vmm map --mem 256`).

The timestamp starts when Linux starts its clock (time_init), so keel's own
boot (well under a millisecond) and Linux's earliest setup are not in it.

Usage: python3 tests/linux/bench.py [--boots N] [--smp N] [--timeout S]
"""

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (tests/linux/run.py)

RUN_INIT_RE = re.compile(r"^\[\s*(\d+\.\d+)\] Run /init as init process")
FIGURE_RE = re.compile(r"figures: .*\bhyp_reserved_bytes=(\d+)")
VMM_FIGURE_RE = re.compile(r"^vmm: figure (\w+)=([0-9.]+)$")


def boot_to_init(m, image, initrd, timeout):
    """(seconds of the `Run /init` timestamp, the boot)."""
    boot = run.run_qemu(run.qemu_cmd(m, image, initrd), timeout)
    stamp = next((float(x.group(1)) for x in map(RUN_INIT_RE.match, boot.lines) if x), None)
    if stamp is None or boot.timed_out or boot.rc != 0:
        run.show_tail(boot)
        raise SystemExit(f"bench.py: boot {'under keel' if m.keel else 'at EL1'} failed "
                         f"(status {boot.rc}, Run /init {'seen' if stamp else 'missing'})")
    return stamp, boot


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=3, help="boots of each kind (default 3)")
    ap.add_argument("--smp", type=int, default=1,
                    help="CPUs of both machines (default 1: the host gets one CPU until PSCI CPU_ON is relayed)")
    ap.add_argument("--hyp", default=os.path.join(run.ROOT, "out", "hypervisor.img"))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per boot (default 300)")
    opts = ap.parse_args()
    if not os.path.isfile(opts.hyp):
        raise SystemExit(f"bench.py: {opts.hyp} is missing (build it with `make image`)")

    paths = run.fetch()
    initrd = run.initramfs("init-test", paths["BUSYBOX"])
    stamps = {True: [], False: []}
    reserved = None
    vmm = {}  # name: [values] from keel-vmm's `vmm: figure` lines
    for i in range(opts.boots):
        for keel in (True, False):
            m = run.Machine(smp=opts.smp, keel=keel, hyp=opts.hyp,
                            hyp_append="keel.log=info", deterministic=True)
            stamp, boot = boot_to_init(m, paths["IMAGE"], initrd, opts.timeout)
            stamps[keel].append(stamp)
            if keel:
                fig = next((x for x in map(FIGURE_RE.search, boot.lines) if x), None)
                if fig:
                    reserved = int(fig.group(1))
                for x in filter(None, map(VMM_FIGURE_RE.match, boot.lines)):
                    vmm.setdefault(x.group(1), []).append(float(x.group(2)))
            print(f"bench.py: boot {i + 1}/{opts.boots} {'keel' if keel else 'EL1 '}: "
                  f"Run /init at {stamp:.6f} s ({boot.seconds:.1f} s wall)", file=sys.stderr, flush=True)

    with_keel = statistics.median(stamps[True])
    without = statistics.median(stamps[False])
    print(json.dumps({"metric": "linux_boot_to_init_ratio", "value": round(with_keel / without, 4),
                      "unit": "ratio"}), flush=True)
    if reserved is None:
        raise SystemExit("bench.py: keel logged no `figures: hyp_reserved_bytes=N` line")
    print(json.dumps({"metric": "hyp_reserved_bytes_linux", "value": reserved, "unit": "bytes"}), flush=True)
    for name, metric, unit in (("guest_start_ms", "linux_vmm_guest_start_ms", "ms"),
                               ("hypercalls_to_map_256m", "linux_vmm_hypercalls_to_map_256m", "hypercalls")):
        if name not in vmm:
            raise SystemExit(f"bench.py: no `vmm: figure {name}=` line (init-test's VMM tests did not run)")
        value = statistics.median(vmm[name])
        print(json.dumps({"metric": metric, "value": round(value, 3) if unit == "ms" else int(value),
                          "unit": unit}), flush=True)
    print(f"bench.py: Run /init median {with_keel:.6f} s under keel, {without:.6f} s at EL1 "
          f"(Linux {paths['KERNEL_VERSION']}, {opts.smp} CPU(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
