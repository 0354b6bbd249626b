//! The VM calls through the real dispatcher: host calls with
//! `Hyp::host_hvc`, guest calls and exits with `Hyp::guest_trap` and
//! fabricated syndromes, VCPU_RUN with `begin_run`/`end_run`, on simulated
//! machines (64 MiB, or 2 GiB of lazily backed RAM for 1 GiB blocks). The
//! invariant checker (KEEL_CHECK_INVARIANTS) runs after every call that
//! may change something.

mod common;

use common::{slot, Config, Machine, BIG, ESR_HVC, ESR_SMC, GIB, MIB2, RAM_BASE};
use keel_abi::{exit, func, stat, status};
use keel_hyp::guest::{Action, Trap, TrapKind};
use keel_hyp::hvc::Return;
use keel_hyp::mem::PAGE;
use keel_hyp::vm::{Slot, Vcpu, VcpuState, MAX_VCPUS, MAX_VMS};
use keel_mm::frames::RamFrames;

const OWNED: u64 = 0;
const SHARED_OWNED: u64 = 1;
const SHARED_BORROWED: u64 = 2;
const NOPAGE: u64 = 3;

const OK: i64 = status::SUCCESS;
const NOT_SUPPORTED: i64 = status::NOT_SUPPORTED;
const INVALID: i64 = status::INVALID_PARAMETER;
const DENIED: i64 = status::DENIED;
const NO_MEMORY: i64 = status::NO_MEMORY;
const BUSY: i64 = status::BUSY;

/// A host page of the small machine well away from the hypervisor.
const FREE_2M: u64 = 0x4100_0000;

fn pfn(pa: u64) -> u64 {
    pa / PAGE
}

impl Machine {
    fn create(&self, nr_vcpus: u64) -> u64 {
        let r = self.call(func::VM_CREATE, &[nr_vcpus, 0]);
        assert_eq!(r.regs[0], 0, "VM_CREATE");
        self.assert_invariants("VM_CREATE");
        r.regs[1]
    }

    fn donate(&self, h: u64, pa: u64, ipa: u64, nr: u64) -> i64 {
        self.checked(func::VM_DONATE, &[h, pfn(pa), ipa, nr])
    }

    fn share(&self, h: u64, pa: u64, ipa: u64, nr: u64) -> i64 {
        self.checked(func::VM_SHARE, &[h, pfn(pa), ipa, nr])
    }

    fn reclaim(&self, pa: u64, nr: u64) -> i64 {
        self.checked(func::HOST_RECLAIM, &[pfn(pa), nr])
    }

    /// Everything a refused call must leave as it was: MEM_STATE of every
    /// page, HYP_STATS 0..4, VM_MEM_STATE of every page of the first
    /// `ipa_window` bytes of each live VM.
    fn snapshot(&self, handles: &[u64], ipa_window: u64) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<_> = (RAM_BASE..self.cfg.ram_end())
            .step_by(PAGE as usize)
            .map(|pa| self.mem_state(pa))
            .collect();
        for i in 0..stat::HYPERCALLS {
            v.push((i, self.stat(i), 0));
        }
        for &h in handles {
            for ipa in (0..ipa_window).step_by(PAGE as usize) {
                v.push(self.vm_mem_state(h, ipa));
            }
        }
        v
    }

    /// Panics with the first difference from `before`.
    fn unchanged(&self, before: &[(u64, u64, u64)], handles: &[u64], ipa_window: u64, what: &str) {
        let now = self.snapshot(handles, ipa_window);
        assert_eq!(now.len(), before.len());
        if let Some(i) = (0..now.len()).find(|&i| now[i] != before[i]) {
            let pages = ((self.cfg.ram_end() - RAM_BASE) / PAGE) as usize;
            let at = if i < pages {
                format!("MEM_STATE of {:#x}", RAM_BASE + i as u64 * PAGE)
            } else if i < pages + stat::HYPERCALLS as usize {
                format!("HYP_STATS {}", i - pages)
            } else {
                let j = i - pages - stat::HYPERCALLS as usize;
                let per = (ipa_window / PAGE) as usize;
                format!(
                    "VM_MEM_STATE of {:#x} at {:#x}",
                    handles[j / per],
                    (j % per) as u64 * PAGE
                )
            };
            panic!("{what}: {at} was {:x?}, is {:x?}", before[i], now[i]);
        }
    }

    /// Starts VCPU_RUN of vCPU 0 of `h`: the ticket's vCPU registers,
    /// exclusively the caller's while it is Running (until end_run).
    #[allow(clippy::mut_from_ref)]
    fn run(&self, h: u64, completion: u64) -> (keel_hyp::host::RunTicket, &mut Vcpu) {
        let t = self.hyp.begin_run(h, 0, completion).expect("VCPU_RUN");
        // SAFETY: the vCPU is Running, so only the ticket's holder (this
        // test) touches it until end_run.
        let vcpu = unsafe { &mut *t.vcpu };
        (t, vcpu)
    }

    fn trap(&self, h: u64, vcpu: &mut Vcpu, esr: u64, far: u64, hpfar: u64) -> Action {
        self.hyp.guest_trap(
            slot(h),
            vcpu,
            &Trap {
                kind: TrapKind::Sync,
                esr,
                far,
                hpfar,
            },
        )
    }
}

/// A machine big enough for 1 GiB blocks: RAM 0x4000_0000..0xC000_0000,
/// so 0x8000_0000..0xC000_0000 is a whole 1 GiB host block.
fn big() -> Machine {
    Machine::new(Config::new(2 * GIB, 1 << 20))
}

#[test]
fn vm_create_limits_and_errors() {
    let m = Machine::small();
    let r = m.call(func::HYP_FEATURES, &[]);
    assert_eq!(
        r.regs[..4],
        [0, keel_abi::BLOCK_SIZES, MAX_VMS as u64, MAX_VCPUS as u64]
    );
    let tables = m.stat(stat::TABLE_PAGES);
    for (nr, flags) in [
        (0, 0),
        (MAX_VCPUS as u64 + 1, 0),
        (u64::MAX, 0),
        (1, 1),
        (1, u64::MAX),
    ] {
        assert_eq!(
            m.checked(func::VM_CREATE, &[nr, flags]),
            INVALID,
            "{nr} {flags}"
        );
    }
    let handles: Vec<u64> = (0..MAX_VMS as u64)
        .map(|i| m.create(i % MAX_VCPUS as u64 + 1))
        .collect();
    assert_eq!(
        handles,
        (0..MAX_VMS as u64).map(|i| 0x1000 + i).collect::<Vec<_>>()
    );
    assert_eq!(
        m.stat(stat::TABLE_PAGES),
        tables + MAX_VMS as u64,
        "one root page per VM"
    );
    assert_eq!(
        m.checked(func::VM_CREATE, &[1, 0]),
        NO_MEMORY,
        "every slot taken"
    );
    assert_eq!(m.checked(func::VM_DESTROY, &[0x1003]), OK);
    assert_eq!(
        m.checked(func::VM_DESTROY, &[0x1003]),
        INVALID,
        "already gone"
    );
    for h in [0, 1, 0xfff, 0x1000 + MAX_VMS as u64, u64::MAX] {
        assert_eq!(m.checked(func::VM_DESTROY, &[h]), INVALID, "{h:#x}");
    }
    assert_eq!(m.create(2), 0x1003, "a free slot is reused");
    for h in handles {
        assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    }
    assert_eq!(m.stat(stat::TABLE_PAGES), tables, "roots returned");
}

#[test]
fn donate_1g_share_one_page_unshare_restores_the_block() {
    let _big = BIG.lock().unwrap_or_else(|e| e.into_inner());
    let m = big();
    let h = m.create(1);
    let (pa, ipa, nr) = (0x8000_0000u64, GIB, GIB / PAGE);
    assert_eq!(m.mem_state(pa), (0, OWNED, GIB), "host 1G block");
    // The guest's memory, as the host wrote it before donating.
    for off in [0, 5 * PAGE, MIB2, GIB - PAGE] {
        m.fill(pa + off, 0x77);
    }
    let tables = m.stat(stat::TABLE_PAGES);
    let host_tables = m.host_tables();
    assert_eq!(m.donate(h, pa, ipa, nr), OK);
    for off in [0, 5 * PAGE, MIB2, GIB - PAGE] {
        assert_eq!(
            m.vm_mem_state(h, ipa + off),
            (pfn(pa + off), OWNED, GIB),
            "1G block at {off:#x}"
        );
        assert_eq!(m.mem_state(pa + off), (h, NOPAGE, 0));
    }
    assert_eq!(m.vm_tables(h), (1, 0), "the block sits in the root");
    assert_eq!(
        m.host_tables(),
        host_tables,
        "the host's block became one entry"
    );
    assert_eq!(m.stat(stat::TABLE_PAGES), tables);
    assert_eq!(
        m.checked(func::HOST_RECLAIM, &[pfn(pa), 1]),
        DENIED,
        "a live VM's page"
    );

    // MEM_SHARE of one page splits the guest block down to 4K: an L2 and
    // an L3 table; the host maps the page 4K, through two tables too.
    let splits = m.stat(stat::BLOCK_SPLITS);
    let page = ipa + 5 * PAGE;
    assert_eq!(m.guest_checked(slot(h), func::MEM_SHARE, page, 1), OK);
    assert_eq!(m.vm_tables(h), (1, 2));
    assert_eq!(m.host_tables(), host_tables + 2);
    assert_eq!(m.stat(stat::TABLE_PAGES), tables + 4);
    assert!(m.stat(stat::BLOCK_SPLITS) >= splits + 2);
    assert_eq!(m.mem_state(pa + 5 * PAGE), (h, SHARED_BORROWED, PAGE));
    assert_eq!(m.mem_state(pa + 4 * PAGE), (h, NOPAGE, 0));
    assert_eq!(m.vm_mem_state(h, page), (pfn(pa) + 5, SHARED_OWNED, PAGE));
    assert_eq!(m.vm_mem_state(h, page + PAGE), (pfn(pa) + 6, OWNED, PAGE));
    assert_eq!(m.vm_mem_state(h, ipa + MIB2), (pfn(pa + MIB2), OWNED, MIB2));
    assert_eq!(m.vm_mem_state(h, ipa + GIB - PAGE).2, MIB2);
    assert_eq!(m.read(pa + 5 * PAGE)[0], 0x77, "shared in place");

    // Pinned: neither unshare nor relinquish.
    assert_eq!(m.checked(func::HOST_PIN, &[pfn(pa) + 5, 1]), OK);
    assert_eq!(m.checked(func::HOST_PIN, &[pfn(pa) + 5, 1]), OK);
    assert_eq!(m.checked(func::HOST_PIN, &[pfn(pa) + 4, 2]), DENIED);
    let before = (m.vm_mem_state(h, page), m.mem_state(pa + 5 * PAGE));
    assert_eq!(m.guest_checked(slot(h), func::MEM_UNSHARE, page, 1), BUSY);
    assert_eq!(
        m.guest_checked(slot(h), func::MEM_RELINQUISH, page, 1),
        BUSY
    );
    assert_eq!(
        (m.vm_mem_state(h, page), m.mem_state(pa + 5 * PAGE)),
        before
    );
    assert_eq!(m.checked(func::HOST_UNPIN, &[pfn(pa) + 5, 1]), OK);
    assert_eq!(
        m.guest_checked(slot(h), func::MEM_UNSHARE, page, 1),
        BUSY,
        "one pin left"
    );
    assert_eq!(m.checked(func::HOST_UNPIN, &[pfn(pa) + 5, 1]), OK);
    assert_eq!(m.checked(func::HOST_UNPIN, &[pfn(pa) + 5, 1]), DENIED);

    let merges = m.stat(stat::BLOCK_MERGES);
    assert_eq!(m.guest_checked(slot(h), func::MEM_UNSHARE, page, 0), OK);
    assert_eq!(m.vm_mem_state(h, page), (pfn(pa) + 5, OWNED, GIB));
    assert_eq!(m.vm_tables(h), (1, 0), "the 1G block is rebuilt");
    assert_eq!(m.host_tables(), host_tables);
    assert_eq!(m.stat(stat::TABLE_PAGES), tables);
    assert!(m.stat(stat::BLOCK_MERGES) > merges);
    assert_eq!(m.mem_state(pa + 5 * PAGE), (h, NOPAGE, 0));

    // Destroy, reclaim the whole GiB: zeroed, the host block rebuilt, the
    // slot free again. The splits and merges counted stay counted (since
    // boot) when the VM's slot and stage 2 go.
    let counted = (m.stat(stat::BLOCK_SPLITS), m.stat(stat::BLOCK_MERGES));
    let host_before = m.hyp.mem.lock().host.stats();
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(m.mem_state(pa), (h, NOPAGE, 0), "still the dead VM's");
    assert_eq!(m.reclaim(pa, nr), OK);
    for off in [0, 5 * PAGE, MIB2, GIB - PAGE] {
        assert!(m.read(pa + off).iter().all(|&b| b == 0), "{off:#x} zeroed");
    }
    assert_eq!(m.hyp.mem.lock().mmu.zeroed, nr, "every page zeroed once");
    assert_eq!(m.mem_state(pa + 5 * PAGE), (0, OWNED, GIB));
    assert_eq!(m.host_tables(), host_tables);
    assert!(m
        .hyp
        .vms
        .lock()
        .slots
        .iter()
        .all(|s| matches!(s, Slot::Free)));
    // Exactly what the host's stage 2 added since: the VM's own splits
    // and merges still count.
    let host_after = m.hyp.mem.lock().host.stats();
    let now = (m.stat(stat::BLOCK_SPLITS), m.stat(stat::BLOCK_MERGES));
    assert_eq!(
        now,
        (
            counted.0 + host_after.splits - host_before.splits,
            counted.1 + host_after.merges - host_before.merges
        ),
        "splits and merges since boot"
    );
    assert_eq!(m.create(1), h);
}

