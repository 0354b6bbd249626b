//! Virtual interrupts for protected guests: what keel puts in a vCPU's
//! GICv3 list registers.
//!
//! A guest's GIC CPU interface is the CPU's virtual one: with
//! ICH_HCR_EL2.En set while it runs, its ICC_IAR1/EOIR1/PMR/IGRPEN1
//! accesses reach ICV_* registers, and a list register (ICH_LR<n>_EL2) in
//! the pending state is an interrupt it takes. keel owns those registers
//! and switches them with the vCPU, so the host never reads what a guest
//! acknowledged and cannot forge an interrupt state keel did not put there.
//!
//! Interrupts come from two places:
//! - the host, with KEEL_VCPU_IRQ (its VMM emulates the distributor and
//!   redistributor that the guest programs over MMIO exits, and asks for
//!   an interrupt once the guest's configuration lets it through); an
//!   interrupt asked for twice before the guest takes it is taken once,
//!   as an edge-triggered interrupt is;
//! - the guest's own virtual timer (PPI 27), which keel drives itself: the
//!   host never sees the timer's registers. It is level-sensitive: pending
//!   while the timer's condition holds (enabled, unmasked, expired), and
//!   withdrawn if the guest changes the timer before taking it. Its list
//!   register is linked to the physical PPI 27 (the HW bit): the image
//!   keeps the physical interrupt active while the virtual one is in
//!   flight, and the guest's deactivation of the virtual one deactivates
//!   it, so the timer cannot interrupt the guest again until then.
//!
//! Interrupts beyond the CPU's list registers wait in a queue of
//! [`QUEUE`]; while one waits, each list register the host's interrupts
//! occupy asks for an end-of-interrupt maintenance interrupt, which ends
//! the run so that the next entry refills them.
//!
//! This module is the bookkeeping, on saved register images; the image
//! (`boot`) moves them to and from the CPU.

use crate::mem::CallError;

/// List registers keel keeps per vCPU (the architecture's maximum; a CPU
/// has 1 to 16, ICH_VTR_EL2.ListRegs + 1).
pub const MAX_LRS: usize = 16;
/// Active-priority registers per group (ICH_AP0R<n>/ICH_AP1R<n>: 1, 2 or
/// 4 of them by the CPU's priority bits).
pub const MAX_APRS: usize = 4;
/// Host interrupts that can wait for a list register.
pub const QUEUE: usize = 32;
/// The guest's virtual timer interrupt (a PPI, as on every Arm platform
/// that follows the Server Base System Architecture, QEMU's `virt` too).
pub const VTIMER_INTID: u32 = keel_abi::VTIMER_INTID as u32;
/// The priority keel gives the virtual timer's interrupt: the default
/// priority Linux programs for every interrupt.
pub const VTIMER_PRIORITY: u8 = 0xa0;
/// The largest INTID the host can ask for: SGIs (0-15), PPIs (16-31) and
/// SPIs (32-1019). 1020-1023 are special, and LPIs need an ITS.
pub const MAX_INTID: u32 = 1019;

/// ICH_LR<n>_EL2 fields.
pub mod lr {
    pub const PENDING: u64 = 1 << 62;
    pub const ACTIVE: u64 = 1 << 63;
    /// The virtual interrupt is linked to the physical one in pINTID.
    pub const HW: u64 = 1 << 61;
    pub const GROUP1: u64 = 1 << 60;
    /// (HW clear) Deactivation raises an end-of-interrupt maintenance
    /// interrupt.
    pub const EOI: u64 = 1 << 41;
    pub const PINTID_SHIFT: u32 = 32;
    pub const PRIORITY_SHIFT: u32 = 48;

    /// The virtual INTID.
    pub fn intid(lr: u64) -> u32 {
        lr as u32
    }

    /// Pending, active, or both: the register holds an interrupt.
    pub fn in_flight(lr: u64) -> bool {
        lr & (PENDING | ACTIVE) != 0
    }

    /// A group-1 interrupt in the pending state.
    pub fn pending(intid: u32, priority: u8) -> u64 {
        PENDING | GROUP1 | (u64::from(priority) << PRIORITY_SHIFT) | u64::from(intid)
    }
}

