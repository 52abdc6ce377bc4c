import sys

if sys.argv[1:2] == ["kmod"]:
    # The kmod tools import nothing of the framework: skip kvc.cli's argparse and logging.
    from kvc.kmod.tools import main as kmod_main

    sys.exit(kmod_main(sys.argv[2:]))

from kvc.cli import main

sys.exit(main())
