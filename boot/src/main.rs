//! The keel hypervisor image: boots at EL2, sets up its own memory and the
//! host's stage 2, and enters the host kernel at EL1.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod image;