/// ICH_HCR_EL2.En: the virtual CPU interface is on.
pub const HCR_EN: u64 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Queued {
    intid: u16,
    priority: u8,
}

/// A vCPU's virtual-interrupt state, kept in keel's memory.
#[derive(Clone, Copy, Debug)]
pub struct Vgic {
    /// ICH_LR<n>_EL2 as the vCPU last left them: only the CPU's first
    /// `lrs` (see [`prepare`](Self::prepare)) are ever filled.
    pub lr: [u64; MAX_LRS],
    /// ICH_AP0R<n>_EL2, then ICH_AP1R<n>_EL2: the guest's active
    /// priorities (nested interrupts it has acknowledged).
    pub apr: [u64; 2 * MAX_APRS],
    /// ICH_VMCR_EL2: the guest's ICC_PMR, binary points and group enables,
    /// which reach the virtual interface while it runs. Switched, or one
    /// guest would read what another wrote there.
    pub vmcr: u64,
    queue: [Queued; QUEUE],
    queued: u8,
    timer_enabled: bool,
    timer_priority: u8,
}

impl Default for Vgic {
    fn default() -> Self {
        Self::new()
    }
}

/// What the next entry loads besides the list registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// ICH_HCR_EL2 for the run.
    pub hcr: u64,
    /// The virtual timer's interrupt is in flight, or the timer asserts it
    /// (whether or not it is in a list register yet): the physical PPI 27
    /// must be active for the run (and is made inactive again after it).
    pub hold_timer_ppi: bool,
}

/// Whether a virtual timer with these CNTV_CTL_EL0 and CNTV_CVAL_EL0
/// values asserts its interrupt at count `now`: enabled, not masked, and
/// expired (ISTATUS is recomputed by the timer from these).
pub fn timer_asserted(ctl: u64, cval: u64, now: u64) -> bool {
    ctl & 0b11 == 0b01 && now >= cval
}

impl Vgic {
    pub const fn new() -> Self {
        Vgic {
            lr: [0; MAX_LRS],
            apr: [0; 2 * MAX_APRS],
            vmcr: 0,
            queue: [Queued {
                intid: 0,
                priority: 0,
            }; QUEUE],
            queued: 0,
            timer_enabled: true,
            timer_priority: VTIMER_PRIORITY,
        }
    }

    /// Host interrupts waiting for a list register.
    pub fn queued(&self) -> usize {
        usize::from(self.queued)
    }

    /// Makes `intid` pending for the guest at `priority` (KEEL_VCPU_IRQ).
    /// Already pending (in a list register or the queue): nothing changes,
    /// as for an edge that comes again before the first is taken. Active
    /// in a list register: pending again as well (active and pending).
    /// `Invalid` for an INTID past [`MAX_INTID`] or the virtual timer's
    /// (keel's own); `Busy` if the queue is full (run the vCPU first).
    /// Nothing changes on an error.
    pub fn inject(&mut self, intid: u64, priority: u64) -> Result<(), CallError> {
        if intid > u64::from(MAX_INTID) || intid == u64::from(VTIMER_INTID) || priority > 0xff {
            return Err(CallError::Invalid);
        }
        let (intid, priority) = (intid as u32, priority as u8);
        for l in self.lr.iter_mut() {
            if lr::in_flight(*l) && *l & lr::HW == 0 && lr::intid(*l) == intid {
                *l |= lr::PENDING;
                return Ok(());
            }
        }
        let queued = &self.queue[..self.queued()];
        if queued.iter().any(|q| u32::from(q.intid) == intid) {
            return Ok(());
        }
        if self.queued() == QUEUE {
            return Err(CallError::Busy);
        }
        self.queue[self.queued()] = Queued {
            intid: intid as u16,
            priority,
        };
        self.queued += 1;
        Ok(())
    }

