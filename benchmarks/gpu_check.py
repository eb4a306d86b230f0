"""GPU check: what a GPU user meets with both scripts, measured in one command within a budget.

On a lent GPU machine, from the repository root (only the report needs to come back; the
scratch folder, checkpoints and all, stays in results/gpu_check/):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --report $OUT/gpu_check.md

Anywhere else with a GPU: `python benchmarks/gpu_check.py` (cuda, 20 epochs, K = 1000).
On a CPU, as a smoke test of this script (DIR holds MNIST/raw/; --compile left out: slow here):

    python benchmarks/gpu_check.py --device cpu --epochs 1 --check-epochs 1 --bound-k 10 \
        --data-dir DIR --cases default bound check tf32-off tf32-on batch-256 batch-512

Budget: --budget seconds (default 420), counted from this script's launch, so that the whole
command ends within 8 minutes. A case whose estimated time (from the default run of the same
script) does not fit in what is left is skipped ("skipped: budget"); a run still going when the
budget ends is killed ("stopped: budget"). A failed run is reported with its one-line error, and
the next case runs.

The cases, in order of priority, each for vae_mlp.py then vae_conv.py:
  default    the default command `python SCRIPT.py --epochs E`, launch to exit: wall, start-up
             (to the script's header line), median s/epoch, images/s and test evaluation s
             (metrics.csv: train_s, images_per_s, test_s), the final IWAE bound's s (at the
             script's default K), peak memory, the final test -ELBO and IWAE bound
  bound      the bound at K = --bound-k on the full test set, on the default run's checkpoint:
             `python SCRIPT.py --eval-only --iw-samples K --out THAT_OUT`
  check      --check-epochs epochs (--iw-samples 0), the same seed, on the device and on the
             CPU: test -ELBO within 1 nat, and every file of OUTPUT_FILES in the device run's
             folder (with --device cpu: CPU against CPU, the plumbing only)
  tf32-off   the default command with torch.backends.cuda.matmul.allow_tf32 and
  tf32-on    torch.backends.cudnn.allow_tf32 both False / both True before the script runs.
             The scripts turn cuDNN's off themselves (common.get_device, since this check
             found it no faster), so the report gives the settings each run ended with. On a
             CPU: run, to no effect.
  batch-256  --batch-size 256 / 512 (the scripts' defaults are 64 and 128)
  batch-512
  compile    --compile (last: it compiles for tens of seconds)
  quality    time to the tutorial's test -ELBO (speed.py --quality, one repetition, on the
             device; only when named in --cases, as its own command: the tutorial loop trains
             --epochs epochs first). For the tutorial's test -ELBO after --epochs and after 5
             epochs: the tutorial's time to that epoch (launch to its line, plus its exit), and
             the shortest `python SCRIPT.py --epochs N` that ends at or below it (searched from
             the epoch where the default run crosses it, as speed.py does), launch to exit

Each run is its own process, `python -c WRAPPER TF32 SCRIPT.py FLAGS`: WRAPPER sets TF32 as the
case asks, runs the script as `python SCRIPT.py FLAGS` would (runpy), and at exit prints the
peak GPU memory (torch.cuda.max_memory_allocated) and peak RSS (getrusage) on stderr. Each
run writes into a fresh folder SCRATCH/CASE-SCRIPT/ (emptied first), its stderr beside it.

Output: a markdown section (date, machine, GPU, torch, CUDA, cuDNN, Python, the command; a table
per case; the warnings the runs printed) in --report, rewritten after every run so that a check
killed from outside still leaves one, and on stdout at the end, to paste into
benchmarks/RESULTS.md. Exit code 1 if a run failed or the check failed, else 0 (skips and
runs stopped by the budget are in the report, not failures).
"""

import argparse
import csv
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
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
CASES = ("default", "bound", "check", "tf32-off", "tf32-on", "batch-256", "batch-512", "compile")
CASES += ("quality",)  # only when named in --cases
RUNS = {  # the cases that train at --epochs: TF32 setting, extra flags, label in the report
    "default": ("default", [], "the scripts' defaults"),
    "tf32-off": ("off", [], "TF32 off (matmul and cuDNN)"),
    "tf32-on": ("on", [], "TF32 on (matmul and cuDNN)"),
    "batch-256": ("default", ["--batch-size", "256"], "`--batch-size 256`"),
    "batch-512": ("default", ["--batch-size", "512"], "`--batch-size 512`"),
    "compile": ("default", ["--compile"], "`--compile`"),
}
OUTPUT_FILES = ("samples.png", "samples.gif", "reconstructions.png", "interpolation.png",
                "traversal.png", "latent.png", "loss.png", "metrics.csv",
                "checkpoint.pt")  # fmt: skip
