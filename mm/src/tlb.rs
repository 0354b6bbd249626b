//! The TLB maintenance the stage-2 engine needs, as a trait: the hypervisor
//! implements it with real instructions, host tests by recording calls.

/// A virtual machine identifier as programmed in VTTBR_EL2.VMID.
pub type Vmid = u16;

/// TLB maintenance and the barriers around it, for one VMID at a time.
///
/// The engine calls these in the break-before-make order:
/// descriptor store(s), [`publish_writes`](Self::publish_writes),
/// [`invalidate_ipa`](Self::invalidate_ipa) or
/// [`invalidate_vmid`](Self::invalidate_vmid), [`complete`](Self::complete),
/// then the new descriptor store(s) and a final `publish_writes`.
pub trait TlbMaintenance {
    /// Makes earlier descriptor stores visible to table walkers before any
    /// following TLB invalidation (`DSB ISHST`).
    fn publish_writes(&mut self);

    /// Invalidates, on all CPUs of the inner-shareable domain, the stage-2
    /// TLB and walk-cache entries of `vmid` for the IPA `ipa`
    /// (`TLBI IPAS2E1IS`, the non-last-level form). `level` is the
    /// translation level of the leaf that mapped `ipa` (the TTL hint), or
    /// `None` when unknown (for walk-cache entries of a freed table).
    fn invalidate_ipa(&mut self, vmid: Vmid, ipa: u64, level: Option<u8>);

    /// Invalidates every stage-1 and stage-2 entry of `vmid`
    /// (`TLBI VMALLS12E1IS`); the engine uses it instead of many
    /// `invalidate_ipa` when a large subtree goes away.
    fn invalidate_vmid(&mut self, vmid: Vmid);

    /// Waits for the invalidations issued so far to finish everywhere. After
    /// IPA invalidations this must also drop the combined stage-1+2 entries
    /// of `vmid`, which `TLBI IPAS2E1IS` does not touch:
    /// `DSB ISH; TLBI VMALLE1IS (under vmid); DSB ISH; ISB`.
    fn complete(&mut self, vmid: Vmid);
}

/// TLB maintenance that does nothing: for tables that no CPU uses yet, and
/// for benchmarks on the build machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTlb;

impl TlbMaintenance for NoTlb {
    fn publish_writes(&mut self) {}
    fn invalidate_ipa(&mut self, _vmid: Vmid, _ipa: u64, _level: Option<u8>) {}
    fn invalidate_vmid(&mut self, _vmid: Vmid) {}
    fn complete(&mut self, _vmid: Vmid) {}
}
