"""Run a script as `python SCRIPT ARGS...` with torch and every torch-based package made
unimportable, as on an Ascend install (`pip install -e ".[ascend]"`): usage
`python tests/helpers/without_torch.py SCRIPT [ARGS...]`."""
import importlib.abc
import os
import runpy
import sys

BLOCKED = ("torch", "torchvision", "timm", "open_clip", "diffusers", "transformers", "peft", "accelerate")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: this run stands for an install without torch")
        return None


sys.meta_path.insert(0, _Blocker())
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