    /// Before an entry on a CPU with `lrs` list registers (1 to 16; more
    /// are clamped): the virtual timer's interrupt follows its level
    /// (`timer`, from [`timer_asserted`]; none while the guest has it
    /// disabled, [`set_timer`](Self::set_timer)), and the interrupts that
    /// wait (the timer's, queued ones) go into the list registers highest
    /// priority first: into free ones, or in place of a pending one of
    /// lower priority, which goes back to the queue (the guest has not
    /// seen it yet). While any interrupt still waits, the host's
    /// interrupts in the list registers ask for an end-of-interrupt
    /// maintenance interrupt, so the run ends when one frees.
    pub fn prepare(&mut self, timer: bool, lrs: usize) -> Entry {
        let lrs = lrs.clamp(1, MAX_LRS);
        let asserted = timer;
        let timer = timer && self.timer_enabled;
        let mut timer_waits = timer;
        if let Some(i) = self.lr[..lrs].iter().position(|&l| is_timer(l)) {
            // Taken by the guest (active), it stays until the guest
            // deactivates it, whatever the timer does meanwhile; pending,
            // it is withdrawn if the level fell before the guest took it.
            if !timer && self.lr[i] & lr::ACTIVE == 0 {
                self.lr[i] = 0;
            }
            timer_waits = false;
        }
        // Each round places the best waiting interrupt, or stops; an
        // eviction only ever puts back one of strictly lower priority, so
        // the rounds are bounded (and capped besides).
        for _ in 0..QUEUE + MAX_LRS + 1 {
            let best = self.best_queued();
            let take_timer =
                timer_waits && best.is_none_or(|b| self.timer_priority <= self.queue[b].priority);
            let priority = match (take_timer, best) {
                (true, _) => self.timer_priority,
                (false, Some(b)) => self.queue[b].priority,
                (false, None) => break,
            };
            // A queued interrupt leaves the queue first, so an evicted one
            // always finds room there; the timer needs a free entry.
            let placed = if take_timer {
                None
            } else {
                best.map(|b| self.dequeue(b))
            };
            let at = match self.free(lrs) {
                Some(i) => Some(i),
                None if placed.is_some() || self.queued() < QUEUE => {
                    self.evictable(lrs, priority).inspect(|&i| {
                        let l = self.lr[i];
                        self.queue[self.queued()] = Queued {
                            intid: lr::intid(l) as u16,
                            priority: (l >> lr::PRIORITY_SHIFT) as u8,
                        };
                        self.queued += 1;
                    })
                }
                None => None,
            };
            match (at, placed) {
                (Some(i), Some(q)) => self.lr[i] = lr::pending(u32::from(q.intid), q.priority),
                (Some(i), None) => {
                    self.lr[i] = lr::pending(VTIMER_INTID, self.timer_priority)
                        | lr::HW
                        | (u64::from(VTIMER_INTID) << lr::PINTID_SHIFT);
                    timer_waits = false;
                }
                (None, Some(q)) => {
                    // No room for it: back where it was, and no further
                    // interrupt does better.
                    self.queue[self.queued()] = q;
                    self.queued += 1;
                    break;
                }
                (None, None) => break,
            }
        }
        let waits = timer_waits || self.queued > 0;
        let mut timer_in_flight = false;
        for l in self.lr[..lrs].iter_mut() {
            if *l & lr::HW != 0 {
                timer_in_flight |= lr::in_flight(*l);
            } else if waits && lr::in_flight(*l) {
                *l |= lr::EOI;
            } else {
                *l &= !lr::EOI;
            }
        }
        Entry {
            hcr: HCR_EN,
            // Also whenever the timer is asserted (its interrupt waiting
            // for a list register, or disabled by the guest): else the
            // physical PPI would end every run at once, before the guest
            // could free a register or change its timer.
            hold_timer_ppi: timer_in_flight || asserted,
        }
    }

    /// The virtual timer's configuration in the guest's redistributor (its
    /// VMM emulates it): enabled, at `priority` (KEEL_VCPU_VTIMER). Off, no
    /// timer interrupt is made pending (one the guest has taken stays
    /// until it ends it); by default it is on at [`VTIMER_PRIORITY`].
    pub fn set_timer(&mut self, enabled: bool, priority: u8) {
        self.timer_enabled = enabled;
        self.timer_priority = priority;
    }

