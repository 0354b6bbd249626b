//! Pages shared across the host/guest boundary, page by page: which VM is
//! on the other side, in which direction, and the host's pins. The host
//! stage 2 records that such a page is shared; this table records with
//! whom, which the page tables have no room for.
//!
//! One packed word per page of RAM, indexed by the page's position in RAM
//! ([`RamFrames`]: holes between RAM regions cost nothing; the
//! hypervisor's share of a `struct page`): every lookup and update is one
//! load or store, and any amount of RAM can be shared, as in pKVM. The
//! words are 4 bytes per 4 KiB page (0.1% of RAM), set aside at boot and
//! given to [`Lent::attach`]. A page outside them is never recorded: a
//! share of it is refused (NO_MEMORY) before anything changes.

use keel_mm::frames::RamFrames;

/// A word's fields: 0 is a page nobody borrows; the pins are its low bits.
const RECORDED: u32 = 1 << 31;
const TO_GUEST: u32 = 1 << 30;
const VM_SHIFT: u32 = 24;
const VM_MASK: u32 = 0x3f;

/// Most pins one page can hold (HOST_PIN beyond it is refused): the
/// word's pin field is all ones.
pub const MAX_PINS: u32 = (1 << VM_SHIFT) - 1;
const _: () = assert!(crate::vm::MAX_VMS <= VM_MASK as usize + 1);

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

impl Entry {
    fn unpack(pfn: u64, word: u32) -> Option<Entry> {
        (word & RECORDED != 0).then_some(Entry {
            pfn,
            vm: ((word >> VM_SHIFT) & VM_MASK) as u16,
            dir: if word & TO_GUEST != 0 {
                Direction::ToGuest
            } else {
                Direction::ToHost
            },
            pins: word & MAX_PINS,
        })
    }
}

pub struct Lent {
    /// The pages covered: the page at index `i` of `ram` has word `i` of
    /// `head` then `tail`.
    ram: RamFrames,
    /// The first frame of RAM: `head` holds the words of its first run,
    /// so most lookups are one subtraction and one bounds check.
    first: u64,
    head: &'static mut [u32],
    /// The words of the other runs.
    tail: &'static mut [u32],
    /// Pages recorded, by direction: (to the host, to a guest).
    counts: (u64, u64),
}

impl Default for Lent {
    fn default() -> Self {
        Self::new()
    }
}

impl Lent {
    /// A table that covers no page until [`attach`](Self::attach)ed.
    pub const fn new() -> Self {
        Lent {
            ram: RamFrames::EMPTY,
            first: 0,
            head: &mut [],
            tail: &mut [],
            counts: (0, 0),
        }
    }

    /// Covers the pages of `ram`, one word of `words` each (at least its
    /// pages; cleared here), in place of what the table covered before,
    /// which must be nothing recorded.
    pub fn attach(&mut self, ram: RamFrames, words: &'static mut [u32]) {
        assert!(
            self.words().all(|w| w == 0),
            "attaching over recorded pages"
        );
        let (words, _) = words.split_at_mut(ram.pages() as usize);
        words.fill(0);
        let (first, head_pages) = ram.runs().next().unwrap_or((0, 0));
        let (head, tail) = words.split_at_mut(head_pages as usize);
        *self = Lent {
            ram,
            first,
            head,
            tail,
            counts: (0, 0),
        };
    }

