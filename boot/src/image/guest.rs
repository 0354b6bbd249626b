//! VCPU_RUN: the world switch between the host and a protected guest.
//!
//! The host's HVC is being handled on this CPU's stack. VCPU_RUN saves what
//! belongs to the host at EL1 (system registers, FP/SIMD, the HVC's return
//! state, the EL2 controls that differ for guests), loads the guest's, and
//! enters it. A trap from the guest comes back through the same vectors:
//! calls keel answers itself are handled in place and the guest resumes at
//! once; anything else ends the run, and the host state is put back before
//! VCPU_RUN returns the exit to the host.

use keel_arch::exception::kind;
use keel_arch::features::ExtFeatures;
use keel_arch::guest::{self as world, el1, El1Regs, ExtRegs, FpRegs, HostSave};
use keel_arch::{barrier, features, gic, inject, sysreg, tlb, TrapFrame};
use keel_hyp::guest::{Action, Trap, TrapKind};
use keel_hyp::host::RunTicket;
use keel_hyp::hvc::Return;
use keel_hyp::vgic;
use keel_hyp::vm::Vcpu;

use super::{this_cpu, Hyp, HYP};

// Every CPU keel runs on has its own record of the vCPU that last ran there.
const _: () = assert!(keel_boot::layout::MAX_CPUS <= keel_hyp::vm::MAX_CPUS);

/// HCR_EL2 while a guest runs: stage 2 (VM); FIQ, IRQ and SError routed to
/// EL2 (FMO, IMO, AMO), so a physical interrupt ends the run and reaches the
/// host; its TLB and barrier operations broadcast to the inner-shareable
/// domain (FB, BSU), since its vCPUs may move between CPUs; cache
/// maintenance by set/way (TSW: it could discard the host's dirty lines),
/// ACTLR (TACR) and implementation-defined registers (TIDCP) trapped; SMC
/// trapped (TSC); ID registers trapped (TID3: keel_hyp::sysreg answers
/// them, without the features keel does not switch); RAS error records
/// trapped (TERR: they describe the host's errors; read as zero);
/// LORegions trapped (TLOR: not switched; read as zero); EL1 is AArch64
/// (RW); pointer authentication untrapped (APK, API).
const HCR_GUEST: u64 = 1
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 9)
    | (1 << 10)
    | (1 << 18)
    | (1 << 19)
    | (1 << 20)
    | (1 << 21)
    | (1 << 22)
    | (1 << 31)
    | (1 << 35)
    | (1 << 36)
    | (1 << 40)
    | (1 << 41);
/// CPTR_EL2 (non-VHE) for guests: FP/SIMD untrapped (keel switches it);
/// SVE (TZ), SME (TSM), trace registers (TTA) and the activity monitors
/// (TAM) trapped, as keel does not switch their state (keel_hyp::sysreg
/// answers them).
const CPTR_GUEST: u64 = 0x32ff | (1 << 8) | (1 << 12) | (1 << 20) | (1 << 30);
/// CNTHCTL_EL2: guests read the counter, but the physical timer is the host's.
const CNTHCTL_GUEST: u64 = 1;
/// MDCR_EL2 traps for guests: PMU (TPMCR, TPM), debug (TDA, TDOSA, TDRA),
/// SPE (TPMS; E2PB 0 traps its buffer, E2TB 0 the trace buffer's) and the
/// trace filter (TTRF).
const MDCR_GUEST_TRAPS: u64 =
    (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 14) | (1 << 19);
/// VTCR_EL2 RES1 bit.
const VTCR_RES1: u64 = 1 << 31;

/// One guest run on this CPU; `CpuLocal::guest_run` points here meanwhile.
struct GuestRun {
    save: HostSave,
    vcpu: *mut Vcpu,
    slot: usize,
    exit: [u64; 4],
}

