/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * keel_hyp.h - the keel hypercall ABI, version 1.0, for C callers.
 *
 * Every number here is fixed by the contract (shared/ABI.md, restated in
 * docs/abi.md) and must equal the Rust client crate keel-abi
 * (client/rust/src/lib.rs), which the hypervisor itself builds from;
 * client/rust/tests/c_header.rs compares the two on every `cargo test`, and
 * tests/c/abi_check.c asserts the contract's numbers at compile time.
 *
 * Two ways to issue the calls, chosen at compile time:
 *  - inside the Linux kernel (__KERNEL__): through <linux/arm-smccc.h>,
 *    arm_smccc_1_1_hvc() for calls that return x0..x3 and arm_smccc_1_2_hvc()
 *    for VCPU_RUN, the one call that also returns x4 (arm64 only, Linux 6.1+);
 *  - anywhere else on aarch64 (bare-metal C, test kernels): GCC/Clang inline
 *    assembly issuing HVC #0, with only <stdint.h> needed.
 * On other architectures only the constants are defined, so host tools can
 * include the header too. Under __ASSEMBLY__ only the constants are defined.
 *
 * Conventions of the helpers: each returns the call's status (KEEL_STATUS_*,
 * as a long) and writes its results through out-parameters only when the
 * status is KEEL_STATUS_SUCCESS. The discovery calls (FEATURES, CALL_UID,
 * REVISION, HYP_MEMINFO) have no status: their values start at x0.
 *
 * Page frame numbers are always physical address >> 12 (KEEL_PFN_SHIFT),
 * whatever the kernel's own PAGE_SIZE: a 16K or 64K-page Linux must convert
 * with KEEL_PFN() rather than page_to_pfn().
 */
#ifndef KEEL_HYP_H
#define KEEL_HYP_H

/* ---- Function IDs (x0 of a call): vendor-hypervisor fast calls, SMC64 but
 *      for the three SMC32 discovery IDs 0x8600_xxxx ---- */

/* Discovery, for host and guest. */
#define KEEL_FN_FEATURES		0x86000000
#define KEEL_FN_CALL_UID		0x8600FF01
#define KEEL_FN_REVISION		0x8600FF03
#define KEEL_FN_HYP_FEATURES		0xC6000100

/* Host calls (NOT_SUPPORTED from a guest). */
#define KEEL_FN_HOST_SHARE_HYP		0xC6000101
#define KEEL_FN_HOST_UNSHARE_HYP	0xC6000102
#define KEEL_FN_HOST_DONATE_HYP		0xC6000103
#define KEEL_FN_HOST_RECLAIM		0xC6000104
#define KEEL_FN_MEM_STATE		0xC6000105
#define KEEL_FN_HYP_STATS		0xC6000106
#define KEEL_FN_VM_CREATE		0xC6000110
#define KEEL_FN_VM_DESTROY		0xC6000111
#define KEEL_FN_VCPU_INIT		0xC6000112
#define KEEL_FN_VCPU_RUN		0xC6000113
#define KEEL_FN_VM_DONATE		0xC6000114
#define KEEL_FN_VM_SHARE		0xC6000115
#define KEEL_FN_VM_UNSHARE		0xC6000116
#define KEEL_FN_VM_MEM_STATE		0xC6000117
#define KEEL_FN_HOST_PIN		0xC6000118
#define KEEL_FN_HOST_UNPIN		0xC6000119

/* Guest calls, pKVM-compatible. */
#define KEEL_FN_HYP_MEMINFO		0xC6000002
#define KEEL_FN_MEM_SHARE		0xC6000003
#define KEEL_FN_MEM_UNSHARE		0xC6000004
#define KEEL_FN_MEM_RELINQUISH		0xC6000009

/*
 * keel extensions, not in ABI 1.0, host only (for tests):
 * KEEL_CHECK_INVARIANTS runs the hypervisor's invariant checker;
 * KEEL_STATUS_DENIED with x1 = address of the first inconsistency.
 * KEEL_TABLE_PAGES: x1 = 0 (the host's stage 2) or a VM handle; x1 on
 * return = that stage 2's table pages, root included.
 */
