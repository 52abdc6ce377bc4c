// SPDX-License-Identifier: GPL-2.0
/*
 * kvc-edu: a driver for QEMU's "edu" teaching device (PCI 1234:11e8, qemu -device edu), the
 * hardware of kvc's hotplug example. It binds by its PCI ID (MODULE_DEVICE_TABLE, so the module
 * carries the alias udev and modprobe load it by), checks that the card answers (identification
 * and liveness registers), and gives every bound device two sysfs attributes:
 *
 *   ident      the card's version, "MAJOR.MINOR", from its identification register
 *   factorial  write N: the card computes N! (modulo 2^32, in its own 32-bit register);
 *              read: the last result the card computed
 *
 * e.g. echo 10 > /sys/bus/pci/drivers/kvc_edu/0000:00:04.0/factorial, then read 3628800.
 *
 * The card's registers (QEMU's docs/specs/edu.rst): 0x00 identification 0xRRrr00ed, 0x04
 * liveness (reads back the inverse of what was written), 0x08 factorial, 0x20 status (bit 0:
 * computing). Only 32-bit accesses below 0x80.
 */
#include <linux/device.h>
#include <linux/iopoll.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8

#define EDU_REG_IDENT 0x00
#define EDU_REG_LIVENESS 0x04
#define EDU_REG_FACTORIAL 0x08
#define EDU_REG_STATUS 0x20
#define EDU_STATUS_COMPUTING 0x01
#define EDU_IDENT_MAGIC 0xed

#define EDU_LIVENESS_PROBE 0x6b7663u /* "kvc" */
#define EDU_COMPUTE_TIMEOUT_US 1000000

struct edu {
	void __iomem *regs;
	struct mutex lock; /* one factorial at a time: the card has one register for it */
};

static ssize_t ident_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct edu *edu = dev_get_drvdata(dev);
	u32 ident = readl(edu->regs + EDU_REG_IDENT);

	return sysfs_emit(buf, "%u.%u\n", ident >> 24, (ident >> 16) & 0xff);
}
static DEVICE_ATTR_RO(ident);

static ssize_t factorial_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct edu *edu = dev_get_drvdata(dev);
	u32 value;

	mutex_lock(&edu->lock);
	value = readl(edu->regs + EDU_REG_FACTORIAL);
	mutex_unlock(&edu->lock);
	return sysfs_emit(buf, "%u\n", value);
}

static ssize_t factorial_store(struct device *dev, struct device_attribute *attr, const char *buf, size_t count)
{
	struct edu *edu = dev_get_drvdata(dev);
	u32 number, status;
	int err;

	err = kstrtou32(buf, 0, &number);
	if (err)
		return err;
	mutex_lock(&edu->lock);
	writel(number, edu->regs + EDU_REG_FACTORIAL);
	err = readl_poll_timeout(edu->regs + EDU_REG_STATUS, status, !(status & EDU_STATUS_COMPUTING), 10,
				 EDU_COMPUTE_TIMEOUT_US);
	mutex_unlock(&edu->lock);
	if (err) {
		dev_err(dev, "the card did not finish %u! in %d us\n", number, EDU_COMPUTE_TIMEOUT_US);
		return err;
	}
	return count;
}
static DEVICE_ATTR_RW(factorial);

static struct attribute *edu_attrs[] = {
	&dev_attr_ident.attr,
	&dev_attr_factorial.attr,
	NULL,
};
ATTRIBUTE_GROUPS(edu);

static int edu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct edu *edu;
	u32 ident, inverse;
	int err;

	edu = devm_kzalloc(&pdev->dev, sizeof(*edu), GFP_KERNEL);
	if (!edu)
		return -ENOMEM;
	mutex_init(&edu->lock);
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = pcim_iomap_regions(pdev, BIT(0), KBUILD_MODNAME);
	if (err)
		return err;
	edu->regs = pcim_iomap_table(pdev)[0];

	ident = readl(edu->regs + EDU_REG_IDENT);
	if ((ident & 0xff) != EDU_IDENT_MAGIC) {
		dev_err(&pdev->dev, "identification register reads %#010x, not an edu card\n", ident);
		return -ENODEV;
	}
	writel(EDU_LIVENESS_PROBE, edu->regs + EDU_REG_LIVENESS);
	inverse = readl(edu->regs + EDU_REG_LIVENESS);
	if (inverse != ~EDU_LIVENESS_PROBE) {
		dev_err(&pdev->dev, "liveness check failed: wrote %#x, read %#x\n", EDU_LIVENESS_PROBE, inverse);
		return -EIO;
	}
	pci_set_drvdata(pdev, edu);
	dev_info(&pdev->dev, "edu card version %u.%u bound\n", ident >> 24, (ident >> 16) & 0xff);
	return 0;
}

static void edu_remove(struct pci_dev *pdev)
{
	dev_info(&pdev->dev, "edu card unbound\n");
}

static const struct pci_device_id edu_ids[] = {
	{ PCI_DEVICE(EDU_VENDOR, EDU_DEVICE) },
	{}
};
MODULE_DEVICE_TABLE(pci, edu_ids);

static struct pci_driver edu_driver = {
	.name = KBUILD_MODNAME,
	.id_table = edu_ids,
	.probe = edu_probe,
	.remove = edu_remove,
	.dev_groups = edu_groups,
};
module_pci_driver(edu_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Driver for QEMU's edu device: its factorial unit through sysfs");
MODULE_VERSION(KMODVER);
