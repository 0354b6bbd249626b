//! What the test kernel learns from its device tree and command line.

use fdt::Fdt;

pub use crate::ranges::{parse_u64, Range, Ranges};

/// QEMU puts the device tree at the start of RAM for an ELF `-kernel`. Only
/// a developer booting the test kernel without the hypervisor gets here; the
/// boot suite fails if the tree did not arrive in x0.
const FALLBACK_DTB: u64 = 0x4000_0000;
const FDT_MAGIC: u32 = 0xd00d_feed;

/// The CPU state the kernel was entered with.
#[derive(Clone, Copy, Debug)]
pub struct EntryState {
    /// x0..x3.
    pub x: [u64; 4],
    pub sctlr: u64,
    pub spsel: u64,
}

/// Everything the suites need from the boot.
pub struct BootInfo {
    pub fdt: Fdt<'static>,
    /// The device tree's physical address and size.
    pub dtb: Range,
    /// Whether the device tree came in x0 as the boot protocol says.
    pub dtb_from_x0: bool,
    /// The registers as the kernel was entered.
    pub entry: EntryState,
    /// RAM the host may use: the `reg` of every memory node.
    pub memory: Ranges,
    /// More memory ranges than `Ranges` holds were listed.
    pub memory_truncated: bool,
    pub bootargs: &'static str,
    /// The kernel's own footprint, image through stack.
    pub image: Range,
}

impl BootInfo {
    /// The value of `key=value` in the bootargs.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.bootargs.split_ascii_whitespace().find_map(|tok| {
            let (k, v) = tok.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// The physical RAM of the machine, from `ram=BASE:SIZE` (the runner
    /// passes what it gave QEMU's -m), else the span of the memory nodes.
    /// The host's memory nodes are RAM less the hypervisor's memory, so the
    /// hypervisor's memory is the holes of /memory within this range.
    pub fn physical_ram(&self) -> Range {
        if let Some((base, size)) = self.arg("ram").and_then(|v| v.split_once(':')) {
            if let (Some(b), Some(s)) = (parse_u64(base), parse_u64(size)) {
                return Range::new(b, b + s);
            }
        }
        let start = self.memory.iter().map(|r| r.start).min().unwrap_or(0);
        let end = self.memory.iter().map(|r| r.end).max().unwrap_or(0);
        Range::new(start, end)
    }

    /// The hypervisor's memory as the host can infer it.
    pub fn hyp_ranges(&self) -> Ranges {
        self.memory.holes_in(self.physical_ram())
    }
}

/// Reads the big-endian u32 at `addr` (a possible FDT header field).
fn peek_be32(addr: u64) -> u32 {
    // SAFETY: callers pass addresses in RAM the stage-1 maps (the block of
    // x0 or of the fallback address was mapped by `mmu::enable`); a read
    // has no side effects.
    u32::from_be(unsafe { core::ptr::read_volatile(addr as *const u32) })
}

/// Picks the device tree: x0 if it holds one, else the fallback address.
/// Returns (address, from_x0).
pub fn locate(x0: u64) -> Option<(u64, bool)> {
    let plausible = |a: u64| {
        a != 0 && a.is_multiple_of(4) && a < crate::mmu::VA_LIMIT && peek_be32(a) == FDT_MAGIC
    };
    if plausible(x0) {
        Some((x0, true))
    } else if plausible(FALLBACK_DTB) {
        Some((FALLBACK_DTB, false))
    } else {
        None
    }
}

pub fn fallback_address() -> u64 {
    FALLBACK_DTB
}

/// Parses the tree at `addr` (mapping all of it first) and gathers what the
/// suites use.
pub fn parse(
    addr: u64,
    from_x0: bool,
    entry: EntryState,
    image: Range,
) -> Result<BootInfo, fdt::FdtError> {
    let size = u64::from(peek_be32(addr + 4));
    crate::mmu::map_ram(addr, addr + size);
    // SAFETY: `addr` holds the FDT magic and the whole `totalsize` bytes are
    // mapped; the tree is never written while the kernel runs, so a 'static
    // borrow of it is sound.
    let fdt = unsafe { Fdt::from_ptr(addr as *const u8)? };
    let mut memory = Ranges::new();
    let mut memory_truncated = false;
    if let Some(root) = fdt.find_node("/") {
        for node in root.children() {
            let is_memory = node.name == "memory"
                || node.name.starts_with("memory@")
                || node.property("device_type").and_then(|p| p.as_str()) == Some("memory");
            if !is_memory {
                continue;
            }
            for reg in node.reg().into_iter().flatten() {
                let start = reg.starting_address as u64;
                let len = reg.size.unwrap_or(0) as u64;
                if len != 0 && !memory.push(Range::new(start, start + len)) {
                    memory_truncated = true;
                }
            }
        }
    }
    let bootargs = fdt.chosen().bootargs().unwrap_or("");
    Ok(BootInfo {
        dtb: Range::new(addr, addr + fdt.total_size() as u64),
        fdt,
        dtb_from_x0: from_x0,
        entry,
        memory,
        memory_truncated,
        bootargs,
        image,
    })
}
