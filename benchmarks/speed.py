"""Speed benchmark: what the user waits for, launch to exit, ours against the tutorial loop.

    python benchmarks/speed.py --quality              # time to the tutorial's test -ELBO
    python benchmarks/speed.py                        # mlp 20 epochs, conv 5 (20 on a GPU)
    python benchmarks/speed.py --cases mlp --epochs 5 --reps 1 --no-record

--quality: a user wants a model as good as the tutorial's, not the same number of epochs. The
tutorial loop runs 20 epochs (grey MNIST, seed 1), its test -ELBO after each epoch noted; for
its values after 20 and after 5 epochs, the shortest default command `--epochs N` of ours whose
final test -ELBO is at or below it is found (from the epoch where our default 20-epoch run
crosses it, down while it still gets there, up while it does not), and both are timed launch to
exit: the tutorial to its epoch (its run's time at that epoch line, plus its exit), ours the
whole `--epochs N` run, IWAE bound included; then --reps more alternating repetitions of each.

Each repetition runs, alternating, two whole processes on the same real MNIST:
  ours      the script's default command: `python vae_mlp.py --epochs N --out ...` (test -ELBO
            every epoch, pictures, metrics.csv, checkpoint, the final IWAE bound at K=10)
  tutorial  the loop most VAE tutorials print (pytorch/examples vae/main.py): a DataLoader over
            datasets.MNIST(transform=ToTensor()), batch 128, shuffle, the same architecture as
            our default, sigmoid + binary_cross_entropy, Adam 1e-3, a .item() per step, the
            test loss and a sample grid every epoch; no IWAE bound
Ours is split, from the times its lines appear on stdout and from its metrics.csv, into
start-up (imports, data, model), training steps and test evaluation (metrics.csv's train_s and
test_s), checkpoints (writing the final checkpoint as the script does, timed here, times the
epochs), pictures (the rest of the time between the header and the last epoch line: the
pictures' arithmetic, grids, GIF, figures, metrics.csv), and the final IWAE bound.
The medians of --reps repetitions go to benchmarks/RESULTS.md (unless --no-record).
"""

import argparse
import csv
import datetime
import math
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quality import machine  # noqa: E402

import common  # noqa: E402
import vae_conv  # noqa: E402
import vae_mlp  # noqa: E402

SCRIPTS = {"mlp": vae_mlp, "conv": vae_conv}


def tutorial(case, epochs, data_dir, out, device="auto"):
    """The tutorial loop, in this process (run with --tutorial from main)."""
    import torch.nn.functional as F
    from torchvision import datasets, transforms
    from torchvision.utils import save_image

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    train_set = datasets.MNIST(data_dir, train=True, download=True, transform=transforms.ToTensor())
    test_set = datasets.MNIST(data_dir, train=False, transform=transforms.ToTensor())
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=128)
    torch.manual_seed(1)
    model = SCRIPTS[case].VAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_fn(x):
        logits, mu, logvar = model(x)
        bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
        return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())

    os.makedirs(out, exist_ok=True)
    for epoch in range(1, epochs + 1):
        model.train()
        train_loss = 0.0
        for x, _ in train_loader:
            x = x.to(device)
            opt.zero_grad()
            loss = loss_fn(x)
            loss.backward()
            train_loss += loss.item()
            opt.step()
        model.eval()
        with torch.no_grad():
            test = sum(loss_fn(x.to(device)).item() for x, _ in test_loader) / len(test_set)
            z = torch.randn(64, model.decoder[0].in_features, device=device)
            save_image(torch.sigmoid(model.decode(z)), os.path.join(out, f"sample_{epoch}.png"))
        print(f"epoch {epoch} train loss {train_loss / len(train_set):.2f} test loss {test:.4f}",
              flush=True)  # fmt: skip


def run_tutorial(case, epochs, data_dir, out, device="auto"):
    """Its wall time, and each epoch's test loss and time from launch to its line."""
    cmd = [sys.executable, __file__, "--tutorial", case, "--epochs", str(epochs),
           "--data-dir", data_dir, "--out", out, "--device", device]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stamps = [(time.perf_counter() - t0, line) for line in proc.stdout if line.startswith("epoch")]
    assert proc.wait() == 0
    wall = time.perf_counter() - t0
    return {"wall": wall, **tutorial_epochs(stamps, wall)}


