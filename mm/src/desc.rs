//! Stage-2 descriptor layout (VMSAv8-64, 4 KiB granule), declared once.
//!
//! Valid leaf and table descriptors follow the architecture; invalid
//! descriptors (bit 0 clear) are ignored by the table walker, so the engine
//! keeps an ownership annotation in them (as pKVM does for the host).

use tock_registers::register_bitfields;
use tock_registers::LocalRegisterCopy;

register_bitfields! {u64,
    /// A valid stage-2 descriptor: block (levels 1-2), page (level 3) or
    /// table (levels 0-2).
    pub S2_DESC [
        VALID OFFSET(0) NUMBITS(1) [],
        /// 1 at levels 0-2 means "table", at level 3 it is required for a page.
        TYPE OFFSET(1) NUMBITS(1) [
            Block = 0,
            TableOrPage = 1
        ],
        /// MemAttr[3:0] without FEAT_S2FWB: [3:2] outer, [1:0] inner.
        MEMATTR OFFSET(2) NUMBITS(4) [
            DeviceNGnRE = 0b0001,
            NormalWriteBack = 0b1111
        ],
        /// S2AP: bit 6 read, bit 7 write.
        S2AP OFFSET(6) NUMBITS(2) [
            None = 0b00,
            ReadOnly = 0b01,
            WriteOnly = 0b10,
            ReadWrite = 0b11
        ],
        SH OFFSET(8) NUMBITS(2) [
            NonShareable = 0b00,
            OuterShareable = 0b10,
            InnerShareable = 0b11
        ],
        /// Access flag: with it clear the first access faults.
        AF OFFSET(10) NUMBITS(1) [],
        /// Output address (leaf) or next-level table address, bits [47:12].
        ADDR OFFSET(12) NUMBITS(36) [],
        /// XN[1] (execute never at EL1 and EL0; XN[0] is left 0).
        XN OFFSET(54) NUMBITS(1) [],
        /// Software bits [56:55]: the ownership state of the mapped page.
        SW_STATE OFFSET(55) NUMBITS(2) [
            Owned = 0,
            SharedOwned = 1,
            SharedBorrowed = 2
        ]
    ],
    /// An invalid stage-2 descriptor: the walker ignores bits [63:1].
    pub S2_INVALID [
        VALID OFFSET(0) NUMBITS(1) [],
        /// Who owns the unmapped range (0 = nothing recorded).
        ANNOTATION OFFSET(2) NUMBITS(32) []
    ]
}

/// Bits of a valid leaf that describe its attributes and state (everything
/// but the output address and the block/page type bit).
const LEAF_META_MASK: u64 =
    !(S2_DESC::ADDR.mask << S2_DESC::ADDR.shift) & !(S2_DESC::TYPE.mask << S2_DESC::TYPE.shift);

/// Stage-2 memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemType {
    /// Normal memory, inner and outer write-back cacheable.
    NormalWriteBack,
    /// Device-nGnRE (MMIO).
    Device,
}

/// Shareability of a leaf (ignored by hardware for Device memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shareability {
    Non,
    Outer,
    Inner,
}

/// The hardware attributes of a stage-2 leaf.
/// Aligned as one word, so copies are one load and store, not a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C, align(8))]
pub struct S2Attrs {
    pub mem: MemType,
    /// S2AP[0]
    pub read: bool,
    /// S2AP[1]
    pub write: bool,
    /// false sets XN.
    pub exec: bool,
    pub shareability: Shareability,
    /// false leaves AF clear, so the first access faults to EL2.
    pub access_flag: bool,
}

impl S2Attrs {
    /// Ordinary RAM: normal write-back, inner shareable, read/write/execute.
    pub const NORMAL_RWX: Self = Self {
        mem: MemType::NormalWriteBack,
        read: true,
        write: true,
        exec: true,
        shareability: Shareability::Inner,
        access_flag: true,
    };
    /// MMIO: Device-nGnRE, read/write, execute never.
    pub const DEVICE_RW: Self = Self {
        mem: MemType::Device,
        read: true,
        write: true,
        exec: false,
        shareability: Shareability::Non,
        access_flag: true,
    };
}

