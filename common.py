"""Plumbing for vae_mlp.py and vae_conv.py, none of it the algorithm: a reader can skip this file.

1. flags        validators, and the flags that run a script (--device, --out, --resume, ...)
2. data files   the four IDX files of MNIST or Fashion-MNIST, checked, as uint8 tensors
3. output files pictures, metrics.csv and checkpoint.pt, each written atomically
4. running      device, torch.compile, progress line, signals, one-line errors
"""

import argparse
import contextlib
import csv
import functools
import gc
import gzip
import hashlib
import io
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import zlib

import torch
from torch import nn

if sys.version_info < (3, 9):  # argparse.BooleanOptionalAction, hashlib's usedforsecurity
    version = ".".join(map(str, sys.version_info[:3]))
    raise SystemExit(f"error: vae_mlp.py and vae_conv.py need Python 3.9 or newer, not {version}")


class UserError(Exception):
    """A problem the user can fix (data, flags, files): reported in one line, exit code 1."""


# ----------------------------------------------------------------------------
# 1. Flags


def _number(kind, test, words):
    def parse(text):
        value = kind(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "0 or more")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "0 or more")
seed = _number(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2^32 - 1")


def epochs_or_rule(text):
    """A number of epochs (0 or more), or a rule that counts them from --epochs: 'half' or
    'auto' (the scripts' train_k says what each means)."""
    return text if text in ("half", "auto") else nonnegative_int(text)


epochs_or_rule.__name__ = "epochs"  # argparse names the type in its messages


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (exit code 2) rather than the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: X)' only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_run_flags(p, script):
    """The flags that say where and how a script runs, not what it computes."""
    # fmt: off
    g = p.add_argument_group("running")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto: cuda, then mps, then cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the encoder and decoder (off by default: see README)")
    g.add_argument("--eval-only", action="store_true",
                   help="load the checkpoint, print test metrics and the IWAE bound, do not train")
    g.add_argument("--generate", type=positive_int, metavar="N",
                   help="load the checkpoint, write N samples to OUT/generated.png, do not train")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="folder for pictures, metrics.csv and checkpoint.pt (default: "
                                 f"results/{script}/, or e.g. results/{script}-beta4/: one per "
                                 "experiment, named by the flags above that differ from their "
                                 "defaults, but --epochs and --data-dir)")
    g.add_argument("--checkpoint", help="for --resume/--eval-only/--generate "
                                        "(default: OUT/checkpoint.pt)")
    g.add_argument("--resume", action="store_true", help="continue training from the checkpoint")
    # fmt: on


EXPERIMENT = ("model", "data", "loss", "training")  # groups of flags that name --out's default
NOT_NAMED = ("data_dir", "epochs")  # where the data is, and how long: the same experiment


def parse_args(parser, argv, script):
    argv = list(argv)
    args = parser.parse_args(argv)
    args.script = script
    if args.out is None and args.checkpoint and (args.resume or args.eval_only or args.generate):
        args.out = os.path.dirname(args.checkpoint) or "."  # the run it reads: its folder
    args.out = args.out or os.path.join("results", experiment_name(parser, args))
    args.checkpoint = args.checkpoint or os.path.join(args.out, "checkpoint.pt")
    # the flags typed (allow_abbrev=False: no prefixes), so that they win over a checkpoint's
    args.explicit = sorted(
        a.dest
        for a in parser._actions
        for s in a.option_strings
        if any(arg == s or arg.startswith(s + "=") for arg in argv)
    )
    return args


def experiment_name(parser, args):
    """The script's name, then each experiment flag that differs from its default, as
    vae_mlp-beta4-likelihood-gaussian: one folder per experiment."""
    words = [args.script]
    for group in (g for g in parser._action_groups if g.title in EXPERIMENT):
        for a in group._group_actions:
            value = getattr(args, a.dest)
            if value != a.default and a.dest not in NOT_NAMED:
                text = f"{value:g}" if isinstance(value, float) else str(value)
                sep = "-" if isinstance(value, str) else ""  # beta4, likelihood-gaussian
                words.append(f"{a.option_strings[0][2:]}{sep}{text}")
    return "-".join(words)


WINDOWS = os.name == "nt"


def command(args, *flags):
    """The shell command that continues this run (with the paths and device typed now), quoted
    for the shell of this platform: POSIX sh, or Windows' cmd.exe (which keeps '' quotes)."""
    words = ["python", f"{args.script}.py", *flags, "--out", args.out]
    for name in ("checkpoint", "data_dir", "device"):
        if name in args.explicit:
            words += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return subprocess.list2cmdline(words) if WINDOWS else shlex.join(words)


