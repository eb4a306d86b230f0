"""Plumbing shared by vae_mlp.py and vae_conv.py.

The algorithm (model, training step, evaluation) lives in the two scripts; this
file holds what a reader of them can take on trust:

  1. command line        flags shared by both scripts, with checks
  2. data                MNIST / Fashion-MNIST as one uint8 tensor on the device
  3. ELBO terms          reconstruction NLL and closed-form KL, per image, in nats
  4. checkpoints         atomic save, load with clear errors, resume state
  5. pictures            samples, reconstructions, interpolation, latent, curves
  6. running             device, seed, progress line, signals, metrics.csv, errors
"""

import argparse
import csv
import gzip
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.utils import make_grid, save_image


class UserError(Exception):
    """A problem the user can fix (data, flags, files): reported in one line, exit code 1."""


# ----------------------------------------------------------------------------
# 1. Command line


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: X)' only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def make_parser(doc, script, lr):
    """The flags both scripts share, in groups; each script adds its `model` group and gives its own
    default learning rate (the best measured for its model)."""
    p = argparse.ArgumentParser(
        prog=f"{script}.py",
        description=doc.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["mnist", "fashion"], default="mnist", help="MNIST digits or Fashion-MNIST clothes")
    g.add_argument("--data-dir", default="./data", help="torchvision's layout (<dir>/MNIST/raw/) or a folder holding the four IDX files, gzipped or not")
    g.add_argument("--binarize", choices=["none", "dynamic"], default="none", help="none: grey pixels in [0,1]; dynamic: a fresh Bernoulli sample per training batch, the test set binarized once with a fixed seed (the papers' protocol)")
    g = p.add_argument_group("loss")
    g.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli", help="p(x|z): Bernoulli on logits (BCE), or unit-variance Gaussian (MSE/2 + constant)")
    g.add_argument("--beta", type=nonnegative_float, default=1.0, help="weight of the KL term (1 = the ELBO)")
    g.add_argument("--kl-warmup", type=nonnegative_int, default=0, help="epochs over which the KL weight rises linearly from 0 to --beta (0 = off)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=20, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    g.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate (the best measured for this model)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine", help="cosine: the rate decays from --lr towards 0 over --epochs, one step per epoch")
    g.add_argument("--seed", type=int, default=1, help="seed for weights, data order and noise")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (default: on for cuda, off elsewhere)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--iw-samples", type=nonnegative_int, default=100, help="K of the importance-weighted bound on log p(x), computed once at the end (0 = off)")
    g.add_argument("--eval-only", action="store_true", help="load the checkpoint, print test metrics, do not train")
    g.add_argument("--generate", type=positive_int, metavar="N", help="load the checkpoint, write N samples to <out>/generated.png, do not train")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help=f"folder for pictures, metrics.csv and checkpoint.pt (default: results/{script}/)")
    g.add_argument("--checkpoint", default=None, help="checkpoint for --resume/--eval-only/--generate (default: <out>/checkpoint.pt)")
    g.add_argument("--resume", action="store_true", help="continue training from the checkpoint")
    return p


def parse_args(parser, argv, script):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.script = script
    args.out = args.out or os.path.join("results", script)
    args.checkpoint = args.checkpoint or os.path.join(args.out, "checkpoint.pt")
    # flags the user typed, so that a checkpoint's settings can win over the defaults
    args.explicit = sorted(
        a.dest for a in parser._actions
        if any(arg == s or arg.startswith(s + "=") for s in a.option_strings for arg in argv)
    )
    return args


# ----------------------------------------------------------------------------
# 2. Data: one uint8 tensor per split, moved to the device once

DATASETS = {"mnist": datasets.MNIST, "fashion": datasets.FashionMNIST}
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TEST_BINARIZE_SEED = 0  # the binarized test set is the same in every run