#[test]
fn keel_table_pages_counts_each_stage2_of_a_1g_share() {
    let _big = BIG.lock().unwrap_or_else(|e| e.into_inner());
    let m = big();
    let host = m.table_pages(0).expect("the host's stage 2");
    let s = m.hyp.mem.lock().host.stats();
    assert_eq!(host, (s.root_pages + s.table_pages) as u64);
    assert!(host >= 2, "a 40-bit root is two concatenated pages");
    let h = m.create(1);
    assert_eq!(m.table_pages(h), Ok(1), "a new VM: its root alone");
    let (pa, ipa) = (0x8000_0000u64, GIB);
    assert_eq!(m.donate(h, pa, ipa, GIB / PAGE), OK);
    assert_eq!(m.table_pages(h), Ok(1), "the 1G block sits in the root");
    assert_eq!(
        m.table_pages(0),
        Ok(host),
        "the host's block became one entry"
    );
    m.assert_table_pages_add_up("after VM_DONATE");
    let total = m.stat(stat::TABLE_PAGES);

    // MEM_SHARE of one page: the guest's block splits into an L2 and an L3
    // table, and the host maps the page it now borrows through two tables.
    let page = ipa + 0x1234_5000;
    assert_eq!(m.guest_checked(slot(h), func::MEM_SHARE, page, 1), OK);
    assert_eq!(m.table_pages(h), Ok(1 + 2));
    assert_eq!(m.table_pages(0), Ok(host + 2));
    assert_eq!(m.stat(stat::TABLE_PAGES), total + 4);
    m.assert_table_pages_add_up("after MEM_SHARE");
    assert_eq!(m.guest_checked(slot(h), func::MEM_UNSHARE, page, 1), OK);
    assert_eq!(m.table_pages(h), Ok(1), "the 1G block is rebuilt");
    assert_eq!(m.table_pages(0), Ok(host));
    assert_eq!(m.stat(stat::TABLE_PAGES), total);

    // Host only: a guest gets what it gets for the other host calls.
    let (a, x) = m.guest_hvc(slot(h), func::KEEL_TABLE_PAGES, &[0]);
    assert_eq!((a, x[0] as i64), (Action::Resume, NOT_SUPPORTED));
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(m.reclaim(pa, GIB / PAGE), OK);
    assert_eq!(m.table_pages(h), Err(INVALID), "the slot is free");
    assert_eq!(m.table_pages(0), Ok(host));
}

#[test]
fn keel_table_pages_of_bad_handles_and_destroyed_vms() {
    let m = Machine::small();
    let (h, other) = (m.create(1), m.create(1));
    let (a, b) = (FREE_2M, 0x4180_3000);
    assert_eq!(m.donate(h, a, 0, 512), OK);
    assert_eq!(m.donate(h, b, 0x100_0000, 20), OK);
    let (root, below) = m.vm_tables(h);
    let tables = (root + below) as u64;
    assert_eq!(m.table_pages(h), Ok(tables));
    assert_eq!(m.table_pages(other), Ok(1));
    m.assert_table_pages_add_up("two VMs");

    // A handle without a VM: INVALID_PARAMETER, and nothing changes, not
    // even HYP_STATS 5 (the call is refused).
    let handles = [h, other];
    let before = m.snapshot(&handles, 2 * MIB2);
    let hcalls = m.stat(stat::HYPERCALLS);
    for bad in [
        0xfff,
        0x1002,
        0x1000 + MAX_VMS as u64,
        u64::MAX,
        0x1_0000_1000,
        1 << 63,
    ] {
        assert_eq!(
            m.checked(func::KEEL_TABLE_PAGES, &[bad]),
            INVALID,
            "{bad:#x}"
        );
    }
    // The invariant checks after them succeeded: 6 of them, and HYP_STATS.
    assert_eq!(m.stat(stat::HYPERCALLS), hcalls + 6 + 1);
    m.unchanged(&before, &handles, 2 * MIB2, "KEEL_TABLE_PAGES refused");

    // Destroyed, its pages not yet reclaimed: the tables are still there.
    let total = m.stat(stat::TABLE_PAGES);
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(m.table_pages(h), Ok(tables), "a destroyed VM's tables");
    assert_eq!(m.stat(stat::TABLE_PAGES), total);
    m.assert_table_pages_add_up("destroyed");
    assert_eq!(m.reclaim(a, 512), OK);
    assert!(m.table_pages(h).is_ok(), "20 pages still owed");
    m.assert_table_pages_add_up("partly reclaimed");
    assert_eq!(m.reclaim(b, 20), OK);
    assert_eq!(m.table_pages(h), Err(INVALID), "the slot is free");
    m.assert_table_pages_add_up("reclaimed");
    // An empty VM is freed by VM_DESTROY at once.
    assert_eq!(m.checked(func::VM_DESTROY, &[other]), OK);
    assert_eq!(m.table_pages(other), Err(INVALID));
}

#[test]
fn donate_2m_and_unaligned_ranges_use_the_largest_blocks() {
    let m = Machine::small();
    let h = m.create(1);
    // 2M-aligned in both: one 2M block, under one L2 table.
    assert_eq!(m.donate(h, FREE_2M, 0x20_0000, 512), OK);
    assert_eq!(m.vm_mem_state(h, 0x20_0000), (pfn(FREE_2M), OWNED, MIB2));
    assert_eq!(
        m.vm_mem_state(h, 0x3f_f000),
        (pfn(FREE_2M) + 511, OWNED, MIB2)
    );
    assert_eq!(m.vm_tables(h), (1, 1));
    assert_eq!(m.mem_state(FREE_2M + PAGE), (h, NOPAGE, 0));
    // Congruent mod 2M but 4K-offset: 511 4K pages, one 2M block, one 4K page.
    let (pa, ipa) = (0x4140_1000, 0x40_1000);
    assert_eq!(m.donate(h, pa, ipa, 1024), OK);
    assert_eq!(m.vm_mem_state(h, ipa), (pfn(pa), OWNED, PAGE));
    assert_eq!(m.vm_mem_state(h, 0x5f_f000), (pfn(pa) + 510, OWNED, PAGE));
    assert_eq!(m.vm_mem_state(h, 0x60_0000), (pfn(pa) + 511, OWNED, MIB2));
    assert_eq!(m.vm_mem_state(h, 0x80_0000), (pfn(pa) + 1023, OWNED, PAGE));
    assert_eq!(m.vm_mem_state(h, 0x80_1000), (0, NOPAGE, 0));
    // Not congruent: all 4K.
    let (pa, ipa) = (0x4200_0000, 0x100_1000);
    assert_eq!(m.donate(h, pa, ipa, 600), OK);
    for i in [0, 511, 599] {
        assert_eq!(
            m.vm_mem_state(h, ipa + i * PAGE),
            (pfn(pa) + i, OWNED, PAGE)
        );
    }
    // One 4K page.
    assert_eq!(m.donate(h, 0x41c0_3000, 0x200_0000, 1), OK);
    assert_eq!(m.vm_mem_state(h, 0x200_0000), (0x41c03, OWNED, PAGE));
    assert_eq!(m.mem_state(0x41c0_3000), (h, NOPAGE, 0));
    assert_eq!(
        m.mem_state(0x41c0_4000),
        (0, OWNED, PAGE),
        "host split around it"
    );
}

#[test]
fn vm_donate_and_share_errors_change_nothing() {
    let m = Machine::small();
    let h = m.create(1);
    let h2 = m.create(1);
    assert_eq!(m.donate(h, FREE_2M, 0, 16), OK);
    assert_eq!(m.share(h, FREE_2M + 16 * PAGE, 0x10_0000, 4), OK);
    assert_eq!(m.checked(func::HOST_SHARE_HYP, &[pfn(FREE_2M) + 32, 1]), OK);
    let before = m.snapshot(&[h, h2], 2 * MIB2);
    let fresh = pfn(0x4200_0000);
    let ram_end = pfn(m.cfg.ram_end());
    let cases: &[(u64, u64, u64, u64, i64)] = &[
        // handle, pfn, ipa, nr
        (0x0fff, fresh, 0, 1, INVALID),
        (0x1000 + MAX_VMS as u64, fresh, 0, 1, INVALID),
        (0x1002, fresh, 0, 1, INVALID), // a free slot
        (u64::MAX, fresh, 0, 1, INVALID),
        (h, fresh, 0x20_0000, 0, INVALID),
        (h, fresh, 0x20_0800, 1, INVALID),
        (h, fresh, 1 << 39, 1, INVALID),
        (h, fresh, (1 << 39) - PAGE, 2, INVALID),
        (h, fresh, u64::MAX - PAGE + 1, 1, INVALID),
        (h, fresh, 0x20_0000, u64::MAX, INVALID),
        (h, fresh, 0x20_0000, u64::MAX / PAGE + 1, INVALID),
        (h, 0, 0x20_0000, 1, INVALID),
        (h, pfn(RAM_BASE) - 1, 0x20_0000, 2, INVALID),
        (h, ram_end - 1, 0x20_0000, 2, INVALID),
        (h, ram_end, 0x20_0000, 1, INVALID),
        (h, u64::MAX, 0x20_0000, 1, INVALID),
        (h, u64::MAX / PAGE, 0x20_0000, 1, INVALID),
        // the hypervisor's memory, at both ends of it
        (h, pfn(m.cfg.hyp.start), 0x20_0000, 1, DENIED),
        (h, pfn(m.cfg.hyp.start) - 2, 0x20_0000, 3, DENIED),
        (h, pfn(m.cfg.hyp.end) - 1, 0x20_0000, 2, DENIED),
        (h, pfn(m.cfg.pool.start), 0x20_0000, 1, DENIED),
        // a page already the guest's, lent to it, shared with the hypervisor
        (h, pfn(FREE_2M) + 15, 0x20_0000, 1, DENIED),
        (h2, pfn(FREE_2M), 0x20_0000, 1, DENIED),
        (h, pfn(FREE_2M) + 19, 0x20_0000, 2, DENIED),
        (h2, pfn(FREE_2M) + 16, 0x20_0000, 1, DENIED),
        (h, pfn(FREE_2M) + 31, 0x20_0000, 2, DENIED),
        // an IPA already mapped (first page, last page)
        (h, fresh, 0, 1, DENIED),
        (h, fresh, 0x0f_f000, 3, DENIED),
        (h, fresh, 0x10_3000, 1, DENIED),
    ];
    for &(hh, p, ipa, nr, want) in cases {
        for id in [func::VM_DONATE, func::VM_SHARE] {
            assert_eq!(
                m.checked(id, &[hh, p, ipa, nr]),
                want,
                "{id:#x} {hh:#x} pfn {p:#x} ipa {ipa:#x} nr {nr:#x}"
            );
        }
    }
    m.unchanged(&before, &[h, h2], 2 * MIB2, "all or nothing");
}

