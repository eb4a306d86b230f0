"""Plumbing for vae_mlp.py and vae_conv.py, none of it the algorithm: a reader can skip this file.

1. flags        validators, the flags that run a script, the default --out, printed commands
2. data files   the four IDX files of MNIST or Fashion-MNIST, checked, as uint8 tensors
3. output files pictures, metrics.csv and checkpoint.pt, each written to a temporary file first
4. running      device, progress line, Ctrl-C, one-line errors
"""

import argparse
import csv
import gc
import gzip
import io
import itertools
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import zlib

import torch


class UserError(Exception):
    """A problem the user can fix (data, flags, files): reported in one line, exit code 1."""


# ---- 1. Flags


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
    g.add_argument("--eval-only", action="store_true",
                   help="load OUT/checkpoint.pt, print test metrics and the IWAE bound")
    g.add_argument("--generate", type=positive_int, metavar="N",
                   help="load OUT/checkpoint.pt, write N samples to OUT/generated.png")
    g = p.add_argument_group("output")
    g.add_argument("--out", help=f"folder for pictures, metrics.csv and checkpoint.pt (default: "
                   f"results/{script}/, or e.g. results/{script}-beta4/ for --beta 4: one per "
                   "experiment, named by the flags above that differ from their defaults, but "
                   "--epochs and --data-dir)")
    g.add_argument("--resume", action="store_true", help="continue training from the checkpoint")
    # fmt: on


EXPERIMENT = ("model", "data", "loss", "training")  # groups of flags that name --out's default
NOT_NAMED = ("data_dir", "epochs")  # where the data is, and how long: the same experiment
WINDOWS = os.name == "nt"


def parse_args(parser, argv, script):
    args = parser.parse_args(list(argv))
    args.script, args.argv = script, list(argv)
    # the flags typed (allow_abbrev=False: no prefixes), so that they win over a checkpoint's
    options = ((a.dest, s) for a in parser._actions for s in a.option_strings)
    args.explicit = sorted({d for d, s in options if any(w.split("=")[0] == s for w in argv)})
    args.out = args.out or default_out(parser, args)
    args.checkpoint = os.path.join(args.out, "checkpoint.pt")
    return args


def default_out(parser, args):
    """results/ and the script's name, then each experiment flag that differs from its default,
    as vae_mlp-beta4-likelihood-gaussian. To read a checkpoint (--resume, --eval-only,
    --generate): the folder that holds one and is named by the most of those flags, but for
    the model's and the data's, so that a flag added to the command that started a run (--lr,
    say) still finds it."""
    words, loose = [], []  # loose: the flags such a command may add
    for group in (g for g in parser._action_groups if g.title in EXPERIMENT):
        for a in group._group_actions:
            value = getattr(args, a.dest)
            if value != a.default and a.dest not in NOT_NAMED:
                text = f"{value:g}" if isinstance(value, float) else str(value)
                sep = "-" if isinstance(value, str) else ""  # beta4, likelihood-gaussian
                words.append(f"{a.option_strings[0][2:]}{sep}{text}")
                if group.title in ("loss", "training") and a.dest not in MUST_MATCH:
                    loose.append(words[-1])

    def folder(drop=()):
        return os.path.join("results", "-".join(w for w in [args.script, *words] if w not in drop))

    folders = [folder()]
    if args.resume or args.eval_only or args.generate:
        drops = (d for n in range(1, len(loose) + 1) for d in itertools.combinations(loose, n))
        folders += [folder(d) for d in drops]
    return next((f for f in folders if os.path.isfile(f"{f}/checkpoint.pt")), folders[0])


def command(args, *flags):
    """The whole command that goes on with this run: as typed, with `flags` in place of the
    same flags typed, and --out; quoted for this platform's shell (POSIX sh or cmd.exe)."""
    replaced = {"--resume", "--eval-only", "--generate", "--out"}
    replaced |= {f for f in flags if f.startswith("--")}  # typed again with a new value
    words, skip = ["python", f"{args.script}.py"], False
    for word in args.argv:
        name = word.split("=")[0]
        if skip:
            skip = False
        elif name in replaced:  # dropped, with its value unless it takes none
            skip = "=" not in word and name not in ("--resume", "--eval-only")
        else:
            words.append(word)
    words += [*flags, "--out", args.out]
    return subprocess.list2cmdline(words) if WINDOWS else shlex.join(words)


