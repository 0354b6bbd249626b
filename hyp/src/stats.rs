//! The counters HYP_STATS reports that are not derived from the tables.

use core::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Stats {
    /// Aborts injected into the host (HYP_STATS 4).
    pub host_aborts: AtomicU64,
    /// Hypercalls handled (HYP_STATS 5).
    pub hypercalls: AtomicU64,
}

impl Stats {
    pub const fn new() -> Self {
        Stats {
            host_aborts: AtomicU64::new(0),
            hypercalls: AtomicU64::new(0),
        }
    }

    pub fn count_host_abort(&self) {
        self.host_aborts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_hypercall(&self) {
        self.hypercalls.fetch_add(1, Ordering::Relaxed);
    }
}
