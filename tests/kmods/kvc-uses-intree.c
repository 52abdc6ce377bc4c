// SPDX-License-Identifier: GPL-2.0
/* Uses functions that in-tree modules export (crc_itu_t from crc-itu-t.ko, and udp_tunnel.ko's
 * udp_tunnel_sock_release): verification must load those from the guest kernel's own tree first
 * and unload them again afterwards. */
#include <linux/crc-itu-t.h>
#include <linux/init.h>
#include <linux/module.h>
#include <net/udp_tunnel.h>

static int __init kvc_uses_intree_init(void)
{
	static const u8 data[] = "kvc";
	void (*volatile release)(struct socket *sock) = udp_tunnel_sock_release;

	pr_info("kvc_uses_intree: crc_itu_t(kvc) = 0x%04x, using %ps\n", crc_itu_t(0, data, sizeof(data) - 1),
		release);
	return 0;
}

static void __exit kvc_uses_intree_exit(void)
{
}

module_init(kvc_uses_intree_init);
module_exit(kvc_uses_intree_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvc test module that needs in-tree modules");
