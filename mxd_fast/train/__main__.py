"""python -m mxd_fast.train (and torchrun ... -m mxd_fast.train): the trainer's command line."""
import os
import sys

from .cli import main
from .distributed import exit_without_shutdown

if __name__ == "__main__":
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    code = main(prog="python -m mxd_fast.train")
    if distributed:
        exit_without_shutdown(code)
    sys.exit(code)
