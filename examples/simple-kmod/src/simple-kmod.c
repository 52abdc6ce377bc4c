// SPDX-License-Identifier: GPL-2.0
/*
 * simple-kmod: the smallest useful out-of-tree module. It logs one line
 * when it is loaded and one when it is removed, and carries the version
 * string it was built with (KMODVER) so that `modinfo -F version` can be
 * checked against the instance configuration.
 */

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/module.h>

/*
 * The Makefile passes KMODVER as a C string literal (-DKMODVER='"1.0.0"').
 * Quoting it there, rather than stringifying a bare token here, keeps
 * versions such as "2.0-linux" intact: the compiler predefines `linux` and
 * `unix` as 1 in GNU mode, which a stringifying macro would expand.
 */
#ifndef KMODVER
#define KMODVER "0.0.0-unversioned"
#endif

static int __init simple_kmod_init(void)
{
	pr_info("Hello world from simple_kmod.\n");
	return 0;
}

static void __exit simple_kmod_exit(void)
{
	pr_info("Goodbye world from simple_kmod.\n");
}

module_init(simple_kmod_init);
module_exit(simple_kmod_exit);

MODULE_LICENSE("GPL");
MODULE_VERSION(KMODVER);
MODULE_AUTHOR("kvc authors");
MODULE_DESCRIPTION("Example module for kvc: logs a greeting on load and unload");
