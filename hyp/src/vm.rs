//! Protected VMs: the VM table, vCPU state, and the memory calls that
//! move pages between the host and a guest (VM_DONATE, VM_SHARE,
//! VM_UNSHARE, VM_MEM_STATE; the guest's MEM_SHARE, MEM_UNSHARE,
//! MEM_RELINQUISH; the host's pins). Each follows the shape of
//! [`crate::mem`]: validate, check every page's transition, reserve every
//! table page of every table it touches, then commit.

use keel_abi::PageState as AbiState;
use keel_mm::owner::{self, Page, Request};
use keel_mm::stage2::Change;
use keel_mm::{
    Annotation, Geometry, LeafKind, PageState, PageWalk, S2Attrs, Stage2, TlbMaintenance,
};

use crate::lent::{Direction, Lent, MAX_PINS};
use crate::vgic::Vgic;

use crate::mem::{CallError, Guests, HypMmu, Memory, Range, PAGE, VM_HANDLE_BASE};

pub const MAX_VMS: usize = 8;
pub const MAX_VCPUS: usize = 4;
/// Guests get a 512 GiB IPA space: a one-page root at level 1.
pub const GUEST_IPA_BITS: u8 = 39;
/// How many EL1 system registers a vCPU keeps (arch::guest::El1Regs).
pub const EL1_REGS: usize = 26;
/// The registers of features a CPU may lack (keel_arch::guest::ExtRegs:
/// the pointer-authentication keys and TPIDR2_EL0), switched where it has
/// them.
pub const EXT_REGS: usize = 11;
/// PSTATE a vCPU starts with: EL1h, all of DAIF masked.
pub const PSTATE_EL1H: u64 = 0x3c5;
/// SCTLR_EL1 at vCPU reset: RES1 bits only (MMU and caches off).
pub const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

/// FP/SIMD registers of a vCPU.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Fp {
    pub v: [u128; 32],
    pub fpsr: u64,
    pub fpcr: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Off: never started (by VCPU_INIT, or the guest's PSCI CPU_ON), or
    /// turned off by the guest (CPU_OFF). VCPU_RUN refuses it; a guest's
    /// CPU_ON starts it.
    Uninit,
    Ready,
    /// Inside VCPU_RUN on some CPU.
    Running,
    /// Stopped for good by a fault it cannot continue from (its ESR).
    Failed(u64),
}

/// What the next VCPU_RUN's completion value completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    None,
    /// An MMIO access: skip the instruction; for a read, load the value.
    Mmio {
        read: bool,
        reg: u8,
        size: u8,
        sign: bool,
        sf: bool,
    },
    /// A HYPERCALL exit: the value goes to the guest's x0.
    Hypercall,
    /// The guest turned this vCPU off (PSCI CPU_OFF): it is off from the
    /// end of this run (end_run), when nothing on this CPU uses it any more.
    Off,
    /// The vCPU cannot continue (this ESR): it is Failed from the end of
    /// this run. Until then it stays Running, so that no other CPU may
    /// destroy its VM or set it up while this one still uses it.
    Fault(u64),
}

#[derive(Clone, Copy, Debug)]
pub struct Vcpu {
    pub x: [u64; 31],
    pub pc: u64,
    pub pstate: u64,
    pub el1: [u64; EL1_REGS],
    pub ext: [u64; EXT_REGS],
    pub fp: Fp,
    /// The virtual GIC CPU interface's state (list and active-priority
    /// registers, ICH_VMCR_EL2), and the host's interrupts waiting for it.
    pub vgic: Vgic,
    pub state: VcpuState,
    pub pending: Pending,
}

impl Vcpu {
    pub const fn new() -> Self {
        Vcpu {
            x: [0; 31],
            pc: 0,
            pstate: 0,
            el1: [0; EL1_REGS],
            ext: [0; EXT_REGS],
            fp: Fp {
                v: [0; 32],
                fpsr: 0,
                fpcr: 0,
            },
            vgic: Vgic::new(),
            state: VcpuState::Uninit,
            pending: Pending::None,
        }
    }

    /// A vCPU that starts at `entry` (EL1h, MMU off) with `x0`, every other
    /// register at its reset value: what VCPU_INIT and a guest's PSCI
    /// CPU_ON make.
    pub fn start_at(entry: u64, x0: u64) -> Self {
        let mut v = Vcpu::new();
        v.x[0] = x0;
        v.pc = entry;
        v.pstate = PSTATE_EL1H;
        v.el1[0] = SCTLR_EL1_RESET;
        v.state = VcpuState::Ready;
        v
    }

    /// Applies the completion value of the previous exit.
    pub fn complete(&mut self, value: u64) {
        match self.pending {
            Pending::None | Pending::Off | Pending::Fault(_) => {}
            Pending::Hypercall => self.x[0] = value,
            Pending::Mmio {
                read,
                reg,
                size,
                sign,
                sf,
            } => {
                self.pc += 4;
                if read && reg < 31 {
                    let bits = u32::from(size) * 8;
                    let mut v = if bits >= 64 {
                        value
                    } else {
                        value & ((1 << bits) - 1)
                    };
                    if sign && bits < 64 && v >> (bits - 1) & 1 == 1 {
                        v |= !0u64 << bits;
                    }
                    if !sf {
                        v &= 0xffff_ffff;
                    }
                    self.x[reg as usize] = v;
                }
            }
        }
        self.pending = Pending::None;
    }
}

