//! Typed calls, issued with `HVC #0` (SMCCC 1.1 fast calls: SMC64, but
//! for the three SMC32 discovery IDs `0x8600_xxxx`), for code that runs at
//! EL1 beneath keel (a bare-metal host kernel or guest; a Linux kernel uses
//! the C header). Built only for `target_os = "none"`: from user space HVC
//! is undefined.
//!
//! Calls that give memory away (to keel, to a guest, or to the host, for a
//! guest) are `unsafe fn`s: the memory they name must not back anything the
//! caller's Rust code still reads or writes through references. The others
//! change nothing the caller can observe through its own memory.

use crate::{func, Error, Regs};

/// Issues `HVC #0` with x0 = `id`, x1..x5 = `args`; returns x0..x4.
///
/// x6..x17 are declared clobbered although the contract preserves x4..x17,
/// so a hypervisor that breaks that promise cannot corrupt the caller.
///
/// # Safety
/// Any call can be made this way, including those that give memory away:
/// the pages `id` and `args` name must not back memory the caller's Rust
/// code still uses (see the typed functions' own requirements). A VCPU_RUN
/// does not preserve SVE or SME state beyond the V registers.
#[inline(always)]
pub unsafe fn hvc(id: u64, args: [u64; 5]) -> Regs {
    let (r0, r1, r2, r3, r4);
    // SAFETY: HVC transfers control to the hypervisor, which returns to the
    // next instruction with results in x0..x4; every register it may write is
    // declared as an output or clobber. What the call does to memory is the
    // caller's contract.
    unsafe {
        core::arch::asm!(
            "hvc #0",
            inout("x0") id => r0,
            inout("x1") args[0] => r1,
            inout("x2") args[1] => r2,
            inout("x3") args[2] => r3,
            inout("x4") args[3] => r4,
            inout("x5") args[4] => _,
            out("x6") _, out("x7") _, out("x8") _, out("x9") _,
            out("x10") _, out("x11") _, out("x12") _, out("x13") _,
            out("x14") _, out("x15") _, out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    Regs([r0, r1, r2, r3, r4])
}

/// A call that takes no memory from the caller (the safe typed functions).
fn call(id: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> Result<Regs, Error> {
    // SAFETY: only the safe functions below use this, whose calls give no
    // memory away.
    unsafe { hvc(id, [a1, a2, a3, a4, 0]) }.ok()
}

/// A call that may give memory away.
///
/// # Safety
/// As [`hvc`].
unsafe fn call_giving(id: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> Result<Regs, Error> {
    // SAFETY: the caller's contract.
    unsafe { hvc(id, [a1, a2, a3, a4, 0]) }.ok()
}

/// A discovery call: its values from x0 on.
fn raw(id: u64) -> [u64; 5] {
    // SAFETY: discovery calls change nothing.
    unsafe { hvc(id, [0; 5]) }.0
}

/// FEATURES: bitmap of implemented vendor-hypervisor functions.
pub fn features() -> u64 {
    raw(func::FEATURES)[0]
}

/// CALL_UID: the four UID words.
pub fn call_uid() -> [u64; 4] {
    let r = raw(func::CALL_UID);
    [r[0], r[1], r[2], r[3]]
}

/// REVISION: (major, minor).
pub fn revision() -> (u64, u64) {
    let r = raw(func::REVISION);
    (r[0], r[1])
}

/// What HYP_FEATURES reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypFeatures {
    pub block_sizes: u64,
    pub max_vms: u64,
    pub max_vcpus: u64,
}

pub fn hyp_features() -> Result<HypFeatures, Error> {
    let r = call(func::HYP_FEATURES, 0, 0, 0, 0)?.0;
    Ok(HypFeatures {
        block_sizes: r[1],
        max_vms: r[2],
        max_vcpus: r[3],
    })
}

/// # Safety
/// keel may read and write the pages until HOST_UNSHARE_HYP: the caller
/// reaches them only through raw pointers meanwhile, never references.
pub unsafe fn host_share_hyp(pfn: u64, nr: u64) -> Result<(), Error> {
    // SAFETY: the caller's contract.
    unsafe { call_giving(func::HOST_SHARE_HYP, pfn, nr, 0, 0) }.map(drop)
}

pub fn host_unshare_hyp(pfn: u64, nr: u64) -> Result<(), Error> {
    call(func::HOST_UNSHARE_HYP, pfn, nr, 0, 0).map(drop)
}

/// # Safety
/// The pages become keel's: nothing of the caller may use them afterwards
/// (an access aborts).
pub unsafe fn host_donate_hyp(pfn: u64, nr: u64) -> Result<(), Error> {
    // SAFETY: the caller's contract.
    unsafe { call_giving(func::HOST_DONATE_HYP, pfn, nr, 0, 0) }.map(drop)
}

pub fn host_reclaim(pfn: u64, nr: u64) -> Result<(), Error> {
    call(func::HOST_RECLAIM, pfn, nr, 0, 0).map(drop)
}

/// What MEM_STATE and VM_MEM_STATE report for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemState {
    /// MEM_STATE: owner code; VM_MEM_STATE: the pfn behind the IPA.
    pub owner_or_pfn: u64,
    pub state: u64,
    /// Size in bytes of the stage-2 mapping covering the page, 0 if unmapped.
    pub map_size: u64,
}

pub fn mem_state(pfn: u64) -> Result<MemState, Error> {
    let r = call(func::MEM_STATE, pfn, 0, 0, 0)?.0;
    Ok(MemState {
        owner_or_pfn: r[1],
        state: r[2],
        map_size: r[3],
    })
}

pub fn hyp_stats(counter: u64) -> Result<u64, Error> {
    Ok(call(func::HYP_STATS, counter, 0, 0, 0)?.0[1])
}

/// KEEL_CHECK_INVARIANTS (keel extension, not in ABI 1.0; for tests): runs
/// the hypervisor's invariant checker. `Err((Error::Denied, addr))` gives
/// the address of the first inconsistency (x1); any other error means the
/// build does not have the call.
pub fn keel_check_invariants() -> Result<(), (Error, u64)> {
    // SAFETY: the check changes nothing.
    let r = unsafe { hvc(func::KEEL_CHECK_INVARIANTS, [0; 5]) };
    r.ok().map(drop).map_err(|e| (e, r.0[1]))
}

/// KEEL_TABLE_PAGES (keel extension, not in ABI 1.0; for tests and
/// benchmarks): the table pages, root included, of the host's stage 2
/// (`which` = 0) or of VM `which`'s (alive, or destroyed with pages still
/// to reclaim). `Err(InvalidParameter)` for a handle without a VM.
pub fn keel_table_pages(which: u64) -> Result<u64, Error> {
    Ok(call(func::KEEL_TABLE_PAGES, which, 0, 0, 0)?.0[1])
}

/// KEEL_VCPU_IRQ (keel extension, not in ABI 1.0): makes INTID `intid`
/// (0..=1019, not [`VTIMER_INTID`](crate::VTIMER_INTID)) pending at
/// `priority` (0..=255) for vCPU `vcpu` of VM `handle`, from its next run.
/// `Err(Busy)` while the vCPU runs, or when 32 interrupts already wait for
/// it.
pub fn keel_vcpu_irq(handle: u64, vcpu: u64, intid: u64, priority: u64) -> Result<(), Error> {
    call(func::KEEL_VCPU_IRQ, handle, vcpu, intid, priority).map(drop)
}

/// KEEL_VCPU_VTIMER (keel extension, not in ABI 1.0): the guest's own
/// configuration of its virtual timer's interrupt (enabled, priority), as
/// it wrote it to the redistributor the VMM emulates.
pub fn keel_vcpu_vtimer(handle: u64, vcpu: u64, enabled: bool, priority: u64) -> Result<(), Error> {
    call(
        func::KEEL_VCPU_VTIMER,
        handle,
        vcpu,
        u64::from(enabled),
        priority,
    )
    .map(drop)
}

pub fn vm_create(nr_vcpus: u64) -> Result<u64, Error> {
    Ok(call(func::VM_CREATE, nr_vcpus, 0, 0, 0)?.0[1])
}

pub fn vm_destroy(handle: u64) -> Result<(), Error> {
    call(func::VM_DESTROY, handle, 0, 0, 0).map(drop)
}

/// VCPU_INIT: only before any vCPU of the VM has run (DENIED after).
pub fn vcpu_init(handle: u64, vcpu: u64, entry_ipa: u64, x0: u64) -> Result<(), Error> {
    call(func::VCPU_INIT, handle, vcpu, entry_ipa, x0).map(drop)
}

/// A VCPU_RUN exit: reason and details x2..x4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub reason: u64,
    pub details: [u64; 3],
}

/// VCPU_RUN.
///
/// # Safety
/// keel switches the V registers but no SVE or SME state beyond them: the
/// caller has none live (code built without SVE and SME has none), or saves
/// it around the call.
pub unsafe fn vcpu_run(handle: u64, vcpu: u64, completion: u64) -> Result<Exit, Error> {
    // SAFETY: the caller's contract; the call gives no memory away.
    let r = unsafe { call_giving(func::VCPU_RUN, handle, vcpu, completion, 0) }?.0;
    Ok(Exit {
        reason: r[1],
        details: [r[2], r[3], r[4]],
    })
}

/// # Safety
/// The pages become the guest's: nothing of the caller may use them
/// afterwards (an access aborts).
pub unsafe fn vm_donate(handle: u64, pfn: u64, ipa: u64, nr: u64) -> Result<(), Error> {
    // SAFETY: the caller's contract.
    unsafe { call_giving(func::VM_DONATE, handle, pfn, ipa, nr) }.map(drop)
}

/// # Safety
/// The guest may write the pages at any time until VM_UNSHARE: the caller
/// reaches them only through raw pointers (volatile accesses), never
/// through references.
pub unsafe fn vm_share(handle: u64, pfn: u64, ipa: u64, nr: u64) -> Result<(), Error> {
    // SAFETY: the caller's contract.
    unsafe { call_giving(func::VM_SHARE, handle, pfn, ipa, nr) }.map(drop)
}

pub fn vm_unshare(handle: u64, ipa: u64, nr: u64) -> Result<(), Error> {
    call(func::VM_UNSHARE, handle, ipa, nr, 0).map(drop)
}

pub fn vm_mem_state(handle: u64, ipa: u64) -> Result<MemState, Error> {
    let r = call(func::VM_MEM_STATE, handle, ipa, 0, 0)?.0;
    Ok(MemState {
        owner_or_pfn: r[1],
        state: r[2],
        map_size: r[3],
    })
}

pub fn host_pin(pfn: u64, nr: u64) -> Result<(), Error> {
    call(func::HOST_PIN, pfn, nr, 0, 0).map(drop)
}

/// # Safety
/// Once unpinned, the guest may take the pages back (MEM_UNSHARE) and an
/// access aborts: the caller holds no reference into them.
pub unsafe fn host_unpin(pfn: u64, nr: u64) -> Result<(), Error> {
    // SAFETY: the caller's contract.
    unsafe { call_giving(func::HOST_UNPIN, pfn, nr, 0, 0) }.map(drop)
}

/// Guest calls (pKVM-compatible).
pub mod guest {
    use super::*;

    pub fn hyp_meminfo() -> u64 {
        raw(func::HYP_MEMINFO)[0]
    }

    /// # Safety
    /// The host may write the pages at any time until MEM_UNSHARE: the
    /// guest reaches them only through raw pointers, never references.
    pub unsafe fn mem_share(ipa: u64, nr: u64) -> Result<(), Error> {
        // SAFETY: the caller's contract.
        unsafe { call_giving(func::MEM_SHARE, ipa, nr, 0, 0) }.map(drop)
    }

    pub fn mem_unshare(ipa: u64, nr: u64) -> Result<(), Error> {
        call(func::MEM_UNSHARE, ipa, nr, 0, 0).map(drop)
    }

    /// # Safety
    /// The pages are zeroed and leave the guest: nothing may use them
    /// afterwards.
    pub unsafe fn mem_relinquish(ipa: u64, nr: u64) -> Result<(), Error> {
        // SAFETY: the caller's contract.
        unsafe { call_giving(func::MEM_RELINQUISH, ipa, nr, 0, 0) }.map(drop)
    }
}
