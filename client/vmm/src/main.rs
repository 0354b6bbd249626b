//! keel-vmm: a small VMM for a Linux host of keel, over /dev/keel
//! (client/linux). It gives a protected guest its memory, runs its vCPUs
//! (vCPU 0 on the main thread, each vCPU the guest starts with PSCI CPU_ON
//! on a thread of its own), serves their MMIO exits as a console (the
//! guest's lines appear on the VMM's stdout, the Linux console in the
//! suite) and reads the pages the guest shares.
//!
//! Usage:
//!   keel-vmm run [--mem MIB] [--carveout] [--mode N] [--vcpus N] [--hold FILE] GUEST.bin
//!   keel-vmm map [--mem MIB] [--carveout]    give a VM memory, count hypercalls
//!   keel-vmm info | state PFN | reclaim | selftest
//!
//! Lines: guest output as the guest prints it; the VMM's own lines start
//! with `vmm: `, its verdicts with `vmm: check NAME ok` or
//! `vmm: check NAME FAILED: why`, its figures with `vmm: figure NAME=VALUE`.

mod dev;

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use dev::Keel;
use keel_abi::{exit, PageState};

/// Guest RAM starts here (2 MiB- and 1 GiB-aligned).
const GUEST_BASE: u64 = 0x8000_0000;
/// The console device of guest/guest.S.
const CONSOLE: u64 = 0x0900_0000;
const CONSOLE_SIZE: u64 = 0x1000;
const REG_TX: u64 = 0x00;
const REG_SECRET: u64 = 0x08;
const REG_SHARED: u64 = 0x10;
const REG_STATUS: u64 = 0x18;
const PAGE: u64 = 4096;
/// PSCI CPU_OFF: keel has turned the vCPU off and says so with a
/// HYPERCALL exit.
const PSCI_CPU_OFF: u64 = 0x8400_0002;
/// PSCI CPU_ON (SMC32 and SMC64): keel has made the target ready and says
/// so with a HYPERCALL exit (x3 the target's MPIDR, Aff0 its index), for
/// the VMM to run it.
const PSCI_CPU_ON: [u64; 2] = [0x8400_0003, 0xC400_0003];
const BLOCK_2M: u64 = 2 << 20;
const MIB: u64 = 1 << 20;
/// What the guest writes (guest.S): the VMM checks it finds exactly these.
const MESSAGE: &str = "hello host: this page is shared by the guest";

struct Checks {
    failed: u32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, why: impl FnOnce() -> String) {
        if ok {
            say(&format!("vmm: check {name} ok"));
        } else {
            self.failed += 1;
            say(&format!("vmm: check {name} FAILED: {}", why()));
        }
    }
}

fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

struct Opts {
    mem_mib: u64,
    carveout: bool,
    mode: u64,
    vcpus: u64,
    hold: Option<String>,
    image: Option<String>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        mem_mib: 16,
        carveout: false,
        mode: 0,
        vcpus: 1,
        hold: None,
        image: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--mem" => o.mem_mib = value()?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--mode" => o.mode = value()?.parse().map_err(|e| format!("--mode: {e}"))?,
            "--vcpus" => o.vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--hold" => o.hold = Some(value()?),
            "--carveout" => o.carveout = true,
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => o.image = Some(s.to_string()),
        }
    }
    Ok(o)
}

/// The guest's console and report registers (one line buffer per vCPU:
/// their bytes interleave).
struct Console {
    lines: Vec<Vec<u8>>,
    first_line: Option<Duration>,
    secret: Option<u64>,
    shared: Option<u64>,
    status: Option<u64>,
}

impl Console {
    fn write(&mut self, vcpu: usize, offset: u64, value: u64, start: Instant) {
        match offset {
            REG_TX => {
                let b = value as u8;
                let line = &mut self.lines[vcpu];
                if b == b'\n' {
                    say(&String::from_utf8_lossy(line));
                    line.clear();
                    if self.first_line.is_none() {
                        self.first_line = Some(start.elapsed());
                    }
                } else if line.len() < 4096 {
                    line.push(b);
                }
            }
            REG_SECRET => self.secret = Some(value),
            REG_SHARED => self.shared = Some(value),
            REG_STATUS => self.status = Some(value),
            _ => {}
        }
    }
}

enum Ended {
    Off,
    Fault(u64),
}

