// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Compile-time check of client/c/keel_hyp.h against the contract
 * (shared/ABI.md 1.0): every constant is asserted equal to the number the
 * contract gives (written here from the contract, not from the header), and
 * every call helper is used once so that its inline assembly and types are
 * compiled. Built by tests/c/check.sh for aarch64, freestanding, -Werror;
 * nothing here runs. client/rust/tests/c_header.rs checks the same header
 * against the Rust crate.
 */
#include "keel_hyp.h"

#define CHECK(expr) _Static_assert(expr, #expr)

/* Function IDs. */
CHECK(KEEL_FN_FEATURES == 0x86000000);
CHECK(KEEL_FN_CALL_UID == 0x8600FF01);
CHECK(KEEL_FN_REVISION == 0x8600FF03);
CHECK(KEEL_FN_HYP_FEATURES == 0xC6000100);
CHECK(KEEL_FN_HOST_SHARE_HYP == 0xC6000101);
CHECK(KEEL_FN_HOST_UNSHARE_HYP == 0xC6000102);
CHECK(KEEL_FN_HOST_DONATE_HYP == 0xC6000103);
CHECK(KEEL_FN_HOST_RECLAIM == 0xC6000104);
CHECK(KEEL_FN_MEM_STATE == 0xC6000105);
CHECK(KEEL_FN_HYP_STATS == 0xC6000106);
CHECK(KEEL_FN_VM_CREATE == 0xC6000110);
CHECK(KEEL_FN_VM_DESTROY == 0xC6000111);
CHECK(KEEL_FN_VCPU_INIT == 0xC6000112);
CHECK(KEEL_FN_VCPU_RUN == 0xC6000113);
CHECK(KEEL_FN_VM_DONATE == 0xC6000114);
CHECK(KEEL_FN_VM_SHARE == 0xC6000115);
CHECK(KEEL_FN_VM_UNSHARE == 0xC6000116);
CHECK(KEEL_FN_VM_MEM_STATE == 0xC6000117);
CHECK(KEEL_FN_HOST_PIN == 0xC6000118);
CHECK(KEEL_FN_HOST_UNPIN == 0xC6000119);
CHECK(KEEL_FN_HYP_MEMINFO == 0xC6000002);
CHECK(KEEL_FN_MEM_SHARE == 0xC6000003);
CHECK(KEEL_FN_MEM_UNSHARE == 0xC6000004);
CHECK(KEEL_FN_MEM_RELINQUISH == 0xC6000009);

/* Every ID is an SMCCC fast call (bit 31) of the vendor-hypervisor service (6). */
#define VENDOR_HYP_FAST(id) (((id) & 0x80000000u) && (((id) >> 24) & 0x3F) == 6)
CHECK(VENDOR_HYP_FAST(KEEL_FN_FEATURES) && VENDOR_HYP_FAST(KEEL_FN_CALL_UID));
CHECK(VENDOR_HYP_FAST(KEEL_FN_REVISION) && VENDOR_HYP_FAST(KEEL_FN_VCPU_RUN));
CHECK(VENDOR_HYP_FAST(KEEL_FN_HOST_UNPIN) && VENDOR_HYP_FAST(KEEL_FN_MEM_RELINQUISH));

/* Statuses. */
CHECK(KEEL_STATUS_SUCCESS == 0);
CHECK(KEEL_STATUS_NOT_SUPPORTED == -1);
CHECK(KEEL_STATUS_INVALID_PARAMETER == -3);
CHECK(KEEL_STATUS_DENIED == -4);
CHECK(KEEL_STATUS_NO_MEMORY == -5);
CHECK(KEEL_STATUS_BUSY == -6);
/* A status read back from x0 compares equal once cast to long. */
CHECK((long)(keel_u64)-4L == KEEL_STATUS_DENIED);

