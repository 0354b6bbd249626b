//! Pages the host donated to the hypervisor (HOST_DONATE_HYP), kept apart
//! from the boot pool so that each one can be given back by name
//! (HOST_RECLAIM) when it is free, and refused while it is in use.
//!
//! A sorted, fixed-capacity array of page frame numbers with an in-use bit:
//! membership, allocation and release are exact (no guessing from page
//! contents), and the cost is bounded and paid in the image, not per page of
//! RAM. A donation beyond the capacity is refused before anything changes.

/// Most donated pages tracked at once (8192 pages = 32 MiB of donations).
pub const CAPACITY: usize = 8192;

const IN_USE: u32 = 1 << 31;
const PFN_MASK: u32 = !IN_USE;

/// Why a donated-page operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DonatedError {
    /// No room for that many more pages.
    Full,
    /// The page is not a donated page.
    NotDonated,
    /// A page of the range is already tracked.
    AlreadyDonated,
    /// The page is in use by the hypervisor.
    InUse,
    /// The frame number does not fit the table (beyond 8 TiB).
    TooHigh,
}

pub struct DonatedPages {
    /// Sorted by frame number; bit 31 set while the page is in use.
    entries: [u32; CAPACITY],
    len: usize,
    free: usize,
    /// Every entry below this index is in use: `take` starts here, so
    /// taking pages one by one costs one step each, not a scan.
    first_free: usize,
}

impl Default for DonatedPages {
    fn default() -> Self {
        Self::new()
    }
}

