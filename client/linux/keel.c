// SPDX-License-Identifier: GPL-2.0
/*
 * keel.c - Linux host driver for the keel hypervisor.
 *
 * keel (shared/ABI.md) runs beneath this kernel at EL2 and owns all memory;
 * this driver speaks its host ABI through HVC (client/c/keel_hyp.h over
 * <linux/arm-smccc.h>) and offers it to a VMM as ioctls on /dev/keel
 * (keel_ioctl.h).
 *
 * Ownership of memory. A page given to a guest leaves the host's stage 2:
 * any access by Linux to it would be an external abort. So the driver
 * allocates every page it gives away itself (never a user's page), keeps
 * it allocated for as long as keel has it, and frees it to Linux only
 * after HOST_RECLAIM (or a MEM_STATE showing it is the host's again) said
 * that the host owns it. A page keel refuses to give back is never freed:
 * it is counted as leaked and kept off Linux's lists for good.
 *
 * Guest memory comes from the buddy allocator in naturally aligned chunks
 * of up to MAX_ORDER - 1 (4 MiB here), so that keel maps 2 MiB blocks; or
 * from a carveout, a physical range Linux does not use (booted with mem=),
 * given as carveout=SIZE@BASE, where a 1 GiB-aligned guest range gets
 * 1 GiB blocks.
 *
 * Locking: keel_file.lock guards a file's VM list; vm->run_lock is held for
 * reading across each VCPU_RUN hypercall and for writing by destruction,
 * so that no run can reach a handle that keel may since have reused;
 * vm->mem_lock guards the VM's memory and pins; keel_global.lock the pool,
 * the leaked list and the carveout.
 */
#define pr_fmt(fmt) "keel: " fmt

#include <linux/bitmap.h>
#include <linux/fs.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/list_sort.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/rwsem.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <asm/cpufeature.h>
#include <asm/neon.h>
#include <asm/sysreg.h>
#include <asm/virt.h>

#include "keel_hyp.h"
#include "keel_ioctl.h"

#define KEEL_PAGE		4096ULL
#define SZ_2M_PAGES		512ULL
/* How many times a call that failed with NO_MEMORY is retried after a donation. */
#define POOL_RETRIES		8
/* Pages given to keel's pool at a time (order 4: 64 KiB). */
#define POOL_ORDER		4
/* What keel's pool should have free before a guest runs (guest MEM_SHARE splits). */
#define POOL_MIN_FREE		32
/*
 * Free pool pages below which VM_CREATE's NO_MEMORY is the pool's (it needs
 * a root page and little else); above, keel is out of VM slots.
 */
#define POOL_LOW		(2 * POOL_MIN_FREE)
#define RW_MAX			(1ULL << 20)

static char *carveout;
module_param(carveout, charp, 0444);
MODULE_PARM_DESC(carveout, "SIZE@BASE of physical memory Linux does not use (mem=), for guests");

/* A physically contiguous piece of memory the driver allocated. */
struct keel_chunk {
	struct list_head node;
	struct page *page;	/* buddy allocation, or NULL: carveout */
	unsigned int order;	/* buddy: its order */
	u64 pfn;		/* first 4K frame */
	u64 nr;			/* 4K frames */
	u64 ipa;		/* where the guest sees it */
};

/* What one VM_DONATE or VM_SHARE ioctl gave the guest. */
struct keel_region {
	struct list_head node;
	struct list_head chunks;
	u64 ipa;
	u64 size;
	bool shared;		/* lent (VM_SHARE), not donated */
};

struct keel_pin {
	struct list_head node;
	u64 pfn;
};

struct keel_vm {
	struct list_head node;
	struct kref ref;
	u64 handle;
	u64 nr_vcpus;
	struct rw_semaphore run_lock;
	struct mutex mem_lock;
	bool dead;
	struct list_head regions;
	struct list_head pins;
};

struct keel_file {
	struct mutex lock;
	struct list_head vms;
};

static struct {
	struct mutex lock;
	struct list_head pool;		/* chunks donated to keel's pool */
	struct list_head leaked;	/* chunks keel did not give back */
	atomic64_t vms, guest_pages, pool_pages, leaked_pages;
	struct keel_hyp_features features;
	u64 revision_major, revision_minor, feature_bits;
	/* The carveout, in 2 MiB units. */
	u64 co_base, co_size;
	unsigned long *co_map;
	unsigned long co_units;
	struct resource co_res;
	bool co_res_inserted;
} keel_global;

/* ---- hypercalls, counted ---- */

static long keel_count(long status, u64 *calls)
{
	if (calls)
		(*calls)++;
	return status;
}

static bool keel_pool_grow(u64 *calls)
{
	struct keel_chunk *c;
	struct page *page;
	long s;

	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return false;
	page = alloc_pages(GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN, POOL_ORDER);
	if (!page) {
		kfree(c);
		return false;
	}
	c->page = page;
	c->order = POOL_ORDER;
	c->pfn = KEEL_PFN(page_to_phys(page));
	c->nr = (PAGE_SIZE << POOL_ORDER) / KEEL_PAGE;
	s = keel_count(keel_host_donate_hyp(c->pfn, c->nr), calls);
	if (s) {
		pr_warn("HOST_DONATE_HYP of %llu pages at pfn %#llx failed: %ld\n", c->nr, c->pfn, s);
		__free_pages(page, POOL_ORDER);
		kfree(c);
		return false;
	}
	mutex_lock(&keel_global.lock);
	list_add(&c->node, &keel_global.pool);
	mutex_unlock(&keel_global.lock);
	atomic64_add(c->nr, &keel_global.pool_pages);
	return true;
}

/* Tops keel's pool up to POOL_MIN_FREE free pages. */
static void keel_pool_ensure(u64 *calls)
{
	u64 free;
	int i;

	for (i = 0; i < POOL_RETRIES; i++) {
		if (keel_count(keel_hyp_stats(KEEL_STAT_FREE_POOL_PAGES, &free), calls) ||
		    free >= POOL_MIN_FREE)
			return;
		if (!keel_pool_grow(calls))
			return;
	}
}

/*
 * After VM_CREATE's NO_MEMORY: is keel's pool what ran out? keel also
 * answers NO_MEMORY when every VM slot is taken (a destroyed VM's slot
 * included, until its pages are reclaimed); donating then would only grow
 * its pool for nothing.
 */
