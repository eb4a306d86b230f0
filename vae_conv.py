"""A convolutional variational autoencoder (VAE, Kingma & Welling 2013) on MNIST or your images.

python vae_conv.py --epochs 20    # pictures, metrics and checkpoint in results/vae_conv/
python vae_conv.py --dataset folder --data-dir DIR    # the images under DIR, grey or colour
python vae_conv.py --help         # every flag; in a notebook: vae_conv.main(["--epochs", "2"])
"""

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import common  # plumbing only: data files, pictures, checkpoint files, device, progress, errors

# ---- Config: every setting that changes the math, with its default

SCRIPT = "vae_conv"
MODEL_FLAGS = ("shape", "channels", "hidden_dim", "latent_dim")  # VAE(**config) rebuilds it


def get_args(argv=()):
    # fmt: off
    p = common.parser(f"{SCRIPT}.py", __doc__.split("\n\n")[0])
    pos_int, pos_float = common.positive_int, common.positive_float
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=pos_int, default=32, help="channels of conv 1 (2x in conv 2)")
    g.add_argument("--hidden-dim", type=pos_int, default=256, help="width of each FC layer")
    g.add_argument("--latent-dim", type=pos_int, default=32, help="dim of z (2 adds manifold.png)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["mnist", "fashion", "folder"], default="mnist",
                   help="fashion: clothes; folder: your images, every one under --data-dir")
    g.add_argument("--data-dir", default="./data", help="holds MNIST/raw/, or your images")
    g.add_argument("--image-size", type=common.multiple_of_4, default=32,
                   help="side of a folder's images, a multiple of 4")
    g.add_argument("--binarize", choices=["none", "dynamic"], default="none",
                   help="dynamic: x ~ Bernoulli(pixel) afresh every batch, the test set once")
    g = p.add_argument_group("loss")
    g.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli",
                   help="p(x|z): Bernoulli on logits (BCE), or N(x_hat, 1) (MSE/2 + a constant)")
    g.add_argument("--beta", type=common.nonnegative_float, default=1.0,
                   help="weight of the KL (1: the ELBO); in L_K, of log p(z) - log q(z|x)")
    g.add_argument("--kl-warmup", type=common.nonnegative_int, default=0, metavar="EPOCHS",
                   help="the KL weight rises linearly from 0 to --beta over EPOCHS (0: off)")
    g.add_argument("--train-k", type=pos_int, default=2, metavar="K",
                   help="train on the K-sample importance-weighted bound L_K (1: the ELBO)")
    g.add_argument("--train-k-after", type=common.nonnegative_int, default=10, metavar="E",
                   help="train on the ELBO in epochs 1..E, on L_K after them (RESULTS.md)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=pos_int, default=20, help="passes over the training set")
    g.add_argument("--batch-size", type=pos_int, default=64,
                   help="images per Adam step (128: 1.3 nats worse after 5 epochs, RESULTS.md)")
    g.add_argument("--lr", type=pos_float, default=2e-3,
                   help="Adam's learning rate (1e-3: 1.3 nats worse after 5 epochs, RESULTS.md)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                   help="cosine: decays from --lr towards 0 over --epochs, set at each epoch")
    g.add_argument("--seed", type=common.seed, default=1, help="for weights, data order and noise")
    g = p.add_argument_group("evaluation")
    g.add_argument("--iw-samples", type=common.nonnegative_int, default=10, metavar="K",
                   help="K of the bound L_K on log p(x) at the end (0: off; 1000 for papers)")
    # fmt: on
    return common.parse_args(p, argv, SCRIPT)  # and --device --eval-only --generate --out --resume


# ---- Model


class VAE(nn.Module):
    """x (B, 1, 28, 28) -> 2 strided convs, FC -> (mu, logvar); z -> FC, 2 transposed convs."""

    def __init__(self, shape=(1, 28, 28), channels=32, hidden_dim=256, latent_dim=32):
        super().__init__()
        act = nn.SiLU  # x * sigmoid(x), smooth where ReLU has a kink: a better bound (RESULTS.md)
        (c, h, w), c1, c2 = shape, channels, 2 * channels
        inner = (c2, h // 4, w // 4)  # (64, 7, 7) for MNIST
        self.encoder = nn.Sequential(
            nn.Conv2d(c, c1, 4, stride=2, padding=1),  # (B, c1, 14, 14)
            act(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # (B, c2, 7, 7)
            act(),
            nn.Flatten(),  # (B, c2*49)
            nn.Linear(math.prod(inner), hidden_dim),
            act(),
            nn.Linear(hidden_dim, 2 * latent_dim),  # (B, 2D): mu and logvar side by side
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            act(),
            nn.Linear(hidden_dim, math.prod(inner)),
            act(),
            nn.Unflatten(1, inner),  # (B, c2, 7, 7)
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # (B, c1, 14, 14)
            act(),
            nn.ConvTranspose2d(c1, c, 4, stride=2, padding=1),  # (B, 1, 28, 28) logits
        )

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=1)  # mu and logvar, (B, D) each

    def decode(self, z):
        return self.decoder(z)  # logits of p(x|z), (B, 1, 28, 28)

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator)
        return self.decode(z), mu, logvar


# ---- The basic VAE: the terms of the ELBO, per image, in nats


def reparameterize(mu, logvar, generator=None):
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    # z = mu + sigma * eps, eps ~ N(0, I): differentiable in mu and sigma (K&W 2013, sec. 2.4)
    return mu + torch.exp(0.5 * logvar) * eps


def recon_nll(logits, x, likelihood):
    """-log p(x|z) summed over pixels: (B, 1, 28, 28) -> (B,)."""
    if likelihood == "bernoulli":
        # -log Bernoulli(x; sigmoid(l)) = softplus(l) - x * l, stable for any l (no log 0)
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        # -log N(x; x_hat, 1) = (x - x_hat)^2 / 2 + log(2 pi) / 2, x_hat = sigmoid(l)
        nll = 0.5 * (x - torch.sigmoid(logits)) ** 2 + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(1)


def kl_std_normal(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)): (..., D) -> (...)."""
    # -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)   (Kingma & Welling 2013, App. B)
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def neg_elbo(model, x, likelihood, beta=1.0):
    """Recon and KL per image (B,), and the loss: the -ELBO averaged over the batch."""
    logits, mu, logvar = model(x)
    recon = recon_nll(logits, x, likelihood)  # -log p(x|z), one z ~ q(z|x) per image
    kl = kl_std_normal(mu, logvar)
    # -ELBO = -E_q[log p(x|z)] + KL(q(z|x) || p(z))   (K&W 2013, eq. 10; beta: Higgins et al.)
    return recon, kl, (recon + beta * kl).mean()


# ---- Training and evaluation


def to_float(x_uint8, binarize="none"):
    """uint8 pixels -> [0, 1]; 'dynamic' draws x ~ Bernoulli(pixel) (a fresh sample each call)."""
    x = x_uint8.float().div_(255)
    return torch.bernoulli(x) if binarize == "dynamic" else x


def train_epoch(model, opt, x_train, args, epoch, progress=None):
    """Adam steps over the training set in a random order, the last incomplete batch dropped:
    per-image recon and KL and the loss of each batch, (batches, 3), left on the device."""
    model.train()
    opt.param_groups[0]["lr"] = learning_rate(epoch, args)  # the one group: every weight
    k = train_k(epoch, args)  # 1: the ELBO
    n_batches = len(x_train) // args.batch_size
    order = torch.randperm(len(x_train), device=x_train.device)[: n_batches * args.batch_size]
    stats = torch.zeros(n_batches, 3, device=x_train.device)
    for i, idx in enumerate(order.split(args.batch_size)):
        x = to_float(x_train[idx], args.binarize)  # (B, 1, 28, 28) in [0, 1]
        beta = kl_weight((epoch - 1) * n_batches + i, n_batches, args)
        if k == 1:
            recon, kl, loss = neg_elbo(model, x, args.likelihood, beta)
        else:
            recon, kl, loss = neg_iwae(model, x, args.likelihood, k, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats[i] = torch.stack([recon.mean(), kl.mean(), loss]).detach()
        if progress:  # a live line on a terminal
            progress.update(i + 1, loss)
    return stats


@torch.no_grad()
def evaluate(model, x_test, likelihood, batch_size=2000):
    """Test recon, KL, -ELBO per image (one z each, fixed noise), active units; the means (N, D)."""
    model.eval()
    g = torch.Generator(x_test.device).manual_seed(0)  # the same noise at every evaluation
    recon, kl, mus = 0.0, 0.0, []
    for xb in x_test.split(batch_size):
        x = to_float(xb)  # (B, 1, 28, 28); a binarized test set is fixed at load time
        logits, mu, logvar = model(x, generator=g)
        recon += recon_nll(logits, x, likelihood).sum()
        kl += kl_std_normal(mu, logvar).sum()
        mus.append(mu)
    recon, kl, mu = recon.item() / len(x_test), kl.item() / len(x_test), torch.cat(mus)
    return {"recon": recon, "kl": kl, "neg_elbo": recon + kl, "active_units": active_units(mu)}, mu


# ---- Beyond the basic VAE: the importance-weighted bound, schedules, the pictures' arithmetic


def log_normal(z, mu, logvar):
    """log N(z; mu, diag(exp(logvar))) summed over the last dim: (..., D) -> (...)."""
    # log N = -1/2 sum_j (log 2 pi + log sigma_j^2 + (z_j - mu_j)^2 / sigma_j^2)
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def log_weights(model, x, mu, logvar, eps, likelihood):
    """log p(x|z_k) and log p(z_k) - log q(z_k|x), each (K, B), for z_k = mu + sigma * eps_k."""
    k = len(eps)  # eps: (K, B, D)
    z = mu + torch.exp(0.5 * logvar) * eps  # z_k ~ q(z|x), (K, B, D)
    logits = model.decode(z.flatten(0, 1))  # (K*B, 1, 28, 28)
    log_px_z = -recon_nll(logits, x.expand(k, *x.shape).flatten(0, 1), likelihood).view(k, -1)
    zero = torch.zeros_like(z)
    return log_px_z, log_normal(z, zero, zero) - log_normal(z, mu, logvar)


def neg_iwae(model, x, likelihood, k, beta=1.0):
    """Recon (of z_1) and KL per image (B,), and the loss: -L_K averaged over the batch."""
    mu, logvar = model.encode(x)  # (B, D)
    eps = torch.randn(k, *mu.shape, device=mu.device, dtype=mu.dtype)  # (K, B, D)
    log_px_z, log_pz_qz = log_weights(model, x, mu, logvar, eps, likelihood)  # (K, B) each
    log_w = log_px_z + beta * log_pz_qz  # log w_k = log p(x|z_k) p(z_k) / q(z_k|x) at beta = 1
    # L_K = log 1/K sum_k w_k   (Burda et al. 2015, eq. 8)
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    return -log_px_z[0], kl_std_normal(mu, logvar), -bound.mean()


@torch.no_grad()
def iwae_nll(model, x_test, k, likelihood, max_decodes=512, progress=None):
    """-log p(x) per image <= -L_K, L_K = log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x)
    (Burda et al. 2015, eq. 8). At most `max_decodes` images and z per call, log sum_k w_k a
    running logsumexp over the calls: `max_decodes` sets speed and memory, not the number."""
    model.eval()
    g = torch.Generator(x_test.device).manual_seed(0)  # the same K, the same number
    batch = max(1, min(len(x_test), 2**16 // k))  # images whose noise is drawn together
    images = min(batch, max_decodes)  # images per call
    chunk = max(1, max_decodes // images)  # samples per call
    latent_dim = model.encode(to_float(x_test[:1]))[0].shape[1]
    total = 0.0
    for i, xb in enumerate(x_test.split(batch)):
        eps = torch.randn((k, len(xb), latent_dim), generator=g, device=xb.device)  # (K, B, D)
        for xp, ep in zip(xb.split(images), eps.split(images, dim=1)):
            x = to_float(xp)  # (b, 1, 28, 28)
            mu, logvar = model.encode(x)  # (b, D)
            lse = torch.full((len(x),), -math.inf, device=x.device)  # log sum_k w_k so far, (b,)
            for e in ep.split(chunk):  # (c, b, D)
                log_w = sum(log_weights(model, x, mu, logvar, e, likelihood))  # (c, b)
                lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
            total += (lse - math.log(k)).sum().item()  # sum over images of L_K
        if progress:  # a live line on a terminal
            progress.update(min((i + 1) * batch, len(x_test)))
    return -total / len(x_test)


def learning_rate(epoch, args):
    """Adam's rate in `epoch` (1-based): constant, or cosine from --lr towards 0 over the run."""
    if args.lr_schedule == "constant":
        return args.lr
    # lr_e = lr / 2 (1 + cos(pi (e - 1) / E))   (Loshchilov & Hutter 2017, eq. 5)
    return args.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))


