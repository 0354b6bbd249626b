//! Pages the host donated to the hypervisor (HOST_DONATE_HYP), kept apart
//! from the boot pool so that each one can be given back by name
//! (HOST_RECLAIM) when it is free, and refused while it is in use.
//!
//! Two bits per page of RAM, in words boot sets aside and gives to
//! [`DonatedPages::attach`] (like the lent-page words), indexed by the
//! page's position in RAM ([`RamFrames`], so holes cost nothing): whether
//! the page is donated, and whether it is free. Membership, release and reclaim are
//! exact and touch one bit per page (a word per 64 pages for a range), and
//! donations are limited by RAM alone. The free bits have two summary
//! levels above them (a bit per word of the level below that has any bit
//! set), so [`take`](DonatedPages::take), which hands out the lowest free
//! page, reads a few words whatever is free and where. The cost is 2 bits
//! and a little per 4 KiB page: 64 KiB and half a KiB per GiB of RAM.

use crate::frames::RamFrames;

/// Levels of free bits: a bit per page, then a bit per word of the level
/// below. The top level has a bit per 2^18 pages (1 GiB).
const LEVELS: usize = 3;
const BITS: u64 = u64::BITS as u64;
/// log2 of the pages one word of the top level covers.
const TOP_WORD_SHIFT: u32 = 6 * LEVELS as u32;

/// Why a donated-page operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DonatedError {
    /// A page of the range is not one the table covers (not RAM).
    NotCovered,
    /// The page is not a donated page.
    NotDonated,
    /// A page of the range is already donated.
    AlreadyDonated,
    /// The page is in use by the hypervisor.
    InUse,
}

pub struct DonatedPages {
    /// The pages covered, and each one's bit.
    ram: RamFrames,
    /// A bit per page: donated.
    donated: &'static mut [u64],
    /// `free[0]`: a bit per page, donated and not in use; `free[l]`: a bit
    /// per word of `free[l - 1]` that is not zero.
    free: [&'static mut [u64]; LEVELS],
    len: u64,
    free_pages: u64,
    /// Every word of the top free level below this index is zero: `take`
    /// starts here.
    first_free: usize,
}

impl Default for DonatedPages {
    fn default() -> Self {
        Self::new()
    }
}

/// The words of bits `start..end` and the mask of those bits in each.
fn spans(start: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut at = start;
    core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let word = at / BITS;
        let lo = at % BITS;
        let hi = (end - word * BITS).min(BITS);
        let mask = (u64::MAX >> (BITS - (hi - lo))) << lo;
        at = (word + 1) * BITS;
        Some((word as usize, mask))
    })
}

/// The first bit at or after `from` and below `limit` that is set in
/// `map` (`want`) or clear (`!want`); `limit` if none.
fn next_bit(map: &[u64], from: u64, limit: u64, want: bool) -> u64 {
    let flip = if want { 0 } else { u64::MAX };
    let mut word = from / BITS;
    let mut bits = match map.get(word as usize) {
        Some(w) => (w ^ flip) & (u64::MAX << (from % BITS)),
        None => return limit,
    };
    loop {
        if bits != 0 {
            return (word * BITS + u64::from(bits.trailing_zeros())).min(limit);
        }
        word += 1;
        if word * BITS >= limit {
            return limit;
        }
        bits = map[word as usize] ^ flip;
    }
}

fn bit(map: &[u64], i: u64) -> bool {
    map[(i / BITS) as usize] & (1 << (i % BITS)) != 0
}

impl DonatedPages {
    /// A table that covers no page until [`attach`](Self::attach)ed: every
    /// donation is refused.
    pub const fn new() -> Self {
        DonatedPages {
            ram: RamFrames::EMPTY,
            donated: &mut [],
            free: [&mut [], &mut [], &mut []],
            len: 0,
            free_pages: 0,
            first_free: 0,
        }
    }

    /// Words [`attach`](Self::attach) needs to cover `pages` pages.
    pub const fn words_for(pages: u64) -> usize {
        let mut words = pages.div_ceil(BITS);
        // The donated bits, then each free level.
        let mut total = words;
        let mut level = 0;
        while level < LEVELS {
            total += words;
            words = words.div_ceil(BITS);
            level += 1;
        }
        total as usize
    }

