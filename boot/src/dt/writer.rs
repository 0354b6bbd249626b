//! A serializer of flattened device trees (version 17) into a caller's
//! buffer, without allocation.
//!
//! The blob is laid out in the usual order: header, memory reservation
//! block, structure block, strings block. The structure block grows from the
//! front of the buffer; until `finish` the strings grow down from the back,
//! so neither block's size has to be known in advance. A string's offset is
//! only known once all strings are in, so each property first records its
//! name's distance from the buffer's end, and `finish` rewrites those into
//! offsets while it moves the strings down behind the structure block.

use super::blob::{
    align4, be32, FDT_BEGIN_NODE, FDT_END, FDT_END_NODE, FDT_LAST_COMP_VERSION, FDT_MAGIC, FDT_NOP,
    FDT_PROP, FDT_VERSION, HEADER_SIZE,
};
use super::DtError;

pub struct FdtWriter<'b> {
    buf: &'b mut [u8],
    structs_start: usize,
    /// Where the next structure token goes.
    cursor: usize,
    /// The strings occupy the last `strings_len` bytes of `buf`.
    strings_len: usize,
    depth: usize,
    boot_cpuid_phys: u32,
}

impl<'b> FdtWriter<'b> {
    /// Starts a tree in `buf` with the given /memreserve/ entries
    /// (address, size).
    pub fn new(
        buf: &'b mut [u8],
        reservations: impl IntoIterator<Item = (u64, u64)>,
        boot_cpuid_phys: u32,
    ) -> Result<Self, DtError> {
        let mut writer = Self {
            buf,
            structs_start: 0,
            cursor: HEADER_SIZE,
            strings_len: 0,
            depth: 0,
            boot_cpuid_phys,
        };
        // HEADER_SIZE is a multiple of 8, as the reservation block must be.
        for (address, size) in reservations {
            writer.put_struct(&address.to_be_bytes())?;
            writer.put_struct(&size.to_be_bytes())?;
        }
        writer.put_struct(&[0; 16])?;
        writer.structs_start = writer.cursor;
        Ok(writer)
    }

    fn free(&self) -> usize {
        // The header's room is not checked until the first write.
        self.buf
            .len()
            .saturating_sub(self.strings_len + self.cursor)
    }

    fn put_struct(&mut self, bytes: &[u8]) -> Result<(), DtError> {
        if bytes.len() > self.free() {
            return Err(DtError::BufferTooSmall);
        }
        self.buf[self.cursor..self.cursor + bytes.len()].copy_from_slice(bytes);
        self.cursor += bytes.len();
        Ok(())
    }

    fn pad_struct(&mut self) -> Result<(), DtError> {
        let padding = align4(self.cursor) - self.cursor;
        self.put_struct(&[0; 3][..padding])
    }

    /// Returns the name's distance from the end of the buffer, reusing a
    /// string already present (whole or as the tail of a longer one).
    fn intern(&mut self, name: &str) -> Result<usize, DtError> {
        let end = self.buf.len();
        let strings = &self.buf[end - self.strings_len..];
        let wanted = name.len() + 1;
        let found = strings
            .windows(wanted)
            .position(|window| window[..name.len()] == *name.as_bytes() && window[name.len()] == 0);
        if let Some(position) = found {
            return Ok(self.strings_len - position);
        }
        if wanted > self.free() {
            return Err(DtError::BufferTooSmall);
        }
        self.strings_len += wanted;
        let start = end - self.strings_len;
        self.buf[start..start + name.len()].copy_from_slice(name.as_bytes());
        self.buf[start + name.len()] = 0;
        Ok(self.strings_len)
    }

    pub fn begin_node(&mut self, name: &str) -> Result<(), DtError> {
        if name.as_bytes().contains(&0) {
            return Err(DtError::BadArgument("node name contains NUL"));
        }
        if self.depth == 0 && self.cursor != self.structs_start {
            return Err(DtError::BadArgument("a second root node"));
        }
        self.put_struct(&FDT_BEGIN_NODE.to_be_bytes())?;
        self.put_struct(name.as_bytes())?;
        self.put_struct(&[0])?;
        self.pad_struct()?;
        self.depth += 1;
        Ok(())
    }

