//! The GICv3 virtual CPU interface's EL2 registers that keel switches per
//! vCPU: the list registers (ICH_LR<n>_EL2), the active-priority registers
//! (ICH_AP0R<n>_EL2, ICH_AP1R<n>_EL2), the guest's own controls
//! (ICH_VMCR_EL2) and keel's (ICH_HCR_EL2).
//! Their contents are `keel_hyp::vgic`'s business; this moves them.
//!
//! The registers are named by encoding, which assemblers without GICv3
//! names accept too.

/// How many list and active-priority registers the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VgicShape {
    /// List registers: ICH_VTR_EL2.ListRegs + 1 (1 to 16).
    pub lrs: usize,
    /// Active-priority registers per group: 1, 2 or 4 for 5, 6 or 7
    /// preemption bits (ICH_VTR_EL2.PREbits + 1).
    pub aprs: usize,
}

impl VgicShape {
    /// The shape ICH_VTR_EL2 value `vtr` describes.
    pub const fn from_vtr(vtr: u64) -> Self {
        VgicShape {
            lrs: (vtr & 0x1f) as usize + 1,
            aprs: match (vtr >> 26) & 7 {
                0..=4 => 1,
                5 => 2,
                _ => 4,
            },
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub use regs::*;

#[cfg(target_arch = "aarch64")]
mod regs {
    use core::sync::atomic::{AtomicUsize, Ordering};

    use super::VgicShape;

    /// The shape every CPU keel runs on has ([`note_cpu`]).
    static COMMON_LRS: AtomicUsize = AtomicUsize::new(16);
    static COMMON_APRS: AtomicUsize = AtomicUsize::new(4);

    /// Adds this CPU's shape to the common one: a vCPU can move between
    /// CPUs, so its interrupts go only in list registers every CPU has.
    /// Each CPU calls it once as it comes up, before running a guest. (A
    /// CPU brought up later with fewer list registers than a vCPU filled
    /// would not see the extra ones; no system keel knows mixes CPUs with
    /// different counts.)
    pub fn note_cpu() {
        let s = shape();
        COMMON_LRS.fetch_min(s.lrs, Ordering::Relaxed);
        COMMON_APRS.fetch_min(s.aprs, Ordering::Relaxed);
    }

    /// The shape common to the CPUs noted so far.
    pub fn common_shape() -> VgicShape {
        VgicShape {
            lrs: COMMON_LRS.load(Ordering::Relaxed),
            aprs: COMMON_APRS.load(Ordering::Relaxed),
        }
    }

    /// The CPU's shape (ICH_VTR_EL2).
    pub fn shape() -> VgicShape {
        let vtr: u64;
        // SAFETY: ICH_VTR_EL2 is a read-only identification register.
        unsafe {
            core::arch::asm!("mrs {}, s3_4_c12_c11_1", out(reg) vtr, options(nomem, nostack, preserves_flags))
        };
        VgicShape::from_vtr(vtr)
    }

    /// The numbered registers, listed once for both directions.
    macro_rules! numbered {
        ($read:ident, $write:ident, $($n:literal $reg:literal),* $(,)?) => {
            fn $read(n: usize) -> u64 {
                let mut v = 0;
                match n {
                    $(
                        // SAFETY: reading a virtual CPU interface register
                        // from EL2 has no side effects; `n` is below the
                        // CPU's count (the callers' loops).
                        $n => unsafe { core::arch::asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags)) },
                    )*
                    _ => {}
                }
                v
            }

            /// # Safety
            /// As [`restore`].
            unsafe fn $write(n: usize, v: u64) {
                match n {
                    $(
                        // SAFETY: the caller's contract.
                        $n => unsafe { core::arch::asm!(concat!("msr ", $reg, ", {}"), in(reg) v, options(nostack, preserves_flags)) },
                    )*
                    _ => {}
                }
            }
        };
    }

    numbered!(read_lr, write_lr,
        0 "s3_4_c12_c12_0", 1 "s3_4_c12_c12_1", 2 "s3_4_c12_c12_2", 3 "s3_4_c12_c12_3",
        4 "s3_4_c12_c12_4", 5 "s3_4_c12_c12_5", 6 "s3_4_c12_c12_6", 7 "s3_4_c12_c12_7",
        8 "s3_4_c12_c13_0", 9 "s3_4_c12_c13_1", 10 "s3_4_c12_c13_2", 11 "s3_4_c12_c13_3",
        12 "s3_4_c12_c13_4", 13 "s3_4_c12_c13_5", 14 "s3_4_c12_c13_6", 15 "s3_4_c12_c13_7",
    );
    numbered!(read_apr, write_apr,
        0 "s3_4_c12_c8_0", 1 "s3_4_c12_c8_1", 2 "s3_4_c12_c8_2", 3 "s3_4_c12_c8_3",
        4 "s3_4_c12_c9_0", 5 "s3_4_c12_c9_1", 6 "s3_4_c12_c9_2", 7 "s3_4_c12_c9_3",
    );

    /// Reads the CPU's list registers into `lr`, its active priorities
    /// into `apr` (group 0's in `apr[0..4]`, group 1's in `apr[4..8]`) and
    /// ICH_VMCR_EL2 into `vmcr`; entries past the CPU's registers are left
    /// as they are.
    pub fn save(shape: VgicShape, lr: &mut [u64; 16], apr: &mut [u64; 8], vmcr: &mut u64) {
        *vmcr = crate::sysreg::ich_vmcr_el2();
        for (n, l) in lr.iter_mut().enumerate().take(shape.lrs) {
            *l = read_lr(n);
        }
        for n in 0..shape.aprs.min(4) {
            apr[n] = read_apr(n);
            apr[4 + n] = read_apr(4 + n);
        }
    }

    /// Loads a vCPU's list and active-priority registers and ICH_VMCR_EL2,
    /// then ICH_HCR_EL2 (`hcr`).
    ///
    /// # Safety
    /// Only while the guest they belong to is about to run: with
    /// ICH_HCR_EL2.En set they are what its EL1 takes as interrupts.
    pub unsafe fn restore(shape: VgicShape, lr: &[u64; 16], apr: &[u64; 8], vmcr: u64, hcr: u64) {
        // SAFETY: the caller's contract.
        unsafe { crate::sysreg::set_ich_vmcr_el2(vmcr) };
        for (n, l) in lr.iter().enumerate().take(shape.lrs) {
            // SAFETY: the caller's contract.
            unsafe { write_lr(n, *l) };
        }
        for n in 0..shape.aprs.min(4) {
            // SAFETY: the caller's contract.
            unsafe {
                write_apr(n, apr[n]);
                write_apr(4 + n, apr[4 + n]);
            }
        }
        // SAFETY: the caller's contract.
        unsafe { set_hcr(hcr) };
    }

    /// Writes ICH_HCR_EL2 (0 turns the virtual CPU interface off, as the
    /// host runs: no virtual interrupt, no maintenance interrupt).
    ///
    /// # Safety
    /// As [`restore`] for a non-zero value.
    pub unsafe fn set_hcr(hcr: u64) {
        // SAFETY: the caller's contract.
        unsafe {
            core::arch::asm!("msr s3_4_c12_c11_0, {}", in(reg) hcr, options(nostack, preserves_flags))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_from_ich_vtr() {
        // QEMU's max CPU: 4 list registers, 5 preemption and priority bits.
        let qemu = (4 << 29) | (4 << 26) | 3;
        assert_eq!(VgicShape::from_vtr(qemu), VgicShape { lrs: 4, aprs: 1 });
        assert_eq!(
            VgicShape::from_vtr((5 << 26) | 15),
            VgicShape { lrs: 16, aprs: 2 }
        );
        assert_eq!(VgicShape::from_vtr(6 << 26), VgicShape { lrs: 1, aprs: 4 });
    }
}
