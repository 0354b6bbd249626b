//! Page ownership: what each page is, and the one table of what may happen
//! to it.
//!
//! Every page of RAM is in exactly one [`Page`] state, which names its owner
//! and, implicitly, each component's view of it (the ABI's OWNED,
//! SHARED_OWNED, SHARED_BORROWED, NOPAGE). [`transition`] maps (current
//! state, request) to the next state or a refusal, with no side effects, so
//! it is tested exhaustively below; the hypervisor checks a whole range with
//! it before changing anything, then applies the result to the stage-2
//! tables, its own stage 1 and its counters.
//!
//! The states are not stored here: they are read back from where they
//! already live (the host stage 2's software bits and invalid-entry
//! annotations, the VM table, the pin table), so uniformly owned memory
//! costs no metadata beyond its page-table entries.

/// Index of a VM slot (its ABI handle is `0x1000 + index`).
pub type VmIndex = u16;

/// Who owns a page (MEM_STATE x1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    Host,
    Hyp,
    Vm(VmIndex),
}

/// A component's view of a page (ABI codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum View {
    Owned = 0,
    SharedOwned = 1,
    SharedBorrowed = 2,
    NoPage = 3,
}

/// The state of one page of RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Page {
    /// The host's alone.
    HostOwned,
    /// The host's, borrowed by the hypervisor (HOST_SHARE_HYP).
    SharedWithHyp,
    /// The host's, borrowed by a guest (VM_SHARE).
    SharedWithGuest(VmIndex),
    /// The hypervisor's own: image, stacks, boot pool. Never given back.
    HypPrivate,
    /// Donated by the host (HOST_DONATE_HYP) and now part of the pool:
    /// `in_use` when the pool has handed it out, else reclaimable.
    HypDonated { in_use: bool },
    /// A guest's private memory (VM_DONATE).
    GuestOwned(VmIndex),
    /// A guest's page shared with the host (MEM_SHARE), `pinned` while the
    /// host holds at least one pin on it.
    GuestShared { vm: VmIndex, pinned: bool },
    /// A page of a destroyed VM, waiting for HOST_RECLAIM.
    Dead(VmIndex),
    /// A page a destroyed VM had shared with the host: the host still
    /// borrows it (and can read what the guest left there) until it
    /// reclaims it, zeroed, as its own; `pinned` while the host still
    /// holds pins it took before VM_DESTROY (HOST_UNPIN drops them one by
    /// one, HOST_RECLAIM all at once: the page is the host's own then).
    DeadShared { vm: VmIndex, pinned: bool },
    /// The host's page that it had shared with a VM now destroyed: the
    /// host still owns it and gets it back whole with HOST_RECLAIM.
    LentToDead(VmIndex),
}

/// What a caller asks of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    HostShareHyp,
    HostUnshareHyp,
    HostDonateHyp,
    HostReclaim,
    VmDonate(VmIndex),
    VmShare(VmIndex),
    VmUnshare(VmIndex),
    /// MEM_SHARE from guest `vm`.
    GuestShare(VmIndex),
    /// MEM_UNSHARE from guest `vm`.
    GuestUnshare(VmIndex),
    /// MEM_RELINQUISH from guest `vm`.
    GuestRelinquish(VmIndex),
    HostPin,
    /// Drop one pin; `last` when it is the host's only pin on the page.
    HostUnpin {
        last: bool,
    },
}

/// Why a request is refused (ABI DENIED or BUSY).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The page is not in the state or owner the request needs.
    Denied,
    /// The page is pinned by the host.
    Busy,
}

/// The state after `req`, or why not. Pure: the whole policy of ownership.
/// (Inlined: a caller that knows the request keeps only its arms.)
#[inline(always)]
pub fn transition(page: Page, req: Request) -> Result<Page, Refusal> {
    use Page::*;
    use Request::*;
    let next = match (page, req) {
        (HostOwned, HostShareHyp) => SharedWithHyp,
        (SharedWithHyp, HostUnshareHyp) => HostOwned,
        (HostOwned, HostDonateHyp) => HypDonated { in_use: false },
        (HypDonated { in_use: false }, HostReclaim) => HostOwned,
        (Dead(_) | DeadShared { .. } | LentToDead(_), HostReclaim) => HostOwned,
        (DeadShared { vm, pinned: true }, HostUnpin { last }) => DeadShared { vm, pinned: !last },
        (HostOwned, VmDonate(vm)) => GuestOwned(vm),
        (HostOwned, VmShare(vm)) => SharedWithGuest(vm),
        (SharedWithGuest(a), VmUnshare(b)) if a == b => HostOwned,
        (GuestOwned(a), GuestShare(b)) if a == b => GuestShared {
            vm: a,
            pinned: false,
        },
        (GuestShared { vm, pinned: false }, GuestUnshare(b)) if vm == b => GuestOwned(vm),
        (GuestShared { vm, pinned: true }, GuestUnshare(b) | GuestRelinquish(b)) if vm == b => {
            return Err(Refusal::Busy)
        }
        (GuestOwned(a), GuestRelinquish(b)) if a == b => HostOwned,
        (GuestShared { vm, pinned: false }, GuestRelinquish(b)) if vm == b => HostOwned,
        (GuestShared { vm, .. }, HostPin) => GuestShared { vm, pinned: true },
        (GuestShared { vm, pinned: true }, HostUnpin { last }) => GuestShared { vm, pinned: !last },
        _ => return Err(Refusal::Denied),
    };
    Ok(next)
}