/// What the host had in the registers a guest run changes.
struct HostState {
    el1: El1Regs,
    /// The CPU's optional EL1 registers (keys, TPIDR2_EL0) and which exist.
    ext: ExtRegs,
    has: ExtFeatures,
    fp: FpRegs,
    elr: u64,
    spsr: u64,
    vttbr: u64,
    vtcr: u64,
    hcr: u64,
    cptr: u64,
    mdcr: u64,
    cnthctl: u64,
    vmpidr: u64,
    /// HCRX_EL2, if the CPU has it (FEAT_HCX).
    hcrx: Option<u64>,
    /// The FEAT_FGT version (0: none) and the fine-grained trap registers.
    fgt: (u64, features::Fgt),
    /// PMCNTENSET_EL0 and PMINTENSET_EL1, if the CPU has a PMUv3: the
    /// host's counters and overflow interrupts stop while a guest runs.
    pmu: Option<(u64, u64)>,
}

fn save_host() -> HostState {
    let mut fp = FpRegs::default();
    fp.save();
    let has = ExtFeatures::from_ids(
        sysreg::id_aa64isar1_el1(),
        sysreg::id_aa64isar2_el1(),
        sysreg::id_aa64pfr1_el1(),
    );
    HostState {
        el1: El1Regs::save(),
        ext: ExtRegs::save(has),
        has,
        fp,
        elr: sysreg::elr_el2(),
        spsr: sysreg::spsr_el2(),
        vttbr: sysreg::vttbr_el2(),
        vtcr: sysreg::vtcr_el2(),
        hcr: sysreg::hcr_el2(),
        cptr: sysreg::cptr_el2(),
        mdcr: sysreg::mdcr_el2(),
        cnthctl: sysreg::cnthctl_el2(),
        vmpidr: sysreg::vmpidr_el2(),
        hcrx: features::has_hcx(sysreg::id_aa64mmfr1_el1()).then(sysreg::hcrx_el2),
        fgt: {
            let version = features::fgt_version(sysreg::id_aa64mmfr0_el1());
            (version, sysreg::fgt(version))
        },
        pmu: features::has_pmuv3(sysreg::id_aa64dfr0_el1())
            .then(|| (sysreg::pmcntenset_el0(), sysreg::pmintenset_el1())),
    }
}

fn restore_host(h: &HostState) {
    // SAFETY: these are the values the host ran with when it made the call.
    unsafe {
        // The guest's stage 1 was quiesced (`vcpu_run`) before this: the
        // host's stage 2 comes back first, then the host's EL1 registers.
        sysreg::set_hcr_el2(h.hcr);
        sysreg::set_vttbr_el2(h.vttbr);
        sysreg::set_vtcr_el2(h.vtcr);
        sysreg::set_cptr_el2(h.cptr);
        sysreg::set_mdcr_el2(h.mdcr);
        sysreg::set_cnthctl_el2(h.cnthctl);
        sysreg::set_vmpidr_el2(h.vmpidr);
        if let Some(hcrx) = h.hcrx {
            sysreg::set_hcrx_el2(hcrx);
        }
        sysreg::set_fgt(h.fgt.0, &h.fgt.1);
        if let Some((counters, interrupts)) = h.pmu {
            sysreg::set_pmcntenset_el0(counters);
            sysreg::set_pmintenset_el1(interrupts);
        }
        h.el1.restore_quiesced();
        h.ext.restore(h.has);
        sysreg::set_elr_el2(h.elr);
        sysreg::set_spsr_el2(h.spsr);
    }
    h.fp.restore();
    barrier::isb();
}