    pub fn end_node(&mut self) -> Result<(), DtError> {
        if self.depth == 0 {
            return Err(DtError::BadArgument("end_node without begin_node"));
        }
        self.put_struct(&FDT_END_NODE.to_be_bytes())?;
        self.depth -= 1;
        Ok(())
    }

    pub fn property(&mut self, name: &str, value: &[u8]) -> Result<(), DtError> {
        if self.depth == 0 {
            return Err(DtError::BadArgument("property outside any node"));
        }
        if name.as_bytes().contains(&0) {
            return Err(DtError::BadArgument("property name contains NUL"));
        }
        let len = u32::try_from(value.len()).map_err(|_| DtError::BufferTooSmall)?;
        let name_distance = self.intern(name)?;
        self.put_struct(&FDT_PROP.to_be_bytes())?;
        self.put_struct(&len.to_be_bytes())?;
        // Strings never exceed the buffer, and u32 offsets are checked in finish.
        self.put_struct(&(name_distance as u32).to_be_bytes())?;
        self.put_struct(value)?;
        self.pad_struct()
    }

    /// A string property: the bytes of `value` and a terminating NUL.
    pub fn property_str(&mut self, name: &str, value: &str) -> Result<(), DtError> {
        if self.depth == 0 {
            return Err(DtError::BadArgument("property outside any node"));
        }
        let len = u32::try_from(value.len() + 1).map_err(|_| DtError::BufferTooSmall)?;
        let name_distance = self.intern(name)?;
        self.put_struct(&FDT_PROP.to_be_bytes())?;
        self.put_struct(&len.to_be_bytes())?;
        self.put_struct(&(name_distance as u32).to_be_bytes())?;
        self.put_struct(value.as_bytes())?;
        self.put_struct(&[0])?;
        self.pad_struct()
    }

    pub fn property_u64(&mut self, name: &str, value: u64) -> Result<(), DtError> {
        self.property(name, &value.to_be_bytes())
    }

    /// Completes the blob and returns its total size.
    pub fn finish(mut self) -> Result<usize, DtError> {
        if self.depth != 0 || self.cursor == self.structs_start {
            return Err(DtError::BadArgument("unbalanced or empty tree"));
        }
        self.put_struct(&FDT_END.to_be_bytes())?;
        self.resolve_name_offsets();

        let strings_start = self.cursor;
        let total_size = strings_start + self.strings_len;
        let too_big = |n: usize| u32::try_from(n).map_err(|_| DtError::BufferTooSmall);
        let header: [u32; 10] = [
            FDT_MAGIC,
            too_big(total_size)?,
            too_big(self.structs_start)?,
            too_big(strings_start)?,
            HEADER_SIZE as u32,
            FDT_VERSION,
            FDT_LAST_COMP_VERSION,
            self.boot_cpuid_phys,
            too_big(self.strings_len)?,
            too_big(strings_start - self.structs_start)?,
        ];
        let end = self.buf.len();
        self.buf
            .copy_within(end - self.strings_len..end, strings_start);
        for (slot, word) in self.buf[..HEADER_SIZE].chunks_exact_mut(4).zip(header) {
            slot.copy_from_slice(&word.to_be_bytes());
        }
        Ok(total_size)
    }

    /// Turns each property's recorded distance-from-the-end into its offset
    /// in the final strings block. Only our own, well-formed tokens are here.
    fn resolve_name_offsets(&mut self) {
        let mut offset = self.structs_start;
        while let Some(token) = be32(self.buf, offset) {
            offset += 4;
            match token {
                FDT_BEGIN_NODE => {
                    let name_len = self.buf[offset..]
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or_default();
                    offset += align4(name_len + 1);
                }
                FDT_PROP => {
                    let len = be32(self.buf, offset).unwrap_or_default() as usize;
                    let distance = be32(self.buf, offset + 4).unwrap_or_default() as usize;
                    let name_offset = (self.strings_len - distance) as u32;
                    self.buf[offset + 4..offset + 8].copy_from_slice(&name_offset.to_be_bytes());
                    offset += 8 + align4(len);
                }
                FDT_END_NODE | FDT_NOP => {}
                _ => break,
            }
        }
    }
}
