//! From the plan to the running host: page pool, host device tree, stage 1
//! and MMU, the host stage 2, EL2 configuration, and the entry at EL1.

use keel_arch::guest::El1Regs;
use keel_arch::{barrier, exception, features, sysreg, tlb, TrapFrame};
use keel_boot::dt::{BootInfo, HostDtbEdits, PhysRange};
use keel_boot::layout::Layout;
use keel_hyp::mem::{HypMmu, Memory, Ram, Range, ANN_HYP_PRIVATE};
use keel_hyp::vm::{GuestTlb, Vms};
use keel_mm::donated::DonatedPages;
use keel_mm::stage1::{Perm, Stage1};
use keel_mm::{Geometry, PagePool, PageState, S2Attrs, Stage2, TlbMaintenance, Vmid};
use log::info;

use super::{boot_fail, image_sections, mmu, smp, Hyp, HYP};

/// Stage-2 TLB maintenance with real instructions. Invalidation applies to
/// the VMID in VTTBR_EL2, which is the table's own while keel changes it.
///
/// TLBI by IPA or VMID acts on the VMID in VTTBR_EL2, so each operation runs
/// with the table's own VTTBR loaded (keel changes a guest's table while the
/// host's is loaded, and the host's while a guest's is).
pub struct HwTlb {
    vttbr: u64,
}

impl HwTlb {
    fn under<R>(&self, f: impl FnOnce() -> R) -> R {
        let current = sysreg::vttbr_el2();
        if self.vttbr == 0 || current == self.vttbr {
            return f();
        }
        if keel_arch::errata::speculative_at() {
            return self.under_quiesced(current, f);
        }
        self.switched(current, f)
    }

    /// Runs `f` with this table's VTTBR loaded in place of `current`.
    #[inline(always)]
    fn switched<R>(&self, current: u64, f: impl FnOnce() -> R) -> R {
        // SAFETY: only TLB maintenance runs under the other VTTBR; nothing
        // executes at EL1 before the original value is back.
        unsafe { sysreg::set_vttbr_el2(self.vttbr) };
        barrier::isb();
        let r = f();
        // SAFETY: restores the value read by `under`.
        unsafe { sysreg::set_vttbr_el2(current) };
        barrier::isb();
        r
    }

    /// [`under`](Self::under) with the live EL1 stage 1 kept from walking
    /// meanwhile, so that no speculative walk fills the other VMID's TLB
    /// entries with it (`keel_arch::errata`; out of line: most CPUs never
    /// take it).
    #[cold]
    #[inline(never)]
    fn under_quiesced<R>(&self, current: u64, f: impl FnOnce() -> R) -> R {
        // SAFETY: as in `switched`; the EL1 registers are back before EL1
        // runs.
        let quiet = unsafe { El1Regs::quiesce() };
        let r = self.switched(current, f);
        // SAFETY: the values `quiesce` read, once VTTBR is the live world's.
        unsafe { El1Regs::resume(quiet) };
        r
    }
}

impl GuestTlb for HwTlb {
    fn new() -> Self {
        HwTlb { vttbr: 0 }
    }
    fn bind(&mut self, vttbr: u64) {
        self.vttbr = vttbr;
    }
}

impl TlbMaintenance for HwTlb {
    fn publish_writes(&mut self) {
        barrier::dsb_ishst();
    }
    fn invalidate_ipa(&mut self, _vmid: Vmid, ipa: u64, _level: Option<u8>) {
        self.under(|| tlb::ipas2e1is(ipa));
    }
    fn invalidate_vmid(&mut self, _vmid: Vmid) {
        self.under(tlb::vmalls12e1is);
    }
    fn complete(&mut self, _vmid: Vmid) {
        self.under(|| {
            barrier::dsb_ish();
            tlb::vmalle1is();
            barrier::dsb_ish();
            barrier::isb();
        });
    }
}

/// The VA of the hypervisor's one temporary-mapping slot (a page of its
/// stage 1 it points at whatever page it must clear), above every
/// identity-mapped address.
const FIXMAP_VA: u64 = 0xffff_ffff_f000;

/// The hypervisor's own stage 1 with real instructions.
pub struct HwMmu {
    /// Address of the fixmap slot's descriptor.
    fixmap_pte: u64,
}