/* FEATURES bits: bit n for function number n. */
CHECK(KEEL_FEAT_FEATURES == 0x1);
CHECK(KEEL_FEAT_HYP_MEMINFO == 0x4);
CHECK(KEEL_FEAT_MEM_SHARE == 0x8);
CHECK(KEEL_FEAT_MEM_UNSHARE == 0x10);
CHECK(KEEL_FEAT_MEM_RELINQUISH == 0x200);
CHECK(KEEL_FEAT_ALL == 0x21D);
CHECK(KEEL_FN_NUM(KEEL_FN_MEM_RELINQUISH) == 9);
CHECK(KEEL_FN_NUM(KEEL_FN_FEATURES) == 0);
CHECK(KEEL_FEAT_BIT(KEEL_FN_FEATURES) == KEEL_FEAT_FEATURES);
CHECK(KEEL_FEAT_BIT(KEEL_FN_HYP_MEMINFO) == KEEL_FEAT_HYP_MEMINFO);
CHECK(KEEL_FEAT_BIT(KEEL_FN_MEM_SHARE) == KEEL_FEAT_MEM_SHARE);
CHECK(KEEL_FEAT_BIT(KEEL_FN_MEM_UNSHARE) == KEEL_FEAT_MEM_UNSHARE);
CHECK(KEEL_FEAT_BIT(KEEL_FN_MEM_RELINQUISH) == KEEL_FEAT_MEM_RELINQUISH);

/* CALL_UID: 28b46fb6-2ec5-11e9-a9ca-4b564d003a74 in SMCCC word order. */
CHECK(KEEL_UID_0 == 0xb66fb428);
CHECK(KEEL_UID_1 == 0xe911c52e);
CHECK(KEEL_UID_2 == 0x564bcaa9);
CHECK(KEEL_UID_3 == 0x743a004d);

/* REVISION 1.0. */
CHECK(KEEL_REVISION_MAJOR == 1);
CHECK(KEEL_REVISION_MINOR == 0);

/* HYP_FEATURES block sizes: bit 12 = 4K, 21 = 2M, 30 = 1G. */
CHECK(KEEL_BLOCK_4K == 4096);
CHECK(KEEL_BLOCK_2M == 2 * 1024 * 1024);
CHECK(KEEL_BLOCK_1G == 1024 * 1024 * 1024);
CHECK(KEEL_BLOCK_SIZES == 0x40201000);

/* Pages, states, owners, handles. */
CHECK(KEEL_GRANULE == 4096);
CHECK(KEEL_PFN_SHIFT == 12);
CHECK(KEEL_PFN(0x40201000ul) == 0x40201);
CHECK(KEEL_PA(0x40201ul) == 0x40201000);
/* 64-bit whatever the argument's type: an int pfn does not overflow. */
CHECK(KEEL_PA(0x80000) == 0x80000000ULL);
CHECK(KEEL_PA(0x100000u) == 0x100000000ULL);
/* FEATURES reports functions 0..31 only. */
CHECK(KEEL_FEAT_BIT(KEEL_FN_VCPU_RUN) == 0);
CHECK(KEEL_FEAT_BIT(KEEL_FN_HYP_FEATURES) == 0);
CHECK(KEEL_PAGE_OWNED == 0);
CHECK(KEEL_PAGE_SHARED_OWNED == 1);
CHECK(KEEL_PAGE_SHARED_BORROWED == 2);
CHECK(KEEL_PAGE_NOPAGE == 3);
CHECK(KEEL_OWNER_HOST == 0);
CHECK(KEEL_OWNER_HYP == 1);
CHECK(KEEL_VM_HANDLE_BASE == 0x1000);

/* VCPU_RUN exits and their details. */
CHECK(KEEL_EXIT_SYSTEM_OFF == 1);
CHECK(KEEL_EXIT_HYPERCALL == 2);
CHECK(KEEL_EXIT_MMIO == 3);
CHECK(KEEL_EXIT_IRQ == 4);
CHECK(KEEL_EXIT_FAULT == 5);
CHECK(KEEL_SYSTEM_OFF_POWEROFF == 0);
CHECK(KEEL_SYSTEM_OFF_RESET == 1);
CHECK(KEEL_MMIO_WRITE == 1);
CHECK(KEEL_MMIO_SIZE_SHIFT == 8 && KEEL_MMIO_SIZE_MASK == 0xFF);
CHECK(KEEL_MMIO_REG_SHIFT == 16 && KEEL_MMIO_REG_MASK == 0x1F);
/* A 4-byte write from w7: bit 0, size 4 in bits 8..15, register 7 in bits 16..20. */
CHECK(KEEL_MMIO_IS_WRITE(0x070401ul) && KEEL_MMIO_SIZE(0x070401ul) == 4 &&
      KEEL_MMIO_REG(0x070401ul) == 7);
