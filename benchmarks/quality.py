"""Quality benchmark: train a script with given flags and seeds, report test -ELBO and IWAE NLL.

    python benchmarks/quality.py vae_conv --binarize dynamic --target 86.0
    python benchmarks/quality.py vae_mlp --binarize dynamic --target 96
    python benchmarks/quality.py vae_mlp --epochs 10 --iw-samples 0 --target-elbo 104.5

Each seed runs as its own process (`python <script>.py ... --seed S`) into
results/bench/; the final test -ELBO (recon, KL) and the importance-weighted bound
(Burda et al. 2015) are read from its checkpoint. A markdown section with the
command, machine, torch version, per-seed numbers, mean and wall time is appended
to benchmarks/RESULTS.md (unless --no-record).
"""

import argparse
import datetime
import hashlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def code_hash(script):
    """The script and common.py as they are now: a changed default must not reuse an old run."""
    digest = hashlib.sha256()
    for name in (f"{script}.py", "common.py"):
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def finished(path, mark):
    """A checkpoint this exact command and code wrote to the end (for --reuse): marked at exit 0."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("bench_mark") == mark


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("script", choices=["vae_mlp", "vae_conv"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--binarize", choices=["none", "dynamic"], default="none")
    p.add_argument("--iw-samples", type=int, default=1000, help="K of the IWAE bound (0 = off)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--target", type=float, help="pass if the mean IWAE NLL is at most this")
    p.add_argument("--target-elbo", type=float, help="pass if the mean test -ELBO is at most this")
    p.add_argument(
        "--note", default="", help="a line written under the section title (what was tried)"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep seeds already run to the end by the same command and code",
    )
    p.add_argument(
        "--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a seed whose run was stopped before its end from its checkpoint "
        "(the script's --resume, which ends where an unstopped run ends) instead of "
        "starting it over; its wall time then counts only the part after resuming",
    )
    args, extra = p.parse_known_args()  # anything else goes to the script

    flags = [
        "--epochs",
        str(args.epochs),
        "--binarize",
        args.binarize,
        "--iw-samples",
        str(args.iw_samples),
        *extra,
    ]
    tag = "-".join(f.lstrip("-") for f in flags)
    code = code_hash(args.script)
    runs = []
    for seed in args.seeds:
        out = os.path.join(ROOT, "results", "bench", f"{args.script}-{tag}-seed{seed}")
        cmd = [
            sys.executable,
            os.path.join(ROOT, f"{args.script}.py"),
            "--data-dir",
            args.data_dir,
            "--out",
            out,
            "--seed",
            str(seed),
            *flags,
        ]
        path = os.path.join(out, "checkpoint.pt")
        mark = {"cmd": cmd, "code": code}
        done = args.reuse and os.path.exists(path) and finished(path, mark)
        print("$", shlex.join(cmd), "(reused)" if done else "", flush=True)
        t0 = time.perf_counter()
        if not done:
            resume = ["--resume"] if args.resume and os.path.exists(path) else []
            subprocess.run(cmd + resume, check=True)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        wall = ckpt.get("bench_wall_s") or time.perf_counter() - t0
        if not done:
            ckpt["bench_wall_s"], ckpt["bench_mark"] = wall, mark
            torch.save(ckpt, path)
        last = ckpt["metrics"][-1]
        runs.append(
            {
                "seed": seed,
                "recon": last["test_recon"],
                "kl": last["test_kl"],
                "elbo": last["test_neg_elbo"],
                "iwae": (ckpt["final"] or {}).get("iwae_nll", float("nan")),
                "wall": wall,
            }
        )

    def num(value):
        return f"{value:.2f}" if math.isfinite(value) else "—"  # the IWAE column is nan when K = 0

    def mean(key):
        values = [r[key] for r in runs if math.isfinite(r[key])]
        if not values:
            return "—"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    verdicts = []
    for name, key, target in (
        ("IWAE NLL", "iwae", args.target),
        ("-ELBO", "elbo", args.target_elbo),
    ):
        if target is not None:
            ok = statistics.mean(r[key] for r in runs) <= target
            verdicts.append(f"{name} target <= {target}: {'PASS' if ok else 'FAIL'}")
    iwae_title = f"IWAE NLL (K={args.iw_samples})" if args.iw_samples else "IWAE NLL (off)"
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    lines = [
        f"### quality: {args.script} {' '.join(flags)}",
        "",
        *([args.note, ""] if args.note else []),
        f"`{command}`  ",
        f"{datetime.date.today()}, {machine()}, torch {torch.__version__}",
        "",
        f"| seed | test recon | test KL | test -ELBO | {iwae_title} | wall s |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['seed']} | {r['recon']:.2f} | {r['kl']:.2f} | {r['elbo']:.2f} | "
            f"{num(r['iwae'])} | {r['wall']:.0f} |"
            for r in runs
        ),
        f"| mean ± sd | {mean('recon')} | {mean('kl')} | {mean('elbo')} | {mean('iwae')} | "
        f"{mean('wall')} |",
        "",
        *(f"{v}  " for v in verdicts),
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_record:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
