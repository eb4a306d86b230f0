"""GPU check: what a GPU user meets with both scripts, measured in one command within a budget.

On a lent GPU machine, from the repository root (the runs' folders go to results/gpu_check/):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --report $OUT/gpu_check.md
    python benchmarks/gpu_check.py --cases default quality --budget 540   # time to quality

On a CPU, as a smoke test of this script (DIR holds MNIST/raw/):

    python benchmarks/gpu_check.py --device cpu --epochs 1 --check-epochs 1 --bound-k 10 \
        --data-dir DIR --cases default bound check

Each run is a process of its own, timed launch to exit, skipped if it does not fit in the
budget, killed when that ends. Exit code 1 if a run or the check failed.
"""

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

STARTED = time.perf_counter()  # the budget counts from here, torch's import included

import torch  # noqa: E402
from quality import machine  # noqa: E402
from speed import shortest, tutorial_epochs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("vae_mlp", "vae_conv")
OUTPUTS = ("samples.png", "samples.gif", "reconstructions.png", "interpolation.png",
           "traversal.png", "latent.png", "loss.png", "metrics.csv", "checkpoint.pt")  # fmt: skip
TOLERANCE = 1.0  # nats of test -ELBO between the device and the CPU
MIN_RUN_S = 10.0  # the least a run takes: a process that imports torch and loads MNIST
WRAPPER = """\
import atexit, os, runpy, sys
import torch

def peak():
    if torch.cuda.is_initialized():
        print("PEAK_BYTES", torch.cuda.max_memory_allocated(), file=sys.stderr)
    elif sys.platform == "linux":
        import resource  # ru_maxrss: KiB on Linux
        print("PEAK_BYTES", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              file=sys.stderr)

atexit.register(peak)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""
BOUND = re.compile(r"<= (\S+) nats per image \(IWAE bound, K=(\d+)\)")
COLUMNS = {  # each case's table, after "script"
    "default": "wall s | start-up s | s/epoch | images/s | peak MB | test -ELBO | bound s | bound",
    "bound": "wall s | bound s | peak MB | test -ELBO | bound",
    "check": "device -ELBO | CPU -ELBO | difference | verdict | output files | device s | CPU s",
    "quality": "tutorial's test -ELBO | after its epochs | tutorial s | ours: `--epochs N` | "
    "ours s | ours' test -ELBO | speed-up | default run gets there at epoch (s)",
}


class Stop(Exception):
    """Why a case ended early: skipped, stopped or failed."""


def run(args, path, flags, name, need=None):
    """`python PATH FLAGS` via WRAPPER if about `need` s fit in the budget, killed when it ends,
    stderr in SCRATCH/NAME.log: wall, stdout lines, peak MB, bound; Stop if it did not exit 0."""
    limit, need = args.budget - (time.perf_counter() - STARTED), max(need or 0, MIN_RUN_S)
    if need > limit:
        raise Stop(f"skipped: budget ({name} needs ~{need:.0f} s, {max(limit, 0):.0f} s left)")
    t0, cmd = time.perf_counter(), [sys.executable, "-c", WRAPPER, path, *flags]
    with open(os.path.join(args.scratch, name + ".log"), "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        timer = threading.Timer(limit, proc.kill)
        timer.start()
        lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
        code, wall = proc.wait(), time.perf_counter() - t0
        timer.cancel()
        err.seek(0)
        said = [s.strip() for s in err if s.strip()]
    peak = [int(s.split()[1]) / 2**20 for s in said if s.startswith("PEAK_BYTES ")]
    said = [s for s in said if not s.startswith("PEAK_BYTES ")] or ["nothing on stderr"]
    if code:
        raise Stop(f"stopped: budget ({name} killed after {wall:.0f} s)" if wall >= limit
                   else f"failed: {name}: exit {code}: {said[-1]}")  # fmt: skip
    found = [(t, BOUND.search(line)) for t, line in lines if BOUND.search(line)]
    bound_at, match = found[-1] if found else (None, None)
    bound = f"{float(match[1]):.2f} (K={match[2]})" if match else "—"
    return {"wall": wall, "lines": lines, "memory": (peak or [None])[0], "bound_at": bound_at,
            "bound": bound, "k": int(match[2]) if match else None}  # fmt: skip


def train(args, script, epochs, name, device, flags=(), base=None):
    """`python SCRIPT.py --epochs N` into a fresh SCRATCH/NAME, its time guessed from `base` (the
    default run): run()'s answer with start-up, epoch times, test -ELBOs, s/epoch, images/s."""
    need = None
    if base:  # its start-up, then its seconds per epoch
        need = base["startup"] + (base["wall"] - base["startup"]) * epochs / args.epochs
    out = os.path.join(args.scratch, name)
    shutil.rmtree(out, ignore_errors=True)  # a run into another run's folder prints a note
    flags = ["--epochs", str(epochs), "--out", out, "--data-dir", args.data_dir, *flags]
    r = run(args, os.path.join(ROOT, f"{script}.py"), [*flags, "--device", device], name, need)
    at = [t for t, line in r["lines"] if line.startswith("epoch ")]
    startup = next((t for t, line in r["lines"] if line.startswith(f"{script}: ")), None)
    if not at or startup is None:
        raise Stop(f"failed: {name}: exit 0 but no header or epoch line")
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    elbos = [float(row["test_neg_elbo"]) for row in rows]
    r.update(out=out, startup=startup, epochs_at=at, elbos=elbos, elbo=elbos[-1])
    r["s_epoch"] = statistics.median(float(row["train_s"]) for row in rows)
    r["images_s"] = statistics.median(float(row["images_per_s"]) for row in rows)
    r["bound_s"] = r["bound_at"] - at[-1] if r["bound_at"] else None
    return r