/* An 8-byte read into x30; bits above 20 are not part of the register number. */
CHECK(!KEEL_MMIO_IS_WRITE(0xFE0800ul) && KEEL_MMIO_SIZE(0xFE0800ul) == 8 &&
      KEEL_MMIO_REG(0xFE0800ul) == 30);

/* HYP_STATS counters. */
CHECK(KEEL_STAT_TABLE_PAGES == 0);
CHECK(KEEL_STAT_FREE_POOL_PAGES == 1);
CHECK(KEEL_STAT_BLOCK_SPLITS == 2);
CHECK(KEEL_STAT_BLOCK_MERGES == 3);
CHECK(KEEL_STAT_HOST_ABORTS == 4);
CHECK(KEEL_STAT_HYPERCALLS == 5);
CHECK(KEEL_STAT_COUNT == 6);

/* Types: registers are 64 bits, result structs are plain register copies. */
CHECK(sizeof(keel_u64) == 8 && (keel_u64)-1 > 0);
CHECK(sizeof(long) == 8);
CHECK(sizeof(struct keel_hvc_res) == 5 * 8);
CHECK(sizeof(struct keel_exit) == 4 * 8);

#ifndef __aarch64__
#error "abi_check.c is built for aarch64, where the call helpers exist"
#endif

/* Uses every helper once; the sum keeps every result live. Never run. */
long keel_abi_check_calls(keel_u64 pfn, keel_u64 ipa, keel_u64 handle);
long keel_abi_check_calls(keel_u64 pfn, keel_u64 ipa, keel_u64 handle)
{
	/* Out-parameters are written only on SUCCESS: start them at zero. */
	struct keel_hvc_res raw;
	struct keel_hyp_features feat = { 0 };
	struct keel_mem_state ms = { 0 };
	struct keel_vm_mem_state vms = { 0 };
	struct keel_exit exit_info = { 0 };
	keel_u64 uid[4], major, minor, value = 0, new_handle = 0;
	long s = 0;

	keel_hvc(KEEL_FN_REVISION, 0, 0, 0, 0, &raw);
	s += (long)raw.a0;
	keel_hvc_wide(KEEL_FN_REVISION, 0, 0, 0, 0, &raw);
	s += (long)raw.a4;

	s += (long)keel_features();
	keel_call_uid(uid);
	s += (long)uid[3];
	keel_revision(&major, &minor);
	s += (long)(major + minor);
	s += keel_probe();
	s += keel_hyp_features(&feat);
	s += (long)feat.block_sizes;

	s += keel_host_share_hyp(pfn, 1);
	s += keel_host_unshare_hyp(pfn, 1);
	s += keel_host_donate_hyp(pfn, 1);
	s += keel_host_reclaim(pfn, 1);
	s += keel_mem_state(pfn, &ms);
	s += (long)ms.owner;
	s += keel_hyp_stats(KEEL_STAT_HYPERCALLS, &value);
	s += (long)value;
	s += keel_vm_create(1, &new_handle);
	s += (long)new_handle;
	s += keel_vcpu_init(handle, 0, ipa, 0);
	s += keel_vm_donate(handle, pfn, ipa, 1);
	s += keel_vm_share(handle, pfn, ipa, 1);
	s += keel_vcpu_run(handle, 0, 0, &exit_info);
	s += (long)(exit_info.reason + exit_info.x2 + exit_info.x3 + exit_info.x4);
	s += keel_vm_mem_state(handle, ipa, &vms);
	s += (long)vms.pfn;
	s += keel_vm_unshare(handle, ipa, 1);
	s += keel_host_pin(pfn, 1);
	s += keel_host_unpin(pfn, 1);
	s += keel_vm_destroy(handle);
	s += keel_call_status(KEEL_FN_HYP_STATS, 0, 0, 0, 0);
	/* keel extensions. */
	s += keel_check_invariants(&value);
	s += keel_table_pages(0, &value);
	s += (long)value;

	s += (long)keel_guest_hyp_meminfo();
	s += keel_guest_mem_share(ipa, 0);
	s += keel_guest_mem_unshare(ipa, 0);
	s += keel_guest_mem_relinquish(ipa, 0);
#ifdef __KERNEL__
	s += keel_status_to_errno(s);
#endif
	return s;
}
