//! Host tests of the boot device tree code, on DTBs dumped from QEMU's virt
//! machine (`boot/tests/fixtures/virt-*.dtb`) and one written by hand
//! (`two-banks.dts`).

use super::blob::{Blob, FDT_BEGIN_NODE, FDT_NOP};
use super::*;

const VIRT_2G: &[u8] = include_bytes!("../../tests/fixtures/virt-2g.dtb");
const VIRT_4G_MODULES: &[u8] = include_bytes!("../../tests/fixtures/virt-4g-modules.dtb");
const TWO_BANKS: &[u8] = include_bytes!("../../tests/fixtures/two-banks.dtb");

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn range(start: u64, size: u64) -> PhysRange {
    PhysRange::new(start, start + size)
}

#[test]
fn parses_qemu_virt_with_guest_loader_modules() {
    let info = BootInfo::parse(VIRT_4G_MODULES).unwrap();
    assert_eq!(info.ram.as_slice(), &[range(0x4000_0000, 4 * GIB)]);
    assert_eq!(info.uart, range(0x0900_0000, 0x1000));
    assert_eq!(info.gic.distributor, range(0x0800_0000, 0x1_0000));
    assert_eq!(
        info.gic.redistributors.as_slice(),
        &[range(0x080a_0000, 0xf6_0000)]
    );
    assert_eq!(
        info.psci,
        Psci {
            method: PsciMethod::Smc,
            version: PsciVersion::V1_0
        }
    );
    let cpus: Vec<_> = info
        .cpus
        .iter()
        .map(|c| (c.mpidr, c.enable_method))
        .collect();
    assert_eq!(
        cpus,
        [0, 1, 2, 3]
            .map(|mpidr| (mpidr, EnableMethod::Psci))
            .to_vec(),
    );
    assert_eq!(info.bootargs, "keel.log=debug");
    // The module files were 300000 and 100000 bytes long.
    assert_eq!(
        info.kernel,
        Module {
            range: range(0x4800_0000, 300_000),
            bootargs: "suite=boot console=ttyAMA0"
        }
    );
    assert_eq!(info.ramdisk, Some(range(0x4900_0000, 100_000)));
}

#[test]
fn a_tree_without_a_kernel_module_is_refused() {
    assert_eq!(BootInfo::parse(VIRT_2G), Err(DtError::NoKernelModule));
}

#[test]
fn parses_two_banks_aliases_spin_table_and_one_cell_chosen() {
    let info = BootInfo::parse(TWO_BANKS).unwrap();
    assert_eq!(
        info.ram.as_slice(),
        &[
            range(0x8000_0000, GIB),
            range(0x8_8000_0000, 512 * MIB),
            range(0x8_c000_0000, 256 * MIB),
        ]
    );
    // stdout-path names the second UART through an alias, with options.
    assert_eq!(info.uart, range(0x1c09_0000, 0x1000));
    assert_eq!(info.gic.distributor, range(0x2f00_0000, 0x1_0000));
    assert_eq!(
        info.gic.redistributors.as_slice(),
        &[range(0x2f10_0000, MIB), range(0x2f30_0000, MIB)]
    );
    assert_eq!(
        info.psci,
        Psci {
            method: PsciMethod::Hvc,
            version: PsciVersion::V0_2
        }
    );
    let spin = EnableMethod::SpinTable {
        release_addr: 0x8000_fff8,
    };
    assert_eq!(
        info.cpus.as_slice(),
        &[
            Cpu {
                mpidr: 0,
                enable_method: spin
            },
            Cpu {
                mpidr: 0x100,
                enable_method: spin
            }
        ]
    );
    assert_eq!(info.bootargs, "keel.log=info");
    assert_eq!(
        info.kernel,
        Module {
            range: range(0x8200_0000, 16 * MIB),
            bootargs: "console=ttyAMA0 root=/dev/ram"
        }
    );
    assert_eq!(info.ramdisk, Some(range(0x8300_0000, 8 * MIB)));
}

