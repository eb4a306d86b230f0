"""GPU check: what a GPU user meets with both scripts, measured in one command within a budget.

On a lent GPU machine, from the repository root (the runs' folders go to results/gpu_check/):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --report $OUT/gpu_check.md
    python benchmarks/gpu_check.py --cases default quality --budget 540   # time to quality

On a CPU, as a smoke test of this script (DIR holds MNIST/raw/):

    python benchmarks/gpu_check.py --device cpu --epochs 1 --check-epochs 1 --bound-k 10 \
        --data-dir DIR --cases default bound check

The cases, each for vae_mlp.py then vae_conv.py, each run its own process, launch to exit:
  default  `python SCRIPT.py --epochs E`: wall, start-up, s/epoch, images/s, peak memory
           (torch.cuda.max_memory_allocated; on a CPU peak RSS), test -ELBO, the final bound
  bound    `python SCRIPT.py --eval-only --iw-samples K --out THAT` on the default run's folder
  check    --check-epochs epochs, seed 1, on the device and on the CPU: the test -ELBO within 1
           nat, every output file present (--device cpu: one run against itself, the default
           run's if --check-epochs is --epochs)
  quality  only when named: one repetition of `python benchmarks/speed.py --quality` on the
           device, with speed.py's tutorial loop and search

A case whose estimated time does not fit in what is left of --budget seconds is skipped; a run
still going when the budget ends is killed. The markdown report is rewritten after every run
and printed at the end. Exit code 1 if a run or the check failed, else 0.
"""

import argparse
import csv
import datetime
import os
import platform
import re
import shlex
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
SCRIPTS, CASES = ("vae_mlp", "vae_conv"), ("default", "bound", "check", "quality")
OUTPUT_FILES = ("samples.png", "samples.gif", "reconstructions.png", "interpolation.png",
                "traversal.png", "latent.png", "loss.png", "metrics.csv",
                "checkpoint.pt")  # fmt: skip
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


def left(args):
    return args.budget - (time.perf_counter() - STARTED)


def refuse(args, need):
    """Why a run of about `need` s (None: not known) cannot start, or None if it fits."""
    need = max(need or 0.0, MIN_RUN_S)
    if need > left(args):
        return f"skipped: budget (needs ~{need:.0f} s, {max(left(args), 0):.0f} s left)"
    return None


def estimate(base, share, bound_k=None):
    """Seconds a run would take that does `share` of the default run's work after start-up
    (or, with bound_k, its bound at that K), or None if the default run did not say."""
    if base.get("startup") is None:
        return None
    if bound_k:  # the bound's time grows with K
        return base["startup"] + (base["bound_s"] or 0.0) * bound_k / (base["k"] or 1)
    return base["startup"] + (base["wall"] - base["startup"]) * share


