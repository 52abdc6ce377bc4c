"""kvc's kmod tools started without standard input, output and error, as the kernel starts
``/proc/sys/kernel/modprobe`` for ``request_module()``: they still work (what they would print
goes nowhere), where Python alone would fail on its missing streams."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Sequence

from support.debian_kernel import DebianKernel


def closing(fds: Sequence[int]) -> Callable[[], None]:
    def close() -> None:
        for fd in fds:
            os.close(fd)

    return close


def test_modprobe_works_with_every_standard_stream_closed(indexed_kernel_tree: DebianKernel) -> None:
    argv = [sys.executable, "-m", "kvc", "kmod", "modprobe", "-q", "-n", "-d", str(indexed_kernel_tree.root)]
    argv += ["-S", indexed_kernel_tree.release, "--", "crc7"]
    for closed in ((0,), (1,), (2,), (0, 1, 2)):
        done = subprocess.run(argv, preexec_fn=closing(closed), check=False)
        assert done.returncode == 0, closed
    missing = subprocess.run([*argv[:-1], "no_such_module"], preexec_fn=closing((2,)), check=False)
    assert missing.returncode == 1