#[test]
fn guest_share_unshare_relinquish() {
    let m = Machine::small();
    let h = m.create(1);
    let s = slot(h);
    assert_eq!(m.donate(h, FREE_2M, 0, 16), OK);
    assert_eq!(m.share(h, 0x4200_0000, 0x10_0000, 2), OK);
    for i in 0..16 {
        m.fill(FREE_2M + i * PAGE, 0x40 + i as u8);
    }
    // nr 0 means 1.
    assert_eq!(m.guest_checked(s, func::MEM_SHARE, 2 * PAGE, 0), OK);
    assert_eq!(m.mem_state(FREE_2M + 2 * PAGE), (h, SHARED_BORROWED, PAGE));
    assert_eq!(m.mem_state(FREE_2M + 3 * PAGE), (h, NOPAGE, 0));
    assert_eq!(m.guest_checked(s, func::MEM_SHARE, 3 * PAGE, 4), OK);
    for i in 2..7 {
        assert_eq!(m.mem_state(FREE_2M + i * PAGE).1, SHARED_BORROWED);
        assert_eq!(m.vm_mem_state(h, i * PAGE).1, SHARED_OWNED);
    }
    assert_eq!(
        m.read(FREE_2M + 4 * PAGE)[9],
        0x44,
        "the host sees the guest's data"
    );
    for (ipa, nr, want, what) in [
        (6 * PAGE, 2, DENIED, "already shared (first page)"),
        (0, 3, DENIED, "already shared (last page)"),
        (0x10_0000, 1, DENIED, "a page the host lent"),
        (0x800, 1, INVALID, "misaligned"),
        (0, u64::MAX, INVALID, "huge nr"),
        (1 << 39, 1, INVALID, "outside the IPA space"),
        (!0xfff, 2, INVALID, "overflow"),
    ] {
        assert_eq!(m.guest_checked(s, func::MEM_SHARE, ipa, nr), want, "{what}");
    }
    for (ipa, nr, want, what) in [
        (0, 3, DENIED, "not shared"),
        (6 * PAGE, 2, DENIED, "the last page is not shared"),
        (0x10_0000, 1, DENIED, "a page the host lent"),
        (0x800, 1, INVALID, "misaligned"),
    ] {
        assert_eq!(
            m.guest_checked(s, func::MEM_UNSHARE, ipa, nr),
            want,
            "{what}"
        );
    }
    assert_eq!(m.guest_checked(s, func::MEM_UNSHARE, 2 * PAGE, 2), OK);
    assert_eq!(m.mem_state(FREE_2M + 3 * PAGE), (h, NOPAGE, 0));
    assert_eq!(m.vm_mem_state(h, 3 * PAGE), (pfn(FREE_2M) + 3, OWNED, PAGE));

    // Relinquish a run of private and shared pages: zeroed, the host's.
    assert_eq!(
        m.guest_checked(s, func::MEM_RELINQUISH, 0x10_0000, 1),
        DENIED
    );
    assert_eq!(
        m.guest_checked(s, func::MEM_RELINQUISH, 15 * PAGE, 2),
        DENIED
    );
    assert_eq!(m.guest_checked(s, func::MEM_RELINQUISH, 3 * PAGE, 3), OK);
    for i in 3..6 {
        assert_eq!(m.mem_state(FREE_2M + i * PAGE).1, OWNED, "page {i}");
        assert!(
            m.read(FREE_2M + i * PAGE).iter().all(|&b| b == 0),
            "page {i}"
        );
        assert_eq!(m.vm_mem_state(h, i * PAGE), (0, NOPAGE, 0));
    }
    assert_eq!(m.read(FREE_2M + 6 * PAGE)[0], 0x46, "not relinquished");
    assert_eq!(
        m.guest_checked(s, func::MEM_RELINQUISH, 3 * PAGE, 1),
        DENIED,
        "gone"
    );
    // The slot owes 16 - 3 + 2 pages: destroy and reclaim them all.
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(m.reclaim(FREE_2M, 3), OK);
    assert_eq!(
        m.reclaim(FREE_2M + 3 * PAGE, 1),
        DENIED,
        "the host's already"
    );
    assert_eq!(m.reclaim(FREE_2M + 6 * PAGE, 10), OK);
}

#[test]
fn vm_share_and_unshare() {
    let m = Machine::small();
    let h = m.create(1);
    let pa = 0x4200_0000;
    m.fill(pa, 0x11);
    assert_eq!(m.share(h, pa, MIB2, 3), OK);
    assert_eq!(m.mem_state(pa).0, 0);
    assert_eq!(m.mem_state(pa).1, SHARED_OWNED);
    assert_ne!(m.mem_state(pa).2, 0, "the host keeps access");
    assert_eq!(
        m.vm_mem_state(h, MIB2 + PAGE),
        (pfn(pa) + 1, SHARED_BORROWED, PAGE)
    );
    assert_eq!(m.guest_checked(slot(h), func::MEM_SHARE, MIB2, 1), DENIED);
    assert_eq!(
        m.checked(func::HOST_PIN, &[pfn(pa), 1]),
        DENIED,
        "the host's own page"
    );
    assert_eq!(m.checked(func::HOST_SHARE_HYP, &[pfn(pa), 1]), DENIED);
    assert_eq!(m.checked(func::HOST_DONATE_HYP, &[pfn(pa), 1]), DENIED);
    assert_eq!(m.checked(func::VM_UNSHARE, &[h, MIB2, 4]), DENIED);
    assert_eq!(m.checked(func::VM_UNSHARE, &[h, MIB2 + 0x800, 1]), INVALID);
    assert_eq!(m.checked(func::VM_UNSHARE, &[h, MIB2, 0]), INVALID);
    assert_eq!(m.checked(func::VM_UNSHARE, &[h + 1, MIB2, 1]), INVALID);
    assert_eq!(m.checked(func::VM_UNSHARE, &[h, MIB2, 3]), OK);
    assert_eq!(
        m.mem_state(pa),
        (0, OWNED, MIB2),
        "the host block is whole again"
    );
    assert_eq!(m.vm_mem_state(h, MIB2), (0, NOPAGE, 0));
    assert_eq!(m.read(pa)[0], 0x11, "the host's page is not zeroed");
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(m.create(1), h, "nothing owed: the slot is free at once");
}

#[test]
fn destroy_then_reclaim_zeroes_every_page_and_frees_the_slot() {
    let m = Machine::small();
    let handles: Vec<u64> = (0..MAX_VMS).map(|_| m.create(2)).collect();
    let h = handles[3];
    let s = slot(h);
    let (a, b) = (FREE_2M, 0x4180_3000);
    assert_eq!(m.donate(h, a, 0, 512), OK);
    assert_eq!(m.donate(h, b, 0x100_0000, 20), OK);
    for p in (a..a + MIB2)
        .step_by(PAGE as usize)
        .chain((b..b + 20 * PAGE).step_by(PAGE as usize))
    {
        m.fill(p, 0xee);
    }
    assert_eq!(m.guest_checked(s, func::MEM_SHARE, 0x100_0000, 2), OK);
    assert_eq!(m.checked(func::HOST_PIN, &[pfn(b), 1]), OK);
    assert_eq!(m.checked(func::HOST_PIN, &[pfn(b), 1]), OK);
    assert_eq!(
        m.checked(func::HOST_PIN, &[pfn(b) + 1, 1]),
        OK,
        "kept through the reclaim"
    );
    let before = m.snapshot(&handles, 0);
    assert_eq!(m.reclaim(a, 1), DENIED, "live VM");
    assert_eq!(m.reclaim(b, 1), DENIED, "live VM, shared with the host");
    assert_eq!(
        m.reclaim(b - PAGE, 2),
        DENIED,
        "the host's own page, then a live VM's"
    );
    m.unchanged(&before, &handles, 0, "all or nothing");

    let tables = m.stat(stat::TABLE_PAGES);
    let (root, below) = m.vm_tables(h);
    let host_tables = m.host_tables();
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(
        m.stat(stat::TABLE_PAGES),
        tables,
        "VM_DESTROY touches no table (its cost does not grow with the VM)"
    );
    assert_eq!(m.checked(func::VM_MEM_STATE, &[h, 0]), INVALID);
    assert_eq!(
        m.checked(func::VM_DONATE, &[h, pfn(0x4200_0000), 0, 1]),
        INVALID
    );
    assert_eq!(m.mem_state(a), (h, NOPAGE, 0), "a dead VM's page");
    // The host's pins outlive the VM: it can drop them (one, here, after
    // pinning twice), not take new ones.
    assert_eq!(
        m.checked(func::HOST_PIN, &[pfn(b) + 1, 1]),
        DENIED,
        "a dead VM's page"
    );
    assert_eq!(
        m.checked(func::HOST_UNPIN, &[pfn(b), 1]),
        OK,
        "a pin taken before"
    );
    assert_eq!(m.checked(func::HOST_UNPIN, &[pfn(b), 1]), OK, "the other");
    assert_eq!(
        m.checked(func::HOST_UNPIN, &[pfn(b), 1]),
        DENIED,
        "no pin left"
    );
    assert_eq!(
        m.checked(func::HOST_PIN, &[pfn(b), 1]),
        DENIED,
        "no new pin"
    );
    assert_eq!(
        m.checked(func::VM_CREATE, &[1, 0]),
        NO_MEMORY,
        "the slot still owes pages"
    );
    assert_eq!(m.reclaim(a, 512), OK);
    assert_eq!(m.mem_state(a + PAGE), (0, OWNED, MIB2));
    assert_eq!(
        m.checked(func::VM_CREATE, &[1, 0]),
        NO_MEMORY,
        "20 pages still owed"
    );
    assert_eq!(
        m.reclaim(b, 20),
        OK,
        "pinned and shared pages of a dead VM too"
    );
    for p in (a..a + MIB2)
        .step_by(PAGE as usize)
        .chain((b..b + 20 * PAGE).step_by(PAGE as usize))
    {
        assert!(m.read(p).iter().all(|&x| x == 0), "{p:#x} zeroed");
        assert_eq!(m.mem_state(p).0, 0);
    }
    assert_eq!(m.reclaim(b, 1), DENIED, "already reclaimed");
    // Every table of the dead VM went back to the pool with its last page;
    // the host's own tables changed by what reclaiming into them took.
    assert_eq!(
        m.stat(stat::TABLE_PAGES) + (root + below) as u64 + host_tables,
        tables + m.host_tables(),
        "the dead VM's tables went back to the pool with its last page"
    );
    assert_eq!(m.create(1), h, "the slot is reused");
    assert_eq!(m.vm_mem_state(h, 0), (0, NOPAGE, 0), "a fresh VM");
}

