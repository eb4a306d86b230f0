"""A convolutional variational autoencoder (VAE) on MNIST.

    python vae_conv.py --epochs 20         # train; pictures and checkpoint in results/vae_conv/
    python vae_conv.py --help              # every flag

Kingma & Welling, "Auto-Encoding Variational Bayes" (2013), https://arxiv.org/abs/1312.6114
The encoder gives q(z|x) = N(mu, diag(sigma^2)), the decoder p(x|z); training maximises
the ELBO = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)), reported as -ELBO in nats per image.
"""

import math
import os
import time

import torch
from torch import nn

import common

SCRIPT = "vae_conv"
MODEL_FLAGS = ("channels", "hidden_dim", "latent_dim")  # what VAE(...) takes; stored in the checkpoint

# ----------------------------------------------------------------------------
# Config


def get_args(argv=None):
    p = common.make_parser(__doc__, SCRIPT, lr=1e-3)  # for this model 3e-3 is 5 nats worse, batch 64 with 2e-3 no better (benchmarks/RESULTS.md)
    g = p.add_argument_group("model")
    g.add_argument("--channels", type=common.positive_int, default=32, help="channels of the first conv layer (the second has twice as many)")
    g.add_argument("--hidden-dim", type=common.positive_int, default=256, help="width of the fully-connected layer on each side")
    g.add_argument("--latent-dim", type=common.positive_int, default=32, help="dimension of z (2 adds manifold.png)")
    return common.parse_args(p, argv, SCRIPT)


# ----------------------------------------------------------------------------
# Model


class VAE(nn.Module):
    """x (B, 1, 28, 28) -> 2 strided convs -> FC -> (mu, logvar); z -> FC -> 2 transposed convs -> logits."""

    def __init__(self, channels=32, hidden_dim=256, latent_dim=32):
        super().__init__()
        c1, c2 = channels, 2 * channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1),  # (B, c1, 14, 14)
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # (B, c2, 7, 7)
            nn.ReLU(),
            nn.Flatten(),  # (B, c2*49)
            nn.Linear(c2 * 7 * 7, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 2 * latent_dim),  # (B, 2D): mu and logvar side by side
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, c2 * 7 * 7),
            nn.ReLU(),
            nn.Unflatten(1, (c2, 7, 7)),  # (B, c2, 7, 7)
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # (B, c1, 14, 14)
            nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),  # (B, 1, 28, 28) logits
        )

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, D) each
        return mu, logvar

    def decode(self, z):
        return self.decoder(z)  # logits of p(x|z), (B, 1, 28, 28)

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator)
        return self.decode(z), mu, logvar


def reparameterize(mu, logvar, generator=None):
    # z = mu + sigma * eps, eps ~ N(0, I): z stays differentiable in mu and logvar (K&W 2013, sec. 2.4)
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


# ----------------------------------------------------------------------------
# Training and evaluation


def train_epoch(model, opt, x_train, args, epoch, stop, partial=None):
    """One pass of Adam steps on the -ELBO; returns (per-image metrics, None), or, when a
    signal stops it after a batch, (None, the state that --resume continues from)."""
    model.train()
    batches = common.epoch_order(len(x_train), args.batch_size, args.seed, epoch, x_train.device)
    beta = common.kl_weight(epoch, args.beta, args.kl_warmup)
    for group in opt.param_groups:
        group["lr"] = common.learning_rate(epoch, args.lr, args.epochs, args.lr_schedule)
    done, sums, seconds = (0, torch.zeros(3), 0.0) if partial is None else (partial["batch"], partial["sums"], partial["seconds"])
    sums = sums.to(x_train.device)  # recon, KL, -ELBO summed over images, kept on the device
    losses = torch.zeros(len(batches), device=x_train.device)
    progress = common.Progress(epoch, args.epochs, len(batches), args.batch_size)
    t0 = time.perf_counter() - seconds
    for i in range(done, len(batches)):
        x = common.to_float(x_train[batches[i]], args.binarize)  # (B, 1, 28, 28) in [0, 1]
        logits, mu, logvar = model(x)
        recon = common.recon_nll(logits, x, args.likelihood)  # -log p(x|z), (B,)
        kl = common.kl_std_normal(mu, logvar)  # KL(q(z|x) || N(0, I)), (B,)
        loss = (recon + beta * kl).mean()  # -ELBO per image (beta = 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += torch.stack([recon.sum(), kl.sum(), (recon + kl).sum()]).detach()
        losses[i] = loss.detach()
        common.check_finite(losses, i, epoch, args.lr)
        progress.update(i + 1, loss)
        if stop and i + 1 < len(batches):
            progress.close()
            return None, {"batch": i + 1, "sums": sums.cpu(), "seconds": time.perf_counter() - t0}
    progress.close()
    seconds = time.perf_counter() - t0
    n = sum(len(b) for b in batches)
    recon, kl, total = (sums / n).tolist()
    return {"recon": recon, "kl": kl, "loss": total, "images_per_s": n / seconds, "seconds": seconds}, None