def num(value, digits=1):
    return "—" if value is None else f"{value:.{digits}f}"


def case_default(args, script, runs, rows):
    r = runs[script] = train(args, script, args.epochs, f"default-{script}", args.device)
    cells = [num(r["wall"]), num(r["startup"]), num(r["s_epoch"], 2), num(r["images_s"], 0)]
    rows.append([*cells, num(r["memory"], 0), num(r["elbo"], 2), num(r["bound_s"]), r["bound"]])


def case_bound(args, script, runs, rows):
    base = runs.get(script)
    if base is None:
        raise Stop("skipped: no default run (the bound case uses its checkpoint)")
    need = base["startup"] + base["bound_s"] * args.bound_k / base["k"] if base["k"] else None
    flags = ["--eval-only", "--iw-samples", str(args.bound_k), "--out", base["out"],
             "--data-dir", args.data_dir, "--device", args.device]  # fmt: skip
    r = run(args, os.path.join(ROOT, f"{script}.py"), flags, f"bound-{script}", need)
    t, line = next((t, line) for t, line in r["lines"] if "-ELBO" in line)  # its test line
    elbo = line.split("-ELBO")[1].split()[0]
    rows.append([num(r["wall"]), num(r["bound_at"] - t), num(r["memory"], 0), elbo, r["bound"]])


def case_check(args, script, runs, rows):
    flags, base = ["--iw-samples", "0"], runs.get(script)
    if args.device == "cpu" and base and args.check_epochs == args.epochs:  # the plumbing only:
        dev = cpu = base  # on a CPU, the default run against itself
    else:
        dev = cpu = train(
            args, script, args.check_epochs, f"check-{script}", args.device, flags, base
        )
    if args.device != "cpu":
        cpu = train(args, script, args.check_epochs, f"check-{script}-cpu", "cpu", flags)
    missing = [f for f in OUTPUTS if not os.path.isfile(os.path.join(dev["out"], f))]
    diff = dev["elbo"] - cpu["elbo"]
    verdict = "PASS" if abs(diff) <= TOLERANCE and not missing else "FAIL"
    rows.append([num(dev["elbo"], 2), num(cpu["elbo"], 2), num(diff, 2), verdict,
                 "missing: " + ", ".join(missing) if missing else "all present",
                 num(dev["wall"]), num(cpu["wall"])])  # fmt: skip


def case_quality(args, script, runs, rows):
    base, name = runs.get(script), f"quality-{script}-tutorial"
    if base is None:
        raise Stop("skipped: no default run (the quality case needs it)")
    flags = ["--tutorial", script[4:], "--epochs", str(args.epochs), "--data-dir", args.data_dir,
             "--out", os.path.join(args.scratch, name), "--device", args.device]  # fmt: skip
    tutorial = run(args, os.path.join(ROOT, "benchmarks", "speed.py"), flags, name)
    stamps = [(t, line) for t, line in tutorial["lines"] if line.startswith("epoch ")]
    theirs, done = tutorial_epochs(stamps, tutorial["wall"]), {args.epochs: base}

    def final(n):  # the test -ELBO a run of n epochs ends at
        if n not in done:
            done[n] = train(args, script, n, f"quality-{script}-{n}", args.device, base=base)
        return done[n]["elbo"]

    for epochs in sorted({args.epochs, min(5, args.epochs)}, reverse=True):
        target, tut = theirs["test"][epochs - 1], theirs["at"][epochs - 1]
        cross = next((e for e, t in enumerate(base["elbos"], 1) if t <= target), None)
        n = shortest(target, cross, final, args.epochs)
        elbo = final(n)  # the search may end at n without asking for its test -ELBO
        at = f"{cross} ({base['epochs_at'][cross - 1]:.0f})" if cross else "—"
        rows.append([f"{target:.2f}", epochs, f"{tut:.1f}", n, f"{done[n]['wall']:.1f}",
                     f"{elbo:.2f}", f"{tut / done[n]['wall']:.2f}", at])  # fmt: skip


