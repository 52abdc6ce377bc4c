"""kvc.kmod: a pure-Python kernel module library in the spirit of libkmod.

It reads module files, kmod's index files and the kernel's view of loaded modules, and talks to
the kernel. It imports nothing from the rest of kvc.
"""
