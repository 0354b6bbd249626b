//! The logic of the keel hypervisor: hypercall dispatch, and (as they land)
//! ownership transitions, VMs and vCPUs. No system register is named here,
//! so all of it runs under `cargo test` on the build machine; the image in
//! `boot/` supplies the architecture through small traits.
#![cfg_attr(not(test), no_std)]

pub mod guest;
pub mod host;
pub mod hvc;
pub mod lent;
pub mod mem;
pub mod stats;
pub mod sysreg;
pub mod vgic;
pub mod vm;