def tutorial_epochs(stamps, wall):
    """From its (s from launch, "epoch ..." line) stamps and wall time: each epoch's test loss,
    and the time a run of that many epochs takes (launch to the epoch's line, plus the exit)."""
    return {"test": [float(line.split()[-1]) for _, line in stamps],
            "at": [t + wall - stamps[-1][0] for t, _ in stamps]}  # fmt: skip


def run_ours(case, epochs, data_dir, out, device="auto"):
    """Launch the script's default command; time stamp its lines; split its time."""
    script = f"vae_{case}"
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--epochs", str(epochs),
           "--data-dir", data_dir, "--out", out, "--device", device]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stamps = [(time.perf_counter() - t0, line) for line in proc.stdout]
    assert proc.wait() == 0
    wall = time.perf_counter() - t0
    header = next(t for t, line in stamps if line.startswith(script))
    epoch_lines = [t for t, line in stamps if line.startswith("epoch")]
    last_epoch = epoch_lines[-1]
    bound = next(t for t, line in stamps if "IWAE bound" in line)
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    training, evaluation = (sum(float(r[k]) for r in rows) for k in ("train_s", "test_s"))
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    writes = []  # the checkpoint, written as each epoch writes it (the last is the biggest)
    for _ in range(3):
        t = time.perf_counter()
        common.atomic_write(os.path.join(out, "timing.pt"), lambda f: torch.save(ckpt, f))
        writes.append(time.perf_counter() - t)
    os.remove(os.path.join(out, "timing.pt"))
    checkpoints = statistics.median(writes) * len(rows)
    return {
        "wall": wall,
        "start-up": header,
        "training": training,
        "evaluation": evaluation,
        "pictures": last_epoch - header - training - evaluation - checkpoints,
        "checkpoints": checkpoints,
        "IWAE bound": bound - last_epoch,
        "exit": wall - bound,
        "test -ELBO": ckpt["metrics"][-1]["test_neg_elbo"],
        "tests": [r["test_neg_elbo"] for r in ckpt["metrics"]],  # after each epoch
        "at": epoch_lines,  # seconds from launch to each epoch's line
    }


def shortest(target, crossed, final, longest=20):
    """The fewest epochs N of a run that ends at or below `target`: from `crossed`, the epoch
    where the `longest`-epoch run passes it (None: never), up while a run of N epochs ends above
    it, down while one of N - 1 still gets there. final(n): the test -ELBO a run of n ends at."""
    n = crossed or longest
    while n < longest and final(n) > target:  # not there: longer
        n += 1
    while n > 1 and final(n - 1) <= target:  # there: shorter
        n -= 1
    return n


def time_to_quality(case, reps, data_dir, device="auto"):
    """The --quality rows of one script: [(target, tutorial epochs, tutorial s, N, ours s, where
    our default 20-epoch run crosses the target: (epoch, s))]."""
    scratch = os.path.join(ROOT, "results", "speed", f"quality-{case}")
    tutorial = run_tutorial(case, 20, data_dir, scratch + "-tutorial", device)
    default = run_ours(case, 20, data_dir, scratch + "-20", device)
    runs = {20: default}  # --epochs N: its run

    def ours(n):
        if n not in runs:
            runs[n] = run_ours(case, n, data_dir, f"{scratch}-{n}", device)
            print(f"{case} --epochs {n}: {runs[n]['test -ELBO']:.2f}", flush=True)
        return runs[n]

    rows = []
    for epochs in (20, 5):
        target = tutorial["test"][epochs - 1]
        cross = next((e for e, t in enumerate(default["tests"], 1) if t <= target), None)
        n = shortest(target, cross, lambda n: ours(n)["test -ELBO"])
        times = {"tutorial": [tutorial["at"][epochs - 1]], "ours": [ours(n)["wall"]]}
        for _ in range(reps - 1):  # alternating, the same commands again
            again = run_tutorial(case, epochs, data_dir, scratch + "-tutorial", device)
            times["tutorial"].append(again["wall"])
            again = run_ours(case, n, data_dir, f"{scratch}-{n}", device)
            times["ours"].append(again["wall"])
        tut, our = (statistics.median(times[k]) for k in ("tutorial", "ours"))
        where = (cross, default["at"][cross - 1]) if cross else (None, math.nan)
        rows.append((target, epochs, tut, n, our, ours(n)["test -ELBO"], where))
    return rows