/// Ownership state of a mapped page, kept in the software bits of its leaf.
/// The numeric values are the ABI's (MEM_STATE: 0 OWNED, 1 SHARED_OWNED,
/// 2 SHARED_BORROWED; 3 NOPAGE is an unmapped page, see [`Annotation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    Owned = 0,
    SharedOwned = 1,
    SharedBorrowed = 2,
}

/// What an invalid entry records about the pages it covers: typically the
/// id of their owner when they are not mapped here (donated elsewhere), or
/// 0 for nothing recorded (a fresh table is all 0). A uniformly annotated
/// range is kept as one invalid entry as high in the tree as it fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Annotation(pub u32);

/// Translation-table levels of the 4 KiB granule.
pub const LEAF_LEVEL: u8 = 3;
/// Entries in one table.
pub const ENTRIES: usize = 512;

/// Bytes covered by one entry at `level` (0..=3).
pub const fn level_size(level: u8) -> u64 {
    1u64 << level_shift(level)
}

/// log2 of [`level_size`].
pub const fn level_shift(level: u8) -> u32 {
    12 + 9 * (LEAF_LEVEL - level) as u32
}

/// A raw descriptor as stored in a table.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(transparent)]
pub(crate) struct Pte(pub(crate) u64);

impl Pte {
    fn reg(self) -> LocalRegisterCopy<u64, S2_DESC::Register> {
        LocalRegisterCopy::new(self.0)
    }

    #[inline]
    pub(crate) fn invalid(annotation: Annotation) -> Self {
        Self(u64::from(annotation.0) << S2_INVALID::ANNOTATION.shift)
    }

    pub(crate) fn table(pa: u64) -> Self {
        let mut r = LocalRegisterCopy::<u64, S2_DESC::Register>::new(0);
        r.modify(S2_DESC::VALID::SET + S2_DESC::TYPE::TableOrPage + S2_DESC::ADDR.val(pa >> 12));
        Self(r.get())
    }

    /// A block (levels 1-2) or page (level 3) mapping `pa`.
    #[inline]
    pub(crate) fn leaf(level: u8, pa: u64, attrs: S2Attrs, state: PageState) -> Self {
        let type_bit = if level == LEAF_LEVEL {
            S2_DESC::TYPE::TableOrPage.value
        } else {
            S2_DESC::TYPE::Block.value
        };
        Self(
            S2_DESC::VALID::SET.value | type_bit | (pa & ADDR_MASK) | Self::meta_bits(attrs, state),
        )
    }

    /// The attribute and state bits of a leaf with `attrs` and `state`,
    /// by shifts: every leaf the engine writes is built here (the field
    /// layout is `S2_DESC`'s; a test checks both agree).
    #[inline]
    fn meta_bits(attrs: S2Attrs, state: PageState) -> u64 {
        let memattr = match attrs.mem {
            MemType::NormalWriteBack => S2_DESC::MEMATTR::NormalWriteBack.value,
            MemType::Device => S2_DESC::MEMATTR::DeviceNGnRE.value,
        };
        let sh = match attrs.shareability {
            Shareability::Non => S2_DESC::SH::NonShareable.value,
            Shareability::Outer => S2_DESC::SH::OuterShareable.value,
            Shareability::Inner => S2_DESC::SH::InnerShareable.value,
        };
        memattr
            | (u64::from(attrs.read) << S2_DESC::S2AP.shift)
            | (u64::from(attrs.write) << (S2_DESC::S2AP.shift + 1))
            | sh
            | (u64::from(attrs.access_flag) << S2_DESC::AF.shift)
            | (u64::from(!attrs.exec) << S2_DESC::XN.shift)
            | state_bits(state)
    }

    pub(crate) fn is_valid(self) -> bool {
        self.reg().is_set(S2_DESC::VALID)
    }

    /// A table descriptor (only meaningful above the leaf level).
    pub(crate) fn is_table(self, level: u8) -> bool {
        level < LEAF_LEVEL && self.is_valid() && self.reg().is_set(S2_DESC::TYPE)
    }

