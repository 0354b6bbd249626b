//! CPU errata keel works around, by MIDR_EL1 (host-testable: the decision
//! is a function of the register's value).
//!
//! Speculative AT (Cortex-A76 erratum 1165522, Cortex-A55 1530923,
//! Cortex-A57 1319537 and Cortex-A72 1319367, and the Kryo 4xx Silver core
//! built on the A55): the CPU may speculate an address translation of the
//! EL1&0 regime while EL2 switches it from one world to another, and fill
//! the TLB from one world's stage 1 under the other's VMID. The workaround
//! (`guest::El1Regs::quiesce` and `restore_quiesced`) keeps the EL1 stage 1
//! from walking while the two halves disagree. It is on when any CPU keel
//! runs on is affected, or when the hypervisor's command line says
//! `keel.errata=speculative-at` (so that unaffected machines, QEMU's
//! included, can run it).

use core::sync::atomic::{AtomicBool, Ordering};

const IMPLEMENTER_ARM: u64 = 0x41;
const IMPLEMENTER_QCOM: u64 = 0x51;

/// (implementer, part number, last affected (variant, revision)).
const SPECULATIVE_AT: [(u64, u64, (u64, u64)); 5] = [
    // Cortex-A76 r0p0 to r2p0 (1165522).
    (IMPLEMENTER_ARM, 0xd0b, (2, 0)),
    // Cortex-A55 r0p0 to r2p0 (1530923).
    (IMPLEMENTER_ARM, 0xd05, (2, 0)),
    // Cortex-A57 and Cortex-A72, every revision (1319537, 1319367).
    (IMPLEMENTER_ARM, 0xd07, (0xf, 0xf)),
    (IMPLEMENTER_ARM, 0xd08, (0xf, 0xf)),
    // Kryo 4xx Silver (an A55), up to its r1p0 (variant 0xd, revision 0xe).
    (IMPLEMENTER_QCOM, 0x805, (0xd, 0xe)),
];

/// Whether a CPU with this MIDR_EL1 has a speculative-AT erratum.
pub fn has_speculative_at(midr: u64) -> bool {
    let implementer = (midr >> 24) & 0xff;
    let part = (midr >> 4) & 0xfff;
    let (variant, revision) = ((midr >> 20) & 0xf, midr & 0xf);
    SPECULATIVE_AT
        .iter()
        .any(|&(i, p, last)| i == implementer && p == part && (variant, revision) <= last)
}

static WORKAROUND: AtomicBool = AtomicBool::new(false);

/// Records a CPU keel runs on (before it runs any guest): turns the
/// workaround on if the CPU is affected. Returns whether it is.
pub fn note_cpu(midr: u64) -> bool {
    let affected = has_speculative_at(midr);
    if affected {
        WORKAROUND.store(true, Ordering::Relaxed);
    }
    affected
}

/// Turns the workaround on whatever the CPUs are (`keel.errata=speculative-at`).
pub fn force_speculative_at() {
    WORKAROUND.store(true, Ordering::Relaxed);
}

/// Whether world switches and TLB maintenance under another VMID keep the
/// EL1 stage 1 quiet.
#[inline(always)]
pub fn speculative_at() -> bool {
    WORKAROUND.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn midr(implementer: u64, variant: u64, part: u64, revision: u64) -> u64 {
        implementer << 24 | variant << 20 | 0xf << 16 | part << 4 | revision
    }

    #[test]
    fn affected_parts_and_revisions() {
        let arm = IMPLEMENTER_ARM;
        for (m, want, what) in [
            (midr(arm, 0, 0xd0b, 0), true, "A76 r0p0"),
            (midr(arm, 2, 0xd0b, 0), true, "A76 r2p0"),
            (midr(arm, 2, 0xd0b, 1), false, "A76 r2p1"),
            (midr(arm, 3, 0xd0b, 0), false, "A76 r3p0"),
            (midr(arm, 1, 0xd05, 5), true, "A55 r1p5"),
            (midr(arm, 2, 0xd05, 1), false, "A55 r2p1"),
            (midr(arm, 1, 0xd07, 3), true, "A57 r1p3"),
            (midr(arm, 0, 0xd08, 3), true, "A72 r0p3"),
            (midr(arm, 0xf, 0xd08, 0xf), true, "A72, any revision"),
            (
                midr(IMPLEMENTER_QCOM, 0xd, 0x805, 0xe),
                true,
                "Kryo 4xx Silver r13p14",
            ),
            (
                midr(IMPLEMENTER_QCOM, 0xd, 0x805, 0xf),
                false,
                "Kryo 4xx Silver after",
            ),
            (midr(arm, 0, 0xd03, 4), false, "A53"),
            (midr(arm, 0, 0xd0c, 0), false, "Neoverse N1"),
            (midr(arm, 0, 0xd0d, 0), false, "A77"),
            (
                midr(0x43, 0, 0xd0b, 0),
                false,
                "another implementer's part 0xd0b",
            ),
            // QEMU's -cpu max.
            (0x000f_0510, false, "QEMU max"),
        ] {
            assert_eq!(has_speculative_at(m), want, "{what}: MIDR {m:#x}");
        }
    }
}