fn load_guest(vcpu: &Vcpu, ticket: &RunTicket, index: u64, host: &HostState) {
    FpRegs {
        v: vcpu.fp.v,
        fpsr: vcpu.fp.fpsr,
        fpcr: vcpu.fp.fpcr,
    }
    .restore();
    // SAFETY: the guest's own EL1 state and the EL2 controls for guests;
    // nothing runs at EL1 until the ERET into the guest.
    unsafe {
        // The host's stage 1 stops walking before its stage 2 goes, and the
        // guest's stage 2 is in place before its stage 1 can walk
        // (`El1Regs::restore_quiesced`).
        let _ = El1Regs::quiesce();
        sysreg::set_vttbr_el2(ticket.vttbr);
        sysreg::set_vtcr_el2(ticket.vtcr | VTCR_RES1);
        El1Regs { r: vcpu.el1 }.restore_quiesced();
        ExtRegs { r: vcpu.ext }.restore(host.has);
        // The host's PMU counts nothing of the guest (its events would be a
        // side channel), and raises no overflow interrupt inside it.
        if host.pmu.is_some() {
            sysreg::set_pmcntenclr_el0(0xffff_ffff);
            sysreg::set_pmintenclr_el1(0xffff_ffff);
        }
        sysreg::set_cptr_el2(CPTR_GUEST);
        sysreg::set_mdcr_el2((host.mdcr & 0x1f) | MDCR_GUEST_TRAPS);
        sysreg::set_cnthctl_el2(CNTHCTL_GUEST);
        sysreg::set_vmpidr_el2((1 << 31) | index);
        // No HCRX_EL2 feature for guests: TCR2_EL1, SCTLR2_EL1 are not
        // switched (their accesses trap, and are undefined for the guest).
        if host.hcrx.is_some() {
            sysreg::set_hcrx_el2(0);
        }
        // Fine-grained traps: every n field 0, so a guest's access to the
        // registers of a feature it is told it lacks (SME, GCS, S1PIE,
        // BRBE, ...: none of them switched) traps, and reads as zero or is
        // undefined for it; nothing else traps (features::host_fgt).
        sysreg::set_fgt(host.fgt.0, &features::Fgt::default());
        sysreg::set_hcr_el2(HCR_GUEST);
        sysreg::set_elr_el2(vcpu.pc);
        sysreg::set_spsr_el2(vcpu.pstate);
    }
    barrier::isb();
}

/// VCPU_RUN from the host, with its registers in `frame`.
pub fn vcpu_run(hyp: &Hyp, frame: &mut TrapFrame) {
    let (handle, index, completion) = (frame.x[1], frame.x[2], frame.x[3]);
    let cpu = this_cpu().cpu_index as usize;
    let ticket = match hyp.begin_run_on(handle, index, completion, cpu) {
        Ok(t) => t,
        Err(ret) => return ret.apply(&mut frame.x),
    };
    // SAFETY: the ticket makes this vCPU ours until end_run.
    let vcpu = unsafe { &mut *ticket.vcpu };
    let host = save_host();
    // The virtual interrupts: the guest's timer as it stands now, and the
    // host's that wait, in the list registers. The physical PPI 27 is held
    // (active) before the guest's timer is loaded, so that the timer's
    // level never reaches the CPU interface meanwhile.
    let shape = gic::common_shape();
    let timer = vgic::timer_asserted(
        vcpu.el1[el1::CNTV_CTL],
        vcpu.el1[el1::CNTV_CVAL],
        sysreg::cntpct_el0(),
    );
    let entry = vcpu.vgic.prepare(timer, shape.lrs);
    super::timer::run_begins(
        host.el1.r[el1::CNTV_CTL],
        host.el1.r[el1::CNTV_CVAL],
        entry.hold_timer_ppi,
    );
    load_guest(vcpu, &ticket, index, &host);
    if ticket.flush_local {
        // Under the guest's VTTBR (load_guest): its VMID's entries here.
        tlb::vmalle1_local();
    }
    // SAFETY: the guest's own interrupt state, for the run that follows.
    unsafe {
        let v = &vcpu.vgic;
        gic::restore(shape, &v.lr, &v.apr, v.vmcr, entry.hcr)
    };
    let mut run = GuestRun {
        save: HostSave::default(),
        vcpu: ticket.vcpu,
        slot: ticket.slot,
        exit: [0; 4],
    };
    let guest_frame = TrapFrame { x: vcpu.x, _pad: 0 };
    let run_ptr: *mut GuestRun = &mut run;
    set_guest_run(run_ptr as u64);
    // SAFETY: the guest's state is loaded; `run.save` stays valid until the
    // trap handler leaves through it.
    unsafe { world::enter(&guest_frame, &mut (*run_ptr).save) };
    set_guest_run(0);
    // The trap handler stored the guest's registers and the exit.
    vcpu.el1 = El1Regs::save().r;
    // SAFETY: the guest's registers are saved, and nothing runs at EL1
    // until `restore_host` has loaded the host's.
    let _ = unsafe { El1Regs::quiesce() };
    vcpu.ext = ExtRegs::save(host.has).r;
    let v = &mut vcpu.vgic;
    gic::save(shape, &mut v.lr, &mut v.apr, &mut v.vmcr);
    // SAFETY: the host has no virtual CPU interface.
    unsafe { gic::set_hcr(0) };
    let mut fp = FpRegs::default();
    fp.save();
    vcpu.fp.v = fp.v;
    vcpu.fp.fpsr = fp.fpsr;
    vcpu.fp.fpcr = fp.fpcr;
    restore_host(&host);
    // With the host's timer back: the physical PPI 27 is released to it.
    super::timer::run_ends(entry.hold_timer_ppi);
    hyp.end_run(&ticket);
    // SAFETY: written by the trap handler through `run_ptr` before it left.
    let exit = unsafe { core::ptr::read_volatile(&(*run_ptr).exit) };
    Return {
        regs: [0, exit[0], exit[1], exit[2], exit[3]],
        count: 5,
    }
    .apply(&mut frame.x);
}