    /// Covers the pages of `ram`, with `words` (at least
    /// [`words_for`](Self::words_for) its pages, cleared here), in place of
    /// what the table covered before, which must hold no donated page.
    pub fn attach(&mut self, ram: RamFrames, words: &'static mut [u64]) {
        assert_eq!(self.len, 0, "attaching over donated pages");
        let pages = ram.pages();
        let need = Self::words_for(pages);
        assert!(
            words.len() >= need,
            "{} words for {pages} pages",
            words.len()
        );
        let (words, _) = words.split_at_mut(need);
        words.fill(0);
        let mut n = pages.div_ceil(BITS) as usize;
        let (donated, mut rest) = words.split_at_mut(n);
        let mut free: [&'static mut [u64]; LEVELS] = [&mut [], &mut [], &mut []];
        for level in free.iter_mut() {
            let (this, above) = rest.split_at_mut(n);
            *level = this;
            rest = above;
            n = n.div_ceil(BITS as usize);
        }
        *self = DonatedPages {
            ram,
            donated,
            free,
            len: 0,
            free_pages: 0,
            first_free: 0,
        };
    }

    /// Donated pages.
    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Donated pages not in use.
    pub fn free(&self) -> usize {
        self.free_pages as usize
    }

    /// The bits of `nr` pages from `pfn`, if the table covers them all.
    fn covered(&self, pfn: u64, nr: u64) -> Option<(u64, u64)> {
        self.ram.span(pfn, nr).map(|s| (s.start, s.end))
    }

    /// The frame of bit `i` (one the table covers).
    fn frame(&self, i: u64) -> u64 {
        self.ram.frame(i).map_or(u64::MAX, |(pfn, _)| pfn)
    }

    /// Whether `pfn` is a donated page, and if so whether it is in use.
    pub fn lookup(&self, pfn: u64) -> Option<bool> {
        let i = self.ram.index(pfn)?;
        bit(self.donated, i).then(|| !bit(self.free[0], i))
    }

    /// Checks that `nr` pages from `pfn` can be added: all or nothing.
    pub fn check_add(&self, pfn: u64, nr: u64) -> Result<(), DonatedError> {
        if nr == 0 {
            return Ok(());
        }
        let (start, end) = self.covered(pfn, nr).ok_or(DonatedError::NotCovered)?;
        if spans(start, end).any(|(w, mask)| self.donated[w] & mask != 0) {
            return Err(DonatedError::AlreadyDonated);
        }
        Ok(())
    }

    /// Adds `nr` free pages from `pfn` (after `check_add`).
    pub fn add(&mut self, pfn: u64, nr: u64) -> Result<(), DonatedError> {
        self.check_add(pfn, nr)?;
        let Some((start, end)) = self.covered(pfn, nr) else {
            return Ok(());
        };
        for (w, mask) in spans(start, end) {
            self.donated[w] |= mask;
            let old = self.free[0][w];
            self.free[0][w] = old | mask;
            if old == 0 {
                self.note(1, w, true);
            }
        }
        self.len += nr;
        self.free_pages += nr;
        self.first_free = self.first_free.min((start >> TOP_WORD_SHIFT) as usize);
        Ok(())
    }

    /// Checks that every page of the range is donated and free; the first
    /// page that is not decides the error.
    pub fn check_remove(&self, pfn: u64, nr: u64) -> Result<(), DonatedError> {
        if nr == 0 {
            return Ok(());
        }
        let Some((start, left)) = self.ram.locate(pfn) else {
            return Err(DonatedError::NotDonated);
        };
        for (w, mask) in spans(start, start + nr.min(left)) {
            let missing = mask & !self.donated[w];
            let bad = missing | (mask & self.donated[w] & !self.free[0][w]);
            if bad != 0 {
                let first = bad & bad.wrapping_neg();
                return Err(if missing & first != 0 {
                    DonatedError::NotDonated
                } else {
                    DonatedError::InUse
                });
            }
        }
        if nr > left {
            return Err(DonatedError::NotDonated);
        }
        Ok(())
    }

    /// Removes `nr` free pages from `pfn` (after `check_remove`).
    pub fn remove(&mut self, pfn: u64, nr: u64) -> Result<(), DonatedError> {
        self.check_remove(pfn, nr)?;
        let Some((start, end)) = self.covered(pfn, nr) else {
            return Ok(());
        };
        for (w, mask) in spans(start, end) {
            self.donated[w] &= !mask;
            let old = self.free[0][w];
            self.free[0][w] = old & !mask;
            if old & !mask == 0 {
                self.note(1, w, false);
            }
        }
        self.len -= nr;
        self.free_pages -= nr;
        Ok(())
    }

    /// Records at `level` whether word `word` of the level below has any
    /// bit set, and so on up while a word's being zero changes.
    fn note(&mut self, mut level: usize, mut word: usize, set: bool) {
        while level < LEVELS {
            let (w, b) = (word / BITS as usize, word as u64 % BITS);
            let old = self.free[level][w];
            let new = if set { old | 1 << b } else { old & !(1 << b) };
            self.free[level][w] = new;
            if (old == 0) == (new == 0) {
                return;
            }
            level += 1;
            word = w;
        }
    }

    /// Every donated page and whether it is in use, by frame number.
    pub fn iter(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        let mut at = 0;
        core::iter::from_fn(move || {
            let pages = self.ram.pages();
            let i = next_bit(self.donated, at, pages, true);
            if i == pages {
                return None;
            }
            at = i + 1;
            Some((self.frame(i), !bit(self.free[0], i)))
        })
    }

    /// The donated pages as runs of consecutive frame numbers: (first
    /// frame number, pages), in order (a run of RAM ends one).
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut at = 0;
        core::iter::from_fn(move || {
            let start = next_bit(self.donated, at, self.ram.pages(), true);
            let (first, left) = self.ram.frame(start)?;
            at = next_bit(self.donated, start, start + left, false);
            Some((first, at - start))
        })
    }