def _find_files(folder):
    """{name: path} for the four IDX files in `folder` (plain preferred to .gz)."""
    found = {}
    for names in SPLITS.values():
        for name in names:
            for candidate in (name, name + ".gz"):
                path = os.path.join(folder, candidate)
                if os.path.isfile(path):
                    found[name] = path
                    break
    return found


def _read_idx(path, reader, tmp):
    if path.endswith(".gz"):  # torchvision's readers take plain files
        plain = os.path.join(tmp, os.path.basename(path)[:-3])
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        path = plain
    try:
        return reader(path)
    except (AssertionError, ValueError, TypeError, RuntimeError, IndexError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a valid IDX file ({type(e).__name__}: {e}); delete it and download it again") from None


def find_data(dataset, data_dir):
    """Paths of the four files, downloading them with torchvision when missing."""
    cls = DATASETS[dataset]
    raw = os.path.join(data_dir, cls.__name__, "raw")
    for folder in (raw, data_dir):
        found = _find_files(folder)
        if len(found) == 4:
            return found
    try:  # torchvision downloads, checks md5 and unpacks into <data_dir>/<Name>/raw/
        cls(data_dir, train=True, download=True)
    except Exception:
        pass
    found = _find_files(raw)
    if len(found) == 4:
        return found
    missing = [n + ".gz" for names in SPLITS.values() for n in names if n not in found]
    raise UserError(
        f"{dataset} data not found and could not be downloaded: missing {', '.join(missing)}; "
        f"put the four files (gzipped or not) in {raw}/ or pass --data-dir FOLDER holding them"
    )


def load_data(dataset, data_dir, device, binarize="none"):
    """{'train': (x, y), 'test': (x, y)} with x uint8 (N, 1, 28, 28) on the device, y int64.

    With binarize='dynamic' the test images are 0/255, sampled once with a fixed seed.
    """
    paths = find_data(dataset, data_dir)
    data = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, (images, labels) in SPLITS.items():
            x = _read_idx(paths[images], read_image_file, tmp)  # (N, 28, 28) uint8
            y = _read_idx(paths[labels], read_label_file, tmp)  # (N,) int64
            if x.dim() != 3 or x.dtype != torch.uint8 or x.shape[0] == 0:
                raise UserError(f"{paths[images]} does not hold uint8 images (shape {tuple(x.shape)}, {x.dtype})")
            if len(x) != len(y):
                raise UserError(f"{paths[images]} has {len(x)} images but {paths[labels]} has {len(y)} labels")
            if split == "test" and binarize == "dynamic":
                g = torch.Generator().manual_seed(TEST_BINARIZE_SEED)
                x = (torch.bernoulli(x / 255.0, generator=g) * 255).to(torch.uint8)
            data[split] = (x.unsqueeze(1).to(device), y.to(device))
    return data


def to_float(x_uint8, binarize="none"):
    """uint8 pixels -> float in [0,1] on their device; 'dynamic' draws x ~ Bernoulli(pixel)."""
    x = x_uint8.float().div_(255)
    return torch.bernoulli(x) if binarize == "dynamic" else x


def epoch_order(n, batch_size, seed, epoch, device):
    """The batches of one epoch: index tensors into a random permutation fixed by (seed, epoch).

    The last incomplete batch is dropped (a different one each epoch), so every step has
    the same shape; a dataset smaller than a batch is one batch.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).to(device)
    n_batches = max(1, n // batch_size)
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


# ----------------------------------------------------------------------------
# 3. ELBO terms, per image, in nats


def recon_nll(logits, x, likelihood="bernoulli"):
    """-log p(x|z) summed over pixels: (B, ...) -> (B,)."""
    if likelihood == "bernoulli":
        # -log Bernoulli(x; sigmoid(l)) = softplus(l) - x*l, stable for any l (no log(0))
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        # -log N(x; x_hat, I) = ||x - x_hat||^2 / 2 + log(2 pi) / 2 per pixel, x_hat = sigmoid(l)
        nll = 0.5 * (x - torch.sigmoid(logits)) ** 2 + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(1)


def kl_std_normal(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)): (B, D) -> (B,).

    -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)   (Kingma & Welling 2013, App. B)
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag(exp(logvar))) summed over the last dim."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def chunk_sizes(total, size):
    """Split `total` into chunks of at most `size`: chunk_sizes(10, 4) -> [4, 4, 2]."""
    return [min(size, total - i) for i in range(0, total, size)]


def mean_image(logits):
    """The decoder's mean E[x|z] in [0,1] (both likelihoods use x_hat = sigmoid(logits))."""
    return torch.sigmoid(logits)


def learning_rate(epoch, lr, epochs, schedule):
    """Adam's rate in `epoch` (1-based): constant, or cosine decay from lr to near 0 (Loshchilov & Hutter 2017)."""
    return lr if schedule == "constant" else lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def kl_weight(epoch, beta, warmup):
    """KL weight in `epoch` (1-based): rises linearly from beta/warmup to beta over `warmup` epochs."""
    return beta if warmup == 0 else beta * min(1.0, epoch / warmup)


# ----------------------------------------------------------------------------
# 4. Checkpoints


def save_checkpoint(path, state):
    """torch.save to a temporary file, then os.replace: a crash or a full disk leaves the old one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


CHECKPOINT_KEYS = ("script", "config", "args", "model", "optimizer", "epoch", "metrics")
MUST_MATCH = ("dataset", "likelihood", "binarize")  # besides the model's own flags


def load_checkpoint(args, model_flags):
    """Load args.checkpoint and check it belongs to this script and these flags."""
    path = args.checkpoint
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train first, or pass --checkpoint PATH or --out FOLDER")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it may be truncated") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if ckpt["script"] != args.script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {args.script}.py")
    for key in (*model_flags, *MUST_MATCH):
        if key in args.explicit and getattr(args, key) != ckpt["args"][key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path} was trained with {flag} {ckpt['args'][key]}, not {getattr(args, key)}; drop the flag or use another checkpoint")
    return ckpt


def adopt_checkpoint_args(args, ckpt):
    """The checkpoint's settings, except the flags typed now (e.g. more --epochs)."""
    keep = set(args.explicit) | {"script", "explicit", "out", "checkpoint", "resume", "eval_only", "generate", "data_dir", "device"}
    for key, value in ckpt["args"].items():
        if key not in keep:
            setattr(args, key, value)
    return args


def checkpoint_state(args, model_flags, model, opt, epoch, rows, partial=None, final=None):
    """Everything to rebuild the model (`config`), continue training, and know how it was made."""
    return {
        "script": args.script,
        "config": {k: getattr(args, k) for k in model_flags},  # VAE(**config) rebuilds the model
        "args": {k: v for k, v in vars(args).items() if k != "explicit"},
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "epoch": epoch,  # epochs completed
        "partial": partial,  # the epoch in progress when a signal stopped training, else None
        "metrics": rows,
        "final": final,
        "rng": rng_state(),
        "torch": torch.__version__,
    }


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------
# 5. Pictures (grids with torchvision, plots with matplotlib)


@torch.no_grad()
def save_samples(model, z, path):
    """Decode fixed z ~ N(0, I) into an 8-wide grid."""
    save_image(mean_image(model.decode(z)), path, nrow=8)


@torch.no_grad()
def save_reconstructions(model, x, path):
    """Test images (row 1) above their reconstructions from the posterior mean (row 2), 2 pairs of rows."""
    mu, _ = model.encode(x)
    x_hat = mean_image(model.decode(mu))
    n = len(x) // 2
    rows = [x[:n], x_hat[:n], x[n:], x_hat[n:]]
    save_image(torch.cat(rows), path, nrow=n)


@torch.no_grad()
def save_interpolation(model, x, path, steps=10):
    """Each row: image a, decode((1-t) mu_a + t mu_b) for `steps` values of t, image b."""
    mu, _ = model.encode(x)  # (2R, D)
    mu_a, mu_b = mu[0::2], mu[1::2]  # (R, D)
    t = torch.linspace(0, 1, steps, device=mu.device).view(1, steps, 1)
    z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # (R, steps, D)
    decoded = mean_image(model.decode(z.flatten(0, 1))).view(len(mu_a), steps, *x.shape[1:])
    rows = torch.cat([x[0::2, None], decoded, x[1::2, None]], dim=1)  # (R, steps+2, 1, 28, 28)
    save_image(rows.flatten(0, 1), path, nrow=steps + 2)


@torch.no_grad()
def save_manifold(model, path, n=20):
    """2-D latent only: decode a grid of z at Gaussian quantiles 0.05..0.95."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")  # z2 grows upwards
    z = torch.stack([z1, z2], dim=-1).view(-1, 2).to(next(model.parameters()).device)
    save_image(mean_image(model.decode(z)), path, nrow=n, padding=0)


@torch.no_grad()
def save_generated(model, n, latent_dim, path):
    """n fresh samples x ~ p(x|z), shown as their means, z ~ N(0, I)."""
    device = next(model.parameters()).device
    save_image(mean_image(model.decode(torch.randn(n, latent_dim, device=device))), path, nrow=math.ceil(math.sqrt(n)))


def _figure(width=6, height=5):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


@torch.no_grad()
def save_latent(model, x, y, path, batch_size=2000):
    """Test-set posterior means coloured by label; first two principal components above 2-D."""
    mu = torch.cat([model.encode(to_float(xb))[0] for xb in x.split(batch_size)]).float().cpu()
    if mu.shape[1] == 1:
        points, labels = torch.stack([mu[:, 0], y.cpu().float()], 1), ("z[0]", "label")
    elif mu.shape[1] == 2:
        points, labels = mu, ("z[0]", "z[1]")
    else:
        centred = mu - mu.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ v[:2].T
        share = (s[:2] ** 2 / (s ** 2).sum() * 100).tolist()
        labels = (f"PC 1 ({share[0]:.0f}% of variance)", f"PC 2 ({share[1]:.0f}% of variance)")
    fig, ax = _figure(6, 5)
    sc = ax.scatter(points[:, 0], points[:, 1], c=y.cpu(), cmap="tab10", s=2, alpha=0.7, vmin=-0.5, vmax=9.5)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="label")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(f"test-set means of q(z|x), latent dim {mu.shape[1]}")
    fig.tight_layout()
    fig.savefig(path)


def save_loss_curves(rows, path):
    """Train and test -ELBO per epoch (left), recon and KL (right), nats per image."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for split, style in (("train", "-"), ("test", "--")):
        ax1.plot(epochs, [r[f"{split}_loss"] for r in rows], style, marker="o", label=f"{split} -ELBO")
        ax2.plot(epochs, [r[f"{split}_recon"] for r in rows], style, marker="o", color="C0", label=f"{split} recon")
        ax2.plot(epochs, [r[f"{split}_kl"] for r in rows], style, marker="o", color="C3", label=f"{split} KL")
    for ax, title in ((ax1, "total"), (ax2, "terms")):
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def save_pictures(model, data, z_fixed, out, epoch):
    """Every picture of one epoch; samples.png is also kept as samples_epoch_NN.png."""
    x_test, y_test = data["test"]
    model.eval()
    save_samples(model, z_fixed, os.path.join(out, "samples.png"))
    shutil.copyfile(os.path.join(out, "samples.png"), os.path.join(out, f"samples_epoch_{epoch:02d}.png"))
    save_reconstructions(model, to_float(x_test[:16]), os.path.join(out, "reconstructions.png"))
    save_interpolation(model, to_float(x_test[:16]), os.path.join(out, "interpolation.png"))
    save_latent(model, x_test, y_test, os.path.join(out, "latent.png"))
    if z_fixed.shape[1] == 2:
        save_manifold(model, os.path.join(out, "manifold.png"))


# ----------------------------------------------------------------------------
# 6. Running: device, seed, output folder, progress, metrics, signals, errors


def get_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: no Apple GPU is available here (try --device auto)")
    return torch.device(name)


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds CPU and every GPU


def fixed_z(n, latent_dim, seed, device):
    """The same z for the samples of every epoch (its own generator: training noise is untouched)."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)


def eval_generator(device, seed=0):
    """Noise for evaluation, the same every time: test numbers compare across epochs and runs."""
    return torch.Generator(device=device).manual_seed(seed)


def speed_up(model, flag, device):
    """What only serves speed; returns the model to train with (same weights, same results).

    - channels_last (NHWC) for models with convolutions: the 4x4 stride-2 convolutions
      run faster on CPU (oneDNN) and GPU (cuDNN) in that layout (benchmarks/RESULTS.md).
      Changes the parameters' layout in place: call before building the optimizer.
    - torch.compile (--compile, default on for CUDA): fuses the small elementwise ops; on a
      CPU it costs ~20 s of compiling and gains nothing measurable here.
    """
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    if flag is None:
        flag = device.type == "cuda"
    return torch.compile(model) if flag else model


def prepare_out(out):
    """Create the output folder and prove it is writable, before any training."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror or e}") from None


