//! The host's device tree: a token-by-token copy of the boot DTB with the
//! edits of the boot protocol (docs/design.md, "Boot protocol").

use super::blob::{align4, Blob, Token, Tokens, HEADER_SIZE};
use super::writer::FdtWriter;
use super::{is_memory_node, read_cells, reg_entries, Cells, DtError, PhysRange};

/// How the host's tree differs from the boot tree.
#[derive(Clone, Copy, Debug)]
pub struct HostDtbEdits<'s> {
    /// RAM the host must not see (the hypervisor's own), as [start, end)
    /// ranges in any order; they may overlap each other.
    pub remove: &'s [PhysRange],
    /// The host's /chosen/bootargs, replacing the hypervisor's.
    pub bootargs: &'s str,
    /// Becomes /chosen/linux,initrd-start and linux,initrd-end.
    pub initrd: Option<PhysRange>,
}

/// One /memory `reg` entry can become this many entries at most after the
/// removals; it bounds the stack buffer of the rewritten property.
const MAX_HOST_MEMORY_ENTRIES: usize = 32;
/// Two cells of address and two of size per entry at most.
const MAX_MEMORY_REG_BYTES: usize = MAX_HOST_MEMORY_ENTRIES * 16;

/// An upper bound on the size `write_host_dtb` needs for these edits, for
/// callers that must reserve the output buffer before writing it.
pub fn host_dtb_size_bound(boot_dtb: &[u8], edits: &HostDtbEdits<'_>) -> Result<usize, DtError> {
    let blob = Blob::check(boot_dtb)?;
    let header = &blob.header;
    let reservations = blob.reservations().count();
    // Each /memory reg entry splits into at most one piece per removal, plus one.
    let mut memory_entries = 0usize;
    let mut depth = 0usize;
    let mut in_memory = false;
    for token in blob.tokens() {
        match token? {
            Token::BeginNode(name) => {
                depth += 1;
                in_memory = depth == 2 && is_memory_node(name);
            }
            Token::Property { name: "reg", value } if in_memory && depth == 2 => {
                memory_entries += value.len() / 8;
            }
            Token::Property { .. } => {}
            Token::EndNode => {
                depth = depth.saturating_sub(1);
                in_memory = false;
            }
        }
    }
    let property = |len: usize| 12 + align4(len);
    let added = property(edits.bootargs.len() + 1)
        + 2 * property(8)
        + "chosen".len() + 12 // a /chosen node, if there was none
        + "bootargs linux,initrd-start linux,initrd-end ".len()
        + memory_entries * edits.remove.len() * 16;
    Ok(HEADER_SIZE + (reservations + 1) * 16 + header.structs.len() + header.strings.len() + added)
}

/// Writes the host's DTB into `out` and returns its size. The result is the
/// boot DTB, node for node and property for property, except that:
/// - the `reg` of every top-level /memory node no longer covers any range
///   in `edits.remove` (entries are split as needed, cell counts kept; a
///   node whose RAM is all removed keeps an empty `reg`),
/// - /chosen/bootargs is `edits.bootargs`, and /chosen has
///   `linux,initrd-start`/`linux,initrd-end` (u64) exactly when
///   `edits.initrd` is given (/chosen is created if missing),
/// - the multiboot module nodes under /chosen are gone.
///
/// /memreserve/ entries and the boot CPU id are kept; FDT_NOPs are dropped.
pub fn write_host_dtb(
    boot_dtb: &[u8],
    out: &mut [u8],
    edits: &HostDtbEdits<'_>,
) -> Result<usize, DtError> {
    if edits.remove.iter().any(PhysRange::is_empty) {
        return Err(DtError::BadArgument("empty range to remove"));
    }
    if edits.initrd.is_some_and(|r| r.is_empty()) {
        return Err(DtError::BadArgument("empty initrd range"));
    }
    let blob = Blob::check(boot_dtb)?;
    // Checked by Blob::check, so no error can cut the entries short.
    let reservations = blob.reservations().map_while(Result::ok);
    let mut writer = FdtWriter::new(out, reservations, blob.header.boot_cpuid_phys)?;

    let mut tokens = blob.tokens();
    let mut depth = 0usize;
    let mut root_cells = Cells {
        address: 2,
        size: 1,
    };
    let mut in_memory = false;
    let mut in_chosen = false;
    let mut chosen_seen = false;
    let mut chosen_props_written = false;

    while let Some(token) = tokens.next() {
        match token? {
            Token::BeginNode(name) => {
                if in_chosen && depth == 2 && !chosen_props_written {
                    write_chosen_props(&mut writer, edits)?;
                    chosen_props_written = true;
                }
                if in_chosen && depth == 2 && is_multiboot_module(tokens.clone())? {
                    skip_node(&mut tokens)?;
                    continue;
                }
                depth += 1;
                in_memory = depth == 2 && is_memory_node(name);
                if depth == 2 && name == "chosen" {
                    in_chosen = true;
                    chosen_seen = true;
                }
                writer.begin_node(name)?;
            }
            Token::Property { name, value } => {
                if depth == 1 {
                    // Root properties come before /memory, so its reg is
                    // read with the final cell counts.
                    match name {
                        "#address-cells" => root_cells.address = cell(value),
                        "#size-cells" => root_cells.size = cell(value),
                        _ => {}
                    }
                }
                if in_memory && depth == 2 && name == "reg" {
                    write_memory_reg(&mut writer, value, root_cells, edits.remove)?;
                } else if in_chosen && depth == 2 && is_replaced_chosen_prop(name) {
                    // Written from `edits` before /chosen's first child or its end.
                } else {
                    writer.property(name, value)?;
                }
            }
            Token::EndNode => {
                if in_chosen && depth == 2 {
                    if !chosen_props_written {
                        write_chosen_props(&mut writer, edits)?;
                        chosen_props_written = true;
                    }
                    in_chosen = false;
                }
                if depth == 1 && !chosen_seen {
                    writer.begin_node("chosen")?;
                    write_chosen_props(&mut writer, edits)?;
                    writer.end_node()?;
                }
                in_memory = false;
                depth = depth.saturating_sub(1);
                writer.end_node()?;
            }
        }
    }
    writer.finish()
}

