//! Physical address ranges and sets of them: pure code, unit-tested on the
//! build machine (`cargo test -p keel-testkernel`).

/// A half-open physical range [start, end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, end: u64) -> Self {
        Range { start, end }
    }
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
    pub fn covers(&self, other: &Range) -> bool {
        self.start <= other.start && other.end <= self.end
    }
}

impl core::fmt::Display for Range {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// A small fixed-capacity set of ranges, sorted by start.
#[derive(Clone, Copy)]
pub struct Ranges {
    items: [Range; Self::CAPACITY],
    len: usize,
}

impl Ranges {
    pub const CAPACITY: usize = 16;

    pub const fn new() -> Self {
        Ranges {
            items: [Range::new(0, 0); Self::CAPACITY],
            len: 0,
        }
    }

    /// Adds `r` in order; false when full.
    pub fn push(&mut self, r: Range) -> bool {
        if self.len == Self::CAPACITY {
            return false;
        }
        let pos = self.items[..self.len]
            .iter()
            .position(|x| x.start > r.start)
            .unwrap_or(self.len);
        self.items.copy_within(pos..self.len, pos + 1);
        self.items[pos] = r;
        self.len += 1;
        true
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range> {
        self.items[..self.len].iter()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.iter().any(|r| r.contains(addr))
    }

    /// Whether one range of the set covers all of `r`.
    pub fn covers(&self, r: &Range) -> bool {
        self.iter().any(|x| x.covers(r))
    }

    /// The parts of `outer` that no range of the set covers.
    pub fn holes_in(&self, outer: Range) -> Ranges {
        let mut holes = Ranges::new();
        let mut cursor = outer.start;
        for r in self.iter() {
            if r.end <= cursor || r.start >= outer.end {
                continue;
            }
            if r.start > cursor {
                holes.push(Range::new(cursor, r.start));
            }
            cursor = cursor.max(r.end);
        }
        if cursor < outer.end {
            holes.push(Range::new(cursor, outer.end));
        }
        holes
    }
}

/// Parses a decimal or 0x-prefixed hexadecimal number.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rs: &[(u64, u64)]) -> Ranges {
        let mut s = Ranges::new();
        for &(a, b) in rs {
            assert!(s.push(Range::new(a, b)));
        }
        s
    }

    fn list(s: &Ranges) -> Vec<(u64, u64)> {
        s.iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn push_keeps_ranges_sorted() {
        let s = set(&[(30, 40), (10, 20), (50, 60), (0, 5)]);
        assert_eq!(list(&s), [(0, 5), (10, 20), (30, 40), (50, 60)]);
    }

    #[test]
    fn push_refuses_past_capacity() {
        let mut s = Ranges::new();
        for i in 0..Ranges::CAPACITY as u64 {
            assert!(s.push(Range::new(i * 10, i * 10 + 1)));
        }
        assert!(!s.push(Range::new(1000, 1001)));
    }

    #[test]
    fn holes_of_a_hypervisor_carved_from_the_middle() {
        // RAM [0x4000_0000, 0xc000_0000); the hypervisor took 0x4020_0000..0x4220_0000.
        let mem = set(&[(0x4000_0000, 0x4020_0000), (0x4220_0000, 0xc000_0000)]);
        let holes = mem.holes_in(Range::new(0x4000_0000, 0xc000_0000));
        assert_eq!(list(&holes), [(0x4020_0000, 0x4220_0000)]);
    }

    #[test]
    fn holes_at_both_ends_and_between() {
        let mem = set(&[(20, 30), (40, 50)]);
        assert_eq!(
            list(&mem.holes_in(Range::new(0, 100))),
            [(0, 20), (30, 40), (50, 100)]
        );
    }

    #[test]
    fn no_holes_when_covered_even_with_overlaps() {
        let mem = set(&[(0, 60), (50, 100)]);
        assert!(mem.holes_in(Range::new(0, 100)).is_empty());
        // Ranges outside the outer range are ignored.
        let mem = set(&[(0, 10), (200, 300)]);
        assert_eq!(list(&mem.holes_in(Range::new(10, 100))), [(10, 100)]);
    }

    #[test]
    fn contains_and_covers() {
        let mem = set(&[(0x1000, 0x2000), (0x3000, 0x4000)]);
        assert!(mem.contains(0x1000) && mem.contains(0x1fff) && !mem.contains(0x2000));
        assert!(mem.covers(&Range::new(0x3000, 0x4000)));
        // Two adjacent ranges are not merged: a range spanning both is not
        // covered by one of them.
        assert!(!mem.covers(&Range::new(0x1800, 0x3800)));
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_u64("0x40000000"), Some(0x4000_0000));
        assert_eq!(parse_u64("0X10"), Some(16));
        assert_eq!(parse_u64("1234"), Some(1234));
        assert_eq!(parse_u64("0xg"), None);
        assert_eq!(parse_u64(""), None);
    }
}