def write_report(a, results):
    """The markdown report: a note and a table for each case; into --report, and returned."""
    title, gpu = "CPU only", "no GPU used"
    if a.device == "cuda":
        p, title = torch.cuda.get_device_properties(0), torch.cuda.get_device_name()
        gpu = f"{p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
        gpu += f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    notes = {  # what each table measures
        "default": f"1. `python SCRIPT.py --epochs {a.epochs}`; start-up: to its header line; "
        "s/epoch, images/s: metrics.csv's medians; bound s: from the last epoch line.",
        "bound": f"2. `python SCRIPT.py --eval-only --iw-samples {a.bound_k}` on 1's folder; "
        "bound s: from its test line.",
        "check": f"3. {a.device} against cpu (on a CPU: one run), `--epochs {a.check_epochs} "
        f"--iw-samples 0`: PASS if the test -ELBOs are within {TOLERANCE:g} nat and the device "
        f"run wrote {', '.join(OUTPUTS)}.",
        "quality": "4. The shortest `python SCRIPT.py --epochs N` that gets to the tutorial's test "
        "-ELBO after --epochs and after 5 epochs (speed.py --quality, one repetition).",
    }
    lines = [
        f"### GPU check: {title}",
        "",
        f"`python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`  ",
        f"{time.strftime('%Y-%m-%d')}, {machine()}, {gpu}, torch {torch.__version__}, Python "
        f"{sys.version.split()[0]}  ",
        f"budget {a.budget:.0f} s, used {time.perf_counter() - STARTED:.0f} s; peak MB: torch's "
        f"max_memory_allocated(), on a CPU peak RSS; runs' stderr: {a.scratch}/NAME.log.",
    ]
    for case, columns in COLUMNS.items():
        lines += ["", notes[case], "", f"| script | {columns} |"]
        lines.append("| --- " * (columns.count("|") + 2) + "|")
        for script in a.scripts:  # its rows, an error a row of one cell
            for cells in results.get((case, script), [["not run yet"]]):
                cells = [str(c).replace("|", "\\|")[:200] for c in cells]
                lines.append(f"| {script} | {' | '.join(cells)} |")
    os.makedirs(os.path.dirname(os.path.abspath(a.report)), exist_ok=True)
    with open(a.report, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines) + "\n"


def main():
    cases = dict(default=case_default, bound=case_bound, check=case_check, quality=case_quality)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="of all runs but the check's CPU run (auto: cuda if any)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=20, help="of the default runs (20)")
    p.add_argument("--check-epochs", type=int, default=2, help="of the check's runs (2)")
    p.add_argument("--bound-k", type=int, default=1000, help="K of the bound case (1000)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"), help="holds MNIST/raw/")
    p.add_argument("--budget", type=float, default=420, help="seconds for all the cases (420)")
    p.add_argument("--report", default=os.path.join(ROOT, "results", "gpu_check.md"))
    p.add_argument("--scratch", default=os.path.join(ROOT, "results", "gpu_check"))
    p.add_argument("--cases", nargs="+", choices=cases, default=["default", "bound", "check"],
                   help="quality only when named")  # fmt: skip
    p.add_argument("--scripts", nargs="+", choices=SCRIPTS, default=SCRIPTS)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    os.environ["PYTHONUNBUFFERED"] = "1"  # for the runs: a line's time is when it was printed
    os.makedirs(args.scratch, exist_ok=True)
    results, runs, failed = {}, {}, False  # (case, script): its table's rows; script: default run
    for case, function in cases.items():
        for script in args.scripts:
            rows = results[(case, script)] = []
            if case not in args.cases:
                rows.append(["skipped: not in --cases"])
                continue
            print(f"[{time.perf_counter() - STARTED:4.0f} s] {case} {script}:", end=" ", flush=True)
            try:
                function(args, script, runs, rows)
            except Stop as e:
                rows.append([str(e)])
            except Exception as e:  # a bug, or a run's odd output: keep the cases measured so far
                rows.append([f"failed: {type(e).__name__}: {e}"])
            failed |= any("FAIL" in cells or str(cells[0]).startswith("failed") for cells in rows)
            print(" | ".join(map(str, rows[-1])), flush=True)
            write_report(args, results)  # the cases not run yet say so
    print(f"\n{write_report(args, results)}report: {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
