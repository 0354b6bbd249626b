//! The keel hypercall ABI, version 1.0, as a host or guest programs against it.
//!
//! Every number here is fixed by the contract (`shared/ABI.md`, restated in
//! `docs/abi.md`); the hypervisor itself takes its IDs and statuses from this
//! crate so the two cannot drift apart. On aarch64 the [`call`] module issues
//! the calls with `HVC #0`; elsewhere only the constants are built.
#![no_std]

/// Function IDs (x0 of the call).
pub mod func {
    pub const FEATURES: u64 = 0x8600_0000;
    pub const CALL_UID: u64 = 0x8600_FF01;
    pub const REVISION: u64 = 0x8600_FF03;
    pub const HYP_MEMINFO: u64 = 0xC600_0002;
    pub const MEM_SHARE: u64 = 0xC600_0003;
    pub const MEM_UNSHARE: u64 = 0xC600_0004;
    pub const MEM_RELINQUISH: u64 = 0xC600_0009;
    pub const HYP_FEATURES: u64 = 0xC600_0100;
    pub const HOST_SHARE_HYP: u64 = 0xC600_0101;
    pub const HOST_UNSHARE_HYP: u64 = 0xC600_0102;
    pub const HOST_DONATE_HYP: u64 = 0xC600_0103;
    pub const HOST_RECLAIM: u64 = 0xC600_0104;
    pub const MEM_STATE: u64 = 0xC600_0105;
    pub const HYP_STATS: u64 = 0xC600_0106;
    pub const VM_CREATE: u64 = 0xC600_0110;
    pub const VM_DESTROY: u64 = 0xC600_0111;
    pub const VCPU_INIT: u64 = 0xC600_0112;
    pub const VCPU_RUN: u64 = 0xC600_0113;
    pub const VM_DONATE: u64 = 0xC600_0114;
    pub const VM_SHARE: u64 = 0xC600_0115;
    pub const VM_UNSHARE: u64 = 0xC600_0116;
    pub const VM_MEM_STATE: u64 = 0xC600_0117;
    pub const HOST_PIN: u64 = 0xC600_0118;
    pub const HOST_UNPIN: u64 = 0xC600_0119;

    /// keel extension (not in ABI 1.0): runs the hypervisor's invariant
    /// checker. x0 = SUCCESS, or DENIED with x1 = address of the first
    /// inconsistency. For tests; costs a walk of every table.
    pub const KEEL_CHECK_INVARIANTS: u64 = 0xC600_01F0;
    /// keel extension (not in ABI 1.0): x1 = 0 for the host's stage 2, or a
    /// VM handle (a destroyed VM's too, until its last page is reclaimed).
    /// x0 = SUCCESS with x1 = that stage 2's table pages, its root pages
    /// included; INVALID_PARAMETER for a handle without a VM. For tests and
    /// benchmarks: HYP_STATS 0 sums every table of the hypervisor.
    pub const KEEL_TABLE_PAGES: u64 = 0xC600_01F1;
    /// keel extension (not in ABI 1.0): x1 = VM handle, x2 = vCPU index,
    /// x3 = INTID (SGI, PPI or SPI: 0..=1019, not 27, the guest's virtual
    /// timer, which keel drives itself), x4 = priority (0..=255). Makes the
    /// interrupt pending for that vCPU at its next run; one that is already
    /// pending is taken once. INVALID_PARAMETER for a bad handle, index,
    /// INTID or priority; BUSY while the vCPU runs, or when 32 interrupts
    /// already wait for it (run it, then retry).
    pub const KEEL_VCPU_IRQ: u64 = 0xC600_01F2;
    /// keel extension (not in ABI 1.0): x1 = VM handle, x2 = vCPU index,
    /// x3 = 1 if the guest has its virtual timer's interrupt (PPI 27)
    /// enabled, 0 if not, x4 = its priority (0..=255): what the guest
    /// wrote to the redistributor the VMM emulates. keel raises the timer
    /// only while it is enabled, at that priority (by default: enabled,
    /// 0xa0). INVALID_PARAMETER for a bad handle, index (or a vCPU never
    /// started), x3 or x4; BUSY while the vCPU runs.
    pub const KEEL_VCPU_VTIMER: u64 = 0xC600_01F3;