def quality_table(args):
    lines = [
        "### speed: time to the tutorial's test -ELBO",
        "",
        f"`python benchmarks/speed.py {' '.join(sys.argv[1:])}`",
        f"{datetime.date.today()}, {machine()}, torch {torch.__version__}, seconds from launch "
        f"to exit, median of {args.reps} alternating repetitions (the first from the search)",
        "",
        "| case | tutorial's test -ELBO | after its epochs | tutorial s | ours: `--epochs N` | "
        "ours s | ours' test -ELBO | speed-up | default 20-epoch run gets there at epoch (s) |",
        "| --- " * 9 + "|",
    ]
    for case in args.cases:
        for target, epochs, tut, n, our, reached, (cross, at) in time_to_quality(
            case, args.reps, args.data_dir, args.device
        ):
            lines.append(
                f"| {case} | {target:.2f} | {epochs} | {tut:.1f} | {n} | {our:.1f} | "
                f"{reached:.2f} | {tut / our:.2f} | {cross} ({at:.0f}) |"
            )
    return lines


PARTS = ("start-up", "training", "evaluation", "pictures", "checkpoints", "IWAE bound", "exit")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"])
    p.add_argument("--epochs", type=int, help="default: 20 for mlp, 5 for conv (20 on a GPU)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (the median is reported)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="of both loops (auto: cuda when there is one, else cpu)")  # fmt: skip
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--no-tutorial", action="store_true", help="time our script only")
    p.add_argument("--quality", action="store_true",
                   help="time to the tutorial's test -ELBO after 20 and 5 epochs")  # fmt: skip
    p.add_argument("--tutorial", choices=["mlp", "conv"], help=argparse.SUPPRESS)  # internal
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tutorial:
        return tutorial(args.tutorial, args.epochs, args.data_dir, args.out, args.device)

    gpu = torch.cuda.is_available()
    if args.quality:
        return record(quality_table(args), args)
    lines = [
        "### speed: whole runs",
        "",
        f"`python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"{datetime.date.today()}, {machine()}, torch {torch.__version__}, "
        f"median of {args.reps} alternating repetitions, seconds from launch to exit",
        "",
        "| case | epochs | tutorial s | ours s | x tutorial | " + " | ".join(PARTS)
        + " | outside training | test -ELBO |",
        "| --- " * (len(PARTS) + 7) + "|",
    ]  # fmt: skip
    for case in args.cases:
        epochs = args.epochs or (20 if case == "mlp" or gpu else 5)
        runs = {"tutorial": [], "ours": []}
        for rep in range(args.reps):
            out = os.path.join(ROOT, "results", "speed", f"{case}-{rep}")
            if not args.no_tutorial:
                tutorial_out = out + "-tutorial"
                again = run_tutorial(case, epochs, args.data_dir, tutorial_out, args.device)
                runs["tutorial"].append(again)
            runs["ours"].append(run_ours(case, epochs, args.data_dir, out, args.device))
            print(f"{case} rep {rep + 1}: ours {runs['ours'][-1]['wall']:.1f} s", flush=True)
        med = {k: statistics.median(r[k] for r in runs["ours"]) for k in runs["ours"][0]}
        walls = [r["wall"] for r in runs["tutorial"]]
        tut = statistics.median(walls) if walls else math.nan
        outside = 1 - med["training"] / med["wall"]
        lines.append(
            f"| {case} | {epochs} | {tut:.1f} | {med['wall']:.1f} | {tut / med['wall']:.2f} | "
            + " | ".join(f"{med[k]:.1f}" for k in PARTS)
            + f" | {100 * outside:.0f}% | {med['test -ELBO']:.2f} |"
        )
    record(lines, args)


def record(lines, args):
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_record:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
