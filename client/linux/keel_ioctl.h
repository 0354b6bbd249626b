/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note OR MIT */
/*
 * keel_ioctl.h - the user interface of the keel Linux driver (/dev/keel).
 *
 * The driver (client/linux/keel.c) turns the host side of the keel
 * hypercall ABI (shared/ABI.md) into ioctls on a character device. Every VM
 * belongs to the open file that created it: closing the file (or the death
 * of the process holding it) destroys its VMs and takes back their memory.
 *
 * Memory is named as the ABI names it: guest IPAs in bytes, host pages by
 * pfn = physical address >> 12. A VMM never chooses host pages: the driver
 * allocates them (physically contiguous, 2 MiB-aligned where it can so
 * that keel maps 2 MiB blocks), takes them out of Linux's hands, donates
 * or shares them, and frees them only after keel has given them back.
 *
 * Errors: every ioctl returns 0 or -1 with errno. The driver's own checks
 * give EINVAL (bad sizes, alignment, reserved fields not 0, unknown flags),
 * EFAULT (bad user pointers), ENOENT (no such VM in this file), EEXIST
 * (an IPA range that overlaps one given before), ENOSPC (VM_CREATE past
 * keel's max_vms), ENOTTY (unknown ioctl); keel's statuses map as keel_status_to_errno() does:
 * NOT_SUPPORTED -> EOPNOTSUPP, INVALID_PARAMETER -> EINVAL, DENIED -> EPERM,
 * NO_MEMORY -> ENOMEM, BUSY -> EBUSY.
 */
#ifndef KEEL_IOCTL_H
#define KEEL_IOCTL_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/ioctl.h>
#else
#include <stdint.h>
#include <sys/ioctl.h>
typedef uint64_t __u64;
typedef uint32_t __u32;
#endif

#define KEEL_DEVICE		"/dev/keel"
#define KEEL_IOC_MAGIC		0xEE

/* KEEL_IOC_INFO: what the driver found, and what it holds now. */
struct keel_info {
	__u64 revision_major;
	__u64 revision_minor;
	__u64 features;		/* FEATURES bitmap */
	__u64 block_sizes;	/* HYP_FEATURES x1 (KEEL_BLOCK_* bits) */
	__u64 max_vms;
	__u64 max_vcpus;
	__u64 vms;		/* live VMs of every open file */
	__u64 guest_pages;	/* 4K pages held for guests (donated or shared) */
	__u64 pool_pages;	/* pages donated to keel's pool (HOST_DONATE_HYP) */
	__u64 leaked_pages;	/* pages keel refused to give back (never freed) */
	__u64 carveout_base;	/* physical range of the carveout, 0 if none */
	__u64 carveout_size;
	__u64 carveout_free;	/* bytes of it not in use */
};

/* KEEL_IOC_MEM_STATE: MEM_STATE of one host page. */
struct keel_mem_state_arg {
	__u64 pfn;		/* in */
	__u64 owner;		/* out: KEEL_OWNER_* or a VM handle */
	__u64 state;		/* out: the host's view, KEEL_PAGE_* */
	__u64 map_size;		/* out: bytes of the host stage-2 mapping */
};

/* KEEL_IOC_HYP_STATS: one HYP_STATS counter. */
struct keel_stats_arg {
	__u64 index;		/* in: KEEL_STAT_* */
	__u64 value;		/* out */
};

/* KEEL_IOC_VM_CREATE. */
struct keel_vm_create_arg {
	__u64 nr_vcpus;		/* in: 1..max_vcpus */
	__u64 flags;		/* in: 0 */
	__u64 handle;		/* out: the VM's handle (KEEL_VM_HANDLE_BASE + n) */
};

/* KEEL_IOC_VCPU_INIT. */
struct keel_vcpu_init_arg {
	__u64 handle;
	__u64 vcpu;
	__u64 entry;		/* IPA where the vCPU starts, EL1h, MMU off */
	__u64 x0;
};

/*
 * KEEL_IOC_VCPU_IRQ: KEEL_VCPU_IRQ, an interrupt for a vCPU from its next
 * run: EBUSY while the vCPU runs (stop its run first: a signal to the
 * thread in KEEL_IOC_VCPU_RUN) or while 32 interrupts wait for it; EINVAL
 * for a bad vCPU, INTID (not 27, the virtual timer's) or priority.
 */
struct keel_vcpu_irq_arg {
	__u64 handle;
	__u64 vcpu;
	__u64 intid;		/* 0..1019: SGI, PPI or SPI */
	__u64 priority;		/* 0..255 */
};

/*
 * KEEL_IOC_VCPU_RUN: runs the vCPU until an exit the VMM must see.
 * Interrupt exits are handled in the driver (the vCPU runs again), except
 * when a signal is pending: then the ioctl returns 0 with reason
 * KEEL_EXIT_IRQ, and the next run needs no completion. completion is the
 * ABI's: the value of an MMIO read, or x0 after a HYPERCALL exit.
 */
struct keel_vcpu_run_arg {
	__u64 handle;		/* in */
	__u64 vcpu;		/* in */
	__u64 completion;	/* in */
	__u64 reason;		/* out: KEEL_EXIT_* */
	__u64 x2, x3, x4;	/* out: the exit's details */
};

/* Where guest memory comes from (keel_mem_arg.flags). */
#define KEEL_MEM_CARVEOUT	(1ULL << 0)	/* from the carveout= range, not Linux's pages */
#define KEEL_MEM_FLAGS		KEEL_MEM_CARVEOUT