def run(args, path, flags, log):
    """`python PATH FLAGS` through the wrapper, killed when the budget ends, its stderr in
    `log`: wall, stdout lines with their seconds from launch, peak MB, bound line, error."""
    t0, limit = time.perf_counter(), max(left(args), 0.0)
    cmd = [sys.executable, "-c", WRAPPER, path, *flags]
    with open(log, "w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        timer = threading.Timer(limit, proc.kill)
        timer.start()
        lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
        code, wall = proc.wait(), time.perf_counter() - t0
        timer.cancel()
        err.seek(0)
        stderr = err.read().splitlines()
    peak = [int(s.split()[1]) for s in stderr if s.startswith("PEAK_BYTES ")]
    said = [s.strip() for s in stderr if s.strip() and not s.startswith("PEAK_BYTES ")]
    r = {"wall": wall, "lines": lines, "error": None, "memory": peak[0] / 2**20 if peak else None}
    if code and wall >= limit:
        r["error"] = f"stopped: budget (killed after {wall:.0f} s)"
    elif code:
        r["error"] = f"failed: exit {code}: {said[-1] if said else 'nothing on stderr'}"
    found = [(t, BOUND.search(line)) for t, line in lines if BOUND.search(line)]
    r["bound_at"], match = found[-1] if found else (None, None)
    r["nll"], r["k"] = (float(match[1]), int(match[2])) if match else (None, None)
    return r


def median(rows, column):
    values = [float(row[column]) for row in rows if row.get(column)]
    return statistics.median(values) if values else None


def train(args, script, epochs, name, device, extra=()):
    """`python SCRIPT.py --epochs N` into a fresh SCRATCH/NAME: what its lines and metrics.csv
    say, and for the estimates of later cases its start-up, s per epoch and the rest."""
    out = os.path.join(args.scratch, name)
    shutil.rmtree(out, ignore_errors=True)  # a run into another run's folder prints a note
    flags = ["--epochs", str(epochs), "--out", out, "--data-dir", args.data_dir, "--device", device]
    r = run(args, os.path.join(ROOT, f"{script}.py"), [*flags, *extra], out + ".log")
    try:
        with open(os.path.join(out, "metrics.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        rows = []
    at = [t for t, line in r["lines"] if line.startswith("epoch ")]
    r["startup"] = next((t for t, line in r["lines"] if line.startswith(f"{script}: ")), None)
    r.update(out=out, epochs_at=at, elbos=[float(row["test_neg_elbo"]) for row in rows])
    r.update(s_epoch=median(rows, "train_s"), images_s=median(rows, "images_per_s"))
    r["elbo"], r["measured"] = r["elbos"][-1] if rows else None, bool(rows and at)
    r["bound_s"] = r["bound_at"] - at[-1] if r["bound_at"] and at else None
    if r["error"] is None and not r["measured"]:
        r["error"] = "failed: exit 0 but no epoch line or no metrics.csv"
    return r


def num(value, digits=1):
    return "—" if value is None else f"{value:.{digits}f}"


def bound_text(r):
    return "—" if r["nll"] is None else f"{r['nll']:.2f} (K={r['k']})"


def case_default(args, results, script):
    """The default command at --epochs."""
    if refuse(args, None):
        return {"error": refuse(args, None)}
    r = train(args, script, args.epochs, f"default-{script}", args.device)
    cells = [num(r["wall"]), num(r["startup"]), num(r["s_epoch"], 2), num(r["images_s"], 0)]
    cells += [num(r["memory"], 0), num(r["elbo"], 2), num(r["bound_s"]), bound_text(r)]
    return {**r, "rows": [cells] if r["measured"] else []}


def case_bound(args, results, script):
    """The bound at K = --bound-k on the full test set, on the default run's checkpoint."""
    base = results[("default", script)]
    if base.get("error") or not os.path.isfile(os.path.join(base["out"], "checkpoint.pt")):
        return {"error": "skipped: no checkpoint (the default case did not run to the end)"}
    if refuse(args, estimate(base, 0, args.bound_k)):
        return {"error": refuse(args, estimate(base, 0, args.bound_k))}
    flags = ["--eval-only", "--iw-samples", str(args.bound_k), "--out", base["out"],
             "--data-dir", args.data_dir, "--device", args.device]  # fmt: skip
    log = os.path.join(args.scratch, f"bound-{script}.log")
    r = run(args, os.path.join(ROOT, f"{script}.py"), flags, log)
    tested = [(t, line) for t, line in r["lines"] if "-ELBO" in line]  # its test line
    elbo = re.search(r"-ELBO\s+(\S+)", tested[0][1]) if tested else None
    bound_s = r["bound_at"] - tested[0][0] if r["bound_at"] and tested else None
    cells = [num(r["wall"]), num(bound_s), num(r["memory"], 0), elbo[1] if elbo else "—"]
    if r["error"] is None and r["nll"] is None:
        r["error"] = "failed: exit 0 but no IWAE bound line"
    return {**r, "rows": [[*cells, bound_text(r)]] if r["nll"] is not None else []}


def case_check(args, results, script):
    """--check-epochs on the device and on the CPU, same seed: test -ELBO and output files."""
    base, runs, share = results[("default", script)], {}, args.check_epochs / args.epochs
    sides = ["device", "cpu"] if args.device != "cpu" else ["device"]  # on a CPU, one run
    if args.device == "cpu" and share == 1 and base.get("measured") and not base["error"]:
        runs["device"], sides = base, []  # and the default run is that run
    for side in sides:
        refused = refuse(args, estimate(base, share) if side == "device" else None)
        device, name = args.device if side == "device" else "cpu", f"check-{script}-{side}"
        runs[side] = {"error": refused} if refused else train(
            args, script, args.check_epochs, name, device, ["--iw-samples", "0"])  # fmt: skip
    dev = runs["device"]
    cpu = runs.get("cpu", dev)  # with --device cpu, against itself: the plumbing only
    files, diff = "—", None
    if "out" in dev:
        missing = [f for f in OUTPUT_FILES if not os.path.isfile(os.path.join(dev["out"], f))]
        files = "missing: " + ", ".join(missing) if missing else "all present"
    if dev.get("elbo") is not None and cpu.get("elbo") is not None:
        diff = dev["elbo"] - cpu["elbo"]
    failed = any((r["error"] or "").startswith("failed") for r in runs.values())
    ok = diff is not None and abs(diff) <= TOLERANCE and files == "all present"
    verdict = "FAIL" if failed else "not checked" if diff is None else "PASS" if ok else "FAIL"
    cells = [num(dev.get("elbo"), 2), num(cpu.get("elbo"), 2), num(diff, 2), verdict, files]
    cells += [num(dev.get("wall")), num(cpu.get("wall"))]
    errors = "; ".join(f"{side}: {r['error']}" for side, r in runs.items() if r["error"])
    rows = [cells] if "wall" in dev or "wall" in cpu else []
    return {"rows": rows, "verdict": verdict, "error": errors or None}


class Stop(Exception):
    """A run of the quality case that did not end with a test -ELBO: why."""


def case_quality(args, results, script):
    """Time to the tutorial's test -ELBO: its loop for --epochs, then the shortest --epochs N."""
    base = results[("default", script)]
    if base.get("error") or not base.get("measured"):
        return {"error": "skipped: no default run (the quality case needs it)"}
    if refuse(args, None):
        return {"error": refuse(args, None)}
    out = os.path.join(args.scratch, f"quality-{script}-tutorial")
    flags = ["--tutorial", script[4:], "--epochs", str(args.epochs), "--data-dir", args.data_dir,
             "--out", out, "--device", args.device]  # fmt: skip
    tutorial = run(args, os.path.join(ROOT, "benchmarks", "speed.py"), flags, out + ".log")
    stamps = [(t, line) for t, line in tutorial["lines"] if line.startswith("epoch ")]
    result, runs = {"rows": []}, {args.epochs: base}
    if tutorial["error"] or len(stamps) < args.epochs:
        why = tutorial["error"] or "failed: fewer epoch lines than --epochs"
        return {"error": f"{why} (the tutorial loop)"}
    theirs = tutorial_epochs(stamps, tutorial["wall"])

    def final(n):  # the test -ELBO a run of n epochs ends at
        if n not in runs:
            refused = refuse(args, estimate(base, n / args.epochs))
            if refused:
                raise Stop(f"{refused} (--epochs {n})")
            runs[n] = train(args, script, n, f"quality-{script}-{n}", args.device)
        if runs[n]["error"] or runs[n]["elbo"] is None:
            raise Stop(f"{runs[n]['error'] or 'failed: no test -ELBO'} (--epochs {n})")
        return runs[n]["elbo"]

    for epochs in sorted({args.epochs, min(5, args.epochs)}, reverse=True):
        target, tut = theirs["test"][epochs - 1], theirs["at"][epochs - 1]
        cross = next((e for e, t in enumerate(base["elbos"], 1) if t <= target), None)
        try:
            n = shortest(target, cross, final, args.epochs)
            final(n)  # the search may end at the default run without asking for its end
        except Stop as e:
            result["error"] = str(e)
            break
        ours, elbo = runs[n]["wall"], runs[n]["elbo"]
        at = f"{cross} ({base['epochs_at'][cross - 1]:.0f})" if cross else "—"
        cells = [f"{target:.2f}", epochs, f"{tut:.1f}", n, f"{ours:.1f}", f"{elbo:.2f}"]
        result["rows"].append([*cells, f"{tut / ours:.2f}", at])
    return result


TITLES = {
    "default": ["wall s", "start-up s", "s/epoch", "images/s", "peak MB", "test -ELBO",
                "bound s", "IWAE bound"],
    "bound": ["wall s", "bound s", "peak MB", "test -ELBO", "IWAE bound"],
    "check": ["device test -ELBO", "CPU test -ELBO", "difference", "verdict", "output files",
              "device wall s", "CPU wall s"],
    "quality": ["tutorial's test -ELBO", "after its epochs", "tutorial s", "ours: `--epochs N`",
                "ours s", "ours' test -ELBO", "speed-up", "default run gets there at epoch (s)"],
}  # fmt: skip


def row(*cells):
    return "| " + " | ".join(str(c).replace("|", "\\|")[:200] for c in cells) + " |"


def table(results, case, scripts):
    """A row per script and row of its result, then its error or why it was skipped."""
    lines = [row("script", *TITLES[case]), row(*["---"] * (len(TITLES[case]) + 1))]
    for script in scripts:
        r = results.get((case, script), {"error": "not run yet"})
        lines += [row(script, *cells) for cells in r.get("rows", [])]
        if r.get("error"):
            lines.append(row(script, r["error"], *[""] * (len(TITLES[case]) - 1)))
    return ["", *lines, ""]


def write_report(args, results, finished):
    """The markdown report, into --report (whole or not at all), and returned."""
    a, gpu = args, "no GPU used"
    if a.device == "cuda":
        p, cudnn = torch.cuda.get_device_properties(0), torch.backends.cudnn.version()
        gpu = f"{p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
        gpu += f"CUDA {torch.version.cuda}, cuDNN {cudnn}"
    text = "\n".join([
        f"### GPU check: {a.title}{'' if finished else ' (in progress)'}",
        "",
        f"`python benchmarks/gpu_check.py {shlex.join(sys.argv[1:])}`  ",
        f"{datetime.date.today()}, {machine()}, {gpu}, torch {torch.__version__}, Python "
        f"{platform.python_version()}  ",
        f"device {a.device}, budget {a.budget:.0f} s, used {time.perf_counter() - STARTED:.0f} s; "
        "each run one process, launch to exit; peak MB: "
        f"{'torch.cuda.max_memory_allocated()' if a.device == 'cuda' else 'peak RSS'}.",
        "",
        f"1. `python SCRIPT.py --epochs {a.epochs}`. Start-up: to the header line; s/epoch, "
        "images/s: metrics.csv's medians; bound s: from the last epoch line to the bound line.",
        *table(results, "default", a.scripts),
        f"2. The bound at K={a.bound_k} on the checkpoint of 1: `python SCRIPT.py --eval-only "
        f"--iw-samples {a.bound_k} --out THAT_OUT`; bound s: from its test line.",
        *table(results, "bound", a.scripts),
        f"3. Numerical check, {a.device} against cpu, `--epochs {a.check_epochs} --iw-samples "
        f"0`, seed 1: PASS if the test -ELBO is within {TOLERANCE:g} nat and every one of "
        f"{', '.join(OUTPUT_FILES)} is in the device run's folder.",
        *table(results, "check", a.scripts),
        f"4. Time to the tutorial's test -ELBO after {a.epochs}{' and 5' if a.epochs > 5 else ''}"
        " epochs (speed.py --quality, one repetition): the shortest `python SCRIPT.py --epochs "
        "N` that ends at or below it, against the tutorial loop's time to that epoch.",
        *table(results, "quality", a.scripts),
        f"Each run's stderr: {a.scratch}/CASE-SCRIPT.log.",
    ]) + "\n"  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report + ".tmp", "w") as f:
        f.write(text)
    os.replace(args.report + ".tmp", args.report)
    return text


def main():
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
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES[:3]), metavar="CASE",
                   help=f"of {', '.join(CASES)} (default: all but quality)")  # fmt: skip
    p.add_argument("--scripts", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    args.data_dir, args.scratch = os.path.abspath(args.data_dir), os.path.abspath(args.scratch)
    args.scripts = [s for s in SCRIPTS if s in args.scripts]
    os.environ["PYTHONUNBUFFERED"] = "1"  # for the runs: a line's time is when it was printed
    args.title = torch.cuda.get_device_name() if args.device == "cuda" else "CPU only"
    os.makedirs(args.scratch, exist_ok=True)
    cases = {"default": case_default, "bound": case_bound, "check": case_check}
    results, failed, cases["quality"] = {}, False, case_quality
    for case in CASES:
        for script in args.scripts:
            if case not in args.cases:
                results[(case, script)] = {"error": "skipped: not in --cases"}
                continue
            print(f"[{time.perf_counter() - STARTED:4.0f} s] {case} {script}:", end=" ", flush=True)
            try:
                result = cases[case](args, results, script)
            except Exception as e:  # a bug here must not lose the cases measured so far
                result = {"error": f"failed: in gpu_check.py: {type(e).__name__}: {e}"}
            results[(case, script)] = result
            failed |= (result.get("error") or "").startswith("failed")
            failed |= result.get("verdict") == "FAIL"
            said = [f"{result['wall']:.1f} s" if "wall" in result else None, result.get("verdict")]
            print(", ".join(filter(None, [*said, result.get("error") or "ok"])), flush=True)
            write_report(args, results, False)
    print(f"\n{write_report(args, results, True)}report: {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