TOLERANCE = 1.0  # nats of test -ELBO between the device and the CPU
MIN_RUN_S = 10.0  # the least a run takes: a process that imports torch and loads MNIST
COMPILE_S = 60.0  # what --compile is expected to add to a run, for the budget

# `python SCRIPT.py FLAGS` after setting TF32 (argv[1]: default, on or off); at exit, the peak
# memory on stderr
WRAPPER = """\
import atexit, os, runpy, sys
import torch

def peak():
    on = {True: "on", False: "off"}  # as the run used them: the scripts turn cuDNN's off
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    print("TF32_SETTINGS", f"matmul {on[matmul]}, cuDNN {on[cudnn]}", file=sys.stderr)
    if torch.cuda.is_initialized():
        print("PEAK_MEMORY_BYTES", torch.cuda.max_memory_allocated(), file=sys.stderr)
    try:
        import resource
        kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib
        print("PEAK_RSS_BYTES", rss, file=sys.stderr)
    except ImportError:
        pass

atexit.register(peak)
tf32, script = sys.argv[1], sys.argv[2]
if tf32 != "default":
    torch.backends.cuda.matmul.allow_tf32 = tf32 == "on"
    torch.backends.cudnn.allow_tf32 = tf32 == "on"
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""
OURS = ("PEAK_MEMORY_BYTES", "PEAK_RSS_BYTES", "TF32_SETTINGS")  # the wrapper's stderr lines
BOUND = re.compile(r"<= (\S+) nats per image \(IWAE bound, K=(\d+)\)")


# ----------------------------------------------------------------------------
# One run: a process, launch to exit, with the time of each line it printed


def run_process(script, flags, log, limit, tf32="default"):
    """`python SCRIPT.py FLAGS` through the wrapper, killed after `limit` s, its stderr in `log`:
    wall, exit code, stdout lines with their times, stderr lines, peak memory, error."""
    cmd = [sys.executable, "-c", WRAPPER, tf32, os.path.join(ROOT, f"{script}.py"), *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # a line's time is when it was printed
    killed = threading.Event()

    def kill():
        killed.set()
        try:  # the run's own process group: torch.compile's workers go too
            if hasattr(os, "killpg"):
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass

    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)  # fmt: skip
        timer = threading.Timer(max(limit, 0.0), kill)
        timer.start()
        try:
            lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:  # this script was interrupted: the run stops too
                kill()
                proc.wait()
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read().splitlines()
    run = {"wall": wall, "code": code, "lines": lines, "stderr": stderr, "error": None}
    for line in stderr:
        name, _, value = line.partition(" ")
        if name in OURS:
            run[name] = value if name == "TF32_SETTINGS" else int(value)
    said = [s.strip() for s in stderr if s.strip() and not s.startswith(OURS)]
    if killed.is_set():
        run["error"] = f"stopped: budget (killed after {wall:.0f} s)"
    elif code != 0:
        run["error"] = f"failed: exit {code}: {said[-1] if said else 'nothing on stderr'}"
    return run


def first_time(run, test):
    return next((t for t, line in run["lines"] if test(line)), None)


def last_bound(run):
    """(time, -log p(x) bound, K) of the run's IWAE bound line, or Nones."""
    found = [(t, BOUND.search(line)) for t, line in run["lines"] if BOUND.search(line)]
    return (found[-1][0], float(found[-1][1][1]), int(found[-1][1][2])) if found else (None,) * 3


def read_metrics(out):
    try:
        with open(os.path.join(out, "metrics.csv"), newline="") as f:
            return list(csv.DictReader(f))  # columns by name: more may come
    except OSError:
        return []


def median(rows, column):
    values = [float(r[column]) for r in rows if r.get(column)]
    return statistics.median(values) if values else None


def peak_mb(run, device):
    peak = run.get("PEAK_MEMORY_BYTES" if device == "cuda" else "PEAK_RSS_BYTES")
    return None if peak is None else peak / 2**20


