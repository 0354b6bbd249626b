//! Hypercall dispatch: the function IDs of the ABI (keel-abi) to handlers.

use keel_abi::{func, status};

/// Who issued the call: the host kernel, or a protected guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    Host,
    Guest,
}

/// What a call hands back: x0..x4, and how many of them it writes (the rest
/// of the caller's registers are preserved, as SMCCC 1.1 requires).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Return {
    pub regs: [u64; 5],
    pub count: usize,
}

impl Return {
    /// Only x0, a status.
    pub fn status(s: i64) -> Self {
        Return {
            regs: [s as u64, 0, 0, 0, 0],
            count: 1,
        }
    }

    /// x0 = SUCCESS, then `values` in x1...
    pub fn success(values: &[u64]) -> Self {
        let mut regs = [0; 5];
        let n = values.len().min(4);
        regs[1..=n].copy_from_slice(&values[..n]);
        Return { regs, count: n + 1 }
    }

    /// `values` from x0 on (FEATURES, CALL_UID, REVISION, HYP_MEMINFO).
    pub fn raw(values: &[u64]) -> Self {
        let mut regs = [0; 5];
        let n = values.len().min(5);
        regs[..n].copy_from_slice(&values[..n]);
        Return { regs, count: n }
    }

    /// Copies the results into a saved register file (x0..x30).
    pub fn apply(&self, x: &mut [u64; 31]) {
        x[..self.count].copy_from_slice(&self.regs[..self.count]);
    }
}

/// The limits HYP_FEATURES reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_vms: u64,
    pub max_vcpus: u64,
}

/// A call's function ID and arguments (x0, x1..x5) as the caller left them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    pub id: u64,
    pub args: [u64; 5],
}

impl Call {
    /// Reads x0..x5 of a saved register file.
    pub fn from_regs(x: &[u64; 31]) -> Self {
        Call {
            id: x[0],
            args: [x[1], x[2], x[3], x[4], x[5]],
        }
    }
}

/// The vendor-hypervisor functions this build implements, as FEATURES
/// reports them (bit n for function number n). Grows with the ABI work.
pub const IMPLEMENTED_FEATURES: u64 = keel_abi::FEATURES_BITMAP;

/// Discovery calls, answered the same for every caller. None when `id` is not
/// a discovery call.
pub fn discovery(call: &Call, limits: &Limits) -> Option<Return> {
    let ret = match call.id {
        // x0..x3 are the bitmap of functions 0..127 (as KVM answers it):
        // only functions 0..31 exist, so x1..x3 are 0.
        func::FEATURES => Return::raw(&[IMPLEMENTED_FEATURES, 0, 0, 0]),
        func::CALL_UID => Return::raw(&keel_abi::KVM_UID),
        func::REVISION => Return::raw(&[keel_abi::REVISION_MAJOR, keel_abi::REVISION_MINOR]),
        func::HYP_FEATURES => {
            Return::success(&[keel_abi::BLOCK_SIZES, limits.max_vms, limits.max_vcpus])
        }
        _ => return None,
    };
    Some(ret)
}

/// Handles one HVC with immediate `imm` from `caller`.
pub fn dispatch(caller: Caller, imm: u64, call: &Call, limits: &Limits) -> Return {
    if imm != 0 {
        return Return::status(status::NOT_SUPPORTED);
    }
    if let Some(ret) = discovery(call, limits) {
        return ret;
    }
    match caller {
        Caller::Host | Caller::Guest => Return::status(status::NOT_SUPPORTED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_vms: 8,
        max_vcpus: 4,
    };

    fn call(id: u64) -> Call {
        Call { id, args: [0; 5] }
    }

    #[test]
    fn discovery_answers_as_the_contract_says() {
        let r = dispatch(Caller::Host, 0, &call(func::CALL_UID), &LIMITS);
        assert_eq!(r.count, 4);
        assert_eq!(r.regs[..4], keel_abi::KVM_UID);
        let r = dispatch(Caller::Host, 0, &call(func::REVISION), &LIMITS);
        assert_eq!((r.regs[0], r.regs[1], r.count), (1, 0, 2));
        let r = dispatch(Caller::Host, 0, &call(func::HYP_FEATURES), &LIMITS);
        assert_eq!(r.regs[..4], [0, (1 << 12) | (1 << 21) | (1 << 30), 8, 4]);
        let r = dispatch(Caller::Guest, 0, &call(func::FEATURES), &LIMITS);
        assert_eq!(r.count, 4, "FEATURES writes x0..x3");
        assert_eq!(r.regs[..4], [keel_abi::FEATURES_BITMAP, 0, 0, 0]);
    }

    #[test]
    fn unknown_ids_and_nonzero_immediates_are_refused() {
        for id in [0, 1, 0x8600_0001, 0xC600_0FFF, 0xFFFF_FFFF, u64::MAX] {
            let r = dispatch(Caller::Host, 0, &call(id), &LIMITS);
            assert_eq!(r, Return::status(status::NOT_SUPPORTED), "id {id:#x}");
        }
        let r = dispatch(Caller::Host, 1, &call(func::REVISION), &LIMITS);
        assert_eq!(r, Return::status(status::NOT_SUPPORTED));
    }

    #[test]
    fn apply_writes_only_result_registers() {
        let mut x = [7u64; 31];
        Return::status(status::DENIED).apply(&mut x);
        assert_eq!(x[0], status::DENIED as u64);
        assert!(x[1..].iter().all(|&v| v == 7));
    }
}
