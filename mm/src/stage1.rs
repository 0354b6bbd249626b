//! The hypervisor's own EL2 stage-1 translation tables (owned by the boot work).
