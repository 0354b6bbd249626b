//! The device tree at boot: what the hypervisor reads from the boot DTB
//! (`BootInfo::parse`) and the DTB it hands to the host (`write_host_dtb`).
//!
//! Nothing here allocates or panics: every list has a fixed capacity, and a
//! malformed or unexpected tree is a `DtError`. The blob is checked once
//! (`blob::Blob::check`) before the `fdt` crate ever sees it, because that
//! crate indexes and unwraps on malformed input.
//!
//! MMIO: the host is given everything in the physical address space that is
//! not RAM (`BootInfo::mmio_windows`), rather than the `reg` of each device
//! node. Devices behind buses (PCIe windows, the platform bus) are reached
//! through `ranges` translations and hot-plugged BARs that a node list would
//! miss; a hole in the complement costs nothing, since an access there
//! faults at the bus as it would without us.

mod blob;
mod host;
mod writer;

#[cfg(test)]
mod tests;

use core::fmt;

use fdt::node::FdtNode;
use fdt::Fdt;

pub use host::{host_dtb_size_bound, write_host_dtb, HostDtbEdits};
pub use writer::FdtWriter;

pub const MAX_RAM_REGIONS: usize = 8;
pub const MAX_CPUS: usize = 8;
/// GICv3 redistributor regions (`#redistributor-regions`).
pub const MAX_GICR_REGIONS: usize = 4;
/// The complement of `MAX_RAM_REGIONS` sorted, disjoint regions.
pub const MAX_MMIO_WINDOWS: usize = MAX_RAM_REGIONS + 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtError {
    /// The blob breaks the flattened device tree format.
    Malformed(&'static str),
    /// A property we need has the wrong size or content.
    BadProperty(&'static str),
    NoMemory,
    OverlappingRam,
    NoUart,
    NoGic,
    NoPsci,
    /// PSCI older than 0.2, or a conduit other than SMC or HVC.
    UnsupportedPsci,
    NoCpus,
    NoKernelModule,
    /// More entries than a fixed-capacity list holds; names the list.
    TooMany(&'static str),
    BufferTooSmall,
    BadArgument(&'static str),
}

impl fmt::Display for DtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed device tree: {why}"),
            Self::BadProperty(which) => write!(f, "bad device tree property: {which}"),
            Self::NoMemory => f.write_str("no RAM in any /memory node"),
            Self::OverlappingRam => f.write_str("/memory regions overlap"),
            Self::NoUart => f.write_str("no arm,pl011 UART"),
            Self::NoGic => f.write_str("no arm,gic-v3 interrupt controller"),
            Self::NoPsci => f.write_str("no PSCI node"),
            Self::UnsupportedPsci => f.write_str("PSCI older than 0.2 or an unknown method"),
            Self::NoCpus => f.write_str("no CPU in /cpus"),
            Self::NoKernelModule => f.write_str("no multiboot,kernel module in /chosen"),
            Self::TooMany(what) => write!(f, "too many {what}"),
            Self::BufferTooSmall => f.write_str("output buffer too small for the device tree"),
            Self::BadArgument(why) => write!(f, "bad argument: {why}"),
        }
    }
}

/// A physical address range [start, end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysRange {
    pub start: u64,
    pub end: u64,
}

impl PhysRange {
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    /// The range of `size` bytes at `start`, if it does not wrap.
    pub fn from_start_size(start: u64, size: u64) -> Option<Self> {
        Some(Self {
            start,
            end: start.checked_add(size)?,
        })
    }

    pub const fn size(&self) -> u64 {
        self.end - self.start
    }

    pub const fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// A list with a fixed capacity, for a `no_std` crate without `alloc`.
#[derive(Clone, Copy)]
pub struct FixedList<T: Copy + Default, const N: usize> {
    items: [T; N],
    len: usize,
}

impl<T: Copy + Default, const N: usize> Default for FixedList<T, N> {
    fn default() -> Self {
        Self {
            items: [T::default(); N],
            len: 0,
        }
    }
}

impl<T: Copy + Default, const N: usize> FixedList<T, N> {
    /// Appends `item`; `what` names the list in the error when it is full.
    pub fn push(&mut self, item: T, what: &'static str) -> Result<(), DtError> {
        let slot = self.items.get_mut(self.len).ok_or(DtError::TooMany(what))?;
        *slot = item;
        self.len += 1;
        Ok(())
    }

