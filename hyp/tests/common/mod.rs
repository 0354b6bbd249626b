//! A simulated machine for host tests of the whole hypervisor: RAM at
//! 0x4000_0000 backed by host memory (allocated zeroed, so Linux only
//! commits the pages a test touches), the hypervisor's image and boot pool
//! in the first 2 MiB block after 0x4020_0000, real page tables built by
//! keel-mm, and the dispatcher of keel-hyp driving it all.
//!
//! Shared by the test crates (`guests.rs`, `model.rs`) and the
//! `model_bench` example; each uses a part of it.
#![allow(dead_code)]

pub mod model;

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::Mutex as StdMutex;

use keel_abi::{func, status};
use keel_hyp::guest::{Action, Trap, TrapKind};
use keel_hyp::host::Hyp;
use keel_hyp::hvc::{Call, Return};
use keel_hyp::mem::{HypMmu, Memory, Ram, Range, ANN_HYP_PRIVATE, PAGE};
use keel_hyp::vm::{Vcpu, Vms};
use keel_mm::donated::DonatedPages;
use keel_mm::frames::RamFrames;
use keel_mm::stage1::{Perm, Stage1};
use keel_mm::{Geometry, NoTlb, PagePool, PageState, S2Attrs, Stage2};
use spin::Mutex;

pub const RAM_BASE: u64 = 0x4000_0000;
pub const MIB2: u64 = 2 << 20;
pub const GIB: u64 = 1 << 30;
/// ESR of a trapped `HVC #0` (EC 0x16, IL).
pub const ESR_HVC: u64 = (0x16 << 26) | (1 << 25);
/// ESR of a trapped `SMC #0` (EC 0x17, IL).
pub const ESR_SMC: u64 = (0x17 << 26) | (1 << 25);

/// Records what the hypervisor asked of the MMU; zeroes guest pages for real.
#[derive(Default)]
pub struct FakeMmu {
    /// Keep the logs (tests that look at them); the model only counts.
    pub log: bool,
    pub invalidated: Vec<(u64, u64)>,
    pub flushed: Vec<(u64, u64)>,
    pub zeroed: u64,
}

impl HypMmu for FakeMmu {
    fn invalidate_range(&mut self, va: u64, len: u64) {
        if self.log {
            self.invalidated.push((va, len));
        }
    }
    fn flush_dcache(&mut self, va: u64, len: u64) {
        if self.log {
            self.flushed.push((va, len));
        }
    }
    fn zero_page(&mut self, pool: &PagePool, pa: u64) {
        // SAFETY: the test machine's RAM is all reachable at pool.va.
        unsafe { std::ptr::write_bytes(pool.va(pa), 0, PAGE as usize) };
        self.zeroed += 1;
        if self.log {
            self.flushed.push((pa, PAGE));
        }
    }
}

pub type TestHyp = Hyp<NoTlb, FakeMmu, NoTlb>;

/// The shape of a machine.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub ram_size: u64,
    /// The hypervisor's image, stacks and boot pool (host: never reachable).
    pub hyp: Range,
    /// The boot pool, inside `hyp`.
    pub pool: Range,
}

impl Config {
    /// `ram_size` of RAM; the hypervisor takes 0x4020_0000..+`hyp_size`,
    /// its first 256 KiB the image, the rest the boot pool.
    pub fn new(ram_size: u64, hyp_size: u64) -> Self {
        let hyp = Range::new(RAM_BASE + MIB2, RAM_BASE + MIB2 + hyp_size);
        Config {
            ram_size,
            hyp,
            pool: Range::new(hyp.start + 0x4_0000, hyp.end),
        }
    }
    pub fn ram_end(&self) -> u64 {
        RAM_BASE + self.ram_size
    }
    pub fn pool_pages(&self) -> u64 {
        self.pool.len() / PAGE
    }
}

pub struct Machine {
    pub cfg: Config,
    pub hyp: TestHyp,
    backing: *mut u8,
    layout: Layout,
}

// SAFETY: the backing is plain memory owned by the machine.
unsafe impl Send for Machine {}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.backing, self.layout) };
    }
}

/// Serializes the big machines (GiBs of address space each, lazily backed).
pub static BIG: StdMutex<()> = StdMutex::new(());