def training_run(script, flags, out, limit, device, tf32="default"):
    """A run that trains into `out`, with what its lines and metrics.csv say."""
    run = run_process(script, flags, out + ".stderr.txt", limit, tf32)
    header = first_time(run, lambda s: s.startswith(f"{script}: ") and " parameters on " in s)
    epochs = [t for t, line in run["lines"] if line.startswith("epoch ")]
    bound_t, nll, k = last_bound(run)
    rows = read_metrics(out)
    run.update(
        out=out,
        startup=header,
        s_epoch=median(rows, "train_s"),
        images_s=median(rows, "images_per_s"),
        test_s=median(rows, "test_s"),
        elbo=float(rows[-1]["test_loss"]) if rows and rows[-1].get("test_loss") else None,
        nll=nll,
        k=k,
        bound_s=bound_t - epochs[-1] if bound_t and epochs else None,
        memory=peak_mb(run, device),
        measured=bool(rows and epochs),
    )
    if header is not None and epochs:  # for the estimates of the later cases
        run["per_epoch"] = (epochs[-1] - header) / len(epochs)
        run["tail"] = run["wall"] - (bound_t or epochs[-1])
    if run["error"] is None and not run["measured"]:
        run["error"] = "failed: exit 0 but no epoch line or no metrics.csv"
    return run


class Budget:
    def __init__(self, seconds):
        self.seconds, self.end = seconds, STARTED + seconds

    def left(self):
        return self.end - time.perf_counter()

    def refuse(self, need):
        """None if a run of about `need` seconds (None: not known) fits in what is left."""
        need = max(need or 0.0, MIN_RUN_S)
        if need > self.left():
            return f"skipped: budget (needs ~{need:.0f} s, {max(self.left(), 0):.0f} s left)"
        return None


def estimate(base, epochs, bound=True):
    """Seconds a run of `epochs` epochs would take, from the default run of the same script."""
    if not base or "per_epoch" not in base:
        return None
    bound_s = (base["bound_s"] or 0.0) if bound else 0.0
    return base["startup"] + epochs * base["per_epoch"] + bound_s + base["tail"]


# ----------------------------------------------------------------------------
# The cases


def fresh(folder):
    """A run into a folder that held another prints a note and replaces it: start empty."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def flags_for(args, epochs, out, device):
    return ["--epochs", str(epochs), "--out", out, "--data-dir", args.data_dir, "--device", device]


def case_run(args, budget, results, case, script):
    """default, tf32-off, tf32-on, batch-256, batch-512, compile: one run at --epochs."""
    tf32, extra, _ = RUNS[case]
    need = None if case == "default" else estimate(results[("default", script)], args.epochs)
    if need is not None and case == "compile":
        need += COMPILE_S
    refused = budget.refuse(need)
    if refused:
        return {"error": refused}
    out = fresh(os.path.join(args.scratch, f"{case}-{script}"))
    flags = flags_for(args, args.epochs, out, args.device) + extra
    return training_run(script, flags, out, budget.left(), args.device, tf32)


def case_bound(args, budget, results, script):
    """The bound at K = --bound-k on the default run's checkpoint (--eval-only)."""
    base = results[("default", script)]
    if base.get("error") or not os.path.isfile(os.path.join(base["out"], "checkpoint.pt")):
        return {"error": "skipped: no checkpoint (the default case did not run to the end)"}
    need = None
    if base["bound_s"] is not None and base["k"]:  # the bound's time grows with K
        need = base["startup"] + base["bound_s"] * args.bound_k / base["k"] + base["tail"]
    refused = budget.refuse(need)
    if refused:
        return {"error": refused}
    flags = ["--eval-only", "--iw-samples", str(args.bound_k), "--out", base["out"],
             "--data-dir", args.data_dir, "--device", args.device]  # fmt: skip
    log = os.path.join(args.scratch, f"bound-{script}.stderr.txt")
    run = run_process(script, flags, log, budget.left())
    tested = [(t, line) for t, line in run["lines"] if "): test" in line]  # PATH (epoch N): test
    elbo = re.search(r"-ELBO\s+(\S+)", tested[0][1]) if tested else None
    bound_t, nll, k = last_bound(run)
    run.update(
        bound_s=bound_t - tested[0][0] if bound_t and tested else None,
        nll=nll,
        k=k,
        elbo=float(elbo[1]) if elbo else None,
        memory=peak_mb(run, args.device),
        measured=nll is not None,
    )
    if run["error"] is None and nll is None:
        run["error"] = "failed: exit 0 but no IWAE bound line"
    return run


