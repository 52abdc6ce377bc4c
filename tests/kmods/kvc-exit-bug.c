// SPDX-License-Identifier: GPL-2.0
/* Loads fine and hits BUG() in its exit function: with a second module the kernel refuses
 * (kvc-refuse-no-newline), the rollback that removes this one crashes the kernel, as a module's
 * exit did for xtables-addons. Verification must tell what led there: inserted, refused, rollback. */
#include <linux/bug.h>
#include <linux/init.h>
#include <linux/module.h>

static int __init kvc_exit_bug_init(void)
{
	pr_info("kvc_exit_bug: loaded\n");
	return 0;
}

static void __exit kvc_exit_bug_exit(void)
{
	pr_info("kvc_exit_bug: about to BUG() in exit\n");
	BUG();
}

module_init(kvc_exit_bug_init);
module_exit(kvc_exit_bug_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvc test module that crashes the kernel when removed");