impl Machine {
    pub fn new(cfg: Config) -> Self {
        // The pool needs its PA-to-VA offset aligned to 64 KiB; 2 MiB
        // alignment of the backing keeps RAM blocks aligned in VA too.
        let layout = Layout::from_size_align(cfg.ram_size as usize, MIB2 as usize).unwrap();
        // SAFETY: a non-zero-sized layout.
        let backing = unsafe { alloc_zeroed(layout) };
        assert!(
            !backing.is_null(),
            "cannot reserve {} MiB of address space for the machine",
            cfg.ram_size >> 20
        );
        let va_offset = (backing as usize).wrapping_sub(RAM_BASE as usize);
        let mut pool = PagePool::new(va_offset).unwrap();
        // SAFETY: the pool range is part of the backing, used by nothing else.
        unsafe {
            pool.add_range(cfg.pool.start, cfg.pool.len() as usize)
                .unwrap()
        };
        pool.attach_donated(donated_table(RAM_BASE / PAGE, cfg.ram_size / PAGE));
        let mut s1 = Stage1::new(&mut pool).unwrap();
        s1.map(
            cfg.hyp.start,
            cfg.hyp.start,
            cfg.hyp.len(),
            Perm::ReadWrite,
            &mut pool,
        )
        .unwrap();
        let mut host = Stage2::new(Geometry::new(40).unwrap(), 0, &mut pool, NoTlb).unwrap();
        host.map(
            &mut pool,
            RAM_BASE,
            cfg.ram_size,
            RAM_BASE,
            S2Attrs::NORMAL_RWX,
            PageState::Owned,
        )
        .unwrap();
        host.unmap(&mut pool, cfg.hyp.start, cfg.hyp.len(), ANN_HYP_PRIVATE)
            .unwrap();
        let mem = Memory {
            ram: Ram::new(&[Range::new(RAM_BASE, cfg.ram_end())]),
            host,
            hyp: s1,
            pool,
            mmu: FakeMmu::default(),
        };
        let vms: &'static spin::Mutex<Vms<NoTlb>> = Box::leak(Box::new(Mutex::new(Vms::new())));
        // One word per page of RAM for the lent-page table, as at boot.
        let words = vec![0u32; (cfg.ram_size / PAGE) as usize];
        let ram = RamFrames::one(RAM_BASE / PAGE, cfg.ram_size / PAGE);
        vms.lock()
            .lent
            .attach(ram, Box::leak(words.into_boxed_slice()));
        let m = Machine {
            cfg,
            hyp: Hyp::new(mem, vms),
            backing,
            layout,
        };
        m.assert_invariants("boot");
        m
    }

    /// 64 MiB of RAM, 1 MiB for the hypervisor.
    pub fn small() -> Self {
        Self::new(Config::new(64 << 20, 1 << 20))
    }

    /// A host call (x0..x4 back).
    pub fn call(&self, id: u64, args: &[u64]) -> Return {
        let mut a = [0; 5];
        a[..args.len()].copy_from_slice(args);
        self.hyp.host_hvc(0, &Call { id, args: a })
    }

    /// A host call's status.
    pub fn st(&self, id: u64, args: &[u64]) -> i64 {
        self.call(id, args).regs[0] as i64
    }

    /// KEEL_CHECK_INVARIANTS through the dispatcher.
    pub fn invariants(&self) -> Result<(), u64> {
        let r = self.call(func::KEEL_CHECK_INVARIANTS, &[]);
        if r.regs[0] == status::SUCCESS as u64 {
            Ok(())
        } else {
            Err(r.regs[1])
        }
    }

    pub fn assert_invariants(&self, after: &str) {
        if let Err(addr) = self.invariants() {
            let m = self.hyp.mem.lock();
            let vms = self.hyp.vms.lock();
            let v = m.check_invariants(&*vms).unwrap_err();
            panic!("invariant violated after {after}: {} at {addr:#x}", v.what);
        }
    }

    /// A host call, then the invariant checker; the status.
    pub fn checked(&self, id: u64, args: &[u64]) -> i64 {
        let s = self.st(id, args);
        self.assert_invariants(&format!("{id:#x} {args:x?} -> {s}"));
        s
    }

    /// MEM_STATE: (owner, host state, host mapping size).
    pub fn mem_state(&self, pa: u64) -> (u64, u64, u64) {
        let r = self.call(func::MEM_STATE, &[pa / PAGE]);
        assert_eq!(r.regs[0], 0, "MEM_STATE {pa:#x}");
        (r.regs[1], r.regs[2], r.regs[3])
    }

    /// VM_MEM_STATE: (pfn, guest state, guest mapping size).
    pub fn vm_mem_state(&self, handle: u64, ipa: u64) -> (u64, u64, u64) {
        let r = self.call(func::VM_MEM_STATE, &[handle, ipa]);
        assert_eq!(r.regs[0], 0, "VM_MEM_STATE {handle:#x} {ipa:#x}");
        (r.regs[1], r.regs[2], r.regs[3])
    }

    pub fn stat(&self, index: u64) -> u64 {
        let r = self.call(func::HYP_STATS, &[index]);
        assert_eq!(r.regs[0], 0);
        r.regs[1]
    }

    /// (root pages, table pages below the root) of VM `handle`'s stage 2.
    pub fn vm_tables(&self, handle: u64) -> (usize, usize) {
        let vms = self.hyp.vms.lock();
        let i = Vms::<NoTlb>::index(handle).unwrap();
        match &vms.slots[i] {
            keel_hyp::vm::Slot::Used(vm) if vm.alive => {
                let s = vm.s2.stats();
                (s.root_pages, s.table_pages)
            }
            _ => panic!("VM {handle:#x} is not live"),
        }
    }