def case_check(args, budget, results, script):
    """--check-epochs on the device and on the CPU, same seed: test -ELBO and output files."""
    runs, base = {}, results[("default", script)]
    for side, device in (("device", args.device), ("CPU", "cpu")):
        need = estimate(base, args.check_epochs, bound=False) if device == args.device else None
        refused = budget.refuse(need)
        if refused:
            runs[side] = {"error": refused}
            continue
        out = fresh(os.path.join(args.scratch, f"check-{script}-{side.lower()}"))
        flags = flags_for(args, args.check_epochs, out, device) + ["--iw-samples", "0"]
        runs[side] = training_run(script, flags, out, budget.left(), device)
    dev, cpu = runs["device"], runs["CPU"]
    check = {"runs": list(runs.values()), "files": "—"}
    check["measured"] = any("wall" in r for r in runs.values())
    check.update(dev_elbo=dev.get("elbo"), cpu_elbo=cpu.get("elbo"), difference=None)
    check.update(dev_wall=dev.get("wall"), cpu_wall=cpu.get("wall"))
    if "out" in dev:
        paths = [os.path.join(dev["out"], name) for name in OUTPUT_FILES]
        missing = [
            os.path.basename(p) for p in paths if not os.path.isfile(p) or not os.path.getsize(p)
        ]
        check["files"] = "missing: " + ", ".join(missing) if missing else "all present"
    if check["dev_elbo"] is not None and check["cpu_elbo"] is not None:
        check["difference"] = check["dev_elbo"] - check["cpu_elbo"]
    errors = [f"{side}: {r['error']}" for side, r in runs.items() if r.get("error")]
    if any((r.get("error") or "").startswith("failed") for r in runs.values()):
        check["verdict"] = "FAIL"
    elif check["difference"] is None:  # a side skipped or stopped by the budget
        check["verdict"] = "not checked"
    elif abs(check["difference"]) <= TOLERANCE and check["files"] == "all present":
        check["verdict"] = "PASS"
    else:
        check["verdict"] = "FAIL"
    check["error"] = "; ".join(errors) or None
    return check


class Stop(Exception):
    """A run of the quality case that did not end with a test -ELBO: why."""


def case_quality(args, budget, results, script):
    """Time to the tutorial's test -ELBO: its loop for --epochs, then the shortest --epochs N."""
    base = results[("default", script)]
    if not base.get("measured"):
        return {"error": "skipped: no default run (the quality case needs it)"}
    refused = budget.refuse(None)
    if refused:
        return {"error": refused}
    case = script.removeprefix("vae_")
    out = fresh(os.path.join(args.scratch, f"quality-{script}-tutorial"))
    flags = ["--tutorial", case, "--epochs", str(args.epochs), "--data-dir", args.data_dir,
             "--out", out, "--device", args.device]  # fmt: skip
    tutorial = run_process("benchmarks/speed", flags, out + ".stderr.txt", budget.left())
    stamps = [(t, line) for t, line in tutorial["lines"] if line.startswith("epoch ")]
    result = {"runs": [tutorial], "rows": [], "measured": False}
    if tutorial["error"] or len(stamps) < args.epochs:
        why = tutorial["error"] or "failed: fewer epoch lines than --epochs"
        result["error"] = f"{why} (the tutorial loop)"
        return result
    epochs_of = tutorial_epochs(stamps, tutorial["wall"])
    ours_tests = [float(r["test_loss"]) for r in read_metrics(base["out"])]
    ours_at = [t for t, line in base["lines"] if line.startswith("epoch ")]
    runs = {args.epochs: base}

    def final(n):
        if n not in runs:
            refused = budget.refuse(estimate(base, n))
            if refused:
                raise Stop(f"{refused} (--epochs {n})")
            out = fresh(os.path.join(args.scratch, f"quality-{script}-{n}"))
            runs[n] = training_run(script, flags_for(args, n, out, args.device), out,
                                   budget.left(), args.device)  # fmt: skip
            result["runs"].append(runs[n])
        if runs[n]["error"] or runs[n]["elbo"] is None:
            raise Stop(f"{runs[n]['error'] or 'failed: no test -ELBO'} (--epochs {n})")
        return runs[n]["elbo"]

    for epochs in sorted({args.epochs, min(5, args.epochs)}, reverse=True):
        target = epochs_of["test"][epochs - 1]
        cross = next((e for e, t in enumerate(ours_tests, 1) if t <= target), None)
        try:
            n = shortest(target, cross, final, args.epochs)
            final(n)  # the search may end at the default run without asking for its end
        except Stop as e:
            result["error"] = str(e)
            break
        crossed = (cross, ours_at[cross - 1]) if cross else (None, None)
        tut = epochs_of["at"][epochs - 1]
        result["rows"].append((target, epochs, tut, n, runs[n]["wall"], runs[n]["elbo"], crossed))
    result["measured"] = bool(result["rows"])
    result["wall"] = sum(r["wall"] for r in result["runs"])  # the default run is not among them
    return result


