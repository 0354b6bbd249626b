/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/* Test stand-in, see ../README. */
#ifndef KSTUB_LINUX_ERRNO_H
#define KSTUB_LINUX_ERRNO_H
#define EPERM		1
#define EIO		5
#define ENOMEM		12
#define EBUSY		16
#define EINVAL		22
#define EOPNOTSUPP	95
#endif
