"""`training/train_imagenet.py` as its command line runs, in a process where the golden
architectures are variants (`tests.conftest.register_tiny_releases`), so that the training
tests' commands can train `TRAIN_MODEL`. Usage: python tests/training/_train_cli.py [FLAGS]"""

import pathlib
import runpy
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from tests.conftest import register_tiny_releases

    register_tiny_releases()
    sys.argv[0] = str(ROOT / "training" / "train_imagenet.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