    /// The first page of [pfn, pfn + nr) that is not a donated page, if
    /// any. Reads a word per 64 pages it passes.
    pub fn first_missing(&self, pfn: u64, nr: u64) -> Option<u64> {
        let end = pfn.saturating_add(nr);
        if pfn >= end {
            return None;
        }
        let Some((start, left)) = self.ram.locate(pfn) else {
            return Some(pfn);
        };
        // Past the end of its run of RAM, no page is donated.
        let limit = start + (end - pfn).min(left);
        let gap = next_bit(self.donated, start, limit, false);
        let first = pfn + (gap - start);
        (first < end).then_some(first)
    }

    /// Takes the lowest free donated page, marking it in use.
    pub fn take(&mut self) -> Option<u64> {
        if self.free_pages == 0 {
            return None;
        }
        let top = &self.free[LEVELS - 1];
        let mut i = self.first_free + top[self.first_free..].iter().position(|&w| w != 0)?;
        self.first_free = i;
        for level in (0..LEVELS).rev() {
            i = i * BITS as usize + self.free[level][i].trailing_zeros() as usize;
        }
        let page = i as u64;
        debug_assert!(page < self.ram.pages() && bit(self.donated, page));
        let (w, b) = (i / BITS as usize, page % BITS);
        self.free[0][w] &= !(1 << b);
        if self.free[0][w] == 0 {
            self.note(1, w, false);
        }
        self.free_pages -= 1;
        Some(self.frame(page))
    }