# ----------------------------------------------------------------------------
# 2. Data files: one uint8 tensor per split, checked, moved to the device once

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FOLDER = {"mnist": "MNIST", "fashion": "FashionMNIST"}  # torchvision's <dir>/<name>/raw/
TEST_BINARIZE_SEED = 0  # the binarized test set is the same in every run
NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}
ORIGINALS = {  # md5 of each original file's bytes once unzipped (any gzip of them matches)
    "mnist": ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
              "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
    "fashion": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
                "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
}  # fmt: skip


def _present(folder):
    """{name: path} of the IDX files in `folder`, plain or gzipped."""
    found = {}
    for name in (n for pair in FILES.values() for n in pair):
        for path in (os.path.join(folder, name), os.path.join(folder, name + ".gz")):
            if os.path.exists(path):
                found.setdefault(name, path)
    return found


def find_data(args):
    """Paths of the four files, in torchvision's layout or a flat folder; downloads if none."""
    d = args.data_dir
    if os.path.isfile(d):
        raise UserError(f"--data-dir {d} is a file; pass the folder that holds the four IDX files")
    raw = os.path.join(d, FOLDER[args.dataset], "raw")
    found = max((_present(raw), _present(d)), key=len)
    why = "could not be downloaded"
    if not found:  # torchvision downloads, checks md5s and unpacks into <dir>/<name>/raw/
        try:
            from torchvision import datasets

            getattr(datasets, FOLDER[args.dataset])(d, train=True, download=True)
        except ImportError:
            why = "torchvision, which would download it, is not installed"
        except Exception:
            pass
        found = _present(raw)
    every = [n for pair in FILES.values() for n in pair]
    missing = [n + ".gz" for n in every if n not in found]
    if not found:
        raise UserError(
            f"{args.dataset} data not found in {raw}/ or {d}/ and {why}: put "
            f"the four files ({', '.join(missing)}) in {raw}/, "
            "gzipped or not, or pass --data-dir FOLDER holding them"
        )
    if missing:
        where = os.path.dirname(next(iter(found.values())))
        have = ", ".join(os.path.basename(p) for p in found.values())
        raise UserError(
            f"{where}/ holds {have} but not {', '.join(missing)}: "
            "put the missing file there, gzipped or not"
        )
    return found