static bool keel_pool_low(u64 *calls)
{
	u64 free;

	return keel_count(keel_hyp_stats(KEEL_STAT_FREE_POOL_PAGES, &free), calls) ||
		free < POOL_LOW;
}

/*
 * A memory call that may need table pages: retried after donating some
 * (only while keel's pool is low, if `only_low`: VM_CREATE).
 */
#define KEEL_CALL_POOL_IF(calls, only_low, expr) ({		\
	long __s;						\
	int __i = 0;						\
	for (;;) {						\
		__s = keel_count((expr), (calls));		\
		if (__s != KEEL_STATUS_NO_MEMORY || __i++ >= POOL_RETRIES || \
		    ((only_low) && !keel_pool_low(calls)) ||	\
		    !keel_pool_grow(calls))			\
			break;					\
	}							\
	__s;							\
})
#define KEEL_CALL_POOL(calls, expr) KEEL_CALL_POOL_IF(calls, false, expr)

/*
 * Takes back [pfn, pfn + nr) from keel: true when every page is the host's
 * again (reclaimed now, or already the host's, as pages a guest
 * relinquished are).
 */
static bool keel_take_back(u64 pfn, u64 nr)
{
	struct keel_mem_state st;
	bool all = true;
	u64 piece, p;

	if (keel_host_reclaim(pfn, nr) == KEEL_STATUS_SUCCESS)
		return true;
	/*
	 * Refused whole (a page the guest relinquished is the host's
	 * already): 2 MiB at a time, each piece page by page only if keel
	 * refuses it too.
	 */
	for (; nr; pfn += piece, nr -= piece) {
		piece = min(nr, SZ_2M_PAGES - (pfn & (SZ_2M_PAGES - 1)));
		cond_resched();
		if (keel_host_reclaim(pfn, piece) == KEEL_STATUS_SUCCESS)
			continue;
		for (p = pfn; p < pfn + piece; p++) {
			if (keel_mem_state(p, &st) == KEEL_STATUS_SUCCESS &&
			    st.owner == KEEL_OWNER_HOST && st.state == KEEL_PAGE_OWNED)
				continue;
			if (keel_host_reclaim(p, 1) != KEEL_STATUS_SUCCESS)
				all = false;
		}
	}
	return all;
}

/* ---- chunks ---- */

static void keel_chunk_free(struct keel_chunk *c)
{
	if (c->page) {
		__free_pages(c->page, c->order);
	} else {
		u64 first = (KEEL_PA(c->pfn) - keel_global.co_base) >> 21;

		mutex_lock(&keel_global.lock);
		bitmap_clear(keel_global.co_map, first, c->nr / SZ_2M_PAGES);
		mutex_unlock(&keel_global.lock);
	}
	kfree(c);
}

/* A chunk keel kept: never freed, counted. */
static void keel_chunk_leak(struct keel_chunk *c)
{
	pr_err("hypervisor kept %llu pages at pfn %#llx: they stay allocated\n", c->nr, c->pfn);
	atomic64_add(c->nr, &keel_global.leaked_pages);
	mutex_lock(&keel_global.lock);
	list_add(&c->node, &keel_global.leaked);
	mutex_unlock(&keel_global.lock);
}

/* DC CIVAC over a kernel virtual range: nothing of it stays in the caches. */
static void keel_dcache_clean_inval(void *addr, size_t len)
{
	u64 ctr = read_sanitised_ftr_reg(SYS_CTR_EL0);
	unsigned long line = 4UL << ((ctr >> 16) & 0xf);	/* CTR_EL0.DminLine, bits 19:16 */
	unsigned long p = (unsigned long)addr & ~(line - 1);
	unsigned long end = (unsigned long)addr + len;

	for (; p < end; p += line)
		asm volatile("dc civac, %0" : : "r"(p) : "memory");
	dsb(sy);
}

/*
 * Calls fn(va, len, ctx) over the kernel mapping of [off, off + len) of a
 * chunk, a page or a 2 MiB piece at a time (carveout memory is mapped only
 * while it is used). Stops at the first non-zero return.
 */
static int keel_chunk_access(struct keel_chunk *c, u64 off, u64 len,
			     int (*fn)(void *va, u64 len, void *ctx), void *ctx)
{
	while (len) {
		u64 step = min_t(u64, len, SZ_2M - (off & (SZ_2M - 1)));
		int ret;

		if (c->page) {
			ret = fn((char *)page_address(c->page) + off, step, ctx);
		} else {
			void *va = memremap(KEEL_PA(c->pfn) + off, step, MEMREMAP_WB);

			if (!va)
				return -ENOMEM;
			ret = fn(va, step, ctx);
			memunmap(va);
		}
		if (ret)
			return ret;
		off += step;
		len -= step;
		cond_resched();
	}
	return 0;
}

struct keel_fill {
	const char __user *src;
	u64 left;	/* bytes of src still to copy */
};

/* Fills guest memory before it is given: the image, then zeroes. */
static int keel_fill_fn(void *va, u64 len, void *ctx)
{
	struct keel_fill *f = ctx;
	u64 n = min(len, f->left);

	if (n && copy_from_user(va, f->src, n))
		return -EFAULT;
	f->src += n;
	f->left -= n;
	if (n < len)
		memset((char *)va + n, 0, len - n);
	/* The guest starts with its MMU off: its accesses miss the caches. */
	keel_dcache_clean_inval(va, len);
	return 0;
}

static int keel_chunk_cmp(void *priv, const struct list_head *a, const struct list_head *b)
{
	const struct keel_chunk *x = list_entry(a, struct keel_chunk, node);
	const struct keel_chunk *y = list_entry(b, struct keel_chunk, node);

	if (x->order != y->order)	/* big first: their IPAs stay aligned */
		return x->order > y->order ? -1 : 1;
	return x->pfn < y->pfn ? -1 : x->pfn > y->pfn;
}

static void keel_chunks_free(struct list_head *chunks)
{
	struct keel_chunk *c, *t;

	list_for_each_entry_safe(c, t, chunks, node) {
		list_del(&c->node);
		keel_chunk_free(c);
	}
}