# ---- 2. Data files: one uint8 tensor per split, checked, moved to the device once

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FOLDER = {"mnist": "MNIST", "fashion": "FashionMNIST"}  # torchvision's <dir>/<name>/raw/
TEST_BINARIZE_SEED = 0  # the binarized test set is the same in every run, whatever --seed


def find_data(args):
    """Paths of the four files, plain or gzipped, in torchvision's layout or a flat folder;
    torchvision downloads them if there are none."""

    def present(folder):
        names = (n for pair in FILES.values() for n in pair)
        paths = ((n, os.path.join(folder, n + gz)) for n in names for gz in ("", ".gz"))
        return {n: p for n, p in reversed(list(paths)) if os.path.isfile(p)}

    raw = os.path.join(args.data_dir, FOLDER[args.dataset], "raw")
    found = max(present(raw), present(args.data_dir), key=len)
    if not found:
        try:  # torchvision checks the md5s and unpacks into <dir>/<name>/raw/
            from torchvision import datasets

            getattr(datasets, FOLDER[args.dataset])(args.data_dir, train=True, download=True)
        except Exception:  # no network, or no torchvision
            pass
        found = present(raw)
    missing = [n + ".gz" for pair in FILES.values() for n in pair if n not in found]
    if not found:
        raise UserError(
            f"{args.dataset} data not found in {raw}/ or {args.data_dir}/ and could not be "
            f"downloaded: put the four files ({', '.join(missing)}) in {raw}/"
        )
    if missing:
        where = os.path.dirname(next(iter(found.values())))
        raise UserError(f"{where}/ lacks {', '.join(missing)}: put the files there")
    return found