def kl_weight(step, steps_per_epoch, args):
    """At step `step` (0-based): from 0 to --beta over --kl-warmup epochs (Bowman et al. 2016)."""
    warmup_steps = args.kl_warmup * steps_per_epoch
    return args.beta * min(1.0, step / warmup_steps) if warmup_steps else args.beta


def train_k(epoch, args):
    """K of the bound that `epoch` (1-based) trains on: 1 up to --train-k-after, then --train-k."""
    return args.train_k if epoch > args.train_k_after else 1


def active_units(mu):
    """Dimensions in use: u is active if Cov_x(E_q(z|x)[z_u]) > 0.01 (Burda et al. 2015, 5.2)."""
    return int((mu.var(0, correction=0) > 0.01).sum())


@torch.no_grad()
def grids(model, x, z):
    """The pictures of an epoch, (N, 1, 28, 28) in [0, 1] and a row length each: samples of the
    fixed z ~ N(0, I), test images above their reconstructions, walks between pairs of them."""
    model.eval()

    def mean(z):  # E[x|z] = sigmoid(logits) under either likelihood
        return torch.sigmoid(model.decode(z))

    mu, _ = model.encode(x)  # (2R, D), posterior means of 2R test images
    n, t = len(x) // 2, torch.linspace(0, 1, 10, device=x.device).view(1, 10, 1)
    walk = (1 - t) * mu[0::2, None] + t * mu[1::2, None]  # (R, 10, D): mu_a -> mu_b
    decoded = mean(walk.flatten(0, 1)).view(n, 10, *x.shape[1:])
    recon = mean(mu)
    pairs = torch.cat([x[0::2, None], decoded, x[1::2, None]], 1)  # (R, 12, 1, 28, 28)
    return {
        "samples.png": (mean(z), 8),
        "reconstructions.png": (torch.cat([x[:n], recon[:n], x[n:], recon[n:]]), n),
        "interpolation.png": (pairs.flatten(0, 1), 12),
    }