/* size bytes from the buddy allocator, in the largest chunks it has. */
static int keel_alloc_buddy(u64 size, struct list_head *chunks)
{
	u64 left = size / PAGE_SIZE;
	unsigned int order = MAX_ORDER - 1;

	while (left) {
		struct keel_chunk *c;
		struct page *page;
		gfp_t gfp = GFP_KERNEL_ACCOUNT | __GFP_NOWARN;

		while ((1ULL << order) > left)
			order--;
		if (order)
			gfp |= __GFP_NORETRY;
		page = alloc_pages(gfp, order);
		if (!page) {
			if (!order)
				goto fail;
			order--;
			continue;
		}
		c = kzalloc(sizeof(*c), GFP_KERNEL);
		if (!c) {
			__free_pages(page, order);
			goto fail;
		}
		c->page = page;
		c->order = order;
		c->pfn = KEEL_PFN(page_to_phys(page));
		c->nr = (PAGE_SIZE << order) / KEEL_PAGE;
		list_add_tail(&c->node, chunks);
		left -= 1ULL << order;
		if (fatal_signal_pending(current))
			goto fail;
		cond_resched();
	}
	list_sort(NULL, chunks, keel_chunk_cmp);
	return 0;
fail:
	keel_chunks_free(chunks);
	return -ENOMEM;
}

/* size bytes (a 2 MiB multiple) of the carveout, 1 GiB-aligned if it can. */
static int keel_alloc_carveout(u64 size, struct list_head *chunks)
{
	unsigned long units = size >> 21, start;
	struct keel_chunk *c;

	if (!keel_global.co_map)
		return -ENODEV;
	if (size & (SZ_2M - 1))
		return -EINVAL;
	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	mutex_lock(&keel_global.lock);
	start = keel_global.co_units;
	if (size >= SZ_1G)	/* 1 GiB-aligned physically, for 1 GiB blocks */
		start = bitmap_find_next_zero_area_off(keel_global.co_map, keel_global.co_units,
						       0, units, (SZ_1G >> 21) - 1,
						       (keel_global.co_base >> 21) &
						       ((SZ_1G >> 21) - 1));
	if (start >= keel_global.co_units)
		start = bitmap_find_next_zero_area(keel_global.co_map, keel_global.co_units, 0,
						   units, 0);
	if (start < keel_global.co_units)
		bitmap_set(keel_global.co_map, start, units);
	mutex_unlock(&keel_global.lock);
	if (start >= keel_global.co_units) {
		kfree(c);
		return -ENOMEM;
	}
	c->pfn = KEEL_PFN(keel_global.co_base + ((u64)start << 21));
	c->nr = size / KEEL_PAGE;
	list_add_tail(&c->node, chunks);
	return 0;
}

/* ---- VMs ---- */

static void keel_vm_release(struct kref *ref)
{
	kfree(container_of(ref, struct keel_vm, ref));
}

static void keel_vm_put(struct keel_vm *vm)
{
	kref_put(&vm->ref, keel_vm_release);
}

/* The file's VM of that handle, with a reference; NULL if none. */
static struct keel_vm *keel_vm_get(struct keel_file *kf, u64 handle)
{
	struct keel_vm *vm, *found = NULL;

	mutex_lock(&kf->lock);
	list_for_each_entry(vm, &kf->vms, node) {
		if (vm->handle == handle) {
			kref_get(&vm->ref);
			found = vm;
			break;
		}
	}
	mutex_unlock(&kf->lock);
	return found;
}

/* The chunk of this VM's memory that holds pfn (mem_lock held). */
static struct keel_chunk *keel_vm_chunk_of(struct keel_vm *vm, u64 pfn, bool *shared)
{
	struct keel_region *r;
	struct keel_chunk *c;

	list_for_each_entry(r, &vm->regions, node) {
		list_for_each_entry(c, &r->chunks, node) {
			if (pfn >= c->pfn && pfn < c->pfn + c->nr) {
				*shared = r->shared;
				return c;
			}
		}
	}
	return NULL;
}

/*
 * Empties a VM's memory list (mem_lock held): after VM_DESTROY (`destroyed`)
 * each chunk keel gives back is freed to Linux; a chunk keel keeps, and
 * every chunk of a VM keel would not destroy, goes on the leaked list.
 */
static void keel_vm_take_back_all(struct keel_vm *vm, bool destroyed)
{
	struct keel_region *r, *rt;
	struct keel_chunk *c, *ct;

	list_for_each_entry_safe(r, rt, &vm->regions, node) {
		list_for_each_entry_safe(c, ct, &r->chunks, node) {
			list_del(&c->node);
			atomic64_sub(c->nr, &keel_global.guest_pages);
			if (destroyed && keel_take_back(c->pfn, c->nr))
				keel_chunk_free(c);
			else
				keel_chunk_leak(c);
			cond_resched();
		}
		list_del(&r->node);
		kfree(r);
	}
}

/*
 * A VM keel would not destroy, whose file is closing: its memory stays
 * keel's, so every chunk goes on the leaked list (counted; RECLAIM and the
 * module's exit try again).
 */
static void keel_vm_leak_all(struct keel_vm *vm)
{
	struct keel_pin *p, *pt;

	mutex_lock(&vm->mem_lock);
	keel_vm_take_back_all(vm, false);
	list_for_each_entry_safe(p, pt, &vm->pins, node) {
		list_del(&p->node);
		kfree(p);
	}
	mutex_unlock(&vm->mem_lock);
}

/* Gives free pool pages back to Linux once no VM is left. */
static void keel_pool_take_back(u64 *pages)
{
	struct keel_chunk *c, *t;

	mutex_lock(&keel_global.lock);
	if (atomic64_read(&keel_global.vms) == 0) {
		list_for_each_entry_safe(c, t, &keel_global.pool, node) {
			if (keel_host_reclaim(c->pfn, c->nr) != KEEL_STATUS_SUCCESS)
				continue;	/* keel uses some of it: later */
			list_del(&c->node);
			atomic64_sub(c->nr, &keel_global.pool_pages);
			if (pages)
				*pages += c->nr;
			__free_pages(c->page, c->order);
			kfree(c);
		}
	}
	mutex_unlock(&keel_global.lock);
}

/*
 * VM_DESTROY and everything after it: pins dropped, the VM destroyed, its
 * memory reclaimed and freed. Waits for running vCPUs to come back (they
 * leave at the next interrupt at the latest).
 */