/// What every vCPU thread of one VM shares.
struct Guest<'a> {
    keel: &'a Keel,
    vm: u64,
    vcpus: u64,
    console: Mutex<Console>,
    start: Instant,
    /// vCPUs started by the guest's CPU_ON.
    started: AtomicU64,
    /// How each vCPU's last run ended; a fault or an error is kept (a later
    /// run's Off does not hide it).
    ends: Mutex<Vec<Option<Result<Ended, String>>>>,
    /// Set when the VM must stop: a vCPU faulted, or the VMM failed. The
    /// vCPU threads are then woken from VCPU_RUN with SIGUSR1.
    stop: AtomicBool,
    /// The pthread of each vCPU running now (0: none).
    threads: Mutex<Vec<u64>>,
    /// The SGIs (a bit per INTID 0..15) other vCPUs sent each vCPU, that
    /// its thread has not yet asked keel for (KEEL_VCPU_IRQ).
    sgis: Vec<AtomicU32>,
}

impl Guest<'_> {
    fn end(&self, index: u64, how: Result<Ended, String>) {
        let failed = !matches!(how, Ok(Ended::Off));
        let mut ends = self.ends.lock().unwrap();
        let slot = &mut ends[index as usize];
        // A failure is kept: a later run of the vCPU that ends Off does not
        // hide it.
        let holds_failure = matches!(slot, Some(e) if !matches!(e, Ok(Ended::Off)));
        if failed || !holds_failure {
            *slot = Some(how);
        }
        drop(ends);
        if failed {
            self.stop_all();
        }
    }

    /// A guest's SGI from vCPU `from` (the value it wrote to ICC_SGI1R_EL1):
    /// pending for each vCPU it names, each target but the sender stopped
    /// in its run so that its thread asks keel for it before the next
    /// (as in `stop_all`, the signal is sent again until the thread has
    /// taken the SGI, or is gone).
    fn send_sgi(&self, from: u64, value: u64) {
        let intid = (value >> 24) & 0xf;
        let targets = sgi_targets(value, from, self.vcpus);
        for t in (0..self.vcpus).filter(|t| targets & (1 << t) != 0) {
            self.sgis[t as usize].fetch_or(1 << intid, Ordering::SeqCst);
        }
        for t in (0..self.vcpus).filter(|&t| targets & (1 << t) != 0 && t != from) {
            for _ in 0..1000 {
                if self.sgis[t as usize].load(Ordering::SeqCst) & (1 << intid) == 0
                    || self.stop.load(Ordering::SeqCst)
                {
                    break;
                }
                let threads = self.threads.lock().unwrap();
                let tid = threads[t as usize];
                if tid == 0 {
                    // Not running: it takes the SGI when it next starts.
                    break;
                }
                // SAFETY: a live vCPU thread, as in stop_all.
                unsafe { pthread_kill(tid, SIGUSR1) };
                drop(threads);
                thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Asks keel for the SGIs other vCPUs sent vCPU `index` (its thread,
    /// between runs); one keel cannot take now (BUSY: 32 wait) stays for
    /// the next run.
    fn take_sgis(&self, index: u64) -> io::Result<()> {
        let pending = self.sgis[index as usize].swap(0, Ordering::SeqCst);
        for intid in (0..16).filter(|i| pending & (1 << i) != 0) {
            match self.keel.vcpu_irq(self.vm, index, intid, SGI_PRIORITY) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(EBUSY) => {
                    self.sgis[index as usize].fetch_or(1 << intid, Ordering::SeqCst);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Stops every vCPU: each thread sees `stop` when its VCPU_RUN returns,
    /// which the signal makes happen at once (the driver returns an IRQ
    /// exit when a signal is pending). A signal that lands between a
    /// thread's check of `stop` and its VCPU_RUN is lost in user space, so
    /// it is sent again until every other vCPU thread has left (for up to
    /// ten seconds).
    fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { pthread_self() };
        for _ in 0..1000 {
            let threads = self.threads.lock().unwrap();
            let mut left = false;
            for &t in threads.iter().filter(|&&t| t != 0 && t != me) {
                left = true;
                // SAFETY: `t` is a live thread of this process: a vCPU
                // thread clears its entry under this lock before it ends.
                unsafe { pthread_kill(t, SIGUSR1) };
            }
            drop(threads);
            if !left {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

extern "C" {
    fn pthread_self() -> u64;
    fn pthread_kill(thread: u64, sig: i32) -> i32;
    fn signal(sig: i32, handler: extern "C" fn(i32)) -> usize;
}
const SIGUSR1: i32 = 10;
const EBUSY: i32 = 16;
/// The priority of the SGIs the VMM delivers: Linux's default for every
/// interrupt (this VMM emulates no redistributor where a guest could set
/// another).
const SGI_PRIORITY: u64 = 0xa0;

/// The vCPUs (a bit per index) an ICC_SGI1R_EL1 value sent by vCPU `from`
/// names, of `vcpus`: every other vCPU (IRM), or those of its target list
/// whose affinity is 0.0.0.(RS * 16 + bit), the affinity keel gives vCPU
/// n being 0.0.0.n.
fn sgi_targets(value: u64, from: u64, vcpus: u64) -> u64 {
    let all = if vcpus >= 64 {
        u64::MAX
    } else {
        (1 << vcpus) - 1
    };
    if value & (1 << 40) != 0 {
        return all & !(1 << from);
    }
    let (aff1, aff2, aff3) = (
        (value >> 16) & 0xff,
        (value >> 32) & 0xff,
        (value >> 48) & 0xff,
    );
    if aff1 | aff2 | aff3 != 0 {
        return 0;
    }
    let base = ((value >> 44) & 0xf) * 16;
    let mut targets = 0;
    for bit in (0..16).filter(|b| value & (1 << b) != 0) {
        if base + bit < vcpus.min(64) {
            targets |= 1 << (base + bit);
        }
    }
    targets
}

/// SIGUSR1 only interrupts VCPU_RUN.
extern "C" fn on_sigusr1(_: i32) {}

/// Runs vCPU `index` until it is off, on this thread; each vCPU the guest
/// starts meanwhile gets a thread of `scope`.
fn run_vcpu<'s>(g: &'s Guest<'s>, scope: &'s thread::Scope<'s, '_>, index: u64) {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { pthread_self() };
    g.threads.lock().unwrap()[index as usize] = me;
    let ended = run_one(g, scope, index).map_err(|e| format!("VCPU_RUN of vCPU {index}: {e}"));
    // Only its own entry: after its CPU_OFF, a CPU_ON may already have
    // started the vCPU again on another thread.
    let mut threads = g.threads.lock().unwrap();
    if threads[index as usize] == me {
        threads[index as usize] = 0;
    }
    drop(threads);
    g.end(index, ended.and_then(|e| e));
}

fn run_one<'s>(
    g: &'s Guest<'s>,
    scope: &'s thread::Scope<'s, '_>,
    index: u64,
) -> io::Result<Result<Ended, String>> {
    let (keel, vm) = (g.keel, g.vm);
    let mut completion = 0;
    loop {
        if g.stop.load(Ordering::SeqCst) {
            return Ok(Ok(Ended::Off));
        }
        g.take_sgis(index)?;
        let e = keel.vcpu_run(vm, index, completion)?;
        completion = 0;
        match e.reason {
            exit::MMIO => {
                let (ipa, access, value) = (e.x2, e.x3, e.x4);
                let write = exit::mmio::is_write(access);
                if (CONSOLE..CONSOLE + CONSOLE_SIZE).contains(&ipa) {
                    if write {
                        let mut console = g.console.lock().unwrap();
                        console.write(index as usize, ipa - CONSOLE, value, g.start);
                    }
                } else {
                    say(&format!(
                        "vmm: MMIO {} at {ipa:#x} outside every device",
                        if write { "write" } else { "read" }
                    ));
                }
                // Reads of any register give 0.
            }
            // keel answers PSCI itself (SYSTEM_OFF is exit 1) and tells
            // the VMM what it did: a vCPU turning itself off ends its
            // thread; one it turned on gets a thread (the completion, 0,
            // is the caller's SUCCESS).
            exit::HYPERCALL if e.x2 == PSCI_CPU_OFF => return Ok(Ok(Ended::Off)),
            exit::HYPERCALL if PSCI_CPU_ON.contains(&e.x2) => {
                // keel made the target ready (it checked the target): a
                // vCPU nobody runs would stay ON for the guest for ever.
                let target = e.x3 & 0xff;
                if target >= g.vcpus {
                    return Ok(Err(format!("CPU_ON of {:#x}, not a vCPU", e.x3)));
                }
                let spawned = thread::Builder::new()
                    .name(format!("vcpu{target}"))
                    .spawn_scoped(scope, move || run_vcpu(g, scope, target));
                if let Err(e) = spawned {
                    return Ok(Err(format!("no thread for vCPU {target}: {e}")));
                }
                g.started.fetch_add(1, Ordering::Relaxed);
            }
            exit::HYPERCALL => completion = keel_abi::status::NOT_SUPPORTED as u64,
            exit::IRQ => {}
            exit::SGI if e.x3 == exit::sgi::SGI1R => g.send_sgi(index, e.x2),
            exit::SGI => say(&format!(
                "vmm: vCPU {index}: group-0 SGI {:#x} dropped",
                e.x2
            )),
            exit::SYSTEM_OFF => return Ok(Ok(Ended::Off)),
            exit::FAULT => return Ok(Ok(Ended::Fault(e.x2))),
            r => say(&format!("vmm: unknown exit reason {r}")),
        }
    }
}

fn cmd_run(o: Opts) -> Result<u32, String> {
    let start = Instant::now();
    let path = o.image.clone().ok_or("run needs a guest image")?;
    let image = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
    let size = o.mem_mib * MIB;
    let keel = Keel::open().map_err(|e| format!("/dev/keel: {e} (is keel.ko loaded?)"))?;
    if o.vcpus == 0 || o.vcpus > 255 {
        return Err(format!("--vcpus {}: 1 to 255", o.vcpus));
    }
    let vm = keel
        .vm_create(o.vcpus)
        .map_err(|e| format!("VM_CREATE of {} vCPU(s): {e}", o.vcpus))?;
    let flags = if o.carveout { dev::MEM_CARVEOUT } else { 0 };
    let m = keel
        .give(false, vm, GUEST_BASE, size, &image, flags)
        .map_err(|e| format!("VM_DONATE of {} MiB: {e}", o.mem_mib))?;
    let base = keel
        .vm_mem_state(vm, GUEST_BASE)
        .map_err(|e| format!("VM_MEM_STATE: {e}"))?;
    say(&format!(
        "vmm: vm {vm:#x}: {} MiB {} at ipa {GUEST_BASE:#x}, pa {:#x}, {} run(s), {} hypercall(s), mapped with {} KiB blocks",
        o.mem_mib,
        if o.carveout { "of the carveout" } else { "of Linux's pages" },
        base.pfn << 12,
        m.runs,
        m.hypercalls,
        base.map_size >> 10
    ));
    // Mode 2 learns the vCPU count from x0 bits 8..15.
    keel.vcpu_init(vm, 0, GUEST_BASE, o.mode | o.vcpus << 8)
        .map_err(|e| format!("VCPU_INIT: {e}"))?;
    let guest = Guest {
        keel: &keel,
        vm,
        vcpus: o.vcpus,
        console: Mutex::new(Console {
            lines: vec![Vec::new(); o.vcpus as usize],
            first_line: None,
            secret: None,
            shared: None,
            status: None,
        }),
        start,
        started: AtomicU64::new(0),
        ends: Mutex::new((0..o.vcpus).map(|_| None).collect()),
        stop: AtomicBool::new(false),
        threads: Mutex::new(vec![0; o.vcpus as usize]),
        sgis: (0..o.vcpus).map(|_| AtomicU32::new(0)).collect(),
    };
    // SAFETY: an empty handler: SIGUSR1 only ends a VCPU_RUN early.
    unsafe { signal(SIGUSR1, on_sigusr1) };
    thread::scope(|scope| run_vcpu(&guest, scope, 0));
    let console = guest.console.into_inner().unwrap();
    let started = guest.started.into_inner();
    let mut ended = Ended::Off;
    for (index, end) in guest.ends.into_inner().unwrap().into_iter().enumerate() {
        match end {
            Some(Err(e)) => return Err(e),
            Some(Ok(Ended::Fault(esr))) if index == 0 => ended = Ended::Fault(esr),
            Some(Ok(Ended::Fault(esr))) => {
                say(&format!("vmm: vCPU {index} faulted, ESR {esr:#x}"));
                ended = Ended::Fault(esr);
            }
            _ => {}
        }
    }
    if let Some(t) = console.first_line {
        say(&format!(
            "vmm: figure guest_start_ms={:.3}",
            t.as_secs_f64() * 1000.0
        ));
    }
    let mut c = Checks { failed: 0 };
    match ended {
        Ended::Off => say("vmm: guest powered off"),
        Ended::Fault(esr) => c.check("guest_ran", false, || format!("guest fault, ESR {esr:#x}")),
    }
    if o.mode == 0 {
        check_demo(&keel, vm, &o, &console, base.map_size, &mut c);
    }
    if o.mode == 2 {
        // Every other vCPU was started by the guest, ran on its thread and
        // reported to vCPU 0, which counted them all.
        c.check(
            "smp_guest",
            started == o.vcpus - 1 && console.status == Some(o.vcpus),
            || {
                format!(
                    "{started} vCPU(s) started, status {:?}, expected {} and {}",
                    console.status,
                    o.vcpus - 1,
                    o.vcpus
                )
            },
        );
    }
    if o.mode == 5 {
        // vCPU 1 took the SGI vCPU 0 sent it (INTID 3), through the VMM.
        c.check(
            "ipi_guest",
            started == 1 && console.status == Some(3),
            || {
                format!(
                    "{started} vCPU(s) started, status {:?}, expected 1 and 3",
                    console.status
                )
            },
        );
    }
    if o.mode == 4 {
        // The guest's virtual timer interrupted it once per expiry: keel
        // delivered it (the VMM never sees the timer).
        c.check("timer_guest", console.status == Some(5), || {
            format!("status {:?}, expected 5 timer interrupts", console.status)
        });
    }
    if let Some(hold) = &o.hold {
        say(&format!("vmm: holding the VM until {hold} exists"));
        while !Path::new(hold).exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Closing /dev/keel destroys the VM and takes its memory back.
    drop(keel);
    say("vmm: exit");
    Ok(c.failed)
}

/// What the demo guest (mode 0) must have left behind.
fn check_demo(keel: &Keel, vm: u64, o: &Opts, con: &Console, base_map: u64, c: &mut Checks) {
    let size = o.mem_mib * MIB;
    let expect_map = if o.carveout && size >= 1 << 30 {
        1 << 30
    } else {
        BLOCK_2M
    };
    c.check("donated_as_blocks", base_map == expect_map, || {
        format!(
            "guest RAM at {GUEST_BASE:#x} is mapped with {base_map} bytes, expected {expect_map}"
        )
    });
    c.check("share_status", con.status == Some(0), || {
        format!("MEM_SHARE returned {:?}", con.status.map(|s| s as i64))
    });
    let (Some(secret), Some(shared)) = (con.secret, con.shared) else {
        c.check("guest_reported", false, || {
            "the guest reported no secret or shared page".into()
        });
        return;
    };

    // The secret's page: private, NOPAGE for the host; the driver refuses to read it.
    match keel.vm_mem_state(vm, secret) {
        Ok(s) => {
            let host = keel.mem_state(s.pfn);
            say(&format!(
                "vmm: secret at ipa {secret:#x} pa {:#x}: guest state {}, map {} KiB, host {:?}",
                s.pfn << 12,
                s.state,
                s.map_size >> 10,
                host.as_ref().map(|h| (h.owner, h.state))
            ));
            say(&format!("vmm: secret_pa={:#x}", s.pfn << 12));
            c.check("secret_private", s.state == PageState::Owned as u64, || {
                format!("guest state {}", s.state)
            });
            c.check(
                "secret_hidden_from_host",
                matches!(host, Ok(h) if h.owner == vm && h.state == PageState::NoPage as u64),
                || format!("host MEM_STATE {host:?}"),
            );
        }
        Err(e) => c.check("secret_private", false, || format!("VM_MEM_STATE: {e}")),
    }
    let mut buf = [0u8; 64];
    let r = keel.read(vm, secret, &mut buf);
    c.check(
        "private_read_refused",
        matches!(&r, Err(e) if errno(e) == 1),
        || format!("reading the private page gave {r:?}, expected EPERM"),
    );

    // The shared page: the message, read through the driver (pinned meanwhile).
    let mut msg = [0u8; 64];
    match keel.read(vm, shared, &mut msg) {
        Ok(()) => {
            let text =
                String::from_utf8_lossy(&msg[..msg.iter().position(|&b| b == 0).unwrap_or(64)])
                    .into_owned();
            say(&format!("vmm: message from the guest: {text}"));
            c.check("shared_message", text == MESSAGE, || {
                format!("read {text:?}")
            });
        }
        Err(e) => c.check("shared_message", false, || {
            format!("reading the shared page: {e}")
        }),
    }
    let pin = keel
        .pin(true, vm, shared, 1)
        .and_then(|_| keel.pin(false, vm, shared, 1));
    c.check("pin_unpin", pin.is_ok(), || format!("{pin:?}"));

    // The shared page's block: split to 4K, every other page still private,
    // the same frames as before (contiguous).
    let block = shared & !(BLOCK_2M - 1);
    let mut why = String::new();
    let first = keel.vm_mem_state(vm, block);
    let mut private = 0;
    for i in 0..512 {
        let ipa = block + i * PAGE;
        match (keel.vm_mem_state(vm, ipa), &first) {
            (Ok(s), Ok(f)) => {
                let want = if ipa == shared {
                    PageState::SharedOwned
                } else {
                    PageState::Owned
                } as u64;
                if s.state != want || s.pfn != f.pfn + i || s.map_size != PAGE {
                    why = format!(
                        "ipa {ipa:#x}: pfn {:#x} state {} map {}",
                        s.pfn, s.state, s.map_size
                    );
                    break;
                }
                private += (ipa != shared) as u32;
            }
            (r, _) => {
                why = format!("ipa {ipa:#x}: {r:?}");
                break;
            }
        }
    }
    say(&format!(
        "vmm: shared page's block {block:#x}: {private} private pages around the shared one"
    ));
    c.check("shared_block_intact", why.is_empty(), || why);

    // Every other 2M block of guest RAM is still mapped as one block.
    let (mut blocks, mut whole) = (0, 0);
    let mut ipa = GUEST_BASE;
    while ipa < GUEST_BASE + size {
        if ipa != block {
            blocks += 1;
            if keel
                .vm_mem_state(vm, ipa)
                .is_ok_and(|s| s.map_size >= BLOCK_2M)
            {
                whole += 1;
            }
        }
        ipa += BLOCK_2M;
    }
    say(&format!(
        "vmm: {whole} of {blocks} other 2M blocks still mapped as blocks"
    ));
    c.check("other_blocks_2m", whole == blocks, || {
        format!("{whole} of {blocks}")
    });
}

fn cmd_map(o: Opts) -> Result<u32, String> {
    let keel = Keel::open().map_err(|e| format!("/dev/keel: {e}"))?;
    let vm = keel.vm_create(1).map_err(|e| format!("VM_CREATE: {e}"))?;
    let flags = if o.carveout { dev::MEM_CARVEOUT } else { 0 };
    let t = Instant::now();
    let m = keel
        .give(false, vm, GUEST_BASE, o.mem_mib * MIB, &[], flags)
        .map_err(|e| format!("VM_DONATE of {} MiB: {e}", o.mem_mib))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let map = keel
        .vm_mem_state(vm, GUEST_BASE)
        .map(|s| s.map_size)
        .unwrap_or(0);
    say(&format!(
        "vmm: {} MiB given in {} run(s), {} KiB blocks at the base, {ms:.1} ms",
        o.mem_mib,
        m.runs,
        map >> 10
    ));
    say(&format!(
        "vmm: figure hypercalls_to_map_{}m={}",
        o.mem_mib, m.hypercalls
    ));
    keel.vm_destroy(vm)
        .map_err(|e| format!("VM_DESTROY: {e}"))?;
    Ok(0)
}

fn cmd_info() -> Result<u32, String> {
    let keel = Keel::open().map_err(|e| format!("/dev/keel: {e}"))?;
    let i = keel.info().map_err(|e| format!("INFO: {e}"))?;
    say(&format!(
        "vmm: info abi={}.{} features={:#x} blocks={:#x} max_vms={} max_vcpus={} vms={} guest_pages={} pool_pages={} leaked_pages={} carveout={:#x}+{:#x} carveout_free={:#x}",
        i.revision_major, i.revision_minor, i.features, i.block_sizes, i.max_vms, i.max_vcpus,
        i.vms, i.guest_pages, i.pool_pages, i.leaked_pages, i.carveout_base, i.carveout_size, i.carveout_free
    ));
    Ok(0)
}

fn cmd_state(pfn: &str) -> Result<u32, String> {
    let pfn =
        u64::from_str_radix(pfn.trim_start_matches("0x"), 16).map_err(|e| format!("pfn: {e}"))?;
    let keel = Keel::open().map_err(|e| format!("/dev/keel: {e}"))?;
    let s = keel
        .mem_state(pfn)
        .map_err(|e| format!("MEM_STATE {pfn:#x}: {e}"))?;
    say(&format!(
        "vmm: state pfn={pfn:#x} owner={:#x} state={} map_size={:#x}",
        s.owner, s.state, s.map_size
    ));
    Ok(0)
}

fn cmd_reclaim() -> Result<u32, String> {
    let keel = Keel::open().map_err(|e| format!("/dev/keel: {e}"))?;
    let n = keel.reclaim().map_err(|e| format!("RECLAIM: {e}"))?;
    say(&format!("vmm: reclaimed {n} pages"));
    Ok(0)
}

/// Every bad argument gets its errno, and nothing is left behind.
/// VM_CREATE past keel's limit: ENOSPC, and keel's pool does not grow for
/// it (keel answers a full VM table with NO_MEMORY, which the driver must
/// not take for an empty pool).
fn limit_checks(keel: &Keel, c: &mut Checks) {
    const ENOSPC: i32 = 28;
    let max = keel.info().map(|i| i.max_vms).unwrap_or(0);
    let mut vms = Vec::new();
    while (vms.len() as u64) < max {
        match keel.vm_create(1) {
            Ok(vm) => vms.push(vm),
            Err(e) => {
                c.check("create_up_to_limit", false, || {
                    format!("VM_CREATE {} of {max}: {e}", vms.len() + 1)
                });
                break;
            }
        }
    }
    let pool = |k: &Keel| k.info().map(|i| i.pool_pages).unwrap_or(u64::MAX);
    let before = pool(keel);
    let refused: Vec<_> = (0..4).map(|_| keel.vm_create(1)).collect();
    let after = pool(keel);
    c.check(
        "create_past_limit",
        max > 0
            && vms.len() as u64 == max
            && refused
                .iter()
                .all(|r| r.as_ref().err().map(errno) == Some(ENOSPC))
            && before == after,
        || {
            format!(
                "{max} VMs allowed, {} made; then {refused:?}; pool pages {before} -> {after}",
                vms.len()
            )
        },
    );
    for vm in vms {
        let _ = keel.vm_destroy(vm);
    }
}

fn cmd_selftest() -> Result<u32, String> {
    const EPERM: i32 = 1;
    const ENOENT: i32 = 2;
    const ENOMEM: i32 = 12;
    const EFAULT: i32 = 14;
    const EEXIST: i32 = 17;
    const EINVAL: i32 = 22;
    const ENOTTY: i32 = 25;
    const ENODEV: i32 = 19;
    let keel = Keel::open().map_err(|e| format!("/dev/keel: {e}"))?;
    let mut c = Checks { failed: 0 };
    let mut expect = |name: &str, r: io::Result<()>, want: i32| {
        let got = r.as_ref().err().map(errno).unwrap_or(0);
        c.check(&format!("errno_{name}"), got == want, || {
            format!("got {r:?}, expected errno {want}")
        });
    };
    use dev::*;
    expect("unknown_ioctl", keel.raw(ioc_any(0x7f), 0), ENOTTY);
    expect("null_arg", keel.raw(IOC_INFO, 0), EFAULT);
    expect("bad_arg_pointer", keel.raw(IOC_VM_CREATE, 8), EFAULT);
    expect(
        "mem_state_outside_ram",
        keel.mem_state(0).map(|_| ()),
        EINVAL,
    );
    expect("stats_index", keel.hyp_stat(99).map(|_| ()), EINVAL);
    let mut a = VmCreate {
        nr_vcpus: 0,
        ..Default::default()
    };
    expect("create_0_vcpus", keel.call(IOC_VM_CREATE, &mut a), EINVAL);
    let mut a = VmCreate {
        nr_vcpus: 100,
        ..Default::default()
    };
    expect("create_100_vcpus", keel.call(IOC_VM_CREATE, &mut a), EINVAL);
    let mut a = VmCreate {
        nr_vcpus: 1,
        flags: 1,
        ..Default::default()
    };
    expect("create_flags", keel.call(IOC_VM_CREATE, &mut a), EINVAL);
    expect("destroy_unknown", keel.vm_destroy(0x1000), ENOENT);
    expect(
        "init_unknown_vm",
        keel.vcpu_init(0x1234, 0, GUEST_BASE, 0),
        ENOENT,
    );

    let vm = keel.vm_create(1).map_err(|e| format!("VM_CREATE: {e}"))?;
    expect(
        "init_bad_vcpu",
        keel.vcpu_init(vm, 5, GUEST_BASE, 0),
        EINVAL,
    );
    expect(
        "init_unaligned_entry",
        keel.vcpu_init(vm, 0, GUEST_BASE + 2, 0),
        EINVAL,
    );
    expect("run_bad_vcpu", keel.vcpu_run(vm, 9, 0).map(|_| ()), EINVAL);
    expect(
        "run_uninit_vcpu",
        keel.vcpu_run(vm, 0, 0).map(|_| ()),
        EINVAL,
    );
    let give = |ipa: u64, size: u64, src: u64, src_len: u64, flags: u64| {
        let mut a = Mem {
            handle: vm,
            ipa,
            size,
            src,
            src_len,
            flags,
            ..Default::default()
        };
        keel.call(IOC_VM_DONATE, &mut a)
    };
    let img = [0u8; 16];
    expect("donate_size_0", give(GUEST_BASE, 0, 0, 0, 0), EINVAL);
    expect(
        "donate_size_unaligned",
        give(GUEST_BASE, 4097, 0, 0, 0),
        EINVAL,
    );
    expect(
        "donate_ipa_unaligned",
        give(GUEST_BASE + 8, PAGE, 0, 0, 0),
        EINVAL,
    );
    expect(
        "donate_ipa_overflow",
        give(u64::MAX - PAGE + 1, 2 * PAGE, 0, 0, 0),
        EINVAL,
    );
    expect("donate_ipa_outside", give(1 << 45, PAGE, 0, 0, 0), EINVAL);
    expect(
        "donate_src_too_long",
        give(GUEST_BASE, PAGE, img.as_ptr() as u64, PAGE + 1, 0),
        EINVAL,
    );
    expect("donate_src_fault", give(GUEST_BASE, PAGE, 16, 8, 0), EFAULT);
    expect("donate_flags", give(GUEST_BASE, PAGE, 0, 0, 0x80), EINVAL);
    expect("donate_huge", give(GUEST_BASE, 1 << 40, 0, 0, 0), ENOMEM);
    expect(
        "donate_unknown_vm",
        keel.give(false, 0x1777, GUEST_BASE, PAGE, &[], 0)
            .map(|_| ()),
        ENOENT,
    );
    if keel.info().is_ok_and(|i| i.carveout_size == 0) {
        expect(
            "carveout_absent",
            give(GUEST_BASE, BLOCK_2M, 0, 0, MEM_CARVEOUT),
            ENODEV,
        );
    } else {
        expect(
            "carveout_unaligned",
            give(GUEST_BASE, PAGE, 0, 0, MEM_CARVEOUT),
            EINVAL,
        );
    }
    expect(
        "donate_ok",
        give(GUEST_BASE, BLOCK_2M, img.as_ptr() as u64, 16, 0),
        0,
    );
    expect(
        "donate_overlap",
        give(GUEST_BASE + PAGE, PAGE, 0, 0, 0),
        EEXIST,
    );
    expect(
        "vm_mem_state_unaligned",
        keel.vm_mem_state(vm, GUEST_BASE + 1).map(|_| ()),
        EINVAL,
    );
    let mut buf = [0u8; 32];
    expect("rw_private", keel.read(vm, GUEST_BASE, &mut buf), EPERM);
    expect("rw_unmapped", keel.read(vm, 0x4000_0000, &mut buf), EPERM);
    let mut a = Rw {
        handle: vm,
        ipa: GUEST_BASE,
        buf: buf.as_mut_ptr() as u64,
        len: 0,
        flags: 0,
    };
    expect("rw_len_0", keel.call(IOC_VM_RW, &mut a), EINVAL);
    a.len = 2 << 20;
    expect("rw_too_long", keel.call(IOC_VM_RW, &mut a), EINVAL);
    a.len = 8;
    a.flags = 4;
    expect("rw_flags", keel.call(IOC_VM_RW, &mut a), EINVAL);
    expect("pin_nr_0", keel.pin(true, vm, GUEST_BASE, 0), EINVAL);
    expect(
        "pin_ipa_wraps",
        keel.pin(true, vm, 0u64.wrapping_sub(PAGE), 2),
        EINVAL,
    );
    expect("pin_private", keel.pin(true, vm, GUEST_BASE, 1), EPERM);
    expect("unpin_private", keel.pin(false, vm, GUEST_BASE, 1), EPERM);
    let mut r = Range {
        handle: vm,
        ipa: 0x9000_0000,
        size: PAGE,
    };
    expect("unshare_unknown", keel.call(IOC_VM_UNSHARE, &mut r), EINVAL);

    // A page lent to the guest: the host writes and reads it back, then unshares it.
    expect(
        "share_ok",
        keel.give(true, vm, 0x9000_0000, PAGE, b"lent", 0)
            .map(|_| ()),
        0,
    );
    let mut back = [0u8; 4];
    let rw = keel
        .write(vm, 0x9000_0002, b"NT")
        .and_then(|_| keel.read(vm, 0x9000_0000, &mut back))
        .and_then(|_| {
            if &back == b"leNT" {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(5)) // EIO: other bytes came back
            }
        });
    expect("lent_page_roundtrip", rw, 0);
    expect("pin_lent", keel.pin(true, vm, 0x9000_0000, 1), EPERM);
    expect("unshare_ok", keel.call(IOC_VM_UNSHARE, &mut r), 0);
    expect("destroy_ok", keel.vm_destroy(vm), 0);
    expect("destroy_twice", keel.vm_destroy(vm), ENOENT);
    limit_checks(&keel, &mut c);
    let info = keel.info();
    let clean = info
        .as_ref()
        .is_ok_and(|i| i.vms == 0 && i.guest_pages == 0 && i.leaked_pages == 0);

    c.check("nothing_left", clean, || format!("{info:?}"));
    Ok(c.failed)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("usage: keel-vmm run|map|info|state PFN|reclaim|selftest [options] (see --help)");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match cmd.as_str() {
        "run" => parse(rest).and_then(cmd_run),
        "map" => parse(rest).and_then(cmd_map),
        "info" => cmd_info(),
        "state" => rest
            .first()
            .ok_or("state needs a pfn".to_string())
            .and_then(|p| cmd_state(p)),
        "reclaim" => cmd_reclaim(),
        "selftest" => cmd_selftest(),
        "--help" | "-h" | "help" => {
            println!(
                "{}",
                include_str!("main.rs")
                    .lines()
                    .take_while(|l| l.starts_with("//!"))
                    .map(|l| l.trim_start_matches("//!").trim_start())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            Ok(0)
        }
        other => Err(format!("unknown command {other}")),
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            say(&format!("vmm: {n} check(s) failed"));
            ExitCode::from(1)
        }
        Err(e) => {
            say(&format!("vmm: error: {e}"));
            ExitCode::from(1)
        }
    }
}