def quality_lines(results, scripts):
    titles = ["script", "tutorial's test -ELBO", "after its epochs", "tutorial s",
              "ours: `--epochs N`", "ours s", "ours' test -ELBO", "speed-up",
              "default run gets there at epoch (s)"]  # fmt: skip
    lines = [row(*titles), row(*["---"] * len(titles))]
    for script in scripts:
        r = results.get(("quality", script), {"error": "not run yet"})
        for target, epochs, tut, n, ours, elbo, (cross, at) in r.get("rows", []):
            where = f"{cross} ({at:.0f})" if cross else "—"
            speedup = f"{tut / ours:.2f}"
            lines.append(row(script, f"{target:.2f}", epochs, f"{tut:.1f}", n, f"{ours:.1f}",
                             f"{elbo:.2f}", speedup, where))  # fmt: skip
        if r.get("error"):
            lines.append(row(script, r["error"], *[""] * (len(titles) - 2)))
    return lines


# ----------------------------------------------------------------------------
# The report


def num(value, digits=1):
    return "—" if value is None else f"{value:.{digits}f}"


def cell(text):
    text = str(text).replace("|", "\\|")
    return text if len(text) <= 200 else text[:197] + "..."


def row(*cells):
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def table(results, keys, label_titles, columns):
    """One row per (case, script) in `keys`: its labels, then each column's cell (a function of
    the result), if it measured anything; then its error or skip reason, if any."""
    titles = [*label_titles, *(title for title, _ in columns)]
    lines = [row(*titles), row(*["---"] * len(titles))]
    for key, labels in keys:
        r = results.get(key, {"error": "not run yet"})
        if r.get("measured"):
            lines.append(row(*labels, *(cell_of(r) for _, cell_of in columns)))
        if r.get("error"):
            lines.append(row(*labels, r["error"], *[""] * (len(columns) - 1)))
    return lines


def bound_text(r):
    return "—" if r["nll"] is None else f"{r['nll']:.2f} (K={r['k']})"


TRAINING = [  # the columns of a training run
    ("wall s", lambda r: num(r["wall"])),
    ("start-up s", lambda r: num(r["startup"])),
    ("s/epoch", lambda r: num(r["s_epoch"], 2)),
    ("images/s", lambda r: num(r["images_s"], 0)),
    ("test eval s", lambda r: num(r["test_s"], 2)),
    ("IWAE s", lambda r: num(r["bound_s"])),
    ("peak MB", lambda r: num(r["memory"], 0)),
    ("test -ELBO", lambda r: num(r["elbo"], 2)),
    ("IWAE bound", bound_text),
]
BOUND_COLUMNS = [
    ("wall s", lambda r: num(r["wall"])),
    ("bound s", lambda r: num(r["bound_s"])),
    ("peak MB", lambda r: num(r["memory"], 0)),
    ("test -ELBO", lambda r: num(r["elbo"], 2)),
    ("IWAE bound", bound_text),
]
CHECK_COLUMNS = [
    ("device test -ELBO", lambda r: num(r["dev_elbo"], 2)),
    ("CPU test -ELBO", lambda r: num(r["cpu_elbo"], 2)),
    ("difference", lambda r: num(r["difference"], 2)),
    ("verdict", lambda r: r["verdict"]),
    ("output files", lambda r: r["files"]),
    ("device wall s", lambda r: num(r["dev_wall"])),
    ("CPU wall s", lambda r: num(r["cpu_wall"])),
]
GPU_DEFAULTS = [
    ("TF32", lambda r: r.get("TF32_SETTINGS", "—")),
    *(c for c in TRAINING if c[0] not in ("test eval s", "IWAE s", "IWAE bound")),
]