#define KEEL_FN_KEEL_CHECK_INVARIANTS	0xC60001F0
#define KEEL_FN_KEEL_TABLE_PAGES	0xC60001F1
/*
 * keel extension, not in ABI 1.0, host only: KEEL_VCPU_IRQ makes an
 * interrupt pending for a vCPU (see keel_vcpu_irq).
 */
#define KEEL_FN_KEEL_VCPU_IRQ		0xC60001F2
/* keel extension: the guest's configuration of its timer's PPI (keel_vcpu_vtimer). */
#define KEEL_FN_KEEL_VCPU_VTIMER	0xC60001F3
/* The guest's virtual timer interrupt (PPI), which keel drives itself. */
#define KEEL_VTIMER_INTID		27

/* The function number of an ID (its low 16 bits), as FEATURES bits count it. */
#define KEEL_FN_NUM(id)			((id) & 0xFFFF)

/* ---- Statuses (x0 on return), signed ---- */
#define KEEL_STATUS_SUCCESS		0
#define KEEL_STATUS_NOT_SUPPORTED	(-1)
#define KEEL_STATUS_INVALID_PARAMETER	(-3)
#define KEEL_STATUS_DENIED		(-4)
#define KEEL_STATUS_NO_MEMORY		(-5)
#define KEEL_STATUS_BUSY		(-6)

/* ---- FEATURES: bit n set when vendor-hypervisor function n is implemented ---- */
#define KEEL_FEAT_FEATURES		(1 << 0)
#define KEEL_FEAT_HYP_MEMINFO		(1 << 2)
#define KEEL_FEAT_MEM_SHARE		(1 << 3)
#define KEEL_FEAT_MEM_UNSHARE		(1 << 4)
#define KEEL_FEAT_MEM_RELINQUISH	(1 << 9)
/* Everything the contract defines; a build may report fewer. */
#define KEEL_FEAT_ALL			(KEEL_FEAT_FEATURES | KEEL_FEAT_HYP_MEMINFO | \
					 KEEL_FEAT_MEM_SHARE | KEEL_FEAT_MEM_UNSHARE | \
					 KEEL_FEAT_MEM_RELINQUISH)
#ifndef __ASSEMBLY__
/* The FEATURES bit of a function ID: 0 for function numbers past 31,
 * which FEATURES does not report. */
#define KEEL_FEAT_BIT(id)		(KEEL_FN_NUM(id) < 32 ? 1ULL << KEEL_FN_NUM(id) : 0ULL)
#endif

/* ---- CALL_UID: the KVM vendor-hypervisor UID
 *      28b46fb6-2ec5-11e9-a9ca-4b564d003a74, in x0..x3 (SMCCC word order) ---- */
#define KEEL_UID_0			0xB66FB428
#define KEEL_UID_1			0xE911C52E
#define KEEL_UID_2			0x564BCAA9
#define KEEL_UID_3			0x743A004D

/* ---- REVISION ---- */
#define KEEL_REVISION_MAJOR		1
#define KEEL_REVISION_MINOR		0

/* ---- HYP_FEATURES x1: block sizes the stage-2 engine maps (bit n = 2^n bytes) ---- */
#define KEEL_BLOCK_4K			(1 << 12)
#define KEEL_BLOCK_2M			(1 << 21)
#define KEEL_BLOCK_1G			(1 << 30)
#define KEEL_BLOCK_SIZES		(KEEL_BLOCK_4K | KEEL_BLOCK_2M | KEEL_BLOCK_1G)

/* ---- Pages ---- */
#define KEEL_GRANULE			4096	/* HYP_MEMINFO; the unit of nr */
#define KEEL_PFN_SHIFT			12
#ifdef __ASSEMBLY__
#define KEEL_PFN(pa)			((pa) >> KEEL_PFN_SHIFT)
#define KEEL_PA(pfn)			((pfn) << KEEL_PFN_SHIFT)
#else
/* 64-bit whatever the argument's type (an int pfn would overflow). */
#define KEEL_PFN(pa)			((unsigned long long)(pa) >> KEEL_PFN_SHIFT)
#define KEEL_PA(pfn)			((unsigned long long)(pfn) << KEEL_PFN_SHIFT)
#endif