/// The invariant checker finds a shared-page record that the host stage 2
/// or the VM table contradicts.
#[test]
fn the_invariant_checker_sees_stray_sharing_records() {
    use keel_hyp::lent::Direction;
    let stray = |m: &Machine| {
        let mem = m.hyp.mem.lock();
        let vms = m.hyp.vms.lock();
        mem.check_invariants(&*vms).err().map(|v| (v.what, v.addr))
    };
    const STRAY: &str =
        "shared-page record with no such sharing in the host stage 2 or the VM table";
    let m = Machine::small();
    let h = m.create(1);
    let s = slot(h) as u16;
    assert_eq!(m.donate(h, FREE_2M, 0, 4), OK);
    assert_eq!(m.guest_checked(slot(h), func::MEM_SHARE, 0, 1), OK);
    assert_eq!(stray(&m), None);
    // A record on a page the host owns alone, in either direction.
    let host_page = 0x4100_5000;
    for dir in [Direction::ToHost, Direction::ToGuest] {
        assert!(m.hyp.vms.lock().lent.insert(host_page / PAGE, s, dir));
        assert_eq!(stray(&m), Some((STRAY, host_page)), "{dir:?}");
        m.hyp.vms.lock().lent.remove(host_page / PAGE);
        assert_eq!(stray(&m), None);
    }
    // The guest's shared page recorded as lent the other way, or for a
    // slot with no VM.
    let shared = FREE_2M;
    let right = m.hyp.vms.lock().lent.remove(shared / PAGE).unwrap();
    assert!(m
        .hyp
        .vms
        .lock()
        .lent
        .insert(shared / PAGE, s, Direction::ToGuest));
    // (The page-side check sees these first: a borrowed page without a
    // lender of that direction, or with a free slot as its lender.)
    assert_eq!(stray(&m).map(|v| v.1), Some(shared), "the wrong way");
    m.hyp.vms.lock().lent.remove(shared / PAGE);
    assert!(m
        .hyp
        .vms
        .lock()
        .lent
        .insert(shared / PAGE, s + 1, Direction::ToHost));
    assert_eq!(stray(&m).map(|v| v.1), Some(shared), "a free slot");
    m.hyp.vms.lock().lent.remove(shared / PAGE);
    assert!(m
        .hyp
        .vms
        .lock()
        .lent
        .insert(shared / PAGE, right.vm, right.dir));
    assert_eq!(stray(&m), None);
}

#[test]
fn two_vms_cannot_touch_each_others_pages() {
    let m = Machine::small();
    let (a, b) = (m.create(1), m.create(1));
    assert_eq!(m.donate(a, FREE_2M, 0, 8), OK);
    assert_eq!(m.share(a, 0x4200_0000, 0x10_0000, 2), OK);
    assert_eq!(m.guest_checked(slot(a), func::MEM_SHARE, 0, 2), OK);
    assert_eq!(m.donate(b, 0x4180_0000, 0, 8), OK);
    let before = m.snapshot(&[a, b], MIB2);
    // The host cannot hand A's pages (private, shared with the host, or
    // the host's page lent to A) to B.
    for p in [FREE_2M, FREE_2M + 4 * PAGE, 0x4200_0000] {
        assert_eq!(m.donate(b, p, 0x20_0000, 1), DENIED);
        assert_eq!(m.share(b, p, 0x20_0000, 1), DENIED);
    }
    assert_eq!(m.checked(func::VM_UNSHARE, &[b, 0x10_0000, 1]), DENIED);
    // B's calls reach only B's IPA space: at IPA 0 B has its own pages.
    assert_eq!(m.guest_checked(slot(b), func::MEM_UNSHARE, 0, 2), DENIED);
    assert_eq!(
        m.guest_checked(slot(b), func::MEM_RELINQUISH, 0x10_0000, 1),
        DENIED
    );
    m.unchanged(&before, &[a, b], MIB2, "all or nothing");
    assert_eq!(m.guest_checked(slot(b), func::MEM_SHARE, 0, 1), OK);
    assert_eq!(m.mem_state(0x4180_0000), (b, SHARED_BORROWED, PAGE));
    assert_eq!(m.mem_state(FREE_2M), (a, SHARED_BORROWED, PAGE));
    assert_eq!(m.vm_mem_state(a, 0).0, pfn(FREE_2M));
    assert_eq!(m.vm_mem_state(b, 0).0, pfn(0x4180_0000));
    // Destroying A leaves B alone.
    assert_eq!(m.checked(func::VM_DESTROY, &[a]), OK);
    assert_eq!(m.reclaim(0x4180_0000, 1), DENIED, "B is alive");
    assert_eq!(m.vm_mem_state(b, 0), (pfn(0x4180_0000), SHARED_OWNED, PAGE));
}

/// A data abort: ISV, SAS = log2(size), SSE, SRT, SF, WnR; DFSC 0x07
/// (translation fault, level 3) unless `dfsc` says otherwise.
fn dabt(size: u64, sign: bool, reg: u64, sf: bool, write: bool, dfsc: u64) -> u64 {
    (0x24 << 26)
        | (1 << 25)
        | (1 << 24)
        | (size.trailing_zeros() as u64) << 22
        | u64::from(sign) << 21
        | reg << 16
        | u64::from(sf) << 15
        | u64::from(write) << 6
        | dfsc
}

#[test]
fn mmio_exits_and_completions() {
    let m = Machine::small();
    let h = m.create(1);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x8_0000, 0xabc]), OK);
    let ipa = 0x0900_0124u64;
    let (far, hpfar) = (0xffff_8000_1234_5124, (ipa >> 12) << 4);

    // A 4-byte write of x5: the value is truncated to the access size.
    let (t, v) = m.run(h, 0);
    assert_eq!(v.x[0], 0xabc, "x0 from VCPU_INIT");
    assert_eq!(v.pc, 0x8_0000);
    v.x[5] = 0x1122_3344_5566_7788;
    let a = m.trap(h, v, dabt(4, false, 5, true, true, 0x07), far, hpfar);
    assert_eq!(
        a,
        Action::Exit([exit::MMIO, ipa, 1 | 4 << 8 | 5 << 16, 0x5566_7788])
    );
    m.hyp.end_run(&t);

    // Completing the write skips the instruction; registers stay.
    let (t, v) = m.run(h, 0xdead);
    assert_eq!(v.pc, 0x8_0004);
    assert_eq!(v.x[5], 0x1122_3344_5566_7788);
    // Reads: (size, sign-extend, 64-bit register, completion) -> register.
    let reads = [
        (1, true, true, 0x180, 0xffff_ffff_ffff_ff80),
        (1, true, false, 0x80, 0xffff_ff80),
        (1, false, true, 0xff80, 0x80),
        (2, false, true, 0x12345, 0x2345),
        (2, true, true, 0x8001, 0xffff_ffff_ffff_8001),
        (4, true, true, 0x7fff_ffff, 0x7fff_ffff),
        (4, false, false, 0x1_8000_0000, 0x8000_0000),
        (8, false, true, u64::MAX - 1, u64::MAX - 1),
    ];
    let mut pc = 0x8_0004;
    let mut t = t;
    let mut v = v;
    for (i, (size, sign, sf, value, want)) in reads.into_iter().enumerate() {
        v.x[7] = 0x5555;
        let a = m.trap(h, v, dabt(size, sign, 7, sf, false, 0x06), 0x24, hpfar);
        assert_eq!(
            a,
            Action::Exit([exit::MMIO, (ipa & !0xfff) | 0x24, size << 8 | 7 << 16, 0]),
            "read {i}"
        );
        m.hyp.end_run(&t);
        (t, v) = m.run(h, value);
        pc += 4;
        assert_eq!((v.x[7], v.pc), (want, pc), "read {i}: {value:#x}");
    }
    // A read into xzr (SRT 31) changes no register.
    let x = v.x;
    m.trap(h, v, dabt(8, false, 31, true, false, 0x07), 0, hpfar);
    m.hyp.end_run(&t);
    let (t, v) = m.run(h, 0x99);
    assert_eq!((v.x, v.pc), (x, pc + 4));
    // An abort without a valid syndrome, or a permission fault: the guest
    // cannot continue.
    let esr = dabt(4, false, 1, true, false, 0x07) & !(1 << 24);
    assert_eq!(
        m.trap(h, v, esr, 0, hpfar),
        Action::Exit([exit::FAULT, esr, 0, 0])
    );
    m.hyp.end_run(&t);
    let r = m.hyp.begin_run(h, 0, 0).err().expect("failed for good");
    assert_eq!(r.regs[..3], [0, exit::FAULT, esr]);
    // The host cannot restart it: the VM has run.
    assert_eq!(
        m.checked(func::VCPU_INIT, &[h, 0, 0x8_0000, 0]),
        DENIED,
        "no reset by the host"
    );
    let r = m.hyp.begin_run(h, 0, 0).err().expect("still failed");
    assert_eq!(r.regs[..3], [0, exit::FAULT, esr]);
}

/// What a Linux guest asks before it uses the KVM vendor services:
/// PSCI_FEATURES(SMCCC_VERSION), SMCCC_VERSION (1.1), SMCCC_ARCH_FEATURES,
/// then FEATURES with all of x0..x3 (a 128-bit bitmap) and HYP_MEMINFO with
/// x1 = x2 = 0. keel answers each in place; none exits to the host.
#[test]
fn smccc_discovery_as_a_pkvm_guest_sees_it() {
    let m = Machine::small();
    let h = m.create(1);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x1000, 0]), OK);
    let (t, v) = m.run(h, 0);
    let mut call = |regs: &[u64], esr: u64| {
        v.x = [0x5a5a; 31];
        v.x[..regs.len()].copy_from_slice(regs);
        let a = m.trap(h, v, esr, 0, 0);
        (a, v.x)
    };
    for esr in [ESR_HVC, ESR_SMC] {
        let (a, x) = call(&[0x8400_000A, 0x8000_0000], esr);
        assert_eq!(
            (a, x[0]),
            (Action::Resume, 0),
            "PSCI_FEATURES(SMCCC_VERSION)"
        );
        // PSCI_FEATURES takes its function ID in w1.
        let (_, x) = call(&[0x8400_000A, 0x1_8000_0000], esr);
        assert_eq!(x[0], 0, "PSCI_FEATURES(SMCCC_VERSION) in w1");
        let (a, x) = call(&[0x8000_0000], esr);
        assert_eq!((a, x[0]), (Action::Resume, 0x1_0001), "SMCCC_VERSION");
        assert_eq!(x[1..18], [0x5a5a; 17], "SMCCC_VERSION keeps x1..x17");
        let (a, x) = call(&[0x8000_0001, 0x8000_8000], esr);
        assert_eq!(
            (a, x[0]),
            (Action::Resume, NOT_SUPPORTED as u64),
            "SMCCC_ARCH_FEATURES(ARCH_WORKAROUND_1)"
        );
    }
    // Function IDs are w0: the upper half of x0 is not looked at.
    let (a, x) = call(&[0x1_8000_0000], ESR_HVC);
    assert_eq!(
        (a, x[0]),
        (Action::Resume, 0x1_0001),
        "SMCCC_VERSION, x0[63:32] set"
    );
    // The other standard secure services and architecture calls stay in
    // keel (the host must not seed a guest's entropy, say): TRNG_VERSION,
    // TRNG_RND64, SDEI_VERSION, ARCH_WORKAROUND_1, SOC_ID.
    for id in [
        0x8400_0050,
        0xC400_0053,
        0xC400_0020,
        0x8000_8000,
        0x8000_0002,
    ] {
        for esr in [ESR_HVC, ESR_SMC] {
            let (a, x) = call(&[id], esr);
            assert_eq!(
                (a, x[0]),
                (Action::Resume, NOT_SUPPORTED as u64),
                "{id:#x} {esr:#x}"
            );
        }
    }
    // FEATURES: x0..x3 are the bitmap (functions 0..127); x4.. are kept.
    let (_, x) = call(&[func::FEATURES, 7, 7, 7], ESR_HVC);
    assert_eq!(x[..4], [keel_abi::FEATURES_BITMAP, 0, 0, 0]);
    assert_eq!(x[4..18], [0x5a5a; 14]);
    // HYP_MEMINFO: x1 = x2 = 0, or INVALID_PARAMETER.
    for (x1, x2, want) in [
        (0, 0, 4096),
        (1, 0, INVALID as u64),
        (0, 1, INVALID as u64),
        (u64::MAX, u64::MAX, INVALID as u64),
    ] {
        let (a, x) = call(&[func::HYP_MEMINFO, x1, x2, 9], ESR_HVC);
        assert_eq!(
            (a, x[0]),
            (Action::Resume, want),
            "HYP_MEMINFO({x1:#x}, {x2:#x})"
        );
        if want == 4096 {
            assert_eq!(x[1..4], [0; 3], "HYP_MEMINFO: x1..x3 = 0, as pKVM");
        }
    }
    m.hyp.end_run(&t);
    // Other owners' calls (the standard hypervisor services, SiP) and
    // yielding calls are the host's to answer.
    for id in [0xC500_0020u64, 0xC200_0001, 0x0400_0050] {
        let (t, v) = m.run(h, 0);
        v.x[..3].copy_from_slice(&[id, 1, 2]);
        let a = m.trap(h, v, ESR_HVC, 0, 0);
        assert_eq!(a, Action::Exit([exit::HYPERCALL, id, 1, 2]), "{id:#x}");
        m.hyp.end_run(&t);
    }
}

