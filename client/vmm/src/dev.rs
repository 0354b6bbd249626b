//! /dev/keel: the ioctls of client/linux/keel_ioctl.h, one method each.
//! The structs are that header's, field for field (all u64).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

extern "C" {
    fn ioctl(fd: i32, request: i32, ...) -> i32;
}

const MAGIC: u32 = 0xEE;
const WRITE: u32 = 1; // _IOC_WRITE: user -> kernel
const READ: u32 = 2; // _IOC_READ: kernel -> user

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (MAGIC << 8) | nr
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct Info {
    pub revision_major: u64,
    pub revision_minor: u64,
    pub features: u64,
    pub block_sizes: u64,
    pub max_vms: u64,
    pub max_vcpus: u64,
    pub vms: u64,
    pub guest_pages: u64,
    pub pool_pages: u64,
    pub leaked_pages: u64,
    pub carveout_base: u64,
    pub carveout_size: u64,
    pub carveout_free: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct MemState {
    pub pfn: u64,
    pub owner: u64,
    pub state: u64,
    pub map_size: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub index: u64,
    pub value: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct VmCreate {
    pub nr_vcpus: u64,
    pub flags: u64,
    pub handle: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct VcpuIrq {
    pub handle: u64,
    pub vcpu: u64,
    pub intid: u64,
    pub priority: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct VcpuInit {
    pub handle: u64,
    pub vcpu: u64,
    pub entry: u64,
    pub x0: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct VcpuRun {
    pub handle: u64,
    pub vcpu: u64,
    pub completion: u64,
    pub reason: u64,
    pub x2: u64,
    pub x3: u64,
    pub x4: u64,
}

pub const MEM_CARVEOUT: u64 = 1;

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct Mem {
    pub handle: u64,
    pub ipa: u64,
    pub size: u64,
    pub src: u64,
    pub src_len: u64,
    pub flags: u64,
    pub hypercalls: u64,
    pub runs: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct Range {
    pub handle: u64,
    pub ipa: u64,
    pub size: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct VmMemState {
    pub handle: u64,
    pub ipa: u64,
    pub pfn: u64,
    pub state: u64,
    pub map_size: u64,
}

pub const RW_WRITE: u64 = 1;

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct Rw {
    pub handle: u64,
    pub ipa: u64,
    pub buf: u64,
    pub len: u64,
    pub flags: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct Pin {
    pub handle: u64,
    pub ipa: u64,
    pub nr: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct Reclaim {
    pub pages: u64,
}

/// A request number of the driver's type that it does not define.
pub const fn ioc_any(nr: u32) -> u32 {
    ioc(READ | WRITE, nr, 8)
}

use core::mem::size_of;
pub const IOC_INFO: u32 = ioc(READ, 0x00, size_of::<Info>());
pub const IOC_MEM_STATE: u32 = ioc(READ | WRITE, 0x01, size_of::<MemState>());
pub const IOC_HYP_STATS: u32 = ioc(READ | WRITE, 0x02, size_of::<Stats>());
pub const IOC_VM_CREATE: u32 = ioc(READ | WRITE, 0x10, size_of::<VmCreate>());
pub const IOC_VM_DESTROY: u32 = ioc(WRITE, 0x11, size_of::<u64>());
pub const IOC_VCPU_INIT: u32 = ioc(WRITE, 0x12, size_of::<VcpuInit>());
pub const IOC_VCPU_RUN: u32 = ioc(READ | WRITE, 0x13, size_of::<VcpuRun>());
pub const IOC_VM_DONATE: u32 = ioc(READ | WRITE, 0x14, size_of::<Mem>());
pub const IOC_VM_SHARE: u32 = ioc(READ | WRITE, 0x15, size_of::<Mem>());
pub const IOC_VM_UNSHARE: u32 = ioc(WRITE, 0x16, size_of::<Range>());
pub const IOC_VM_MEM_STATE: u32 = ioc(READ | WRITE, 0x17, size_of::<VmMemState>());
pub const IOC_PIN: u32 = ioc(WRITE, 0x18, size_of::<Pin>());
pub const IOC_UNPIN: u32 = ioc(WRITE, 0x19, size_of::<Pin>());
pub const IOC_VCPU_IRQ: u32 = ioc(WRITE, 0x1c, size_of::<VcpuIrq>());
pub const IOC_VM_RW: u32 = ioc(WRITE, 0x1a, size_of::<Rw>());
pub const IOC_RECLAIM: u32 = ioc(READ, 0x1b, size_of::<Reclaim>());

/// An open /dev/keel. Dropping it (or the process dying) destroys its VMs.
pub struct Keel {
    file: File,
}

impl Keel {
    pub fn open() -> io::Result<Keel> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/keel")?;
        Ok(Keel { file })
    }

    /// The raw ioctl, for argument checks: `arg` is passed as it is.
    pub fn raw(&self, request: u32, arg: u64) -> io::Result<()> {
        // SAFETY: an ioctl on our own file; the driver validates `arg`
        // (a bad pointer is EFAULT, not a crash).
        let r = unsafe { ioctl(self.file.as_raw_fd(), request as i32, arg) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn call<T>(&self, request: u32, arg: &mut T) -> io::Result<()> {
        self.raw(request, arg as *mut T as u64)
    }

    pub fn info(&self) -> io::Result<Info> {
        let mut a = Info::default();
        self.call(IOC_INFO, &mut a).map(|_| a)
    }

    pub fn mem_state(&self, pfn: u64) -> io::Result<MemState> {
        let mut a = MemState {
            pfn,
            ..Default::default()
        };
        self.call(IOC_MEM_STATE, &mut a).map(|_| a)
    }

    pub fn hyp_stat(&self, index: u64) -> io::Result<u64> {
        let mut a = Stats { index, value: 0 };
        self.call(IOC_HYP_STATS, &mut a).map(|_| a.value)
    }

    pub fn vm_create(&self, nr_vcpus: u64) -> io::Result<u64> {
        let mut a = VmCreate {
            nr_vcpus,
            ..Default::default()
        };
        self.call(IOC_VM_CREATE, &mut a).map(|_| a.handle)
    }

    pub fn vm_destroy(&self, handle: u64) -> io::Result<()> {
        let mut h = handle;
        self.call(IOC_VM_DESTROY, &mut h)
    }

    pub fn vcpu_init(&self, handle: u64, vcpu: u64, entry: u64, x0: u64) -> io::Result<()> {
        let mut a = VcpuInit {
            handle,
            vcpu,
            entry,
            x0,
        };
        self.call(IOC_VCPU_INIT, &mut a)
    }

    /// KEEL_VCPU_IRQ: `intid` pending for vCPU `vcpu` from its next run.
    pub fn vcpu_irq(&self, handle: u64, vcpu: u64, intid: u64, priority: u64) -> io::Result<()> {
        let mut a = VcpuIrq {
            handle,
            vcpu,
            intid,
            priority,
        };
        self.call(IOC_VCPU_IRQ, &mut a)
    }

    pub fn vcpu_run(&self, handle: u64, vcpu: u64, completion: u64) -> io::Result<VcpuRun> {
        let mut a = VcpuRun {
            handle,
            vcpu,
            completion,
            ..Default::default()
        };
        self.call(IOC_VCPU_RUN, &mut a).map(|_| a)
    }

    /// New memory at ipa: donated (private) or shared (the host's, lent).
    pub fn give(
        &self,
        share: bool,
        handle: u64,
        ipa: u64,
        size: u64,
        init: &[u8],
        flags: u64,
    ) -> io::Result<Mem> {
        let mut a = Mem {
            handle,
            ipa,
            size,
            src: if init.is_empty() {
                0
            } else {
                init.as_ptr() as u64
            },
            src_len: init.len() as u64,
            flags,
            ..Default::default()
        };
        let req = if share { IOC_VM_SHARE } else { IOC_VM_DONATE };
        self.call(req, &mut a).map(|_| a)
    }

    pub fn vm_mem_state(&self, handle: u64, ipa: u64) -> io::Result<VmMemState> {
        let mut a = VmMemState {
            handle,
            ipa,
            ..Default::default()
        };
        self.call(IOC_VM_MEM_STATE, &mut a).map(|_| a)
    }

    pub fn read(&self, handle: u64, ipa: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut a = Rw {
            handle,
            ipa,
            buf: buf.as_mut_ptr() as u64,
            len: buf.len() as u64,
            flags: 0,
        };
        self.call(IOC_VM_RW, &mut a)
    }

    pub fn write(&self, handle: u64, ipa: u64, buf: &[u8]) -> io::Result<()> {
        let mut a = Rw {
            handle,
            ipa,
            buf: buf.as_ptr() as u64,
            len: buf.len() as u64,
            flags: RW_WRITE,
        };
        self.call(IOC_VM_RW, &mut a)
    }

    pub fn pin(&self, pin: bool, handle: u64, ipa: u64, nr: u64) -> io::Result<()> {
        let mut a = Pin { handle, ipa, nr };
        self.call(if pin { IOC_PIN } else { IOC_UNPIN }, &mut a)
    }

    pub fn reclaim(&self) -> io::Result<u64> {
        let mut a = Reclaim::default();
        self.call(IOC_RECLAIM, &mut a).map(|_| a.pages)
    }
}