def read_idx(path, dims):
    """The uint8 tensor in an IDX file (gzipped or not) with `dims` dimensions."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated, not gzip, unreadable
        raise UserError(f"{path} cannot be read ({e}): download it again") from None
    header = 4 + 4 * dims
    shape = [int.from_bytes(data[i : i + 4], "big") for i in range(4, header, 4)]
    if len(data) < header or data[:4] != bytes([0, 0, 8, dims]):
        raise UserError(f"{path} is not an IDX file of {dims}-D uint8: download it again")
    if len(data) != header + math.prod(shape):
        raise UserError(f"{path} is truncated (its header says {shape}): download it again")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(shape)


def load_data(args, device):
    """{'train': (x, y), 'test': (x, y)}: x uint8 (N, 1, 28, 28) on the device, y int64.
    With --binarize dynamic the test images are 0/255, sampled once with a fixed seed."""
    paths = find_data(args)
    data = {}
    for split, (images, labels) in FILES.items():
        x, y = read_idx(paths[images], 3), read_idx(paths[labels], 1).long()
        least = args.batch_size if split == "train" else 2
        if x.shape[1:] != (28, 28):
            raise UserError(f"{paths[images]} holds {x.shape[1]}x{x.shape[2]} images, not 28x28")
        if len(x) != len(y):
            raise UserError(f"{paths[images]} has {len(x)} images but {paths[labels]} {len(y)}")
        if len(x) < least:
            raise UserError(f"{paths[images]} has {len(x)} images, fewer than {least}")
        if split == "test" and args.binarize == "dynamic":
            g = torch.Generator().manual_seed(TEST_BINARIZE_SEED)
            x = (torch.bernoulli(x / 255.0, generator=g) * 255).to(torch.uint8)
        data[split] = (x.unsqueeze(1).to(device), y.to(device))
    return data


# ---- 3. Output files, each written to a temporary file and renamed: never half-written


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, then os.replace; errors name `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


RUN_FILES = ("samples.png", "samples.gif", "reconstructions.png", "interpolation.png",
             "traversal.png", "manifold.png", "latent.png", "loss.png", "metrics.csv",
             "generated.png", "checkpoint.pt")  # fmt: skip


def prepare_out(args, start=False):
    """--out exists and is writable, before training. With start (a new run): the files of the
    run that was there are removed, saying so, lest the two mix."""
    try:
        os.makedirs(args.out, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as e:
        raise UserError(f"--out: cannot write to folder {args.out}: {e.strerror or e}") from None
    old = [p for p in (os.path.join(args.out, n) for n in RUN_FILES) if os.path.isfile(p)]
    if start and old:
        note = f"note: {args.out}/ held an earlier run; starting a new one in its place"
        print(note, file=sys.stderr)
        for path in old:
            os.remove(path)


def grid_pixels(images, nrow=None, padding=2):
    """(N, 1, H, W) images in [0, 1] as one uint8 grid, laid out as torchvision's save_image
    lays it out (a test checks it): importing torchvision would take seconds."""
    n, _, h, w = images.shape
    cols = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    cells = torch.zeros(rows * cols, h + padding, w + padding)  # each image below/right of a gap
    cells[:n, padding:, padding:] = images.detach().float().cpu()[:, 0]
    grid = cells.view(rows, cols, h + padding, w + padding).transpose(1, 2)
    grid = grid.reshape(rows * (h + padding), cols * (w + padding))
    grid = torch.nn.functional.pad(grid, (0, padding, 0, padding))  # the last gaps
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()


def save_grid(images, out, name, nrow=None):
    from PIL import Image

    pixels = Image.fromarray(grid_pixels(images, nrow))
    atomic_write(os.path.join(out, name), lambda f: pixels.save(f, format="png"))


def save_gif(frames, path):
    """(H, W) uint8 tensors as an animated GIF: half a second each, two on the last one."""
    from PIL import Image

    first, *rest = (Image.fromarray(f.numpy()) for f in frames)
    gif = dict(save_all=True, append_images=rest, duration=[500] * len(rest) + [2000], loop=0)
    atomic_write(path, lambda f: first.save(f, "gif", **gif))


def figure(width, height, columns=1, margins=(0.8, 0.6, 0.2, 0.4)):
    """Fixed margins in inches (left, bottom, right, top): tight_layout would draw it twice."""
    from matplotlib.figure import Figure  # imported when first drawn; no pyplot, no GUI

    fig = Figure(figsize=(width, height), dpi=100)
    left, bottom, right, top = margins
    fig.subplots_adjust(left / width, bottom / height, 1 - right / width, 1 - top / height, 0.25)
    return fig, fig.subplots(1, columns)


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def labelled_grid(images, nrow, x_axis, y_axis):
    """A grid of decodings with the latent values along its axes: (label, values) each."""
    rows, (h, w) = math.ceil(len(images) / nrow), images.shape[2:]
    fig, ax = figure(1.5 + 0.42 * nrow, 1.0 + 0.42 * rows, margins=(0.8, 0.9, 0.2, 0.1))
    ax.imshow(grid_pixels(images, nrow, padding=0), cmap="gray", vmin=0, vmax=255)
    name = lambda v: v if isinstance(v, str) else f"{v:.2g}"  # noqa: E731
    ax.set_xticks([(i + 0.5) * w - 0.5 for i in range(nrow)], map(name, x_axis[1]), rotation=90)
    ax.set_yticks([(i + 0.5) * h - 0.5 for i in range(rows)], map(name, y_axis[1]))
    ax.set(xlabel=x_axis[0], ylabel=y_axis[0])
    return fig


@torch.no_grad()
def latent_grids(decode, mu0, mu_test):
    """What each latent dimension does, as (images, nrow, x_axis, y_axis) for labelled_grid: a
    traversal of the 10 most used dimensions, one a row swept over -2.5..2.5 with the others at
    a test image's posterior mean mu0; for a 2-D latent, the manifold: decodings of 20 x 20 z
    over where the test set's means lie."""
    mean = lambda z: torch.sigmoid(decode(z))  # noqa: E731  E[x|z] under either likelihood
    dims = mu_test.var(0).argsort(descending=True)[:10]  # the most used dimensions first
    sweep = torch.linspace(-2.5, 2.5, 11, device=mu0.device)
    z_rows = mu0.repeat(len(dims), 11, 1)  # (rows, 11, D)
    z_rows[torch.arange(len(dims)), :, dims] = sweep
    x_axis = ("value of the row's dimension (the others: a test image's mu)", sweep.tolist())
    rows = ("", [f"z[{u}]" for u in dims.tolist()])
    out = {"traversal.png": (mean(z_rows.flatten(0, 1)), 11, x_axis, rows)}
    if mu_test.shape[1] == 2:
        lo, hi = mu_test.min(0).values, mu_test.max(0).values
        z0, z1 = (torch.linspace(lo[i], hi[i], 20, device=mu0.device) for i in (0, 1))
        z1 = z1.flip(0)  # z[1] grows upwards
        grid = torch.stack(torch.meshgrid(z0, z1, indexing="xy"), -1).view(-1, 2)  # (400, 2)
        out["manifold.png"] = (mean(grid), 20, ("z[0]", z0.tolist()), ("z[1]", z1.tolist()))
    return out