/// A vCPU that faults is Failed only once its run has ended: until the
/// CPU running it is done with it (end_run), it is Running, and its VM can
/// be neither destroyed nor set up from another CPU (else a new VM could
/// take the slot while the old run still writes the vCPU).
#[test]
fn a_faulting_vcpu_runs_until_its_run_ends() {
    let m = Machine::small();
    let h = m.create(1);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x1000, 0]), OK);
    let (t, v) = m.run(h, 0);
    // An instruction abort where the guest has no memory: FAULT.
    let esr = (0x20 << 26) | (1 << 25) | 0x07;
    let a = m.trap(h, v, esr, 0x1000, 0x10);
    assert_eq!(a, Action::Exit([exit::FAULT, esr, 0, 0]));
    assert_eq!(v.state, VcpuState::Running, "until end_run");
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), BUSY);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x1000, 0]), BUSY);
    assert_eq!(
        m.hyp.begin_run(h, 0, 0).err(),
        Some(Return::status(BUSY)),
        "a second run of it"
    );
    m.hyp.end_run(&t);
    // A VCPU_RUN that answers with the exit succeeds, and counts.
    let calls = m.stat(stat::HYPERCALLS);
    let r = m.hyp.begin_run(h, 0, 0).err().expect("failed");
    assert_eq!(r.regs[..3], [0, exit::FAULT, esr]);
    assert_eq!(
        m.stat(stat::HYPERCALLS),
        calls + 2,
        "the VCPU_RUN and this HYP_STATS"
    );
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
}

/// PSCI CPU_ON, CPU_OFF and AFFINITY_INFO from a guest: the guest (not
/// the host) starts its other vCPUs, at entries it chooses.
#[test]
fn guest_psci_starts_and_stops_its_vcpus() {
    const CPU_ON: u64 = 0xC400_0003;
    const CPU_OFF: u64 = 0x8400_0002;
    const AFFINITY_INFO: u64 = 0xC400_0004;
    const FEATURES: u64 = 0x8400_000A;
    const INVALID_PARAMETERS: u64 = -2i64 as u64;
    const ALREADY_ON: u64 = -4i64 as u64;
    const INVALID_ADDRESS: u64 = -9i64 as u64;
    let m = Machine::small();
    let h = m.create(3);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x1000, 0]), OK);
    let (t, v) = m.run(h, 0);
    let call = |v: &mut Vcpu, regs: &[u64]| {
        v.x[..4].copy_from_slice(&[0; 4]);
        v.x[..regs.len()].copy_from_slice(regs);
        let a = m.trap(h, v, ESR_HVC, 0, 0);
        (a, v.x[0])
    };
    for fid in [CPU_ON, CPU_OFF, AFFINITY_INFO] {
        assert_eq!(call(v, &[FEATURES, fid]).1, 0, "PSCI_FEATURES({fid:#x})");
    }
    assert_eq!(call(v, &[AFFINITY_INFO, 0]).1, 0, "vCPU 0 is on");
    assert_eq!(call(v, &[AFFINITY_INFO, 1]).1, 1, "vCPU 1 is off");
    assert_eq!(call(v, &[AFFINITY_INFO, 3]).1, INVALID_PARAMETERS);
    assert_eq!(
        call(v, &[AFFINITY_INFO, 1, 1]).1,
        INVALID_PARAMETERS,
        "level 1"
    );
    // Refused in place, nothing changes: no such vCPU, the caller itself, a
    // bad entry.
    for (regs, want) in [
        ([CPU_ON, 3, 0x2000, 0], INVALID_PARAMETERS),
        ([CPU_ON, 1 << 31 | 1, 0x2000, 0], INVALID_PARAMETERS),
        ([CPU_ON, 0, 0x2000, 0], ALREADY_ON),
        ([CPU_ON, 1, 0x2002, 0], INVALID_ADDRESS),
        ([CPU_ON, 1, 1 << 39, 0], INVALID_ADDRESS),
    ] {
        assert_eq!(call(v, &regs), (Action::Resume, want), "{regs:x?}");
    }
    assert_eq!(call(v, &[AFFINITY_INFO, 1]).1, 1, "still off");
    assert_eq!(
        m.hyp.begin_run(h, 1, 0).err(),
        Some(Return::status(INVALID)),
        "an off vCPU does not run"
    );
    // CPU_ON: the host hears of it (a HYPERCALL exit), and the vCPU starts
    // where the guest said, with its context ID in x0.
    assert_eq!(
        call(v, &[CPU_ON, 1, 0x2000, 0x55]).0,
        Action::Exit([exit::HYPERCALL, CPU_ON, 1, 0x2000])
    );
    m.hyp.end_run(&t);
    let (t, v) = m.run(h, 0);
    assert_eq!(v.x[0], 0, "the host's completion: SUCCESS");
    assert_eq!(call(v, &[CPU_ON, 1, 0x3000, 0]).1, ALREADY_ON);
    assert_eq!(call(v, &[AFFINITY_INFO, 1]).1, 0, "vCPU 1 is on");
    let t1 = m.hyp.begin_run(h, 1, 0xdead).expect("vCPU 1 runs");
    // SAFETY: Running: the ticket's vCPU is ours until end_run.
    let v1 = unsafe { &mut *t1.vcpu };
    assert_eq!((v1.pc, v1.x[0], v1.pstate), (0x2000, 0x55, 0x3c5));
    assert_eq!(v1.x[1..], [0; 30]);
    // Running elsewhere: still ALREADY_ON.
    assert_eq!(call(v, &[CPU_ON, 1, 0x3000, 0]).1, ALREADY_ON);
    // CPU_OFF: on until its run ends, then off; the host may not run it.
    assert_eq!(
        call(v1, &[CPU_OFF, 0x5ec, 0x5ec]).0,
        Action::Exit([exit::HYPERCALL, CPU_OFF, 0, 0]),
        "CPU_OFF: nothing of the guest's x1, x2 reaches the host"
    );
    assert_eq!(call(v, &[AFFINITY_INFO, 1]).1, 0, "on until the run ends");
    m.hyp.end_run(&t1);
    assert_eq!(call(v, &[AFFINITY_INFO, 1]).1, 1, "off");
    assert_eq!(
        m.hyp.begin_run(h, 1, 0).err(),
        Some(Return::status(INVALID))
    );
    // The SMC32 form takes w1..w3.
    assert_eq!(
        call(
            v,
            &[0x8400_0003, 1 << 32 | 2, 1 << 32 | 0x5000, 1 << 32 | 7]
        )
        .0,
        Action::Exit([exit::HYPERCALL, 0x8400_0003, 1 << 32 | 2, 0x5000])
    );
    m.hyp.end_run(&t);
    let t2 = m.hyp.begin_run(h, 2, 0).expect("vCPU 2");
    // SAFETY: as above.
    let v2 = unsafe { &mut *t2.vcpu };
    assert_eq!((v2.pc, v2.x[0]), (0x5000, 7));
    m.hyp.end_run(&t2);
    let (t, v) = m.run(h, 0);
    // And on again, afresh: nothing of its last life is kept.
    assert_eq!(
        call(v, &[CPU_ON, 1, 0x4000, 0x66]).0,
        Action::Exit([exit::HYPERCALL, CPU_ON, 1, 0x4000])
    );
    m.hyp.end_run(&t);
    let t1 = m.hyp.begin_run(h, 1, 0).expect("vCPU 1 again");
    // SAFETY: as above.
    let v1 = unsafe { &mut *t1.vcpu };
    assert_eq!((v1.pc, v1.x[0]), (0x4000, 0x66));
    assert_eq!(v1.x[1..], [0; 30]);
    m.hyp.end_run(&t1);
    // The host still cannot set registers (the VM has run).
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 2, 0x1000, 0]), DENIED);
}

/// A vCPU that runs where another vCPU of its VM ran last asks for that
/// CPU's TLB entries of the VMID to go first; the same vCPU again, or the
/// first of the VM there, does not.
#[test]
fn a_vcpu_that_follows_another_of_its_vm_on_a_cpu_flushes_that_cpu() {
    let m = Machine::small();
    let h = m.create(2);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x1000, 0]), OK);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 1, 0x1000, 0]), OK);
    // (vCPU, physical CPU, flush): the first vCPU of the VM on a CPU finds
    // nothing of its VMID there; the same vCPU again keeps its entries;
    // another vCPU of the VM drops them, on that CPU only.
    for (vcpu, cpu, flush) in [
        (0, 0, false),
        (0, 0, false),
        (1, 0, true),
        (1, 0, false),
        (1, 1, false),
        (0, 1, true),
        (0, 0, true),
        (1, 3, false),
        // A CPU past those tracked: flushed whenever another vCPU could
        // have run there.
        (1, usize::MAX, true),
        (0, keel_hyp::vm::MAX_CPUS, true),
    ] {
        let t = m.hyp.begin_run_on(h, vcpu, 0, cpu).expect("VCPU_RUN");
        assert_eq!(t.flush_local, flush, "vCPU {vcpu} on CPU {cpu:#x}");
        m.hyp.end_run(&t);
    }
    // A refused run records nothing: vCPU 0 ran last on CPU 0, and still
    // finds its own entries there after a refused run of a vCPU 2.
    assert!(m.hyp.begin_run_on(h, 2, 0, 0).is_err());
    let t = m.hyp.begin_run_on(h, 0, 0, 0).expect("VCPU_RUN");
    assert!(!t.flush_local, "a refused run changed the record");
    m.hyp.end_run(&t);
    // A VM of one vCPU never needs it, on any CPU.
    let one = m.create(1);
    assert_eq!(m.checked(func::VCPU_INIT, &[one, 0, 0x1000, 0]), OK);
    for cpu in [0, 0, 5, usize::MAX] {
        let t = m.hyp.begin_run_on(one, 0, 0, cpu).expect("VCPU_RUN");
        assert!(!t.flush_local, "CPU {cpu:#x}");
        m.hyp.end_run(&t);
    }
}