impl DonatedPages {
    pub const fn new() -> Self {
        DonatedPages {
            entries: [0; CAPACITY],
            len: 0,
            free: 0,
            first_free: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Donated pages not in use.
    pub fn free(&self) -> usize {
        self.free
    }
    /// Room for this many more pages.
    pub fn room(&self) -> usize {
        CAPACITY - self.len
    }

    fn search(&self, pfn: u32) -> Result<usize, usize> {
        self.entries[..self.len].binary_search_by_key(&pfn, |e| e & PFN_MASK)
    }

    /// Whether `pfn` is a donated page, and if so whether it is in use.
    pub fn lookup(&self, pfn: u64) -> Option<bool> {
        let pfn = u32::try_from(pfn).ok().filter(|p| p & IN_USE == 0)?;
        self.search(pfn).ok().map(|i| self.entries[i] & IN_USE != 0)
    }

    /// Checks that `nr` pages from `pfn` can be added: all or nothing.
    pub fn check_add(&self, pfn: u64, nr: u64) -> Result<(), DonatedError> {
        let end = pfn.checked_add(nr).ok_or(DonatedError::TooHigh)?;
        if end > u64::from(PFN_MASK) {
            return Err(DonatedError::TooHigh);
        }
        if nr as usize > self.room() {
            return Err(DonatedError::Full);
        }
        // The first tracked page at or after `pfn` must lie beyond the range.
        let at = self.search(pfn as u32).unwrap_or_else(|i| i);
        if at < self.len && u64::from(self.entries[at] & PFN_MASK) < end {
            return Err(DonatedError::AlreadyDonated);
        }
        Ok(())
    }

    /// Adds `nr` free pages from `pfn` (after `check_add`).
    pub fn add(&mut self, pfn: u64, nr: u64) -> Result<(), DonatedError> {
        self.check_add(pfn, nr)?;
        let (pfn, nr) = (pfn as u32, nr as usize);
        let at = self.search(pfn).unwrap_or_else(|i| i);
        self.entries.copy_within(at..self.len, at + nr);
        for (i, e) in self.entries[at..at + nr].iter_mut().enumerate() {
            *e = pfn + i as u32;
        }
        self.len += nr;
        self.free += nr;
        self.first_free = self.first_free.min(at);
        Ok(())
    }

    /// Checks that every page of the range is donated and free.
    pub fn check_remove(&self, pfn: u64, nr: u64) -> Result<(), DonatedError> {
        for p in pfn..pfn.checked_add(nr).ok_or(DonatedError::NotDonated)? {
            match self.lookup(p) {
                None => return Err(DonatedError::NotDonated),
                Some(true) => return Err(DonatedError::InUse),
                Some(false) => {}
            }
        }
        Ok(())
    }

    /// Removes `nr` free pages from `pfn` (after `check_remove`).
    pub fn remove(&mut self, pfn: u64, nr: u64) -> Result<(), DonatedError> {
        self.check_remove(pfn, nr)?;
        // Consecutive frame numbers, all present: one contiguous run.
        let at = self
            .search(pfn as u32)
            .map_err(|_| DonatedError::NotDonated)?;
        let nr = nr as usize;
        self.entries.copy_within(at + nr..self.len, at);
        self.len -= nr;
        self.free -= nr;
        // The removed pages were free, so `first_free` was at most `at`.
        self.first_free = self.first_free.min(at);
        Ok(())
    }

    /// Every donated page and whether it is in use, by frame number.
    pub fn iter(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.entries[..self.len]
            .iter()
            .map(|e| (u64::from(e & PFN_MASK), e & IN_USE != 0))
    }

    /// The donated pages as runs of consecutive frame numbers: (first
    /// frame number, pages), in order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut i = 0;
        core::iter::from_fn(move || {
            let first = *self.entries[..self.len].get(i)? & PFN_MASK;
            let mut n = 1;
            while self.entries[..self.len]
                .get(i + n)
                .is_some_and(|&e| e & PFN_MASK == first + n as u32)
            {
                n += 1;
            }
            i += n;
            Some((u64::from(first), n as u64))
        })
    }

    /// The first page of [pfn, pfn + nr) that is not a donated page, if
    /// any. Costs one search and then one step per donated page it passes.
    pub fn first_missing(&self, pfn: u64, nr: u64) -> Option<u64> {
        let end = pfn.saturating_add(nr);
        if pfn >= end {
            return None;
        }
        let Some(first) = u32::try_from(pfn).ok().filter(|p| p & IN_USE == 0) else {
            return Some(pfn);
        };
        let at = self.search(first).unwrap_or_else(|i| i);
        let mut p = pfn;
        for &e in &self.entries[at..self.len] {
            if p == end || u64::from(e & PFN_MASK) != p {
                break;
            }
            p += 1;
        }
        (p < end).then_some(p)
    }

    /// Takes a free donated page, marking it in use.
    pub fn take(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let i = self.first_free
            + self.entries[self.first_free..self.len]
                .iter()
                .position(|e| e & IN_USE == 0)?;
        self.entries[i] |= IN_USE;
        self.free -= 1;
        self.first_free = i + 1;
        Some(u64::from(self.entries[i] & PFN_MASK))
    }

    /// Marks an in-use donated page free again; false if `pfn` is not a
    /// donated page in use.
    pub fn give_back(&mut self, pfn: u64) -> bool {
        let Some(pfn) = u32::try_from(pfn).ok().filter(|p| p & IN_USE == 0) else {
            return false;
        };
        match self.search(pfn) {
            Ok(i) if self.entries[i] & IN_USE != 0 => {
                self.entries[i] &= PFN_MASK;
                self.free += 1;
                self.first_free = self.first_free.min(i);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_take_give_back_remove() {
        let mut d = Box::new(DonatedPages::new());
        d.add(100, 4).unwrap();
        d.add(50, 2).unwrap();
        assert_eq!((d.len(), d.free()), (6, 6));
        assert_eq!(d.check_add(101, 1), Err(DonatedError::AlreadyDonated));
        assert_eq!(d.check_add(49, 2), Err(DonatedError::AlreadyDonated));
        assert_eq!(d.check_add(52, 48), Ok(()));
        let p = d.take().unwrap();
        assert_eq!(p, 50, "lowest free page first");
        assert_eq!(d.lookup(50), Some(true));
        assert_eq!(d.check_remove(50, 2), Err(DonatedError::InUse));
        assert_eq!(d.remove(50, 2), Err(DonatedError::InUse));
        assert_eq!(d.len(), 6, "a refused removal changes nothing");
        assert!(d.give_back(50));
        assert!(!d.give_back(50), "already free");
        assert!(!d.give_back(7), "not donated");
        d.remove(50, 2).unwrap();
        assert_eq!(d.check_remove(99, 2), Err(DonatedError::NotDonated));
        d.remove(101, 2).unwrap();
        assert_eq!(d.lookup(100), Some(false));
        assert_eq!(d.lookup(101), None);
        assert_eq!(d.lookup(103), Some(false));
        assert_eq!((d.len(), d.free()), (2, 2));
    }

    #[test]
    fn runs_and_first_missing() {
        let mut d = Box::new(DonatedPages::new());
        assert_eq!(d.runs().next(), None);
        assert_eq!(d.first_missing(5, 1), Some(5));
        assert_eq!(d.first_missing(5, 0), None, "an empty range");
        d.add(10, 3).unwrap();
        d.add(13, 2).unwrap();
        d.add(20, 1).unwrap();
        d.add(7, 2).unwrap();
        assert_eq!(d.take(), Some(7));
        let runs: Vec<_> = d.runs().collect();
        assert_eq!(runs, [(7, 2), (10, 5), (20, 1)], "in-use pages too");
        assert_eq!(d.first_missing(7, 2), None);
        assert_eq!(d.first_missing(7, 3), Some(9));
        assert_eq!(d.first_missing(10, 5), None);
        assert_eq!(d.first_missing(11, 10), Some(15));
        assert_eq!(d.first_missing(6, 2), Some(6));
        assert_eq!(d.first_missing(20, 2), Some(21), "past the last page");
        assert_eq!(
            d.first_missing(u64::from(PFN_MASK), 1),
            Some(u64::from(PFN_MASK))
        );
        assert_eq!(d.first_missing(u64::MAX - 1, 1), Some(u64::MAX - 1));
        for (first, n) in runs {
            for p in first..first + n {
                assert!(d.lookup(p).is_some());
            }
        }
    }

    /// `take` always hands out the lowest free page, whatever order pages
    /// were added, taken, given back and removed in (checked against a
    /// scan of every entry).
    #[test]
    fn take_finds_the_lowest_free_page_after_any_history() {
        let mut d = Box::new(DonatedPages::new());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20_000 {
            match next(4) {
                0 => {
                    let (pfn, nr) = (next(600), 1 + next(8));
                    let _ = d.add(pfn, nr);
                }
                1 => {
                    let want = d.iter().find(|&(_, used)| !used).map(|(p, _)| p);
                    assert_eq!(d.take(), want);
                }
                2 => {
                    let _ = d.give_back(next(620));
                }
                _ => {
                    let (pfn, nr) = (next(620), 1 + next(3));
                    let _ = d.remove(pfn, nr);
                }
            }
            let free = d.iter().filter(|&(_, used)| !used).count();
            assert_eq!(d.free(), free);
        }
        assert!(!d.is_empty(), "the history left pages to check");
    }

    #[test]
    fn capacity_and_range_limits() {
        let mut d = Box::new(DonatedPages::new());
        assert_eq!(d.add(0, CAPACITY as u64 + 1), Err(DonatedError::Full));
        assert_eq!(d.add(u64::from(PFN_MASK), 1), Err(DonatedError::TooHigh));
        assert_eq!(d.add(u64::MAX, 2), Err(DonatedError::TooHigh));
        d.add(10, CAPACITY as u64).unwrap();
        assert_eq!(d.room(), 0);
        assert_eq!(d.add(0, 1), Err(DonatedError::Full));
        for _ in 0..CAPACITY {
            assert!(d.take().is_some());
        }
        assert_eq!(d.take(), None);
        assert_eq!(d.free(), 0);
    }
}
