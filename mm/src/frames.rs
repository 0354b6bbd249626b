//! RAM's page frames numbered densely: [`RamFrames`] maps a frame number
//! to its position among all RAM pages (its index) and back.
//!
//! The per-page tables (the lent-page words, the donated-page bits) are
//! indexed this way, so they cost memory for RAM alone: a hole between RAM
//! regions, however large, costs nothing. A lookup walks the runs, which is
//! one comparison on a machine with one RAM region.

/// Most runs of RAM frames (the device tree's RAM regions, merged where
/// they touch).
pub const MAX_RUNS: usize = 8;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Run {
    first: u64,
    pages: u64,
    /// Index of `first`: the pages of the runs before this one.
    base: u64,
}

/// RAM as runs of consecutive frame numbers, in order, with gaps between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamFrames {
    runs: [Run; MAX_RUNS],
    count: usize,
    pages: u64,
}

impl Default for RamFrames {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl RamFrames {
    /// No RAM.
    pub const EMPTY: RamFrames = RamFrames {
        runs: [Run {
            first: 0,
            pages: 0,
            base: 0,
        }; MAX_RUNS],
        count: 0,
        pages: 0,
    };

    /// `pages` frames from `first`.
    pub fn one(first: u64, pages: u64) -> Self {
        Self::new(&[(first, pages)]).expect("one run always fits")
    }

    /// RAM from (first frame, pages) runs in any order; runs that overlap
    /// or touch become one. None if more than [`MAX_RUNS`] remain or a run
    /// ends past the last frame number.
    pub fn new(runs: &[(u64, u64)]) -> Option<Self> {
        let mut sorted = [(0u64, 0u64); MAX_RUNS];
        let mut n = 0;
        // Insertion into `sorted` (by first frame), merging as it goes.
        for &(first, pages) in runs {
            if pages == 0 {
                continue;
            }
            let mut start = first;
            let mut end = first.checked_add(pages)?;
            let mut kept = [(0u64, 0u64); MAX_RUNS];
            let mut k = 0;
            for &(s, e) in &sorted[..n] {
                if e < start || end < s {
                    kept[k] = (s, e);
                    k += 1;
                } else {
                    start = start.min(s);
                    end = end.max(e);
                }
            }
            if k == MAX_RUNS {
                return None;
            }
            let at = kept[..k].iter().position(|&(s, _)| s > start).unwrap_or(k);
            kept.copy_within(at..k, at + 1);
            kept[at] = (start, end);
            sorted = kept;
            n = k + 1;
        }
        let mut frames = Self::EMPTY;
        for &(start, end) in &sorted[..n] {
            frames.runs[frames.count] = Run {
                first: start,
                pages: end - start,
                base: frames.pages,
            };
            frames.count += 1;
            frames.pages += end - start;
        }
        Some(frames)
    }

    /// RAM pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The index of frame `pfn` and the pages from it to the end of its
    /// run, if it is RAM.
    #[inline(always)]
    pub fn locate(&self, pfn: u64) -> Option<(u64, u64)> {
        // The first run in line (most machines have one); an empty run
        // never matches, so this holds for no RAM too.
        let r = &self.runs[0];
        let off = pfn.wrapping_sub(r.first);
        if off < r.pages {
            return Some((off, r.pages - off));
        }
        self.locate_beyond_first(pfn)
    }

    #[inline(never)]
    fn locate_beyond_first(&self, pfn: u64) -> Option<(u64, u64)> {
        self.runs[1..self.count.max(1)].iter().find_map(|r| {
            let off = pfn.wrapping_sub(r.first);
            (off < r.pages).then(|| (r.base + off, r.pages - off))
        })
    }

    /// The index of frame `pfn`, if it is RAM.
    #[inline(always)]
    pub fn index(&self, pfn: u64) -> Option<u64> {
        self.locate(pfn).map(|(i, _)| i)
    }

    /// The indices of `nr` frames from `pfn`, if they are all RAM (so
    /// within one run).
    #[inline(always)]
    pub fn span(&self, pfn: u64, nr: u64) -> Option<core::ops::Range<u64>> {
        let (i, left) = self.locate(pfn)?;
        (nr <= left).then(|| i..i + nr)
    }

    /// The frame at index `index` and the pages from it to the end of its
    /// run, if `index` is below [`pages`](Self::pages).
    pub fn frame(&self, index: u64) -> Option<(u64, u64)> {
        self.runs[..self.count].iter().find_map(|r| {
            let off = index.wrapping_sub(r.base);
            (off < r.pages).then(|| (r.first + off, r.pages - off))
        })
    }

    /// The runs: (first frame, pages), in order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs[..self.count].iter().map(|r| (r.first, r.pages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_sorted_and_merged() {
        let f = RamFrames::new(&[(100, 10), (10, 5), (15, 5), (50, 1), (105, 20), (0, 0)]).unwrap();
        let runs: Vec<_> = f.runs().collect();
        assert_eq!(runs, [(10, 10), (50, 1), (100, 25)]);
        assert_eq!(f.pages(), 36);
        let g = RamFrames::new(&[(10, 100), (20, 5)]).unwrap();
        assert_eq!(
            g.runs().collect::<Vec<_>>(),
            [(10, 100)],
            "one inside another"
        );
    }

    #[test]
    fn index_and_frame_are_inverse() {
        let f = RamFrames::new(&[(0x40000, 1000), (0x800000, 24), (0x100000, 8)]).unwrap();
        let mut next = 0;
        for (first, pages) in f.runs().collect::<Vec<_>>() {
            for p in first..first + pages {
                assert_eq!(f.locate(p), Some((next, first + pages - p)));
                assert_eq!(f.frame(next), Some((p, first + pages - p)));
                next += 1;
            }
            assert_eq!(f.index(first + pages), None, "the hole after a run");
            assert_eq!(f.index(first.wrapping_sub(1)), None, "the hole before");
        }
        assert_eq!(next, f.pages());
        assert_eq!(f.frame(f.pages()), None);
        assert_eq!(f.index(u64::MAX), None);
    }

    #[test]
    fn spans_stay_inside_one_run() {
        let f = RamFrames::new(&[(100, 10), (200, 10)]).unwrap();
        assert_eq!(f.span(100, 10), Some(0..10));
        assert_eq!(f.span(205, 5), Some(15..20));
        assert_eq!(f.span(105, 10), None, "into the hole");
        assert_eq!(f.span(205, 6), None, "past the end");
        assert_eq!(f.span(99, 1), None);
        assert_eq!(f.span(109, 0), Some(9..9));
        assert_eq!(f.span(105, u64::MAX), None, "no overflow");
    }

    #[test]
    fn limits() {
        let many: Vec<_> = (0..MAX_RUNS as u64 + 1).map(|i| (i * 10, 5)).collect();
        assert_eq!(RamFrames::new(&many), None, "too many runs");
        assert!(RamFrames::new(&many[..MAX_RUNS]).is_some());
        assert_eq!(
            RamFrames::new(&[(u64::MAX, 2)]),
            None,
            "past the last frame"
        );
        assert_eq!(RamFrames::EMPTY.index(0), None);
        assert_eq!(RamFrames::new(&[]).unwrap(), RamFrames::EMPTY);
    }
}