/// Once any vCPU of a VM has entered the guest, the host can no longer set
/// a vCPU's registers: VCPU_INIT is DENIED for every vCPU (run, initialized
/// and never run, or never initialized), and changes nothing. Before that
/// it may set them again and again.
#[test]
fn vcpu_init_is_refused_once_the_vm_has_run() {
    let m = Machine::small();
    let h = m.create(3);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x1000, 1]), OK);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x2000, 2]), OK, "again");
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 1, 0x3000, 3]), OK);
    // A VCPU_RUN that does not enter (a vCPU never initialized) starts
    // nothing.
    assert_eq!(
        m.hyp.begin_run(h, 2, 0).err(),
        Some(Return::status(INVALID))
    );
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 1, 0x3000, 4]), OK);
    let (t, v) = m.run(h, 0);
    assert_eq!((v.pc, v.x[0]), (0x2000, 2));
    v.pc = 0x2100;
    v.x[0] = 0x77;
    m.hyp.end_run(&t);
    for (i, what) in [
        (0, "the vCPU that ran"),
        (1, "initialized"),
        (2, "never initialized"),
    ] {
        assert_eq!(
            m.checked(func::VCPU_INIT, &[h, i, 0x4000, 9]),
            DENIED,
            "{what}"
        );
    }
    // Bad arguments are still INVALID_PARAMETER first.
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 3, 0x4000, 0]), INVALID);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x4002, 0]), INVALID);
    // Nothing changed: vCPU 0 resumes where it was, vCPU 1 starts where it
    // was set before the VM ran, vCPU 2 still cannot run.
    let (t, v) = m.run(h, 0);
    assert_eq!((v.pc, v.x[0]), (0x2100, 0x77));
    m.hyp.end_run(&t);
    let t = m.hyp.begin_run(h, 1, 0).expect("vCPU 1");
    // SAFETY: Running: the ticket's vCPU is ours until end_run.
    let v = unsafe { &mut *t.vcpu };
    assert_eq!((v.pc, v.x[0]), (0x3000, 4));
    m.hyp.end_run(&t);
    assert_eq!(
        m.hyp.begin_run(h, 2, 0).err(),
        Some(Return::status(INVALID))
    );
    // Another VM is not affected.
    let h2 = m.create(1);
    assert_eq!(m.checked(func::VCPU_INIT, &[h2, 0, 0x1000, 0]), OK);
    assert_eq!(m.checked(func::VCPU_INIT, &[h2, 0, 0x1000, 0]), OK);
}

#[test]
fn hypercall_exits_and_guest_calls() {
    let m = Machine::small();
    let h = m.create(2);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 1, 0x1000, 0]), OK);
    let t = m.hyp.begin_run(h, 1, 0).expect("run vCPU 1");
    // SAFETY: Running: the ticket's vCPU is ours until end_run.
    let v = unsafe { &mut *t.vcpu };
    v.pc = 0x2004;
    v.x[..6].copy_from_slice(&[0xC600_0050, 11, 22, 33, 44, 55]);
    assert_eq!(
        m.trap(h, v, ESR_HVC, 0, 0),
        Action::Exit([exit::HYPERCALL, 0xC600_0050, 11, 22])
    );
    m.hyp.end_run(&t);
    let t = m.hyp.begin_run(h, 1, 0x1234).expect("run");
    // SAFETY: as above.
    let v = unsafe { &mut *t.vcpu };
    assert_eq!(
        (v.x[0], v.x[1], v.pc),
        (0x1234, 11, 0x2004),
        "x3 of VCPU_RUN lands in x0"
    );
    // Calls the hypervisor answers in place.
    let guest = |v: &mut Vcpu, id: u64, esr: u64| {
        v.x[..3].copy_from_slice(&[id, 0, 0]);
        let a = m.trap(h, v, esr, 0, 0);
        (a, v.x[0])
    };
    assert_eq!(guest(v, func::HYP_MEMINFO, ESR_HVC), (Action::Resume, 4096));
    assert_eq!(
        guest(v, func::FEATURES, ESR_HVC).1,
        keel_abi::FEATURES_BITMAP
    );
    for id in [func::VM_CREATE, func::MEM_STATE, func::HOST_RECLAIM]
        .into_iter()
        .chain(func::KEEL_CALLS)
    {
        assert_eq!(
            guest(v, id, ESR_HVC),
            (Action::Resume, NOT_SUPPORTED as u64),
            "{id:#x}"
        );
    }
    assert_eq!(
        guest(v, func::HYP_MEMINFO, ESR_HVC | 1),
        (Action::Resume, NOT_SUPPORTED as u64),
        "HVC #1"
    );
    // PSCI over SMC: VERSION in place, SYSTEM_OFF exits for good.
    v.pc = 0x3000;
    assert_eq!(guest(v, 0x8400_0000, ESR_SMC), (Action::Resume, 0x1_0000));
    assert_eq!(v.pc, 0x3004, "the SMC is stepped over");
    assert_eq!(guest(v, 0x8400_0001, ESR_SMC).1, NOT_SUPPORTED as u64);
    assert_eq!(
        guest(v, 0x8400_0008, ESR_SMC).0,
        Action::Exit([exit::SYSTEM_OFF, 0, 0, 0])
    );
    m.hyp.end_run(&t);
    let r = m.hyp.begin_run(h, 1, 0).err().expect("off");
    assert_eq!(r.regs[..3], [0, exit::SYSTEM_OFF, 0]);
    // An IRQ exits without touching the vCPU.
    let h2 = m.create(1);
    assert_eq!(m.checked(func::VCPU_INIT, &[h2, 0, 0, 0]), OK);
    let (t, v) = m.run(h2, 0);
    v.x[0] = 0x8400_0009;
    assert_eq!(
        m.trap(h2, v, ESR_SMC, 0, 0),
        Action::Exit([exit::SYSTEM_OFF, 1, 0, 0])
    );
    m.hyp.end_run(&t);
    assert_eq!(
        m.hyp.begin_run(h2, 0, 0).err().unwrap().regs[..3],
        [0, exit::SYSTEM_OFF, 1]
    );
    assert_eq!(m.checked(func::VM_DESTROY, &[h2]), OK);
    m.assert_invariants("exits");
}

#[test]
fn bad_handles_and_vcpu_indices() {
    let m = Machine::small();
    let h = m.create(2);
    let bad = [
        0,
        0xfff,
        0x1001,
        0x1000 + MAX_VMS as u64,
        u64::MAX,
        0x1_0000_1000,
    ];
    for b in bad {
        assert_eq!(m.checked(func::VCPU_INIT, &[b, 0, 0, 0]), INVALID);
        assert_eq!(m.checked(func::VM_MEM_STATE, &[b, 0]), INVALID);
        assert_eq!(m.checked(func::VM_UNSHARE, &[b, 0, 1]), INVALID);
        assert_eq!(m.checked(func::VM_DESTROY, &[b]), INVALID);
        let r = m.hyp.begin_run(b, 0, 0).err().expect("refused");
        assert_eq!(r, Return::status(INVALID), "{b:#x}");
    }
    for i in [2, 3, MAX_VCPUS as u64, u64::MAX] {
        assert_eq!(
            m.checked(func::VCPU_INIT, &[h, i, 0, 0]),
            INVALID,
            "vCPU {i}"
        );
        assert_eq!(
            m.hyp.begin_run(h, i, 0).err(),
            Some(Return::status(INVALID))
        );
    }
    for entry in [2, (1 << 39) + 4, !3] {
        assert_eq!(
            m.checked(func::VCPU_INIT, &[h, 0, entry, 0]),
            INVALID,
            "{entry:#x}"
        );
    }
    assert_eq!(
        m.hyp.begin_run(h, 1, 0).err(),
        Some(Return::status(INVALID)),
        "never initialized"
    );
    assert_eq!(m.checked(func::VM_MEM_STATE, &[h, 0x800]), INVALID);
    assert_eq!(m.checked(func::VM_MEM_STATE, &[h, 1 << 39]), INVALID);
    // A running vCPU: BUSY for VCPU_INIT, VCPU_RUN and VM_DESTROY.
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 1, 0, 0]), OK);
    let t = m.hyp.begin_run(h, 1, 0).expect("run");
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 1, 0, 0]), BUSY);
    assert_eq!(m.hyp.begin_run(h, 1, 0).err(), Some(Return::status(BUSY)));
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), BUSY);
    m.hyp.end_run(&t);
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(
        m.checked(func::VCPU_INIT, &[h, 0, 0, 0]),
        INVALID,
        "destroyed"
    );
    for idx in [stat::COUNT, u64::MAX] {
        assert_eq!(m.checked(func::HYP_STATS, &[idx]), INVALID);
    }
    assert_eq!(
        m.checked(func::VCPU_RUN, &[h, 0, 0]),
        NOT_SUPPORTED,
        "not through host_hvc"
    );
}

#[test]
fn refused_calls_change_nothing_including_no_memory() {
    let m = Machine::small();
    let (a, b) = (m.create(1), m.create(1));
    assert_eq!(m.donate(a, FREE_2M, 0, 512), OK);
    assert_eq!(m.donate(a, 0x4140_0000, MIB2, 8), OK);
    assert_eq!(m.share(a, 0x4180_0000, 0x40_0000, 4), OK);
    assert_eq!(m.guest_checked(slot(a), func::MEM_SHARE, MIB2, 2), OK);
    assert_eq!(m.checked(func::HOST_PIN, &[pfn(0x4140_1000), 1]), OK);
    let handles = [a, b];
    let before = m.snapshot(&handles, 3 * MIB2);
    let hcalls = m.stat(stat::HYPERCALLS);
    let host: &[(u64, &[u64], i64)] = &[
        (func::HOST_RECLAIM, &[pfn(0x4140_0000), 8], DENIED),
        (func::HOST_RECLAIM, &[pfn(0x4180_0000), 1], DENIED),
        (func::VM_UNSHARE, &[a, 0x40_0000, 5], DENIED),
        (func::VM_UNSHARE, &[a, 0x3f_f000, 2], DENIED),
        (func::HOST_PIN, &[pfn(0x4140_0000), 3], DENIED),
        (func::HOST_UNPIN, &[pfn(0x4140_0000), 2], DENIED),
        (func::HOST_SHARE_HYP, &[pfn(0x4180_0000) - 1, 2], DENIED),
        (
            func::VM_DONATE,
            &[b, pfn(0x4180_3000), 0x10_0000, 2],
            DENIED,
        ),
        (func::VM_SHARE, &[a, pfn(0x4200_0000), 0x1f_f000, 2], DENIED),
    ];
    for &(id, args, want) in host {
        assert_eq!(m.checked(id, args), want, "{id:#x} {args:x?}");
    }
    for (id, ipa, nr, want) in [
        (func::MEM_SHARE, MIB2 + PAGE, 2, DENIED),
        (func::MEM_UNSHARE, MIB2 + PAGE, 2, BUSY),
        (func::MEM_UNSHARE, MIB2 + 2 * PAGE, 1, DENIED),
        (func::MEM_UNSHARE, 0x20_0000, 2, BUSY),
        (func::MEM_RELINQUISH, 0x20_0000, 2, BUSY),
        (func::MEM_RELINQUISH, 0x3f_f000, 2, DENIED),
        (func::MEM_RELINQUISH, MIB2 + 6 * PAGE, 3, DENIED),
    ] {
        assert_eq!(
            m.guest_checked(slot(a), id, ipa, nr),
            want,
            "{id:#x} {ipa:#x} {nr}"
        );
    }
    // Starve the pool: every call that needs a table page is refused.
    let mut held = vec![];
    while let Ok(p) = m.hyp.mem.lock().pool.alloc_zeroed() {
        held.push(p);
    }
    for (id, args) in [
        (func::VM_DONATE, &[b, pfn(0x4200_1000), 0x30_0000, 2][..]),
        (func::VM_SHARE, &[b, pfn(0x4200_1000), 0x30_0000, 2]),
        (func::VM_CREATE, &[1, 0]),
        (func::HOST_SHARE_HYP, &[pfn(0x4200_1000), 1]),
    ] {
        assert_eq!(m.st(id, args), NO_MEMORY, "{id:#x} {args:x?}");
    }
    assert_eq!(
        m.guest_st(slot(a), func::MEM_SHARE, 0x10_0000, 1),
        NO_MEMORY
    );
    assert_eq!(
        m.guest_st(slot(a), func::MEM_RELINQUISH, 0x10_0000, 1),
        NO_MEMORY
    );
    for p in held {
        // SAFETY: allocated above and never used.
        unsafe { m.hyp.mem.lock().pool.free(p) };
    }
    m.assert_invariants("pool refilled");
    m.unchanged(&before, &handles, 3 * MIB2, "all or nothing");
    // Only the successful calls were counted (the two above, plus the
    // snapshot's own MEM_STATE/HYP_STATS/VM_MEM_STATE and checks).
    assert!(m.stat(stat::HYPERCALLS) > hcalls);
}