/* Page states, as MEM_STATE and VM_MEM_STATE report them in x2. */
#define KEEL_PAGE_OWNED			0
#define KEEL_PAGE_SHARED_OWNED		1
#define KEEL_PAGE_SHARED_BORROWED	2
#define KEEL_PAGE_NOPAGE		3

/* Owner codes of MEM_STATE x1; a VM's owner code is its handle. */
#define KEEL_OWNER_HOST			0
#define KEEL_OWNER_HYP			1

/* VM handles are KEEL_VM_HANDLE_BASE + n. */
#define KEEL_VM_HANDLE_BASE		0x1000

/* ---- VCPU_RUN exits: reason in x1, details in x2..x4 ---- */
#define KEEL_EXIT_SYSTEM_OFF		1	/* x2: KEEL_SYSTEM_OFF_* */
#define KEEL_EXIT_HYPERCALL		2	/* x2 = function ID, x3 = guest x1, x4 = guest x2 */
#define KEEL_EXIT_MMIO			3	/* x2 = IPA, x3 = access (KEEL_MMIO_*), x4 = value written */
#define KEEL_EXIT_IRQ			4	/* a physical interrupt arrived for the host */
#define KEEL_EXIT_FAULT			5	/* x2 = ESR; the guest cannot continue */
/* keel addition: x2 = the value the guest wrote to an SGI register, x3 = which */
#define KEEL_EXIT_SGI			6
#define KEEL_SGI_SGI1R			0	/* ICC_SGI1R_EL1 */
#define KEEL_SGI_ASGI1R			1	/* ICC_ASGI1R_EL1 */
#define KEEL_SGI_SGI0R			2	/* ICC_SGI0R_EL1 */

/* SYSTEM_OFF x2. */
#define KEEL_SYSTEM_OFF_POWEROFF	0
#define KEEL_SYSTEM_OFF_RESET		1

/* MMIO x3: bit 0 write, bits 8..15 access size in bytes, bits 16..20 register. */
#define KEEL_MMIO_WRITE			(1 << 0)
#define KEEL_MMIO_SIZE_SHIFT		8
#define KEEL_MMIO_SIZE_MASK		0xFF
#define KEEL_MMIO_REG_SHIFT		16
#define KEEL_MMIO_REG_MASK		0x1F
#define KEEL_MMIO_IS_WRITE(x3)		(((x3) & KEEL_MMIO_WRITE) != 0)
#define KEEL_MMIO_SIZE(x3)		(((x3) >> KEEL_MMIO_SIZE_SHIFT) & KEEL_MMIO_SIZE_MASK)
#define KEEL_MMIO_REG(x3)		(((x3) >> KEEL_MMIO_REG_SHIFT) & KEEL_MMIO_REG_MASK)

/* ---- HYP_STATS counter indices ---- */
#define KEEL_STAT_TABLE_PAGES		0	/* all stage-2 and hypervisor table pages */
#define KEEL_STAT_FREE_POOL_PAGES	1
#define KEEL_STAT_BLOCK_SPLITS		2
#define KEEL_STAT_BLOCK_MERGES		3
#define KEEL_STAT_HOST_ABORTS		4	/* aborts injected into the host */
#define KEEL_STAT_HYPERCALLS		5
#define KEEL_STAT_COUNT			6

#ifndef __ASSEMBLY__

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/errno.h>
#include <linux/arm-smccc.h>
typedef u64 keel_u64;
#else
#include <stdint.h>
typedef uint64_t keel_u64;
#endif

/* Registers x0..x4 as a call returns them. */
struct keel_hvc_res {
	keel_u64 a0, a1, a2, a3, a4;
};

/* What HYP_FEATURES reports. */
struct keel_hyp_features {
	keel_u64 block_sizes;	/* KEEL_BLOCK_* bits */
	keel_u64 max_vms;
	keel_u64 max_vcpus;	/* per VM */
};

/* What MEM_STATE reports for a pfn. */
struct keel_mem_state {
	keel_u64 owner;		/* KEEL_OWNER_* or a VM handle */
	keel_u64 state;		/* the host's view: KEEL_PAGE_* */
	keel_u64 map_size;	/* bytes of the host stage-2 mapping covering it, 0 if unmapped */
};

