"""What every run pays besides training: start-up and exit, each part in its own process.

    python benchmarks/fixed_costs.py                  # appends its table to RESULTS.md
    python benchmarks/fixed_costs.py --no-record --reps 3

Each row is the median wall time of --reps fresh interpreters (alternating the rows), minus the
row it builds on, so that each part is what it adds:
  Python                  `python -c pass`
  import torch            + `import torch`
  import a script         + `import vae_mlp` (torch, common.py, argparse, gzip, ...)
  read MNIST              + common.load_data: the four gzipped IDX files, checked
  first optimizer step    + one Adam step: torch.optim imports torch._dynamo on the first one
  matplotlib              + `matplotlib.figure`, imported when the first figure is drawn
  exit: garbage collector the same process ending with sys.exit, against ending through
                          common.exit_fast (gc.freeze first): what the collector's last pass costs
  exit: the rest          common.exit_fast against os._exit (no teardown at all)
and a real run, `python vae_mlp.py --epochs 1 --iw-samples 0` (its main through common.run),
ending with sys.exit against ending through common.exit_fast, as the scripts do.
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quality import machine  # noqa: E402
from speed import record  # noqa: E402

SETUP = f"import sys; sys.path.insert(0, {ROOT!r})\n"
STEPS = {
    "Python": "pass",
    "import torch": "import torch",
    "import a script": "import vae_mlp, common",
    "read MNIST": "args = vae_mlp.get_args(['--data-dir', DATA, '--out', OUT])\n"
    "data = common.load_data(args, torch.device('cpu'))",
    "first optimizer step": "model = vae_mlp.VAE()\n"
    "opt = torch.optim.Adam(model.parameters(), fused=True)\n"
    "model(data['test'][0][:64].float().div(255))[0].sum().backward()\nopt.step()",
    "matplotlib": "import matplotlib.figure",
}
ENDS = {  # how the full process of the last step ends
    "sys.exit": "sys.exit(0)",
    "common.exit_fast": "common.exit_fast(0)",
    "os._exit": "import os; sys.stdout.flush(); os._exit(0)",
}


FLAGS = "'--epochs', '1', '--iw-samples', '0', '--data-dir', DATA, '--out', OUT"
RUN = f"code = common.run(vae_mlp.main, [{FLAGS}])\n"  # then it ends as ENDS says


def program(upto, end, data_dir, out):
    names = list(STEPS)
    body = [STEPS[n] for n in names[: names.index(upto) + 1]]
    return SETUP + f"DATA, OUT = {data_dir!r}, {out!r}\n" + "\n".join(body) + "\n" + end


def wall(code):
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fixed_costs.py: this program failed:\n{code}\n{done.stderr}")
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interpreters per row (the median)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args()
    out = os.path.join(ROOT, "results", "fixed_costs")
    last = list(STEPS)[-1]
    codes = {step: program(step, ENDS["os._exit"], args.data_dir, out) for step in STEPS}
    codes.update({end: program(last, ENDS[end], args.data_dir, out) for end in ENDS})
    for end in ("sys.exit", "common.exit_fast"):
        run = RUN + ENDS[end].replace("(0)", "(code)")
        codes[f"run, {end}"] = program("import a script", run, args.data_dir, out)
    times = {name: [] for name in codes}
    for _ in range(args.reps):  # alternating
        for name, code in codes.items():
            times[name].append(wall(code))
    med = {name: statistics.median(t) for name, t in times.items()}
    rows, before = [], 0.0
    for step in STEPS:
        rows.append((step, med[step] - before))
        before = med[step]
    rows.append(
        ("exit: the garbage collector's last pass", med["sys.exit"] - med["common.exit_fast"])
    )
    rows.append(("exit: the rest of the teardown", med["common.exit_fast"] - med["os._exit"]))
    lines = [
        "### fixed costs: start-up and exit",
        "",
        f"`python benchmarks/fixed_costs.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"{datetime.date.today()}, {machine()}, torch {torch.__version__}, Python "
        f"{sys.version.split()[0]}, median of {args.reps} fresh interpreters per row, alternating",
        "",
        "| part | s |",
        "| --- | --- |",
        *(f"| {name} | {s:.2f} |" for name, s in rows),
        f"| a process that does all of it and ends with sys.exit | {med['sys.exit']:.2f} |",
        f"| the same, ending through common.exit_fast | {med['common.exit_fast']:.2f} |",
        f"| `python vae_mlp.py --epochs 1 --iw-samples 0`, ending with sys.exit | "
        f"{med['run, sys.exit']:.2f} |",
        f"| the same, ending through common.exit_fast (as the scripts do) | "
        f"{med['run, common.exit_fast']:.2f} |",
    ]
    record(lines, args)


if __name__ == "__main__":
    main()