#[test]
fn hypercalls_are_counted_only_when_they_succeed() {
    let m = Machine::small();
    let n = m.stat(stat::HYPERCALLS);
    // HYP_STATS itself succeeded: +1.
    assert_eq!(m.st(func::VM_CREATE, &[0, 0]), INVALID);
    assert_eq!(m.st(func::VM_DESTROY, &[0x1000]), INVALID);
    assert_eq!(m.stat(stat::HYPERCALLS), n + 1);
    let h = m.create(1); // +1, and its invariant check +1
    assert_eq!(m.guest_st(slot(h), func::MEM_RELINQUISH, 0, 1), DENIED);
    assert_eq!(m.stat(stat::HYPERCALLS), n + 4);
    assert_eq!(m.stat(stat::HOST_ABORTS), 0);
}

// ---- Disagreements with ABI.md these tests found, fixed in 6000d8e ----
// (each comment is the diagnosis as it was made; the tests keep them fixed)

// Was a BUG: host pages shared into a VM (VM_SHARE) can never come back once the
// VM is destroyed. ABI.md: HOST_RECLAIM returns "pages of destroyed VMs",
// and VM_DESTROY makes "all its pages reclaimable"; vm.rs `reclaim` means to
// return such pages "as they are" (owner::Page::LentToDead), but
// mem.rs `Memory::page` reads every host SHARED_OWNED leaf as
// `Page::SharedWithGuest(u16::MAX)` without asking whether the borrower is
// dead, so `transition(.., HostReclaim)` is DENIED. VM_UNSHARE is INVALID
// too (the VM is not live), so the pages stay SHARED_OWNED forever, the
// slot stays Dead (its `pages` never reach 0) and is never reused.
#[test]
fn fixed_host_pages_lent_to_a_destroyed_vm_are_reclaimable() {
    let m = Machine::small();
    let handles: Vec<u64> = (0..MAX_VMS).map(|_| m.create(1)).collect();
    let h = handles[0];
    assert_eq!(m.share(h, 0x4200_0000, 0, 1), OK);
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(
        m.reclaim(0x4200_0000, 1),
        OK,
        "returned to the host as it is"
    );
    assert_eq!(m.mem_state(0x4200_0000).1, OWNED);
    assert_eq!(m.create(1), h, "nothing owed: the slot is reusable");
}

// Was a BUG: VM_UNSHARE of a range the guest maps with more than 64 leaves is
// refused with INVALID_PARAMETER (vm.rs `VmOps::unshare`: `runs` is a fixed
// array of 64 and "More fragments than one call handles"). ABI.md allows
// INVALID_PARAMETER only for misaligned, zero-length, overflowing or
// out-of-space ranges and bad handles; VM_UNSHARE is the "reverse of
// VM_SHARE", which accepted the same range. Reproduction: VM_SHARE 65 pages
// at a pfn/IPA pair not congruent mod 2 MiB (65 4K leaves), then VM_UNSHARE
// the same 65 pages.
#[test]
fn fixed_vm_unshare_of_many_4k_leaves() {
    let m = Machine::small();
    let h = m.create(1);
    assert_eq!(m.share(h, 0x4200_0000, 0x1000, 65), OK);
    assert_eq!(m.checked(func::VM_UNSHARE, &[h, 0x1000, 65]), OK);
}

// Was a BUG: after VM_DESTROY, a page the dead guest had shared with the host
// (MEM_SHARE) is reported by MEM_STATE as NOPAGE (owner the dead handle)
// while the host stage 2 still maps it (x3 = 4096), and the host can keep
// reading and writing it until HOST_RECLAIM. ABI.md: MEM_STATE x2 is the
// host's state and x3 the size of the host mapping (0 if unmapped); a host
// access to a page it "neither owns nor borrows never reaches the page".
// Either the page stays SHARED_BORROWED until reclaimed, or VM_DESTROY
// removes the host's mapping (mem.rs `Memory::page` maps a dead lender to
// Page::Dead, whose host view is NOPAGE, but nothing unmaps it).
#[test]
fn fixed_dead_vm_shared_page_is_nopage_but_host_mapped() {
    let m = Machine::small();
    let h = m.create(1);
    assert_eq!(m.donate(h, FREE_2M, 0, 1), OK);
    assert_eq!(m.guest_checked(slot(h), func::MEM_SHARE, 0, 1), OK);
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    let (_, state, size) = m.mem_state(FREE_2M);
    assert_eq!(
        state == NOPAGE,
        size == 0,
        "MEM_STATE says {state} with a {size}-byte host mapping"
    );
}

// Was a BUG: guest MEM_SHARE and MEM_UNSHARE of a range with an unmapped IPA (in
// the guest's IPA space, 4K aligned) return INVALID_PARAMETER instead of
// DENIED. ABI.md: INVALID_PARAMETER is for misaligned, zero-length or
// overflowing ranges and IPAs outside the IPA space; a page "not in the
// state ... the call requires" is DENIED, which MEM_RELINQUISH returns for
// the same range. Cause: vm.rs `guest_share`/`guest_unshare` compute
// `vm.s2.pages_needed(.., Change::State(..))` before walking the range with
// `mapped_runs` (whose unmapped case is DENIED); the engine refuses a state
// change on an unmapped range with MmError::NotMapped, which `mm()` maps to
// CallError::Invalid.
#[test]
fn fixed_guest_share_of_unmapped_ipa_is_denied() {
    let m = Machine::small();
    let h = m.create(1);
    assert_eq!(m.guest_checked(slot(h), func::MEM_SHARE, 0, 1), DENIED);
    assert_eq!(m.guest_checked(slot(h), func::MEM_UNSHARE, 0, 1), DENIED);
    assert_eq!(m.guest_checked(slot(h), func::MEM_RELINQUISH, 0, 1), DENIED);
    assert_eq!(m.donate(h, FREE_2M, 0, 1), OK);
    assert_eq!(
        m.guest_checked(slot(h), func::MEM_SHARE, 0, 2),
        DENIED,
        "last page unmapped"
    );
}

/// Shared memory is bounded by RAM, not by a table: a guest shares 4096
/// pages at once (16 MiB, twice what the old fixed table held) and one more
/// page by the page path, and every one of them is the host's to read.
#[test]
fn a_guest_shares_more_than_a_fixed_table_would_hold() {
    let m = Machine::small();
    let h = m.create(1);
    let s = slot(h);
    let pages = 4096 + 512;
    assert_eq!(m.donate(h, 0x4200_0000, 0, pages), OK);
    assert_eq!(m.guest_checked(s, func::MEM_SHARE, 0, 4096), OK);
    assert_eq!(m.guest_checked(s, func::MEM_SHARE, 4096 * PAGE, 1), OK);
    for p in [0, 1, 2047, 2048, 4095, 4096] {
        let (owner, state, _) = m.mem_state(0x4200_0000 + p * PAGE);
        assert_eq!((owner, state), (h, SHARED_BORROWED), "page {p}");
    }
    assert_eq!(m.vm_mem_state(h, 4097 * PAGE).1, OWNED);
    assert_eq!(m.checked(func::HOST_PIN, &[pfn(0x4200_0000) + 4000, 1]), OK);
    assert_eq!(m.guest_checked(s, func::MEM_UNSHARE, 0, 4097), BUSY);
    assert_eq!(
        m.checked(func::HOST_UNPIN, &[pfn(0x4200_0000) + 4000, 1]),
        OK
    );
    assert_eq!(m.guest_checked(s, func::MEM_UNSHARE, 0, 4097), OK);
    assert_eq!(m.vm_mem_state(h, 4000 * PAGE).1, OWNED);
}

/// A page the lent-page table does not cover (here: a table attached over
/// the first half of RAM only) cannot be shared either way: NO_MEMORY, and
/// nothing changes; pages it covers still can be.
#[test]
fn shares_of_pages_the_lent_table_does_not_cover_change_nothing() {
    let m = Machine::small();
    let half = m.cfg.ram_size / PAGE / 2;
    let words = Box::leak(vec![0u32; half as usize].into_boxed_slice());
    let ram = RamFrames::one(RAM_BASE / PAGE, half);
    m.hyp.vms.lock().lent.attach(ram, words);
    let end = RAM_BASE + half * PAGE;
    let h = m.create(1);
    let s = slot(h);
    // Eight pages below the end of the table and eight past it, at IPA 0.
    assert_eq!(m.donate(h, end - 8 * PAGE, 0, 16), OK);
    let before = m.snapshot(&[h], 16 * PAGE);
    for (ipa, nr, what) in [
        (8 * PAGE, 1, "one page past the table"),
        (15 * PAGE, 1, "the last page"),
        (0, 16, "a range ending past the table"),
        (7 * PAGE, 2, "two pages across its end"),
    ] {
        assert_eq!(
            m.guest_checked(s, func::MEM_SHARE, ipa, nr),
            NO_MEMORY,
            "{what}"
        );
        m.unchanged(&before, &[h], 16 * PAGE, what);
    }
    assert_eq!(
        m.checked(func::VM_SHARE, &[h, pfn(end + MIB2), 0x10_0000, 1]),
        NO_MEMORY,
        "a host page past the table"
    );
    m.unchanged(&before, &[h], 16 * PAGE, "VM_SHARE past the table");
    assert_eq!(m.guest_checked(s, func::MEM_SHARE, 0, 8), OK);
    assert_eq!(m.mem_state(end - PAGE), (h, SHARED_BORROWED, PAGE));
    assert_eq!(
        m.checked(func::VM_SHARE, &[h, pfn(FREE_2M), 0x10_0000, 1]),
        OK
    );
}

/// HOST_RECLAIM whose range cuts a 2 MiB block of the hypervisor's stage 1
/// allocates a table to split it: that table must not be one of the
/// range's own donated pages (found by a review: they used to leave the
/// pool one run at a time, after the split had taken one of them, which
/// then went to the host while still a live stage-1 table).
#[test]
fn reclaim_never_hands_the_host_a_table_it_allocates() {
    let m = Machine::small();
    let b = FREE_2M;
    let (x, d) = (b + MIB2, b + MIB2 + PAGE);
    let h = m.create(1);
    assert_eq!(m.donate(h, x, 0, 1), OK);
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(m.checked(func::HOST_DONATE_HYP, &[pfn(b), 512]), OK);
    assert_eq!(m.checked(func::HOST_DONATE_HYP, &[pfn(d), 1]), OK);
    // Every free donated page in use but the last of the block and `d`.
    let mut held = vec![];
    {
        let mut mem = m.hyp.mem.lock();
        while mem.pool.donated_pages().any(|(_, used)| !used) {
            held.push(mem.pool.alloc_zeroed().unwrap());
        }
        for pa in [b + MIB2 - PAGE, d] {
            // SAFETY: allocated just above and never used.
            unsafe { mem.pool.free(pa) };
            held.retain(|&p| p != pa);
        }
    }
    // The last page of the block, the dead guest's page, `d` (unchecked:
    // the held pages are neither free nor tables until freed below).
    assert_eq!(m.st(func::HOST_RECLAIM, &[pfn(b + MIB2 - PAGE), 3]), OK);
    {
        let mem = m.hyp.mem.lock();
        assert!(
            mem.hyp.translate(b, &mem.pool).is_some(),
            "the rest of the block stays mapped"
        );
        assert_eq!(mem.pool.donated_in_use(pfn(d)), None, "d left the pool");
    }
    for pa in [b + MIB2 - PAGE, x, d] {
        let (owner, view, _) = m.mem_state(pa);
        assert_eq!((owner, view), (0, OWNED), "{pa:#x} is the host's");
        assert!(m.read(pa).iter().all(|&v| v == 0), "{pa:#x} reads zero");
    }
    let mut mem = m.hyp.mem.lock();
    for p in held {
        // SAFETY: allocated above and never used.
        unsafe { mem.pool.free(p) };
    }
    drop(mem);
    m.assert_invariants("after freeing the held pages");
}