impl Default for Vcpu {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Vm<G: TlbMaintenance> {
    pub s2: Stage2<G>,
    pub vcpus: [Vcpu; MAX_VCPUS],
    pub nr_vcpus: usize,
    /// Set once the guest asked for SYSTEM_OFF (0) or SYSTEM_RESET (1).
    pub off: Option<u64>,
    /// Pages recorded as this VM's or lent to it: what must come back
    /// before the slot can be reused.
    pub pages: u64,
    /// False once destroyed: the VM never runs again, and its slot (with its
    /// stage-2 tables) is freed when the last of its pages is reclaimed.
    pub alive: bool,
    /// Set when one of its vCPUs first enters the guest. From then on the
    /// host can no longer set a vCPU's registers (VCPU_INIT is DENIED):
    /// restarting a vCPU at an address and x0 of the host's choosing, once
    /// the guest has secrets in its memory, would hand the host its control
    /// flow.
    pub started: bool,
    /// For each physical CPU (by index, below [`MAX_CPUS`]): 1 + the index
    /// of this VM's vCPU that last ran there, 0 if none has. When another
    /// vCPU of the VM runs there next, the CPU's TLB entries for the VMID
    /// are dropped first (see [`RunTicket::flush_local`]).
    ///
    /// [`RunTicket::flush_local`]: crate::host::RunTicket::flush_local
    pub last_ran: [u8; MAX_CPUS],
}

/// Physical CPUs whose last vCPU each VM tracks; a CPU index past it always
/// gets the local flush.
pub const MAX_CPUS: usize = 8;

/// A slot lives in a static table and is never moved, so the size of
/// `Vm` costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Slot<G: TlbMaintenance> {
    Free,
    /// A VM, alive or destroyed with pages still to reclaim.
    Used(Vm<G>),
}

/// All VMs, and the pages shared across the host/guest boundary.
pub struct Vms<G: TlbMaintenance> {
    pub slots: [Slot<G>; MAX_VMS],
    pub lent: Lent,
    /// Block splits and merges of the stage 2s of VMs whose slots were
    /// freed, so that HYP_STATS 2 and 3 count since boot.
    pub retired_splits: u64,
    pub retired_merges: u64,
}

/// TLB maintenance for a VM's stage 2: made before the table exists, then
/// told the table's VTTBR (root and VMID) to invalidate under.
pub trait GuestTlb: TlbMaintenance + 'static {
    fn new() -> Self;
    fn bind(&mut self, vttbr: u64);
}

impl GuestTlb for keel_mm::NoTlb {
    fn new() -> Self {
        keel_mm::NoTlb
    }
    fn bind(&mut self, _: u64) {}
}

impl<G: TlbMaintenance> Default for Vms<G> {
    fn default() -> Self {
        Self::new()
    }
}

impl<G: TlbMaintenance> Vms<G> {
    pub const fn new() -> Self {
        Vms {
            slots: [const { Slot::Free }; MAX_VMS],
            lent: Lent::new(),
            retired_splits: 0,
            retired_merges: 0,
        }
    }

    /// The slot index of `handle`.
    pub fn index(handle: u64) -> Result<usize, CallError> {
        handle
            .checked_sub(u64::from(VM_HANDLE_BASE))
            .filter(|&i| i < MAX_VMS as u64)
            .map(|i| i as usize)
            .ok_or(CallError::Invalid)
    }

    pub fn live(&self, handle: u64) -> Result<&Vm<G>, CallError> {
        match &self.slots[Self::index(handle)?] {
            Slot::Used(vm) if vm.alive => Ok(vm),
            _ => Err(CallError::Invalid),
        }
    }

    pub fn live_mut(&mut self, handle: u64) -> Result<&mut Vm<G>, CallError> {
        match &mut self.slots[Self::index(handle)?] {
            Slot::Used(vm) if vm.alive => Ok(vm),
            _ => Err(CallError::Invalid),
        }
    }

    /// The live VM in slot `slot`.
    pub fn live_slot(&mut self, slot: usize) -> Option<&mut Vm<G>> {
        match self.slots.get_mut(slot) {
            Some(Slot::Used(vm)) if vm.alive => Some(vm),
            _ => None,
        }
    }

    /// Pages no longer owed by slot `vm`; a destroyed VM that owes nothing
    /// more gives its tables back and its slot is free.
    fn settle(&mut self, vm: u16, pages: u64, pool: &mut keel_mm::PagePool) {
        let Some(slot) = self.slots.get_mut(vm as usize) else {
            return;
        };
        if let Slot::Used(v) = slot {
            debug_assert!(v.pages >= pages, "a VM settles more pages than it owes");
            v.pages = v.pages.saturating_sub(pages);
            let (splits, merges) = (v.s2.stats().splits, v.s2.stats().merges);
            if !v.alive && v.pages == 0 && v.s2.destroy(pool).is_ok() {
                self.retired_splits += splits;
                self.retired_merges += merges;
                *slot = Slot::Free;
            }
        }
    }
}