    /// The descriptor of the next leaf of a run that continues this one at
    /// the same level: the output address `size` further on, every other
    /// bit the same (an invalid entry: the same annotation). None if the
    /// address would not fit.
    pub(crate) fn next_in_run(self, size: u64) -> Option<Pte> {
        if !self.is_valid() {
            return Some(self);
        }
        let next = (self.0 & ADDR_MASK).checked_add(size)?;
        (next & !ADDR_MASK == 0).then_some(Pte((self.0 & !ADDR_MASK) | next))
    }

    /// Whether leaf `next` continues the run of leaf `self`, both at a
    /// level whose entries cover `size` (`next_in_run(size) == Some(next)`,
    /// with neither a table), in a few operations: the merge bookkeeping
    /// asks this on every entry it changes.
    #[inline]
    pub(crate) fn continued_by(self, next: Pte, size: u64, level: u8) -> bool {
        if !self.is_valid() {
            return next == self;
        }
        // Adding `size` leaves the low bits alone: `next` is a table iff
        // `self` is.
        !self.is_table(level)
            && next.0 == self.0.wrapping_add(size)
            && ((self.0 & ADDR_MASK) + size) & !ADDR_MASK == 0
    }

    /// The run-break count kept in a table descriptor (see
    /// [`BREAKS_UNKNOWN`]): how many pairs of neighbouring entries of the
    /// table it points to do not continue one run.
    pub(crate) fn breaks(self) -> u8 {
        ((self.0 & BREAKS_MASK) >> BREAKS_SHIFT) as u8
    }

    /// This table descriptor with run-break count `n` (at most
    /// [`BREAKS_UNKNOWN`]). The count lives in bits [58:52], which the
    /// walker ignores in a table descriptor in every revision of the
    /// architecture (bit 51 was RES0 in early ones), so changing it needs no
    /// TLB maintenance. Nothing keel enables (hardware access/dirty flags)
    /// writes these bits.
    pub(crate) fn with_breaks(self, n: u8) -> Self {
        Self((self.0 & !BREAKS_MASK) | (u64::from(n) << BREAKS_SHIFT))
    }

    /// Output address of a leaf, or address of a next-level table.
    pub(crate) fn addr(self) -> u64 {
        self.reg().read(S2_DESC::ADDR) << 12
    }

    pub(crate) fn annotation(self) -> Annotation {
        let r = LocalRegisterCopy::<u64, S2_INVALID::Register>::new(self.0);
        Annotation(r.read(S2_INVALID::ANNOTATION) as u32)
    }

    /// Attribute and state bits of a valid leaf, comparable across levels.
    pub(crate) fn meta(self) -> u64 {
        self.0 & LEAF_META_MASK
    }

    /// This leaf with other attribute and state bits (same output address).
    pub(crate) fn with_meta(self, level: u8, attrs: S2Attrs, state: PageState) -> Self {
        Self::leaf(level, self.addr(), attrs, state)
    }

    pub(crate) fn attrs(self) -> S2Attrs {
        let r = self.reg();
        let s2ap = r.read(S2_DESC::S2AP);
        S2Attrs {
            mem: match r.read_as_enum(S2_DESC::MEMATTR) {
                Some(S2_DESC::MEMATTR::Value::DeviceNGnRE) => MemType::Device,
                _ => MemType::NormalWriteBack,
            },
            read: s2ap & 1 != 0,
            write: s2ap & 2 != 0,
            exec: !r.is_set(S2_DESC::XN),
            shareability: match r.read_as_enum(S2_DESC::SH) {
                Some(S2_DESC::SH::Value::OuterShareable) => Shareability::Outer,
                Some(S2_DESC::SH::Value::InnerShareable) => Shareability::Inner,
                _ => Shareability::Non,
            },
            access_flag: r.is_set(S2_DESC::AF),
        }
    }

    /// This valid leaf with ownership state `state` (only the software
    /// bits change).
    pub(crate) fn with_state(self, state: PageState) -> Self {
        debug_assert!(self.is_valid());
        Self((self.0 & !SW_MASK) | state_bits(state))
    }