static int keel_vm_teardown(struct keel_vm *vm)
{
	struct keel_pin *p, *pt;
	long s;
	int ret = 0;

	down_write(&vm->run_lock);
	mutex_lock(&vm->mem_lock);
	if (vm->dead)
		goto out;
	list_for_each_entry_safe(p, pt, &vm->pins, node) {
		keel_host_unpin(p->pfn, 1);
		list_del(&p->node);
		kfree(p);
	}
	s = keel_vm_destroy(vm->handle);
	if (s) {
		/* Cannot happen with run_lock held: keep every page. */
		pr_err("VM_DESTROY of %#llx failed: %ld; its memory stays allocated\n", vm->handle, s);
		ret = keel_status_to_errno(s);
		goto out;
	}
	vm->dead = true;
	atomic64_dec(&keel_global.vms);
	keel_vm_take_back_all(vm, true);
out:
	mutex_unlock(&vm->mem_lock);
	up_write(&vm->run_lock);
	return ret;
}

/* ---- ioctls ---- */

static long keel_ioc_info(void __user *argp)
{
	struct keel_info info = {
		.revision_major = keel_global.revision_major,
		.revision_minor = keel_global.revision_minor,
		.features = keel_global.feature_bits,
		.block_sizes = keel_global.features.block_sizes,
		.max_vms = keel_global.features.max_vms,
		.max_vcpus = keel_global.features.max_vcpus,
		.vms = atomic64_read(&keel_global.vms),
		.guest_pages = atomic64_read(&keel_global.guest_pages),
		.pool_pages = atomic64_read(&keel_global.pool_pages),
		.leaked_pages = atomic64_read(&keel_global.leaked_pages),
		.carveout_base = keel_global.co_base,
		.carveout_size = keel_global.co_size,
	};

	if (keel_global.co_map) {
		mutex_lock(&keel_global.lock);
		info.carveout_free = (u64)(keel_global.co_units -
			bitmap_weight(keel_global.co_map, keel_global.co_units)) << 21;
		mutex_unlock(&keel_global.lock);
	}
	return copy_to_user(argp, &info, sizeof(info)) ? -EFAULT : 0;
}

static long keel_ioc_mem_state(void __user *argp)
{
	struct keel_mem_state_arg a;
	struct keel_mem_state st;
	long s;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	s = keel_mem_state(a.pfn, &st);
	if (s)
		return keel_status_to_errno(s);
	a.owner = st.owner;
	a.state = st.state;
	a.map_size = st.map_size;
	return copy_to_user(argp, &a, sizeof(a)) ? -EFAULT : 0;
}

static long keel_ioc_hyp_stats(void __user *argp)
{
	struct keel_stats_arg a;
	long s;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	s = keel_hyp_stats(a.index, &a.value);
	if (s)
		return keel_status_to_errno(s);
	return copy_to_user(argp, &a, sizeof(a)) ? -EFAULT : 0;
}

static long keel_ioc_vm_create(struct keel_file *kf, void __user *argp)
{
	struct keel_vm_create_arg a;
	struct keel_vm *vm;
	u64 handle;
	long s;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	if (a.flags || !a.nr_vcpus || a.nr_vcpus > keel_global.features.max_vcpus)
		return -EINVAL;
	/* Every slot taken: keel would say NO_MEMORY, which is not the pool's. */
	if (atomic64_read(&keel_global.vms) >= keel_global.features.max_vms)
		return -ENOSPC;
	vm = kzalloc(sizeof(*vm), GFP_KERNEL_ACCOUNT);
	if (!vm)
		return -ENOMEM;
	s = KEEL_CALL_POOL_IF(NULL, true, keel_vm_create(a.nr_vcpus, &handle));
	if (s) {
		kfree(vm);
		return keel_status_to_errno(s);
	}
	kref_init(&vm->ref);
	vm->handle = handle;
	vm->nr_vcpus = a.nr_vcpus;
	init_rwsem(&vm->run_lock);
	mutex_init(&vm->mem_lock);
	INIT_LIST_HEAD(&vm->regions);
	INIT_LIST_HEAD(&vm->pins);
	atomic64_inc(&keel_global.vms);
	keel_pool_ensure(NULL);

	a.handle = handle;
	if (copy_to_user(argp, &a, sizeof(a))) {
		keel_vm_teardown(vm);
		keel_vm_put(vm);
		return -EFAULT;
	}
	mutex_lock(&kf->lock);
	list_add_tail(&vm->node, &kf->vms);
	mutex_unlock(&kf->lock);
	return 0;
}

static long keel_ioc_vm_destroy(struct keel_file *kf, void __user *argp)
{
	struct keel_vm *vm;
	u64 handle;
	int ret;

	if (copy_from_user(&handle, argp, sizeof(handle)))
		return -EFAULT;
	vm = keel_vm_get(kf, handle);
	if (!vm)
		return -ENOENT;
	ret = keel_vm_teardown(vm);
	if (!ret) {
		mutex_lock(&kf->lock);
		if (!list_empty(&vm->node)) {
			list_del_init(&vm->node);
			keel_vm_put(vm);	/* the list's reference */
		}
		mutex_unlock(&kf->lock);
		keel_pool_take_back(NULL);
	}
	keel_vm_put(vm);
	return ret;
}

/*
 * A call on VM `handle` of this file with three more arguments that
 * answers with a status (VCPU_INIT, KEEL_VCPU_IRQ), made under the VM's run
 * lock (shared), so that a teardown waits for it.
 */
static long keel_vm_status_call(struct keel_file *kf, u64 id, u64 handle, u64 a1, u64 a2,
				u64 a3)
{
	struct keel_vm *vm = keel_vm_get(kf, handle);
	long s;

	if (!vm)
		return -ENOENT;
	down_read(&vm->run_lock);
	s = vm->dead ? KEEL_STATUS_INVALID_PARAMETER :
		keel_call_status(id, vm->handle, a1, a2, a3);
	up_read(&vm->run_lock);
	keel_vm_put(vm);
	return keel_status_to_errno(s);
}

static long keel_ioc_vcpu_init(struct keel_file *kf, void __user *argp)
{
	struct keel_vcpu_init_arg a;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	return keel_vm_status_call(kf, KEEL_FN_VCPU_INIT, a.handle, a.vcpu, a.entry, a.x0);
}