    /// Table pages of the host stage 2 and the hypervisor's stage 1.
    pub fn host_tables(&self) -> u64 {
        self.hyp.mem.lock().table_pages()
    }

    /// KEEL_TABLE_PAGES of owner `which` (0: the host's stage 2, else a VM
    /// handle): its table pages, root included, or the status.
    pub fn table_pages(&self, which: u64) -> Result<u64, i64> {
        let r = self.call(func::KEEL_TABLE_PAGES, &[which]);
        match r.regs[0] as i64 {
            status::SUCCESS => Ok(r.regs[1]),
            s => Err(s),
        }
    }

    /// HYP_STATS 0 is the sum of every stage 2 KEEL_TABLE_PAGES reports
    /// (the host's and every VM slot's) and the hypervisor's stage 1.
    pub fn assert_table_pages_add_up(&self, when: &str) {
        let total = self.stat(keel_abi::stat::TABLE_PAGES);
        let host = self.table_pages(0).expect("KEEL_TABLE_PAGES 0");
        let vms: u64 = (0..keel_hyp::vm::MAX_VMS as u64)
            .filter_map(|i| self.table_pages(keel_abi::VM_HANDLE_BASE + i).ok())
            .sum();
        let hyp = self.hyp.mem.lock().hyp.table_pages() as u64;
        assert_eq!(
            total,
            host + vms + hyp,
            "{when}: HYP_STATS 0 = {total}, host stage 2 {host} + VMs {vms} + stage 1 {hyp}"
        );
    }

    fn page_ptr(&self, pa: u64) -> *mut u8 {
        assert!(pa >= RAM_BASE && pa + PAGE <= self.cfg.ram_end());
        // SAFETY: inside the backing (checked above).
        unsafe { self.backing.add((pa - RAM_BASE) as usize) }
    }

    /// Fills the machine's RAM page at `pa` (as a CPU would write it).
    pub fn fill(&self, pa: u64, byte: u8) {
        // SAFETY: a page of the backing; no reference to it is held.
        unsafe { std::ptr::write_bytes(self.page_ptr(pa), byte, PAGE as usize) };
    }

    /// Writes one byte of the machine's RAM.
    pub fn poke(&self, pa: u64, byte: u8) {
        let page = self.page_ptr(pa & !(PAGE - 1));
        // SAFETY: inside that page of the backing.
        unsafe { *page.add((pa % PAGE) as usize) = byte };
    }

    /// A copy of the machine's RAM page at `pa`.
    pub fn read(&self, pa: u64) -> Vec<u8> {
        // SAFETY: a page of the backing, read while nothing writes it.
        unsafe { std::slice::from_raw_parts(self.page_ptr(pa), PAGE as usize) }.to_vec()
    }

    /// A guest HVC from a vCPU of VM slot `slot` outside VCPU_RUN (the
    /// registers are the caller's): the Action and x0..x3 afterwards.
    pub fn guest_hvc(&self, slot: usize, id: u64, args: &[u64]) -> (Action, [u64; 4]) {
        let mut vcpu = Vcpu::new();
        vcpu.x[0] = id;
        vcpu.x[1..=args.len()].copy_from_slice(args);
        let a = self.hyp.guest_trap(
            slot,
            &mut vcpu,
            &Trap {
                kind: TrapKind::Sync,
                esr: ESR_HVC,
                far: 0,
                hpfar: 0,
            },
        );
        (a, [vcpu.x[0], vcpu.x[1], vcpu.x[2], vcpu.x[3]])
    }

    /// A guest memory call's status (the guest resumes).
    pub fn guest_st(&self, slot: usize, id: u64, ipa: u64, nr: u64) -> i64 {
        let (a, x) = self.guest_hvc(slot, id, &[ipa, nr]);
        assert_eq!(a, Action::Resume);
        x[0] as i64
    }

    pub fn guest_checked(&self, slot: usize, id: u64, ipa: u64, nr: u64) -> i64 {
        let s = self.guest_st(slot, id, ipa, nr);
        self.assert_invariants(&format!("guest {slot} {id:#x} ipa {ipa:#x} nr {nr} -> {s}"));
        s
    }
}

/// The slot of a VM handle.
pub fn slot(handle: u64) -> usize {
    (handle - keel_abi::VM_HANDLE_BASE) as usize
}

/// A donated-page table over `pages` pages from frame `first` (two bits a
/// page, as boot sets aside for all of RAM), leaked like the machine's pool.
pub fn donated_table(first: u64, pages: u64) -> &'static mut DonatedPages {
    let words = vec![0u64; DonatedPages::words_for(pages)].leak();
    let table = Box::leak(Box::new(DonatedPages::new()));
    table.attach(RamFrames::one(first, pages), words);
    table
}