/* What VM_MEM_STATE reports for a guest IPA. */
struct keel_vm_mem_state {
	keel_u64 pfn;
	keel_u64 state;		/* the guest's view: KEEL_PAGE_* */
	keel_u64 map_size;	/* bytes of the guest stage-2 mapping covering it, 0 if unmapped */
};

/* A VCPU_RUN exit: the reason and its details, as x1..x4 carry them. */
struct keel_exit {
	keel_u64 reason;	/* KEEL_EXIT_* */
	keel_u64 x2, x3, x4;
};

/* The calls: in an arm64 kernel, or in aarch64 code elsewhere; only the constants otherwise. */
#if (defined(__KERNEL__) && defined(CONFIG_ARM64)) || (!defined(__KERNEL__) && defined(__aarch64__))
#ifdef __KERNEL__

/* As keel_hvc(), and also returns x4 (VCPU_RUN). */
static inline void keel_hvc_wide(keel_u64 id, keel_u64 a1, keel_u64 a2,
				 keel_u64 a3, keel_u64 a4,
				 struct keel_hvc_res *res)
{
	struct arm_smccc_1_2_regs args = {
		.a0 = id, .a1 = a1, .a2 = a2, .a3 = a3, .a4 = a4,
	};
	struct arm_smccc_1_2_regs r;

	arm_smccc_1_2_hvc(&args, &r);
	res->a0 = r.a0;
	res->a1 = r.a1;
	res->a2 = r.a2;
	res->a3 = r.a3;
	res->a4 = r.a4;
}

/*
 * x0 = id, x1..x4 = args; returns x0..x3 (res->a4 is 0). VCPU_RUN, which
 * also writes x4 (arm_smccc_1_1_hvc() assumes x4 survives), goes through
 * keel_hvc_wide().
 */
static inline void keel_hvc(keel_u64 id, keel_u64 a1, keel_u64 a2, keel_u64 a3,
			    keel_u64 a4, struct keel_hvc_res *res)
{
	struct arm_smccc_res r;

	if (id == KEEL_FN_VCPU_RUN) {
		keel_hvc_wide(id, a1, a2, a3, a4, res);
		return;
	}
	arm_smccc_1_1_hvc(id, a1, a2, a3, a4, &r);
	res->a0 = r.a0;
	res->a1 = r.a1;
	res->a2 = r.a2;
	res->a3 = r.a3;
	res->a4 = 0;
}

/* A keel status as a Linux errno (0 for SUCCESS). */
static inline int keel_status_to_errno(long status)
{
	switch (status) {
	case KEEL_STATUS_SUCCESS:
		return 0;
	case KEEL_STATUS_NOT_SUPPORTED:
		return -EOPNOTSUPP;
	case KEEL_STATUS_INVALID_PARAMETER:
		return -EINVAL;
	case KEEL_STATUS_DENIED:
		return -EPERM;
	case KEEL_STATUS_NO_MEMORY:
		return -ENOMEM;
	case KEEL_STATUS_BUSY:
		return -EBUSY;
	default:
		return -EIO;
	}
}

#else /* !__KERNEL__, aarch64 */

/*
 * x0 = id, x1..x4 = args (x5 = 0); returns x0..x4. x5..x17 are declared
 * clobbered although the contract preserves x4..x17 beyond the results, so a
 * hypervisor that broke the promise could not corrupt the caller; "memory"
 * because the call may change what shared pages hold.
 */
static inline void keel_hvc_wide(keel_u64 id, keel_u64 a1, keel_u64 a2,
				 keel_u64 a3, keel_u64 a4,
				 struct keel_hvc_res *res)
{
	register keel_u64 x0 __asm__("x0") = id;
	register keel_u64 x1 __asm__("x1") = a1;
	register keel_u64 x2 __asm__("x2") = a2;
	register keel_u64 x3 __asm__("x3") = a3;
	register keel_u64 x4 __asm__("x4") = a4;
	register keel_u64 x5 __asm__("x5") = 0;

	__asm__ __volatile__("hvc #0"
			     : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3),
			       "+r"(x4), "+r"(x5)
			     :
			     : "x6", "x7", "x8", "x9", "x10", "x11", "x12",
			       "x13", "x14", "x15", "x16", "x17", "memory");
	res->a0 = x0;
	res->a1 = x1;
	res->a2 = x2;
	res->a3 = x3;
	res->a4 = x4;
}