impl HypMmu for HwMmu {
    fn invalidate_range(&mut self, va: u64, len: u64) {
        if len > 64 * 4096 {
            tlb::invalidate_el2_all();
            return;
        }
        for page in (va..va + len).step_by(4096) {
            tlb::invalidate_el2_va(page);
        }
    }
    fn flush_dcache(&mut self, va: u64, len: u64) {
        keel_arch::cache::clean_invalidate(va as usize, len as usize);
    }
    unsafe fn clear(&mut self, va: u64, len: u64) {
        // SAFETY: forwarded contract (writable Normal memory of ours).
        unsafe { keel_arch::cache::zero(va as usize, len as usize) };
        keel_arch::cache::clean_invalidate(va as usize, len as usize);
    }
    fn zero_page(&mut self, _pool: &PagePool, pa: u64) {
        let pte = self.fixmap_pte as *mut u64;
        // SAFETY: `pte` is the fixmap slot's descriptor in our stage 1; the
        // caller holds the memory lock, so no other CPU uses the slot. The
        // page is RAM the hypervisor is entitled to clear (a guest page on
        // its way to the host).
        unsafe {
            pte.write_volatile(Stage1::page_descriptor(pa, Perm::ReadWrite));
            tlb::invalidate_el2_va(FIXMAP_VA);
            self.clear(FIXMAP_VA, 4096);
            pte.write_volatile(0);
            tlb::invalidate_el2_va(FIXMAP_VA);
        }
    }
}

/// Pool pages only donations may use.
const DONATION_RESERVE: usize = 12;

/// The VM table (static: far too large for a stack).
static VMS: spin::Mutex<Vms<HwTlb>> = spin::Mutex::new(Vms::new());

/// Pages the host donates to the hypervisor (HOST_DONATE_HYP).
static mut DONATED: DonatedPages = DonatedPages::new();

/// VTCR_EL2 bits keel adds to the geometry: RES1 bit 31, 16-bit VMIDs off
/// (VMIDs stay below 256).
const VTCR_RES1: u64 = 1 << 31;

/// HCR_EL2 while the host runs: stage 2 on (VM), EL1 is AArch64 (RW), SMCs
/// trap (TSC), pointer authentication is the host's own (API, APK), and so
/// are MTE allocation tags (ATA; without it Linux's first write of GCR_EL1
/// traps on a CPU with MTE; RES0 without FEAT_MTE2, as Linux's nVHE host
/// flags set it regardless). Interrupts are not routed to EL2: the host
/// owns the GIC.
pub const HCR_HOST: u64 = 1 | (1 << 19) | (1 << 31) | (1 << 40) | (1 << 41) | (1 << 56);

/// The IPA size of the host stage 2: RAM and the MMIO above it must fit,
/// at least 40 bits, never more than the CPU's PA size (or 48).
fn host_ipa_bits(info: &BootInfo) -> u8 {
    let top = info.ram.iter().map(|r| r.end).max().unwrap_or(0);
    let needed = 64 - top.saturating_sub(1).leading_zeros();
    needed.max(40).min(sysreg::pa_bits().min(48)) as u8
}

fn build_host_stage2(info: &BootInfo, plan: &Layout, pool: &mut PagePool) -> Stage2<HwTlb> {
    let geometry = match Geometry::new(host_ipa_bits(info)) {
        Ok(g) => g,
        Err(e) => boot_fail(format_args!("host stage 2 geometry: {e:?}")),
    };
    let mut s2 = match Stage2::new(geometry, 0, pool, HwTlb::new()) {
        Ok(s) => s,
        Err(e) => boot_fail(format_args!("host stage 2 root: {e:?}")),
    };
    let vttbr = s2.vttbr();
    s2.tlb_mut().bind(vttbr);
    let mut map = |r: PhysRange, attrs: S2Attrs, pool: &mut PagePool| {
        if let Err(e) = s2.map(pool, r.start, r.size(), r.start, attrs, PageState::Owned) {
            boot_fail(format_args!(
                "host stage 2: mapping {:#x}..{:#x}: {e:?}",
                r.start, r.end
            ));
        }
    };
    for w in info.mmio_windows(geometry.ipa_size()).iter() {
        map(*w, S2Attrs::DEVICE_RW, pool);
    }
    for r in info.ram.iter() {
        // RAM below and above the reservation (if it lies in this region).
        let below = PhysRange::new(r.start, plan.reserved.start.clamp(r.start, r.end));
        let above = PhysRange::new(plan.reserved.end.clamp(r.start, r.end), r.end);
        for part in [below, above] {
            if !part.is_empty() {
                map(part, S2Attrs::NORMAL_RWX, pool);
            }
        }
    }
    let res = plan.reserved;
    if let Err(e) = s2.unmap(pool, res.start, res.size(), ANN_HYP_PRIVATE) {
        boot_fail(format_args!(
            "host stage 2: recording the hypervisor's pages: {e:?}"
        ));
    }
    s2
}

