// SPDX-License-Identifier: GPL-2.0
/* A module that loads and unloads cleanly: built against another kernel's headers, it is the
 * module "built for another kernel release" the real kernel refuses. */
#include <linux/init.h>
#include <linux/module.h>

static int __init kvc_hello_init(void)
{
	pr_info("kvc_hello: hello\n");
	return 0;
}

static void __exit kvc_hello_exit(void)
{
	pr_info("kvc_hello: bye\n");
}

module_init(kvc_hello_init);
module_exit(kvc_hello_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvc test module that says hello");