/* x0 = id, x1..x4 = args; returns x0..x3 (and x4, which only VCPU_RUN defines). */
static inline void keel_hvc(keel_u64 id, keel_u64 a1, keel_u64 a2, keel_u64 a3,
			    keel_u64 a4, struct keel_hvc_res *res)
{
	keel_hvc_wide(id, a1, a2, a3, a4, res);
}

#endif /* __KERNEL__ */

/* ---- Discovery ---- */

/* FEATURES: KEEL_FEAT_* bits of the functions this hypervisor implements. */
static inline keel_u64 keel_features(void)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_FEATURES, 0, 0, 0, 0, &r);
	return r.a0;
}

/* CALL_UID: the four UID words, x0..x3. */
static inline void keel_call_uid(keel_u64 uid[4])
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_CALL_UID, 0, 0, 0, 0, &r);
	uid[0] = r.a0;
	uid[1] = r.a1;
	uid[2] = r.a2;
	uid[3] = r.a3;
}

/* REVISION: major in x0, minor in x1. */
static inline void keel_revision(keel_u64 *major, keel_u64 *minor)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_REVISION, 0, 0, 0, 0, &r);
	*major = r.a0;
	*minor = r.a1;
}

/*
 * SUCCESS when the hypervisor speaks this ABI: CALL_UID is the KVM vendor UID
 * (which KVM and pKVM report too) and REVISION reports major
 * KEEL_REVISION_MAJOR; NOT_SUPPORTED otherwise.
 */
static inline long keel_probe(void)
{
	keel_u64 uid[4], major, minor;

	keel_call_uid(uid);
	if (uid[0] != KEEL_UID_0 || uid[1] != KEEL_UID_1 ||
	    uid[2] != KEEL_UID_2 || uid[3] != KEEL_UID_3)
		return KEEL_STATUS_NOT_SUPPORTED;
	keel_revision(&major, &minor);
	if (major != KEEL_REVISION_MAJOR)
		return KEEL_STATUS_NOT_SUPPORTED;
	return KEEL_STATUS_SUCCESS;
}

/* HYP_FEATURES: block sizes and limits. */
static inline long keel_hyp_features(struct keel_hyp_features *out)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_HYP_FEATURES, 0, 0, 0, 0, &r);
	if ((long)r.a0 == KEEL_STATUS_SUCCESS) {
		out->block_sizes = r.a1;
		out->max_vms = r.a2;
		out->max_vcpus = r.a3;
	}
	return (long)r.a0;
}

/* ---- Host calls ---- */

/* A call whose only result is its status. */
static inline long keel_call_status(keel_u64 id, keel_u64 a1, keel_u64 a2,
				    keel_u64 a3, keel_u64 a4)
{
	struct keel_hvc_res r;

	keel_hvc(id, a1, a2, a3, a4, &r);
	return (long)r.a0;
}

/* HOST_SHARE_HYP: host pages become host SHARED_OWNED / hyp SHARED_BORROWED. */
static inline long keel_host_share_hyp(keel_u64 pfn, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_HOST_SHARE_HYP, pfn, nr, 0, 0);
}

/* HOST_UNSHARE_HYP: the reverse of HOST_SHARE_HYP. */
static inline long keel_host_unshare_hyp(keel_u64 pfn, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_HOST_UNSHARE_HYP, pfn, nr, 0, 0);
}

/* HOST_DONATE_HYP: host pages join the hypervisor's pool. */
static inline long keel_host_donate_hyp(keel_u64 pfn, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_HOST_DONATE_HYP, pfn, nr, 0, 0);
}

/* HOST_RECLAIM: unused hypervisor pages return to the host, zeroed. */
static inline long keel_host_reclaim(keel_u64 pfn, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_HOST_RECLAIM, pfn, nr, 0, 0);
}

/* MEM_STATE: owner and host state of one page. */
static inline long keel_mem_state(keel_u64 pfn, struct keel_mem_state *out)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_MEM_STATE, pfn, 0, 0, 0, &r);
	if ((long)r.a0 == KEEL_STATUS_SUCCESS) {
		out->owner = r.a1;
		out->state = r.a2;
		out->map_size = r.a3;
	}
	return (long)r.a0;
}

