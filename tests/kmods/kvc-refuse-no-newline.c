// SPDX-License-Identifier: GPL-2.0
/* Refuses to load (EINVAL) after logging its reason without a trailing newline: the kernel keeps
 * such a line open for a continuation, and /dev/kmsg shows it only once another record follows. */
#include <linux/errno.h>
#include <linux/init.h>
#include <linux/module.h>

static int __init kvc_refuse_no_newline_init(void)
{
	pr_err("kvc_refuse_no_newline: no table for this family, refusing");
	return -EINVAL;
}

module_init(kvc_refuse_no_newline_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvc test module that the kernel refuses, with a reason that has no newline");