/// Whether the page's contents must be zeroed (and flushed) before the new
/// owner sees it: memory leaving a guest or the hypervisor for the host,
/// and the host's own pages a destroyed VM could write into (whatever it
/// left there is the guest's).
pub fn must_zero(from: Page, to: Page) -> bool {
    to == Page::HostOwned
        && matches!(
            from,
            Page::HypDonated { .. }
                | Page::Dead(_)
                | Page::DeadShared { .. }
                | Page::LentToDead(_)
                | Page::GuestOwned(_)
                | Page::GuestShared { .. }
        )
}

impl Page {
    pub fn owner(self) -> Owner {
        match self {
            Page::HostOwned
            | Page::SharedWithHyp
            | Page::SharedWithGuest(_)
            | Page::LentToDead(_) => Owner::Host,
            Page::HypPrivate | Page::HypDonated { .. } => Owner::Hyp,
            Page::GuestOwned(vm)
            | Page::GuestShared { vm, .. }
            | Page::Dead(vm)
            | Page::DeadShared { vm, .. } => Owner::Vm(vm),
        }
    }

    /// The host's view (MEM_STATE x2).
    pub fn host_view(self) -> View {
        match self {
            Page::HostOwned => View::Owned,
            Page::SharedWithHyp | Page::SharedWithGuest(_) | Page::LentToDead(_) => {
                View::SharedOwned
            }
            Page::GuestShared { .. } | Page::DeadShared { .. } => View::SharedBorrowed,
            Page::HypPrivate | Page::HypDonated { .. } | Page::GuestOwned(_) | Page::Dead(_) => {
                View::NoPage
            }
        }
    }

    /// The hypervisor's view.
    pub fn hyp_view(self) -> View {
        match self {
            Page::SharedWithHyp => View::SharedBorrowed,
            Page::HypPrivate | Page::HypDonated { .. } => View::Owned,
            _ => View::NoPage,
        }
    }

    /// Guest `vm`'s view.
    pub fn guest_view(self, vm: VmIndex) -> View {
        match self {
            Page::GuestOwned(v) if v == vm => View::Owned,
            Page::GuestShared { vm: v, .. } if v == vm => View::SharedOwned,
            Page::SharedWithGuest(v) if v == vm => View::SharedBorrowed,
            _ => View::NoPage,
        }
    }

