//! Memory management for the keel hypervisor: the stage-2 page-table engine,
//! the hypervisor's own stage-1 tables, and the page pool they draw from.
//!
//! Nothing here names a system register or executes a barrier: TLB
//! maintenance reaches the hardware through [`tlb::TlbMaintenance`], which the
//! hypervisor implements with real instructions and the tests implement by
//! recording calls. So all of it runs under `cargo test` on the build
//! machine. See docs/mm.md for the design of the stage-2 engine.
#![cfg_attr(not(test), no_std)]

pub mod desc;
pub mod donated;
pub mod frames;
pub mod owner;
pub mod pool;
pub mod stage1;
pub mod stage2;
pub mod tlb;

pub use desc::{Annotation, MemType, PageState, S2Attrs, Shareability};
pub use pool::{PagePool, PAGE_SIZE};
pub use stage2::{
    Audit, Change, Geometry, Leaf, LeafKind, PagePlan, PageWalk, Stage2, Stage2Stats,
};
pub use tlb::{NoTlb, TlbMaintenance, Vmid};

/// Why a memory-management request was refused. On any error nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmError {
    /// The range is empty.
    ZeroLength,
    /// An address or length is not a multiple of 4 KiB (or an offset is
    /// not aligned as required).
    Misaligned,
    /// Address plus length wraps around.
    Overflow,
    /// The range ends beyond the IPA space (or, for output addresses,
    /// beyond 48 bits).
    OutOfRange,
    /// Attributes or state were to change on a range that is not mapped.
    NotMapped,
    /// The pool cannot supply the table pages the change needs.
    NoMemory,
    /// The IPA size is not supported (32 to 48 bits).
    UnsupportedIpaSize,
    /// The pool passed in is not the one this table's pages came from.
    WrongPool,
    /// The table was destroyed.
    Destroyed,
    /// An argument outside its domain (e.g. a pool allocation size).
    InvalidArgument,
    /// A [`stage2::PageWalk`] used after its stage 2 changed.
    Stale,
}
