"""Plumbing for vae_mlp.py and vae_conv.py, none of it the algorithm: a reader can skip it."""

import argparse
import contextlib
import gzip
import itertools
import math
import os
import pickle
import shlex
import sys
import time
import zlib

import torch
from PIL import Image, ImageOps


class UserError(Exception):
    """A problem the user can fix (data, flags, files): one line on stderr, exit code 1."""


# ---- Flags


def _number(kind, test, words):
    def parse(text):
        if not test(value := kind(text)):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "0 or more")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "0 or more")
seed = _number(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2^32 - 1")
multiple_of_4 = _number(int, lambda v: v > 0 and v % 4 == 0, "a multiple of 4 for the conv net")


def parser(prog, description):
    """argparse with no prefixes of flags and a bad flag in one line."""
    p = argparse.ArgumentParser(prog, description=description, allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"{prog}: error: {message} (see --help)\n")
    return p


EXPERIMENT = ("model", "data", "loss", "training")  # groups of flags that name --out's default
NOT_NAMED = ("data_dir", "epochs")  # where the data is, and how long: the same experiment
MUST_MATCH = ("dataset", "image_size", "likelihood", "binarize")  # besides the model's own flags
RUN_FLAGS = ("script", "out", "checkpoint", "resume", "eval_only", "generate", "device")


def parse_args(p, argv, script):
    """Adds the flags of where and how a script runs, not what it computes; parses argv."""
    # fmt: off
    g = p.add_argument_group("running")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto: cuda, then mps, then cpu")
    g.add_argument("--eval-only", action="store_true",
                   help="load OUT/checkpoint.pt, print test metrics and the IWAE bound")
    g.add_argument("--generate", type=positive_int, metavar="N",
                   help="load OUT/checkpoint.pt, write N samples to OUT/generated.png")
    g.add_argument("--out", help=f"the run's folder (default: results/{script}, then the flags "
                   f"not at their default but --epochs and --data-dir: results/{script}-beta4)")
    g.add_argument("--resume", action="store_true", help="continue training from the checkpoint")
    # fmt: on
    for a in p._actions:  # "(default: X)" in --help, but for None, False and --help's own
        if a.default not in (None, argparse.SUPPRESS) and not isinstance(a.default, bool):
            a.help += " (default: %(default)s)"
    args = p.parse_args(list(argv))
    args.script, args.argv, args.shape = script, list(argv), None  # shape: the data's (C, H, W)
    typed = {w.split("=")[0] for w in argv}  # allow_abbrev=False: no prefixes
    args.explicit = sorted({a.dest for a in p._actions if typed & {*a.option_strings}})
    args.out = args.out or default_out(p, args)
    args.checkpoint = os.path.join(args.out, "checkpoint.pt")
    return args


def default_out(p, args):
    """results/vae_mlp-beta4-lr0.001: the experiment flags not at their default. To read a run:
    the folder with a checkpoint that drops the fewest loss and training flags (--lr added, say)."""
    words, loose = [], []  # loose: the flags such a command may add
    for group in (g for g in p._action_groups if g.title in EXPERIMENT):
        for a in group._group_actions:
            value = getattr(args, a.dest)
            if value != a.default and a.dest not in NOT_NAMED:
                text = f"{value:g}" if isinstance(value, float) else str(value)
                sep = "-" if isinstance(value, str) else ""  # beta4, likelihood-gaussian
                words.append(f"{a.option_strings[0][2:]}{sep}{text}")
                if value == "folder":  # named by the images' folder: vae_conv-folder-myimgs
                    words[-1] = "folder-" + os.path.basename(os.path.abspath(args.data_dir))
                if group.title in ("loss", "training") and a.dest not in MUST_MATCH:
                    loose.append(words[-1])
    n_drops = len(loose) + 1 if args.resume or args.eval_only or args.generate else 1
    drops = [d for n in range(n_drops) for d in itertools.combinations(loose, n)]  # () first
    folders = ["results/" + "-".join(w for w in [args.script, *words] if w not in d) for d in drops]
    return next((f for f in folders if os.path.isfile(f"{f}/checkpoint.pt")), folders[0])


def command(args, *flags):
    """The whole command that goes on with this run: as typed, `flags` replacing those typed."""
    replaced = {"--resume", "--eval-only", "--generate", "--out"}
    replaced |= {f for f in flags if f.startswith("--")}  # typed again with a new value
    words, typed = ["python", f"{args.script}.py"], iter(args.argv)
    for word in typed:
        name = word.split("=")[0]
        if name not in replaced:
            words.append(word)
        elif "=" not in word and name not in ("--resume", "--eval-only"):
            next(typed, None)  # and its value
    return shlex.join([*words, *flags, "--out", args.out])


# ---- Data: the images of each split in one uint8 tensor, checked, moved to the device once

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # fmt: skip
FOLDER = {"mnist": "MNIST", "fashion": "FashionMNIST"}  # torchvision's <dir>/<name>/raw/
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # what --dataset folder reads
TEST_SEED = 0  # the binarized test set, and a folder's test split, the same whatever --seed


def load_data(args, device):
    """{'train': (x, y), 'test': (x, y)}: uint8 images (N, C, H, W), int64 labels (-1: none)."""
    data = read_folder(args) if args.dataset == "folder" else read_mnist(args)
    for split, (x, y) in data.items():
        least = args.batch_size if split == "train" else 2
        if len(x) < least:
            raise UserError(f"{args.data_dir}: {len(x)} {split} images, fewer than {least}")
        if split == "test" and args.binarize == "dynamic":
            g = torch.Generator().manual_seed(TEST_SEED)
            x = (torch.bernoulli(x / 255.0, generator=g) * 255).to(torch.uint8)
        data[split] = (x.to(device), y.to(device))
    args.shape = tuple(data["train"][0].shape[1:])
    return data


def read_folder(args):
    """The images under DIR, centre-cropped and resized to --image-size; subfolders name labels."""
    tops = [os.path.join(args.data_dir, s) for s in ("train", "test")]
    tops = tops if all(map(os.path.isdir, tops)) else [args.data_dir]
    files = [(top, os.path.join(folder, name)) for top in tops
             for folder, _, names in sorted(os.walk(top)) for name in sorted(names)
             if name.lower().endswith(IMAGE_FILES)]  # fmt: skip
    if not files:
        raise UserError(f"no images under {args.data_dir}/ (--dataset folder reads {IMAGE_FILES})")
    images, kept, bad, size = [], [], [], (args.image_size,) * 2
    bar = Progress(f"reading {len(files)} images", len(files))
    for i, (top, path) in enumerate(files):
        try:
            with Image.open(path) as image:  # transparent pixels: black, as MNIST's background
                rgba = Image.alpha_composite(Image.new("RGBA", image.size), image.convert("RGBA"))
                pixels = ImageOps.fit(rgba.convert("RGB"), size, Image.LANCZOS).tobytes()
            images.append(torch.frombuffer(bytearray(pixels), dtype=torch.uint8))
            kept.append((top, os.path.relpath(path, top).split(os.sep)))
        except Exception as e:  # not an image after all, truncated, ...
            bad.append(f"{path} ({type(e).__name__})")
        bar.update(i + 1)
    if not images:
        raise UserError(f"no readable images under {args.data_dir}/, such as {bad[0]}")
    if bad:
        print(f"warning: skipped {len(bad)} unreadable images, such as {bad[0]}", file=sys.stderr)
    x = torch.stack(images).view(-1, *size, 3).permute(0, 3, 1, 2)  # (N, 3, S, S)
    x = x[:, :1] if (x == x[:, :1]).all() else x  # grey: R = G = B in every image
    names = sorted({parts[0] for _, parts in kept if len(parts) > 1})
    y = torch.tensor([names.index(p[0]) if len(p) > 1 else -1 for _, p in kept])
    test = torch.tensor([top != tops[0] for top, _ in kept])  # the images under DIR/test/
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(TEST_SEED))
    test[order[: len(x) // 10 if len(tops) == 1 else 0]] = True  # or a fixed 10% of them all
    return {"train": (x[~test].contiguous(), y[~test]), "test": (x[test].contiguous(), y[test])}


def read_mnist(args):
    """The four IDX files, gzipped or not, in DIR/MNIST/raw/ (torchvision's layout) or in DIR/."""
    raw, names = os.path.join(args.data_dir, FOLDER[args.dataset], "raw"), sum(FILES.values(), ())

    def find(folder):  # the plain file where both are there
        paths = (os.path.join(folder, n + gz) for n in names for gz in (".gz", ""))
        return {os.path.basename(p).removesuffix(".gz"): p for p in paths if os.path.isfile(p)}

    found = max(find(raw), find(args.data_dir), key=len)
    if not found:
        with contextlib.suppress(Exception):  # no network, or no torchvision
            from torchvision import datasets  # checks the md5s, unpacks into <dir>/<name>/raw/

            getattr(datasets, FOLDER[args.dataset])(args.data_dir, train=True, download=True)
        found = find(raw)
    missing = [n + ".gz" for n in names if n not in found]
    if missing:
        where = os.path.dirname(next(iter(found.values()))) if found else raw
        raise UserError(f"no {args.dataset} data: {where}/ lacks {', '.join(missing)}")
    data = {}
    for split, (images, labels) in FILES.items():
        x, y = read_idx(found[images], 3), read_idx(found[labels], 1).long()
        if len(x) != len(y):
            raise UserError(f"{found[images]} has {len(x)} images but {found[labels]} {len(y)}")
        data[split] = (x.unsqueeze(1), y)
    return data


def read_idx(path, dims):
    """The uint8 tensor in an IDX file (gzipped or not) with `dims` dimensions."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated, not gzip, unreadable
        raise UserError(f"{path} cannot be read ({e}): download it again") from None
    header = 4 + 4 * dims
    shape = [int.from_bytes(data[i : i + 4], "big") for i in range(4, header, 4)]
    if data[:4] != bytes([0, 0, 8, dims]) or len(data) != header + math.prod(shape):
        raise UserError(f"{path} is not a whole IDX file of {dims}-D uint8: download it again")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(shape)


# ---- Output files


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, then os.replace: never half-written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(images, out, name, nrow=None, padding=2):
    """(N, C, H, W) images in [0, 1] in OUT/name, laid out as torchvision's save_image does
    (tested) without its slow import; returns the uint8 pixels."""
    n, c, h, w = images.shape
    cols = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    grid = torch.zeros(rows * (h + padding) + padding, cols * (w + padding) + padding, c)
    for i, image in enumerate(images.detach().float().cpu()):  # a gap above and left of each
        top, left = i // cols * (h + padding) + padding, i % cols * (w + padding) + padding
        grid[top : top + h, left : left + w] = image.permute(1, 2, 0)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).squeeze(2).numpy()
    atomic_write(os.path.join(out, name), lambda f: Image.fromarray(pixels).save(f, format="png"))
    return pixels


@torch.no_grad()
def latent_grids(decode, mu0, mu_test):
    """traversal.png: the 10 most used dimensions swept about mu0; manifold.png: a 2-D z plane."""
    mean = lambda z: torch.sigmoid(decode(z))  # noqa: E731  E[x|z] under either likelihood
    dims = mu_test.var(0).argsort(descending=True)[:10]  # the most used dimensions first
    z_rows = mu0.repeat(len(dims), 11, 1)  # (rows, 11, D)
    z_rows[torch.arange(len(dims)), :, dims] = torch.linspace(-2.5, 2.5, 11, device=mu0.device)
    out = {"traversal.png": (mean(z_rows.flatten(0, 1)), 11)}
    if mu_test.shape[1] == 2:
        z0, z1 = (torch.linspace(*m.aminmax(), 20, device=mu0.device) for m in mu_test.T)
        grid = torch.stack(torch.meshgrid(z0, z1.flip(0), indexing="xy"), -1).view(-1, 2)
        out["manifold.png"] = (mean(grid), 20)  # (400, 2) z, z[1] growing upwards
    return out


def latent_figure(mu, y):
    """Test-set means of q(z|x) by label: z[0] against the label in 1-D, the top 2 PCs above 2-D."""
    from matplotlib.figure import Figure  # when first drawn; no pyplot, no GUI

    (mu, y), d = (mu.float().cpu(), y.cpu()), mu.shape[1]
    if d > 2:
        mu = mu - mu.mean(0)
        mu = mu @ torch.linalg.svd(mu, full_matrices=False)[2][:2].T  # (N, 2)
    points = torch.stack([mu[:, 0], y.float()], 1) if d == 1 else mu
    names = ("z[0]", "label") if d == 1 else ("z[0]", "z[1]") if d == 2 else ("PC 1", "PC 2")
    fig = Figure(figsize=(6, 5))  # fixed margins: a layout engine would draw it twice
    ax = fig.subplots(gridspec_kw=dict(left=0.13, bottom=0.12, right=0.85, top=0.92))
    for label in y.unique().tolist():  # one colour per label; a plot draws 3x faster than a scatter
        x0, x1 = points[y == label].T
        ax.plot(x0, x1, ".", ms=1.5, alpha=0.7, color=f"C{label % 10}", label=str(label))
    if y.max() >= 0:
        ax.legend(title="label", loc="center left", bbox_to_anchor=(1, 0.5), markerscale=6)
    ax.set(xlabel=names[0], ylabel=names[1], title=f"test-set means of q(z|x), {d}-D")
    return fig


def loss_figure(rows):
    """-ELBO, recon and KL by epoch: the training steps' mean as a line, the test set as dots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))  # fixed margins, as above
    margins = dict(left=0.08, bottom=0.15, right=0.98, top=0.95, wspace=0.25)
    axes = fig.subplots(1, 2, gridspec_kw=margins)
    epochs = [r["epoch"] for r in rows]
    curves = [[("neg_elbo", "C2", "-ELBO")], [("recon", "C0", "recon"), ("kl", "C3", "KL")]]
    for ax, terms in zip(axes, curves):
        for key, color, name in terms:
            train, test = ([r[f"{split}_{key}"] for r in rows] for split in ("train", "test"))
            ax.plot(epochs, train, color=color, label=f"train {name}")
            ax.plot(epochs, test, "o", color=color, label=f"test {name}")
        ax.set(xlabel="epoch", ylabel="nats per image")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    return fig


TERMS = ("recon", "kl", "neg_elbo")
OUTPUTS = (".png", ".gif", ".csv", ".pt")  # the files of a run in --out
DRAW_EVERY_S = 300  # samples.gif and the figures: after the first and last epoch, and every 5 min


class Saver:
    """Each epoch's files in --out (see DRAW_EVERY_S), then its line on stdout."""

    def __init__(self, args, model_flags, model, opt, ckpt):
        self.args, self.model_flags, self.model, self.opt = args, model_flags, model, opt
        try:  # a new run removes the files of the run there
            os.makedirs(args.out, exist_ok=True)
            old = [f.path for f in os.scandir(args.out) if f.name.endswith(OUTPUTS)]
            for path in [] if args.resume else old:
                os.remove(path)
        except OSError as e:
            raise UserError(f"--out: cannot write to folder {args.out}: {e.strerror}") from None
        self.rows = list(ckpt["metrics"]) if args.resume else []
        self.frames = list(ckpt["frames"]) if args.resume else []
        self.drawn = -math.inf  # when samples.gif and the figures were last drawn
        self.start = time.perf_counter() - (self.rows[-1]["elapsed_s"] if self.rows else 0.0)
        if args.resume:
            opt.load_state_dict(ckpt["optimizer"])
            print(f"resuming from {args.checkpoint} at epoch {ckpt['epoch'] + 1}")

    def add_row(self, stats, test, train_k, kl_weight, seconds):
        """metrics.csv's row. stats: (batches, 3) recon, KL, loss; seconds: of training, of test."""
        recon, kl = stats[:, :2].mean(0).tolist()
        self.rows.append({
            "epoch": len(self.rows) + 1, "lr": self.opt.param_groups[0]["lr"],
            "kl_weight": kl_weight,
            "train_k": train_k,  # K of the bound the epoch trained on (1: the ELBO)
            "train_recon": recon, "train_kl": kl,
            "train_neg_elbo": recon + kl,  # whatever the epoch trained on
            **{f"test_{k}": v for k, v in test.items()},  # recon, kl, neg_elbo, active_units
            "images_per_s": len(stats) * self.args.batch_size / seconds[0],  # of the steps
            "train_s": seconds[0], "test_s": seconds[1],
            "elapsed_s": time.perf_counter() - self.start,
        })  # fmt: skip

    def epoch(self, grids, mu, y):
        """grids: {name: (images, nrow)}; mu: the test set's posterior means, y its labels."""
        a, rows, r, epoch = self.args, self.rows, self.rows[-1], len(self.rows)
        grids.update(latent_grids(self.model.decode, mu[0], mu))
        pixels = {n: save_grid(images, a.out, n, nrow) for n, (images, nrow) in grids.items()}
        self.frames.append(torch.from_numpy(pixels["samples.png"]))  # as written, for the GIF
        lines = [rows[0], *(r.values() for r in rows)]  # metrics.csv: the header, a row an epoch
        csv = "".join(",".join(map(str, line)) + "\n" for line in lines).encode()
        atomic_write(os.path.join(a.out, "metrics.csv"), lambda f: f.write(csv))
        if epoch == a.epochs or time.perf_counter() - self.drawn >= DRAW_EVERY_S:
            first, *rest = (Image.fromarray(f.numpy()) for f in self.frames)
            ms = [500] * len(rest) + [2000]  # half a second a frame, two for the last
            gif = dict(save_all=True, append_images=rest, duration=ms, loop=0)
            atomic_write(os.path.join(a.out, "samples.gif"), lambda f: first.save(f, "gif", **gif))
            atomic_write(os.path.join(a.out, "loss.png"), loss_figure(rows).savefig)  # PNG
            atomic_write(os.path.join(a.out, "latent.png"), latent_figure(mu, y).savefig)
            self.drawn = time.perf_counter()
        self.checkpoint()
        train, test = ({k: r[f"{s}_{k}"] for k in TERMS} for s in ("train", "test"))
        line = f"epoch {epoch:3d}/{a.epochs}  train {fmt(train)}  |  test {fmt(test)}  |  "
        print(line + f"{r['images_per_s']:6.0f} img/s  {r['elapsed_s']:6.1f} s", flush=True)
        if epoch == a.epochs:
            print(f"test  active units: {r['test_active_units']} of {mu.shape[1]} latent "
                  "dimensions (Var_x E_q(z|x)[z_u] > 0.01, Burda et al. 2015)")  # fmt: skip

    def checkpoint(self, final=None):
        """Only tensors and plain values: torch.load(path, weights_only=True) reads it."""
        a, opt = self.args, self.opt.state_dict()
        param_state = {i: {k: v.cpu() for k, v in s.items()} for i, s in opt["state"].items()}
        state = {
            "script": a.script,
            "config": {k: getattr(a, k) for k in self.model_flags},  # VAE(**config) rebuilds it
            "args": {k: v for k, v in vars(a).items() if k not in ("explicit", "argv")},
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
            "optimizer": {**opt, "state": param_state},  # on the CPU: readable without a GPU
            "epoch": self.rows[-1]["epoch"],  # epochs completed
            "metrics": self.rows,
            "frames": torch.stack(self.frames),  # samples.png of every epoch, for samples.gif
            "final": final,  # {"iwae_nll": ..., "iw_samples": K} once the bound is computed
        }
        atomic_write(a.checkpoint, lambda f: torch.save(state, f))


def load_checkpoint(args, model_flags):
    """For --resume/--eval-only/--generate: the checkpoint, checked; it sets the flags not typed."""
    if not (args.resume or args.eval_only or args.generate):
        return None
    path = args.checkpoint
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train first, or pass the run's --out")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses what only a code-running pickle holds
        if isinstance(e, pickle.UnpicklingError) and "unsupported" in str(e).lower():
            raise UserError(f"refusing to load {path}: loading it could run code") from None
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != args.script:
        raise UserError(f"{path} is not a checkpoint of {args.script}.py")
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


# ---- Running: device, lines on stdout, Ctrl-C, errors


def get_device(name):
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    best = "cuda" if cuda else "mps" if mps else "cpu"
    if name not in ("auto", "cpu", best):
        raise UserError(f"--device {name}: no such GPU is available here; use --device auto")
    return torch.device(best if name == "auto" else name)


def print_header(a, model, data):
    n_params, (x, _) = sum(p.numel() for p in model.parameters()), data["train"]
    (c, h, w), data_set = x.shape[1:], a.data_dir if a.dataset == "folder" else a.dataset
    print(f"{a.script}: {n_params:,} parameters on {x.device}; {data_set}: {len(x)} train / "
          f"{len(data['test'][0])} test images, {'grey' if c == 1 else 'RGB'} {h}x{w}, binarize "
          f"{a.binarize}, {a.likelihood} likelihood; writing to {a.out}/", flush=True)  # fmt: skip
    if "train_k" in a.explicit and a.train_k > 1 and a.train_k_after >= a.epochs:
        after = f"applies only after epoch {a.train_k_after} (--train-k-after)"
        print(f"warning: --train-k {a.train_k} {after}, so this {a.epochs}-epoch run trains on "
              "the ELBO alone", file=sys.stderr)  # fmt: skip


def fmt(m):
    return f"recon {m['recon']:7.2f}  KL {m['kl']:6.2f}  -ELBO {m['neg_elbo']:7.2f}"


def check_finite(loss, epoch, saver):
    """A NaN or inf loss stops the run, naming what is on disk and the command to go on with."""
    bad = [v for v in torch.as_tensor(loss).view(-1).tolist() if not math.isfinite(v)]
    if bad:
        a, saved = saver.args, len(saver.rows)  # every epoch before this one is on disk
        kept = f"{a.checkpoint} keeps epoch {saved}" if saved else "nothing was saved"
        go_on = command(a, *(["--resume"] if saved else []), "--lr", f"{a.lr / 2:g}")
        what = f"the loss became {bad[0]} in epoch {epoch}: training diverged"
        raise UserError(f"{what}; {kept}; try a lower rate: {go_on}")


class Progress:
    """A live line on a terminal or in Jupyter, 4 redraws a second at most: each reads the loss."""

    def __init__(self, label, total):
        jupyter = type(sys.stdout).__module__.startswith("ipykernel")  # draws "\r" as a terminal
        self.on, self.label, self.total, self.last = sys.stdout.isatty() or jupyter, label, total, 0

    def update(self, done, loss=None):
        if self.on and (time.perf_counter() - self.last >= 0.25 or done == self.total):
            self.last = time.perf_counter()
            line = f"{self.label}  {done}/{self.total}"
            line += f"  loss {loss:7.2f}" if loss is not None else ""
            line = line if done < self.total else " " * len(line) + "\r"  # the last: erased
            print("\r" + line, end="", flush=True)


@contextlib.contextmanager
def stop_on_ctrl_c(saver, result):
    """Ctrl-C: say what the checkpoint on disk holds and the command that goes on; exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        a, rows, path = saver.args, saver.rows, saver.args.checkpoint
        ckpt = torch.load(path, weights_only=True) if os.path.isfile(path) else {"epoch": 0}
        epoch = ckpt["epoch"]
        del rows[epoch:]  # as on disk
        go_on = command(a, "--resume" if epoch < a.epochs else "--eval-only")  # or the bound
        held = f"{path} holds epoch {epoch}; go on with: {go_on}" if epoch else "nothing was saved"
        print(("\n" if sys.stdout.isatty() else "") + "stopped; " + held, file=sys.stderr)
        if epoch:
            saver.model.load_state_dict(ckpt["model"])  # the model moved on since
        test = {k: rows[-1][f"test_{k}"] for k in TERMS} if rows else None
        result.update(model=saver.model if rows else None, test=test, exit_code=130)


def run(main, argv):
    """main(argv) as a command: a user's error is one line on stderr; returns the exit code."""
    try:
        return main(argv)["exit_code"]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
