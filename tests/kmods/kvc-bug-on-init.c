// SPDX-License-Identifier: GPL-2.0
/* Hits BUG() in its init function: the guest kernel oopses (and, booted with oops=panic,
 * panics), so verification must report a crash instead of hanging. */
#include <linux/bug.h>
#include <linux/init.h>
#include <linux/module.h>

static int __init kvc_bug_on_init_init(void)
{
	pr_info("kvc_bug_on_init: about to BUG()\n");
	BUG();
	return 0;
}

module_init(kvc_bug_on_init_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvc test module that crashes the kernel when loaded");