/* HYP_STATS: the value of counter KEEL_STAT_*. */
static inline long keel_hyp_stats(keel_u64 counter, keel_u64 *value)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_HYP_STATS, counter, 0, 0, 0, &r);
	if ((long)r.a0 == KEEL_STATUS_SUCCESS)
		*value = r.a1;
	return (long)r.a0;
}

/*
 * KEEL_CHECK_INVARIANTS (keel extension, for tests): KEEL_STATUS_SUCCESS, or
 * KEEL_STATUS_DENIED with *addr = the address of the first inconsistency
 * (written only then); any other status: this build lacks the call.
 */
static inline long keel_check_invariants(keel_u64 *addr)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_KEEL_CHECK_INVARIANTS, 0, 0, 0, 0, &r);
	if ((long)r.a0 == KEEL_STATUS_DENIED)
		*addr = r.a1;
	return (long)r.a0;
}

/*
 * KEEL_TABLE_PAGES (keel extension, for tests): *pages = the table pages,
 * root included, of the host's stage 2 (which = 0) or of VM `which`'s
 * (alive, or destroyed with pages still to reclaim);
 * KEEL_STATUS_INVALID_PARAMETER for a handle without a VM.
 */
static inline long keel_table_pages(keel_u64 which, keel_u64 *pages)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_KEEL_TABLE_PAGES, which, 0, 0, 0, &r);
	if ((long)r.a0 == KEEL_STATUS_SUCCESS)
		*pages = r.a1;
	return (long)r.a0;
}

/*
 * KEEL_VCPU_IRQ (keel extension): makes INTID `intid` (0..1019, not
 * KEEL_VTIMER_INTID) pending at `priority` (0..255) for vCPU `vcpu` of VM
 * `handle`, from its next run; asked for again before the guest takes it,
 * it is taken once. KEEL_STATUS_INVALID_PARAMETER for a bad handle, index,
 * INTID or priority; KEEL_STATUS_BUSY while the vCPU runs, or when 32
 * interrupts already wait for it (run it, then retry).
 */
static inline long keel_vcpu_irq(keel_u64 handle, keel_u64 vcpu, keel_u64 intid,
				 keel_u64 priority)
{
	return keel_call_status(KEEL_FN_KEEL_VCPU_IRQ, handle, vcpu, intid, priority);
}

/*
 * KEEL_VCPU_VTIMER (keel extension): the guest's own configuration of its
 * virtual timer's interrupt (KEEL_VTIMER_INTID), as it wrote it to the
 * redistributor the VMM emulates: enabled (1) or not (0), and its priority
 * (0..255). keel raises the timer only while it is enabled, at that
 * priority (by default: enabled, 0xa0). KEEL_STATUS_INVALID_PARAMETER for a
 * bad handle, index, enable or priority; KEEL_STATUS_BUSY while it runs.
 */
static inline long keel_vcpu_vtimer(keel_u64 handle, keel_u64 vcpu, keel_u64 enabled,
				    keel_u64 priority)
{
	return keel_call_status(KEEL_FN_KEEL_VCPU_VTIMER, handle, vcpu, enabled, priority);
}

/* VM_CREATE: a VM with nr_vcpus vCPUs (flags 0); its handle. */
static inline long keel_vm_create(keel_u64 nr_vcpus, keel_u64 *handle)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_VM_CREATE, nr_vcpus, 0, 0, 0, &r);
	if ((long)r.a0 == KEEL_STATUS_SUCCESS)
		*handle = r.a1;
	return (long)r.a0;
}

/* VM_DESTROY: the VM stops for good; its pages become reclaimable. */
static inline long keel_vm_destroy(keel_u64 handle)
{
	return keel_call_status(KEEL_FN_VM_DESTROY, handle, 0, 0, 0);
}

/* VCPU_INIT: vCPU starts at EL1h, MMU off, at entry_ipa with x0 = x0.
 * Only before any vCPU of the VM has run: KEEL_STATUS_DENIED after. */
