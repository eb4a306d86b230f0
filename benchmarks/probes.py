"""Short-run probes of VAE variants on dynamically binarized MNIST.

    python benchmarks/probes.py                                    # conv baseline, 5 epochs
    python benchmarks/probes.py --act elu --batch-size 64 --epochs 10
    python benchmarks/probes.py --arch mlp --act silu --ema 0.999  # the MLP, 784-400-20

Self-contained (torch, torchvision, stdlib only). The conv model keeps the project's shape:
encoder = two strided convolutions, then fully-connected layer(s) -> (mu, logvar);
decoder = fully-connected layer(s), then two transposed convolutions -> (B, 1, 28, 28)
Bernoulli logits; `--arch mlp` is vae_mlp.py's 784-H-(mu, logvar) / D-H-784 instead.
`--ema D` evaluates (test -ELBO, IWAE bound) an exponential moving average of the weights,
updated after every step with decay min(D, (1 + t) / (10 + t)) at step t (Polyak averaging
with the usual warm-up), in place of the trained weights.

Training: -ELBO (BCE summed over pixels + closed-form KL to N(0, I),
mean over the batch), training images x ~ Bernoulli(pixel/255) drawn fresh per batch,
last incomplete batch dropped, cosine lr decay per epoch (optional linear warm-up in steps),
channels_last on CPU, 2 threads. Evaluation on the FIRST --test-images images of the test
set binarized once with torch.Generator().manual_seed(0): test -ELBO (one z per image) and
the IWAE bound with K = --iw-samples (Burda et al. 2015), both with noise from a generator
seeded 0. The last line printed is one markdown row:

    | flags | params | s/epoch | test -ELBO | IWAE NLL (K) |

s/epoch is the median wall time of the training epochs, with the mean CPU seconds (both
threads together) in brackets: CPU time does not count time the process was paused.
"""