    /// The keel extensions: host only, like [`HOST_CALLS`] (a guest gets
    /// NOT_SUPPORTED).
    pub const KEEL_CALLS: [u64; 4] = [
        KEEL_CHECK_INVARIANTS,
        KEEL_TABLE_PAGES,
        KEEL_VCPU_IRQ,
        KEEL_VCPU_VTIMER,
    ];

    /// Every host-side function the contract defines, for tests that sweep them.
    pub const HOST_CALLS: [u64; 20] = [
        HYP_FEATURES,
        HOST_SHARE_HYP,
        HOST_UNSHARE_HYP,
        HOST_DONATE_HYP,
        HOST_RECLAIM,
        MEM_STATE,
        HYP_STATS,
        VM_CREATE,
        VM_DESTROY,
        VCPU_INIT,
        VCPU_RUN,
        VM_DONATE,
        VM_SHARE,
        VM_UNSHARE,
        VM_MEM_STATE,
        HOST_PIN,
        HOST_UNPIN,
        FEATURES,
        CALL_UID,
        REVISION,
    ];
}

/// Status values returned in x0, as the signed numbers the contract gives.
pub mod status {
    pub const SUCCESS: i64 = 0;
    pub const NOT_SUPPORTED: i64 = -1;
    pub const INVALID_PARAMETER: i64 = -3;
    pub const DENIED: i64 = -4;
    pub const NO_MEMORY: i64 = -5;
    pub const BUSY: i64 = -6;
}

/// The KVM vendor-hypervisor UID 28b46fb6-2ec5-11e9-a9ca-4b564d003a74,
/// as CALL_UID returns it in x0..x3 (SMCCC word order).
pub const KVM_UID: [u64; 4] = [0xb66f_b428, 0xe911_c52e, 0x564b_caa9, 0x743a_004d];

/// Vendor-hypervisor function numbers (low 16 bits of the ID) and the FEATURES
/// bitmap that says which are implemented.
pub const FEATURES_BITMAP: u64 = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 9);

/// REVISION: major and minor.
pub const REVISION_MAJOR: u64 = 1;
pub const REVISION_MINOR: u64 = 0;

/// The conversion granule HYP_MEMINFO reports.
pub const GRANULE: u64 = 4096;

/// Owner codes of MEM_STATE x1 (a VM's owner code is its handle).
pub mod owner {
    pub const HOST: u64 = 0;
    pub const HYP: u64 = 1;
}

/// Page states as MEM_STATE and VM_MEM_STATE report them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum PageState {
    Owned = 0,
    SharedOwned = 1,
    SharedBorrowed = 2,
    NoPage = 3,
}

impl PageState {
    pub fn from_raw(v: u64) -> Option<Self> {
        match v {
            0 => Some(Self::Owned),
            1 => Some(Self::SharedOwned),
            2 => Some(Self::SharedBorrowed),
            3 => Some(Self::NoPage),
            _ => None,
        }
    }
}

/// VM handles are `VM_HANDLE_BASE + n`.
pub const VM_HANDLE_BASE: u64 = 0x1000;

/// Exit reasons of VCPU_RUN (x1).
pub mod exit {
    pub const SYSTEM_OFF: u64 = 1;
    pub const HYPERCALL: u64 = 2;
    pub const MMIO: u64 = 3;
    pub const IRQ: u64 = 4;
    pub const FAULT: u64 = 5;
    /// keel addition (not in ABI 1.0): the guest wrote an SGI generation
    /// register; x2 = the value written, x3 = which ([`sgi`]). The write
    /// is done as far as the guest can tell: the VMM delivers the SGI to
    /// the vCPUs it names (KEEL_VCPU_IRQ), as its emulated GIC decides.
    pub const SGI: u64 = 6;