# ---- Main


def main(argv=()):
    """Train as the flags say (or only evaluate, or sample); returns the model and its metrics."""
    args = get_args(argv)
    device = common.get_device(args.device)
    ckpt = common.load_checkpoint(args, MODEL_FLAGS)  # None unless --resume/--eval-only/--generate
    data = None if args.generate else common.load_data(args, device)  # and args.shape: (C, H, W)
    torch.manual_seed(args.seed)
    model = VAE(**{k: getattr(args, k) for k in MODEL_FLAGS}).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    result = {"model": model, "metrics": [], "test": None, "iwae_nll": None, "exit_code": 0}
    if args.generate:
        z = torch.randn(args.generate, args.latent_dim, device=device)  # z ~ N(0, I)
        common.save_grid(torch.sigmoid(model.decode(z)).detach(), args.out, "generated.png")
        print(f"wrote {args.generate} samples to {args.out}/generated.png")
        return result
    (x_train, _), (x_test, y_test) = data["train"], data["test"]  # uint8 images, on the device

    def bound():  # images and z per call: the fastest on a CPU (RESULTS.md); 8 batches on a GPU
        decodes = 512 if device.type == "cpu" else 8 * args.batch_size
        bar = common.Progress(f"IWAE bound, K={args.iw_samples}", len(x_test))
        nll = iwae_nll(model, x_test, args.iw_samples, args.likelihood, decodes, bar)
        print(f"test  -log p(x) <= {nll:.2f} nats per image (IWAE bound, K={args.iw_samples})")
        return nll

    if args.eval_only:
        result["test"], _ = evaluate(model, x_test, args.likelihood)
        print(f"{args.checkpoint} (epoch {ckpt['epoch']}): test  {common.fmt(result['test'])}")
        result["iwae_nll"] = bound() if args.iw_samples else None
        return result

    model.to(memory_format=torch.channels_last)  # faster convolutions, the same math
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))
    z_fixed = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    x_shown = to_float(x_test[: min(16, len(x_test) // 2 * 2)])  # pairs of test images
    saver = common.Saver(args, MODEL_FLAGS, model, opt, ckpt)  # metrics, pictures, checkpoint
    rows = result["metrics"] = saver.rows  # one per epoch done, the checkpoint's too
    common.print_header(args, model, data)
    with common.stop_on_ctrl_c(saver, result):  # what the checkpoint holds, exit code 130
        for epoch in range(len(rows) + 1, args.epochs + 1):
            # each epoch its own noise: resuming needs no saved RNG state (a CPU keeps 32 bits)
            torch.manual_seed((args.seed * 1_000_003 + epoch) % 2**32)
            t0 = time.perf_counter()
            bar = common.Progress(f"epoch {epoch}/{args.epochs}", len(x_train) // args.batch_size)
            stats = train_epoch(model, opt, x_train, args, epoch, bar)
            common.check_finite(stats[:, 2], epoch, saver)  # waits for the device, once
            t1 = time.perf_counter()
            result["test"], mu = evaluate(model, x_test, args.likelihood)
            common.check_finite(result["test"]["neg_elbo"], epoch, saver)  # and the last step
            beta = kl_weight(epoch * len(stats) - 1, len(stats), args)  # at its last step
            seconds = (t1 - t0, time.perf_counter() - t1)
            saver.add_row(stats, result["test"], train_k(epoch, args), beta, seconds)
            saver.epoch(grids(model, x_shown, z_fixed.to(device)), mu, y_test)  # and its line
        if args.iw_samples:
            result["iwae_nll"] = bound()
            saver.checkpoint(final={"iwae_nll": result["iwae_nll"], "iw_samples": args.iw_samples})
    return result


if __name__ == "__main__":
    sys.exit(common.run(main, sys.argv[1:]))