fn cell(value: &[u8]) -> usize {
    read_cells(value, 1).unwrap_or_default() as usize
}

fn is_replaced_chosen_prop(name: &str) -> bool {
    matches!(name, "bootargs" | "linux,initrd-start" | "linux,initrd-end")
}

fn write_chosen_props(writer: &mut FdtWriter<'_>, edits: &HostDtbEdits<'_>) -> Result<(), DtError> {
    writer.property_str("bootargs", edits.bootargs)?;
    if let Some(initrd) = edits.initrd {
        writer.property_u64("linux,initrd-start", initrd.start)?;
        writer.property_u64("linux,initrd-end", initrd.end)?;
    }
    Ok(())
}

/// Looks ahead over the properties of the node just begun for a
/// `multiboot,*` compatible string.
fn is_multiboot_module(tokens: Tokens<'_>) -> Result<bool, DtError> {
    for token in tokens {
        match token? {
            Token::Property {
                name: "compatible",
                value,
            } => {
                return Ok(value
                    .split(|&b| b == 0)
                    .any(|entry| entry.starts_with(b"multiboot,")));
            }
            Token::Property { .. } => {}
            Token::BeginNode(_) | Token::EndNode => break,
        }
    }
    Ok(false)
}

/// Consumes the rest of the node just begun, children included.
fn skip_node(tokens: &mut Tokens<'_>) -> Result<(), DtError> {
    let mut depth = 1usize;
    while depth > 0 {
        match tokens.next() {
            Some(Ok(Token::BeginNode(_))) => depth += 1,
            Some(Ok(Token::EndNode)) => depth -= 1,
            Some(Ok(Token::Property { .. })) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(DtError::Malformed("node not closed")),
        }
    }
    Ok(())
}

/// Writes a /memory `reg` with the removed ranges cut out of each entry.
fn write_memory_reg(
    writer: &mut FdtWriter<'_>,
    value: &[u8],
    cells: Cells,
    remove: &[PhysRange],
) -> Result<(), DtError> {
    let mut out = [0u8; MAX_MEMORY_REG_BYTES];
    let mut len = 0;
    let entry_size = 4 * (cells.address + cells.size);
    for (address, size) in reg_entries(value, cells, "/memory reg")? {
        let region =
            PhysRange::from_start_size(address, size).ok_or(DtError::BadProperty("/memory reg"))?;
        let mut push_piece = |piece: PhysRange| -> Result<(), DtError> {
            let slot = out
                .get_mut(len..len + entry_size)
                .ok_or(DtError::TooMany("host /memory reg entries"))?;
            put_cells(&mut slot[..4 * cells.address], piece.start);
            put_cells(&mut slot[4 * cells.address..], piece.size());
            len += entry_size;
            Ok(())
        };
        for_each_remaining_piece(region, remove, &mut push_piece)?;
    }
    writer.property("reg", &out[..len])
}

/// Writes `value` into 1 or 2 big-endian cells. The pieces lie inside an
/// entry read with the same cell counts, so they always fit.
fn put_cells(slot: &mut [u8], value: u64) {
    if slot.len() == 8 {
        slot.copy_from_slice(&value.to_be_bytes());
    } else {
        slot.copy_from_slice(&(value as u32).to_be_bytes());
    }
}

/// Calls `piece` for each part of `region` outside every range of `remove`,
/// in address order. An entry of size zero yields nothing.
fn for_each_remaining_piece(
    region: PhysRange,
    remove: &[PhysRange],
    mut piece: impl FnMut(PhysRange) -> Result<(), DtError>,
) -> Result<(), DtError> {
    let mut cursor = region.start;
    while cursor < region.end {
        if let Some(covering) = remove.iter().find(|r| r.start <= cursor && cursor < r.end) {
            cursor = covering.end;
            continue;
        }
        let next_removal = remove
            .iter()
            .filter(|r| cursor < r.start && r.start < region.end)
            .map(|r| r.start)
            .min()
            .unwrap_or(region.end);
        piece(PhysRange::new(cursor, next_removal))?;
        cursor = next_removal;
    }
    Ok(())
}