    pub fn as_slice(&self) -> &[T] {
        &self.items[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Copy + Default + fmt::Debug, const N: usize> fmt::Debug for FixedList<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl<T: Copy + Default, const N: usize> core::ops::Deref for FixedList<T, N> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Copy + Default + PartialEq, const N: usize> PartialEq for FixedList<T, N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Default + Eq, const N: usize> Eq for FixedList<T, N> {}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GicV3 {
    pub distributor: PhysRange,
    pub redistributors: FixedList<PhysRange, MAX_GICR_REGIONS>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciMethod {
    Smc,
    Hvc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PsciVersion {
    /// `arm,psci-0.2`: the first version with standard function IDs.
    V0_2,
    /// `arm,psci-1.0`.
    V1_0,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Psci {
    pub method: PsciMethod,
    pub version: PsciVersion,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnableMethod {
    Psci,
    SpinTable {
        release_addr: u64,
    },
    /// Absent or not one we know (the boot CPU needs none).
    #[default]
    Other,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    /// The affinity fields of MPIDR_EL1, as in the cpu node's `reg`.
    pub mpidr: u64,
    pub enable_method: EnableMethod,
}

/// A multiboot module of /chosen (`-device guest-loader`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    pub range: PhysRange,
    /// Empty when the node has no `bootargs`.
    pub bootargs: &'a str,
}

/// What the hypervisor learns from the boot device tree.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BootInfo<'a> {
    /// Every `reg` entry of every top-level /memory node, sorted by address,
    /// disjoint, without empty entries.
    pub ram: FixedList<PhysRange, MAX_RAM_REGIONS>,
    /// The PL011 that /chosen/stdout-path names, or else the first one.
    pub uart: PhysRange,
    pub gic: GicV3,
    pub psci: Psci,
    pub cpus: FixedList<Cpu, MAX_CPUS>,
    /// The hypervisor's own command line (/chosen/bootargs), or empty.
    pub bootargs: &'a str,
    pub kernel: Module<'a>,
    pub ramdisk: Option<PhysRange>,
}

#[derive(Clone, Copy, Debug)]
struct Cells {
    address: usize,
    size: usize,
}

impl Cells {
    /// Where a node's property is absent, the spec's defaults apply.
    fn of(node: FdtNode<'_, '_>) -> Self {
        Self::inherit(
            node,
            Self {
                address: 2,
                size: 1,
            },
        )
    }

    /// The node's own cell counts, each falling back to `outer`'s.
    fn inherit(node: FdtNode<'_, '_>, outer: Self) -> Self {
        Self {
            address: cell_count(node, "#address-cells").unwrap_or(outer.address),
            size: cell_count(node, "#size-cells").unwrap_or(outer.size),
        }
    }
}

fn cell_count(node: FdtNode<'_, '_>, name: &str) -> Option<usize> {
    node.property(name)
        .and_then(|p| p.value.try_into().ok())
        .map(|b| u32::from_be_bytes(b) as usize)
}

/// Reads a number of `cells` 32-bit cells (at most two).
fn read_cells(bytes: &[u8], cells: usize) -> Option<u64> {
    match cells {
        1 => blob::be32(bytes, 0).map(u64::from),
        2 => blob::be64(bytes, 0),
        _ => None,
    }
}

/// The (address, size) entries of a `reg` value, or an error naming `what`
/// if the cell counts are unsupported or the length is not whole entries.
fn reg_entries<'a>(
    value: &'a [u8],
    cells: Cells,
    what: &'static str,
) -> Result<impl Iterator<Item = (u64, u64)> + 'a, DtError> {
    let entry = 4 * (cells.address + cells.size);
    if !(1..=2).contains(&cells.address) || cells.size > 2 || !value.len().is_multiple_of(entry) {
        return Err(DtError::BadProperty(what));
    }
    Ok(value.chunks_exact(entry).map(move |chunk| {
        let address = read_cells(chunk, cells.address).unwrap_or_default();
        let size = read_cells(&chunk[4 * cells.address..], cells.size).unwrap_or_default();
        (address, size)
    }))
}

fn reg_ranges<'a>(
    node: FdtNode<'_, 'a>,
    cells: Cells,
    what: &'static str,
) -> Result<impl Iterator<Item = Result<PhysRange, DtError>> + 'a, DtError> {
    let value = node
        .property("reg")
        .ok_or(DtError::BadProperty(what))?
        .value;
    Ok(
        reg_entries(value, cells, what)?.map(move |(address, size)| {
            PhysRange::from_start_size(address, size).ok_or(DtError::BadProperty(what))
        }),
    )
}

fn str_prop<'a>(node: FdtNode<'_, 'a>, name: &str) -> Option<&'a str> {
    let value = node.property(name)?.value;
    let text = value.strip_suffix(&[0]).unwrap_or(value);
    core::str::from_utf8(text).ok()
}

fn has_compatible(node: FdtNode<'_, '_>, wanted: &str) -> bool {
    node.compatible()
        .is_some_and(|c| c.all().any(|c| c == wanted))
}

fn base_name(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

fn child<'b, 'a>(node: FdtNode<'b, 'a>, name: &str) -> Option<FdtNode<'b, 'a>> {
    node.children().find(|c| c.name == name)
}

/// Finds a node by absolute path, walking children so that the `fdt` crate's
/// alias fallback (which can recurse forever on a crafted /aliases) is never
/// involved. A component without a unit address matches any unit address.
fn find_path<'b, 'a>(root: FdtNode<'b, 'a>, path: &str) -> Option<(FdtNode<'b, 'a>, Cells)> {
    let mut node = root;
    let mut cells = Cells::of(root);
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let next = node
            .children()
            .find(|c| c.name == part || (!part.contains('@') && base_name(c.name) == part))?;
        cells = Cells::of(node);
        node = next;
    }
    Some((node, cells))
}

/// The first node, depth first, compatible with `wanted`, and the cell
/// counts of its parent. Depth is bounded by `blob::MAX_DEPTH`.
fn find_compatible<'b, 'a>(
    node: FdtNode<'b, 'a>,
    wanted: &str,
) -> Option<(FdtNode<'b, 'a>, Cells)> {
    let cells = Cells::of(node);
    for c in node.children() {
        if has_compatible(c, wanted) {
            return Some((c, cells));
        }
        if let Some(found) = find_compatible(c, wanted) {
            return Some(found);
        }
    }
    None
}

/// Removes FDT_NOP tokens from a boot DTB in place, so that [`BootInfo::parse`]
/// accepts it. Returns whether there were any.
pub fn strip_nops(dtb: &mut [u8]) -> Result<bool, DtError> {
    blob::strip_nops(dtb)
}

impl<'a> BootInfo<'a> {
    /// Reads the boot DTB. `dtb` may be longer than the tree's `totalsize`.
    pub fn parse(dtb: &'a [u8]) -> Result<Self, DtError> {
        let blob = blob::Blob::check(dtb)?;
        if blob.has_nops {
            // The `fdt` crate mis-walks FDT_NOP between properties and
            // children (it can assert); no boot loader we run under writes them.
            return Err(DtError::Malformed("FDT_NOP tokens are not supported"));
        }
        let fdt =
            Fdt::new(blob.bytes).map_err(|_| DtError::Malformed("rejected by the fdt crate"))?;
        let root = fdt
            .find_node("/")
            .ok_or(DtError::Malformed("no root node"))?;
        let root_cells = Cells::of(root);
        let chosen = child(root, "chosen");

        let (kernel, ramdisk) = match chosen {
            Some(chosen) => modules(chosen, Cells::inherit(chosen, root_cells))?,
            None => (None, None),
        };
        Ok(Self {
            ram: ram(root, root_cells)?,
            uart: uart(root, chosen)?,
            gic: gic(root)?,
            psci: psci(root)?,
            cpus: cpus(root)?,
            bootargs: chosen.and_then(|c| str_prop(c, "bootargs")).unwrap_or(""),
            kernel: kernel.ok_or(DtError::NoKernelModule)?,
            ramdisk,
        })
    }

