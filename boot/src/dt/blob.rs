//! Our own reader of the flattened device tree format: the header, the
//! memory reservation block and a token walker over the structure block.
//!
//! Every offset, length and string is checked here, so that what follows
//! (the `fdt` crate in `parse`, the copy-with-edits in `host`) only ever sees
//! a blob whose every token, name and property lies inside its blocks. The
//! `fdt` crate indexes and `unwrap`s freely, so this check is what keeps a
//! malformed boot DTB from panicking the hypervisor.

use super::DtError;

pub(crate) const FDT_MAGIC: u32 = 0xd00d_feed;
pub(crate) const FDT_BEGIN_NODE: u32 = 1;
pub(crate) const FDT_END_NODE: u32 = 2;
pub(crate) const FDT_PROP: u32 = 3;
pub(crate) const FDT_NOP: u32 = 4;
pub(crate) const FDT_END: u32 = 9;

pub(crate) const HEADER_SIZE: usize = 40;
/// The version we write, and the oldest we read: version 17 is the first
/// with `size_dt_struct`, which the `fdt` crate relies on.
pub(crate) const FDT_VERSION: u32 = 17;
/// Version 17 trees remain readable by version 16 readers.
pub(crate) const FDT_LAST_COMP_VERSION: u32 = 16;

/// Deeper trees are refused: the `fdt` crate keeps a fixed 64-entry stack of
/// parents, and real trees are a handful of levels deep.
pub(crate) const MAX_DEPTH: usize = 32;

pub(crate) fn be32(bytes: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    let word = bytes.get(offset..end)?;
    Some(u32::from_be_bytes([word[0], word[1], word[2], word[3]]))
}

pub(crate) fn be64(bytes: &[u8], offset: usize) -> Option<u64> {
    let high = be32(bytes, offset)?;
    let low = be32(bytes, offset.checked_add(4)?)?;
    Some((u64::from(high) << 32) | u64::from(low))
}

pub(crate) const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The fields of the FDT header that matter to us, already checked against
/// the length of the blob.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub total_size: usize,
    pub boot_cpuid_phys: u32,
    pub mem_rsvmap: usize,
    pub structs: core::ops::Range<usize>,
    pub strings: core::ops::Range<usize>,
}

fn block(dtb_len: usize, offset: u32, size: u32) -> Result<core::ops::Range<usize>, DtError> {
    let start = offset as usize;
    let end = start
        .checked_add(size as usize)
        .filter(|&end| end <= dtb_len)
        .ok_or(DtError::Malformed("a block lies outside the blob"))?;
    Ok(start..end)
}

impl Header {
    pub(crate) fn read(dtb: &[u8]) -> Result<Self, DtError> {
        let field =
            |index: usize| be32(dtb, index * 4).ok_or(DtError::Malformed("truncated header"));
        if field(0)? != FDT_MAGIC {
            return Err(DtError::Malformed("bad magic"));
        }
        let total_size = field(1)? as usize;
        if total_size > dtb.len() {
            return Err(DtError::Malformed("totalsize exceeds the blob"));
        }
        if total_size < HEADER_SIZE {
            return Err(DtError::Malformed("totalsize smaller than the header"));
        }
        let version = field(5)?;
        let last_comp_version = field(6)?;
        if version < FDT_VERSION || last_comp_version > FDT_VERSION {
            return Err(DtError::Malformed("unsupported FDT version"));
        }
        let mem_rsvmap = field(4)? as usize;
        if mem_rsvmap < HEADER_SIZE || !mem_rsvmap.is_multiple_of(8) || mem_rsvmap > total_size {
            return Err(DtError::Malformed("bad memory reservation block offset"));
        }
        let structs = block(total_size, field(2)?, field(9)?)?;
        let strings = block(total_size, field(3)?, field(8)?)?;
        if structs.start < HEADER_SIZE
            || !structs.start.is_multiple_of(4)
            || !structs.len().is_multiple_of(4)
        {
            return Err(DtError::Malformed("misaligned structure block"));
        }
        if strings.start < HEADER_SIZE {
            return Err(DtError::Malformed("strings block overlaps the header"));
        }
        Ok(Self {
            total_size,
            boot_cpuid_phys: field(7)?,
            mem_rsvmap,
            structs,
            strings,
        })
    }
}

