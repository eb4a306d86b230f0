"""How long the final IWAE bound takes, this checkout's iwae_nll against another checkout's.

    git worktree add /tmp/old 4dd7dc4
    python benchmarks/bound_calls.py --other /tmp/old      # K = 10 and 100, both scripts

Both compute the bound of the same randomly initialised model (seed 0) on the real MNIST
test set, on the CPU, alternating, twice each; the numbers must agree to float rounding.
"""

import argparse
import importlib.util
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(folder, name):
    """The module `name` from `folder`, with that folder's common.py."""
    sys.path.insert(0, folder)
    sys.modules.pop("common", None)
    try:
        spec = importlib.util.spec_from_file_location(f"{name}@{folder}", f"{folder}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)
        sys.modules.pop("common", None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--other", required=True, help="another checkout, e.g. a git worktree")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--k", type=int, nargs="+", default=[10, 100])
    args = p.parse_args()
    for name in ("vae_mlp", "vae_conv"):
        ours, theirs = load(ROOT, name), load(os.path.abspath(args.other), name)
        x = ours.common.load_data(ours.get_args(["--data-dir", args.data_dir]), "cpu")["test"][0]
        torch.manual_seed(0)
        model = ours.VAE()
        ours.common.speed_up(model, ours.get_args([]), 64)
        for k in args.k:
            for label, module in (("other", theirs), ("this", ours)) * 2:
                t = time.perf_counter()
                nll = module.iwae_nll(model, x, k, "bernoulli")
                print(f"{name} K={k} {label}: {time.perf_counter() - t:.2f} s, {nll:.5f} nats")


if __name__ == "__main__":
    main()