    /// Every word, in the order of RAM.
    fn words(&self) -> impl Iterator<Item = u32> + '_ {
        self.head.iter().chain(self.tail.iter()).copied()
    }

    /// Whether every page of [pfn, pfn + nr) can be recorded.
    #[inline]
    pub fn covers(&self, pfn: u64, nr: u64) -> bool {
        let i = pfn.wrapping_sub(self.first);
        let head = self.head.len() as u64;
        if i < head {
            return nr <= head - i;
        }
        nr == 0 || self.ram.span(pfn, nr).is_some()
    }

    /// Where `pfn`'s word is in `tail`, if the table covers it and it is
    /// not in the first run (out of line: most machines have one run).
    #[inline(never)]
    fn tail_index(&self, pfn: u64) -> Option<usize> {
        let i = self.ram.index(pfn)?;
        usize::try_from(i).ok()?.checked_sub(self.head.len())
    }

    #[inline(always)]
    fn word(&self, pfn: u64) -> Option<u32> {
        match self.head.get(pfn.wrapping_sub(self.first) as usize) {
            Some(&w) => Some(w),
            None => self.tail.get(self.tail_index(pfn)?).copied(),
        }
    }

    #[inline(always)]
    fn word_mut(&mut self, pfn: u64) -> Option<&mut u32> {
        let i = pfn.wrapping_sub(self.first) as usize;
        if i < self.head.len() {
            return self.head.get_mut(i);
        }
        let i = self.tail_index(pfn)?;
        self.tail.get_mut(i)
    }

    #[inline(always)]
    pub fn get(&self, pfn: u64) -> Option<Entry> {
        Entry::unpack(pfn, self.word(pfn)?)
    }

    /// Records `pfn` as shared with slot `vm` (the caller checked that it
    /// is covered and not recorded already); false if it was recorded or
    /// is not covered.
    #[inline]
    pub fn insert(&mut self, pfn: u64, vm: u16, dir: Direction) -> bool {
        let Some(w) = self.word_mut(pfn) else {
            return false;
        };
        if *w != 0 {
            return false;
        }
        let to_guest = if dir == Direction::ToGuest {
            TO_GUEST
        } else {
            0
        };
        *w = RECORDED | to_guest | ((u32::from(vm) & VM_MASK) << VM_SHIFT);
        match dir {
            Direction::ToHost => self.counts.0 += 1,
            Direction::ToGuest => self.counts.1 += 1,
        }
        true
    }

    /// Forgets `pfn`; returns its entry.
    #[inline(always)]
    pub fn remove(&mut self, pfn: u64) -> Option<Entry> {
        let w = self.word_mut(pfn)?;
        let e = Entry::unpack(pfn, *w)?;
        *w = 0;
        match e.dir {
            Direction::ToHost => self.counts.0 -= 1,
            Direction::ToGuest => self.counts.1 -= 1,
        }
        Some(e)
    }

    /// Adds one pin; false if the page is not a guest page lent to the host
    /// or it holds [`MAX_PINS`] already.
    pub fn pin(&mut self, pfn: u64) -> bool {
        match self.word_mut(pfn) {
            Some(w) if *w & (RECORDED | TO_GUEST) == RECORDED && *w & MAX_PINS < MAX_PINS => {
                *w += 1;
                true
            }
            _ => false,
        }
    }

    /// Drops one pin; false if there is none.
    pub fn unpin(&mut self, pfn: u64) -> bool {
        match self.word_mut(pfn) {
            Some(w) if *w & RECORDED != 0 && *w & MAX_PINS > 0 => {
                *w -= 1;
                true
            }
            _ => false,
        }
    }

    /// How many pages are recorded: (to the host, to a guest).
    pub fn counts(&self) -> (u64, u64) {
        self.counts
    }

    /// Every recorded page, in the order of RAM (a scan of the whole table:
    /// for the invariant checker).
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.ram
            .runs()
            .flat_map(|(first, pages)| first..first + pages)
            .zip(self.head.iter().chain(self.tail.iter()))
            .filter_map(|(pfn, &w)| Entry::unpack(pfn, w))
    }

    /// The first page of [pfn, pfn + nr) not recorded as shared in
    /// direction `dir` with a VM slot `vm_ok` accepts, if any: one step per
    /// page it passes.
    pub fn first_missing(
        &self,
        pfn: u64,
        nr: u64,
        dir: Direction,
        vm_ok: impl Fn(u16) -> bool,
    ) -> Option<u64> {
        let end = pfn.saturating_add(nr);
        (pfn..end).find(|&p| self.get(p).is_none_or(|e| e.dir != dir || !vm_ok(e.vm)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table covering `pages` pages from frame `first`.
    fn table(first: u64, pages: usize) -> Lent {
        let mut l = Lent::new();
        l.attach(
            RamFrames::one(first, pages as u64),
            Box::leak(vec![0x5a5a_5a5a; pages].into_boxed_slice()),
        );
        l
    }

    #[test]
    fn insert_lookup_pin_remove() {
        let mut l = table(8, 32);
        assert!(l.insert(30, 1, Direction::ToHost));
        assert!(l.insert(10, 2, Direction::ToGuest));
        assert!(l.insert(20, 1, Direction::ToHost));
        assert!(!l.insert(20, 3, Direction::ToHost), "already recorded");
        assert_eq!(l.get(20).unwrap().vm, 1);
        assert_eq!(l.get(10).unwrap().dir, Direction::ToGuest);
        assert!(l.pin(20) && l.pin(20));
        assert!(!l.pin(10), "host pages lent to a guest are not pinned");
        let all: Vec<_> = l.entries().map(|e| (e.pfn, e.vm, e.pins)).collect();
        assert_eq!(
            all,
            [(10, 2, 0), (20, 1, 2), (30, 1, 0)],
            "in the order of RAM"
        );
        assert!(!l.pin(11), "nothing recorded");
        assert_eq!(l.get(20).unwrap().pins, 2);
        assert!(l.unpin(20) && l.unpin(20));
        assert!(!l.unpin(20), "no pin left");
        assert_eq!(l.remove(20).unwrap().pfn, 20);
        assert_eq!(l.remove(20), None);
        assert_eq!(l.get(20), None);
        assert!(l.get(10).is_some() && l.get(30).is_some());
        assert_eq!(l.get(30).unwrap().vm, 1);
    }

    #[test]
    fn every_vm_slot_and_direction_round_trips() {
        let mut l = table(0, 64);
        for vm in 0..crate::vm::MAX_VMS as u16 {
            for (k, dir) in [Direction::ToHost, Direction::ToGuest]
                .into_iter()
                .enumerate()
            {
                let pfn = u64::from(vm) * 2 + k as u64;
                assert!(l.insert(pfn, vm, dir));
                let e = l.get(pfn).unwrap();
                assert_eq!((e.pfn, e.vm, e.dir, e.pins), (pfn, vm, dir, 0));
            }
        }
    }

    #[test]
    fn pins_stop_at_the_most_a_page_holds() {
        let mut l = table(0, 4);
        assert!(l.insert(1, 7, Direction::ToHost));
        l.head[1] += MAX_PINS - 1;
        assert!(l.pin(1));
        assert_eq!(l.get(1).unwrap().pins, MAX_PINS);
        assert!(!l.pin(1), "the count is full");
        let e = l.get(1).unwrap();
        assert_eq!((e.vm, e.dir, e.pins), (7, Direction::ToHost, MAX_PINS));
        assert!(l.unpin(1));
        assert_eq!(l.get(1).unwrap().pins, MAX_PINS - 1);
    }

    #[test]
    fn pages_outside_the_table_are_never_recorded() {
        let mut l = table(100, 10);
        assert!(l.covers(100, 10) && l.covers(109, 1) && l.covers(100, 0));
        assert!(!l.covers(99, 1) && !l.covers(105, 6) && !l.covers(110, 1));
        assert!(!l.covers(105, u64::MAX), "no overflow");
        for pfn in [0, 99, 110, u64::MAX, 100u64.wrapping_sub(1 << 40)] {
            assert!(!l.insert(pfn, 1, Direction::ToHost), "{pfn:#x}");
            assert_eq!(l.get(pfn), None);
            assert!(!l.pin(pfn) && !l.unpin(pfn));
            assert_eq!(l.remove(pfn), None);
        }
        assert!(l.words().all(|w| w == 0));
        let empty = Lent::new();
        assert!(!empty.covers(0, 1) && empty.covers(0, 0));
        assert_eq!(empty.get(0), None);
    }

    #[test]
    #[should_panic(expected = "attaching over recorded pages")]
    fn attach_refuses_a_table_in_use() {
        let mut l = table(0, 4);
        assert!(l.insert(2, 1, Direction::ToHost));
        l.attach(
            RamFrames::one(0, 4),
            Box::leak(vec![0; 4].into_boxed_slice()),
        );
    }

    /// RAM in two runs: a word for each RAM page and none for the hole,
    /// which is never recorded.
    #[test]
    fn holes_between_ram_runs_have_no_words() {
        let ram = RamFrames::new(&[(0x40000, 8), (0x900000, 8)]).unwrap();
        let mut l = Lent::new();
        l.attach(ram, Box::leak(vec![0; 16].into_boxed_slice()));
        assert!(l.insert(0x40007, 1, Direction::ToHost));
        assert!(l.insert(0x900000, 2, Direction::ToGuest));
        assert_eq!(l.words().filter(|&w| w != 0).count(), 2);
        assert_eq!((l.head.len(), l.tail.len()), (8, 8));
        assert_eq!(l.get(0x40007).unwrap().vm, 1);
        assert_eq!(l.get(0x900000).unwrap().vm, 2);
        assert!(!l.insert(0x40008, 1, Direction::ToHost), "the hole");
        assert!(!l.covers(0x40007, 2) && l.covers(0x900000, 8));
        assert_eq!(
            l.first_missing(0x40006, 3, Direction::ToHost, |_| true),
            Some(0x40006)
        );
        assert_eq!(
            l.first_missing(0x40007, 2, Direction::ToHost, |_| true),
            Some(0x40008)
        );
    }

    #[test]
    fn attach_clears_the_words() {
        let l = table(0, 16);
        assert!((0..16).all(|p| l.get(p).is_none()));
    }

    #[test]
    fn first_missing_follows_the_direction() {
        let mut l = table(0, 64);
        assert_eq!(l.first_missing(5, 2, Direction::ToHost, |_| true), Some(5));
        assert_eq!(l.first_missing(5, 0, Direction::ToHost, |_| true), None);
        for p in 10..14 {
            assert!(l.insert(p, 1, Direction::ToHost));
        }
        assert!(l.insert(14, 2, Direction::ToGuest));
        assert!(l.insert(16, 2, Direction::ToGuest));
        assert_eq!(l.first_missing(10, 4, Direction::ToHost, |_| true), None);
        assert_eq!(l.first_missing(11, 2, Direction::ToHost, |_| true), None);
        // Records of a VM slot the caller does not accept do not count.
        assert_eq!(
            l.first_missing(10, 4, Direction::ToHost, |vm| vm != 1),
            Some(10)
        );
        assert_eq!(
            l.first_missing(14, 1, Direction::ToGuest, |vm| vm == 2),
            None
        );
        assert_eq!(
            l.first_missing(10, 5, Direction::ToHost, |_| true),
            Some(14)
        );
        assert_eq!(
            l.first_missing(10, 1, Direction::ToGuest, |_| true),
            Some(10)
        );
        assert_eq!(l.first_missing(14, 1, Direction::ToGuest, |_| true), None);
        assert_eq!(
            l.first_missing(14, 3, Direction::ToGuest, |_| true),
            Some(15)
        );
        assert_eq!(l.first_missing(9, 3, Direction::ToHost, |_| true), Some(9));
        assert_eq!(
            l.first_missing(16, 2, Direction::ToGuest, |_| true),
            Some(17)
        );
        assert_eq!(
            l.first_missing(63, 2, Direction::ToHost, |_| true),
            Some(63)
        );
    }
}