/*
 * KEEL_IOC_VM_DONATE: size bytes of new memory become the guest's private
 * memory at ipa (both 4 KiB multiples, ipa 2 MiB aligned for 2 MiB blocks).
 * The first src_len bytes are copied from src (the guest image), the rest
 * is zero. KEEL_IOC_VM_SHARE: the same, but the memory stays the host's and
 * is lent to the guest (VM_SHARE); read and write it with KEEL_IOC_VM_RW.
 */
struct keel_mem_arg {
	__u64 handle;		/* in */
	__u64 ipa;		/* in */
	__u64 size;		/* in */
	__u64 src;		/* in: user address of the initial contents, or 0 */
	__u64 src_len;		/* in: <= size */
	__u64 flags;		/* in: KEEL_MEM_* */
	__u64 hypercalls;	/* out: hypercalls the driver made for it */
	__u64 runs;		/* out: physically contiguous runs it is made of */
};

/* KEEL_IOC_VM_UNSHARE: a range given with KEEL_IOC_VM_SHARE, back and freed. */
struct keel_range_arg {
	__u64 handle;
	__u64 ipa;		/* the start of a KEEL_IOC_VM_SHARE range */
	__u64 size;		/* its size */
};

/* KEEL_IOC_VM_MEM_STATE: VM_MEM_STATE of one guest IPA. */
struct keel_vm_mem_state_arg {
	__u64 handle;		/* in */
	__u64 ipa;		/* in */
	__u64 pfn;		/* out */
	__u64 state;		/* out: the guest's view, KEEL_PAGE_* */
	__u64 map_size;		/* out: bytes of the guest stage-2 mapping */
};

/*
 * KEEL_IOC_VM_RW: copies between a user buffer and guest memory the host
 * may touch: ranges it lent (KEEL_IOC_VM_SHARE), and pages the guest shared
 * with it (MEM_SHARE), which the driver pins around the copy so that the
 * guest cannot take them back meanwhile. A private page gives EPERM.
 */
#define KEEL_RW_WRITE		(1ULL << 0)
struct keel_rw_arg {
	__u64 handle;
	__u64 ipa;
	__u64 buf;		/* user address */
	__u64 len;		/* at most 1 MiB */
	__u64 flags;		/* KEEL_RW_WRITE: buf -> guest; else guest -> buf */
};

/*
 * KEEL_IOC_PIN / KEEL_IOC_UNPIN: HOST_PIN / HOST_UNPIN of pages the guest
 * shared with the host, named by IPA; the driver drops pins still held
 * when the VM goes.
 */
struct keel_pin_arg {
	__u64 handle;
	__u64 ipa;
	__u64 nr;		/* 4K pages, 1..512 */
};

/*
 * KEEL_IOC_RECLAIM: HOST_RECLAIM of everything the driver may take back:
 * free pages of keel's pool it donated, and pages of this file's destroyed
 * VMs that keel refused before. out: pages taken back.
 */
struct keel_reclaim_arg {
	__u64 pages;		/* out */
};

#define KEEL_IOC_INFO		_IOR(KEEL_IOC_MAGIC, 0x00, struct keel_info)
#define KEEL_IOC_MEM_STATE	_IOWR(KEEL_IOC_MAGIC, 0x01, struct keel_mem_state_arg)
#define KEEL_IOC_HYP_STATS	_IOWR(KEEL_IOC_MAGIC, 0x02, struct keel_stats_arg)
#define KEEL_IOC_VM_CREATE	_IOWR(KEEL_IOC_MAGIC, 0x10, struct keel_vm_create_arg)
#define KEEL_IOC_VM_DESTROY	_IOW(KEEL_IOC_MAGIC, 0x11, __u64)
#define KEEL_IOC_VCPU_INIT	_IOW(KEEL_IOC_MAGIC, 0x12, struct keel_vcpu_init_arg)
#define KEEL_IOC_VCPU_RUN	_IOWR(KEEL_IOC_MAGIC, 0x13, struct keel_vcpu_run_arg)
#define KEEL_IOC_VM_DONATE	_IOWR(KEEL_IOC_MAGIC, 0x14, struct keel_mem_arg)
#define KEEL_IOC_VM_SHARE	_IOWR(KEEL_IOC_MAGIC, 0x15, struct keel_mem_arg)
#define KEEL_IOC_VM_UNSHARE	_IOW(KEEL_IOC_MAGIC, 0x16, struct keel_range_arg)
#define KEEL_IOC_VM_MEM_STATE	_IOWR(KEEL_IOC_MAGIC, 0x17, struct keel_vm_mem_state_arg)
#define KEEL_IOC_PIN		_IOW(KEEL_IOC_MAGIC, 0x18, struct keel_pin_arg)
#define KEEL_IOC_UNPIN		_IOW(KEEL_IOC_MAGIC, 0x19, struct keel_pin_arg)
#define KEEL_IOC_VM_RW		_IOW(KEEL_IOC_MAGIC, 0x1a, struct keel_rw_arg)
#define KEEL_IOC_RECLAIM	_IOR(KEEL_IOC_MAGIC, 0x1b, struct keel_reclaim_arg)
#define KEEL_IOC_VCPU_IRQ	_IOW(KEEL_IOC_MAGIC, 0x1c, struct keel_vcpu_irq_arg)

#endif /* KEEL_IOCTL_H */