/// The ID registers (and SPE's and TRBE's ID registers, where the CPU has
/// them) that decide the host's fine-grained trap values.
fn fgt_ids() -> features::FgtIds {
    let id = sysreg::aa64_id_regs();
    let dfr0 = id[8];
    features::FgtIds {
        pfr0: id[0],
        pfr1: id[1],
        dfr0,
        dfr1: id[9],
        dfr2: id[10],
        isar1: id[17],
        mmfr3: id[27],
        mmfr4: id[28],
        pmsidr: if (dfr0 >> 32) & 0xf != 0 {
            sysreg::pmsidr_el1()
        } else {
            0
        },
        trbidr: if (dfr0 >> 44) & 0xf != 0 {
            sysreg::trbidr_el1()
        } else {
            0
        },
    }
}

/// Everything EL2 sets so that an unmodified OS runs at EL1 without
/// noticing it is not alone.
pub fn configure_el2_for_host(vtcr: u64, vttbr: u64) {
    let sme = (sysreg::id_aa64pfr1_el1() >> 24) & 0xf != 0;
    // CPTR_EL2 (non-VHE): RES1 bits [7:0], 9, 13 (and 12 unless it is
    // TSM); TZ, TFP, TSM, TTA, TAM, TCPAC clear: FP, SVE and SME are the
    // host's, untrapped.
    let cptr = 0x22ff | if sme { 0 } else { 1 << 12 };
    // MDCR_EL2: the host sees every PMU counter; no debug traps.
    let hpmn = (sysreg::pmcr_el0() >> 11) & 0x1f;
    // SAFETY: these only configure what the host at EL1 may do; none of
    // them affects the hypervisor's own translation or stacks. VTTBR/VTCR
    // take the fully built host stage 2.
    unsafe {
        sysreg::set_cptr_el2(cptr);
        // ZCR_EL2/SMCR_EL2 cap the host's SVE/SME vector lengths; their
        // reset LEN is UNKNOWN (0 on QEMU: 128 bits). Allow the CPU's
        // maximum, and SME's FA64/ZT0 where implemented. By encoding
        // (ZCR_EL2 s3_4_c1_c2_0, SMCR_EL2 s3_4_c1_c2_6), now that CPTR_EL2
        // no longer traps them.
        barrier::isb();
        if (sysreg::id_aa64pfr0_el1() >> 32) & 0xf != 0 {
            core::arch::asm!("msr s3_4_c1_c2_0, {}", in(reg) 0xfu64, options(nostack));
        }
        if sme {
            let smfr0: u64;
            core::arch::asm!("mrs {}, s3_0_c0_c4_5", out(reg) smfr0, options(nomem, nostack));
            let fa64 = (smfr0 >> 63) << 31;
            let ezt0 = u64::from((sysreg::id_aa64pfr1_el1() >> 24) & 0xf >= 2) << 30;
            core::arch::asm!("msr s3_4_c1_c2_6, {}", in(reg) 0xf | fa64 | ezt0, options(nostack));
        }
        sysreg::set_mdcr_el2(hpmn);
        sysreg::set_hstr_el2(0);
        // HCRX_EL2 resets UNKNOWN: the host's EL1 features, nothing else.
        if features::has_hcx(sysreg::id_aa64mmfr1_el1()) {
            sysreg::set_hcrx_el2(features::host_hcrx(&features::HcrxIds {
                pfr1: sysreg::id_aa64pfr1_el1(),
                pfr2: sysreg::id_aa64pfr2_el1(),
                isar1: sysreg::id_aa64isar1_el1(),
                isar2: sysreg::id_aa64isar2_el1(),
                mmfr3: sysreg::id_aa64mmfr3_el1(),
            }));
        }
        // The fine-grained traps reset UNKNOWN too: none for the host.
        let fgt = features::fgt_version(sysreg::id_aa64mmfr0_el1());
        if fgt != 0 {
            let ids = fgt_ids();
            sysreg::set_fgt(fgt, &features::host_fgt(&ids));
            // HAFGRTR_EL2 exists with AMU (PFR0 [47:44]); it has no n fields.
            if (ids.pfr0 >> 44) & 0xf != 0 {
                sysreg::set_hafgrtr_el2(0);
            }
        }
        // EL1 may use the physical counter and timer.
        sysreg::set_cnthctl_el2(0b11);
        sysreg::set_cntvoff_el2(0);
        // The host uses the GIC's system registers directly; no vGIC.
        sysreg::set_icc_sre_el2(0b1001);
        sysreg::set_ich_hcr_el2(0);
        sysreg::set_vpidr_el2(sysreg::midr_el1());
        sysreg::set_vmpidr_el2(sysreg::mpidr_el1());
        // SCTLR_EL1: RES1 bits only (MMU off, little-endian), as at reset.
        sysreg::set_sctlr_el1(0x30d0_0800);
        sysreg::set_vtcr_el2(vtcr | VTCR_RES1);
        sysreg::set_vttbr_el2(vttbr);
        barrier::isb();
        // Every VMID: the host's (0), and those keel's guests will have,
        // which earlier EL2 software (firmware, a kexec'd hypervisor) may
        // have used too.
        tlb::alle1is();
        barrier::dsb_ish();
        sysreg::set_hcr_el2(HCR_HOST);
    }
    barrier::isb();
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn overflow_stack(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    overflow_stack(depth + 1).wrapping_add(frame[(depth % 64) as usize])
}

/// Boots the host; never returns.
pub fn init(info: &BootInfo, plan: &Layout, boot_dtb: &[u8]) -> ! {
    let mut pool = match PagePool::new(0) {
        Ok(p) => p,
        Err(e) => boot_fail(format_args!("page pool: {e:?}")),
    };
    // SAFETY: the plan reserved this range for the pool alone; it is RAM,
    // identity mapped (MMU off now, stage 1 later).
    if let Err(e) = unsafe { pool.add_range(plan.pool.start, plan.pool.size() as usize) } {
        boot_fail(format_args!("page pool: {e:?}"));
    }

    // The host's device tree, written while the MMU is off and all of RAM
    // is reachable.
    let edits = HostDtbEdits {
        remove: &[plan.reserved],
        bootargs: info.kernel.bootargs,
        initrd: info.ramdisk,
    };
    // SAFETY: the plan placed host_dtb in host RAM that overlaps neither the
    // boot DTB, the modules nor the reservation.
    let out = unsafe {
        core::slice::from_raw_parts_mut(
            plan.host_dtb.start as *mut u8,
            plan.host_dtb.size() as usize,
        )
    };
    let host_dtb_len = match keel_boot::dt::write_host_dtb(boot_dtb, out, &edits) {
        Ok(n) => n,
        Err(e) => boot_fail(format_args!("host device tree: {e}")),
    };

    // Per-CPU data: the boot CPU's (entry.S took slot 0) and the others'.
    let slot = plan.stack_slot(0);
    let mut mpidrs = [0u64; keel_boot::dt::MAX_CPUS];
    for (m, cpu) in mpidrs.iter_mut().zip(info.cpus.iter()) {
        *m = cpu.mpidr;
    }
    smp::init_cpus(&mpidrs[..info.cpus.len()], |i| {
        let s = plan.stack_slot(i);
        (s.guard.start, s.stack.end, s.emergency.end)
    });

    // Enough for the tables of any one donation (host stage-2 splits at both
    // ends, the hypervisor's stage-1 tables at both ends), so the host can
    // always refill the pool.
    pool.set_reserve(DONATION_RESERVE);

    // Each CPU's GIC redistributor, for the host's tick during guest runs.
    let mut gicr = [(0u64, 0u64); keel_boot::dt::MAX_GICR_REGIONS];
    for (g, r) in gicr.iter_mut().zip(info.gic.redistributors.iter()) {
        *g = (r.start, r.end);
    }
    let gicr = &gicr[..info.gic.redistributors.len()];
    super::timer::discover(gicr, smp::index_of);

    let s1 = match mmu::build(
        &image_sections(),
        plan,
        info.cpus.len(),
        Some(info.uart.start),
        gicr,
        &mut pool,
    ) {
        Ok(s) => s,
        Err(e) => boot_fail(format_args!("hypervisor stage 1: {e:?}")),
    };
    // The fixmap slot: its tables now, its descriptor cleared until used.
    let mut s1 = s1;
    let fixmap_pte = s1
        .map_pages(FIXMAP_VA, plan.pool.start, 4096, Perm::ReadWrite, &mut pool)
        .ok()
        .and_then(|()| s1.page_entry_ptr(FIXMAP_VA, &pool));
    let Some(fixmap_pte) = fixmap_pte else {
        boot_fail(format_args!("hypervisor stage 1: fixmap slot"))
    };
    // SAFETY: the slot's descriptor in our own tables; the MMU is still off.
    unsafe { fixmap_pte.write_volatile(0) };
    let overflow_test = super::has_flag(info.bootargs, "keel.selftest=stack-overflow");
    smp::HYP_TTBR.store(s1.ttbr(), core::sync::atomic::Ordering::Release);
    mmu::enable(&s1);
    info!("MMU on: stage 1 at {:#x}", s1.ttbr());
    // (The boot DTB, and so `info`'s strings, are not mapped any more.)
    if overflow_test {
        // The harness's proof that the guard page works: recurse until the
        // stack runs into it, which must be reported, not corrupt memory.
        log::warn!("deliberate stack overflow (keel.selftest=stack-overflow)");
        let depth = overflow_stack(0);
        boot_fail(format_args!("the stack never overflowed ({depth} frames)"));
    }

    {
        let len = DonatedPages::words_for(plan.ram.pages());
        // SAFETY: the plan set `plan.donated` aside for these words alone
        // (page aligned, at least `len` of them); it is RAM, mapped
        // read-write in keel's stage 1 (the MMU is on), and withheld from
        // the host's stage 2, so nothing else refers to it, ever.
        let words = unsafe { core::slice::from_raw_parts_mut(plan.donated.start as *mut u64, len) };
        // SAFETY: only the boot CPU runs, and nothing else refers to
        // DONATED: the pool gets it only now.
        let donated = unsafe { &mut *core::ptr::addr_of_mut!(DONATED) };
        donated.attach(plan.ram, words);
        pool.attach_donated(donated);
    }
    let s2 = build_host_stage2(info, plan, &mut pool);
    let stats = s2.stats();
    smp::HOST_VTTBR.store(s2.vttbr(), core::sync::atomic::Ordering::Release);
    smp::HOST_VTCR.store(s2.vtcr(), core::sync::atomic::Ordering::Release);
    configure_el2_for_host(s2.vtcr(), s2.vttbr());
    info!(
        "host stage 2: {}-bit IPA, {} root + {} table pages; {} pool pages free",
        s2.geometry().ipa_bits(),
        stats.root_pages,
        stats.table_pages,
        pool.free_pages()
    );
    info!(
        "figures: hyp_reserved_bytes={} host_stage2_table_pages={}",
        plan.reserved.size(),
        stats.root_pages + stats.table_pages
    );

    let ram: [Range; keel_boot::dt::MAX_RAM_REGIONS] = core::array::from_fn(|i| {
        let r = info.ram.as_slice().get(i).copied().unwrap_or_default();
        Range::new(r.start, r.end)
    });
    let mem = Memory {
        ram: Ram::new(&ram),
        host: s2,
        hyp: s1,
        pool,
        mmu: HwMmu {
            fixmap_pte: fixmap_pte as u64,
        },
    };
    {
        let words = plan.ram.pages() as usize;
        // SAFETY: the plan set `plan.lent` aside for these words alone
        // (4 bytes per page of RAM, page aligned); it is RAM,
        // mapped read-write in keel's stage 1 (the MMU is on), and withheld
        // from the host's stage 2, so nothing else refers to it, ever.
        let lent = unsafe { core::slice::from_raw_parts_mut(plan.lent.start as *mut u32, words) };
        VMS.lock().lent.attach(plan.ram, lent);
    }
    let hyp = Hyp::new(mem, &VMS);
    // What guests read of the ID registers: the CPUs' common values (this
    // one's so far; each secondary adds its own), less what keel does not
    // switch for them.
    // The first CPU: nothing to be narrower than.
    let _ = hyp.guest_ids.lock().add_cpu(&sysreg::aa64_id_regs());
    keel_arch::gic::note_cpu();
    if keel_arch::errata::note_cpu(sysreg::midr_el1()) {
        info!(
            "speculative-AT workaround on (this CPU, MIDR {:#x})",
            sysreg::midr_el1()
        );
    }
    HYP.call_once(|| hyp);

    let entry = info.kernel.range.start;
    info!(
        "entering host at {entry:#x} (EL1h), device tree at {:#x} ({host_dtb_len} bytes)",
        plan.host_dtb.start
    );
    let mut frame = TrapFrame::default();
    frame.x[0] = plan.host_dtb.start;
    // SAFETY: the host stage 2 and EL2 configuration are in force; the host
    // starts at EL1h with DAIF masked at its kernel's first byte; the boot
    // stack is not needed again.
    unsafe {
        sysreg::set_elr_el2(entry);
        sysreg::set_spsr_el2(0x3c5);
        exception::enter_lower(&frame, slot.stack.end)
    }
}