impl<G: TlbMaintenance> Vms<G> {
    /// The first page of [pfn, pfn + nr) not recorded as shared in
    /// direction `dir` with a VM whose slot holds one (alive or dead).
    fn first_unrecorded(&self, pfn: u64, nr: u64, dir: Direction) -> Option<u64> {
        self.lent.first_missing(pfn, nr, dir, |vm| {
            matches!(self.slots.get(vm as usize), Some(Slot::Used(_)))
        })
    }
}

impl<G: TlbMaintenance> Guests for Vms<G> {
    fn is_live(&self, vm: u16) -> bool {
        matches!(self.slots.get(vm as usize), Some(Slot::Used(v)) if v.alive)
    }
    fn lender(&self, pfn: u64) -> Option<(u16, bool)> {
        self.lent
            .get(pfn)
            .filter(|e| e.dir == Direction::ToHost)
            .map(|e| (e.vm, e.pins > 0))
    }
    fn borrower(&self, pfn: u64) -> Option<u16> {
        self.lent
            .get(pfn)
            .filter(|e| e.dir == Direction::ToGuest)
            .map(|e| e.vm)
    }
    fn first_not_lent(&self, pfn: u64, nr: u64) -> Option<u64> {
        self.first_unrecorded(pfn, nr, Direction::ToHost)
    }
    fn first_not_borrowed(&self, pfn: u64, nr: u64) -> Option<u64> {
        self.first_unrecorded(pfn, nr, Direction::ToGuest)
    }
    fn lent_counts(&self) -> Option<(u64, u64)> {
        Some(self.lent.counts())
    }
    fn first_stray_record(&self, host_state: &dyn Fn(u64) -> Option<PageState>) -> Option<u64> {
        self.lent
            .entries()
            .find(|e| {
                let slot_used = matches!(self.slots.get(e.vm as usize), Some(Slot::Used(_)));
                let host_agrees = match e.dir {
                    Direction::ToHost => host_state(e.pfn) == Some(PageState::SharedBorrowed),
                    Direction::ToGuest => {
                        e.pins == 0 && host_state(e.pfn) == Some(PageState::SharedOwned)
                    }
                };
                !slot_used || !host_agrees
            })
            .map(|e| e.pfn)
    }
    fn table_pages(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Used(vm) => {
                    let st = vm.s2.stats();
                    (st.root_pages + st.table_pages) as u64
                }
                _ => 0,
            })
            .sum()
    }
}

fn handle_of(vm: usize) -> u64 {
    u64::from(VM_HANDLE_BASE) + vm as u64
}

fn annotation(vm: usize) -> Annotation {
    Annotation(VM_HANDLE_BASE + vm as u32)
}

/// Which way [`VmOps::convert_page`] converts a guest page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Conversion {
    Share,
    Unshare,
}

/// A guest IPA range, if valid: 4K aligned, no overflow, inside the IPA space.
fn ipa_range(ipa: u64, nr: u64) -> Result<Range, CallError> {
    if nr == 0 || !ipa.is_multiple_of(PAGE) {
        return Err(CallError::Invalid);
    }
    let len = nr.checked_mul(PAGE).ok_or(CallError::Invalid)?;
    let end = ipa.checked_add(len).ok_or(CallError::Invalid)?;
    if end > 1 << GUEST_IPA_BITS {
        return Err(CallError::Invalid);
    }
    Ok(Range::new(ipa, end))
}

fn mm(e: keel_mm::MmError) -> CallError {
    match e {
        keel_mm::MmError::NoMemory => CallError::NoMemory,
        // A state change of pages the guest does not have.
        keel_mm::MmError::NotMapped => CallError::Denied,
        _ => CallError::Invalid,
    }
}

/// The guest pages of an IPA range, as runs of contiguous output address in
/// one stage-2 state: (ipa, pa, len, state). Unmapped IPAs end the walk with
/// DENIED.
fn mapped_runs<G: TlbMaintenance, T: TlbMaintenance, M: HypMmu>(
    vm: &Vm<G>,
    mem: &Memory<T, M>,
    range: Range,
    f: &mut dyn FnMut(u64, u64, u64, PageState) -> Result<(), CallError>,
) -> Result<(), CallError> {
    let mut ipa = range.start;
    while ipa < range.end {
        let (pa, len, state) = run_at(&vm.s2, &mem.pool, ipa, range.end)?;
        f(ipa, pa, len, state)?;
        ipa += len;
    }
    Ok(())
}

/// The run of the guest's mapping from `ipa` (up to `end` and the end of
/// its leaf): (output address of `ipa`, length, state); DENIED where the
/// guest has no page. The commit loops walk with it while they change the
/// tables, which `mapped_runs` (a closure over shared borrows) cannot.
fn run_at<G: TlbMaintenance>(
    s2: &Stage2<G>,
    pool: &keel_mm::PagePool,
    ipa: u64,
    end: u64,
) -> Result<(u64, u64, PageState), CallError> {
    let leaf = s2.lookup(pool, ipa).map_err(mm)?;
    let LeafKind::Mapped { pa, state, .. } = leaf.kind else {
        return Err(CallError::Denied);
    };
    let run_end = (leaf.ipa + leaf.size).min(end);
    Ok((pa + (ipa - leaf.ipa), run_end - ipa, state))
}

