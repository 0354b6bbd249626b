/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/* Test stand-in, see ../README. */
#ifndef KSTUB_LINUX_TYPES_H
#define KSTUB_LINUX_TYPES_H
typedef unsigned long long u64;
#endif