static long keel_ioc_vcpu_irq(struct keel_file *kf, void __user *argp)
{
	struct keel_vcpu_irq_arg a;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	return keel_vm_status_call(kf, KEEL_FN_KEEL_VCPU_IRQ, a.handle, a.vcpu, a.intid,
				   a.priority);
}

static long keel_ioc_vcpu_run(struct keel_file *kf, void __user *argp)
{
	struct keel_vcpu_run_arg a;
	struct keel_exit e;
	struct keel_vm *vm;
	u64 completion;
	long s;
	int ret = 0;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	/* The exit is written back after the run consumed it: check now that it can be. */
	if (copy_to_user(argp, &a, sizeof(a)))
		return -EFAULT;
	vm = keel_vm_get(kf, a.handle);
	if (!vm)
		return -ENOENT;
	if (a.vcpu >= vm->nr_vcpus) {
		keel_vm_put(vm);
		return -EINVAL;
	}
	completion = a.completion;
	for (;;) {
		down_read(&vm->run_lock);
		if (vm->dead) {
			up_read(&vm->run_lock);
			ret = -ENOENT;
			break;
		}
		/*
		 * keel switches the V registers through memory but not the SVE
		 * or SME state beyond them: have Linux save this task's FP state
		 * first. Preemption and softirqs stay off until kernel_neon_end();
		 * interrupts do not, and the first one ends the run.
		 */
		kernel_neon_begin();
		s = keel_vcpu_run(vm->handle, a.vcpu, completion, &e);
		kernel_neon_end();
		up_read(&vm->run_lock);
		if (s) {
			ret = keel_status_to_errno(s);
			break;
		}
		completion = 0;	/* consumed by that run */
		if (e.reason != KEEL_EXIT_IRQ || signal_pending(current)) {
			a.reason = e.reason;
			a.x2 = e.x2;
			a.x3 = e.x3;
			a.x4 = e.x4;
			if (copy_to_user(argp, &a, sizeof(a)))
				ret = -EFAULT;
			break;
		}
		cond_resched();
	}
	keel_vm_put(vm);
	return ret;
}

/* Does [ipa, ipa + size) overlap a region of the VM (mem_lock held)? */
static bool keel_vm_overlaps(struct keel_vm *vm, u64 ipa, u64 size)
{
	struct keel_region *r;

	list_for_each_entry(r, &vm->regions, node)
		if (ipa < r->ipa + r->size && r->ipa < ipa + size)
			return true;
	return false;
}

static long keel_ioc_vm_give(struct keel_file *kf, void __user *argp, bool share)
{
	struct keel_fill fill;
	struct keel_region *r;
	struct keel_chunk *c, *t, *run;
	struct keel_mem_arg a;
	struct keel_vm *vm;
	LIST_HEAD(chunks);
	u64 ipa, calls = 0, runs = 0;
	long s = 0;
	int ret;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	if (!a.size || a.size % KEEL_PAGE || a.ipa % KEEL_PAGE || a.ipa + a.size < a.ipa ||
	    a.src_len > a.size || (a.flags & ~KEEL_MEM_FLAGS) || (a.src_len && !a.src))
		return -EINVAL;
	/* Linux's pages: whole ones, never more than half of them for one call. */
	if (!(a.flags & KEEL_MEM_CARVEOUT) && a.size % PAGE_SIZE)
		return -EINVAL;
	if (!(a.flags & KEEL_MEM_CARVEOUT) && a.size / PAGE_SIZE > totalram_pages() / 2)
		return -ENOMEM;
	if (a.src_len && !access_ok((void __user *)a.src, a.src_len))
		return -EFAULT;
	vm = keel_vm_get(kf, a.handle);
	if (!vm)
		return -ENOENT;
	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r) {
		ret = -ENOMEM;
		goto out_put;
	}
	INIT_LIST_HEAD(&r->chunks);
	r->ipa = a.ipa;
	r->size = a.size;
	r->shared = share;

	mutex_lock(&vm->mem_lock);
	ret = -ENOENT;
	if (vm->dead)
		goto out_unlock;
	ret = -EEXIST;
	if (keel_vm_overlaps(vm, a.ipa, a.size))
		goto out_unlock;
	if (a.flags & KEEL_MEM_CARVEOUT)
		ret = keel_alloc_carveout(a.size, &chunks);
	else
		ret = keel_alloc_buddy(a.size, &chunks);
	if (ret)
		goto out_unlock;

	/* Place the chunks, fill them (the image, then zeroes). */
	fill.src = (const char __user *)a.src;
	fill.left = a.src_len;
	ipa = a.ipa;
	list_for_each_entry(c, &chunks, node) {
		c->ipa = ipa;
		ipa += c->nr * KEEL_PAGE;
		ret = keel_chunk_access(c, 0, c->nr * KEEL_PAGE, keel_fill_fn, &fill);
		if (ret) {
			keel_chunks_free(&chunks);
			goto out_unlock;
		}
	}

	/* One call per run of chunks contiguous in both pfn and IPA. */
	while (!list_empty(&chunks)) {
		u64 nr;

		run = list_first_entry(&chunks, struct keel_chunk, node);
		nr = run->nr;
		c = run;
		while (!list_is_last(&c->node, &chunks)) {
			t = list_next_entry(c, node);
			if (t->pfn != run->pfn + nr || t->ipa != run->ipa + nr * KEEL_PAGE)
				break;
			nr += t->nr;
			c = t;
		}
		if (share)
			s = KEEL_CALL_POOL(&calls, keel_vm_share(vm->handle, run->pfn, run->ipa, nr));
		else
			s = KEEL_CALL_POOL(&calls, keel_vm_donate(vm->handle, run->pfn, run->ipa, nr));
		if (s)
			break;
		runs++;
		/* The run is the guest's now: the region owns its chunks. */
		for (;;) {
			t = list_first_entry(&chunks, struct keel_chunk, node);
			list_move_tail(&t->node, &r->chunks);
			atomic64_add(t->nr, &keel_global.guest_pages);
			if (t == c)
				break;
		}
	}
	keel_chunks_free(&chunks);	/* what a failed call left the host */
	if (s && !list_empty(&r->chunks)) {
		/* The part given: from a.ipa to the end of its last chunk. */
		c = list_last_entry(&r->chunks, struct keel_chunk, node);
		r->size = c->ipa + c->nr * KEEL_PAGE - a.ipa;
		/* A share is all or nothing: the part lent comes back now. */
		if (share && !keel_vm_unshare(vm->handle, a.ipa, r->size / KEEL_PAGE)) {
			list_for_each_entry_safe(c, t, &r->chunks, node) {
				list_del(&c->node);
				atomic64_sub(c->nr, &keel_global.guest_pages);
				keel_chunk_free(c);
			}
		}
	}
	if (!list_empty(&r->chunks)) {
		/* A donation that failed part way keeps the part given: it comes back with the VM. */
		list_add_tail(&r->node, &vm->regions);
		r = NULL;
	}
	ret = keel_status_to_errno(s);
	if (!ret && !share)
		keel_pool_ensure(&calls);