    /// Everything below `pa_limit` that is not RAM: the windows the host
    /// sees as Device memory. Sorted; never more than `MAX_MMIO_WINDOWS`.
    pub fn mmio_windows(&self, pa_limit: u64) -> FixedList<PhysRange, MAX_MMIO_WINDOWS> {
        let mut windows = FixedList::default();
        let mut cursor = 0;
        for region in self.ram.iter() {
            if region.start >= pa_limit {
                break;
            }
            if region.start > cursor {
                // Cannot fail: at most one window per RAM region plus one.
                let _ = windows.push(PhysRange::new(cursor, region.start), "MMIO windows");
            }
            cursor = region.end;
        }
        if cursor < pa_limit {
            let _ = windows.push(PhysRange::new(cursor, pa_limit), "MMIO windows");
        }
        windows
    }

    /// Whether [start, end) lies inside one RAM region.
    pub fn ram_contains(&self, range: PhysRange) -> bool {
        self.ram
            .iter()
            .any(|r| r.start <= range.start && range.end <= r.end)
    }
}

fn is_memory_node(name: &str) -> bool {
    base_name(name) == "memory"
}

fn ram(
    root: FdtNode<'_, '_>,
    cells: Cells,
) -> Result<FixedList<PhysRange, MAX_RAM_REGIONS>, DtError> {
    let mut ram = FixedList::<PhysRange, MAX_RAM_REGIONS>::default();
    for node in root.children().filter(|n| is_memory_node(n.name)) {
        for region in reg_ranges(node, cells, "/memory reg")? {
            let region = region?;
            if !region.is_empty() {
                ram.push(region, "RAM regions")?;
            }
        }
    }
    if ram.is_empty() {
        return Err(DtError::NoMemory);
    }
    // Insertion sort: a handful of entries, and no allocation.
    let regions = &mut ram.items[..ram.len];
    for i in 1..regions.len() {
        let mut j = i;
        while j > 0 && regions[j - 1].start > regions[j].start {
            regions.swap(j - 1, j);
            j -= 1;
        }
    }
    if regions.windows(2).any(|pair| pair[0].overlaps(&pair[1])) {
        return Err(DtError::OverlappingRam);
    }
    Ok(ram)
}

fn first_reg(
    node: FdtNode<'_, '_>,
    cells: Cells,
    what: &'static str,
) -> Result<PhysRange, DtError> {
    reg_ranges(node, cells, what)?
        .next()
        .unwrap_or(Err(DtError::BadProperty(what)))
}

/// The UART /chosen/stdout-path names if it is a PL011, else the first
/// PL011. A `reg` is read with its parent's cells; no `ranges` translation
/// is applied (QEMU's virt puts the UART at the root).
fn uart(root: FdtNode<'_, '_>, chosen: Option<FdtNode<'_, '_>>) -> Result<PhysRange, DtError> {
    let stdout = chosen
        .and_then(|c| str_prop(c, "stdout-path"))
        .map(|path| path.split(':').next().unwrap_or(path))
        .and_then(|path| {
            if path.starts_with('/') {
                Some(path)
            } else {
                // An alias, which must name a path, not another alias.
                child(root, "aliases")
                    .and_then(|aliases| str_prop(aliases, path))
                    .filter(|p| p.starts_with('/'))
            }
        })
        .and_then(|path| find_path(root, path))
        .filter(|(node, _)| has_compatible(*node, "arm,pl011"));
    let (node, cells) = stdout
        .or_else(|| find_compatible(root, "arm,pl011"))
        .ok_or(DtError::NoUart)?;
    first_reg(node, cells, "UART reg")
}

fn gic(root: FdtNode<'_, '_>) -> Result<GicV3, DtError> {
    let (node, cells) = find_compatible(root, "arm,gic-v3").ok_or(DtError::NoGic)?;
    let redistributor_count = cell_count(node, "#redistributor-regions").unwrap_or(1);
    let mut regs = reg_ranges(node, cells, "GIC reg")?;
    let distributor = regs
        .next()
        .unwrap_or(Err(DtError::BadProperty("GIC reg")))?;
    let mut redistributors = FixedList::default();
    for _ in 0..redistributor_count {
        let region = regs
            .next()
            .unwrap_or(Err(DtError::BadProperty("GIC reg")))?;
        redistributors.push(region, "GIC redistributor regions")?;
    }
    if redistributors.is_empty() {
        return Err(DtError::BadProperty("#redistributor-regions"));
    }
    Ok(GicV3 {
        distributor,
        redistributors,
    })
}

fn psci(root: FdtNode<'_, '_>) -> Result<Psci, DtError> {
    let (node, _) = find_compatible(root, "arm,psci-1.0")
        .or_else(|| find_compatible(root, "arm,psci-0.2"))
        .or_else(|| find_compatible(root, "arm,psci"))
        .ok_or(DtError::NoPsci)?;
    let version = if has_compatible(node, "arm,psci-1.0") {
        PsciVersion::V1_0
    } else if has_compatible(node, "arm,psci-0.2") {
        PsciVersion::V0_2
    } else {
        return Err(DtError::UnsupportedPsci);
    };
    let method = match str_prop(node, "method") {
        Some("smc") => PsciMethod::Smc,
        Some("hvc") => PsciMethod::Hvc,
        _ => return Err(DtError::UnsupportedPsci),
    };
    Ok(Psci { method, version })
}

fn cpus(root: FdtNode<'_, '_>) -> Result<FixedList<Cpu, MAX_CPUS>, DtError> {
    let parent = child(root, "cpus").ok_or(DtError::NoCpus)?;
    let address_cells = Cells::of(parent).address;
    let mut cpus = FixedList::default();
    for node in parent.children().filter(|n| base_name(n.name) == "cpu") {
        let reg = node
            .property("reg")
            .ok_or(DtError::BadProperty("cpu reg"))?
            .value;
        let mpidr = read_cells(reg, address_cells).ok_or(DtError::BadProperty("cpu reg"))?;
        let enable_method = match str_prop(node, "enable-method") {
            Some("psci") => EnableMethod::Psci,
            Some("spin-table") => EnableMethod::SpinTable {
                release_addr: node
                    .property("cpu-release-addr")
                    .and_then(|p| read_cells(p.value, p.value.len() / 4))
                    .ok_or(DtError::BadProperty("cpu-release-addr"))?,
            },
            _ => EnableMethod::Other,
        };
        cpus.push(
            Cpu {
                mpidr,
                enable_method,
            },
            "CPUs",
        )?;
    }
    if cpus.is_empty() {
        return Err(DtError::NoCpus);
    }
    Ok(cpus)
}

/// Whether a /chosen child is a multiboot module (of any kind).
fn is_multiboot_module(node: FdtNode<'_, '_>) -> bool {
    node.compatible()
        .is_some_and(|c| c.all().any(|c| c.starts_with("multiboot,")))
}

type Modules<'a> = (Option<Module<'a>>, Option<PhysRange>);

/// The first `multiboot,kernel` and `multiboot,ramdisk` modules. Their `reg`
/// uses /chosen's cell counts, or the root's where /chosen has none, as
/// QEMU's guest-loader writes them.
fn modules<'a>(chosen: FdtNode<'_, 'a>, cells: Cells) -> Result<Modules<'a>, DtError> {
    let mut kernel = None;
    let mut ramdisk = None;
    for node in chosen.children().filter(|n| is_multiboot_module(*n)) {
        if kernel.is_none() && has_compatible(node, "multiboot,kernel") {
            let range = first_reg(node, cells, "kernel module reg")?;
            kernel = Some(Module {
                range,
                bootargs: str_prop(node, "bootargs").unwrap_or(""),
            });
        } else if ramdisk.is_none() && has_compatible(node, "multiboot,ramdisk") {
            ramdisk = Some(first_reg(node, cells, "ramdisk module reg")?);
        }
    }
    Ok((kernel, ramdisk))
}