import argparse
import copy
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets.mnist import read_image_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTS = {"relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU, "gelu": nn.GELU}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["conv", "mlp"], default="conv")
    p.add_argument("--channels", type=int, default=32, help="first conv; the second has 2x")
    p.add_argument("--kernel", type=int, choices=[4, 5], default=4)
    p.add_argument("--hidden-dim", type=int, help="default: 256 (conv), 400 (mlp)")
    p.add_argument("--fc-layers", type=int, choices=[1, 2], default=1, help="hidden FC per side")
    p.add_argument("--latent-dim", type=int, help="default: 32 (conv), 20 (mlp)")
    p.add_argument("--act", choices=sorted(ACTS), default="relu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=0, help="linear warm-up, in steps")
    p.add_argument("--optim", choices=["adam", "adamax"], default="adam")
    p.add_argument("--clip", type=float, default=0.0, help="grad-norm clip (0 = off)")
    p.add_argument("--ema", type=float, default=0.0, help="evaluate an EMA of the weights (0: off)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--iw-samples", type=int, default=100)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data", "MNIST", "raw"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "probes"))
    args = p.parse_args(argv)
    conv = args.arch == "conv"
    args.hidden_dim = args.hidden_dim or (256 if conv else 400)
    args.latent_dim = args.latent_dim or (32 if conv else 20)
    return args


# ----------------------------------------------------------------------------
# Data


def load_mnist(raw):
    """(train uint8 (60000, 1, 28, 28), test binarized once with seed 0, uint8 0/1)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = []
        for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
            path = os.path.join(raw, name)
            if not os.path.isfile(path):
                path = os.path.join(tmp, name)
                with (
                    gzip.open(os.path.join(raw, name + ".gz"), "rb") as src,
                    open(path, "wb") as dst,
                ):
                    shutil.copyfileobj(src, dst)
            out.append(read_image_file(path))
    train, test = out
    g = torch.Generator().manual_seed(0)
    test = torch.bernoulli(test / 255.0, generator=g)  # same as the project's fixed test set
    return train.unsqueeze(1), test.unsqueeze(1)


# ----------------------------------------------------------------------------
# Model


class VAE(nn.Module):
    def __init__(
        self, channels=32, kernel=4, hidden_dim=256, fc_layers=1, latent_dim=32, act="relu"
    ):
        super().__init__()
        c1, c2, A = channels, 2 * channels, ACTS[act]
        pad, opad = (1, 0) if kernel == 4 else (2, 1)  # 28 -> 14 -> 7 and back
        enc_fc = [nn.Linear(c2 * 49, hidden_dim), A()]
        dec_fc = [nn.Linear(latent_dim, hidden_dim), A()]
        for _ in range(fc_layers - 1):
            enc_fc += [nn.Linear(hidden_dim, hidden_dim), A()]
            dec_fc += [nn.Linear(hidden_dim, hidden_dim), A()]
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, kernel, stride=2, padding=pad),
            A(),  # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, kernel, stride=2, padding=pad),
            A(),  # (B, c2, 7, 7)
            nn.Flatten(),
            *enc_fc,
            nn.Linear(hidden_dim, 2 * latent_dim),  # mu, logvar
        )
        self.decoder = nn.Sequential(
            *dec_fc,
            nn.Linear(hidden_dim, c2 * 49),
            A(),
            nn.Unflatten(1, (c2, 7, 7)),
            nn.ConvTranspose2d(c2, c1, kernel, 2, pad, output_padding=opad),
            A(),  # 14x14
            nn.ConvTranspose2d(c1, 1, kernel, 2, pad, output_padding=opad),  # (B, 1, 28, 28)
        )

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        return self.decoder(mu + torch.exp(0.5 * logvar) * eps), mu, logvar


class MLP(VAE):
    def __init__(self, hidden_dim=400, fc_layers=1, latent_dim=20, act="relu"):
        nn.Module.__init__(self)
        A = ACTS[act]
        enc = [nn.Flatten(), nn.Linear(784, hidden_dim), A()]
        dec = [nn.Linear(latent_dim, hidden_dim), A()]
        for _ in range(fc_layers - 1):
            enc += [nn.Linear(hidden_dim, hidden_dim), A()]
            dec += [nn.Linear(hidden_dim, hidden_dim), A()]
        self.encoder = nn.Sequential(*enc, nn.Linear(hidden_dim, 2 * latent_dim))
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden_dim, 784), nn.Unflatten(1, (1, 28, 28)))


def recon_nll(logits, x):
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def kl_std_normal(mu, logvar):
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def log_normal(z, mu, logvar):
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


# ----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def test_elbo(model, x_test, batch_size=1000):
    model.eval()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for x in x_test.split(batch_size):
        logits, mu, logvar = model(x, generator=g)
        total += (recon_nll(logits, x) + kl_std_normal(mu, logvar)).sum().item()
    return total / len(x_test)


@torch.no_grad()
def iwae_nll(model, x_test, k, batch_size=500, max_images=8192):
    """-log p(x) <= -(logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for x in x_test.split(batch_size):
        mu, logvar = model.encode(x)  # (B, D)
        log_w = []
        for i in range(0, k, max(1, max_images // len(x))):
            c = min(max(1, max_images // len(x)), k - i)
            z = mu + torch.exp(0.5 * logvar) * torch.randn((c, *mu.shape), generator=g)
            logits = model.decoder(z.flatten(0, 1))  # (c*B, 1, 28, 28)
            xs = x.expand(c, *x.shape).flatten(0, 1)
            log_px_z = -recon_nll(logits, xs).view(c, -1)
            log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
            log_w.append(log_px_z + log_pz - log_normal(z, mu, logvar))
        log_w = torch.cat(log_w)  # (K, B)
        total += (torch.logsumexp(log_w, 0) - math.log(k)).sum().item()
    return -total / len(x_test)


# ----------------------------------------------------------------------------
# Training


def cosine(epoch, lr, epochs):
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def main(argv=None):
    args = get_args(argv)
    torch.set_num_threads(2)
    flags = " ".join(sys.argv[1:] if argv is None else argv) or "(baseline)"
    x_train, x_test = load_mnist(args.data_dir)
    x_test = x_test[: args.test_images].contiguous()
    torch.manual_seed(args.seed)
    if args.arch == "conv":
        model = VAE(
            args.channels, args.kernel, args.hidden_dim, args.fc_layers, args.latent_dim, args.act
        )
        model.to(memory_format=torch.channels_last)
    else:
        model = MLP(args.hidden_dim, args.fc_layers, args.latent_dim, args.act)
    ema = copy.deepcopy(model) if args.ema else model  # what is evaluated
    ema_params, params_list = list(ema.parameters()), list(model.parameters())
    params = sum(p.numel() for p in model.parameters())
    if args.optim == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    else:
        opt = torch.optim.Adamax(model.parameters(), lr=args.lr)
    n_batches = len(x_train) // args.batch_size
    warm_steps = round(args.warmup_epochs * n_batches)
    step, times, cpus, rows, status = 0, [], [], [], ""
    print(f"{flags}: {params:,} parameters", flush=True)
    for epoch in range(1, args.epochs + 1):
        model.train()
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        perm = torch.randperm(len(x_train), generator=g)
        base = cosine(epoch, args.lr, args.epochs)
        total, t0, c0 = torch.zeros(()), time.perf_counter(), time.process_time()
        for i in range(n_batches):
            lr = base * min(1.0, (step + 1) / warm_steps) if warm_steps else base
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x = torch.bernoulli(x_train[idx].float().div_(255))
            logits, mu, logvar = model(x)
            per_image = recon_nll(logits, x) + kl_std_normal(mu, logvar)
            loss = per_image.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            if args.ema:  # ema <- d * ema + (1 - d) * weights, d warming up to --ema
                decay = min(args.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, params_list, 1 - decay)
            total += per_image.detach().sum()
            step += 1
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)  # CPU seconds, all threads; not counting pauses
        train = total.item() / (n_batches * args.batch_size)
        if not math.isfinite(train):
            status = f"diverged in epoch {epoch}"
            break
        test = test_elbo(ema, x_test)
        rows.append(
            {"epoch": epoch, "train": train, "test": test, "s": times[-1], "cpu_s": cpus[-1]}
        )
        print(
            f"epoch {epoch}/{args.epochs}  train -ELBO {train:.2f}  test -ELBO {test:.2f}  "
            f"{times[-1]:.1f} s  (cpu {cpus[-1]:.1f} s)",
            flush=True,
        )
    # median wall time per epoch (robust to a paused epoch) and mean CPU seconds per epoch
    s_epoch = f"{sorted(times)[len(times) // 2]:.1f} (cpu {sum(cpus) / len(cpus):.0f})"
    if status:
        row = f"| `{flags}` | {params:,} | {s_epoch} | {status} | - |"
    else:
        t0 = time.perf_counter()
        nll = iwae_nll(ema, x_test, args.iw_samples) if args.iw_samples else float("nan")
        print(f"IWAE K={args.iw_samples}: {time.perf_counter() - t0:.1f} s", flush=True)
        row = (
            f"| `{flags}` | {params:,} | {s_epoch} | {rows[-1]['test']:.2f} | "
            f"{nll:.2f} (K={args.iw_samples}) |"
        )
        rows.append({"iwae": nll, "k": args.iw_samples})
    print(row, flush=True)  # first: a file error below must not lose the row
    os.makedirs(args.out, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-._" else "_" for c in flags.replace("--", ""))
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"flags": flags, "params": params, "row": row, "epochs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