out_unlock:
	mutex_unlock(&vm->mem_lock);
	kfree(r);
	if (!ret) {
		a.hypercalls = calls;
		a.runs = runs;
		if (copy_to_user(argp, &a, sizeof(a)))
			ret = -EFAULT;
	}
out_put:
	keel_vm_put(vm);
	return ret;
}

static long keel_ioc_vm_unshare(struct keel_file *kf, void __user *argp)
{
	struct keel_range_arg a;
	struct keel_region *r, *found = NULL;
	struct keel_chunk *c, *t;
	struct keel_vm *vm;
	long s;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	vm = keel_vm_get(kf, a.handle);
	if (!vm)
		return -ENOENT;
	mutex_lock(&vm->mem_lock);
	list_for_each_entry(r, &vm->regions, node)
		if (r->shared && r->ipa == a.ipa && r->size == a.size)
			found = r;
	s = KEEL_STATUS_INVALID_PARAMETER;
	if (found && !vm->dead) {
		s = keel_vm_unshare(vm->handle, a.ipa, a.size / KEEL_PAGE);
		if (!s) {
			list_for_each_entry_safe(c, t, &found->chunks, node) {
				list_del(&c->node);
				atomic64_sub(c->nr, &keel_global.guest_pages);
				keel_chunk_free(c);
			}
			list_del(&found->node);
			kfree(found);
		}
	}
	mutex_unlock(&vm->mem_lock);
	keel_vm_put(vm);
	return keel_status_to_errno(s);
}

static long keel_ioc_vm_mem_state(struct keel_file *kf, void __user *argp)
{
	struct keel_vm_mem_state_arg a;
	struct keel_vm_mem_state st;
	struct keel_vm *vm;
	long s;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	vm = keel_vm_get(kf, a.handle);
	if (!vm)
		return -ENOENT;
	down_read(&vm->run_lock);
	s = vm->dead ? KEEL_STATUS_INVALID_PARAMETER : keel_vm_mem_state(vm->handle, a.ipa, &st);
	up_read(&vm->run_lock);
	keel_vm_put(vm);
	if (s)
		return keel_status_to_errno(s);
	a.pfn = st.pfn;
	a.state = st.state;
	a.map_size = st.map_size;
	return copy_to_user(argp, &a, sizeof(a)) ? -EFAULT : 0;
}

/*
 * The host pfn behind a guest IPA that the host may touch (mem_lock held):
 * a page the host lent, or one the guest shared with it (then *borrowed).
 */
static int keel_vm_host_page(struct keel_vm *vm, u64 ipa, u64 *pfn,
			     struct keel_chunk **chunk, bool *borrowed)
{
	struct keel_vm_mem_state st;
	bool lent;
	long s;

	s = keel_vm_mem_state(vm->handle, ipa, &st);
	if (s)
		return keel_status_to_errno(s);
	*chunk = keel_vm_chunk_of(vm, st.pfn, &lent);
	if (!*chunk)
		return -EPERM;
	if (lent && st.state == KEEL_PAGE_SHARED_BORROWED) {
		*borrowed = false;
	} else if (!lent && st.state == KEEL_PAGE_SHARED_OWNED) {
		*borrowed = true;
	} else {
		return -EPERM;	/* private to the guest */
	}
	*pfn = st.pfn;
	return 0;
}

struct keel_copy {
	char __user *buf;
	bool write;
};

static int keel_copy_fn(void *va, u64 len, void *ctx)
{
	struct keel_copy *k = ctx;
	int ret;

	/* The guest may have written it with its MMU off, past the caches. */
	keel_dcache_clean_inval(va, len);
	if (k->write)
		ret = copy_from_user(va, k->buf, len) ? -EFAULT : 0;
	else
		ret = copy_to_user(k->buf, va, len) ? -EFAULT : 0;
	if (k->write)
		keel_dcache_clean_inval(va, len);
	k->buf += len;
	return ret;
}

static long keel_ioc_vm_rw(struct keel_file *kf, void __user *argp)
{
	struct keel_copy k;
	struct keel_rw_arg a;
	struct keel_vm *vm;
	int ret = 0;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	if (!a.len || a.len > RW_MAX || (a.flags & ~KEEL_RW_WRITE) || a.ipa + a.len < a.ipa)
		return -EINVAL;
	if (!access_ok((void __user *)a.buf, a.len))
		return -EFAULT;
	vm = keel_vm_get(kf, a.handle);
	if (!vm)
		return -ENOENT;
	k.buf = (char __user *)a.buf;
	k.write = a.flags & KEEL_RW_WRITE;
	mutex_lock(&vm->mem_lock);
	while (!ret && a.len) {
		u64 off = a.ipa & (KEEL_PAGE - 1), n = min(a.len, KEEL_PAGE - off), pfn;
		struct keel_chunk *c;
		bool borrowed;

		ret = vm->dead ? -ENOENT :
			keel_vm_host_page(vm, a.ipa - off, &pfn, &c, &borrowed);
		if (ret)
			break;
		/* A pin keeps the guest from taking the page back meanwhile. */
		if (borrowed && keel_host_pin(pfn, 1)) {
			ret = -EPERM;
			break;
		}
		ret = keel_chunk_access(c, KEEL_PA(pfn - c->pfn) + off, n, keel_copy_fn, &k);
		if (borrowed)
			keel_host_unpin(pfn, 1);
		a.ipa += n;
		a.len -= n;
	}
	mutex_unlock(&vm->mem_lock);
	keel_vm_put(vm);
	return ret;
}