def read_idx(path, dims, dataset):
    """The uint8 tensor in an IDX file (gzipped or not) with `dims` dimensions; refused when
    it is the original file of the other data set than `dataset`."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not an IDX file")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated, not gzip, unreadable
        raise UserError(
            f"{path} cannot be read ({e.strerror or e if isinstance(e, OSError) else e})"
            ": delete it and download it again"
        ) from None
    header = 4 + 4 * dims
    shape = [int.from_bytes(data[i : i + 4], "big") for i in range(4, header, 4)]
    if len(data) < header or data[:4] != bytes([0, 0, 8, dims]):
        raise UserError(
            f"{path} is not an IDX file of uint8 with {dims} dimensions "
            "(wrong header): delete it and download it again"
        )
    if len(data) != header + math.prod(shape):
        raise UserError(
            f"{path} has {len(data) - header} bytes of data where its header "
            f"{tuple(shape)} says {math.prod(shape)}: it is truncated; download it again"
        )
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    for other in ORIGINALS.keys() - {dataset}:
        if digest in ORIGINALS[other]:
            raise UserError(
                f"{path} is {NAMES[other]}'s, not {NAMES[dataset]}'s: pass "
                f"--dataset {other}, or a --data-dir holding {NAMES[dataset]}"
            )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(shape)


def load_data(args, device):
    """{'train': (x, y), 'test': (x, y)}: x uint8 (N, 1, 28, 28) on the device, y int64.

    With --binarize dynamic the test images are 0/255, sampled once with a fixed seed.
    """
    paths = find_data(args)
    data = {}
    for split, (images, labels) in FILES.items():
        x, y = (read_idx(paths[f], dims, args.dataset) for f, dims in ((images, 3), (labels, 1)))
        y = y.long()
        if x.shape[1:] != (28, 28):
            raise UserError(f"{paths[images]} holds {x.shape[1]}x{x.shape[2]} images, not 28x28")
        if len(x) != len(y):
            raise UserError(f"{paths[images]} has {len(x)} images but {paths[labels]} has {len(y)}")
        least = args.batch_size if split == "train" else 2
        if len(x) < least:
            raise UserError(
                f"{paths[images]} has {len(x)} images, fewer than "
                + (f"--batch-size {least}" if split == "train" else "2")
            )
        if split == "test" and args.binarize == "dynamic":
            g = torch.Generator().manual_seed(TEST_BINARIZE_SEED)
            x = (torch.bernoulli(x / 255.0, generator=g) * 255).to(torch.uint8)
        data[split] = (x.unsqueeze(1).to(device), y.to(device))
    return data


# ----------------------------------------------------------------------------
# 3. Output files, each written to a temporary file and renamed: never half-written


def atomic_write(path, write, durable=False):
    """write(f) into a temporary file beside `path`, then os.replace; errors name `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        if hasattr(os, "fchmod"):  # as open() would: mkstemp makes it 0600
            os.fchmod(fd, 0o666 & ~umask)
        else:  # Windows before Python 3.13: by path (there it only sets read-only or not)
            os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable and hasattr(os, "O_DIRECTORY"):  # the rename itself survives a crash
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dir_fd)
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise UserError(f"cannot write {path}: {cause.strerror or cause}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


RUN_FILES = ("samples.png", "samples.gif", "reconstructions.png", "interpolation.png",
             "traversal.png", "manifold.png", "latent.png", "loss.png", "metrics.csv",
             "generated.png")  # fmt: skip


def prepare_out(args):
    """--out (and, to train, the checkpoint's folder) exist and are writable, before any work."""
    folders = [("--out", args.out)]
    if not (args.eval_only or args.generate):
        if os.path.isdir(args.checkpoint):
            raise UserError(f"--checkpoint {args.checkpoint} is a folder; give a file path")
        folders.append(("--checkpoint", os.path.dirname(os.path.abspath(args.checkpoint))))
    for flag, folder in folders:
        if os.path.isfile(folder):
            raise UserError(f"{flag}: {folder} is a file; give a folder (it is made if need be)")
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise UserError(f"{flag}: cannot write to folder {folder}: {e.strerror or e}") from None


def clear_old_run(args):
    """A new run removes the files of the run that was in --out (saying so), its checkpoint
    there too when this run keeps its own elsewhere, so that none is left mixed with its own;
    called once it is sure to start, so a bad flag or file removes nothing."""
    checkpoints = [args.checkpoint, os.path.join(args.out, "checkpoint.pt")]
    names = [*checkpoints, *(os.path.join(args.out, n) for n in RUN_FILES)]
    if os.path.isdir(args.out):
        names += [os.path.join(args.out, n) for n in os.listdir(args.out)
                  if n.startswith("samples_epoch_") and n.endswith(".png")]  # fmt: skip
    old = list({os.path.abspath(p): p for p in names if os.path.isfile(p)}.values())
    if not old:
        return
    what = f"{len(old)} files of an earlier run"
    for path in (p for p in checkpoints if os.path.isfile(p)):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            epoch, epochs = ckpt["epoch"], ckpt["args"]["epochs"]
        except Exception:  # not one of ours: the other files only
            continue
        then = "--resume would have continued it"
        if epoch >= epochs:  # finished: only a longer run continues it
            then = f"--resume --epochs N with N > {epoch} would have trained it further"
        what = f"a run at epoch {epoch} of {epochs} ({path}; {then})"
        break
    print(f"note: {args.out}/ held {what}; starting a new run in its place", file=sys.stderr)
    for path in old:
        try:
            os.remove(path)
        except OSError as e:
            raise UserError(f"cannot remove {path} of the earlier run: {e.strerror or e}") from None


def save_grid(images, out, name, nrow=None, padding=2):
    """(N, 1, 28, 28) images in [0, 1] as one PNG grid, laid out as torchvision's save_image lays
    it out. Not torchvision's own: importing torchvision takes 4 s here, more than all the
    pictures of a 20-epoch MLP run (benchmarks/RESULTS.md); a test checks that they agree."""
    from PIL import Image

    pixels = grid_pixels(images, nrow, padding)
    atomic_write(os.path.join(out, name), lambda f: Image.fromarray(pixels).save(f, format="png"))


def grid_pixels(images, nrow=None, padding=2):
    """The grid of save_grid as a (H, W) uint8 array."""
    n, _, h, w = images.shape
    cols = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    cells = torch.zeros(rows * cols, h + padding, w + padding)  # each image below/right of a gap
    cells[:n, padding:, padding:] = images.detach().float().cpu()[:, 0]
    grid = cells.view(rows, cols, h + padding, w + padding).transpose(1, 2)
    grid = grid.reshape(rows * (h + padding), cols * (w + padding))
    grid = torch.nn.functional.pad(grid, (0, padding, 0, padding))  # the last gaps
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()


def save_gif(frames, path):
    """(H, W) uint8 tensors as an animated GIF: half a second each, two on the last one."""
    from PIL import Image

    first, *rest = (Image.fromarray(f.numpy()) for f in frames)
    gif = dict(save_all=True, append_images=rest, duration=[500] * len(rest) + [2000], loop=0)
    atomic_write(path, lambda f: first.save(f, "gif", **gif))


def save_labelled_grid(images, nrow, x_axis, y_axis, path):
    """A grid of decodings with the latent values along its axes: (label, values) each."""
    rows, (h, w) = math.ceil(len(images) / nrow), images.shape[2:]
    fig, ax = _figure(1.5 + 0.42 * nrow, 1.0 + 0.42 * rows, margins=(0.8, 0.9, 0.2, 0.1))
    ax.imshow(grid_pixels(images, nrow, padding=0), cmap="gray", vmin=0, vmax=255)
    name = lambda v: v if isinstance(v, str) else f"{v:.2g}"  # noqa: E731
    ax.set_xticks([(i + 0.5) * w - 0.5 for i in range(nrow)], map(name, x_axis[1]), rotation=90)
    ax.set_yticks([(i + 0.5) * h - 0.5 for i in range(rows)], map(name, y_axis[1]))
    ax.set(xlabel=x_axis[0], ylabel=y_axis[0])
    _save_figure(fig, path)


def _figure(width, height, columns=1, margins=(0.8, 0.6, 0.2, 0.4)):
    """Fixed margins in inches (left, bottom, right, top): tight_layout would draw it twice."""
    from matplotlib.figure import Figure  # imported when first drawn; no pyplot, no GUI

    fig = Figure(figsize=(width, height), dpi=100)
    left, bottom, right, top = margins
    fig.subplots_adjust(left / width, bottom / height, 1 - right / width, 1 - top / height, 0.25)
    return fig, fig.subplots(1, columns)


def _save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def save_latent(mu, y, path):
    """Test-set means of q(z|x) coloured by label; the first two principal components above 2-D."""
    mu, y = mu.float().cpu(), y.cpu()
    if mu.shape[1] == 1:
        points, labels = torch.stack([mu[:, 0], y.float()], 1), ("z[0]", "label")
    elif mu.shape[1] == 2:  # the limits of manifold.png, so that the two can be laid side by side
        points, labels = mu, ("z[0]", "z[1]")
    else:
        centred = mu - mu.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ v[:2].T
        share = (s[:2] ** 2 / (s**2).sum() * 100).tolist()
        labels = tuple(f"PC {i + 1} ({p:.0f}% of variance)" for i, p in enumerate(share))
    fig, ax = _figure(6, 5, margins=(0.8, 0.6, 0.9, 0.4))
    for label in range(10):  # one colour per label; a plot draws 3x faster than a scatter
        x0, x1 = points[y == label].T
        ax.plot(x0, x1, ".", ms=1.5, alpha=0.7, color=f"C{label}", label=str(label))
    ax.legend(title="label", loc="center left", bbox_to_anchor=(1, 0.5), markerscale=6)
    ax.set(xlabel=labels[0], ylabel=labels[1], title=f"test-set means of q(z|x), {mu.shape[1]}-D")
    if mu.shape[1] == 2:
        (x0, y0), (x1, y1) = mu.min(0).values.tolist(), mu.max(0).values.tolist()
        ax.set(xlim=(x0, x1), ylim=(y0, y1))
    _save_figure(fig, path)


def save_loss_curves(rows, steps, path):
    _save_figure(loss_figure(rows, steps), path)


def loss_figure(rows, steps):
    """-ELBO (left), recon and KL (right) in nats per image: training per step (smoothed over
    a tenth of an epoch) as lines, the test set after each epoch as dots, on an axis in epochs.
    The y axis fits the run after its first epoch (the second half of a 1-epoch run): the first
    steps, hundreds of nats above the rest, would squash it; a note says where they start."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = _figure(10, 4, columns=2)
    per_epoch = len(steps) / len(rows)
    width = max(1, round(per_epoch / 10))  # a moving average over `width` steps
    smooth = steps.unfold(0, width, 1).mean(-1)  # (steps - width + 1, 2)
    x = (torch.arange(len(smooth)) + width) / per_epoch  # the epoch at each average's last step
    train = {"loss": smooth.sum(1), "recon": smooth[:, 0], "kl": smooth[:, 1]}
    epochs = [r["epoch"] for r in rows]
    later = x > min(1.0, epochs[-1] / 2)  # what sets the y axis
    if not later.any():  # too few steps for a curve after the first epoch: all of it
        later[:] = True
    for ax, keys in ((ax1, ("loss",)), (ax2, ("recon", "kl"))):
        for key, color, name in (k for k in CURVES if k[0] in keys):
            ax.plot(x, train[key], color=color, lw=1, label=f"train {name}")
            test = [r[f"test_{key}"] for r in rows]
            ax.plot(epochs, test, "o", color=color, label=f"test {name}")
        test = [float(r[f"test_{k}"]) for r in rows for k in keys]
        shown = torch.cat([*(train[k][later] for k in keys), torch.tensor(test)])
        low, high = shown.min().item(), shown.max().item()
        margin = 0.05 * (high - low) or 1.0
        ax.set_ylim(low - margin, high + margin)
        start = max(train[k][0].item() for k in keys)
        if start > high + margin:  # the first steps are above the axis: say where they start
            ax.annotate(f"starts at {start:.0f} (off the axis)", (0.01, 0.97), va="top",
                        xycoords="axes fraction", fontsize=8)  # fmt: skip
    for ax, title in ((ax1, "total"), (ax2, "terms")):
        ax.set(xlabel="epoch", ylabel="nats per image", title=title, xlim=(0, epochs[-1]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


CURVES = (("loss", "C2", "-ELBO"), ("recon", "C0", "recon"), ("kl", "C3", "KL"))


METRIC_FIELDS = [  # the columns of metrics.csv
    "epoch", "lr", "kl_weight",
    "train_k",  # K of the bound the epoch trained on (1: the ELBO)
    "train_recon", "train_kl", "train_loss",
    "test_recon", "test_kl", "test_loss", "test_active_units",
    "images_per_s",  # training images per second of the training steps
    "train_s", "test_s",  # seconds of the epoch's training steps, and of its test evaluation
    "elapsed_s",  # seconds since training started, to the end of this evaluation
]  # fmt: skip


def write_metrics(rows, out):
    def write(f):
        text = io.TextIOWrapper(f, newline="")
        w = csv.DictWriter(text, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)
        text.detach()  # flushes; leaves `f` open for atomic_write

    atomic_write(os.path.join(out, "metrics.csv"), write)


class Saver:
    """Each epoch's row of metrics, and what each epoch leaves in --out, then its line on
    stdout: the picture grids, samples.gif (the samples of every epoch), metrics.csv,
    checkpoint.pt, and the matplotlib figures (loss.png, latent.png and the labelled grids),
    drawn after the last epoch, and before it only while all the drawing so far and a last
    one cost under 1.5% of the run (a draw takes 1-2 s, the first the longest: more than all
    the grids of a 20-epoch MLP run; grids and figures together stay under 2%)."""

    def __init__(self, args, model_flags, model, opt, ckpt):
        self.args, self.model_flags, self.model, self.opt = args, model_flags, model, opt
        if not args.resume:
            clear_old_run(args)
        self.rows = resume(args, ckpt, opt)  # one row per epoch done
        self.saved = len(self.rows)  # the epochs in the checkpoint on disk
        old = ckpt if self.saved else {}  # the loss curve and the GIF's frames of a resumed run
        self.steps, self.frames = old.get("steps", torch.zeros(0, 2)), list(old.get("frames", []))
        self.start, self.drawing_s, self.draw_cost = time.perf_counter(), 0.0, 2.0
        self.held = contextlib.nullcontext  # StopOnSignal: signals wait for a checkpoint
        self.elapsed_before = self.rows[-1]["elapsed_s"] if self.rows else 0.0  # when resumed

    def add_row(self, stats, test, schedule, seconds):
        """One epoch's row. stats: (batches, 3) per-image recon, KL, loss of each batch;
        schedule: the KL weight at its last step and the K it trained on; seconds: of the
        training steps and of the test evaluation."""
        recon, kl = stats[:, :2].mean(0).tolist()
        self.steps = torch.cat([self.steps, stats[:, :2].cpu()])  # recon, KL of every step
        train_s, test_s = seconds
        self.rows.append({
            "epoch": len(self.rows) + 1, "lr": self.opt.param_groups[0]["lr"],
            "kl_weight": schedule["kl_weight"], "train_k": schedule["train_k"],
            "train_recon": recon, "train_kl": kl, "train_loss": recon + kl,
            **{f"test_{k}": v for k, v in test.items()},
            "images_per_s": len(stats) * self.args.batch_size / train_s,
            "train_s": train_s, "test_s": test_s,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.start,
        })  # fmt: skip

    def epoch(self, grids, mu, y):
        """grids: {name: (images, nrow)} drawn as PNG grids, or {name: (images, nrow, x_axis,
        y_axis)} drawn as labelled figures."""
        a, rows, epoch = self.args, self.rows, self.rows[-1]["epoch"]
        for name, (images, nrow, *axes) in grids.items():
            if not axes:
                save_grid(images, a.out, name, nrow)
        self.frames.append(torch.from_numpy(grid_pixels(*grids["samples.png"])))
        save_gif(self.frames, os.path.join(a.out, "samples.gif"))
        write_metrics(rows, a.out)
        budget = 0.015 * (time.perf_counter() - self.start)
        if epoch == a.epochs or self.drawing_s + 2 * self.draw_cost <= budget:  # and the last
            t0 = time.perf_counter()
            save_loss_curves(rows, self.steps, os.path.join(a.out, "loss.png"))
            save_latent(mu, y, os.path.join(a.out, "latent.png"))
            for name, (images, nrow, *axes) in grids.items():
                if axes:
                    save_labelled_grid(images, nrow, *axes, os.path.join(a.out, name))
            self.draw_cost = time.perf_counter() - t0
            self.drawing_s += self.draw_cost
        self.checkpoint()
        print(epoch_line(rows[-1], a.epochs), flush=True)  # once the epoch is safe on disk
        if epoch == a.epochs:
            print(f"test  active units: {rows[-1]['test_active_units']} of {mu.shape[1]} latent "
                  "dimensions (Var_x E_q(z|x)[z_u] > 0.01, Burda et al. 2015)")  # fmt: skip

    def checkpoint(self, final=None):
        """Only tensors and plain values: torch.load(path, weights_only=True) reads it."""
        a, rows, opt = self.args, self.rows, self.opt.state_dict()
        param_state = {i: {k: v.cpu() for k, v in s.items()} for i, s in opt["state"].items()}
        state = {
            "script": a.script,
            "config": {k: getattr(a, k) for k in self.model_flags},  # VAE(**config) rebuilds it
            "args": {k: v for k, v in vars(a).items() if k != "explicit"},
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": {**opt, "state": param_state},  # on the CPU: readable without a GPU
            "epoch": rows[-1]["epoch"],  # epochs completed
            "metrics": rows,
            "steps": self.steps,  # per-image recon and KL of every training step, for loss.png
            "frames": torch.stack(self.frames),  # samples.png of every epoch, for samples.gif
            "final": final,  # {"iwae_nll": ..., "iw_samples": K} once the bound is computed
            "torch": str(torch.__version__),  # a plain str: TorchVersion is not
        }
        with self.held():  # a signal now stops once the file is renamed and self.saved says so
            atomic_write(a.checkpoint, lambda f: torch.save(state, f), durable=True)
            self.saved = rows[-1]["epoch"]

    def rewind(self):
        """After an interrupt, what the checkpoint holds: the model of the last saved epoch and
        its test metrics (the rows after it dropped); model and test are None if none was."""
        del self.rows[self.saved :]
        if not self.saved:
            return {"model": None, "test": None}
        if self.saved < self.args.epochs:  # stopped in training: the model moved on since
            ckpt = torch.load(self.args.checkpoint, map_location="cpu", weights_only=True)
            self.model.load_state_dict(ckpt["model"])
        return {"model": self.model, "test": {k: self.rows[-1][f"test_{k}"] for k in TERMS}}


CHECKPOINT_KEYS = ("script", "config", "args", "model", "optimizer", "epoch", "metrics", "final")
MUST_MATCH = ("dataset", "likelihood", "binarize")  # besides the model's own flags
RUN_FLAGS = {"script", "out", "checkpoint", "resume", "eval_only", "generate", "data_dir", "device",
             "compile"}  # fmt: skip


def load_checkpoint(args, model_flags):
    """With --resume, --eval-only or --generate: the checkpoint, checked against this script and
    the flags typed, whose settings it then takes (but for those typed now); else None."""
    if not (args.resume or args.eval_only or args.generate):
        return None
    path = args.checkpoint
    if not os.path.isfile(path):
        what = "is a folder, not a checkpoint" if os.path.isdir(path) else "does not exist"
        raise UserError(
            f"no checkpoint at {path} ({what}); train first, or pass --checkpoint "
            "FILE or --out FOLDER"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported" in str(e).lower():  # a global or opcode only a code-running pickle uses
            raise UserError(
                f"refusing to load {path}: it holds objects other than tensors and "
                "plain values, and loading it could run code"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint: it may be truncated") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path} is not a readable checkpoint ({reason}): it may be truncated"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if ckpt["script"] != args.script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {args.script}.py")
    for key in (*model_flags, *MUST_MATCH):
        if key in args.explicit and getattr(args, key) != ckpt["args"][key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"{path} was trained with {flag} {ckpt['args'][key]}, not "
                f"{getattr(args, key)}; drop the flag or use another checkpoint"
            )
    for key, value in ckpt["args"].items():
        if key not in RUN_FLAGS and key not in args.explicit and hasattr(args, key):
            setattr(args, key, value)
    if args.resume and ckpt["epoch"] >= args.epochs:
        raise UserError(
            f"{path} has trained all {ckpt['epoch']} epochs of its run; to train "
            f"further: {command(args, '--resume', '--epochs', str(ckpt['epoch'] + 10))}"
        )
    return ckpt


def load_weights(model, ckpt, args):
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # the model's code was changed since the checkpoint was written
        detail = (str(e).strip().splitlines() or [""])[-1].strip()
        raise UserError(
            f"{args.checkpoint} does not fit this {args.script}.py's model "
            f"({detail[:150]}): train it again"
        ) from None


def resume(args, ckpt, opt):
    """The metrics so far (one row per epoch) and the optimizer's state; [] for a new run."""
    if not args.resume:
        return []
    state = ckpt["optimizer"]
    for group in state["param_groups"]:  # fused or not as this device wants, not as saved
        group.update({k: opt.defaults[k] for k in ("fused", "foreach", "capturable")})
    opt.load_state_dict(state)
    print(f"resuming from {args.checkpoint} at epoch {ckpt['epoch'] + 1}")
    if args.epochs != ckpt["args"]["epochs"]:  # README: a longer run, resumed
        print(
            f"note: --epochs {args.epochs} where the checkpoint's run had "
            f"{ckpt['args']['epochs']}: epochs {ckpt['epoch'] + 1}-{args.epochs} train as those "
            f"of a new {args.epochs}-epoch run (its rate, KL weight and L_K epochs)"
        )
    return list(ckpt["metrics"])


# ----------------------------------------------------------------------------
# 4. Running: device, speed, progress, signals, errors


def get_device(name):
    # plain float32 convolutions on a GPU: TF32 (PyTorch's default for cuDNN) was no faster on
    # an H200 (1.71 against 1.74 s per conv epoch, benchmarks/RESULTS.md), only less exact
    torch.backends.cudnn.allow_tf32 = False
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"--device {name}: no such GPU is available here; use --device auto")
    return torch.device(name)


def speed_up(model, args, batch_size):
    """What serves only speed, in place (call it before building the optimizer):

    - channels_last for a model with convolutions: the 4x4 stride-2 convolutions run faster
      in that layout on a CPU (oneDNN) and a GPU (cuDNN).
    - --compile: torch.compile the encoder and the decoder. The noise is drawn outside them,
      so a compiled run draws the same noise as an eager one with the same seed; its numbers
      differ by float rounding (fused kernels), not by a different run. A warm-up step
      compiles now, so a device or install where compiling cannot work stops here.
    """
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    if not args.compile:
        return
    device = next(model.parameters()).device
    try:
        model.encoder.compile()
        model.decoder.compile()
        mu, _ = model.encode(torch.zeros(batch_size, 1, 28, 28, device=device))
        model.decode(mu).sum().backward()
    except Exception as e:  # e.g. a GPU too old for Triton, or no C++ compiler
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--compile: torch.compile cannot run here ({reason[:200]}); run without --compile"
        ) from None
    finally:
        model.zero_grad(set_to_none=True)


def decodes_per_call(device, batch_size):
    """How many images and z the IWAE bound encodes and decodes at once, whatever K. CPU: 512,
    measured fastest (they fit the cache; at K = 10 the conv net's bound took 7.6-8.3 s where
    calls of 6,553 z took 11.8-11.9, RESULTS.md). GPU: 8 training batches; without gradients, that
    takes about as much memory as two training steps, so the bound fits wherever training did."""
    return 512 if device.type == "cpu" else 8 * batch_size


def print_header(args, model, data):
    n_params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    print(
        f"{args.script}: {n_params:,} parameters on {device}; {args.dataset} "
        f"{len(data['train'][0])} train / {len(data['test'][0])} test images, binarize "
        f"{args.binarize}, {args.likelihood} likelihood; writing to {args.out}/",
        flush=True,
    )
    if args.kl_warmup >= args.epochs:
        print(
            f"warning: --kl-warmup {args.kl_warmup} is not shorter than --epochs {args.epochs}: "
            f"the KL weight stays below --beta {args.beta:g} for the whole run",
            file=sys.stderr,
        )


def fmt(m):
    return f"recon {m['recon']:7.2f}  KL {m['kl']:6.2f}  -ELBO {m['loss']:7.2f}"


def fmt_bound(nll, k):
    return f"test  -log p(x) <= {nll:.2f} nats per image (IWAE bound, K={k})"


TERMS = ("recon", "kl", "loss")


def epoch_line(r, epochs):
    train, test = ({k: r[f"{split}_{k}"] for k in TERMS} for split in ("train", "test"))
    return (f"epoch {r['epoch']:3d}/{epochs}  train {fmt(train)}  |  test {fmt(test)}  |  "
            f"{r['images_per_s']:6.0f} img/s  {r['elapsed_s']:6.1f} s")  # fmt: skip


def check_finite(losses, epoch, saver):
    """Stop on a NaN/inf, naming its epoch and what is on disk. `losses`: the loss of each of
    the epoch's batches, (batches,), computed before each step, so the first bad batch is named
    (the one place training waits for the device); or the test loss after the epoch, a float,
    which with the weights checks what the last step did, before anything is drawn or saved."""
    if isinstance(losses, float):  # after the epoch: what its last step did
        weights = torch.stack([torch.isfinite(p).all() for p in saver.model.parameters()])
        if math.isfinite(losses) and weights.all():
            return
        what = f"the test loss became {losses} after epoch {epoch}'s last step"
    else:
        bad = (~torch.isfinite(losses)).nonzero()
        if not len(bad):
            return
        b = bad[0].item()
        what = f"the loss became {losses[b].item()} at epoch {epoch}, batch {b + 1}"
    a = saver.args
    kept = f"{a.checkpoint} keeps epoch {saver.saved}" if saver.saved else "nothing was saved"
    raise UserError(f"{what}: training diverged; {kept}; try a lower --lr (now {a.lr:g})")


class Progress:
    """A live line (done/total, loss, rate, ETA) on a terminal or in Jupyter only (not in logs
    or pipes), redrawn at most 4 times a second: the loss is read from the device only then.
    Cleared when done."""

    def __init__(self, label, total):
        jupyter = type(sys.stdout).__module__.startswith("ipykernel")  # draws "\r" as a terminal
        self.enabled, self.label, self.total = sys.stdout.isatty() or jupyter, label, total
        self.start = self.last = time.perf_counter()

    def update(self, done, loss=None):
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.25 and done < self.total):
            return
        self.last, rate = now, done / max(now - self.start, 1e-9)
        line = f"{self.label}  {done}/{self.total}"
        line += f"  loss {loss.item():7.2f}" if loss is not None else ""
        line += f"  ETA {(self.total - done) / max(rate, 1e-9):4.0f}s "
        print("\r" + (line if done < self.total else " " * len(line) + "\r"), end="", flush=True)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM stops at once, but for the writing of a checkpoint, which
    finishes first (saver.held). Every finished epoch is then in the checkpoint: say which,
    print the command that resumes, and set exit_code 130 (143)."""

    def __init__(self, args, saver):
        self.args, self.saver, self.exit_code, self.previous = args, saver, 0, {}
        self.holding, self.pending = False, None

    def _raise(self, signum, frame):
        if self.holding:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def hold(self):
        """A signal in the block stops once the block is done, so the epoch that the message
        names is the one on disk."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise Interrupted(self.pending)

    def __enter__(self):
        self.saver.held = self.hold
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._raise)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        return self

    def __exit__(self, kind, exc, tb):
        self.saver.held = contextlib.nullcontext
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if not isinstance(exc, KeyboardInterrupt):
            return False
        self.exit_code = 128 + getattr(exc, "signum", signal.SIGINT)
        a, saved = self.args, self.saver.saved
        if saved == a.epochs:
            message = (
                f"stopped in the IWAE bound; {a.checkpoint} holds the trained model; "
                f"get the bound with: {command(a, '--eval-only')}"
            )
        elif saved:
            message = (
                f"stopped in epoch {saved + 1}; {a.checkpoint} holds epoch {saved}; "
                f"resume with: {command(a, '--resume')}"
            )
        else:
            message = "stopped in epoch 1; nothing was saved"
        print(("\n" if sys.stdout.isatty() else "") + message, file=sys.stderr, flush=True)
        return True


MEMORY_FLAGS = ("--batch-size", "--hidden-dim", "--channels", "--latent-dim", "--train-k",
                "--iw-samples", "--generate")  # what sets the size of a tensor  # fmt: skip


def out_of_memory(e, argv):
    """The one-line message for a failed allocation (CPU, CUDA or MPS), else None."""
    text = str(e)
    if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text
            or "can't allocate memory" in text):  # fmt: skip
        return None
    n = re.search(r"allocate (\d+) bytes", text)  # the CPU allocator's words
    size = re.search(r"allocate ([\d.]+ [KMGT]i?B)", text)  # CUDA's and MPS's
    size = f"{int(n[1]) / 2**30:,.1f} GiB" if n else size[1] if size else None
    size = f" (tried to allocate {size})" if size else ""
    typed = [f for f in MEMORY_FLAGS if any(a == f or a.startswith(f + "=") for a in argv)]
    return f"out of memory{size}: lower {' or '.join(typed or ['--batch-size'])}"


def keeps_global_state(main):
    """main(argv) leaves a notebook's torch as it found it: the global random generators
    (each epoch seeds them) and cuDNN's TF32 flag (get_device turns it off) are restored."""

    @functools.wraps(main)
    def wrapper(argv=()):
        rngs = [(torch.get_rng_state, torch.set_rng_state)]
        if torch.cuda.is_available():
            rngs.append((torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all))
        if torch.backends.mps.is_available():
            rngs.append((torch.mps.get_rng_state, torch.mps.set_rng_state))
        saved = [(get(), put) for get, put in rngs]
        tf32 = torch.backends.cudnn.allow_tf32
        try:
            return main(argv)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
            for state, put in saved:
                put(state)

    return wrapper


def run(main, argv):
    """main(argv) as a command: a user's error is one line on stderr; returns the exit code."""
    try:
        return main(argv)["exit_code"]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        message = out_of_memory(e, argv)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except OSError as e:  # anything the checks above did not foresee: still one line
        print(f"error: {e}", file=sys.stderr)
    return 1


def exit_fast(code):
    """sys.exit(code) without the garbage collector's last pass over every object that torch
    and matplotlib made: a one-epoch MLP run took 4.58 s, now 4.09 s on a 2-core EPYC
    (benchmarks/fixed_costs.py). The process ends, so its memory goes back anyway; atexit
    handlers, buffered output and files end as usual."""
    gc.freeze()  # the objects alive now: never examined again, at exit included
    sys.exit(code)
