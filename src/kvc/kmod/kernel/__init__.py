"""Talking to the kernel about modules: what is loaded, insert, remove.

One protocol (:mod:`~kvc.kmod.kernel.protocol`), two implementations: :class:`~kvc.kmod.kernel.live.LiveKernel`
calls the module syscalls and reads ``/proc/modules`` and ``/sys/module``
(:mod:`~kvc.kmod.kernel.readers`); :class:`~kvc.kmod.kernel.fake.FakeKernel` keeps the same files
under a directory and refuses what Linux refuses. Both load and remove modules the way libkmod
does (:mod:`~kvc.kmod.kernel.libkmod`, which also has libkmod's reading of those files).
:func:`~kvc.kmod.kernel.environment.kernel_from_env` picks one.
"""