#[test]
fn mmio_windows_are_the_complement_of_ram() {
    let info = BootInfo::parse(TWO_BANKS).unwrap();
    let limit = 1 << 40;
    assert_eq!(
        info.mmio_windows(limit).as_slice(),
        &[
            PhysRange::new(0, 0x8000_0000),
            PhysRange::new(0xc000_0000, 0x8_8000_0000),
            PhysRange::new(0x8_a000_0000, 0x8_c000_0000),
            PhysRange::new(0x8_d000_0000, limit),
        ]
    );
    // A limit inside RAM leaves only the windows below it.
    assert_eq!(
        info.mmio_windows(0x9000_0000).as_slice(),
        &[PhysRange::new(0, 0x8000_0000)]
    );
    assert!(info.ram_contains(range(0x8_8000_0000, 4096)));
    assert!(!info.ram_contains(range(0xbfff_f000, 0x2000)));
}

#[test]
fn errors_display_a_reason() {
    assert_eq!(
        DtError::Malformed("bad magic").to_string(),
        "malformed device tree: bad magic"
    );
    assert_eq!(DtError::TooMany("CPUs").to_string(), "too many CPUs");
}

// ---- Building test trees with our own writer ----

/// A node of a test tree: name, properties, children.
struct TestNode {
    name: &'static str,
    props: Vec<(&'static str, Vec<u8>)>,
    children: Vec<TestNode>,
}

fn node(
    name: &'static str,
    props: Vec<(&'static str, Vec<u8>)>,
    children: Vec<TestNode>,
) -> TestNode {
    TestNode {
        name,
        props,
        children,
    }
}

fn cells(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

fn text(s: &str) -> Vec<u8> {
    let mut bytes = s.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

fn emit(writer: &mut FdtWriter<'_>, node: &TestNode) {
    writer.begin_node(node.name).unwrap();
    for (name, value) in &node.props {
        writer.property(name, value).unwrap();
    }
    for child in &node.children {
        emit(writer, child);
    }
    writer.end_node().unwrap();
}

fn build(root: &TestNode) -> Vec<u8> {
    let mut buf = vec![0; 64 * 1024];
    let mut writer = FdtWriter::new(&mut buf, [(0x1000, 0x2000)], 0).unwrap();
    emit(&mut writer, root);
    let size = writer.finish().unwrap();
    buf.truncate(size);
    buf
}

/// The smallest tree `BootInfo::parse` accepts, with the given RAM `reg`
/// (two address and two size cells) and extra /chosen children.
fn minimal_tree(memory_reg: &[u32], cpu_count: usize) -> TestNode {
    let cpus = (0..cpu_count)
        .map(|i| {
            node(
                "cpu",
                vec![("reg", cells(&[i as u32])), ("enable-method", text("psci"))],
                vec![],
            )
        })
        .collect();
    node(
        "",
        vec![
            ("#address-cells", cells(&[2])),
            ("#size-cells", cells(&[2])),
        ],
        vec![
            node("memory@40000000", vec![("reg", cells(memory_reg))], vec![]),
            node(
                "cpus",
                vec![
                    ("#address-cells", cells(&[1])),
                    ("#size-cells", cells(&[0])),
                ],
                cpus,
            ),
            node(
                "psci",
                vec![
                    ("compatible", text("arm,psci-1.0")),
                    ("method", text("hvc")),
                ],
                vec![],
            ),
            node(
                "uart@9000000",
                vec![
                    ("compatible", text("arm,pl011")),
                    ("reg", cells(&[0, 0x900_0000, 0, 0x1000])),
                ],
                vec![],
            ),
            node(
                "gic@8000000",
                vec![
                    ("compatible", text("arm,gic-v3")),
                    (
                        "reg",
                        cells(&[0, 0x800_0000, 0, 0x1_0000, 0, 0x80a_0000, 0, 0xf6_0000]),
                    ),
                ],
                vec![],
            ),
            node(
                "chosen",
                vec![],
                vec![node(
                    "module@48000000",
                    vec![
                        ("compatible", text("multiboot,kernel")),
                        ("reg", cells(&[0, 0x4800_0000, 0, 0x1000])),
                    ],
                    vec![],
                )],
            ),
        ],
    )
}

#[test]
fn writer_output_is_read_back_by_the_fdt_crate() {
    let dtb = build(&minimal_tree(&[0, 0x4000_0000, 0, 0x1000_0000], 2));
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    let reservations: Vec<_> = fdt
        .memory_reservations()
        .map(|r| (r.address() as u64, r.size()))
        .collect();
    assert_eq!(reservations, [(0x1000, 0x2000)]);
    assert_eq!(fdt.cpus().count(), 2);
    let info = BootInfo::parse(&dtb).unwrap();
    assert_eq!(info.ram.as_slice(), &[range(0x4000_0000, 256 * MIB)]);
    assert_eq!(info.bootargs, "");
    assert_eq!(info.ramdisk, None);
    // Each property name is stored once.
    let names: Vec<_> = fdt.strings().collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(names.len(), unique.len(), "{names:?}");
}

#[test]
fn too_many_ram_regions_or_cpus_are_refused() {
    let reg: Vec<u32> = (0..9u32)
        .flat_map(|i| [0, 0x4000_0000 + i * 0x100_0000, 0, 0x1000])
        .collect();
    assert_eq!(
        BootInfo::parse(&build(&minimal_tree(&reg, 1))),
        Err(DtError::TooMany("RAM regions"))
    );
    let ok = build(&minimal_tree(&[0, 0x4000_0000, 0, 0x1000], MAX_CPUS));
    assert_eq!(BootInfo::parse(&ok).unwrap().cpus.len(), MAX_CPUS);
    assert_eq!(
        BootInfo::parse(&build(&minimal_tree(
            &[0, 0x4000_0000, 0, 0x1000],
            MAX_CPUS + 1
        ))),
        Err(DtError::TooMany("CPUs"))
    );
}

#[test]
fn missing_pieces_are_named() {
    let overlapping = [0, 0x4000_0000, 0, 0x2000, 0, 0x4000_1000, 0, 0x1000];
    assert_eq!(
        BootInfo::parse(&build(&minimal_tree(&overlapping, 1))),
        Err(DtError::OverlappingRam)
    );
    assert_eq!(
        BootInfo::parse(&build(&minimal_tree(&[], 1))),
        Err(DtError::NoMemory)
    );
    assert_eq!(
        BootInfo::parse(&build(&minimal_tree(&[0, 0x4000_0000, 0, 0x1000], 0))),
        Err(DtError::NoCpus)
    );

    let without = |name: &str| {
        let mut tree = minimal_tree(&[0, 0x4000_0000, 0, 0x1000], 1);
        tree.children.retain(|c| c.name != name);
        BootInfo::parse(&build(&tree)).map(|_| ())
    };
    assert_eq!(without("uart@9000000"), Err(DtError::NoUart));
    assert_eq!(without("gic@8000000"), Err(DtError::NoGic));
    assert_eq!(without("psci"), Err(DtError::NoPsci));
    assert_eq!(without("chosen"), Err(DtError::NoKernelModule));
    assert_eq!(without("memory@40000000"), Err(DtError::NoMemory));
}

#[test]
fn an_alias_naming_itself_does_not_hang() {
    // The fdt crate's find_node falls back to aliases and would recurse on
    // this forever; our lookups never use that fallback.
    let mut tree = minimal_tree(&[0, 0x4000_0000, 0, 0x1000], 1);
    tree.children
        .push(node("aliases", vec![("serial0", text("serial0"))], vec![]));
    let chosen = tree
        .children
        .iter_mut()
        .find(|c| c.name == "chosen")
        .unwrap();
    chosen.props.push(("stdout-path", text("serial0")));
    let dtb = build(&tree);
    let info = BootInfo::parse(&dtb).unwrap();
    assert_eq!(info.uart, range(0x900_0000, 0x1000));
}

// ---- The host's device tree ----

/// Every property of a tree, as (node path, property name, value), read by
/// the `fdt` crate, so the writer is checked by an independent reader.
fn flatten(dtb: &[u8]) -> Vec<(String, String, Vec<u8>)> {
    fn walk(
        node: fdt::node::FdtNode<'_, '_>,
        path: &str,
        out: &mut Vec<(String, String, Vec<u8>)>,
    ) {
        for prop in node.properties() {
            out.push((path.to_string(), prop.name.to_string(), prop.value.to_vec()));
        }
        // Nodes without properties still count.
        out.push((path.to_string(), String::new(), Vec::new()));
        for child in node.children() {
            walk(child, &format!("{path}/{}", child.name), out);
        }
    }
    let fdt = fdt::Fdt::new(dtb).unwrap();
    let mut out = Vec::new();
    walk(fdt.find_node("/").unwrap(), "", &mut out);
    out
}

fn write_host(boot: &[u8], edits: &HostDtbEdits<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; boot.len() + 4096];
    let size = write_host_dtb(boot, &mut buf, edits).unwrap();
    buf.truncate(size);
    assert!(Blob::check(&buf).is_ok());
    buf
}

/// The RAM the host's tree shows, entry by entry, with `address_cells` +
/// `size_cells` as in `reg`.
fn memory_entries(dtb: &[u8]) -> Vec<PhysRange> {
    let fdt = fdt::Fdt::new(dtb).unwrap();
    let root = fdt.find_node("/").unwrap();
    let cells = Cells::of(root);
    let mut out = Vec::new();
    for memory in root.children().filter(|n| is_memory_node(n.name)) {
        let reg = memory.property("reg").unwrap().value;
        out.extend(
            reg_entries(reg, cells, "test")
                .unwrap()
                .map(|(a, s)| range(a, s)),
        );
    }
    out
}

fn host_edits(remove: &[PhysRange]) -> HostDtbEdits<'_> {
    HostDtbEdits {
        remove,
        bootargs: "console=ttyAMA0 rdinit=/init",
        initrd: None,
    }
}

#[test]
fn host_tree_of_qemu_virt_keeps_everything_but_the_edits() {
    let remove = [range(0x4020_0000, 64 * MIB)];
    let initrd = range(0x4900_0000, 100_000);
    let edits = HostDtbEdits {
        remove: &remove,
        bootargs: "suite=boot console=ttyAMA0",
        initrd: Some(initrd),
    };
    let host = write_host(VIRT_4G_MODULES, &edits);

    assert_eq!(
        memory_entries(&host),
        [
            PhysRange::new(0x4000_0000, 0x4020_0000),
            PhysRange::new(0x4420_0000, 0x1_4000_0000)
        ]
    );
    let fdt = fdt::Fdt::new(&host).unwrap();
    let chosen = fdt.find_node("/chosen").unwrap();
    assert_eq!(
        chosen.property("bootargs").unwrap().value,
        b"suite=boot console=ttyAMA0\0"
    );
    assert_eq!(
        chosen.property("linux,initrd-start").unwrap().value,
        0x4900_0000u64.to_be_bytes()
    );
    assert_eq!(
        chosen.property("linux,initrd-end").unwrap().value,
        (0x4900_0000u64 + 100_000).to_be_bytes()
    );
    assert_eq!(chosen.children().count(), 0);

    // Everything else is as it was, in the same order.
    let is_edited = |(path, name, _): &(String, String, Vec<u8>)| {
        path.starts_with("/chosen/module@")
            || (path == "/memory@40000000" && name == "reg")
            || (path == "/chosen"
                && matches!(
                    name.as_str(),
                    "bootargs" | "linux,initrd-start" | "linux,initrd-end"
                ))
    };
    let mut before = flatten(VIRT_4G_MODULES);
    let mut after = flatten(&host);
    before.retain(|p| !is_edited(p));
    after.retain(|p| !is_edited(p));
    assert_eq!(before, after);
    assert!(before.len() > 150, "the comparison covers the whole tree");
    assert_eq!(fdt.memory_reservations().count(), 0);
}

#[test]
fn host_tree_of_a_tree_without_modules_gains_chosen_properties() {
    let host = write_host(VIRT_2G, &host_edits(&[range(0x4000_0000, 32 * MIB)]));
    let fdt = fdt::Fdt::new(&host).unwrap();
    let chosen = fdt.find_node("/chosen").unwrap();
    assert_eq!(
        chosen.property("bootargs").unwrap().value,
        b"console=ttyAMA0 rdinit=/init\0"
    );
    assert!(chosen.property("linux,initrd-start").is_none());
    assert!(chosen.property("stdout-path").is_some());
}

#[test]
fn ram_removal_at_the_start_middle_end_and_whole() {
    let ram_end = 0x4000_0000 + 2 * GIB;
    let cases: [(&[PhysRange], &[PhysRange]); 6] = [
        (
            &[range(0x4000_0000, 16 * MIB)],
            &[PhysRange::new(0x4100_0000, ram_end)],
        ),
        (
            &[range(0x6000_0000, 16 * MIB)],
            &[
                PhysRange::new(0x4000_0000, 0x6000_0000),
                PhysRange::new(0x6100_0000, ram_end),
            ],
        ),
        (
            &[PhysRange::new(ram_end - 16 * MIB, ram_end)],
            &[PhysRange::new(0x4000_0000, ram_end - 16 * MIB)],
        ),
        (&[PhysRange::new(0, u64::MAX)], &[]),
        // Removals may overlap, come unsorted and reach outside RAM.
        (
            &[
                range(0x7000_0000, 32 * MIB),
                PhysRange::new(0, 0x4100_0000),
                range(0x6000_0000, 16 * MIB),
                range(0x7100_0000, 32 * MIB),
            ],
            &[
                PhysRange::new(0x4100_0000, 0x6000_0000),
                PhysRange::new(0x6100_0000, 0x7000_0000),
                PhysRange::new(0x7300_0000, ram_end),
            ],
        ),
        // Removing memory the tree does not have changes nothing.
        (
            &[range(0x1_0000_0000_0000, GIB)],
            &[PhysRange::new(0x4000_0000, ram_end)],
        ),
    ];
    for (remove, expected) in cases {
        let host = write_host(VIRT_2G, &host_edits(remove));
        assert_eq!(memory_entries(&host), expected, "removing {remove:x?}");
        // The node stays, with an empty reg when all its RAM is gone.
        assert!(fdt::Fdt::new(&host)
            .unwrap()
            .find_node("/memory@40000000")
            .is_some());
    }
}

#[test]
fn ram_removal_across_two_memory_nodes_keeps_memreserve() {
    // Removes the end of the first bank and the start of the second node's
    // first entry, and the whole of its second entry.
    let remove = [
        PhysRange::new(0xb000_0000, 0x8_9000_0000),
        range(0x8_c000_0000, 256 * MIB),
    ];
    let host = write_host(TWO_BANKS, &host_edits(&remove));
    assert_eq!(
        memory_entries(&host),
        [
            PhysRange::new(0x8000_0000, 0xb000_0000),
            PhysRange::new(0x8_9000_0000, 0x8_a000_0000)
        ]
    );
    let fdt = fdt::Fdt::new(&host).unwrap();
    let reservations: Vec<_> = fdt
        .memory_reservations()
        .map(|r| (r.address() as u64, r.size()))
        .collect();
    assert_eq!(
        reservations,
        [(0x8000_0000, 0x1_0000), (0x9000_0000, 0x2000)]
    );
    // The old initrd properties are replaced: here, by none.
    let chosen = fdt.find_node("/chosen").unwrap();
    assert!(chosen.property("linux,initrd-start").is_none());
    assert!(chosen.property("linux,initrd-end").is_none());
    assert_eq!(chosen.children().count(), 0);
    assert_eq!(
        chosen.property("#address-cells").unwrap().value,
        cells(&[1])
    );
}

#[test]
fn one_cell_memory_reg_stays_one_cell() {
    let mut tree = minimal_tree(&[], 1);
    tree.props = vec![
        ("#address-cells", cells(&[1])),
        ("#size-cells", cells(&[1])),
    ];
    tree.children[0].props = vec![(
        "reg",
        cells(&[0x4000_0000, 0x1000_0000, 0x8000_0000, 0x1000_0000]),
    )];
    let boot = build(&tree);
    let host = write_host(&boot, &host_edits(&[range(0x4800_0000, MIB)]));
    let fdt = fdt::Fdt::new(&host).unwrap();
    assert_eq!(
        fdt.find_node("/memory@40000000")
            .unwrap()
            .property("reg")
            .unwrap()
            .value,
        cells(&[
            0x4000_0000,
            0x800_0000,
            0x4810_0000,
            0x7f0_0000,
            0x8000_0000,
            0x1000_0000
        ])
    );
}

#[test]
fn host_tree_without_chosen_gets_one() {
    let mut tree = minimal_tree(&[0, 0x4000_0000, 0, 0x1000_0000], 1);
    tree.children.retain(|c| c.name != "chosen");
    let boot = build(&tree);
    let edits = HostDtbEdits {
        remove: &[],
        bootargs: "quiet",
        initrd: Some(range(0x4400_0000, MIB)),
    };
    let host = write_host(&boot, &edits);
    let fdt = fdt::Fdt::new(&host).unwrap();
    let chosen = fdt.find_node("/chosen").unwrap();
    assert_eq!(chosen.property("bootargs").unwrap().value, b"quiet\0");
    assert_eq!(
        chosen.property("linux,initrd-end").unwrap().value,
        0x4410_0000u64.to_be_bytes()
    );
}

#[test]
fn host_tree_is_deterministic_and_a_fixed_point() {
    let remove = [range(0x4000_0000, 16 * MIB)];
    let edits = host_edits(&remove);
    let once = write_host(VIRT_4G_MODULES, &edits);
    let twice = write_host(&once, &edits);
    assert_eq!(memory_entries(&once), memory_entries(&twice));
    assert_eq!(flatten(&once), flatten(&twice));
}

#[test]
fn a_small_buffer_is_an_error_at_every_size() {
    let edits = HostDtbEdits {
        remove: &[range(0x5000_0000, MIB)],
        bootargs: "x",
        initrd: Some(range(0x4900_0000, 4096)),
    };
    let needed = write_host(VIRT_4G_MODULES, &edits).len();
    let mut buf = vec![0u8; needed];
    for size in 0..needed {
        assert_eq!(
            write_host_dtb(VIRT_4G_MODULES, &mut buf[..size], &edits),
            Err(DtError::BufferTooSmall),
            "size {size}"
        );
    }
    assert_eq!(
        write_host_dtb(VIRT_4G_MODULES, &mut buf, &edits),
        Ok(needed)
    );
}

#[test]
fn the_size_bound_is_never_too_small() {
    let removals = [
        range(0x4000_0000, MIB),
        range(0x4800_0000, MIB),
        range(0x8_9000_0000, MIB),
    ];
    let long_bootargs = "x".repeat(1000);
    for boot in [VIRT_2G, VIRT_4G_MODULES, TWO_BANKS] {
        for bootargs in ["", "quiet", long_bootargs.as_str()] {
            for remove_count in 0..=removals.len() {
                let edits = HostDtbEdits {
                    remove: &removals[..remove_count],
                    bootargs,
                    initrd: Some(range(0x4900_0000, MIB)),
                };
                let bound = host_dtb_size_bound(boot, &edits).unwrap();
                let mut buf = vec![0u8; bound];
                let size = write_host_dtb(boot, &mut buf, &edits).unwrap();
                assert!(size <= bound && bound < size + 2048, "{size} {bound}");
            }
        }
    }
}

#[test]
fn bad_edits_are_refused() {
    let empty = [PhysRange::new(0x5000_0000, 0x5000_0000)];
    assert_eq!(
        write_host_dtb(VIRT_2G, &mut [0; 16384], &host_edits(&empty)),
        Err(DtError::BadArgument("empty range to remove"))
    );
}

// ---- Malformed input ----

/// Both entry points on arbitrary bytes: any result is fine, a panic is not.
fn exercise(bytes: &[u8]) -> bool {
    let parsed = BootInfo::parse(bytes).is_ok();
    let mut out = vec![0u8; bytes.len() + 4096];
    let written = write_host_dtb(bytes, &mut out, &host_edits(&[range(0x4000_0000, MIB)]));
    if let Ok(size) = written {
        // What we write, we can read.
        assert!(Blob::check(&out[..size]).is_ok());
        let _ = flatten(&out[..size]);
    }
    parsed
}

#[test]
fn every_truncation_is_an_error() {
    for fixture in [VIRT_4G_MODULES, TWO_BANKS] {
        for len in 0..fixture.len() {
            assert!(!exercise(&fixture[..len]), "length {len}");
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Every byte of the small tree, three ways; every byte of QEMU's one way.
    for (fixture, flips) in [
        (TWO_BANKS, &[0x01u8, 0x80, 0xff][..]),
        (VIRT_4G_MODULES, &[0xff][..]),
    ] {
        let mut bytes = fixture.to_vec();
        for offset in 0..bytes.len() {
            for &flip in flips {
                bytes[offset] ^= flip;
                exercise(&bytes);
                bytes[offset] ^= flip;
            }
        }
    }
}

#[test]
fn corrupted_structure_words_never_panic() {
    // Token-sized damage inside the structure block: tokens, lengths and
    // name offsets replaced with small and huge values.
    let mut bytes = TWO_BANKS.to_vec();
    let header = super::blob::Header::read(&bytes).unwrap();
    for offset in header.structs.step_by(4) {
        let original: [u8; 4] = bytes[offset..offset + 4].try_into().unwrap();
        for word in [
            0u32,
            1,
            2,
            3,
            4,
            5,
            9,
            0x100,
            0x7fff_ffff,
            0xffff_fffc,
            0xffff_ffff,
        ] {
            bytes[offset..offset + 4].copy_from_slice(&word.to_be_bytes());
            exercise(&bytes);
        }
        bytes[offset..offset + 4].copy_from_slice(&original);
    }
}

#[test]
fn random_bytes_never_panic() {
    // xorshift64*: deterministic, no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for round in 0..2000 {
        let len = (next() % 512) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && len >= 56 {
            // A plausible header over random contents gets further in.
            let words = [
                0xd00d_feed,
                len as u32,
                56,
                40 + (len as u32) / 2,
                40,
                17,
                16,
                0,
                (len as u32) / 4,
                (len as u32) / 4,
            ];
            for (i, word) in words.iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
            }
            bytes[40..56].fill(0);
        }
        exercise(&bytes);
    }
}

#[test]
fn specific_malformations_are_named() {
    let good = build(&minimal_tree(&[0, 0x4000_0000, 0, 0x1000], 1));
    let header = super::blob::Header::read(&good).unwrap();
    let structs = header.structs.start;

    let mut bad_magic = good.clone();
    bad_magic[0] = 0;
    assert_eq!(
        BootInfo::parse(&bad_magic),
        Err(DtError::Malformed("bad magic"))
    );

    let mut old_version = good.clone();
    old_version[20..24].copy_from_slice(&16u32.to_be_bytes());
    assert_eq!(
        BootInfo::parse(&old_version),
        Err(DtError::Malformed("unsupported FDT version"))
    );

    // A NOP where the root's BEGIN_NODE was is legal for the writer (it is
    // dropped) but refused by parse, for the fdt crate's sake.
    let mut with_nop = good.clone();
    with_nop.splice(structs..structs, FDT_NOP.to_be_bytes());
    let total = with_nop.len() as u32;
    with_nop[4..8].copy_from_slice(&total.to_be_bytes());
    let strings_offset = header.strings.start as u32 + 4;
    with_nop[12..16].copy_from_slice(&strings_offset.to_be_bytes());
    let struct_size = header.structs.len() as u32 + 4;
    with_nop[36..40].copy_from_slice(&struct_size.to_be_bytes());
    assert_eq!(
        BootInfo::parse(&with_nop),
        Err(DtError::Malformed("FDT_NOP tokens are not supported"))
    );
    let host = write_host(&with_nop, &host_edits(&[]));
    assert!(!Blob::check(&host).unwrap().has_nops);
    // strip_nops makes it parse, to the same result as the original.
    let mut stripped = with_nop.clone();
    assert_eq!(crate::dt::strip_nops(&mut stripped), Ok(true));
    assert!(!Blob::check(&stripped).unwrap().has_nops);
    assert_eq!(BootInfo::parse(&stripped), BootInfo::parse(&good));
    assert_eq!(
        crate::dt::strip_nops(&mut stripped),
        Ok(false),
        "nothing left to strip"
    );
    // NOPs between properties and nodes, several in a row.
    let mut many = good.clone();
    let before_end = header.structs.end - 4;
    many.splice(
        before_end..before_end,
        [FDT_NOP.to_be_bytes(), FDT_NOP.to_be_bytes()].concat(),
    );
    let total = many.len() as u32;
    many[4..8].copy_from_slice(&total.to_be_bytes());
    many[12..16].copy_from_slice(&(header.strings.start as u32 + 8).to_be_bytes());
    many[36..40].copy_from_slice(&(header.structs.len() as u32 + 8).to_be_bytes());
    assert!(Blob::check(&many).unwrap().has_nops);
    assert_eq!(crate::dt::strip_nops(&mut many), Ok(true));
    assert_eq!(BootInfo::parse(&many), BootInfo::parse(&good));

    let mut second_root = good.clone();
    // Turn FDT_END into a second BEGIN_NODE with an empty name (the padding
    // that follows is zero).
    let end = header.structs.end - 4;
    second_root[end..end + 4].copy_from_slice(&FDT_BEGIN_NODE.to_be_bytes());
    assert!(BootInfo::parse(&second_root).is_err());

    // A property after a child node, which the fdt crate would not see.
    let mut buf = vec![0u8; 4096];
    let mut writer = FdtWriter::new(&mut buf, [], 0).unwrap();
    writer.begin_node("").unwrap();
    writer.begin_node("child").unwrap();
    writer.end_node().unwrap();
    writer.property("late", b"").unwrap();
    writer.end_node().unwrap();
    let size = writer.finish().unwrap();
    assert_eq!(
        BootInfo::parse(&buf[..size]),
        Err(DtError::Malformed("property after a child node"))
    );
}

#[test]
fn deep_nesting_is_refused() {
    let mut buf = vec![0u8; 8192];
    let mut writer = FdtWriter::new(&mut buf, [], 0).unwrap();
    writer.begin_node("").unwrap();
    for _ in 0..blob::MAX_DEPTH {
        writer.begin_node("n").unwrap();
    }
    for _ in 0..=blob::MAX_DEPTH {
        writer.end_node().unwrap();
    }
    let size = writer.finish().unwrap();
    assert_eq!(
        BootInfo::parse(&buf[..size]),
        Err(DtError::Malformed("nodes nested too deep"))
    );
}

#[test]
fn writer_refuses_misuse() {
    let mut buf = vec![0u8; 256];
    let mut writer = FdtWriter::new(&mut buf, [], 0).unwrap();
    assert!(writer.property("x", b"").is_err());
    assert!(writer.end_node().is_err());
    writer.begin_node("").unwrap();
    assert!(writer.begin_node("a\0b").is_err());
    writer.end_node().unwrap();
    assert!(writer.begin_node("second-root").is_err());
    assert_eq!(writer.finish().map(|size| size > 40), Ok(true));
}
