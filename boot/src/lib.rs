//! The parts of booting that are plain logic (device tree reading and the
//! host's device tree), built and tested on the build machine.
#![cfg_attr(not(test), no_std)]

pub mod dt;
pub mod layout;
