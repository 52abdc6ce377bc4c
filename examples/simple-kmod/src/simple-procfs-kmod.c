// SPDX-License-Identifier: GPL-2.0
/*
 * simple-procfs-kmod: exposes one integer through /proc/simple-procfs-kmod.
 *
 *   read   -> "simple-procfs-kmod number = N\n"
 *   write  -> an integer in decimal (optionally followed by a newline)
 *             sets N; anything else fails with -EINVAL.
 *
 * N starts at the value of the `number` module parameter, which can also be
 * read and changed through /sys/module/simple_procfs_kmod/parameters/number.
 *
 * Reads go through seq_file, so any offset and any buffer size work and a
 * reader that reads the line in pieces sees one consistent snapshot.
 */

#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>
#include <linux/version.h>

#ifndef KMODVER
#define KMODVER "0.0.0-unversioned"
#endif

/*
 * struct proc_ops replaced struct file_operations for /proc entries in
 * Linux 5.6. Distribution kernels that backported it can force the choice
 * with -DSPK_USE_PROC_OPS=1 (or 0).
 */
#ifndef SPK_USE_PROC_OPS
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 6, 0)
#define SPK_USE_PROC_OPS 1
#else
#define SPK_USE_PROC_OPS 0
#endif
#endif

#define SPK_PROC_NAME "simple-procfs-kmod"
/* Longest accepted write: "-2147483648" plus a newline, with room to spare. */
#define SPK_WRITE_MAX 32

static int number;
module_param(number, int, 0644);
MODULE_PARM_DESC(number, "The number shown in /proc/" SPK_PROC_NAME " (default 0)");

static struct proc_dir_entry *spk_entry;

static int spk_show(struct seq_file *m, void *v)
{
	seq_printf(m, SPK_PROC_NAME " number = %d\n", READ_ONCE(number));
	return 0;
}

static int spk_open(struct inode *inode, struct file *file)
{
	return single_open(file, spk_show, NULL);
}

static ssize_t spk_write(struct file *file, const char __user *ubuf,
			 size_t count, loff_t *ppos)
{
	char buf[SPK_WRITE_MAX];
	int value;

	if (count == 0 || count >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, count))
		return -EFAULT;
	buf[count] = '\0';

	/* kstrtoint accepts one trailing newline and rejects everything else. */
	if (kstrtoint(buf, 10, &value))
		return -EINVAL;

	WRITE_ONCE(number, value);
	*ppos += count;
	return count;
}

#if SPK_USE_PROC_OPS
static const struct proc_ops spk_ops = {
	.proc_open = spk_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = spk_write,
};
#else
static const struct file_operations spk_ops = {
	.owner = THIS_MODULE,
	.open = spk_open,
	.read = seq_read,
	.llseek = seq_lseek,
	.release = single_release,
	.write = spk_write,
};
#endif

static int __init spk_init(void)
{
	spk_entry = proc_create(SPK_PROC_NAME, 0644, NULL, &spk_ops);
	if (!spk_entry) {
		pr_err(SPK_PROC_NAME ": cannot create /proc/" SPK_PROC_NAME "\n");
		return -ENOMEM;
	}
	pr_info(SPK_PROC_NAME ": hello\n");
	return 0;
}

static void __exit spk_exit(void)
{
	proc_remove(spk_entry);
	pr_info(SPK_PROC_NAME ": bye\n");
}

module_init(spk_init);
module_exit(spk_exit);

MODULE_LICENSE("GPL");
MODULE_VERSION(KMODVER);
MODULE_AUTHOR("kvc authors");
MODULE_DESCRIPTION("Example module for kvc: one integer in /proc/" SPK_PROC_NAME);