    /// A valid leaf's own descriptor for the page at `offset` bytes into
    /// it (what splitting it down to level 3 gives there).
    #[inline]
    pub(crate) fn page_at(self, offset: u64) -> Self {
        let type_bit = S2_DESC::TYPE.mask << S2_DESC::TYPE.shift;
        Self((self.0 | type_bit).wrapping_add(offset & !(crate::PAGE_SIZE as u64 - 1)))
    }

    /// This valid leaf (at any level) as a block at `level`, same output
    /// address, attributes and state: what `leaf` gives for them there.
    pub(crate) fn as_block_at(self, level: u8) -> Self {
        let type_bit = S2_DESC::TYPE.mask << S2_DESC::TYPE.shift;
        if level == LEAF_LEVEL {
            Self(self.0 | type_bit)
        } else {
            Self(self.0 & !type_bit)
        }
    }

    pub(crate) fn state(self) -> PageState {
        match self.reg().read_as_enum(S2_DESC::SW_STATE) {
            Some(S2_DESC::SW_STATE::Value::SharedOwned) => PageState::SharedOwned,
            Some(S2_DESC::SW_STATE::Value::SharedBorrowed) => PageState::SharedBorrowed,
            _ => PageState::Owned,
        }
    }

    /// Whether replacing valid leaf `self` by valid leaf `new` changes only
    /// what the architecture lets software change without break-before-make
    /// (permissions, access flag, software bits).
    pub(crate) fn bbm_free_change(self, new: Self) -> bool {
        let relaxed = (S2_DESC::S2AP.mask << S2_DESC::S2AP.shift)
            | (S2_DESC::AF.mask << S2_DESC::AF.shift)
            | (S2_DESC::XN.mask << S2_DESC::XN.shift)
            | SW_MASK;
        (self.0 ^ new.0) & !relaxed == 0
    }

    /// Whether `self` and `new` differ only in software bits, which no TLB
    /// entry depends on.
    pub(crate) fn sw_only_change(self, new: Self) -> bool {
        (self.0 ^ new.0) & !SW_MASK == 0
    }

    /// The entry `index` of a table that is equivalent to leaf `self` at
    /// `level` (the contents a split gives the new table).
    pub(crate) fn child(self, level: u8, index: usize) -> Self {
        if !self.is_valid() {
            return self;
        }
        let child_level = level + 1;
        let pa = self.addr() + ((index as u64) << level_shift(child_level));
        let base = if child_level == LEAF_LEVEL {
            self.0 | (S2_DESC::TYPE.mask << S2_DESC::TYPE.shift)
        } else {
            self.0
        };
        Self((base & !ADDR_MASK) | (pa & ADDR_MASK))
    }
}

const SW_MASK: u64 = S2_DESC::SW_STATE.mask << S2_DESC::SW_STATE.shift;

/// The software bits of ownership state `state`.
#[inline]
fn state_bits(state: PageState) -> u64 {
    match state {
        PageState::Owned => S2_DESC::SW_STATE::Owned.value,
        PageState::SharedOwned => S2_DESC::SW_STATE::SharedOwned.value,
        PageState::SharedBorrowed => S2_DESC::SW_STATE::SharedBorrowed.value,
    }
}
const ADDR_MASK: u64 = S2_DESC::ADDR.mask << S2_DESC::ADDR.shift;
const BREAKS_SHIFT: u32 = 52;
const BREAKS_MASK: u64 = 0x7f << BREAKS_SHIFT;

/// A table descriptor's run-break count when it is not known exactly (it
/// reached this value, or was never counted): it is not kept up, and only
/// a scan of the table can tell that it fell to 0.
pub(crate) const BREAKS_UNKNOWN: u8 = 0x7f;

#[cfg(test)]
mod tests {
    use super::*;