    /// SYSTEM_OFF's x2.
    pub mod system_off {
        pub const POWEROFF: u64 = 0;
        pub const RESET: u64 = 1;
    }

    /// SGI's x3: the register the guest wrote.
    pub mod sgi {
        /// ICC_SGI1R_EL1: a group-1 SGI.
        pub const SGI1R: u64 = 0;
        /// ICC_ASGI1R_EL1: a group-1 SGI for the other security state.
        pub const ASGI1R: u64 = 1;
        /// ICC_SGI0R_EL1: a group-0 SGI.
        pub const SGI0R: u64 = 2;
    }

    /// MMIO's x3: bit 0 write, bits 8..15 the access size in bytes, bits
    /// 16..20 the register number.
    pub mod mmio {
        pub const WRITE: u64 = 1 << 0;
        pub const SIZE_SHIFT: u64 = 8;
        pub const SIZE_MASK: u64 = 0xFF;
        pub const REG_SHIFT: u64 = 16;
        pub const REG_MASK: u64 = 0x1F;

        pub const fn is_write(x3: u64) -> bool {
            x3 & WRITE != 0
        }
        pub const fn size(x3: u64) -> u64 {
            (x3 >> SIZE_SHIFT) & SIZE_MASK
        }
        pub const fn reg(x3: u64) -> u64 {
            (x3 >> REG_SHIFT) & REG_MASK
        }
    }
}

/// HYP_STATS counter indices.
pub mod stat {
    pub const TABLE_PAGES: u64 = 0;
    pub const FREE_POOL_PAGES: u64 = 1;
    pub const BLOCK_SPLITS: u64 = 2;
    pub const BLOCK_MERGES: u64 = 3;
    pub const HOST_ABORTS: u64 = 4;
    pub const HYPERCALLS: u64 = 5;
    /// Number of counters.
    pub const COUNT: u64 = 6;
}

/// HYP_FEATURES x1: the block sizes the stage-2 engine maps (bit n = 2^n
/// bytes).
pub const BLOCK_4K: u64 = 1 << 12;
pub const BLOCK_2M: u64 = 1 << 21;
pub const BLOCK_1G: u64 = 1 << 30;
pub const BLOCK_SIZES: u64 = BLOCK_4K | BLOCK_2M | BLOCK_1G;

/// A pfn is a physical address >> 12, whatever the caller's page size.
pub const PFN_SHIFT: u32 = 12;

/// The guest's virtual timer interrupt (a PPI): keel raises it for the
/// guest itself, and KEEL_VCPU_IRQ refuses it.
pub const VTIMER_INTID: u64 = 27;

/// A status that is not SUCCESS, as a Rust error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    NotSupported,
    InvalidParameter,
    Denied,
    NoMemory,
    Busy,
    /// A status the contract does not define.
    Unknown(i64),
}

impl Error {
    pub fn from_status(s: i64) -> Result<(), Error> {
        match s {
            status::SUCCESS => Ok(()),
            status::NOT_SUPPORTED => Err(Error::NotSupported),
            status::INVALID_PARAMETER => Err(Error::InvalidParameter),
            status::DENIED => Err(Error::Denied),
            status::NO_MEMORY => Err(Error::NoMemory),
            status::BUSY => Err(Error::Busy),
            other => Err(Error::Unknown(other)),
        }
    }

    pub fn status(self) -> i64 {
        match self {
            Error::NotSupported => status::NOT_SUPPORTED,
            Error::InvalidParameter => status::INVALID_PARAMETER,
            Error::Denied => status::DENIED,
            Error::NoMemory => status::NO_MEMORY,
            Error::Busy => status::BUSY,
            Error::Unknown(s) => s,
        }
    }
}

/// Registers x0..x4 as a call returns them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs(pub [u64; 5]);

impl Regs {
    /// x0 read as a status.
    pub fn status(&self) -> i64 {
        self.0[0] as i64
    }
    /// `Ok(self)` when x0 is SUCCESS, else the error.
    pub fn ok(self) -> Result<Regs, Error> {
        Error::from_status(self.status()).map(|()| self)
    }
}

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod call;
