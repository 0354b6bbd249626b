/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/* Test stand-in, see ../README: the two call forms keel_hyp.h uses. */
#ifndef KSTUB_LINUX_ARM_SMCCC_H
#define KSTUB_LINUX_ARM_SMCCC_H

struct arm_smccc_res {
	unsigned long a0, a1, a2, a3;
};

struct arm_smccc_1_2_regs {
	unsigned long a0, a1, a2, a3, a4, a5, a6, a7, a8;
	unsigned long a9, a10, a11, a12, a13, a14, a15, a16, a17;
};

void arm_smccc_1_2_hvc(const struct arm_smccc_1_2_regs *args,
		       struct arm_smccc_1_2_regs *res);

/* The kernel's form is a variadic macro ending in the result pointer. */
void kstub_hvc_1_1(unsigned long a0, unsigned long a1, unsigned long a2,
		   unsigned long a3, unsigned long a4, struct arm_smccc_res *res);
#define arm_smccc_1_1_hvc(...) kstub_hvc_1_1(__VA_ARGS__)

#endif