static long keel_ioc_pin(struct keel_file *kf, void __user *argp, bool pin)
{
	struct keel_pin_arg a;
	struct keel_pin *p;
	struct keel_vm *vm;
	LIST_HEAD(done);
	u64 i;
	int ret = 0;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	if (!a.nr || a.nr > SZ_2M_PAGES || a.ipa % KEEL_PAGE ||
	    a.ipa + a.nr * KEEL_PAGE < a.ipa)
		return -EINVAL;
	vm = keel_vm_get(kf, a.handle);
	if (!vm)
		return -ENOENT;
	mutex_lock(&vm->mem_lock);
	/*
	 * UNPIN checks every page first (a page of the guest's with a pin of
	 * ours), then drops the pins, which keel cannot refuse then: all or
	 * nothing, as PIN is.
	 */
	for (i = 0; i < a.nr && !ret && !pin; i++) {
		struct keel_chunk *c;
		struct keel_pin *q;
		bool borrowed, found = false;
		u64 pfn;

		ret = vm->dead ? -ENOENT :
			keel_vm_host_page(vm, a.ipa + i * KEEL_PAGE, &pfn, &c, &borrowed);
		if (!ret && !borrowed)
			ret = -EPERM;
		if (ret)
			break;
		list_for_each_entry(q, &vm->pins, node)
			found |= q->pfn == pfn;
		if (!found)
			ret = -EINVAL;	/* no pin of ours */
	}
	for (i = 0; i < a.nr && !ret; i++) {
		struct keel_chunk *c;
		bool borrowed;
		u64 pfn;

		ret = vm->dead ? -ENOENT :
			keel_vm_host_page(vm, a.ipa + i * KEEL_PAGE, &pfn, &c, &borrowed);
		if (!ret && !borrowed)
			ret = -EPERM;	/* only pages the guest shared are pinned */
		if (ret)
			break;
		if (pin) {
			p = kzalloc(sizeof(*p), GFP_KERNEL);
			if (!p) {
				ret = -ENOMEM;
				break;
			}
			ret = keel_status_to_errno(keel_host_pin(pfn, 1));
			if (ret) {
				kfree(p);
				break;
			}
			p->pfn = pfn;
			list_add(&p->node, &done);
		} else {
			struct keel_pin *q, *found = NULL;

			list_for_each_entry(q, &vm->pins, node)
				if (q->pfn == pfn)
					found = q;
			if (!found) {
				ret = -EINVAL;	/* no pin of ours */
				break;
			}
			ret = keel_status_to_errno(keel_host_unpin(pfn, 1));
			if (ret)
				break;
			list_del(&found->node);
			kfree(found);
		}
	}
	if (pin && ret) {
		/* All or nothing: drop the pins this call took. */
		struct keel_pin *t;

		list_for_each_entry_safe(p, t, &done, node) {
			keel_host_unpin(p->pfn, 1);
			list_del(&p->node);
			kfree(p);
		}
	}
	list_splice(&done, &vm->pins);
	mutex_unlock(&vm->mem_lock);
	keel_vm_put(vm);
	return ret;
}

static long keel_ioc_reclaim(void __user *argp)
{
	struct keel_reclaim_arg a = { 0 };
	struct keel_chunk *c, *t;
	LIST_HEAD(chunks);

	keel_pool_take_back(&a.pages);
	mutex_lock(&keel_global.lock);
	list_splice_init(&keel_global.leaked, &chunks);
	mutex_unlock(&keel_global.lock);
	list_for_each_entry_safe(c, t, &chunks, node) {
		if (!keel_take_back(c->pfn, c->nr))
			continue;
		list_del(&c->node);
		atomic64_sub(c->nr, &keel_global.leaked_pages);
		a.pages += c->nr;
		keel_chunk_free(c);
	}
	mutex_lock(&keel_global.lock);
	list_splice(&chunks, &keel_global.leaked);
	mutex_unlock(&keel_global.lock);
	return copy_to_user(argp, &a, sizeof(a)) ? -EFAULT : 0;
}

static long keel_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct keel_file *kf = file->private_data;
	void __user *argp = (void __user *)arg;

	switch (cmd) {
	case KEEL_IOC_INFO:
		return keel_ioc_info(argp);
	case KEEL_IOC_MEM_STATE:
		return keel_ioc_mem_state(argp);
	case KEEL_IOC_HYP_STATS:
		return keel_ioc_hyp_stats(argp);
	case KEEL_IOC_VM_CREATE:
		return keel_ioc_vm_create(kf, argp);
	case KEEL_IOC_VM_DESTROY:
		return keel_ioc_vm_destroy(kf, argp);
	case KEEL_IOC_VCPU_INIT:
		return keel_ioc_vcpu_init(kf, argp);
	case KEEL_IOC_VCPU_RUN:
		return keel_ioc_vcpu_run(kf, argp);
	case KEEL_IOC_VM_DONATE:
		return keel_ioc_vm_give(kf, argp, false);
	case KEEL_IOC_VM_SHARE:
		return keel_ioc_vm_give(kf, argp, true);
	case KEEL_IOC_VM_UNSHARE:
		return keel_ioc_vm_unshare(kf, argp);
	case KEEL_IOC_VM_MEM_STATE:
		return keel_ioc_vm_mem_state(kf, argp);
	case KEEL_IOC_PIN:
		return keel_ioc_pin(kf, argp, true);
	case KEEL_IOC_UNPIN:
		return keel_ioc_pin(kf, argp, false);
	case KEEL_IOC_VM_RW:
		return keel_ioc_vm_rw(kf, argp);
	case KEEL_IOC_RECLAIM:
		return keel_ioc_reclaim(argp);
	case KEEL_IOC_VCPU_IRQ:
		return keel_ioc_vcpu_irq(kf, argp);
	default:
		return -ENOTTY;
	}
}

static int keel_open(struct inode *inode, struct file *file)
{
	struct keel_file *kf = kzalloc(sizeof(*kf), GFP_KERNEL);

	if (!kf)
		return -ENOMEM;
	mutex_init(&kf->lock);
	INIT_LIST_HEAD(&kf->vms);
	file->private_data = kf;
	return nonseekable_open(inode, file);
}

/* The last reference to the file is gone: its VMs go, their memory returns. */
static int keel_release(struct inode *inode, struct file *file)
{
	struct keel_file *kf = file->private_data;
	struct keel_vm *vm, *t;

	list_for_each_entry_safe(vm, t, &kf->vms, node) {
		list_del_init(&vm->node);
		if (keel_vm_teardown(vm))
			keel_vm_leak_all(vm);
		keel_vm_put(vm);
	}
	keel_pool_take_back(NULL);
	kfree(kf);
	return 0;
}