    impl Pte {
        /// `meta_bits` field by field through tock-registers (the reference).
        fn meta_bits_by_fields(attrs: S2Attrs, state: PageState) -> u64 {
            let mut r = LocalRegisterCopy::<u64, S2_DESC::Register>::new(0);
            r.modify(match attrs.mem {
                MemType::NormalWriteBack => S2_DESC::MEMATTR::NormalWriteBack,
                MemType::Device => S2_DESC::MEMATTR::DeviceNGnRE,
            });
            r.modify(match (attrs.read, attrs.write) {
                (false, false) => S2_DESC::S2AP::None,
                (true, false) => S2_DESC::S2AP::ReadOnly,
                (false, true) => S2_DESC::S2AP::WriteOnly,
                (true, true) => S2_DESC::S2AP::ReadWrite,
            });
            r.modify(match attrs.shareability {
                Shareability::Non => S2_DESC::SH::NonShareable,
                Shareability::Outer => S2_DESC::SH::OuterShareable,
                Shareability::Inner => S2_DESC::SH::InnerShareable,
            });
            if attrs.access_flag {
                r.modify(S2_DESC::AF::SET);
            }
            if !attrs.exec {
                r.modify(S2_DESC::XN::SET);
            }
            r.modify(match state {
                PageState::Owned => S2_DESC::SW_STATE::Owned,
                PageState::SharedOwned => S2_DESC::SW_STATE::SharedOwned,
                PageState::SharedBorrowed => S2_DESC::SW_STATE::SharedBorrowed,
            });
            r.get()
        }
    }

    /// The shift-built attribute bits equal the field-by-field ones, and
    /// decode back, for every attribute and state.
    #[test]
    fn meta_bits_match_the_register_layout() {
        for mem in [MemType::NormalWriteBack, MemType::Device] {
            for shareability in [Shareability::Non, Shareability::Outer, Shareability::Inner] {
                for bits in 0..16u8 {
                    let attrs = S2Attrs {
                        mem,
                        read: bits & 1 != 0,
                        write: bits & 2 != 0,
                        exec: bits & 4 != 0,
                        shareability,
                        access_flag: bits & 8 != 0,
                    };
                    for state in [
                        PageState::Owned,
                        PageState::SharedOwned,
                        PageState::SharedBorrowed,
                    ] {
                        let fast = Pte::meta_bits(attrs, state);
                        assert_eq!(fast, Pte::meta_bits_by_fields(attrs, state));
                        let leaf = Pte::leaf(2, 0x4000_0000, attrs, state);
                        assert_eq!((leaf.attrs(), leaf.state()), (attrs, state));
                        assert_eq!(leaf.with_state(PageState::Owned).state(), PageState::Owned);
                        assert_eq!(leaf.with_state(state), leaf);
                    }
                }
            }
        }
    }

    /// `leaf` and `invalid` put the fields where the register layout says.
    #[test]
    fn leaf_and_invalid_fields() {
        let pa = 0x0000_8765_4320_0000;
        for level in 1..=3 {
            let leaf = Pte::leaf(level, pa, S2Attrs::DEVICE_RW, PageState::SharedBorrowed);
            let r = LocalRegisterCopy::<u64, S2_DESC::Register>::new(leaf.0);
            assert!(r.is_set(S2_DESC::VALID));
            assert_eq!(r.is_set(S2_DESC::TYPE), level == LEAF_LEVEL);
            assert_eq!(r.read(S2_DESC::ADDR) << 12, pa);
            assert_eq!(leaf.addr(), pa);
            assert_eq!(leaf.attrs(), S2Attrs::DEVICE_RW);
            assert_eq!(leaf.state(), PageState::SharedBorrowed);
        }
        for a in [0, 1, 0x1234_5678, u32::MAX] {
            let pte = Pte::invalid(Annotation(a));
            assert!(!pte.is_valid());
            assert_eq!(pte.annotation(), Annotation(a));
        }
    }

    /// `page_at` is the split of a block down to its page.
    #[test]
    fn page_at_is_the_split_down_to_the_page() {
        let leaf = Pte::leaf(1, 0x8000_0000, S2Attrs::NORMAL_RWX, PageState::SharedOwned);
        let offset = 0x1234_5000u64;
        let l2 = leaf.child(1, (offset >> 21) as usize % ENTRIES);
        let l3 = l2.child(2, (offset >> 12) as usize % ENTRIES);
        assert_eq!(leaf.page_at(offset), l3);
        assert_eq!(l3.page_at(0), l3);
    }
}