fn set_guest_run(ptr: u64) {
    let cpu = this_cpu() as *const keel_arch::CpuLocal as *mut keel_arch::CpuLocal;
    // SAFETY: this CPU's own CpuLocal; no other CPU writes it.
    unsafe { core::ptr::addr_of_mut!((*cpu).guest_run).write_volatile(ptr) };
}

/// A trap taken while this CPU runs a guest (from the vectors).
pub fn trap(k: u64, frame: &mut TrapFrame) {
    let run = this_cpu().guest_run as *mut GuestRun;
    // SAFETY: guest_run points at the live GuestRun of vcpu_run on this
    // CPU's stack (it is cleared before that frame goes away).
    let run = unsafe { &mut *run };
    // SAFETY: the run's vCPU is ours while it is Running.
    let vcpu = unsafe { &mut *run.vcpu };
    // The general registers stay in the frame: a call answered in place
    // reads and writes them there, and only an exit copies them out.
    vcpu.pc = sysreg::elr_el2();
    vcpu.pstate = sysreg::spsr_el2();
    let trap = Trap {
        kind: match k {
            kind::LOWER64_SYNC => TrapKind::Sync,
            // A physical FIQ is an interrupt for the host like an IRQ (ESR_EL2
            // says nothing of either).
            kind::LOWER64_IRQ | kind::LOWER64_FIQ => TrapKind::Irq,
            _ => TrapKind::Other,
        },
        esr: sysreg::esr_el2(),
        far: sysreg::far_el2(),
        hpfar: sysreg::hpfar_el2(),
    };
    let hyp = HYP.get().expect("a guest runs only after boot");
    let mut action = hyp.guest_trap_in(run.slot, vcpu, &mut frame.x, &trap);
    loop {
        match action {
            Action::Resume => {
                // SAFETY: the guest continues where its registers say.
                unsafe {
                    sysreg::set_elr_el2(vcpu.pc);
                    sysreg::set_spsr_el2(vcpu.pstate);
                }
                return;
            }
            Action::Exit(exit) => {
                vcpu.x = frame.x;
                run.exit = exit;
                // SAFETY: called from the trap handler of the guest that
                // vcpu_run entered on this CPU; the stack below is dropped.
                unsafe { world::leave(&run.save, 0) }
            }
            Action::Undefined(esr) => {
                let i = inject::undefined(vcpu.pstate, sysreg::sctlr_el1(), sysreg::vbar_el1());
                let Some(i) = i else {
                    action = hyp.fault(vcpu, esr);
                    continue;
                };
                // SAFETY: the guest's EL1 registers are the CPU's while it
                // traps; this is the architecture's exception entry to its
                // EL1: the interrupted PC and PSTATE to ELR_EL1/SPSR_EL1,
                // the syndrome to ESR_EL1, and the guest resumes at its own
                // vector.
                unsafe {
                    sysreg::set_elr_el1(vcpu.pc);
                    sysreg::set_spsr_el1(vcpu.pstate);
                    sysreg::set_esr_el1(i.esr);
                }
                vcpu.pc = i.vector;
                vcpu.pstate = i.spsr;
                action = Action::Resume;
            }
        }
    }
}