METRIC_FIELDS = [
    "epoch", "lr", "kl_weight",
    "train_recon", "train_kl", "train_loss",
    "test_recon", "test_kl", "test_loss",
    "images_per_s", "epoch_s", "elapsed_s",
]


def write_metrics(rows, out):
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)


def fmt(m):
    return f"recon {m['recon']:7.2f}  KL {m['kl']:6.2f}  -ELBO {m['loss']:7.2f}"


def check_finite(losses, i, epoch, lr):
    """Stop on a NaN/inf loss, naming its epoch and batch. losses: (n_batches,) on the device.

    Checked every batch on the CPU, every 50 on a GPU (each check waits for the GPU).
    """
    every = 1 if losses.device.type == "cpu" else 50
    if (i + 1) % every and i + 1 < len(losses):
        return
    bad = (~torch.isfinite(losses[: i + 1])).nonzero()
    if len(bad):
        b = bad[0].item()
        raise UserError(
            f"the loss became {losses[b].item()} at epoch {epoch}, batch {b + 1}: training diverged; "
            f"the last good checkpoint is kept; try a lower --lr (now {lr:g})"
        )


class Progress:
    """A live line (batch, loss, img/s, ETA) while an epoch runs, only on a terminal."""

    def __init__(self, epoch, epochs, n_batches, batch_size, enabled=None):
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self.epoch, self.epochs, self.n, self.bs = epoch, epochs, n_batches, batch_size
        self.start = self.last = time.perf_counter()

    def update(self, i, loss):
        """i: batches done; loss: a 0-d tensor (read only when the line is redrawn)."""
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.25 and i < self.n):
            return
        self.last = now
        rate = i * self.bs / (now - self.start)
        eta = (self.n - i) * self.bs / max(rate, 1e-9)
        print(f"\repoch {self.epoch}/{self.epochs}  batch {i}/{self.n}  loss {loss.item():7.2f}  "
              f"{rate:7.0f} img/s  ETA {eta:4.0f}s ", end="", flush=True)

    def close(self):
        if self.enabled:
            print("\r" + " " * 79 + "\r", end="", flush=True)


class StopRequest:
    """SIGINT/SIGTERM set a flag; training stops after the current batch and saves."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this batch ...", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

    def __bool__(self):
        return self.signum is not None

    def exit_code(self):
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


def run(main):
    """Call main(); turn the errors a user can meet into one line and an exit code."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    except OSError as e:  # full disk, permissions, ...
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code or 0)