    /// Whether the host may access the page (its stage 2 maps it).
    pub fn host_accessible(self) -> bool {
        self.host_view() != View::NoPage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Page::*;
    use Request::*;

    const A: VmIndex = 0;
    const B: VmIndex = 1;

    fn all_pages() -> Vec<Page> {
        let mut v = vec![HostOwned, SharedWithHyp, HypPrivate];
        v.extend([false, true].map(|in_use| HypDonated { in_use }));
        for vm in [A, B] {
            v.extend([
                SharedWithGuest(vm),
                GuestOwned(vm),
                Dead(vm),
                LentToDead(vm),
            ]);
            v.extend([false, true].map(|pinned| DeadShared { vm, pinned }));
            v.extend([false, true].map(|pinned| GuestShared { vm, pinned }));
        }
        v
    }

    fn all_requests() -> Vec<Request> {
        let mut v = vec![
            HostShareHyp,
            HostUnshareHyp,
            HostDonateHyp,
            HostReclaim,
            HostPin,
        ];
        v.extend([false, true].map(|last| HostUnpin { last }));
        for vm in [A, B] {
            v.extend([VmDonate(vm), VmShare(vm), VmUnshare(vm)]);
            v.extend([GuestShare(vm), GuestUnshare(vm), GuestRelinquish(vm)]);
        }
        v
    }

    /// The contract, written out pair by pair (a second formulation, not a
    /// copy of `transition`): every allowed (state, request) and its result.
    fn allowed() -> Vec<(Page, Request, Result<Page, Refusal>)> {
        let mut t = vec![
            (HostOwned, HostShareHyp, Ok(SharedWithHyp)),
            (SharedWithHyp, HostUnshareHyp, Ok(HostOwned)),
            (HostOwned, HostDonateHyp, Ok(HypDonated { in_use: false })),
            (HypDonated { in_use: false }, HostReclaim, Ok(HostOwned)),
        ];
        for vm in [A, B] {
            t.extend([
                (Dead(vm), HostReclaim, Ok(HostOwned)),
                (DeadShared { vm, pinned: false }, HostReclaim, Ok(HostOwned)),
                // Pins the host took before VM_DESTROY: it may drop them,
                // or reclaim the page with them (it asked for that).
                (DeadShared { vm, pinned: true }, HostReclaim, Ok(HostOwned)),
                (
                    DeadShared { vm, pinned: true },
                    HostUnpin { last: false },
                    Ok(DeadShared { vm, pinned: true }),
                ),
                (
                    DeadShared { vm, pinned: true },
                    HostUnpin { last: true },
                    Ok(DeadShared { vm, pinned: false }),
                ),
                (LentToDead(vm), HostReclaim, Ok(HostOwned)),
                (HostOwned, VmDonate(vm), Ok(GuestOwned(vm))),
                (HostOwned, VmShare(vm), Ok(SharedWithGuest(vm))),
                (SharedWithGuest(vm), VmUnshare(vm), Ok(HostOwned)),
                (
                    GuestOwned(vm),
                    GuestShare(vm),
                    Ok(GuestShared { vm, pinned: false }),
                ),
                (
                    GuestShared { vm, pinned: false },
                    GuestUnshare(vm),
                    Ok(GuestOwned(vm)),
                ),
                (
                    GuestShared { vm, pinned: true },
                    GuestUnshare(vm),
                    Err(Refusal::Busy),
                ),
                (GuestOwned(vm), GuestRelinquish(vm), Ok(HostOwned)),
                (
                    GuestShared { vm, pinned: false },
                    GuestRelinquish(vm),
                    Ok(HostOwned),
                ),
                (
                    GuestShared { vm, pinned: true },
                    GuestRelinquish(vm),
                    Err(Refusal::Busy),
                ),
                (
                    GuestShared { vm, pinned: false },
                    HostPin,
                    Ok(GuestShared { vm, pinned: true }),
                ),
                (
                    GuestShared { vm, pinned: true },
                    HostPin,
                    Ok(GuestShared { vm, pinned: true }),
                ),
                (
                    GuestShared { vm, pinned: true },
                    HostUnpin { last: false },
                    Ok(GuestShared { vm, pinned: true }),
                ),
                (
                    GuestShared { vm, pinned: true },
                    HostUnpin { last: true },
                    Ok(GuestShared { vm, pinned: false }),
                ),
            ]);
        }
        t
    }

    #[test]
    fn every_state_and_request_matches_the_contract() {
        let table = allowed();
        let mut checked = 0;
        for page in all_pages() {
            for req in all_requests() {
                let expected = table
                    .iter()
                    .find(|(p, r, _)| *p == page && *r == req)
                    .map(|(_, _, res)| *res)
                    .unwrap_or(Err(Refusal::Denied));
                assert_eq!(transition(page, req), expected, "{page:?} + {req:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, all_pages().len() * all_requests().len());
    }

    #[test]
    fn views_are_consistent_with_owners() {
        for page in all_pages() {
            let owner = page.owner();
            // Exactly one component sees the page as OWNED or SHARED_OWNED,
            // and it is the owner (a dead VM no longer sees anything).
            let host_owns = matches!(page.host_view(), View::Owned | View::SharedOwned);
            let hyp_owns = page.hyp_view() == View::Owned;
            let vm_owns = [A, B]
                .iter()
                .any(|&vm| matches!(page.guest_view(vm), View::Owned | View::SharedOwned));
            assert_eq!(host_owns, owner == Owner::Host, "{page:?}");
            assert_eq!(hyp_owns, owner == Owner::Hyp, "{page:?}");
            if let Owner::Vm(_) = owner {
                assert_eq!(
                    vm_owns,
                    !matches!(page, Dead(_) | DeadShared { .. }),
                    "{page:?}"
                );
            }
            // A borrowed page has an owner that shares it.
            if page.host_view() == View::SharedBorrowed {
                assert!(matches!(owner, Owner::Vm(_)));
            }
            if page.hyp_view() == View::SharedBorrowed
                || [A, B]
                    .iter()
                    .any(|&vm| page.guest_view(vm) == View::SharedBorrowed)
            {
                assert_eq!(page.host_view(), View::SharedOwned);
            }
        }
    }

    #[test]
    fn a_guest_never_touches_another_guests_pages() {
        for page in all_pages() {
            for req in [
                GuestShare(B),
                GuestUnshare(B),
                GuestRelinquish(B),
                VmUnshare(B),
            ] {
                if let Owner::Vm(A) = page.owner() {
                    assert_eq!(
                        transition(page, req),
                        Err(Refusal::Denied),
                        "{page:?} + {req:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn pages_reaching_the_host_from_elsewhere_are_zeroed() {
        for page in all_pages() {
            for req in all_requests() {
                if let Ok(next) = transition(page, req) {
                    let leaves_other = page.owner() != Owner::Host && next.owner() == Owner::Host;
                    // A dead VM's writes into the host's own lent page too.
                    let written = matches!(page, LentToDead(_)) && next == HostOwned;
                    assert_eq!(
                        must_zero(page, next),
                        leaves_other || written,
                        "{page:?} + {req:?}"
                    );
                }
            }
        }
    }
}