    /// The queued interrupt of highest priority (lowest value).
    fn best_queued(&self) -> Option<usize> {
        let queued = &self.queue[..self.queued()];
        (0..queued.len()).min_by_key(|&j| queued[j].priority)
    }

    /// Takes entry `j` out of the queue.
    fn dequeue(&mut self, j: usize) -> Queued {
        let q = self.queue[j];
        self.queued -= 1;
        self.queue[j] = self.queue[self.queued()];
        q
    }

    /// The list register below `lrs` holding a host interrupt that is
    /// pending only (not yet acknowledged) at a priority strictly lower
    /// than `priority` (a higher value): the lowest such.
    fn evictable(&self, lrs: usize, priority: u8) -> Option<usize> {
        (0..lrs)
            .filter(|&i| {
                let l = self.lr[i];
                l & (lr::PENDING | lr::ACTIVE | lr::HW) == lr::PENDING
                    && (l >> lr::PRIORITY_SHIFT) as u8 > priority
            })
            .max_by_key(|&i| (self.lr[i] >> lr::PRIORITY_SHIFT) as u8)
    }

    /// A list register below `lrs` that holds nothing.
    fn free(&self, lrs: usize) -> Option<usize> {
        self.lr[..lrs].iter().position(|&l| !lr::in_flight(l))
    }
}