def latent_figure(mu, y):
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
    fig, ax = figure(6, 5, margins=(0.8, 0.6, 0.9, 0.4))
    for label in range(10):  # one colour per label; a plot draws 3x faster than a scatter
        x0, x1 = points[y == label].T
        ax.plot(x0, x1, ".", ms=1.5, alpha=0.7, color=f"C{label}", label=str(label))
    ax.legend(title="label", loc="center left", bbox_to_anchor=(1, 0.5), markerscale=6)
    ax.set(xlabel=labels[0], ylabel=labels[1], title=f"test-set means of q(z|x), {mu.shape[1]}-D")
    if mu.shape[1] == 2:
        (x0, y0), (x1, y1) = mu.min(0).values.tolist(), mu.max(0).values.tolist()
        ax.set(xlim=(x0, x1), ylim=(y0, y1))
    return fig


def loss_figure(rows, steps):
    """-ELBO (left), recon and KL (right) in nats per image: training per step (smoothed over
    a tenth of an epoch) as lines, the test set after each epoch as dots. The y axis fits the
    run after its first epoch: the first steps, hundreds of nats higher, would squash it."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = figure(10, 4, columns=2)
    per_epoch = len(steps) / len(rows)
    width = max(1, round(per_epoch / 10))  # a moving average over `width` steps
    smooth = steps.unfold(0, width, 1).mean(-1)  # (steps - width + 1, 2)
    x = (torch.arange(len(smooth)) + width) / per_epoch  # the epoch at each average's last step
    train = {"neg_elbo": smooth.sum(1), "recon": smooth[:, 0], "kl": smooth[:, 1]}
    epochs = [r["epoch"] for r in rows]
    later = x > min(1.0, epochs[-1] / 2)  # what sets the y axis: all of it if nothing is later
    later = later if later.any() else x >= 0
    total, terms = [("neg_elbo", "C2", "-ELBO")], [("recon", "C0", "recon"), ("kl", "C3", "KL")]
    for ax, title, curves in zip(axes, ("total", "terms"), (total, terms)):
        shown = []
        for key, color, name in curves:
            ax.plot(x, train[key], color=color, lw=1, label=f"train {name}")
            test = [float(r[f"test_{key}"]) for r in rows]
            ax.plot(epochs, test, "o", color=color, label=f"test {name}")
            shown += [*train[key][later].tolist(), *test]
        margin = 0.05 * (max(shown) - min(shown)) or 1.0
        ax.set(ylim=(min(shown) - margin, max(shown) + margin), xlim=(0, epochs[-1]))
        ax.set(xlabel="epoch", ylabel="nats per image", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


METRIC_FIELDS = [  # the columns of metrics.csv
    "epoch", "lr", "kl_weight",
    "train_k",  # K of the bound the epoch trained on (1: the ELBO)
    "train_recon", "train_kl", "train_neg_elbo",  # recon + KL, whatever the epoch trained on
    "test_recon", "test_kl", "test_neg_elbo", "test_active_units",
    "images_per_s",  # training images per second of the training steps
    "train_s", "test_s",  # seconds of the epoch's training steps, and of its test evaluation
    "elapsed_s",  # seconds since training started, to the end of this evaluation
]  # fmt: skip
TERMS = ("recon", "kl", "neg_elbo")
DRAW_EVERY_S = 300  # the matplotlib figures: after the last epoch, and at most every 5 minutes


class Saver:
    """Each epoch's row of metrics, and what each epoch leaves in --out, then its line on
    stdout: the picture grids, samples.gif (the samples of every epoch), metrics.csv,
    checkpoint.pt; and the matplotlib figures (loss.png, latent.png and the labelled grids)
    after the last epoch, and after any epoch that ends DRAW_EVERY_S after they were drawn."""

    def __init__(self, args, model_flags, model, opt, ckpt):
        self.args, self.model_flags, self.model, self.opt = args, model_flags, model, opt
        prepare_out(args, start=not args.resume)
        old = ckpt if args.resume else {"metrics": [], "steps": torch.zeros(0, 2), "frames": []}
        self.rows, self.steps, self.frames = list(old["metrics"]), old["steps"], list(old["frames"])
        self.start = self.drawn = time.perf_counter()
        self.elapsed_before = self.rows[-1]["elapsed_s"] if self.rows else 0.0
        if not args.resume:
            return
        for group in ckpt["optimizer"]["param_groups"]:  # fused or not as this device wants
            group.update({k: opt.defaults[k] for k in ("fused", "foreach", "capturable")})
        opt.load_state_dict(ckpt["optimizer"])
        print(f"resuming from {args.checkpoint} at epoch {ckpt['epoch'] + 1}")
        if args.epochs != ckpt["args"]["epochs"]:  # README: a longer run, resumed
            print(
                f"note: --epochs {args.epochs} where the checkpoint's run had "
                f"{ckpt['args']['epochs']}: epochs {ckpt['epoch'] + 1}-{args.epochs} train as "
                f"those of a new {args.epochs}-epoch run (its rate, KL weight and L_K epochs)"
            )

    def add_row(self, stats, test, train_k, kl_weight, seconds):
        """One epoch's row. stats: (batches, 3) per-image recon, KL, loss of each batch;
        seconds: of the training steps and of the test evaluation."""
        recon, kl = stats[:, :2].mean(0).tolist()
        self.steps = torch.cat([self.steps, stats[:, :2].cpu()])  # recon, KL of every step
        self.rows.append({
            "epoch": len(self.rows) + 1, "lr": self.opt.param_groups[0]["lr"],
            "kl_weight": kl_weight, "train_k": train_k,
            "train_recon": recon, "train_kl": kl, "train_neg_elbo": recon + kl,
            **{f"test_{k}": v for k, v in test.items()},
            "images_per_s": len(stats) * self.args.batch_size / seconds[0],
            "train_s": seconds[0], "test_s": seconds[1],
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.start,
        })  # fmt: skip

    def epoch(self, grids, mu, y):
        """grids: {name: (images, nrow)}; mu: the test set's posterior means, y its labels."""
        a, rows, epoch = self.args, self.rows, self.rows[-1]["epoch"]
        for name, (images, nrow) in grids.items():
            save_grid(images, a.out, name, nrow)
        self.frames.append(torch.from_numpy(grid_pixels(*grids["samples.png"])))
        save_gif(self.frames, os.path.join(a.out, "samples.gif"))
        write_metrics(rows, a.out)
        if epoch == a.epochs or time.perf_counter() - self.drawn >= DRAW_EVERY_S:
            figures = {
                "loss.png": loss_figure(rows, self.steps),
                "latent.png": latent_figure(mu, y),
            }
            labelled = latent_grids(self.model.decode, mu[0], mu)
            figures.update((n, labelled_grid(*g)) for n, g in labelled.items())
            for name, fig in figures.items():
                save_figure(fig, os.path.join(a.out, name))
            self.drawn = time.perf_counter()
        self.checkpoint()
        print(epoch_line(rows[-1], a.epochs), flush=True)  # once the epoch is safe on disk
        if epoch == a.epochs:
            print(f"test  active units: {rows[-1]['test_active_units']} of {mu.shape[1]} latent "
                  "dimensions (Var_x E_q(z|x)[z_u] > 0.01, Burda et al. 2015)")  # fmt: skip

    def checkpoint(self, final=None):
        """Only tensors and plain values: torch.load(path, weights_only=True) reads it."""
        a, opt = self.args, self.opt.state_dict()
        param_state = {i: {k: v.cpu() for k, v in s.items()} for i, s in opt["state"].items()}
        state = {
            "script": a.script,
            "config": {k: getattr(a, k) for k in self.model_flags},  # VAE(**config) rebuilds it
            "args": {k: v for k, v in vars(a).items() if k not in ("explicit", "argv")},
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": {**opt, "state": param_state},  # on the CPU: readable without a GPU
            "epoch": self.rows[-1]["epoch"],  # epochs completed
            "metrics": self.rows,
            "steps": self.steps,  # per-image recon and KL of every training step, for loss.png
            "frames": torch.stack(self.frames),  # samples.png of every epoch, for samples.gif
            "final": final,  # {"iwae_nll": ..., "iw_samples": K} once the bound is computed
        }
        atomic_write(a.checkpoint, lambda f: torch.save(state, f))


