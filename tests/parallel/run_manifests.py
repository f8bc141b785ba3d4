"""Run manifest files one after another in this process, as `esa run` does for each (the test
launcher: `python run_manifests.py A.json B.json` for one rank, under torchrun for several)."""

import sys

from esa.core.io import read_json
from esa.runner import run

if __name__ == "__main__":
    for path in sys.argv[1:]:
        run(read_json(path))
