//! Pages shared across the host/guest boundary, page by page: which VM is
//! on the other side, in which direction, and the host's pins. The host
//! stage 2 records that such a page is shared; this table records with
//! whom, which the page tables have no room for.
//!
//! A sorted, fixed-capacity array: exact, bounded, and paid for once in the
//! image. A share that would not fit is refused (NO_MEMORY) before anything
//! changes.

/// Most shared pages tracked at once (8 MiB of shared memory).
pub const CAPACITY: usize = 2048;

/// Which way a page is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A guest's page the host borrows (MEM_SHARE).
    ToHost,
    /// A host page a guest borrows (VM_SHARE).
    ToGuest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub pfn: u64,
    pub vm: u16,
    pub dir: Direction,
    /// The host's pins (ToHost pages only).
    pub pins: u32,
}

const EMPTY: Entry = Entry {
    pfn: 0,
    vm: 0,
    dir: Direction::ToHost,
    pins: 0,
};

pub struct Lent {
    entries: [Entry; CAPACITY],
    len: usize,
}

impl Default for Lent {
    fn default() -> Self {
        Self::new()
    }
}

impl Lent {
    pub const fn new() -> Self {
        Lent {
            entries: [EMPTY; CAPACITY],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn room(&self) -> usize {
        CAPACITY - self.len
    }

    fn search(&self, pfn: u64) -> Result<usize, usize> {
        self.entries[..self.len].binary_search_by_key(&pfn, |e| e.pfn)
    }

    pub fn get(&self, pfn: u64) -> Option<&Entry> {
        self.search(pfn).ok().map(|i| &self.entries[i])
    }

    /// Records `pfn` as shared (the caller checked `room()` and that the page
    /// is not recorded already); false if it was.
    pub fn insert(&mut self, pfn: u64, vm: u16, dir: Direction) -> bool {
        match self.search(pfn) {
            Ok(_) => false,
            Err(_) if self.len == CAPACITY => false,
            Err(i) => {
                // A page above every recorded one moves nothing.
                if i < self.len {
                    self.entries.copy_within(i..self.len, i + 1);
                }
                self.entries[i] = Entry {
                    pfn,
                    vm,
                    dir,
                    pins: 0,
                };
                self.len += 1;
                true
            }
        }
    }

    /// Forgets `pfn`; returns its entry.
    pub fn remove(&mut self, pfn: u64) -> Option<Entry> {
        let i = self.search(pfn).ok()?;
        let e = self.entries[i];
        if i + 1 < self.len {
            self.entries.copy_within(i + 1..self.len, i);
        }
        self.len -= 1;
        Some(e)
    }

    /// Adds one pin; false if the page is not a guest page lent to the host
    /// or the count would overflow.
    pub fn pin(&mut self, pfn: u64) -> bool {
        match self.search(pfn) {
            Ok(i)
                if self.entries[i].dir == Direction::ToHost && self.entries[i].pins < u32::MAX =>
            {
                self.entries[i].pins += 1;
                true
            }
            _ => false,
        }
    }

    /// Drops one pin; false if there is none.
    pub fn unpin(&mut self, pfn: u64) -> bool {
        match self.search(pfn) {
            Ok(i) if self.entries[i].pins > 0 => {
                self.entries[i].pins -= 1;
                true
            }
            _ => false,
        }
    }

    /// The first page of [pfn, pfn + nr) not recorded as shared in
    /// direction `dir`, if any. Costs one search and then one step per
    /// recorded page it passes.
    pub fn first_missing(&self, pfn: u64, nr: u64, dir: Direction) -> Option<u64> {
        let end = pfn.saturating_add(nr);
        let at = self.search(pfn).unwrap_or_else(|i| i);
        let mut p = pfn;
        for e in &self.entries[at..self.len] {
            if p >= end || e.pfn != p || e.dir != dir {
                break;
            }
            p += 1;
        }
        (p < end).then_some(p)
    }

    /// Every entry of `vm`.
    pub fn of_vm(&self, vm: u16) -> impl Iterator<Item = &Entry> + '_ {
        self.entries[..self.len].iter().filter(move |e| e.vm == vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_pin_remove() {
        let mut l = Box::new(Lent::new());
        assert!(l.insert(30, 1, Direction::ToHost));
        assert!(l.insert(10, 2, Direction::ToGuest));
        assert!(l.insert(20, 1, Direction::ToHost));
        assert!(!l.insert(20, 3, Direction::ToHost), "already recorded");
        assert_eq!(l.get(20).unwrap().vm, 1);
        assert!(l.pin(20) && l.pin(20));
        assert!(!l.pin(10), "host pages lent to a guest are not pinned");
        assert_eq!(l.get(20).unwrap().pins, 2);
        assert!(l.unpin(20) && l.unpin(20));
        assert!(!l.unpin(20), "no pin left");
        assert_eq!(l.of_vm(1).count(), 2);
        assert_eq!(l.remove(20).unwrap().pfn, 20);
        assert_eq!(l.get(20), None);
        assert_eq!(l.len(), 2);
        assert!(l.get(10).is_some() && l.get(30).is_some());
    }

    #[test]
    fn first_missing_follows_the_direction() {
        let mut l = Box::new(Lent::new());
        assert_eq!(l.first_missing(5, 2, Direction::ToHost), Some(5));
        assert_eq!(l.first_missing(5, 0, Direction::ToHost), None);
        for p in 10..14 {
            assert!(l.insert(p, 1, Direction::ToHost));
        }
        assert!(l.insert(14, 2, Direction::ToGuest));
        assert!(l.insert(16, 2, Direction::ToGuest));
        assert_eq!(l.first_missing(10, 4, Direction::ToHost), None);
        assert_eq!(l.first_missing(11, 2, Direction::ToHost), None);
        assert_eq!(l.first_missing(10, 5, Direction::ToHost), Some(14));
        assert_eq!(l.first_missing(10, 1, Direction::ToGuest), Some(10));
        assert_eq!(l.first_missing(14, 1, Direction::ToGuest), None);
        assert_eq!(l.first_missing(14, 3, Direction::ToGuest), Some(15));
        assert_eq!(l.first_missing(9, 3, Direction::ToHost), Some(9));
        assert_eq!(l.first_missing(16, 2, Direction::ToGuest), Some(17));
    }

    #[test]
    fn capacity_is_enforced() {
        let mut l = Box::new(Lent::new());
        for p in 0..CAPACITY as u64 {
            assert!(l.insert(p, 0, Direction::ToHost));
        }
        assert_eq!(l.room(), 0);
        assert!(!l.insert(CAPACITY as u64, 0, Direction::ToHost));
    }
}
