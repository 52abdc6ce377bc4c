// SPDX-License-Identifier: GPL-2.0
/*
 * spkut: simple-procfs-kmod userspace tool.
 *
 *   spkut N
 *
 * Prints the current line of /proc/simple-procfs-kmod, writes N to it,
 * reads it back and prints the new line. Exits 0 only if the number read
 * back equals N; 1 on any failure; 2 on a usage error.
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PROC_PATH "/proc/simple-procfs-kmod"
#define LINE_PREFIX "simple-procfs-kmod number = "

static const char *prog = "spkut";

static void usage(void)
{
	fprintf(stderr,
		"usage: %s N\n"
		"  Show the number in " PROC_PATH ", set it to the integer N and show it again.\n",
		prog);
}

/* Parses a whole decimal int (leading sign allowed, nothing after it). */
static int parse_int(const char *text, int *out)
{
	char *end;
	long value;

	if (*text == '\0')
		return -1;
	errno = 0;
	value = strtol(text, &end, 10);
	if (errno != 0 || *end != '\0' || end == text)
		return -1;
	if (value < INT_MIN || value > INT_MAX)
		return -1;
	*out = (int)value;
	return 0;
}

/* Reads the whole file from offset 0 into buf (NUL-terminated). */
static int read_line(int fd, char *buf, size_t size)
{
	size_t used = 0;

	if (lseek(fd, 0, SEEK_SET) < 0) {
		fprintf(stderr, "%s: cannot seek in %s: %s\n", prog, PROC_PATH, strerror(errno));
		return -1;
	}
	while (used < size - 1) {
		ssize_t got = read(fd, buf + used, size - 1 - used);

		if (got < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "%s: cannot read %s: %s\n", prog, PROC_PATH, strerror(errno));
			return -1;
		}
		if (got == 0)
			break;
		used += (size_t)got;
	}
	buf[used] = '\0';
	if (used == 0) {
		fprintf(stderr, "%s: %s is empty\n", prog, PROC_PATH);
		return -1;
	}
	return 0;
}

static int write_number(int fd, int value)
{
	char text[32];
	int len = snprintf(text, sizeof(text), "%d\n", value);
	ssize_t done;

	if (lseek(fd, 0, SEEK_SET) < 0) {
		fprintf(stderr, "%s: cannot seek in %s: %s\n", prog, PROC_PATH, strerror(errno));
		return -1;
	}
	do {
		done = write(fd, text, (size_t)len);
	} while (done < 0 && errno == EINTR);
	if (done < 0) {
		fprintf(stderr, "%s: cannot write %d to %s: %s\n", prog, value, PROC_PATH,
			strerror(errno));
		return -1;
	}
	if (done != len) {
		fprintf(stderr, "%s: short write to %s (%zd of %d bytes)\n", prog, PROC_PATH, done,
			len);
		return -1;
	}
	return 0;
}

/* Prints a line read from the proc file, adding a newline if it has none. */
static void show(const char *line)
{
	size_t len = strlen(line);

	fputs(line, stdout);
	if (len == 0 || line[len - 1] != '\n')
		putchar('\n');
}

int main(int argc, char **argv)
{
	char line[128];
	const char *digits;
	int wanted, got, fd, status = 1;

	if (argc > 0 && argv[0] && argv[0][0] != '\0') {
		const char *slash = strrchr(argv[0], '/');

		prog = slash ? slash + 1 : argv[0];
	}
	if (argc != 2) {
		usage();
		return 2;
	}
	if (parse_int(argv[1], &wanted) != 0) {
		fprintf(stderr, "%s: not an integer: '%s'\n", prog, argv[1]);
		usage();
		return 2;
	}

	fd = open(PROC_PATH, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		int err = errno;

		fprintf(stderr, "%s: cannot open %s: %s\n", prog, PROC_PATH, strerror(err));
		if (err == ENOENT)
			fprintf(stderr, "%s: is the simple-procfs-kmod module loaded?\n", prog);
		return 1;
	}

	if (read_line(fd, line, sizeof(line)) != 0)
		goto out;
	show(line);

	if (write_number(fd, wanted) != 0)
		goto out;

	if (read_line(fd, line, sizeof(line)) != 0)
		goto out;
	show(line);

	if (strncmp(line, LINE_PREFIX, strlen(LINE_PREFIX)) != 0) {
		fprintf(stderr, "%s: unexpected content in %s\n", prog, PROC_PATH);
		goto out;
	}
	digits = line + strlen(LINE_PREFIX);
	line[strcspn(line, "\n")] = '\0';
	if (parse_int(digits, &got) != 0) {
		fprintf(stderr, "%s: unexpected number in %s: '%s'\n", prog, PROC_PATH, digits);
		goto out;
	}
	if (got != wanted) {
		fprintf(stderr, "%s: wrote %d but read back %d\n", prog, wanted, got);
		goto out;
	}
	status = 0;
out:
	if (close(fd) != 0 && status == 0) {
		fprintf(stderr, "%s: cannot close %s: %s\n", prog, PROC_PATH, strerror(errno));
		status = 1;
	}
	return status;
}