/// Iterates over the /memreserve/ entries as (address, size).
#[derive(Clone)]
pub(crate) struct Reservations<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl Iterator for Reservations<'_> {
    type Item = Result<(u64, u64), DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        let entry = be64(self.bytes, self.offset)
            .zip(self.offset.checked_add(8).and_then(|o| be64(self.bytes, o)));
        let Some((address, size)) = entry else {
            self.offset = self.bytes.len();
            return Some(Err(DtError::Malformed(
                "unterminated memory reservation block",
            )));
        };
        if address == 0 && size == 0 {
            self.offset = self.bytes.len();
            return None;
        }
        self.offset += 16;
        Some(Ok((address, size)))
    }
}

/// One token of the structure block, with names and values resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Token<'a> {
    BeginNode(&'a str),
    Property { name: &'a str, value: &'a [u8] },
    EndNode,
}

/// Walks the structure block token by token, checking each one, until the
/// FDT_END token. NOPs are skipped but counted, because `parse` refuses them.
#[derive(Clone)]
pub(crate) struct Tokens<'a> {
    structs: &'a [u8],
    strings: &'a [u8],
    offset: usize,
    finished: bool,
    pub nops: usize,
}

fn c_str<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, DtError> {
    let len = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(DtError::Malformed(what))?;
    core::str::from_utf8(&bytes[..len]).map_err(|_| DtError::Malformed(what))
}

impl<'a> Tokens<'a> {
    fn fail(&mut self, reason: &'static str) -> Option<Result<Token<'a>, DtError>> {
        self.finished = true;
        Some(Err(DtError::Malformed(reason)))
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Result<Token<'a>, DtError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.finished {
                return None;
            }
            let Some(token) = be32(self.structs, self.offset) else {
                return self.fail("structure block ends without FDT_END");
            };
            let body = self.offset + 4;
            match token {
                FDT_NOP => {
                    self.nops += 1;
                    self.offset = body;
                }
                FDT_END => {
                    self.finished = true;
                    return None;
                }
                FDT_END_NODE => {
                    self.offset = body;
                    return Some(Ok(Token::EndNode));
                }
                FDT_BEGIN_NODE => {
                    let name = match c_str(&self.structs[body..], "bad node name") {
                        Ok(name) => name,
                        Err(e) => {
                            self.finished = true;
                            return Some(Err(e));
                        }
                    };
                    self.offset = body + align4(name.len() + 1);
                    return Some(Ok(Token::BeginNode(name)));
                }
                FDT_PROP => {
                    let (Some(len), Some(name_offset)) =
                        (be32(self.structs, body), be32(self.structs, body + 4))
                    else {
                        return self.fail("truncated property");
                    };
                    let value_start = body + 8;
                    let Some(value) = value_start
                        .checked_add(len as usize)
                        .and_then(|end| self.structs.get(value_start..end))
                    else {
                        return self.fail("property value outside the structure block");
                    };
                    let name = match self
                        .strings
                        .get(name_offset as usize..)
                        .ok_or(DtError::Malformed(
                            "property name outside the strings block",
                        ))
                        .and_then(|s| c_str(s, "bad property name"))
                    {
                        Ok(name) => name,
                        Err(e) => {
                            self.finished = true;
                            return Some(Err(e));
                        }
                    };
                    self.offset = value_start + align4(value.len());
                    return Some(Ok(Token::Property { name, value }));
                }
                _ => return self.fail("unknown structure token"),
            }
        }
    }
}

/// A DTB whose header, reservation block and structure block have all been
/// walked once and found well formed.
#[derive(Clone)]
pub(crate) struct Blob<'a> {
    pub bytes: &'a [u8],
    pub header: Header,
    /// Whether FDT_NOP tokens occur (legal, but the `fdt` crate mis-walks them).
    pub has_nops: bool,
}