    /// Marks an in-use donated page free again; false if `pfn` is not a
    /// donated page in use.
    pub fn give_back(&mut self, pfn: u64) -> bool {
        let Some(page) = self.ram.index(pfn) else {
            return false;
        };
        if !bit(self.donated, page) || bit(self.free[0], page) {
            return false;
        }
        let w = (page / BITS) as usize;
        let old = self.free[0][w];
        self.free[0][w] = old | 1 << (page % BITS);
        if old == 0 {
            self.note(1, w, true);
        }
        self.free_pages += 1;
        self.first_free = self.first_free.min((page >> TOP_WORD_SHIFT) as usize);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table covering `pages` pages from frame `first`.
    fn table(first: u64, pages: u64) -> Box<DonatedPages> {
        let words = vec![0u64; DonatedPages::words_for(pages)].leak();
        let mut d = Box::new(DonatedPages::new());
        d.attach(RamFrames::one(first, pages), words);
        d
    }

    /// Checks the summary levels against the bits below them, and the
    /// counts and `first_free` against the bits.
    fn check(d: &DonatedPages) {
        for level in 1..LEVELS {
            for (w, &word) in d.free[level].iter().enumerate() {
                for b in 0..BITS as usize {
                    let below = d.free[level - 1].get(w * BITS as usize + b).copied();
                    assert_eq!(
                        word & (1 << b) != 0,
                        below.is_some_and(|x| x != 0),
                        "level {level} word {w} bit {b}"
                    );
                }
            }
        }
        for (w, &free) in d.free[0].iter().enumerate() {
            assert_eq!(free & !d.donated[w], 0, "a free page that is not donated");
        }
        let count = |m: &[u64]| m.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        assert_eq!(d.len, count(d.donated));
        assert_eq!(d.free_pages, count(d.free[0]));
        assert!(d.free[LEVELS - 1][..d.first_free].iter().all(|&w| w == 0));
    }

    #[test]
    fn add_take_give_back_remove() {
        let mut d = table(0, 1000);
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
        assert!(!d.give_back(5000), "not covered");
        d.remove(50, 2).unwrap();
        assert_eq!(d.check_remove(99, 2), Err(DonatedError::NotDonated));
        d.remove(101, 2).unwrap();
        assert_eq!(d.lookup(100), Some(false));
        assert_eq!(d.lookup(101), None);
        assert_eq!(d.lookup(103), Some(false));
        assert_eq!((d.len(), d.free()), (2, 2));
        check(&d);
    }

    #[test]
    fn the_first_bad_page_decides_the_error() {
        let mut d = table(0, 200);
        d.add(10, 10).unwrap();
        assert_eq!(d.take(), Some(10));
        assert_eq!(d.check_remove(9, 3), Err(DonatedError::NotDonated));
        assert_eq!(d.check_remove(10, 3), Err(DonatedError::InUse));
        assert_eq!(d.check_remove(11, 10), Err(DonatedError::NotDonated));
        assert_eq!(d.check_remove(11, 9), Ok(()));
        assert_eq!(d.check_remove(195, 10), Err(DonatedError::NotDonated));
        assert_eq!(d.check_remove(10, 0), Ok(()), "an empty range");
    }

    #[test]
    fn runs_and_first_missing() {
        let mut d = table(0, 100);
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
        assert_eq!(d.first_missing(100, 1), Some(100), "not covered");
        assert_eq!(d.first_missing(u64::MAX - 1, 1), Some(u64::MAX - 1));
        for (first, n) in runs {
            for p in first..first + n {
                assert!(d.lookup(p).is_some());
            }
        }
    }

    #[test]
    fn runs_cross_words_and_end_at_the_last_page() {
        let mut d = table(1 << 20, 5000);
        let first = 1 << 20;
        d.add(first + 60, 200).unwrap();
        d.add(first + 4990, 10).unwrap();
        let runs: Vec<_> = d.runs().collect();
        assert_eq!(runs, [(first + 60, 200), (first + 4990, 10)]);
        assert_eq!(d.first_missing(first + 60, 300), Some(first + 260));
        assert_eq!(d.first_missing(first + 4990, 10), None);
        assert_eq!(d.first_missing(first + 4990, 11), Some(first + 5000));
        assert_eq!(d.iter().count(), 210);
        assert_eq!(d.first_missing(first - 1, 2), Some(first - 1));
    }

    /// Pages outside the table are refused and change nothing; inside it,
    /// donations are limited by nothing but the pages it covers.
    #[test]
    fn coverage_is_the_only_limit() {
        let first = 0x40000;
        let pages = 600_000;
        let mut d = table(first, pages);
        assert_eq!(d.add(first - 1, 2), Err(DonatedError::NotCovered));
        assert_eq!(d.add(first + pages - 1, 2), Err(DonatedError::NotCovered));
        assert_eq!(d.add(u64::MAX, 2), Err(DonatedError::NotCovered));
        assert_eq!(d.lookup(first + pages), None);
        assert_eq!(d.len(), 0, "refused donations change nothing");
        // Far more than the old fixed table of 8192 pages, across two
        // words of the top level (2^18 pages each).
        d.add(first, pages).unwrap();
        check(&d);
        assert_eq!((d.len(), d.free()), (pages as usize, pages as usize));
        for i in 0..pages {
            assert_eq!(d.take(), Some(first + i));
        }
        assert_eq!(d.take(), None);
        check(&d);
        // Free pages in reverse order: each take finds the lowest again.
        let every: Vec<u64> = (0..pages).step_by(4099).collect();
        for &i in every.iter().rev() {
            assert!(d.give_back(first + i));
        }
        check(&d);
        for &i in &every {
            assert_eq!(d.take(), Some(first + i));
        }
        for i in 0..pages {
            assert!(d.give_back(first + i));
        }
        d.remove(first, pages).unwrap();
        assert!(d.is_empty());
        check(&d);
    }

    /// `take` always hands out the lowest free page, whatever order pages
    /// were added, taken, given back and removed in (checked against a
    /// scan of every page), and the summary levels always agree with the
    /// bits below them.
    #[test]
    fn take_finds_the_lowest_free_page_after_any_history() {
        // Pages in clusters at word, summary-word and top-word boundaries.
        let clusters = [0u64, 4000, 262_000, 300_000];
        let pages = 300_700;
        let mut d = table(0x80000, pages);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..20_000 {
            let at = 0x80000 + clusters[next(4) as usize] + next(620);
            match next(4) {
                0 => {
                    let _ = d.add(at, 1 + next(80));
                }
                1 => {
                    let want = d.iter().find(|&(_, used)| !used).map(|(p, _)| p);
                    assert_eq!(d.take(), want);
                }
                2 => {
                    let _ = d.give_back(at);
                }
                _ => {
                    let _ = d.remove(at, 1 + next(3));
                }
            }
            let free = d.iter().filter(|&(_, used)| !used).count();
            assert_eq!(d.free(), free);
            if step % 500 == 0 {
                check(&d);
            }
        }
        check(&d);
        assert!(!d.is_empty(), "the history left pages to check");
    }

    /// RAM in two runs with a hole between: the table has bits for RAM
    /// alone, donations across the hole are refused, and runs, gaps and
    /// takes come out as frame numbers on either side of it.
    #[test]
    fn holes_between_ram_runs_cost_nothing_and_hold_nothing() {
        let (a, b) = (0x40000, 0x8_0000_0000 >> 12);
        let ram = RamFrames::new(&[(b, 100), (a, 100)]).unwrap();
        let mut d = Box::new(DonatedPages::new());
        d.attach(ram, vec![0u64; DonatedPages::words_for(200)].leak());
        assert_eq!(
            d.add(a + 99, 2),
            Err(DonatedError::NotCovered),
            "into the hole"
        );
        assert_eq!(
            d.add(b - 1, 2),
            Err(DonatedError::NotCovered),
            "from the hole"
        );
        assert_eq!(d.add(a + 100, 1), Err(DonatedError::NotCovered));
        // The last page of the first run and the first of the second have
        // neighbouring bits; they are still two runs of frames.
        d.add(a + 98, 2).unwrap();
        d.add(b, 3).unwrap();
        assert_eq!(d.runs().collect::<Vec<_>>(), [(a + 98, 2), (b, 3)]);
        assert_eq!(d.first_missing(a + 98, 2), None);
        assert_eq!(d.first_missing(a + 98, 3), Some(a + 100), "the hole");
        assert_eq!(d.first_missing(b + 1, 2), None);
        assert_eq!(d.first_missing(b + 1, 3), Some(b + 3));
        assert_eq!(d.check_remove(a + 98, 3), Err(DonatedError::NotDonated));
        let taken: Vec<_> = (0..5).map(|_| d.take().unwrap()).collect();
        assert_eq!(taken, [a + 98, a + 99, b, b + 1, b + 2]);
        assert_eq!(d.take(), None);
        assert!(d.give_back(b + 1));
        assert_eq!(
            d.iter().filter(|&(_, used)| !used).collect::<Vec<_>>(),
            [(b + 1, false)]
        );
        assert_eq!(d.take(), Some(b + 1));
        check(&d);
    }

    #[test]
    #[should_panic(expected = "attaching over donated pages")]
    fn attaching_over_donated_pages_is_a_bug() {
        let mut d = table(0, 64);
        d.add(3, 1).unwrap();
        d.attach(
            RamFrames::one(0, 64),
            vec![0u64; DonatedPages::words_for(64)].leak(),
        );
    }

    #[test]
    fn an_unattached_table_refuses_everything() {
        let mut d = DonatedPages::new();
        assert_eq!(d.add(0, 1), Err(DonatedError::NotCovered));
        assert_eq!(d.lookup(0), None);
        assert_eq!(d.take(), None);
        assert!(!d.give_back(0));
        assert_eq!(d.first_missing(0, 1), Some(0));
        assert_eq!(DonatedPages::words_for(0), 0);
        assert_eq!(DonatedPages::words_for(1), 4);
        // 2 GiB: 8192 words of each per-page bit, 128 + 2 summary words.
        assert_eq!(DonatedPages::words_for(1 << 19), 8192 * 2 + 128 + 2);
    }
}