def write_metrics(rows, out):
    def write(f):
        text = io.TextIOWrapper(f, newline="")
        w = csv.DictWriter(text, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)
        text.detach()  # flushes; leaves `f` open for atomic_write

    atomic_write(os.path.join(out, "metrics.csv"), write)


CHECKPOINT_KEYS = ("script", "config", "args", "model", "optimizer", "epoch", "metrics", "final")
MUST_MATCH = ("dataset", "likelihood", "binarize")  # besides the model's own flags
RUN_FLAGS = ("script", "out", "checkpoint", "resume", "eval_only", "generate", "data_dir", "device")


def load_checkpoint(args, model_flags):
    """With --resume, --eval-only or --generate: the checkpoint, checked against this script and
    the flags typed, whose settings it then takes (but for those typed now); else None."""
    if not (args.resume or args.eval_only or args.generate):
        return None
    path = args.checkpoint
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train first, or pass the run's --out")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported" in str(e).lower():  # a global or opcode only a code-running pickle uses
            why = "it holds objects other than tensors and plain values: loading it could run code"
            raise UserError(f"refusing to load {path}: {why}") from None
        raise UserError(f"{path} is not a readable checkpoint: it may be truncated") from None
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if ckpt["script"] != args.script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {args.script}.py")
    for key in (k for k in (*model_flags, *MUST_MATCH) if k in args.explicit):
        flag, then, now = "--" + key.replace("_", "-"), ckpt["args"][key], getattr(args, key)
        if now != then:
            raise UserError(f"{path} was trained with {flag} {then}, not {now}: drop the flag")
    for key, value in ckpt["args"].items():
        if key not in RUN_FLAGS and key not in args.explicit and hasattr(args, key):
            setattr(args, key, value)
    if args.resume and ckpt["epoch"] >= args.epochs:
        more = command(args, "--resume", "--epochs", str(ckpt["epoch"] + 10))
        raise UserError(f"{path} has trained all {ckpt['epoch']} epochs; to train further: {more}")
    return ckpt