impl<'a> Blob<'a> {
    /// Checks the whole blob: everything the token walker and the `fdt` crate
    /// could trip over is refused here.
    pub(crate) fn check(dtb: &'a [u8]) -> Result<Self, DtError> {
        let header = Header::read(dtb)?;
        let bytes = &dtb[..header.total_size];
        let blob = Self {
            bytes,
            header,
            has_nops: false,
        };
        for reservation in blob.reservations() {
            reservation?;
        }

        let mut tokens = blob.tokens();
        let mut depth = 0usize;
        // Properties must come before the children of a node: the `fdt`
        // crate stops reading properties at the first child.
        let mut seen_child = false;
        let mut root_closed = false;
        for token in tokens.by_ref() {
            if root_closed {
                return Err(DtError::Malformed("tokens after the root node"));
            }
            match token? {
                Token::BeginNode(name) => {
                    if depth == 0 && !name.is_empty() {
                        return Err(DtError::Malformed("the root node has a name"));
                    }
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(DtError::Malformed("nodes nested too deep"));
                    }
                    seen_child = false;
                }
                Token::Property { name, value } => {
                    if depth == 0 {
                        return Err(DtError::Malformed("property outside any node"));
                    }
                    if seen_child {
                        return Err(DtError::Malformed("property after a child node"));
                    }
                    if (name == "#address-cells" || name == "#size-cells") && value.len() != 4 {
                        return Err(DtError::Malformed("cell count property is not one cell"));
                    }
                }
                Token::EndNode => {
                    if depth == 0 {
                        return Err(DtError::Malformed("unbalanced end of node"));
                    }
                    depth -= 1;
                    seen_child = true;
                    root_closed = depth == 0;
                }
            }
        }
        if !root_closed {
            return Err(DtError::Malformed("no complete root node"));
        }
        Ok(Self {
            has_nops: tokens.nops > 0,
            ..blob
        })
    }

    pub(crate) fn tokens(&self) -> Tokens<'a> {
        Tokens {
            structs: &self.bytes[self.header.structs.clone()],
            strings: &self.bytes[self.header.strings.clone()],
            offset: 0,
            finished: false,
            nops: 0,
        }
    }

    pub(crate) fn reservations(&self) -> Reservations<'a> {
        Reservations {
            bytes: self.bytes,
            offset: self.header.mem_rsvmap,
        }
    }
}

/// Removes the FDT_NOP tokens of a checked blob in place (boot loaders such
/// as U-Boot and QEMU leave them where they deleted something; the `fdt`
/// crate cannot walk them). The structure block shrinks; the strings block
/// and every other offset stay where they are. Returns whether anything
/// was removed.
pub(crate) fn strip_nops(dtb: &mut [u8]) -> Result<bool, DtError> {
    let blob = Blob::check(dtb)?;
    if !blob.has_nops {
        return Ok(false);
    }
    let structs = blob.header.structs.clone();
    let (mut read, mut write) = (structs.start, structs.start);
    while read < structs.end {
        // The blob is checked: every token and its payload lie inside.
        let token = be32(dtb, read).ok_or(DtError::Malformed("truncated structure block"))?;
        let len = match token {
            FDT_BEGIN_NODE => {
                let name = &dtb[read + 4..structs.end];
                let nul = name
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(DtError::Malformed("node name"))?;
                4 + align4(nul + 1)
            }
            FDT_PROP => {
                let value = be32(dtb, read + 4).ok_or(DtError::Malformed("property"))? as usize;
                12 + align4(value)
            }
            FDT_END_NODE | FDT_NOP => 4,
            FDT_END => structs.end - read,
            _ => return Err(DtError::Malformed("unknown token")),
        };
        if read + len > structs.end {
            return Err(DtError::Malformed("token past the structure block"));
        }
        if token != FDT_NOP {
            dtb.copy_within(read..read + len, write);
            write += len;
        }
        read += len;
    }
    // size_dt_struct is header word 9.
    let size = ((write - structs.start) as u32).to_be_bytes();
    dtb[36..40].copy_from_slice(&size);
    Ok(true)
}