/// Every VM operation, on the VM table and the memory together (the
/// caller holds both locks, VMs first).
pub struct VmOps<'a, G: TlbMaintenance, T: TlbMaintenance, M: HypMmu> {
    pub vms: &'a mut Vms<G>,
    pub mem: &'a mut Memory<T, M>,
}

impl<G: TlbMaintenance, T: TlbMaintenance, M: HypMmu> VmOps<'_, G, T, M> {
    /// VM_CREATE: a handle, or INVALID_PARAMETER for a bad vCPU count or
    /// flags, NO_MEMORY when every slot is taken or the root cannot be had.
    pub fn create(&mut self, nr_vcpus: u64, flags: u64) -> Result<u64, CallError>
    where
        G: GuestTlb,
    {
        if nr_vcpus == 0 || nr_vcpus > MAX_VCPUS as u64 || flags != 0 {
            return Err(CallError::Invalid);
        }
        let slot = self
            .vms
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Free))
            .ok_or(CallError::NoMemory)?;
        let geometry = Geometry::new(GUEST_IPA_BITS).map_err(mm)?;
        let vmid = slot as u16 + 1;
        let mut s2 = Stage2::new(geometry, vmid, &mut self.mem.pool, G::new()).map_err(mm)?;
        let vttbr = s2.vttbr();
        s2.tlb_mut().bind(vttbr);
        self.vms.slots[slot] = Slot::Used(Vm {
            s2,
            vcpus: [Vcpu::new(); MAX_VCPUS],
            nr_vcpus: nr_vcpus as usize,
            off: None,
            pages: 0,
            alive: true,
            started: false,
            last_ran: [0; MAX_CPUS],
        });
        Ok(handle_of(slot))
    }

    /// VM_DESTROY: the VM stops for good. Its TLB entries go now; its pages
    /// and then its tables when the host reclaims them. So the call costs
    /// the same whatever the VM's size: no page or table is touched.
    pub fn destroy(&mut self, handle: u64) -> Result<(), CallError> {
        let slot = Vms::<G>::index(handle)?;
        let vm = self.vms.live_mut(handle)?;
        if vm.vcpus.iter().any(|v| v.state == VcpuState::Running) {
            return Err(CallError::Busy);
        }
        let vmid = vm.s2.vmid();
        vm.s2.tlb_mut().invalidate_vmid(vmid);
        vm.s2.tlb_mut().complete(vmid);
        vm.alive = false;
        self.vms.settle(slot as u16, 0, &mut self.mem.pool);
        Ok(())
    }

    /// VCPU_INIT: sets a vCPU's entry and x0, before any vCPU of the VM
    /// has run (DENIED after; BUSY for the vCPU that runs now).
    pub fn vcpu_init(
        &mut self,
        handle: u64,
        index: u64,
        entry: u64,
        x0: u64,
    ) -> Result<(), CallError> {
        let vm = self.vms.live_mut(handle)?;
        if index >= vm.nr_vcpus as u64 || !entry.is_multiple_of(4) || entry >= 1 << GUEST_IPA_BITS {
            return Err(CallError::Invalid);
        }
        if vm.vcpus[index as usize].state == VcpuState::Running {
            return Err(CallError::Busy);
        }
        if vm.started {
            return Err(CallError::Denied);
        }
        vm.vcpus[index as usize] = Vcpu::start_at(entry, x0);
        Ok(())
    }

    /// KEEL_VCPU_IRQ: makes `intid` pending at `priority` for vCPU `index`
    /// ([`Vgic::inject`]); BUSY while that vCPU runs.
    pub fn vcpu_irq(
        &mut self,
        handle: u64,
        index: u64,
        intid: u64,
        priority: u64,
    ) -> Result<(), CallError> {
        self.idle_vcpu(handle, index)?.vgic.inject(intid, priority)
    }

    /// KEEL_VCPU_VTIMER: the guest's configuration of its virtual timer's
    /// interrupt for vCPU `index` ([`Vgic::set_timer`]); BUSY while that
    /// vCPU runs.
    pub fn vcpu_vtimer(
        &mut self,
        handle: u64,
        index: u64,
        enabled: u64,
        priority: u64,
    ) -> Result<(), CallError> {
        if enabled > 1 || priority > 0xff {
            return Err(CallError::Invalid);
        }
        let vcpu = self.idle_vcpu(handle, index)?;
        vcpu.vgic.set_timer(enabled == 1, priority as u8);
        Ok(())
    }

    /// vCPU `index` of live VM `handle`, started and not running now: the
    /// state the host may change between its runs (Invalid for a vCPU
    /// never started, Busy for one that runs).
    fn idle_vcpu(&mut self, handle: u64, index: u64) -> Result<&mut Vcpu, CallError> {
        let vm = self.vms.live_mut(handle)?;
        if index >= vm.nr_vcpus as u64 {
            return Err(CallError::Invalid);
        }
        let vcpu = &mut vm.vcpus[index as usize];
        match vcpu.state {
            VcpuState::Uninit => Err(CallError::Invalid),
            VcpuState::Running => Err(CallError::Busy),
            VcpuState::Ready | VcpuState::Failed(_) => Ok(vcpu),
        }
    }

    /// Checks that every IPA page of `range` is unmapped in the VM.
    fn check_ipa_free(&self, vm: &Vm<G>, range: Range) -> Result<(), CallError> {
        let mut mapped = false;
        vm.s2
            .visit_leaves(&self.mem.pool, range.start, range.len(), &mut |l| {
                mapped |= matches!(l.kind, LeafKind::Mapped { .. })
            })
            .map_err(mm)?;
        if mapped {
            return Err(CallError::Denied);
        }
        Ok(())
    }

    /// VM_DONATE: host pages become the guest's private memory at `ipa`,
    /// with the largest blocks the alignment of both allows.
    pub fn donate(&mut self, handle: u64, pfn: u64, ipa: u64, nr: u64) -> Result<(), CallError> {
        self.give(handle, pfn, ipa, nr, false)
    }

    /// VM_SHARE: host pages shared into the guest.
    pub fn share(&mut self, handle: u64, pfn: u64, ipa: u64, nr: u64) -> Result<(), CallError> {
        self.give(handle, pfn, ipa, nr, true)
    }

    fn give(
        &mut self,
        handle: u64,
        pfn: u64,
        ipa: u64,
        nr: u64,
        share: bool,
    ) -> Result<(), CallError> {
        let slot = Vms::<G>::index(handle)?;
        self.vms.live(handle)?;
        let host = crate::mem::pfn_range(&self.mem.ram, pfn, nr)?;
        let guest = ipa_range(ipa, nr)?;
        let vm = self.vms.live(handle)?;
        let req = if share {
            Request::VmShare(slot as u16)
        } else {
            Request::VmDonate(slot as u16)
        };
        self.mem.check(host, req, &*self.vms)?;
        self.check_ipa_free(vm, guest)?;
        if share && !self.vms.lent.covers(pfn, nr) {
            return Err(CallError::NoMemory);
        }
        let (host_change, guest_state) = if share {
            (
                Change::State(PageState::SharedOwned),
                PageState::SharedBorrowed,
            )
        } else {
            (Change::Unmap(annotation(slot)), PageState::Owned)
        };
        let guest_change = Change::Map {
            ipa,
            pa: host.start,
            attrs: S2Attrs::NORMAL_RWX,
            state: guest_state,
        };
        let need = self
            .mem
            .host
            .pages_needed(&self.mem.pool, host.start, host.len(), host_change)
            .map_err(mm)?
            + vm.s2
                .pages_needed(&self.mem.pool, ipa, guest.len(), guest_change)
                .map_err(mm)?;
        if self.mem.pool.free_pages() < need {
            return Err(CallError::NoMemory);
        }
        // Commit: the host loses (or shares) the pages before the guest
        // can reach them.
        let mem = &mut *self.mem;
        match host_change {
            Change::State(s) => mem.host.set_state(&mut mem.pool, host.start, host.len(), s),
            _ => mem
                .host
                .unmap(&mut mem.pool, host.start, host.len(), annotation(slot)),
        }
        .map_err(mm)?;
        let Slot::Used(vm) = &mut self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        vm.s2
            .map(
                &mut mem.pool,
                ipa,
                guest.len(),
                host.start,
                S2Attrs::NORMAL_RWX,
                guest_state,
            )
            .map_err(mm)?;
        vm.pages += nr;
        if share {
            for p in pfn..pfn + nr {
                let recorded = self.vms.lent.insert(p, slot as u16, Direction::ToGuest);
                debug_assert!(recorded, "checked: covered and not recorded");
            }
        }
        Ok(())
    }

    /// VM_UNSHARE: host pages shared into the guest come back.
    pub fn unshare(&mut self, handle: u64, ipa: u64, nr: u64) -> Result<(), CallError> {
        let slot = Vms::<G>::index(handle)?;
        let guest = ipa_range(ipa, nr)?;
        let vm = self.vms.live(handle)?;
        let mut need = vm
            .s2
            .pages_needed(
                &self.mem.pool,
                ipa,
                guest.len(),
                Change::Unmap(Annotation(0)),
            )
            .map_err(mm)?;
        let (vms, mem) = (&*self.vms, &*self.mem);
        mapped_runs(vm, mem, guest, &mut |_, pa, len, state| {
            if state != PageState::SharedBorrowed {
                return Err(CallError::Denied);
            }
            // Each page as the host stage 2 and the shared-page table say
            // it is (by runs): the host's, lent to this VM.
            mem.check(
                Range::new(pa, pa + len),
                Request::VmUnshare(slot as u16),
                vms,
            )?;
            need += mem
                .host
                .pages_needed(&mem.pool, pa, len, Change::State(PageState::Owned))
                .map_err(mm)?;
            Ok(())
        })?;
        if self.mem.pool.free_pages() < need {
            return Err(CallError::NoMemory);
        }
        // The host's pages come back first (it could always reach them),
        // walking the guest's mappings while they still say where they are;
        // then the guest loses them.
        let mem = &mut *self.mem;
        let Slot::Used(vm) = &mut self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let lent = &mut self.vms.lent;
        let mut ipa_at = guest.start;
        while ipa_at < guest.end {
            let (pa, len, _) = run_at(&vm.s2, &mem.pool, ipa_at, guest.end)?;
            mem.host
                .set_state(&mut mem.pool, pa, len, PageState::Owned)
                .map_err(mm)?;
            for p in (pa..pa + len).step_by(PAGE as usize) {
                lent.remove(p / PAGE);
            }
            ipa_at += len;
        }
        vm.s2
            .unmap(&mut mem.pool, ipa, guest.len(), Annotation(0))
            .map_err(mm)?;
        debug_assert!(vm.pages >= nr, "a VM gives back more pages than it owes");
        vm.pages = vm.pages.saturating_sub(nr);
        Ok(())
    }

    /// VM_MEM_STATE: (pfn, the guest's state, the guest mapping's size).
    pub fn mem_state(&self, handle: u64, ipa: u64) -> Result<(u64, u64, u64), CallError> {
        let vm = self.vms.live(handle)?;
        let range = ipa_range(ipa, 1)?;
        let leaf = vm.s2.lookup(&self.mem.pool, range.start).map_err(mm)?;
        Ok(match leaf.kind {
            LeafKind::Mapped { pa, state, .. } => {
                let s = match state {
                    PageState::Owned => AbiState::Owned,
                    PageState::SharedOwned => AbiState::SharedOwned,
                    PageState::SharedBorrowed => AbiState::SharedBorrowed,
                };
                ((pa + (ipa - leaf.ipa)) / PAGE, s as u64, leaf.size)
            }
            LeafKind::Unmapped(_) => (0, AbiState::NoPage as u64, 0),
        })
    }

    /// MEM_SHARE or MEM_UNSHARE of one page: what the range calls do,
    /// along one walk of each stage 2 (the walks are the checks, and the
    /// commits follow them without walking again).
    #[inline(always)]
    fn convert_page(&mut self, slot: usize, ipa: u64, how: Conversion) -> Result<(), CallError> {
        let (vms, mem) = (&*self.vms, &*self.mem);
        let Slot::Used(vm) = &vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let vmi = slot as u16;
        let mut guest_walk = PageWalk::default();
        vm.s2
            .walk_page_into(&mem.pool, ipa, &mut guest_walk)
            .map_err(mm)?;
        let (from, to) = match how {
            Conversion::Share => (PageState::Owned, PageState::SharedOwned),
            Conversion::Unshare => (PageState::SharedOwned, PageState::Owned),
        };
        let pa = match guest_walk.mapped() {
            Some((pa, state)) if state == from => pa,
            _ => return Err(CallError::Denied),
        };
        let mut host_walk = PageWalk::default();
        mem.host
            .walk_page_into(&mem.pool, pa, &mut host_walk)
            .map_err(mm)?;
        let (request, host_change) = match how {
            Conversion::Share => (
                Request::GuestShare(vmi),
                Change::Map {
                    ipa: pa,
                    pa,
                    attrs: S2Attrs::NORMAL_RWX,
                    state: PageState::SharedBorrowed,
                },
            ),
            Conversion::Unshare => (Request::GuestUnshare(vmi), Change::Unmap(annotation(slot))),
        };
        // The host's view of the page: a page of this VM (live: it runs) is
        // a hole annotated with its handle; anything else is classified in
        // full, to be refused.
        let page = match host_walk.kind() {
            LeafKind::Unmapped(a) if a == annotation(slot) => Page::GuestOwned(vmi),
            kind @ LeafKind::Mapped {
                state: PageState::SharedBorrowed,
                ..
            } => match vms.lent.get(pa / PAGE) {
                Some(e) if e.dir == Direction::ToHost && e.vm == vmi => Page::GuestShared {
                    vm: vmi,
                    pinned: e.pins > 0,
                },
                _ => mem.page_in(kind, pa, vms),
            },
            kind => mem.page_in(kind, pa, vms),
        };
        owner::transition(page, request)?;
        let guest_plan = vm
            .s2
            .plan_page(&guest_walk, Change::State(to))
            .map_err(mm)?;
        let host_plan = mem.host.plan_page(&host_walk, host_change).map_err(mm)?;
        let need = guest_plan.pages() + host_plan.pages();
        if mem.pool.free_pages() < need
            || (how == Conversion::Share && !vms.lent.covers(pa / PAGE, 1))
        {
            return Err(CallError::NoMemory);
        }
        // Checked: nothing below can fail.
        let mem = &mut *self.mem;
        let Slot::Used(vm) = &mut self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let lent = &mut self.vms.lent;
        // Both orders are safe (the call holds every lock until both are
        // done); these undo the tables of the last conversion in the order
        // its merges stashed them, so each split finds its table first.
        match how {
            Conversion::Share => {
                vm.s2
                    .commit_page(&mut mem.pool, &guest_walk, &guest_plan)
                    .map_err(mm)?;
                mem.host
                    .commit_page(&mut mem.pool, &host_walk, &host_plan)
                    .map_err(mm)?;
                let recorded = lent.insert(pa / PAGE, vmi, Direction::ToHost);
                debug_assert!(recorded, "checked: covered and not recorded");
            }
            Conversion::Unshare => {
                mem.host
                    .commit_page(&mut mem.pool, &host_walk, &host_plan)
                    .map_err(mm)?;
                lent.remove(pa / PAGE);
                vm.s2
                    .commit_page(&mut mem.pool, &guest_walk, &guest_plan)
                    .map_err(mm)?;
            }
        }
        Ok(())
    }

    /// MEM_SHARE from guest `slot`: private pages become shared with the
    /// host in place; a block covering them splits along their path only.
    pub fn guest_share(&mut self, slot: usize, ipa: u64, nr: u64) -> Result<(), CallError> {
        let nr = nr.max(1);
        let guest = ipa_range(ipa, nr)?;
        if nr == 1 {
            return self.convert_page(slot, ipa, Conversion::Share);
        }
        self.share_run(slot, guest)
    }

    /// MEM_SHARE of more than one page, `guest`, through the range paths.
    #[inline(never)]
    fn share_run(&mut self, slot: usize, guest: Range) -> Result<(), CallError> {
        let ipa = guest.start;
        let Slot::Used(vm) = &self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let vmi = slot as u16;
        let mut need = vm
            .s2
            .pages_needed(
                &self.mem.pool,
                ipa,
                guest.len(),
                Change::State(PageState::SharedOwned),
            )
            .map_err(mm)?;
        let (vms, mem) = (&*self.vms, &*self.mem);
        let mut covered = true;
        mapped_runs(vm, mem, guest, &mut |_, pa, len, state| {
            if state != PageState::Owned {
                return Err(CallError::Denied);
            }
            mem.check(Range::new(pa, pa + len), Request::GuestShare(vmi), vms)?;
            covered &= vms.lent.covers(pa / PAGE, len / PAGE);
            let change = Change::Map {
                ipa: pa,
                pa,
                attrs: S2Attrs::NORMAL_RWX,
                state: PageState::SharedBorrowed,
            };
            need += mem
                .host
                .pages_needed(&mem.pool, pa, len, change)
                .map_err(mm)?;
            Ok(())
        })?;
        if self.mem.pool.free_pages() < need || !covered {
            return Err(CallError::NoMemory);
        }
        let mem = &mut *self.mem;
        let Slot::Used(vm) = &mut self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let lent = &mut self.vms.lent;
        let mut ipa_at = guest.start;
        while ipa_at < guest.end {
            let (pa, len, _) = run_at(&vm.s2, &mem.pool, ipa_at, guest.end)?;
            mem.host
                .map(
                    &mut mem.pool,
                    pa,
                    len,
                    pa,
                    S2Attrs::NORMAL_RWX,
                    PageState::SharedBorrowed,
                )
                .map_err(mm)?;
            for p in (pa..pa + len).step_by(PAGE as usize) {
                let recorded = lent.insert(p / PAGE, vmi, Direction::ToHost);
                debug_assert!(recorded, "checked: covered and not recorded");
            }
            ipa_at += len;
        }
        vm.s2
            .set_state(&mut mem.pool, ipa, guest.len(), PageState::SharedOwned)
            .map_err(mm)
    }

    /// MEM_UNSHARE from guest `slot`: BUSY while the host pins any page; the
    /// host mapping goes (and its TLB entries) before the call returns, and
    /// the guest's block is rebuilt once its range is uniform again.
    pub fn guest_unshare(&mut self, slot: usize, ipa: u64, nr: u64) -> Result<(), CallError> {
        let nr = nr.max(1);
        let guest = ipa_range(ipa, nr)?;
        if nr == 1 {
            return self.convert_page(slot, ipa, Conversion::Unshare);
        }
        self.unshare_run(slot, guest)
    }

    /// MEM_UNSHARE of more than one page, `guest`, through the range paths.
    #[inline(never)]
    fn unshare_run(&mut self, slot: usize, guest: Range) -> Result<(), CallError> {
        let ipa = guest.start;
        let Slot::Used(vm) = &self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let vmi = slot as u16;
        let mut need = vm
            .s2
            .pages_needed(
                &self.mem.pool,
                ipa,
                guest.len(),
                Change::State(PageState::Owned),
            )
            .map_err(mm)?;
        let (vms, mem) = (&*self.vms, &*self.mem);
        mapped_runs(vm, mem, guest, &mut |_, pa, len, state| {
            if state != PageState::SharedOwned {
                return Err(CallError::Denied);
            }
            mem.check(Range::new(pa, pa + len), Request::GuestUnshare(vmi), vms)?;
            need += mem
                .host
                .pages_needed(&mem.pool, pa, len, Change::Unmap(annotation(slot)))
                .map_err(mm)?;
            Ok(())
        })?;
        if self.mem.pool.free_pages() < need {
            return Err(CallError::NoMemory);
        }
        let mem = &mut *self.mem;
        let Slot::Used(vm) = &mut self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let lent = &mut self.vms.lent;
        let mut ipa_at = guest.start;
        while ipa_at < guest.end {
            let (pa, len, _) = run_at(&vm.s2, &mem.pool, ipa_at, guest.end)?;
            mem.host
                .unmap(&mut mem.pool, pa, len, annotation(slot))
                .map_err(mm)?;
            for p in (pa..pa + len).step_by(PAGE as usize) {
                lent.remove(p / PAGE);
            }
            ipa_at += len;
        }
        vm.s2
            .set_state(&mut mem.pool, ipa, guest.len(), PageState::Owned)
            .map_err(mm)
    }

    /// MEM_RELINQUISH from guest `slot`: the pages leave the guest, are
    /// zeroed, and return to the host.
    pub fn guest_relinquish(&mut self, slot: usize, ipa: u64, nr: u64) -> Result<(), CallError> {
        let nr = nr.max(1);
        let guest = ipa_range(ipa, nr)?;
        let Slot::Used(vm) = &self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let vmi = slot as u16;
        let mut need = vm
            .s2
            .pages_needed(
                &self.mem.pool,
                ipa,
                guest.len(),
                Change::Unmap(Annotation(0)),
            )
            .map_err(mm)?;
        let (vms, mem) = (&*self.vms, &*self.mem);
        mapped_runs(vm, mem, guest, &mut |_, pa, len, state| {
            if state == PageState::SharedBorrowed {
                return Err(CallError::Denied);
            }
            mem.check(Range::new(pa, pa + len), Request::GuestRelinquish(vmi), vms)?;
            let change = Change::Map {
                ipa: pa,
                pa,
                attrs: S2Attrs::NORMAL_RWX,
                state: PageState::Owned,
            };
            need += mem
                .host
                .pages_needed(&mem.pool, pa, len, change)
                .map_err(mm)?;
            Ok(())
        })?;
        if self.mem.pool.free_pages() < need {
            return Err(CallError::NoMemory);
        }
        let mem = &mut *self.mem;
        let Slot::Used(vm) = &mut self.vms.slots[slot] else {
            return Err(CallError::Invalid);
        };
        let lent = &mut self.vms.lent;
        let mut ipa_at = guest.start;
        while ipa_at < guest.end {
            let (pa, len, _) = run_at(&vm.s2, &mem.pool, ipa_at, guest.end)?;
            // The guest loses the pages first, then they are cleared, then
            // the host gets them.
            vm.s2
                .unmap(&mut mem.pool, ipa_at, len, Annotation(0))
                .map_err(mm)?;
            for p in (pa..pa + len).step_by(PAGE as usize) {
                mem.mmu.zero_page(&mem.pool, p);
                lent.remove(p / PAGE);
            }
            mem.host
                .map(
                    &mut mem.pool,
                    pa,
                    len,
                    pa,
                    S2Attrs::NORMAL_RWX,
                    PageState::Owned,
                )
                .map_err(mm)?;
            ipa_at += len;
        }
        debug_assert!(vm.pages >= nr, "a VM gives back more pages than it owes");
        vm.pages = vm.pages.saturating_sub(nr);
        Ok(())
    }

    /// HOST_PIN / HOST_UNPIN over a range of guest pages lent to the host.
    pub fn pin(&mut self, pfn: u64, nr: u64, pin: bool) -> Result<(), CallError> {
        let range = crate::mem::pfn_range(&self.mem.ram, pfn, nr)?;
        for p in pfn..pfn + nr {
            let page = self.mem.page(p * PAGE, &*self.vms);
            let req = if pin {
                Request::HostPin
            } else {
                let last = self.vms.lent.get(p).is_some_and(|e| e.pins == 1);
                Request::HostUnpin { last }
            };
            owner::transition(page, req)?;
            if pin && self.vms.lent.get(p).is_some_and(|e| e.pins == MAX_PINS) {
                return Err(CallError::Denied);
            }
        }
        let _ = range;
        for p in pfn..pfn + nr {
            if pin {
                self.vms.lent.pin(p);
            } else {
                self.vms.lent.unpin(p);
            }
        }
        Ok(())
    }

    /// HOST_RECLAIM, including pages of dead VMs and host pages that had
    /// been lent to a VM now dead; all of them zeroed.
    pub fn reclaim(&mut self, pfn: u64, nr: u64) -> Result<(), CallError> {
        let vms = &mut *self.vms;
        let mut settled = [0u64; MAX_VMS];
        // The whole range is checked inside host_reclaim before `zero` runs.
        let result = self.mem.host_reclaim(pfn, nr, &*vms, &mut |mem, pa| {
            let lent = vms.lent.get(pa / PAGE);
            let owner = match lent {
                Some(e) => Some(e.vm),
                None => match mem.host.lookup(&mem.pool, pa).map(|l| l.kind) {
                    Ok(LeafKind::Unmapped(Annotation(h))) => {
                        h.checked_sub(VM_HANDLE_BASE).map(|v| v as u16)
                    }
                    _ => None,
                },
            };
            // Every page comes back zeroed, host pages the dead guest could
            // write into included.
            mem.mmu.zero_page(&mem.pool, pa);
            if let Some(vm) = owner {
                settled[vm as usize % MAX_VMS] += 1;
            }
        });
        // `zero` cannot borrow the lent table mutably while host_reclaim
        // holds the memory, so the records are settled afterwards.
        if result.is_ok() {
            for p in pfn..pfn + nr {
                vms.lent.remove(p);
            }
            for (vm, &n) in settled.iter().enumerate() {
                if n > 0 {
                    vms.settle(vm as u16, n, &mut self.mem.pool);
                }
            }
        }
        result
    }
}