# ---- 4. Running: device, progress, Ctrl-C, errors


def get_device(name):
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise UserError(f"--device {name}: no such GPU is available here; use --device auto")
    return torch.device(name)


def print_header(args, model, data):
    n_params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    print(
        f"{args.script}: {n_params:,} parameters on {device}; {args.dataset} "
        f"{len(data['train'][0])} train / {len(data['test'][0])} test images, binarize "
        f"{args.binarize}, {args.likelihood} likelihood; writing to {args.out}/",
        flush=True,
    )
    a = args
    if a.kl_warmup >= a.epochs:
        warning = f"--kl-warmup {a.kl_warmup} is not shorter than --epochs {a.epochs}: the KL"
        print(f"warning: {warning} weight stays below --beta {a.beta:g}", file=sys.stderr)
    if "train_k" in a.explicit and a.train_k > 1 and a.train_k_after >= a.epochs:
        warning = f"--train-k {a.train_k} applies only after epoch {a.train_k_after} (--train-k-"
        print(f"warning: {warning}after), so this {a.epochs}-epoch run trains on the ELBO alone",
              file=sys.stderr)  # fmt: skip


def fmt(m):
    return f"recon {m['recon']:7.2f}  KL {m['kl']:6.2f}  -ELBO {m['neg_elbo']:7.2f}"