def cudnn_version():
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not v:
        return "none"
    major, rest = (v // 10000, v % 10000) if v >= 90000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def gpu_description(device):
    """What machine() does not say of the GPU: memory, compute capability, driver."""
    if device != "cuda":
        return "no GPU used (--device cpu)"
    p = torch.cuda.get_device_properties(0)
    text = f"{p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
        text += f", driver {done.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def stderr_notes(results):
    """Each distinct warning or note the runs printed on stderr, with the first run to say it."""
    seen = {}
    for (case, script), result in results.items():
        for run in result.get("runs", [result]):
            for line in run.get("stderr", []):
                line = re.sub(r"^.*?(\w*Warning: )", r"\1", line.strip())  # no file path
                if re.match(r"\w*Warning: |warning: |note: ", line):
                    seen.setdefault(line, f"{case} {script}")
    return [f"- {where}: `{cell(line)}`" for line, where in list(seen.items())[:12]]


def render(args, info, results, budget, finished):
    device, scripts = args.device, args.scripts
    memory = ("the GPU's torch.cuda.max_memory_allocated()" if device == "cuda"
              else "the process's peak RSS (getrusage)")  # fmt: skip
    check_vs = "CPU against CPU (the plumbing only)" if device == "cpu" else f"{device} against CPU"
    lines = [
        f"### GPU check: {info['title']}{'' if finished else ' (in progress)'}",
        "",
        f"`{info['command']}`  ",
        f"{info['date']}, {info['machine']}, {info['gpu']}, torch {torch.__version__}, CUDA "
        f"{torch.version.cuda or 'none'}, cuDNN {cudnn_version()}, "
        f"Python {platform.python_version()}  ",
        f"device {device}, budget {budget.seconds:.0f} s, used "
        f"{time.perf_counter() - STARTED:.0f} s. Each run is one process, launch to exit; "
        f"times in seconds; peak MB: {memory}.",
        "",
        f"1. The default commands, `python SCRIPT.py --epochs {args.epochs}`. Start-up: to the "
        "header line; s/epoch, images/s, test eval s: medians of metrics.csv's train_s, "
        "images_per_s, test_s; IWAE s: from the last epoch line to the bound line.",
        "",
        *table(results, [(("default", s), [s]) for s in scripts], ["script"], TRAINING),
        "",
        f"2. The bound at K={args.bound_k} on the full test set, on the checkpoint of 1: "
        f"`python SCRIPT.py --eval-only --iw-samples {args.bound_k} --out THAT_OUT`. "
        "Bound s: from the test line to the bound line.",
        "",
        *table(results, [(("bound", s), [s]) for s in scripts], ["script"], BOUND_COLUMNS),
        "",
        f"3. Numerical check, {check_vs}: `--epochs {args.check_epochs} --iw-samples 0`, seed 1 "
        f"on both; PASS: test -ELBO within {TOLERANCE:g} nat and all of "
        f"{', '.join(OUTPUT_FILES)} in the device run's folder. The device draws its own "
        "random numbers (data order, noise): the runs agree in distribution, not bit for bit.",
        "",
        *table(results, [(("check", s), [s]) for s in scripts], ["script"], CHECK_COLUMNS),
        "",
        f"4. Evidence for the GPU defaults: each a run of `--epochs {args.epochs}`. The first "
        "rows are those of 1, the scripts' defaults. TF32: "
        "torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 as each run "
        "ended with them (the scripts turn cuDNN's off). The start-up of --compile includes "
        "compiling.",
        "",
    ]
    if device == "cpu":
        lines += ["TF32 has no meaning on a CPU (n/a on cpu): the TF32 rows set the flags and run "
                  "anyway, to show that nothing breaks.", ""]  # fmt: skip
    keys = [((case, s), [label, s]) for case, (_, _, label) in RUNS.items() for s in scripts]
    lines += [*table(results, keys, ["case", "script"], GPU_DEFAULTS), ""]
    lines += [
        f"5. Time to the tutorial's test -ELBO (speed.py --quality, one repetition): the "
        f"tutorial loop (speed.py --tutorial, on {device}) for {args.epochs} epochs; for its "
        f"test -ELBO after {args.epochs} and after {min(5, args.epochs)} epochs, the shortest "
        "`python SCRIPT.py --epochs N` that ends at or below it, launch to exit (N = "
        f"{args.epochs}: the run of 1), and the tutorial's time to that epoch's line, plus its "
        "exit.",
        "",
        *quality_lines(results, scripts),
        "",
    ]
    lines += ["What the runs printed on stderr (warnings and notes, each once):", ""]
    lines += [*(stderr_notes(results) or ["- nothing"]), ""]
    return "\n".join(lines)


def write_report(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# Main


def has_mnist(folder):
    names = ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")
    places = (os.path.join(folder, "MNIST", "raw"), folder)
    return any(os.path.isfile(os.path.join(p, n)) for p in places for n in names)


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu",
                   help="of every run but the check's CPU run")  # fmt: skip
    p.add_argument("--epochs", type=int, default=20, help="of each run but the check's")
    p.add_argument("--check-epochs", type=int, default=2, help="of the check's runs")
    p.add_argument("--bound-k", type=int, default=1000, help="K of the bound case")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"), help="holds MNIST/raw/")
    p.add_argument("--budget", type=float, default=420, help="seconds for all the cases")
    p.add_argument("--report", default=os.path.join(ROOT, "results", "gpu_check.md"),
                   help="the markdown section, rewritten after each run")  # fmt: skip
    p.add_argument("--scratch", default=os.path.join(ROOT, "results", "gpu_check"),
                   help="the runs' folders (each emptied first)")  # fmt: skip
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES[:-1]),
                   metavar="CASE", help=f"a subset of {', '.join(CASES)} (e.g. no compile on a "
                   "CPU; quality only when named)")  # fmt: skip
    p.add_argument("--scripts", nargs="+", choices=SCRIPTS, default=list(SCRIPTS),
                   metavar="SCRIPT", help=f"a subset of {', '.join(SCRIPTS)}")  # fmt: skip
    args = p.parse_args()
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: torch sees no GPU here")
    if not has_mnist(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: no MNIST/raw/train-images-idx3-ubyte(.gz) there")
    args.data_dir, args.scratch = os.path.abspath(args.data_dir), os.path.abspath(args.scratch)
    args.scripts = [s for s in SCRIPTS if s in args.scripts]

    info = {
        "title": torch.cuda.get_device_name() if args.device == "cuda" else "CPU only",
        "command": "python benchmarks/gpu_check.py " + shlex.join(sys.argv[1:]),
        "date": datetime.date.today(),
        "machine": machine(),
        "gpu": gpu_description(args.device),
    }
    budget, results, failed = Budget(args.budget), {}, False
    for case in CASES:
        for script in args.scripts:
            if case not in args.cases:
                results[(case, script)] = {"error": "skipped: not in --cases"}
                continue
            print(f"[{time.perf_counter() - STARTED:4.0f} s] {case} {script}:", end=" ", flush=True)
            try:
                if case == "bound":
                    result = case_bound(args, budget, results, script)
                elif case == "check":
                    result = case_check(args, budget, results, script)
                elif case == "quality":
                    result = case_quality(args, budget, results, script)
                else:
                    result = case_run(args, budget, results, case, script)
            except KeyboardInterrupt:  # Ctrl-C: the run is stopped, the report written
                results[(case, script)] = {"error": "stopped: interrupted"}
                write_report(args.report, render(args, info, results, budget, True))
                print(f"interrupted; report: {args.report}", file=sys.stderr)
                return 130
            except Exception as e:  # a bug here must not lose the cases measured so far
                result = {"error": f"failed: in gpu_check.py: {type(e).__name__}: {e}"}
            results[(case, script)] = result
            error = result.get("error") or ""
            failed |= error.startswith("failed") or result.get("verdict") == "FAIL"
            done = [f"{result['wall']:.1f} s"] if "wall" in result else []
            said = [*done, result.get("verdict"), error or "ok"]
            print(", ".join(filter(None, said)), flush=True)
            write_report(args.report, render(args, info, results, budget, False))
    text = render(args, info, results, budget, True)
    write_report(args.report, text)
    print(f"\n{text}\nreport: {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
