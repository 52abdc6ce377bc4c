// SPDX-License-Identifier: GPL-2.0
/* Asks the kernel for an in-tree module it does not depend on, as xtables' targets ask for
 * ip_tables: request_module("ip_tables") runs /proc/sys/kernel/modprobe (in kvc's verification
 * VM, kvc's modprobe on the guest's module tree), which loads x_tables and ip_tables. The init
 * fails unless ip_tables is then loaded (its export ipt_alloc_initial_table can be looked up).
 * Its softdep (modprobe loads xt_tcpudp after it) is for the loader to honour. */
#include <linux/init.h>
#include <linux/kmod.h>
#include <linux/module.h>

static int __init kvc_requests_intree_init(void)
{
	int err = request_module("ip_tables");
	void *alloc = __symbol_get("ipt_alloc_initial_table");

	if (!alloc) {
		pr_err("kvc_requests_intree: request_module(ip_tables) returned %d and ip_tables is not loaded\n", err);
		return -ENOENT;
	}
	__symbol_put("ipt_alloc_initial_table");
	pr_info("kvc_requests_intree: request_module(ip_tables) returned %d, ip_tables is loaded\n", err);
	return 0;
}

static void __exit kvc_requests_intree_exit(void)
{
}

module_init(kvc_requests_intree_init);
module_exit(kvc_requests_intree_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvc test module that requests an in-tree module at init");
MODULE_SOFTDEP("post: xt_tcpudp");