@torch.no_grad()
def evaluate(model, x_test, args, batch_size=2000):
    """Test -ELBO, recon and KL per image, one z per image from fixed noise."""
    model.eval()
    g = common.eval_generator(x_test.device)
    sums = torch.zeros(3, device=x_test.device)
    for xb in x_test.split(batch_size):
        x = common.to_float(xb)  # (B, 1, 28, 28); a binarized test set is fixed at load time
        logits, mu, logvar = model(x, generator=g)
        recon = common.recon_nll(logits, x, args.likelihood)
        kl = common.kl_std_normal(mu, logvar)
        sums += torch.stack([recon.sum(), kl.sum(), (recon + kl).sum()])
    recon, kl, total = (sums / len(x_test)).tolist()
    return {"recon": recon, "kl": kl, "loss": total}


@torch.no_grad()
def iwae_nll(model, x_test, k, likelihood, batch_size=1000, max_images=8192):
    """-log p(x) per image, bounded with K importance samples (Burda et al. 2015, eq. 8):

        log p(x) >= log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x)

    Decodes at most `max_images` at once, so memory is bounded whatever K is.
    """
    model.eval()
    g = common.eval_generator(x_test.device)
    total = 0.0
    for xb in x_test.split(batch_size):
        x = common.to_float(xb)  # (B, 1, 28, 28)
        mu, logvar = model.encode(x)  # (B, D)
        log_w = []
        for c in common.chunk_sizes(k, max(1, max_images // len(x))):
            eps = torch.randn((c, *mu.shape), generator=g, device=mu.device)  # (c, B, D)
            z = mu + torch.exp(0.5 * logvar) * eps  # z_k ~ q(z|x)
            logits = model.decode(z.flatten(0, 1))  # (c*B, 1, 28, 28)
            log_px_z = -common.recon_nll(logits, x.expand(c, *x.shape).flatten(0, 1), likelihood).view(c, -1)
            log_pz = common.log_normal(z, torch.zeros_like(z), torch.zeros_like(z))  # log N(z; 0, I), (c, B)
            log_qz = common.log_normal(z, mu, logvar)  # log q(z|x), (c, B)
            log_w.append(log_px_z + log_pz - log_qz)
        log_w = torch.cat(log_w)  # (K, B) log importance weights
        total += (torch.logsumexp(log_w, dim=0) - math.log(k)).sum().item()  # log 1/K sum_k w_k
    return -total / len(x_test)


# ----------------------------------------------------------------------------
# Main


def main(argv=None):
    args = get_args(argv)
    device = common.get_device(args.device)
    common.prepare_out(args.out)
    ckpt = None
    if args.resume or args.eval_only or args.generate:
        ckpt = common.load_checkpoint(args, MODEL_FLAGS)
        common.adopt_checkpoint_args(args, ckpt)
    common.seed_everything(args.seed)
    model = VAE(**{k: getattr(args, k) for k in MODEL_FLAGS}).to(device)
    step_model = common.speed_up(model, args.compile, device)  # same math, faster: see common.py
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)  # fused: one kernel updates every tensor
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if args.generate:
        path = os.path.join(args.out, "generated.png")
        common.save_generated(model, args.generate, args.latent_dim, path)
        print(f"wrote {args.generate} samples to {path}")
        if not args.eval_only:
            return 0

    data = common.load_data(args.dataset, args.data_dir, device, args.binarize)
    x_train, x_test = data["train"][0], data["test"][0]
    if args.eval_only:
        test = evaluate(model, x_test, args)
        print(f"{args.checkpoint} (epoch {ckpt['epoch']}): test  {common.fmt(test)}")
        if args.iw_samples:
            nll = iwae_nll(model, x_test, args.iw_samples, args.likelihood)
            print(f"test  -log p(x) <= {nll:.2f} nats per image (IWAE bound, K={args.iw_samples})")
        return 0

    rows, start, partial = [], 1, None
    if args.resume:
        opt.load_state_dict(ckpt["optimizer"])
        rows, start, partial = ckpt["metrics"], ckpt["epoch"] + 1, ckpt["partial"]
        common.set_rng_state(ckpt["rng"])
        print(f"resuming from {args.checkpoint} at epoch {start}" + (f", batch {partial['batch'] + 1}" if partial else ""))
    z_fixed = common.fixed_z(64, args.latent_dim, args.seed, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{SCRIPT}: {n_params:,} parameters on {device}; {args.dataset} {len(x_train)} train / {len(x_test)} test images, "
          f"binarize {args.binarize}, {args.likelihood} likelihood; writing to {args.out}/")
    elapsed = rows[-1]["elapsed_s"] if rows else 0.0
    with common.StopRequest() as stop:
        for epoch in range(start, args.epochs + 1):
            t0 = time.perf_counter()
            train, partial = train_epoch(step_model, opt, x_train, args, epoch, stop, partial)
            if train is None:  # stopped by a signal: save where we are
                common.save_checkpoint(args.checkpoint, common.checkpoint_state(args, MODEL_FLAGS, model, opt, epoch - 1, rows, partial))
                print(f"stopped in epoch {epoch} after batch {partial['batch']}; saved {args.checkpoint}\n"
                      f"resume with: python {SCRIPT}.py --resume --out {args.out}")
                return stop.exit_code()
            test = evaluate(model, x_test, args)
            common.save_pictures(model, data, z_fixed, args.out, epoch)
            elapsed += time.perf_counter() - t0
            rows.append({"epoch": epoch, "lr": opt.param_groups[0]["lr"], "kl_weight": common.kl_weight(epoch, args.beta, args.kl_warmup),
                         **{f"train_{k}": train[k] for k in ("recon", "kl", "loss")},
                         **{f"test_{k}": test[k] for k in ("recon", "kl", "loss")},
                         "images_per_s": train["images_per_s"], "epoch_s": train["seconds"], "elapsed_s": elapsed})
            print(f"epoch {epoch:3d}/{args.epochs}  train {common.fmt(train)}  |  test {common.fmt(test)}  |  "
                  f"{train['images_per_s']:6.0f} img/s  {elapsed:6.1f} s")
            common.write_metrics(rows, args.out)
            common.save_loss_curves(rows, os.path.join(args.out, "loss.png"))
            common.save_checkpoint(args.checkpoint, common.checkpoint_state(args, MODEL_FLAGS, model, opt, epoch, rows))
            if stop:
                print(f"stopped after epoch {epoch}; resume with: python {SCRIPT}.py --resume --out {args.out}")
                return stop.exit_code()

        if args.iw_samples:
            nll = iwae_nll(model, x_test, args.iw_samples, args.likelihood)
            final = {"iwae_nll": nll, "iw_samples": args.iw_samples}
            print(f"test  -log p(x) <= {nll:.2f} nats per image (IWAE bound, K={args.iw_samples}); -ELBO {rows[-1]['test_loss']:.2f}")
            common.save_checkpoint(args.checkpoint, common.checkpoint_state(args, MODEL_FLAGS, model, opt, args.epochs, rows, final=final))
    return 0


if __name__ == "__main__":
    common.run(main)
