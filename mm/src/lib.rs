//! Memory management for the keel hypervisor: the stage-2 page-table engine,
//! the hypervisor's own stage-1 tables, and the page pool they draw from.
//!
//! Nothing here names a system register or executes a barrier: TLB
//! maintenance reaches the hardware through [`stage2::TlbMaintenance`] (or the
//! equivalent trait), which the hypervisor implements with real instructions
//! and the tests implement by recording calls. So all of it runs under
//! `cargo test` on the build machine.
#![cfg_attr(not(test), no_std)]

pub mod stage1;