/// Once a guest has read its ID registers, a CPU that would narrow what
/// they said is refused (and changes nothing); before, it narrows them.
#[test]
fn a_cpu_with_less_than_guests_read_stays_out() {
    use keel_hyp::sysreg::{aa64_index, sysreg_esr, NarrowerCpu, AA64_ID_REGS};
    let pfr0 = aa64_index(4, 0);
    // Two kinds of CPU: one with DIT (ID_AA64PFR0_EL1 bits 48..51), one
    // without.
    let mut with_dit = [0u64; AA64_ID_REGS];
    with_dit[pfr0] = 0x11 | 1 << 48;
    let mut without = with_dit;
    without[pfr0] &= !(0xf << 48);
    let dit = |m: &Machine| (m.hyp.guest_ids.lock().read(4, 0) >> 48) & 0xf;
    for guest_reads in [false, true] {
        let m = Machine::small();
        assert_eq!(m.hyp.guest_ids.lock().add_cpu(&with_dit), Ok(()));
        assert_eq!(dit(&m), 1);
        let h = m.create(1);
        if guest_reads {
            let mut vcpu = Vcpu::new();
            vcpu.state = VcpuState::Running;
            // MRS x3, ID_AA64PFR0_EL1.
            let esr = sysreg_esr(3, 0, 0, 4, 0, 3, true);
            assert_eq!(m.trap(h, &mut vcpu, esr, 0, 0), Action::Resume);
            assert_eq!((vcpu.x[3] >> 48) & 0xf, 1, "the guest read DIT");
        }
        let late = m.hyp.guest_ids.lock().add_cpu(&without);
        if guest_reads {
            assert_eq!(late, Err(NarrowerCpu), "a CPU without DIT after the read");
            assert_eq!(dit(&m), 1, "the view the guest read stands");
        } else {
            assert_eq!(late, Ok(()), "no guest has read the view yet");
            assert_eq!(dit(&m), 0);
        }
    }
}

/// A trapped MSR/MRS: ID registers answered from the sanitized copy, debug
/// and PMU registers RAZ/WI, anything else an undefined instruction for
/// the guest (not a FAULT); SVE and SME traps too. The vCPU never fails.
#[test]
fn guest_system_register_traps() {
    let m = Machine::small();
    let h = m.create(1);
    use keel_hyp::sysreg::sysreg_esr as sysreg;
    let trap = |esr: u64| {
        let mut vcpu = Vcpu::new();
        vcpu.pc = 0x1000;
        vcpu.x[3] = 0xdead;
        vcpu.state = VcpuState::Running;
        let a = m.trap(h, &mut vcpu, esr, 0, 0);
        assert_eq!(vcpu.state, VcpuState::Running, "ESR {esr:#x}");
        (a, vcpu.pc, vcpu.x[3])
    };
    // MRS x3, ID_AA64PFR0_EL1: the guest's view (the machine's CPU
    // registers were never read: AArch64 EL0/EL1 alone).
    assert_eq!(
        trap(sysreg(3, 0, 0, 4, 0, 3, true)),
        (Action::Resume, 0x1004, m.hyp.guest_ids.lock().read(4, 0))
    );
    assert_eq!(m.hyp.guest_ids.lock().read(4, 0), 0x11);
    // MRS x3, PMCR_EL0 and MDSCR_EL1: zero; MSR MDSCR_EL1, x3: ignored.
    assert_eq!(
        trap(sysreg(3, 3, 9, 12, 0, 3, true)),
        (Action::Resume, 0x1004, 0)
    );
    assert_eq!(
        trap(sysreg(2, 0, 0, 2, 2, 3, true)),
        (Action::Resume, 0x1004, 0)
    );
    assert_eq!(
        trap(sysreg(2, 0, 0, 2, 2, 3, false)),
        (Action::Resume, 0x1004, 0xdead)
    );
    // MRS x3, ACTLR_EL1: an undefined instruction, at the same PC.
    let actlr = sysreg(3, 0, 1, 0, 1, 3, true);
    assert_eq!(trap(actlr), (Action::Undefined(actlr), 0x1000, 0xdead));
    // SVE, SME and LS64 instructions (EC 0x19, 0x1D, 0x0A).
    for esr in [0x19u64, 0x1d, 0x0a].map(|ec| (ec << 26) | (1 << 25)) {
        assert_eq!(trap(esr), (Action::Undefined(esr), 0x1000, 0xdead));
    }
}

/// KEEL_VCPU_IRQ: each bad argument, an unstarted vCPU and a running one
/// are refused and leave the vCPU's interrupts as they were; a good call
/// queues the interrupt, which the next entry puts in a list register, and
/// the guest cannot make the call.
#[test]
fn vcpu_irq_checks_its_arguments_and_the_vcpu() {
    let m = Machine::small();
    let h = m.create(2);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x1000, 0]), OK);
    let irq = |args: [u64; 4]| m.checked(func::KEEL_VCPU_IRQ, &args);
    assert_eq!(irq([h, 0, 40, 0x80]), OK);
    let queued = |m: &Machine| {
        let (t, v) = m.run(h, 0);
        let n = v.vgic.queued();
        m.hyp.end_run(&t);
        n
    };
    for (args, want, what) in [
        ([0, 0, 41, 0x80], INVALID, "handle 0"),
        ([h + 1, 0, 41, 0x80], INVALID, "a handle without a VM"),
        ([h, 2, 41, 0x80], INVALID, "a vCPU past the VM's"),
        ([h, u64::MAX, 41, 0x80], INVALID, "vCPU index u64::MAX"),
        ([h, 1, 41, 0x80], INVALID, "a vCPU never started"),
        ([h, 0, 1020, 0x80], INVALID, "INTID 1020 (special)"),
        ([h, 0, 1 << 32 | 41, 0x80], INVALID, "INTID past 32 bits"),
        (
            [h, 0, keel_abi::VTIMER_INTID, 0x80],
            INVALID,
            "the virtual timer's INTID",
        ),
        ([h, 0, 41, 0x100], INVALID, "priority 256"),
    ] {
        assert_eq!(irq(args), want, "{what}");
    }
    assert_eq!(queued(&m), 1, "only INTID 40 waits");
    let (t, v) = m.run(h, 0);
    assert_eq!(irq([h, 0, 41, 0x80]), BUSY, "the vCPU runs");
    assert_eq!(v.vgic.queued(), 1);
    m.hyp.end_run(&t);
    // The guest's own call for it is not supported.
    let (a, x) = m.guest_hvc(slot(h), func::KEEL_VCPU_IRQ, &[h, 0, 41, 0x80]);
    assert_eq!((a, x[0] as i64), (Action::Resume, NOT_SUPPORTED));
    assert_eq!(queued(&m), 1);
    assert_eq!(irq([h, 0, 41, 0x80]), OK);
    assert_eq!(queued(&m), 2);
    assert_eq!(m.checked(func::VM_DESTROY, &[h]), OK);
    assert_eq!(irq([h, 0, 42, 0x80]), INVALID, "a destroyed VM");
}

/// A guest's write to an SGI generation register ends the run with an SGI
/// exit (the value and the register), the write stepped over; a read of
/// one, or of a register next to them, is not an SGI.
#[test]
fn a_guest_sgi_exits_to_the_host() {
    let m = Machine::small();
    let h = m.create(1);
    use keel_abi::exit::sgi;
    use keel_hyp::sysreg::sysreg_esr as sysreg;
    let trap = |esr: u64| {
        let mut vcpu = Vcpu::new();
        vcpu.pc = 0x1000;
        vcpu.x[3] = 0x0100_0000_0001_0002;
        vcpu.state = VcpuState::Running;
        let a = m.trap(h, &mut vcpu, esr, 0, 0);
        (a, vcpu.pc, vcpu.pending)
    };
    let value = 0x0100_0000_0001_0002;
    for ((op1, op2), which) in [
        ((0, 5), sgi::SGI1R),
        ((1, 6), sgi::ASGI1R),
        ((2, 7), sgi::SGI0R),
    ] {
        let (a, pc, pending) = trap(sysreg(3, op1, 12, 11, op2, 3, false));
        assert_eq!(a, Action::Exit([exit::SGI, value, which, 0]), "{which}");
        assert_eq!(pc, 0x1004, "the write is stepped over");
        assert!(matches!(pending, keel_hyp::vm::Pending::None));
        // MSR from XZR: 0.
        let (a, _, _) = trap(sysreg(3, op1, 12, 11, op2, 31, false));
        assert_eq!(a, Action::Exit([exit::SGI, 0, which, 0]));
        // A read is not an SGI (these registers are write-only).
        let (a, pc, _) = trap(sysreg(3, op1, 12, 11, op2, 3, true));
        assert!(matches!(a, Action::Undefined(_)), "read of {which}: {a:?}");
        assert_eq!(pc, 0x1000);
    }
    // ICC_SGI1R_EL1's neighbours (ICC_ASGI1R's op2 under op1 0, ...).
    for (op1, op2) in [(0, 6), (0, 4), (1, 5), (2, 5)] {
        let (a, _, _) = trap(sysreg(3, op1, 12, 11, op2, 3, false));
        assert!(matches!(a, Action::Undefined(_)), "({op1}, {op2}): {a:?}");
    }
}

/// KEEL_VCPU_VTIMER: refused like KEEL_VCPU_IRQ for bad arguments and a
/// running vCPU, and nothing changes then; accepted, the timer follows it.
#[test]
fn vcpu_vtimer_checks_its_arguments() {
    let m = Machine::small();
    let h = m.create(2);
    assert_eq!(m.checked(func::VCPU_INIT, &[h, 0, 0x1000, 0]), OK);
    let call = |args: [u64; 4]| m.checked(func::KEEL_VCPU_VTIMER, &args);
    for (args, what) in [
        ([0, 0, 1, 0x80], "handle 0"),
        ([h, 2, 1, 0x80], "a vCPU past the VM's"),
        ([h, 1, 1, 0x80], "a vCPU never started"),
        ([h, 0, 2, 0x80], "enable 2"),
        ([h, 0, 1, 0x100], "priority 256"),
    ] {
        assert_eq!(call(args), INVALID, "{what}");
    }
    let timer_taken = |m: &Machine| {
        let (t, v) = m.run(h, 0);
        let e = v.vgic.prepare(true, 4);
        let l = v.vgic.lr[0];
        v.vgic.lr = [0; 16];
        m.hyp.end_run(&t);
        (e.hold_timer_ppi, l as u32, (l >> 48) as u8)
    };
    assert_eq!(timer_taken(&m), (true, 27, 0xa0), "the default");
    let (t, _) = m.run(h, 0);
    assert_eq!(call([h, 0, 0, 0x40]), BUSY, "the vCPU runs");
    m.hyp.end_run(&t);
    assert_eq!(
        timer_taken(&m),
        (true, 27, 0xa0),
        "unchanged by refused calls"
    );
    assert_eq!(call([h, 0, 1, 0x40]), OK);
    assert_eq!(timer_taken(&m), (true, 27, 0x40));
    assert_eq!(call([h, 0, 0, 0x40]), OK);
    assert_eq!(timer_taken(&m), (true, 0, 0), "disabled: held, not pending");
}