static const struct file_operations keel_fops = {
	.owner = THIS_MODULE,
	.open = keel_open,
	.release = keel_release,
	.unlocked_ioctl = keel_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = no_llseek,
};

static struct miscdevice keel_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "keel",
	.fops = &keel_fops,
	.mode = 0600,
};

/* ---- discovery and the carveout ---- */

/*
 * Is there a hypervisor at EL2 to answer an HVC? An HVC with no EL2 is
 * undefined (an oops), and from a kernel that itself runs at EL2 it traps
 * to that kernel: both are refused before any call is made.
 */
static int keel_find_hypervisor(void)
{
	u64 pfr0 = read_sysreg_s(SYS_ID_AA64PFR0_EL1);

	if (is_kernel_in_hyp_mode()) {
		pr_err("Linux runs at EL2 itself: no hypervisor beneath it\n");
		return -ENODEV;
	}
	if (!((pfr0 >> ID_AA64PFR0_EL1_EL2_SHIFT) & 0xf)) {
		pr_err("this CPU has no EL2: no hypervisor (keel boots first, then Linux)\n");
		return -ENODEV;
	}
	if (keel_probe() != KEEL_STATUS_SUCCESS) {
		pr_err("the hypervisor is not keel (CALL_UID/REVISION do not match ABI 1.x)\n");
		return -ENODEV;
	}
	keel_revision(&keel_global.revision_major, &keel_global.revision_minor);
	keel_global.feature_bits = keel_features();
	if (keel_hyp_features(&keel_global.features) != KEEL_STATUS_SUCCESS) {
		pr_err("HYP_FEATURES failed\n");
		return -ENODEV;
	}
	return 0;
}

static int keel_carveout_init(void)
{
	struct keel_mem_state st;
	char *at;
	u64 size, base, pa, step;

	if (!carveout || !*carveout)
		return 0;
	size = memparse(carveout, &at);
	if (*at != '@') {
		pr_err("carveout=%s: expected SIZE@BASE\n", carveout);
		return -EINVAL;
	}
	base = memparse(at + 1, &at);
	if (*at || !size || (base | size) & (SZ_2M - 1) || base + size < base) {
		pr_err("carveout=%s: base and size must be 2 MiB multiples\n", carveout);
		return -EINVAL;
	}
	if (region_intersects(base, size, IORESOURCE_SYSTEM_RAM, IORES_DESC_NONE) !=
	    REGION_DISJOINT) {
		pr_err("carveout=%s: Linux uses part of it (boot with mem= below it)\n", carveout);
		return -EINVAL;
	}
	/* Every page host RAM in keel's view: a mapping at a time. */
	for (pa = base; pa < base + size; pa += step) {
		if (keel_mem_state(KEEL_PFN(pa), &st) || st.owner != KEEL_OWNER_HOST ||
		    st.state != KEEL_PAGE_OWNED) {
			pr_err("carveout=%s: %#llx is not host RAM in the hypervisor's view\n",
			       carveout, pa);
			return -EINVAL;
		}
		step = max_t(u64, st.map_size, KEEL_PAGE);
		step -= pa & (step - 1);
	}
	keel_global.co_units = size >> 21;
	keel_global.co_map = bitmap_zalloc(keel_global.co_units, GFP_KERNEL);
	if (!keel_global.co_map)
		return -ENOMEM;
	keel_global.co_base = base;
	keel_global.co_size = size;
	/* Shown in /proc/iomem, not busy: /dev/mem may still map it. */
	keel_global.co_res.name = "keel guest memory";
	keel_global.co_res.start = base;
	keel_global.co_res.end = base + size - 1;
	keel_global.co_res.flags = IORESOURCE_MEM;
	if (insert_resource(&iomem_resource, &keel_global.co_res)) {
		pr_err("carveout=%s: another resource claims part of it\n", carveout);
		bitmap_free(keel_global.co_map);
		keel_global.co_map = NULL;
		return -EBUSY;
	}
	keel_global.co_res_inserted = true;
	pr_info("carveout %#llx..%#llx for guests\n", base, base + size);
	return 0;
}

static void keel_carveout_exit(void)
{
	if (keel_global.co_res_inserted)
		remove_resource(&keel_global.co_res);
	bitmap_free(keel_global.co_map);
	keel_global.co_map = NULL;
}

static int __init keel_init(void)
{
	int ret;

	mutex_init(&keel_global.lock);
	INIT_LIST_HEAD(&keel_global.pool);
	INIT_LIST_HEAD(&keel_global.leaked);
	ret = keel_find_hypervisor();
	if (ret)
		return ret;
	ret = keel_carveout_init();
	if (ret)
		return ret;
	ret = misc_register(&keel_misc);
	if (ret) {
		keel_carveout_exit();
		return ret;
	}
	pr_info("hypervisor ABI %llu.%llu, features %#llx, blocks %#llx, %llu VMs of %llu vCPUs: /dev/keel\n",
		keel_global.revision_major, keel_global.revision_minor, keel_global.feature_bits,
		keel_global.features.block_sizes, keel_global.features.max_vms,
		keel_global.features.max_vcpus);
	return 0;
}

static void __exit keel_exit(void)
{
	struct keel_chunk *c, *t;
	u64 kept = 0;

	misc_deregister(&keel_misc);
	/* Every file is closed: no VM is left, the whole pool can come back. */
	keel_pool_take_back(NULL);
	list_for_each_entry_safe(c, t, &keel_global.pool, node) {
		kept += c->nr;	/* keel still uses them: never freed */
		list_del(&c->node);
		kfree(c);
	}
	list_for_each_entry_safe(c, t, &keel_global.leaked, node) {
		if (keel_take_back(c->pfn, c->nr)) {
			list_del(&c->node);
			keel_chunk_free(c);
			continue;
		}
		kept += c->nr;
		list_del(&c->node);
		kfree(c);
	}
	if (kept)
		pr_warn("%llu pages stay with the hypervisor and are not freed\n", kept);
	keel_carveout_exit();
}

module_init(keel_init);
module_exit(keel_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Host driver for the keel hypervisor: VMs through /dev/keel");
