"""Speed benchmark: one training epoch and one test evaluation, the tutorial way and ours.

    python benchmarks/speed.py                 # all six cases, appended to benchmarks/RESULTS.md
    python benchmarks/speed.py --cases mlp conv --reps 5 --no-record

Cases, on the same real MNIST and the same machine, each in a fresh process:
  mlp-tutorial, conv-tutorial  the usual loop: DataLoader over datasets.MNIST(transform=ToTensor()),
                               batch 128, shuffle, sigmoid + binary_cross_entropy, default memory
                               format, a .item() per step; the same architecture as our script
  mlp-plain, conv-plain        our train_epoch and evaluate (data on the device, no DataLoader),
                               but unfused Adam and without common.speed_up (no channels_last)
  mlp, conv                    vae_mlp.py's / vae_conv.py's own train_epoch and evaluate, defaults
The test -ELBO after the timed epochs is printed for each, to show that the fast paths keep the numbers
(plain and fast start from the same seed; they differ only by float rounding).
For each: median seconds per epoch over --reps epochs, images/s, speed-up over the tutorial loop,
share of the fp32 matmul peak (model FLOPs counted by torch.utils.flop_counter.FlopCounterMode,
peak measured with a large matmul in the same process), test evaluation seconds, peak memory.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import vae_conv  # noqa: E402
import vae_mlp  # noqa: E402
from quality import machine  # noqa: E402

SCRIPTS = {"mlp": vae_mlp, "conv": vae_conv}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n=4096, reps=10):
    """fp32 matmul FLOP/s: the best of `reps` timings of an n x n product."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def flops_per_image(model, device, batch=128):
    """Forward + backward FLOPs of one training step, per image."""
    x = torch.rand(batch, 1, 28, 28, device=device)
    with FlopCounterMode(display=False) as counter:
        logits, mu, logvar = model(x)
        (common.recon_nll(logits, x) + common.kl_std_normal(mu, logvar)).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run_tutorial(module, device, data_dir, reps):
    """The loop most VAE tutorials print: per-sample ToTensor through a DataLoader."""
    from torchvision import datasets, transforms

    train_set = datasets.MNIST(data_dir, train=True, download=True, transform=transforms.ToTensor())
    test_set = datasets.MNIST(data_dir, train=False, transform=transforms.ToTensor())
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=128)
    torch.manual_seed(1)
    model = module.VAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_fn(x):
        logits, mu, logvar = model(x)
        bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return bce + kld

    def epoch():
        model.train()
        total = 0.0
        for x, _ in train_loader:
            x = x.to(device)
            opt.zero_grad()
            loss = loss_fn(x)
            loss.backward()
            total += loss.item()
            opt.step()
        return total / len(train_set)

    def test():
        model.eval()
        total = 0.0
        with torch.no_grad():
            for x, _ in test_loader:
                total += loss_fn(x.to(device)).item()
        return total / len(test_set)

    times = [timed(epoch, device) for _ in range(reps)]
    return model, times, len(train_set), timed(test, device), test()


def run_ours(module, device, data_dir, reps, plain=False):
    """The script's own train_epoch and evaluate, with its default flags; plain: without
    common.speed_up and with unfused Adam (same math: shows what those two buy)."""
    args = module.get_args(["--data-dir", data_dir])
    data = common.load_data(args.dataset, args.data_dir, device, args.binarize)
    x_train, x_test = data["train"][0], data["test"][0]
    common.seed_everything(args.seed)
    model = module.VAE(**{k: getattr(args, k) for k in module.MODEL_FLAGS}).to(device)
    step_model = model if plain else common.speed_up(model, args.compile, device)  # as in main()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=not plain)
    stop = common.StopRequest()  # never set: no signal handler is installed
    results = []
    times = [timed(lambda e=e: results.append(module.train_epoch(step_model, opt, x_train, args, e, stop)), device)
             for e in range(1, reps + 1)]
    n_images = max(1, len(x_train) // args.batch_size) * args.batch_size
    return model, times, n_images, timed(lambda: module.evaluate(model, x_test, args), device), module.evaluate(model, x_test, args)["loss"]


def one_case(case, device_name, data_dir, reps):
    device = common.get_device(device_name)
    script = case.split("-")[0]
    if case.endswith("-tutorial"):
        model, times, n_images, test_s, test_loss = run_tutorial(SCRIPTS[script], device, data_dir, reps)
    else:
        model, times, n_images, test_s, test_loss = run_ours(SCRIPTS[script], device, data_dir, reps, case.endswith("-plain"))
    flops = flops_per_image(model, device) * n_images
    peak = matmul_peak(device)
    epoch_s = statistics.median(times)
    memory = (torch.cuda.max_memory_allocated() if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"case": case, "device": str(device), "epoch_s": epoch_s, "epoch_times": times,
            "images_per_s": n_images / epoch_s, "epoch_gflop": flops / 1e9, "peak_gflops": peak / 1e9,
            "share_of_peak": flops / epoch_s / peak, "test_s": test_s, "test_loss_after": test_loss,
            "memory_mb": memory / 2 ** 20, "memory_kind": "GPU max allocated" if device.type == "cuda" else "peak RSS"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"], help="which scripts")
    p.add_argument("--reps", type=int, default=3, help="epochs timed per case (the median is reported)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_case(args.one, args.device, args.data_dir, args.reps)))
        return

    rows = {}
    for script in args.cases:
        for case in (f"{script}-tutorial", f"{script}-plain", script):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", case, "--reps", str(args.reps),
                   "--device", args.device, "--data-dir", args.data_dir]
            print(f"running {case} ...", flush=True)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[case] = json.loads(out.strip().splitlines()[-1])
            r = rows[case]
            print(f"  {r['epoch_s']:.2f} s/epoch (runs: {', '.join(f'{t:.2f}' for t in r['epoch_times'])}), "
                  f"test {r['test_s']:.2f} s", flush=True)

    lines = [
        "### speed",
        "",
        f"`python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"{datetime.date.today()}, {machine()}, torch {torch.__version__}, device {next(iter(rows.values()))['device']}, "
        f"median of {args.reps} epochs, fp32 matmul peak {statistics.median(r['peak_gflops'] for r in rows.values()):.0f} GFLOP/s",
        "",
        "| case | s/epoch | images/s | x tutorial | GFLOP/epoch | % of matmul peak | test eval s | test eval / epoch | memory MB | test -ELBO after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, r in rows.items():
        ref = rows.get(case.split("-")[0] + "-tutorial")
        speedup = ref["epoch_s"] / r["epoch_s"] if ref else float("nan")
        lines.append(f"| {case} | {r['epoch_s']:.2f} | {r['images_per_s']:.0f} | {speedup:.2f} | {r['epoch_gflop']:.0f} | "
                     f"{100 * r['share_of_peak']:.0f}% | {r['test_s']:.2f} | {100 * r['test_s'] / r['epoch_s']:.0f}% | "
                     f"{r['memory_mb']:.0f} ({r['memory_kind']}) | {r['test_loss_after']:.2f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_record:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