/// A list register that holds the virtual timer's interrupt.
fn is_timer(l: u64) -> bool {
    lr::in_flight(l) && l & lr::HW != 0 && lr::intid(l) == VTIMER_INTID
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(v: &Vgic) -> Vec<(u32, u64)> {
        v.lr.iter()
            .filter(|&&l| lr::in_flight(l))
            .map(|&l| (lr::intid(l), l >> 62))
            .collect()
    }

    #[test]
    fn an_injected_interrupt_is_pending_in_a_list_register_at_entry() {
        let mut v = Vgic::new();
        v.inject(40, 0x80).unwrap();
        assert_eq!(v.lr, [0; MAX_LRS], "nothing is loaded before the entry");
        let e = v.prepare(false, 4);
        assert_eq!(
            e,
            Entry {
                hcr: HCR_EN,
                hold_timer_ppi: false
            }
        );
        assert_eq!(v.lr[0], lr::PENDING | lr::GROUP1 | (0x80 << 48) | 40);
        assert_eq!(v.queued(), 0);
    }

    #[test]
    fn bad_interrupts_are_refused_and_change_nothing() {
        let mut v = Vgic::new();
        v.inject(33, 0).unwrap();
        let before = (v.lr, v.queue, v.queued);
        for (intid, prio) in [(1020, 0), (1023, 0), (u64::MAX, 0), (27, 0), (40, 0x100)] {
            assert_eq!(
                v.inject(intid, prio),
                Err(CallError::Invalid),
                "{intid} {prio}"
            );
            assert_eq!((v.lr, v.queue, v.queued), before);
        }
        for intid in [0, 15, 16, 26, 28, 31, 32, 1019] {
            v.inject(intid, 0xa0).unwrap();
        }
    }

    #[test]
    fn an_interrupt_asked_for_twice_before_it_is_taken_is_taken_once() {
        let mut v = Vgic::new();
        v.inject(40, 0x80).unwrap();
        v.inject(40, 0x80).unwrap();
        assert_eq!(v.queued(), 1);
        v.prepare(false, 4);
        v.inject(40, 0x80).unwrap();
        assert_eq!(v.queued(), 0);
        v.prepare(false, 4);
        assert_eq!(in_flight(&v), [(40, 1)]);
        // The guest acknowledged it (active): asked again, it is pending
        // and active, in the same list register.
        v.lr[0] = (v.lr[0] & !lr::PENDING) | lr::ACTIVE;
        v.inject(40, 0x80).unwrap();
        assert_eq!(in_flight(&v), [(40, 3)]);
        assert_eq!(v.queued(), 0);
    }

    #[test]
    fn the_queue_fills_free_list_registers_by_priority_and_asks_for_maintenance() {
        let mut v = Vgic::new();
        for (intid, prio) in [(40, 0xa0), (41, 0x20), (42, 0x80), (43, 0x60)] {
            v.inject(intid, prio).unwrap();
        }
        v.prepare(false, 2);
        assert_eq!(in_flight(&v), [(41, 1), (43, 1)]);
        assert_eq!(v.queued(), 2);
        assert!(v.lr[..2].iter().all(|l| l & lr::EOI != 0), "{:x?}", v.lr);
        // The guest handled 41 (its register is invalid again): 42 next.
        v.lr[0] = 0;
        v.prepare(false, 2);
        assert_eq!(in_flight(&v), [(42, 1), (43, 1)]);
        v.lr = [0; MAX_LRS];
        v.prepare(false, 2);
        assert_eq!(in_flight(&v), [(40, 1)]);
        assert_eq!(v.queued(), 0);
        assert_eq!(v.lr[0] & lr::EOI, 0, "nothing waits: no maintenance");
    }

    #[test]
    fn a_full_queue_is_busy_and_changes_nothing() {
        let mut v = Vgic::new();
        for i in 0..QUEUE as u64 {
            v.inject(100 + i, 0xa0).unwrap();
        }
        let before = (v.lr, v.queue, v.queued);
        assert_eq!(v.inject(99, 0xa0), Err(CallError::Busy));
        assert_eq!((v.lr, v.queue, v.queued), before);
        // Already queued: still fine.
        v.inject(100, 0xa0).unwrap();
        v.prepare(false, 16);
        assert_eq!(v.queued(), QUEUE - 16);
        v.inject(99, 0xa0).unwrap();
    }

    #[test]
    fn the_timer_follows_its_level_and_is_linked_to_the_physical_ppi() {
        let mut v = Vgic::new();
        assert!(!v.prepare(false, 4).hold_timer_ppi);
        assert_eq!(in_flight(&v), []);
        let e = v.prepare(true, 4);
        assert!(e.hold_timer_ppi);
        let l = v.lr[0];
        assert_eq!(
            (lr::intid(l), l & lr::HW, (l >> 32) & 0x1fff),
            (27, lr::HW, 27)
        );
        assert_eq!((l >> 48) & 0xff, u64::from(VTIMER_PRIORITY));
        // Still asserted: one register, not two.
        v.prepare(true, 4);
        assert_eq!(in_flight(&v), [(27, 1)]);
        // The guest changed its timer before taking the interrupt.
        assert!(!v.prepare(false, 4).hold_timer_ppi);
        assert_eq!(in_flight(&v), []);
        // Taken (active): it stays until the guest deactivates it.
        v.prepare(true, 4);
        v.lr[0] = (v.lr[0] & !lr::PENDING) | lr::ACTIVE;
        assert!(v.prepare(false, 4).hold_timer_ppi);
        assert_eq!(in_flight(&v), [(27, 2)]);
        // Deactivated by the guest (the register is invalid): again if the
        // level is still up.
        v.lr[0] &= !lr::ACTIVE;
        assert!(v.prepare(true, 4).hold_timer_ppi);
        assert_eq!(in_flight(&v), [(27, 1)]);
    }

    #[test]
    fn the_timer_waits_for_a_register_with_its_physical_interrupt_held() {
        let mut v = Vgic::new();
        v.inject(40, 0xa0).unwrap();
        v.prepare(false, 1);
        // The guest took 40 (active): the timer, asserted, waits for the
        // register; its physical interrupt is held active meanwhile, or it
        // would end every run before the guest could end 40.
        v.lr[0] = (v.lr[0] & !lr::PENDING) | lr::ACTIVE;
        let e = v.prepare(true, 1);
        assert!(
            e.hold_timer_ppi,
            "the physical PPI is held while the timer waits"
        );
        assert_eq!(in_flight(&v), [(40, 2)]);
        assert_ne!(
            v.lr[0] & lr::EOI,
            0,
            "the timer waits: maintenance on 40's EOI"
        );
        v.lr[0] = 0;
        assert!(v.prepare(true, 1).hold_timer_ppi);
        assert_eq!(in_flight(&v), [(27, 1)]);
        assert_eq!(v.lr[0] & lr::EOI, 0);
        // Not asserted and not in a register: nothing held.
        v.lr[0] = 0;
        assert!(!v.prepare(false, 1).hold_timer_ppi);
    }

    #[test]
    fn a_higher_priority_interrupt_takes_the_place_of_a_pending_one() {
        let mut v = Vgic::new();
        for i in 0..4 {
            v.inject(40 + i, 0xf0).unwrap();
        }
        v.prepare(false, 4);
        // The guest cannot take them (its priority mask), and took none.
        v.inject(50, 0x20).unwrap();
        v.prepare(false, 4);
        let now = in_flight(&v);
        assert!(now.contains(&(50, 1)), "{now:?}");
        assert_eq!(now.len(), 4);
        assert_eq!(v.queued(), 1, "the one it replaced waits again");
        // An acknowledged (active) one is never replaced, nor one of the
        // same priority.
        let mut v = Vgic::new();
        v.inject(40, 0xf0).unwrap();
        v.inject(41, 0x20).unwrap();
        v.prepare(false, 2);
        v.lr[0] = (v.lr[0] & !lr::PENDING) | lr::ACTIVE;
        v.lr[1] = (v.lr[1] & !lr::PENDING) | lr::ACTIVE;
        v.inject(42, 0x10).unwrap();
        v.inject(43, 0x20).unwrap();
        v.prepare(false, 2);
        assert_eq!(v.queued(), 2);
        // The timer outranks a pending host interrupt of lower priority.
        let mut v = Vgic::new();
        v.inject(40, 0xf0).unwrap();
        v.prepare(false, 1);
        assert!(v.prepare(true, 1).hold_timer_ppi);
        assert_eq!(in_flight(&v), [(27, 1)]);
        assert_eq!(v.queued(), 1);
    }

    #[test]
    fn eviction_never_overfills_the_queue() {
        let mut v = Vgic::new();
        for i in 0..QUEUE as u64 {
            v.inject(100 + i, 0xf0).unwrap();
        }
        v.prepare(false, 1);
        v.inject(200, 0xf0).unwrap();
        assert_eq!(v.queued(), QUEUE);
        // The timer cannot push the pending one back: it waits, held.
        let e = v.prepare(true, 1);
        assert!(e.hold_timer_ppi);
        assert_eq!(v.queued(), QUEUE);
        assert_eq!(in_flight(&v).len(), 1);
        assert_ne!(in_flight(&v)[0].0, 27);
    }

    #[test]
    fn a_disabled_timer_is_never_pending() {
        let mut v = Vgic::new();
        v.prepare(true, 4);
        v.set_timer(false, 0x40);
        // Withdrawn, and the physical interrupt held all the same: the
        // asserted timer must not end every run.
        assert!(v.prepare(true, 4).hold_timer_ppi);
        assert_eq!(in_flight(&v), []);
        assert!(!v.prepare(false, 4).hold_timer_ppi);
        v.set_timer(true, 0x40);
        assert!(v.prepare(true, 4).hold_timer_ppi);
        assert_eq!((v.lr[0] >> 48) & 0xff, 0x40, "the guest's priority");
        // Taken, then disabled: it stays until the guest ends it.
        v.lr[0] = (v.lr[0] & !lr::PENDING) | lr::ACTIVE;
        v.set_timer(false, 0x40);
        assert!(v.prepare(true, 4).hold_timer_ppi);
        assert_eq!(in_flight(&v), [(27, 2)]);
    }

    #[test]
    fn the_host_cannot_touch_the_timers_register() {
        let mut v = Vgic::new();
        v.prepare(true, 4);
        let before = v.lr;
        assert_eq!(v.inject(27, 0), Err(CallError::Invalid));
        assert_eq!(v.lr, before);
    }

    #[test]
    fn the_timer_level() {
        assert!(timer_asserted(0b001, 10, 10));
        assert!(timer_asserted(0b101, 10, 11));
        assert!(!timer_asserted(0b001, 10, 9), "not expired");
        assert!(!timer_asserted(0b011, 10, 11), "masked");
        assert!(!timer_asserted(0b000, 10, 11), "disabled");
    }
}