static inline long keel_vcpu_init(keel_u64 handle, keel_u64 vcpu,
				  keel_u64 entry_ipa, keel_u64 x0)
{
	return keel_call_status(KEEL_FN_VCPU_INIT, handle, vcpu, entry_ipa, x0);
}

/*
 * VCPU_RUN: runs the vCPU until an exit. `completion` completes the previous
 * exit: the value loaded by an MMIO read, or x0 returned for a HYPERCALL.
 * keel switches the V registers but no SVE or SME state beyond them: a
 * Linux caller brackets the call with kernel_neon_begin()/kernel_neon_end()
 * (keel.c does), other code saves that state itself if it uses it.
 */
static inline long keel_vcpu_run(keel_u64 handle, keel_u64 vcpu,
				 keel_u64 completion, struct keel_exit *out)
{
	struct keel_hvc_res r;

	keel_hvc_wide(KEEL_FN_VCPU_RUN, handle, vcpu, completion, 0, &r);
	if ((long)r.a0 == KEEL_STATUS_SUCCESS) {
		out->reason = r.a1;
		out->x2 = r.a2;
		out->x3 = r.a3;
		out->x4 = r.a4;
	}
	return (long)r.a0;
}

/* VM_DONATE: host pages become the guest's private memory at ipa. */
static inline long keel_vm_donate(keel_u64 handle, keel_u64 pfn, keel_u64 ipa,
				  keel_u64 nr)
{
	return keel_call_status(KEEL_FN_VM_DONATE, handle, pfn, ipa, nr);
}

/* VM_SHARE: host pages are shared into the guest at ipa. */
static inline long keel_vm_share(keel_u64 handle, keel_u64 pfn, keel_u64 ipa,
				 keel_u64 nr)
{
	return keel_call_status(KEEL_FN_VM_SHARE, handle, pfn, ipa, nr);
}

/* VM_UNSHARE: the reverse of VM_SHARE. */
static inline long keel_vm_unshare(keel_u64 handle, keel_u64 ipa, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_VM_UNSHARE, handle, ipa, nr, 0);
}

/* VM_MEM_STATE: the page behind a guest IPA and its guest state. */
static inline long keel_vm_mem_state(keel_u64 handle, keel_u64 ipa,
				     struct keel_vm_mem_state *out)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_VM_MEM_STATE, handle, ipa, 0, 0, &r);
	if ((long)r.a0 == KEEL_STATUS_SUCCESS) {
		out->pfn = r.a1;
		out->state = r.a2;
		out->map_size = r.a3;
	}
	return (long)r.a0;
}

/* HOST_PIN: one more pin on pages a guest shared with the host. */
static inline long keel_host_pin(keel_u64 pfn, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_HOST_PIN, pfn, nr, 0, 0);
}

/* HOST_UNPIN: drops one pin. */
static inline long keel_host_unpin(keel_u64 pfn, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_HOST_UNPIN, pfn, nr, 0, 0);
}

/* ---- Guest calls (pKVM-compatible); nr = 0 means 1 page ---- */

/* HYP_MEMINFO: the conversion granule in bytes (KEEL_GRANULE). */
static inline keel_u64 keel_guest_hyp_meminfo(void)
{
	struct keel_hvc_res r;

	keel_hvc(KEEL_FN_HYP_MEMINFO, 0, 0, 0, 0, &r);
	return r.a0;
}

/* MEM_SHARE: private pages become shared with the host, in place. */
static inline long keel_guest_mem_share(keel_u64 ipa, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_MEM_SHARE, ipa, nr, 0, 0);
}

/* MEM_UNSHARE: the reverse of MEM_SHARE; BUSY while the host holds a pin. */
static inline long keel_guest_mem_unshare(keel_u64 ipa, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_MEM_UNSHARE, ipa, nr, 0, 0);
}

/* MEM_RELINQUISH: pages leave the guest, zeroed, back to the host. */
static inline long keel_guest_mem_relinquish(keel_u64 ipa, keel_u64 nr)
{
	return keel_call_status(KEEL_FN_MEM_RELINQUISH, ipa, nr, 0, 0);
}

#endif /* __KERNEL__ || __aarch64__ */

#endif /* !__ASSEMBLY__ */

#endif /* KEEL_HYP_H */
