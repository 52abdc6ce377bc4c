// SPDX-License-Identifier: GPL-2.0
/* Imports a function no kernel and no module exports: the kernel refuses it with ENOENT and
 * logs "Unknown symbol kvc_symbol_nobody_exports". */
#include <linux/init.h>
#include <linux/module.h>

extern int kvc_symbol_nobody_exports(void);

static int __init kvc_unknown_symbol_init(void)
{
	return kvc_symbol_nobody_exports();
}

static void __exit kvc_unknown_symbol_exit(void)
{
}

module_init(kvc_unknown_symbol_init);
module_exit(kvc_unknown_symbol_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvc test module with an unresolvable import");
