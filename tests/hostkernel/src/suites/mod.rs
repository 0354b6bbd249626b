//! The suites, by the name `suite=NAME` selects. tests/run.py keeps the list
//! of suites it boots; each suite's tests are announced by its `plan` line.

use crate::harness::Suite;

pub mod bench;
pub mod boot;
pub mod crash;
pub mod demo;
pub mod fuzz;
pub mod guests;
pub mod host_abi;
pub mod isolation;
pub mod selftest;
pub mod smp;

pub static ALL: [&Suite; 10] = [
    &boot::SUITE,
    &isolation::SUITE,
    &host_abi::SUITE,
    &guests::SUITE,
    &selftest::SUITE,
    &demo::SUITE,
    &bench::SUITE,
    &fuzz::SUITE,
    &crash::SUITE,
    &smp::SUITE,
];

pub fn find(name: &str) -> Option<&'static Suite> {
    ALL.iter().copied().find(|s| s.name == name)
}