def fmt_bound(nll, k):
    return f"test  -log p(x) <= {nll:.2f} nats per image (IWAE bound, K={k})"


def epoch_line(r, epochs):
    train, test = ({k: r[f"{split}_{k}"] for k in TERMS} for split in ("train", "test"))
    return (f"epoch {r['epoch']:3d}/{epochs}  train {fmt(train)}  |  test {fmt(test)}  |  "
            f"{r['images_per_s']:6.0f} img/s  {r['elapsed_s']:6.1f} s")  # fmt: skip


def check_finite(losses, epoch, saver):
    """Stop on a NaN/inf, saying what is on disk and the command that goes on at half the rate.
    `losses`: of the epoch's batches, (batches,), the first bad one named (the one place where
    training waits for the device); or the test loss after the epoch, which sees its last step."""
    values = torch.as_tensor(losses).view(-1).tolist()
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if not bad:
        return
    batch = not isinstance(losses, float)
    where = f"at epoch {epoch}, batch {bad[0] + 1}" if batch else f"after epoch {epoch}'s last step"
    what = f"the loss became {values[bad[0]]} {where}"
    a, saved = saver.args, len(saver.rows)  # every epoch before this one is on disk
    kept = f"{a.checkpoint} keeps epoch {saved}" if saved else "nothing was saved"
    go_on = command(a, *(["--resume"] if saved else []), "--lr", f"{a.lr / 2:g}")
    raise UserError(f"{what}: training diverged; {kept}; try a lower rate: {go_on}")


class Progress:
    """A live line (done/total, loss, ETA) on a terminal or in Jupyter only (not in logs or
    pipes), redrawn at most 4 times a second: the loss is read from the device only then."""

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


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM stops at once. The checkpoint on disk holds every finished
    epoch (a write cut short leaves the one before): say which, print the command that goes
    on, and leave in `result` what it holds and the exit code, 130 (143)."""

    def __init__(self, saver, result):
        self.saver, self.result = saver, result

    def _raise(self, signum, frame):
        raise KeyboardInterrupt(signum)

    def __enter__(self):  # both, even where the shell ignores SIGINT (a background job)
        self.previous = {s: signal.signal(s, self._raise) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, exc, tb):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if not isinstance(exc, KeyboardInterrupt):
            return False
        a, rows, path = self.saver.args, self.saver.rows, self.saver.args.checkpoint
        ckpt = torch.load(path, weights_only=True) if os.path.isfile(path) else {"epoch": 0}
        epoch = ckpt["epoch"]
        if epoch == a.epochs:
            message = f"stopped in the IWAE bound; get it with: {command(a, '--eval-only')}"
        elif epoch:
            message = (f"stopped in epoch {epoch + 1}; {path} holds epoch {epoch}; "
                       f"resume with: {command(a, '--resume')}")  # fmt: skip
            self.saver.model.load_state_dict(ckpt["model"])  # the model moved on since
        else:
            message = "stopped in epoch 1; nothing was saved"
        print(("\n" if sys.stdout.isatty() else "") + message, file=sys.stderr, flush=True)
        del rows[epoch:]
        test = {k: rows[-1][f"test_{k}"] for k in TERMS} if rows else None
        code = 143 if exc.args == (signal.SIGTERM,) else 130
        self.result.update(model=self.saver.model if rows else None, test=test, exit_code=code)
        return True


def run(main, argv):
    """main(argv) as a command: a user's error is one line on stderr; returns the exit code."""
    try:
        return main(argv)["exit_code"]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started
        print("interrupted", file=sys.stderr)
        return 130


def exit_fast(code):
    """sys.exit(code) without the garbage collector's last pass over every object torch and
    matplotlib made (0.5 s a run, benchmarks/RESULTS.md); atexit handlers still run."""
    gc.freeze()  # the objects alive now: never examined again, at exit included
    sys.exit(code)
