"""``kvc verify``: an instance's modules loaded, smoke-tested and unloaded on the real target kernel
in a throwaway qemu VM. :mod:`.run` plans, executes and reports; :mod:`.kernelfiles` finds the
kernel; :mod:`.initramfs`, :mod:`.bootimage` and :mod:`.qemu` make and boot the guest;
:mod:`.guest` is the agent inside it, which :mod:`.agentbundle` compiles into the initramfs.
Nothing else in kvc imports this package except the CLI."""

# The hidden first argument that makes the single-file kvc (scripts/kvc_onefile_entry.py) the agent.
FROZEN_AGENT_ARGUMENT = "__kvc_guest"
