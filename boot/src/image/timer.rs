//! The per-CPU interrupts a guest run changes in this CPU's GIC
//! redistributor.
//!
//! - The host's timer tick. Linux at EL1 takes its tick from the virtual
//!   timer, which a guest run switches to the guest's values. So that the
//!   host still gets control back when its tick is due, keel arms the EL2
//!   physical timer (PPI 26) with the host's deadline for the length of the
//!   run: with HCR_EL2.IMO set it ends the run with an IRQ exit, and once
//!   the host's own timer is back its interrupt is pending as usual. The
//!   timer is disabled again before the host resumes.
//! - The virtual CPU interface's maintenance interrupt (PPI 25), which ends
//!   a run when a list register the guest finished with is needed for an
//!   interrupt that waits (keel_hyp::vgic).
//! - The guest's virtual timer (PPI 27, which the host's timer uses too):
//!   while the timer asserts it, or its virtual interrupt is in flight in
//!   a list register linked to it, the physical interrupt is made active
//!   for the run, so it does not end the run again and again; the guest's
//!   deactivation of the virtual interrupt deactivates it. It is made
//!   inactive again once the host's timer is back, so the host's own timer
//!   interrupt is never held back.
//!
//! PPIs 25 and 26 are enabled only for the run (the host's GIC
//! configuration leaves them off: nothing of the host uses them).

use core::sync::atomic::{AtomicU64, Ordering};

use keel_arch::barrier;
use keel_boot::layout::MAX_CPUS;

use super::this_cpu;

/// The EL2 physical timer's PPI.
const HYP_TIMER_PPI: u32 = 26;
/// The virtual CPU interface's maintenance interrupt (the PPI the Server
/// Base System Architecture assigns it, QEMU's `virt` too).
const MAINTENANCE_PPI: u32 = 25;
/// The EL1 virtual timer's PPI.
const VTIMER_PPI: u32 = 27;
/// GICv3 redistributor: RD frame + SGI frame.
const GICR_FRAME: u64 = 0x2_0000;
const GICR_TYPER: u64 = 0x8;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_TYPER_VLPIS: u64 = 1 << 1;
const GICR_SGI_ISENABLER0: u64 = 0x1_0000 + 0x100;
const GICR_SGI_ICENABLER0: u64 = 0x1_0000 + 0x180;
const GICR_SGI_ISACTIVER0: u64 = 0x1_0000 + 0x300;
const GICR_SGI_ICACTIVER0: u64 = 0x1_0000 + 0x380;

/// Each CPU's redistributor (RD base; 0 if not found).
static GICR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Finds every CPU's redistributor in `regions`. `index_of` maps an MPIDR
/// affinity to a CPU index. Runs on the boot CPU with the MMU off.
pub fn discover(regions: &[(u64, u64)], index_of: impl Fn(u64) -> Option<usize>) {
    for &(start, end) in regions {
        let mut frame = start;
        while frame + GICR_FRAME <= end {
            // SAFETY: a GICv3 redistributor frame the device tree lists;
            // GICR_TYPER is a read-only identification register.
            let typer = unsafe { ((frame + GICR_TYPER) as *const u64).read_volatile() };
            let aff = typer >> 32;
            let mpidr = (aff & 0xff_ffff) | ((aff >> 24) << 32);
            if let Some(i) = index_of(mpidr) {
                GICR[i].store(frame, Ordering::Relaxed);
            }
            if typer & GICR_TYPER_LAST != 0 {
                break;
            }
            frame += if typer & GICR_TYPER_VLPIS != 0 {
                2 * GICR_FRAME
            } else {
                GICR_FRAME
            };
        }
    }
}

/// Writes `bits` to the set/clear register at `offset` of this CPU's
/// redistributor's SGI frame.
fn write_sgi_frame(offset: u64, bits: u32) {
    let Some(rd) = GICR
        .get(this_cpu().cpu_index as usize)
        .map(|g| g.load(Ordering::Relaxed))
    else {
        return;
    };
    if rd == 0 {
        return;
    }
    // SAFETY: this CPU's redistributor, mapped in keel's stage 1 as Device
    // memory; the set/clear-enable and set/clear-active registers only
    // affect the bits written.
    unsafe { ((rd + offset) as *mut u32).write_volatile(bits) };
}

/// Before a guest run (before the guest's timer registers are loaded):
/// arms the EL2 timer at the host's virtual-timer deadline, if its timer
/// is armed (CNTV_CTL: ENABLE set, IMASK clear); enables the maintenance
/// interrupt; and makes the physical virtual-timer interrupt active if the
/// guest's is to be held (`hold_vtimer`: in flight in a list register, or
/// asserted and waiting for one).
pub fn run_begins(cntv_ctl: u64, cntv_cval: u64, hold_vtimer: bool) {
    let mut enable = 1 << MAINTENANCE_PPI;
    if cntv_ctl & 0b11 == 0b01 {
        // With CNTVOFF_EL2 = 0 the virtual and physical counts are the same.
        // SAFETY: the EL2 physical timer belongs to keel alone.
        unsafe {
            core::arch::asm!("msr cnthp_cval_el2, {}", in(reg) cntv_cval, options(nostack));
            core::arch::asm!("msr cnthp_ctl_el2, {}", in(reg) 1u64, options(nostack));
        }
        enable |= 1 << HYP_TIMER_PPI;
    }
    write_sgi_frame(GICR_SGI_ISENABLER0, enable);
    if hold_vtimer {
        write_sgi_frame(GICR_SGI_ISACTIVER0, 1 << VTIMER_PPI);
    }
    // The redistributor writes complete before the guest runs.
    barrier::dsb_sy();
    barrier::isb();
}

/// After the run, once the host's timer registers are back: undoes
/// [`run_begins`] (the EL2 timer's interrupt, level-sensitive, is no
/// longer pending once it is disabled).
pub fn run_ends(hold_vtimer: bool) {
    // SAFETY: as above.
    unsafe { core::arch::asm!("msr cnthp_ctl_el2, {}", in(reg) 0u64, options(nostack)) };
    write_sgi_frame(
        GICR_SGI_ICENABLER0,
        (1 << HYP_TIMER_PPI) | (1 << MAINTENANCE_PPI),
    );
    if hold_vtimer {
        write_sgi_frame(GICR_SGI_ICACTIVER0, 1 << VTIMER_PPI);
    }
    barrier::dsb_sy();
    barrier::isb();
}
