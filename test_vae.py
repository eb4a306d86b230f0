"""Tests for vae_mlp.py, vae_conv.py and common.py. CPU only, no network: pytest -q"""

import ast
import builtins
import csv
import gzip
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys

import pytest
import torch
from matplotlib.image import imread
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

import common
import vae_conv
import vae_mlp

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"vae_mlp": vae_mlp, "vae_conv": vae_conv}
N_TRAIN, N_TEST = 256, 64

# ----------------------------------------------------------------------------
# A tiny dataset in the real IDX format


def idx_bytes(t):
    """IDX (SN3 "Pascal Vincent") encoding of a uint8 tensor: magic, big-endian dims, data."""
    header = struct.pack(">I", 0x0800 + t.dim()) + b"".join(struct.pack(">I", d) for d in t.shape)
    return header + t.contiguous().numpy().tobytes()


def tiny_split(n, seed, size=28):
    """n images of a bright disc whose place depends on the label, with noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    rows, cols = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    cx, cy = 7 + 14 * (y % 5).float() / 4, 9 + 10 * (y // 5).float()
    disc = ((rows - cy[:, None, None]) ** 2 + (cols - cx[:, None, None]) ** 2 < 25).float()
    x = (disc * 200 + torch.rand(n, size, size, generator=g) * 55).to(torch.uint8)
    return x, y.to(torch.uint8)


def write_idx(folder, n_train=N_TRAIN, n_test=N_TEST, gz=False, size=28):
    os.makedirs(folder, exist_ok=True)
    for (images, labels), (n, seed) in zip(common.FILES.values(), ((n_train, 1), (n_test, 2))):
        x, y = tiny_split(n, seed, size)
        for name, t in ((images, x), (labels, y)):
            opener = gzip.open if gz else open
            with opener(os.path.join(folder, name + (".gz" if gz else "")), "wb") as f:
                f.write(idx_bytes(t))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_idx(root / "MNIST" / "raw")  # torchvision's layout
    return str(root)


def train(module, data_dir, out, *extra):
    argv = ["--data-dir", data_dir, "--out", str(out), "--epochs", "1", "--batch-size", "32"]
    result = module.main([*argv, "--iw-samples", "4", *extra])
    assert result["exit_code"] == 0
    return result


def read_metrics(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------
# Models and the terms of the ELBO, in each script


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("latent_dim", [1, 2, 20])
@pytest.mark.parametrize("batch", [1, 5])
def test_shapes(name, latent_dim, batch):
    model = SCRIPTS[name].VAE(latent_dim=latent_dim)
    logits, mu, logvar = model(torch.rand(batch, 1, 28, 28))
    assert logits.shape == (batch, 1, 28, 28)
    assert mu.shape == logvar.shape == (batch, latent_dim)
    assert model.decode(torch.randn(batch, latent_dim)).shape == (batch, 1, 28, 28)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_kl_closed_form_matches_torch_distributions(module):
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(module.kl_std_normal(mu, logvar), expected)
    assert torch.all(module.kl_std_normal(torch.zeros(3, 4), torch.zeros(3, 4)) == 0)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_bernoulli_reconstruction_is_bernoulli_log_prob(module):
    logits = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    x = (torch.rand(4, 1, 28, 28) > 0.5).float()
    expected = -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(module.recon_nll(logits, x, "bernoulli"), expected)
    # by hand, grey targets too: -[x log s(l) + (1 - x) log(1 - s(l))]
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    row = -(0.5 * math.log(s(-1.0)) + 0.5 * math.log(1 - s(-1.0))) - math.log(s(3.0))
    got = module.recon_nll(torch.tensor([[-1.0, 3.0]]), torch.tensor([[0.5, 1.0]]), "bernoulli")
    assert got.item() == pytest.approx(row)
    # stable where sigmoid-then-BCE gives log(0)
    big = module.recon_nll(torch.tensor([[200.0, -200.0]]), torch.tensor([[0.0, 1.0]]), "bernoulli")
    assert torch.isfinite(big).all()


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_gaussian_likelihood_is_normal_log_prob(module):
    g = torch.Generator().manual_seed(1)
    logits, x = torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, 1, 28, 28, generator=g)
    expected = -Normal(torch.sigmoid(logits), 1.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(module.recon_nll(logits, x, "gaussian"), expected)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_log_normal_matches_torch_distributions(module):
    z, mu, logvar = torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 6)
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(module.log_normal(z, mu, logvar), expected)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_reparameterize_draws_z_from_q(module):
    """z = mu + sigma * eps with sigma = exp(logvar / 2): its moments are q's."""
    mu, logvar = torch.tensor([[0.5, -2.0, 3.0]]), torch.tensor([[0.0, 2.0, -4.0]])
    torch.manual_seed(0)
    z = module.reparameterize(mu.expand(200_000, 3), logvar.expand(200_000, 3))
    q = Normal(mu[0], torch.exp(0.5 * logvar[0]))  # sd 1, e and e^-2
    torch.testing.assert_close(z.mean(0), q.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), q.stddev, atol=0, rtol=0.01)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    eps = torch.randn(mu.shape, generator=g())
    torch.testing.assert_close(module.reparameterize(mu, logvar, g()), q.mean + q.stddev * eps)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_dynamic_binarization_draws_each_pixel_with_its_grey_level(module):
    x_u8 = torch.tensor([0, 51, 128, 204, 255], dtype=torch.uint8).repeat(40_000, 1)
    torch.manual_seed(0)
    x = module.to_float(x_u8, "dynamic")  # x ~ Bernoulli(pixel / 255)
    assert set(x.unique().tolist()) == {0.0, 1.0}
    expected = torch.tensor([0, 51, 128, 204, 255]) / 255
    torch.testing.assert_close(x.mean(0), expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_evaluate_is_the_elbo_of_each_test_image_by_hand(module):
    torch.manual_seed(0)
    model = module.VAE(latent_dim=3).eval()
    x_u8 = (torch.rand(30, 1, 28, 28) * 255).to(torch.uint8)
    test, mu_all = module.evaluate(model, x_u8, module.get_args([]))
    x = x_u8.float() / 255
    with torch.no_grad():
        mu, logvar = model.encode(x)
        q = Normal(mu, torch.exp(0.5 * logvar))
        z = mu + q.stddev * torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
        p_x = Bernoulli(logits=model.decode(z), validate_args=False)  # grey x: cross-entropy
        recon = -p_x.log_prob(x).flatten(1).sum(1)
        kl = kl_divergence(q, Normal(0.0, 1.0)).sum(1)
    assert test["recon"] == pytest.approx(recon.mean().item(), rel=1e-5)
    assert test["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert test["loss"] == pytest.approx((recon + kl).mean().item(), rel=1e-5)
    torch.testing.assert_close(mu_all, mu)


@pytest.mark.parametrize("name", SCRIPTS)
def test_gradients_reach_encoder_through_sampling(name):
    model = SCRIPTS[name].VAE()
    x = torch.rand(4, 1, 28, 28)
    logits, mu, logvar = model(x)
    SCRIPTS[name].recon_nll(logits, x, "bernoulli").mean().backward()  # no KL: only through z
    first = model.encoder[1] if name == "vae_mlp" else model.encoder[0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_schedules(module):
    args = module.get_args(["--epochs", "4", "--lr", "1e-3", "--kl-warmup", "2", "--beta", "0.5"])
    cosine = [module.learning_rate(e, args) for e in (1, 2, 3, 4)]
    assert cosine == pytest.approx([1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    # the KL weight, per step over 2 epochs of 100 steps: from 0 at the first to 0.5 after
    weights = [module.kl_weight(step, 100, args) for step in (0, 100, 199, 200, 399)]
    assert weights == [0.0, 0.25, 0.5 * 199 / 200, 0.5, 0.5]
    flat = module.get_args(["--lr-schedule", "constant", "--lr", "2e-3"])
    assert [module.learning_rate(e, flat) for e in (1, 20)] == [2e-3, 2e-3]
    assert [module.kl_weight(step, 100, flat) for step in (0, 1999)] == [1.0, 1.0]


# ----------------------------------------------------------------------------
# The importance-weighted bound, evaluated and trained on


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_iwae_k1_is_single_sample_elbo(module):
    torch.manual_seed(0)
    model = module.VAE(latent_dim=3).eval()
    x_u8 = (torch.rand(10, 1, 28, 28) > 0.5).to(torch.uint8) * 255
    nll = module.iwae_nll(model, x_u8, 1, "bernoulli")
    # the same eps as iwae_nll draws: its generator, one (1, B, D) draw
    x = x_u8.float() / 255
    mu, logvar = model.encode(x)
    eps = torch.randn((1, *mu.shape), generator=torch.Generator().manual_seed(0))[0]
    z = mu + torch.exp(0.5 * logvar) * eps
    log_px_z = Bernoulli(logits=model.decode(z)).log_prob(x).flatten(1).sum(1)
    sigma = torch.exp(0.5 * logvar)
    elbo = log_px_z + Normal(0.0, 1.0).log_prob(z).sum(1) - Normal(mu, sigma).log_prob(z).sum(1)
    assert nll == pytest.approx(-elbo.mean().item(), rel=1e-5)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_iwae_bound_tightens_with_k_and_chunking_changes_nothing(module):
    torch.manual_seed(0)
    model = module.VAE(latent_dim=4).eval()
    x_u8 = (torch.rand(40, 1, 28, 28) > 0.7).to(torch.uint8) * 255
    nlls = [module.iwae_nll(model, x_u8, k, "bernoulli") for k in (1, 10, 100)]
    assert nlls[0] > nlls[1] > nlls[2]  # L_1 <= L_10 <= L_100 on average
    whole = module.iwae_nll(model, x_u8, 50, "bernoulli", max_decodes=40 * 50)
    for max_decodes in (40 * 7, 13, 1):  # 7 samples, a third of one, one z per decoder call
        chunked = module.iwae_nll(model, x_u8, 50, "bernoulli", max_decodes=max_decodes)
        assert chunked == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_train_k_1_is_the_elbo_and_k_is_the_iwae_bound(module):
    torch.manual_seed(0)
    model = module.VAE(latent_dim=3)
    x = (torch.rand(6, 1, 28, 28) > 0.5).float()
    torch.manual_seed(1)
    recon, kl, loss = module.neg_elbo(model, x, "bernoulli", beta=0.7)
    torch.manual_seed(1)  # the same eps by hand
    logits, mu, logvar = model(x)
    by_hand = -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    closed_kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(loss, (by_hand + 0.7 * closed_kl).mean())
    torch.testing.assert_close(recon, by_hand)

    torch.manual_seed(2)
    recon, kl, loss = module.neg_iwae(model, x, "bernoulli", 5, beta=0.25)
    torch.manual_seed(2)
    mu, logvar = model.encode(x)
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * torch.randn(5, *mu.shape)  # (K, B, D)
    log_px_z = Bernoulli(logits=model.decode(z.flatten(0, 1))).log_prob(x.repeat(5, 1, 1, 1))
    log_px_z = log_px_z.flatten(1).sum(1).view(5, -1)
    log_pz_qz = (Normal(0.0, 1.0).log_prob(z) - Normal(mu, sigma).log_prob(z)).sum(-1)
    log_w = log_px_z + 0.25 * log_pz_qz  # beta on the prior's part of each weight, not on p(x|z)
    l_k = torch.logsumexp(log_w, 0) - math.log(5)
    torch.testing.assert_close(loss, -l_k.mean())
    torch.testing.assert_close(recon, -log_px_z[0])
    assert loss.item() < module.neg_elbo(model, x, "bernoulli")[2].item() + 50  # same scale
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


class HandMade(nn.Module):
    """A VAE with a 1-D latent whose log p(x) a sum over a grid of z gives: logits a * z + b,
    and q(z|x) = N(m, v) whatever x."""

    def __init__(self, a, b, m, v):
        super().__init__()
        self.a, self.b, self.m, self.logvar = a, b, torch.tensor(m), torch.tensor(v).log()

    def encode(self, x):
        return self.m.expand(len(x), 1), self.logvar.expand(len(x), 1)

    def decode(self, z):
        return (z * self.a + self.b).view(-1, 1, 28, 28)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_iwae_bound_of_a_model_whose_log_px_is_known(module):
    """log p(x) by brute force, log sum_z p(x|z) p(z) dz over 40,001 z: L_K (with its -log K)
    reaches it, and L_1, with q four times as broad as the posterior, is below it by
    KL(q || posterior) = (4 - 1 - log 4) / 2 = 0.807 nats."""
    g = torch.Generator().manual_seed(0)
    a, b = 0.3 * torch.randn(784, generator=g), torch.randn(784, generator=g)
    x = (torch.rand(784, generator=g) < torch.sigmoid(b + 0.5 * a)).float()  # drawn at z = 0.5
    z = torch.linspace(-10, 10, 40_001, dtype=torch.float64)
    log_px_z = Bernoulli(logits=z[:, None] * a.double() + b.double()).log_prob(x.double()).sum(1)
    log_joint = log_px_z + Normal(0.0, 1.0).log_prob(z)
    log_px = (torch.logsumexp(log_joint, 0) + math.log(z[1] - z[0])).item()
    post = torch.softmax(log_joint, 0)  # the exact posterior on the grid
    m = (post * z).sum().item()
    v = (post * (z - m) ** 2).sum().item()
    x_u8 = (x.view(1, 1, 28, 28) * 255).to(torch.uint8).repeat(256, 1, 1, 1)
    broad = HandMade(a, b, m, 4 * v)
    assert module.iwae_nll(broad, x_u8, 1000, "bernoulli") == pytest.approx(-log_px, abs=0.02)
    gap = module.iwae_nll(broad, x_u8, 1, "bernoulli") + log_px
    assert gap == pytest.approx((4 - 1 - math.log(4)) / 2, abs=0.4)
    # a decoder that ignores z and q = p(z): every weight is p(x), so L_K = log p(x) for any K
    flat = HandMade(torch.zeros(784), b, 0.0, 1.0)
    log_px = Bernoulli(logits=b).log_prob(x).sum().item()
    for k in (1, 7, 100):
        assert module.iwae_nll(flat, x_u8[:8], k, "bernoulli") == pytest.approx(-log_px, rel=1e-6)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_train_k_epochs_counts_from_the_end(module):
    def ks(*flags):
        args = module.get_args(["--epochs", "5", "--train-k", "4", *flags])
        return [module.train_k(epoch, args) for epoch in range(1, 6)]

    assert ks("--train-k-epochs", "2") == [1, 1, 1, 4, 4]  # the ELBO, then L_4
    assert ks("--train-k-epochs", "0") == ks("--train-k-epochs", "9") == [4] * 5


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_train_k_epochs_half_is_the_last_half_of_the_run(module):
    def ks(epochs, *flags):
        args = module.get_args(["--epochs", str(epochs), "--train-k", "2", *flags])
        return [module.train_k(epoch, args) for epoch in range(1, epochs + 1)]

    assert ks(20, "--train-k-epochs", "half") == ks(20, "--train-k-epochs", "10")
    assert ks(20, "--train-k-epochs", "half") == [1] * 10 + [2] * 10
    assert ks(5, "--train-k-epochs", "half") == [1, 1, 1, 2, 2]  # a short run: mostly the ELBO
    assert ks(3, "--train-k-epochs", "half") == [1, 1, 2]
    assert ks(1, "--train-k-epochs", "half") == [1]
    assert ks(5, "--train-k-epochs", "4") == [1, 2, 2, 2, 2]  # typed: as documented


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_train_k_epochs_auto_is_every_epoch_after_the_10th(module):
    def ks(epochs):
        flags = ["--train-k", "2", "--train-k-epochs", "auto"]
        args = module.get_args(["--epochs", str(epochs), *flags])
        return [module.train_k(epoch, args) for epoch in range(1, epochs + 1)]

    assert ks(20) == [1] * 10 + [2] * 10  # the same 20-epoch run as "half" and "10"
    assert ks(30) == [1] * 10 + [2] * 20
    assert ks(11) == [1] * 10 + [2]
    assert ks(10) == [1] * 10
    assert ks(5) == [1] * 5  # a short run: the ELBO alone
    assert ks(1) == [1]
    for epochs in (3, 5, 10, 15, 20):  # an epoch's bound is not the run's length's: so a
        assert ks(epochs) == ks(30)[:epochs]  # resumed longer run never goes back to the ELBO


def test_the_conv_default_is_the_run_the_results_table_measured():
    """The Results table's conv rows trained on the ELBO for 10 epochs, then on L_2 for 10
    (--train-k 2 --train-k-epochs 10 at 6279afb): the default 20-epoch run still does."""
    args = vae_conv.get_args([])
    assert (args.epochs, args.train_k, args.train_k_epochs) == (20, 2, "auto")
    assert [vae_conv.train_k(epoch, args) for epoch in range(1, 21)] == [1] * 10 + [2] * 10
    folder = os.path.join("results", "vae_conv")  # the same experiment's folder as before
    assert vae_conv.get_args(["--train-k-epochs", "auto"]).out == args.out == folder


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_train_k_epochs_trains_on_the_elbo_first_then_on_l_k(module, data_dir, tmp_path):
    """Up to the last --train-k-epochs epochs the run is the ELBO-trained one, step for step."""
    flags = ("--epochs", "3", "--latent-dim", "4", "--train-k")
    elbo = train(module, data_dir, tmp_path / "elbo", *flags, "1")["metrics"]
    late = train(module, data_dir, tmp_path / "late", *flags, "3", "--train-k-epochs", "1")
    late = late["metrics"]
    assert [row["train_loss"] for row in late[:2]] == [row["train_loss"] for row in elbo[:2]]
    assert late[2]["train_loss"] != elbo[2]["train_loss"]


def test_train_k_runs_end_to_end(data_dir, tmp_path):
    result = train(vae_conv, data_dir, tmp_path, "--train-k", "3", "--latent-dim", "4")
    row = result["metrics"][0]
    assert all(math.isfinite(row[k]) for k in ("train_loss", "test_loss"))
    assert load(tmp_path / "checkpoint.pt")["args"]["train_k"] == 3


# ----------------------------------------------------------------------------
# Data


def test_loads_torchvision_layout_and_flat_gz_folder(data_dir, tmp_path):
    from torchvision.datasets.mnist import read_image_file

    args = vae_mlp.get_args(["--data-dir", data_dir])
    a = common.load_data(args, "cpu")
    write_idx(tmp_path / "flat", gz=True)  # like Debian's /usr/share/datasets/fashion-mnist/
    b = common.load_data(vae_mlp.get_args(["--data-dir", str(tmp_path / "flat")]), "cpu")
    x, y = tiny_split(N_TRAIN, 1)
    assert a["train"][0].shape == (N_TRAIN, 1, 28, 28) and a["train"][0].dtype == torch.uint8
    assert torch.equal(a["train"][0][:, 0], x) and torch.equal(a["train"][1], y.long())
    path = os.path.join(data_dir, "MNIST", "raw", "train-images-idx3-ubyte")
    assert torch.equal(a["train"][0][:, 0], read_image_file(path))  # as torchvision reads it
    for split in ("train", "test"):
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])


def test_dynamic_binarization(data_dir):
    args = vae_mlp.get_args(["--data-dir", data_dir, "--binarize", "dynamic"])
    d1, d2 = common.load_data(args, "cpu"), common.load_data(args, "cpu")
    assert torch.equal(d1["test"][0], d2["test"][0])  # the binarized test set is fixed
    assert set(d1["test"][0].unique().tolist()) <= {0, 255}
    x_u8 = d1["train"][0][:64]
    a, b = vae_mlp.to_float(x_u8, "dynamic"), vae_mlp.to_float(x_u8, "dynamic")
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, b)  # a fresh sample every batch
    assert torch.equal(vae_mlp.to_float(x_u8), x_u8.float() / 255)


# ----------------------------------------------------------------------------
# End to end: each script's main on the tiny dataset, as from a notebook


def grid_size(n, nrow, padding=2, size=28):
    """(height, width) of torchvision's make_grid for n images of `size`."""
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    return rows * (size + padding) + padding, cols * (size + padding) + padding


@pytest.mark.parametrize("name", SCRIPTS)
def test_end_to_end(name, data_dir, tmp_path, monkeypatch):
    module = SCRIPTS[name]
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])  # a notebook
    result = train(module, data_dir, tmp_path, "--latent-dim", "2", "--epochs", "2")
    expected = {
        "samples.png": grid_size(64, 8),
        "reconstructions.png": grid_size(32, 8),
        "interpolation.png": grid_size(8 * 12, 12),
        "traversal.png": (184, 612),  # 2 rows (the latent's 2 dimensions) of 11
        "manifold.png": (940, 990),  # 20 x 20, labelled
        "latent.png": (500, 600),
        "loss.png": (400, 1000),
    }
    for png, (h, w) in expected.items():
        assert imread(tmp_path / png).shape[:2] == (h, w), png
    assert gif_frames(tmp_path / "samples.gif") == [grid_size(64, 8)] * 2  # one per epoch
    assert not [n for n in os.listdir(tmp_path) if n.startswith("samples_epoch")]
    assert oct(os.stat(tmp_path / "checkpoint.pt").st_mode & 0o777) == oct(0o666 & ~umask())
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and set(rows[0]) == set(common.METRIC_FIELDS)
    assert all(math.isfinite(float(v)) for row in rows for v in row.values())
    t = rows[-1]
    assert float(t["test_loss"]) == pytest.approx(float(t["test_recon"]) + float(t["test_kl"]))
    assert [r["epoch"] for r in result["metrics"]] == [1, 2]
    assert result["iwae_nll"] == pytest.approx(
        load(tmp_path / "checkpoint.pt")["final"]["iwae_nll"]
    )

    ckpt = load(tmp_path / "checkpoint.pt")  # tensors and plain values only
    assert ckpt["script"] == name and ckpt["epoch"] == 2 and ckpt["config"]["latent_dim"] == 2
    rebuilt = module.VAE(**ckpt["config"])
    rebuilt.load_state_dict(ckpt["model"])
    z = torch.randn(5, 2)
    torch.testing.assert_close(rebuilt.decode(z), result["model"].decode(z), rtol=0, atol=0)
    args = module.get_args(["--data-dir", data_dir])  # the same test numbers as training printed
    x_test = common.load_data(args, "cpu")["test"][0]
    test, mu = module.evaluate(rebuilt, x_test, args)
    assert test["loss"] == pytest.approx(float(t["test_loss"]), rel=1e-5)
    assert mu.shape == (N_TEST, 2)


def gif_frames(path):
    """The (height, width) of each frame of a GIF."""
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        return [f.size[::-1] for f in ImageSequence.Iterator(gif)]


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("n, nrow, padding", [(64, 8, 2), (10, None, 2), (7, 12, 2), (9, 3, 0)])
def test_grids_are_laid_out_as_torchvision_does(n, nrow, padding, tmp_path):
    from torchvision.utils import save_image

    images = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
    common.save_grid(images, str(tmp_path), "ours.png", nrow, padding)
    save_image(
        images, tmp_path / "theirs.png", nrow=nrow or math.ceil(math.sqrt(n)), padding=padding
    )
    ours, theirs = imread(tmp_path / "ours.png"), imread(tmp_path / "theirs.png")
    assert ours.shape == theirs.shape[:2]
    assert (ours == theirs[..., 0]).all()


def test_figures_cost_under_two_percent_until_the_last_epoch(data_dir, tmp_path):
    train(vae_mlp, data_dir, tmp_path, "--epochs", "2", "--iw-samples", "0")
    figures = ("latent.png", "loss.png", "traversal.png")
    drawn = {p: os.stat(tmp_path / p).st_mtime_ns for p in figures}
    samples = os.stat(tmp_path / "metrics.csv").st_mtime_ns
    assert all(t >= samples for t in drawn.values())  # drawn at the last epoch
    assert not (tmp_path / "manifold.png").exists()  # latent 20: no manifold
    assert load(tmp_path / "checkpoint.pt")["final"] is None  # --iw-samples 0


def test_training_lowers_the_loss(data_dir, tmp_path):
    train(vae_mlp, data_dir, tmp_path, "--epochs", "3", "--iw-samples", "0")
    losses = [float(r["test_loss"]) for r in read_metrics(tmp_path)]
    assert losses[-1] < losses[0]


def test_gaussian_warmup_and_schedules_run(data_dir, tmp_path, capsys):
    argv = ["--likelihood", "gaussian", "--kl-warmup", "2", "--epochs", "3", "--lr", "0.002"]
    train(vae_mlp, data_dir, tmp_path, *argv, "--binarize", "dynamic")
    rows = read_metrics(tmp_path)  # the weight at the last of each epoch's 8 steps
    assert [float(r["kl_weight"]) for r in rows] == [7 / 16, 15 / 16, 1.0]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.002, 0.0015, 0.0005])
    assert float(rows[-1]["test_recon"]) > 784 * 0.5 * math.log(2 * math.pi)  # the constant
    assert "warning" not in capsys.readouterr().err
    train(vae_mlp, data_dir, tmp_path / "short", "--kl-warmup", "5", "--iw-samples", "0")
    err = capsys.readouterr().err
    assert "--kl-warmup 5 is not shorter than --epochs 1" in err


def test_eval_only_and_generate(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path)
    capsys.readouterr()
    argv = ["--out", str(tmp_path), "--data-dir", data_dir]
    result = vae_mlp.main([*argv, "--eval-only", "--iw-samples", "4"])
    printed = capsys.readouterr().out
    assert "-ELBO" in printed and "IWAE" in printed and math.isfinite(result["iwae_nll"])
    assert vae_mlp.main(["--out", str(tmp_path), "--generate", "10"])["exit_code"] == 0
    assert imread(tmp_path / "generated.png").shape[:2] == grid_size(10, 4)


@pytest.mark.parametrize("n_test", [2, 7])
def test_small_and_odd_test_sets_work(n_test, tmp_path):
    write_idx(tmp_path / "data", n_test=n_test)
    train(vae_mlp, str(tmp_path / "data"), tmp_path / "out", "--iw-samples", "2")
    pairs = n_test // 2
    got = imread(tmp_path / "out" / "interpolation.png").shape[:2]
    assert got == grid_size(pairs * 12, 12)


# ----------------------------------------------------------------------------
# Fast paths compute what the plain path computes


def loss_and_grads(module, model, x, eps_seed=0):
    logits, mu, logvar = model(x, generator=torch.Generator().manual_seed(eps_seed))
    loss = (module.recon_nll(logits, x, "bernoulli") + module.kl_std_normal(mu, logvar)).mean()
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("name", SCRIPTS)
def test_channels_last_gives_the_same_loss_and_gradients(name):
    module = SCRIPTS[name]
    torch.manual_seed(0)
    plain, fast = module.VAE(), module.VAE()
    fast.load_state_dict(plain.state_dict())
    common.speed_up(fast, module.get_args([]), 16)
    if name == "vae_conv":
        assert fast.encoder[2].weight.is_contiguous(memory_format=torch.channels_last)
        assert not plain.encoder[2].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(16, 1, 28, 28)
    (l1, g1), (l2, g2) = loss_and_grads(module, plain, x), loss_and_grads(module, fast, x)
    assert torch.allclose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_adam_takes_the_same_steps():
    torch.manual_seed(0)
    models = [vae_conv.VAE(latent_dim=4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.Adam(models[0].parameters(), lr=1e-3),
            torch.optim.Adam(models[1].parameters(), lr=1e-3, fused=True)]  # fmt: skip
    x = torch.rand(8, 1, 28, 28)
    for step in range(3):
        for model, opt in zip(models, opts):
            _, grads = loss_and_grads(vae_conv, model, x, step)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        # Adam moves every weight by about lr = 1e-3 per step; the two differ by rounding only
        assert torch.allclose(a, b, rtol=0, atol=3e-5)


def test_compiled_model_gives_the_same_loss_for_the_same_noise():
    """--compile on the CPU: the same loss and gradients for the same eps (not bit-identical
    runs: fused kernels round differently), and the noise is still drawn in eager code."""
    torch.manual_seed(0)
    plain = vae_mlp.VAE(hidden_dim=64, latent_dim=4)
    compiled = vae_mlp.VAE(hidden_dim=64, latent_dim=4)
    compiled.load_state_dict(plain.state_dict())
    common.speed_up(compiled, vae_mlp.get_args(["--compile"]), 16)
    x = torch.rand(16, 1, 28, 28)
    (l1, g1), (l2, g2) = loss_and_grads(vae_mlp, plain, x), loss_and_grads(vae_mlp, compiled, x)
    assert torch.allclose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert set(compiled.state_dict()) == set(plain.state_dict())  # checkpoints stay the same


# ----------------------------------------------------------------------------
# Interrupt and resume, at epoch granularity


def final_numbers(out):
    return [(r["epoch"], r["train_loss"], r["test_loss"], r["test_kl"]) for r in read_metrics(out)]


RESUMABLE = ["--epochs", "3", "--batch-size", "16", "--binarize", "dynamic", "--iw-samples", "4"]
RESUMABLE += ["--train-k", "2", "--train-k-epochs", "1"]  # epoch 3 on L_2: resumes cross the switch


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert vae_mlp.main(["--data-dir", data_dir, "--out", str(out), *RESUMABLE])["exit_code"] == 0
    return out


def test_sigint_in_epoch_2_then_resume_matches(data_dir, uninterrupted, tmp_path, monkeypatch):
    """A real SIGINT in epoch 2: exit 130 and epoch 1 kept; --resume ends where the
    uninterrupted run ends, IWAE bound included."""
    evaluate, calls = vae_mlp.evaluate, []

    def interrupt_in_epoch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*a, **kw)

    monkeypatch.setattr(vae_mlp, "evaluate", interrupt_in_epoch_2)
    argv = ["--data-dir", data_dir, "--out", str(tmp_path)]
    result = vae_mlp.main([*argv, *RESUMABLE])
    assert result["exit_code"] == 130
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    # main returns what the checkpoint holds, not the half-trained epoch 2
    assert [r["epoch"] for r in result["metrics"]] == [1]
    assert result["test"]["loss"] == ckpt["metrics"][0]["test_loss"]
    for name, value in result["model"].state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name
    monkeypatch.undo()
    assert len(gif_frames(tmp_path / "samples.gif")) == 1
    assert vae_mlp.main([*argv, "--resume"])["exit_code"] == 0
    assert final_numbers(tmp_path) == final_numbers(uninterrupted)
    iwae = [load(o / "checkpoint.pt")["final"]["iwae_nll"] for o in (tmp_path, uninterrupted)]
    assert iwae[0] == iwae[1]
    assert gif_pixels(tmp_path / "samples.gif") == gif_pixels(uninterrupted / "samples.gif")


def test_interrupted_in_epoch_1_returns_no_model(data_dir, tmp_path, monkeypatch, capsys):
    def interrupt(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(vae_mlp, "evaluate", interrupt)
    result = vae_mlp.main(["--data-dir", data_dir, "--out", str(tmp_path), *RESUMABLE])
    assert result["exit_code"] == 130 and result["metrics"] == []
    assert result["model"] is None and result["test"] is None
    assert "stopped in epoch 1; nothing was saved" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals to another process")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_training_process_then_resume(sig, code, data_dir, uninterrupted, tmp_path):
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), *RESUMABLE]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "vae_mlp.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("epoch   1/3"):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "holds epoch 1; resume with: python vae_mlp.py --resume --out" in err
    assert (
        vae_mlp.main(["--out", str(tmp_path), "--data-dir", data_dir, "--resume"])["exit_code"] == 0
    )
    assert final_numbers(tmp_path) == final_numbers(uninterrupted)


def test_the_command_prints_every_line_and_exits_with_mains_code(data_dir, tmp_path):
    """`python vae_mlp.py` ends through common.exit_fast: the objects alive are frozen (no
    garbage collection at exit), yet an atexit handler still runs, what it printed into a file
    (which Python buffers) is all there, and the exit code is main's."""
    script = [sys.executable, os.path.join(HERE, "vae_mlp.py"), "--data-dir", data_dir]
    argv = [*script[1:], "--out", str(tmp_path / "run"), "--epochs", "1", "--iw-samples", "4"]
    at_exit = "lambda: print('at exit, frozen:', gc.get_freeze_count() > 0)"
    wrapper = (  # `python vae_mlp.py ARGV` with an atexit handler, as a profiler would add one
        f"import atexit, gc, runpy, sys; atexit.register({at_exit}); sys.argv = {argv!r}; "
        f"runpy.run_path({argv[0]!r}, run_name='__main__')"
    )
    with open(tmp_path / "stdout.txt", "w") as f:
        done = subprocess.run([sys.executable, "-c", wrapper], stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "stdout.txt").read_text().splitlines()
    assert lines[0].startswith("vae_mlp: ") and lines[1].startswith("epoch   1/1")
    assert lines[-2].startswith("test  -log p(x) <=") and lines[-2].endswith("(IWAE bound, K=4)")
    assert lines[-1] == "at exit, frozen: True"
    missing = [*script[:2], "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x")]
    done = subprocess.run(missing, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_ctrl_c_in_the_final_bound_stops_at_once(data_dir, tmp_path, monkeypatch, capsys):
    log_weights, calls = vae_mlp.log_weights, []

    def interrupt(*a, **kw):  # only the bound calls it when --train-k is 1
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return log_weights(*a, **kw)

    monkeypatch.setattr(vae_mlp, "log_weights", interrupt)
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "1", "--iw-samples", "500"]
    assert vae_mlp.main(argv)["exit_code"] == 130
    assert len(calls) == 1  # stopped in the first decoder call of the bound
    err = capsys.readouterr().err
    assert "stopped in the IWAE bound" in err and "--eval-only" in err
    assert load(tmp_path / "checkpoint.pt")["epoch"] == 1  # the trained model is kept


def test_nan_loss_stops_with_epoch_batch_and_keeps_checkpoint(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--resume", "--epochs", "20"]
    code, err = exit_of(vae_mlp.main, [*argv, "--lr", "1e6"], capsys)
    assert code == 1 and "lower --lr" in err
    assert err.count("\n") == 1 and "at epoch 2, batch" in err  # the first bad one
    assert f"{tmp_path / 'checkpoint.pt'} keeps epoch 1;" in err  # what is on disk
    ckpt = load(tmp_path / "checkpoint.pt")  # the last good one
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_loss_in_epoch_1_says_nothing_was_saved(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path / "old", "--iw-samples", "0")  # an older run is there
    argv = ["--data-dir", data_dir, "--out", str(tmp_path / "old"), "--lr", "1e30"]
    code, err = exit_of(vae_mlp.main, argv, capsys)
    assert code == 1 and "at epoch 1, batch" in err and "nothing was saved" in err
    assert "keeps" not in err and not (tmp_path / "old" / "checkpoint.pt").exists()


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="no folder fsync (Windows)")
def test_a_signal_while_the_checkpoint_is_made_durable_names_the_epoch_on_disk(
    data_dir, tmp_path, monkeypatch, capsys
):
    """A signal during the folder's fsync, after the rename: the file holds epoch 2 already,
    and so do the message and what main returns."""
    fsync, folders = os.fsync, []

    def fsync_then_signal(fd):
        fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # a durable write's last step
            folders.append(fd)
            if len(folders) == 2:  # epoch 2's checkpoint
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "fsync", fsync_then_signal)
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "3", "--iw-samples", "0"]
    result = vae_mlp.main(argv)
    assert result["exit_code"] == 130
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and "holds epoch 2; resume with" in capsys.readouterr().err
    assert [r["epoch"] for r in result["metrics"]] == [1, 2]
    assert result["test"]["loss"] == ckpt["metrics"][1]["test_loss"]
    for name, value in result["model"].state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name


def test_a_diverged_last_step_is_caught_before_anything_is_drawn_or_saved(
    data_dir, tmp_path, capsys
):
    """One step an epoch: the losses computed before each step never see what it did."""
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--iw-samples", "0"]
    argv += ["--batch-size", str(N_TRAIN)]
    code, err = exit_of(vae_mlp.main, [*argv, "--lr", "1e30"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "after epoch 1's last step: training diverged; nothing was saved" in err
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "latent.png").exists()
    assert vae_mlp.main([*argv, "--epochs", "1"])["exit_code"] == 0
    code, err = exit_of(vae_mlp.main, [*argv, "--resume", "--epochs", "3", "--lr", "1e30"], capsys)
    assert code == 1 and f"after epoch 2's last step: training diverged; {tmp_path}" in err
    assert "keeps epoch 1;" in err
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert vae_mlp.main([*argv, "--resume", "--epochs", "2", "--lr", "1e-3"])["exit_code"] == 0


def test_a_longer_resumed_run_trains_as_the_longer_run(data_dir, tmp_path, capsys):
    """README: after --epochs 2, --resume --epochs 6 trains epochs 3-6 as a new 6-epoch run
    trains them: its rate, KL weight and L_K epochs; and says so in one line."""
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--iw-samples", "0", "--train-k", "2"]
    argv += ["--train-k-epochs", "half", "--kl-warmup", "3", "--batch-size", "64"]
    assert vae_mlp.main([*argv, "--epochs", "2"])["exit_code"] == 0
    capsys.readouterr()
    rows = vae_mlp.main([*argv, "--resume", "--epochs", "6"])["metrics"]
    notes = [line for line in capsys.readouterr().out.splitlines() if "--epochs 6" in line]
    assert notes == [
        "note: --epochs 6 where the checkpoint's run had 2: epochs 3-6 train as those of a new "
        "6-epoch run (its rate, KL weight and L_K epochs)"
    ]
    six = vae_mlp.get_args([*argv, "--epochs", "6"])
    two = vae_mlp.get_args([*argv, "--epochs", "2"])
    runs = [(two, 1), (two, 2), *((six, epoch) for epoch in range(3, 7))]
    assert [r["train_k"] for r in rows] == [vae_mlp.train_k(e, a) for a, e in runs]
    assert [r["train_k"] for r in rows] == [1, 2, 1, 2, 2, 2]  # half of 2, then of 6
    assert [r["lr"] for r in rows] == pytest.approx([vae_mlp.learning_rate(e, a) for a, e in runs])
    kl_weights = [vae_mlp.kl_weight(e * 4 - 1, 4, a) for a, e in runs]  # at each last step
    assert [r["kl_weight"] for r in rows] == pytest.approx(kl_weights)
    assert [int(r["train_k"]) for r in read_metrics(tmp_path)] == [1, 2, 1, 2, 2, 2]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    common.atomic_write(path, lambda f: torch.save({"epoch": 1}, f), durable=True)

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(common.UserError, match="cannot write .*checkpoint.pt: No space left"):
        common.atomic_write(path, lambda f: torch.save({"epoch": 2}, f), durable=True)
    monkeypatch.undo()
    assert load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


# ----------------------------------------------------------------------------
# Bad input: one line on stderr naming the file or flag, exit 2 for flags and 1 otherwise,
# never a traceback, never a half-written file


def exit_of(main, argv, capsys):
    """(exit code, stderr) of a script run as from the shell, in this process."""
    code = common.run(main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def truncate(path, size):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:size])


class RunsCode:
    def __reduce__(self):  # unpickling this runs os.system
        return (os.system, (f"touch {RunsCode.mark}",))


def bad_cases(tmp):
    """{case: (script args, what stderr must name, exit code, setup, limit_bytes)}."""
    good = os.path.join(tmp, "good")
    mlp = os.path.join(tmp, "mlp")  # a trained vae_mlp run

    def data(name, edit, **kw):
        folder = os.path.join(tmp, name)
        write_idx(folder, gz=name.startswith("gz"), **kw)
        return folder, edit(folder) if edit else None

    def run_in(folder, *extra):
        return ["--data-dir", folder, "--out", os.path.join(folder, "out"), *extra]

    cases = {}

    def case(name, argv, names, code=1, limit=None):
        cases[name] = (argv, names, code, limit)

    f = lambda d, n: os.path.join(d, n)  # noqa: E731
    d, _ = data("gz-truncated", lambda d: truncate(f(d, "train-images-idx3-ubyte.gz"), 5000))
    case("truncated .gz", run_in(d), f(d, "train-images-idx3-ubyte.gz"))
    d, _ = data("gz-empty", lambda d: truncate(f(d, "t10k-labels-idx1-ubyte.gz"), 0))
    case("empty .gz", run_in(d), f(d, "t10k-labels-idx1-ubyte.gz"))
    d, _ = data("gz-magic", lambda d: open(f(d, "train-labels-idx1-ubyte.gz"), "wb").write(
        gzip.compress(b"\x00\x00\x08\x03" + bytes(100))))  # fmt: skip
    case("wrong magic .gz", run_in(d), f(d, "train-labels-idx1-ubyte.gz"))
    d, _ = data("plain-truncated", lambda d: truncate(f(d, "t10k-images-idx3-ubyte"), 1000))
    case("truncated IDX", run_in(d), f(d, "t10k-images-idx3-ubyte"))
    d, _ = data("plain-empty", lambda d: truncate(f(d, "train-labels-idx1-ubyte"), 0))
    case("empty IDX", run_in(d), f(d, "train-labels-idx1-ubyte"))
    d, _ = data("plain-magic", lambda d: open(f(d, "train-images-idx3-ubyte"), "r+b").write(b"PK"))
    case("wrong magic IDX", run_in(d), f(d, "train-images-idx3-ubyte"))

    def folder_instead(d):
        os.remove(f(d, "t10k-images-idx3-ubyte"))
        os.makedirs(f(d, "t10k-images-idx3-ubyte"))

    d, _ = data("folder", folder_instead)
    case("a folder where a file is expected", run_in(d), f(d, "t10k-images-idx3-ubyte"))
    d, _ = data("three", lambda d: os.remove(f(d, "t10k-labels-idx1-ubyte")))
    case("3 of the 4 files", run_in(d), "but not t10k-labels-idx1-ubyte.gz")
    case("no data", run_in(os.path.join(tmp, "empty")), "MNIST/raw")
    case("--data-dir is a file", run_in(good, "--data-dir", f(good, "train-images-idx3-ubyte")),
         "--data-dir")  # fmt: skip
    x, _ = tiny_split(N_TRAIN - 1, 1)
    d, _ = data("counts", lambda d: open(f(d, "train-images-idx3-ubyte"), "wb").write(idx_bytes(x)))
    case("images and labels of different counts", run_in(d), "labels")
    d, _ = data("size", None, size=32)
    case("images not 28x28", run_in(d), "32x32 images, not 28x28")
    d, _ = data("one", None, n_test=1)
    case("a 1-image test set", run_in(d), "1 images, fewer than 2")
    case("--batch-size above the training set", run_in(good, "--batch-size", "1000"), "1000")

    blocker = f(tmp, "a-file")
    case("--out under a file", run_in(good, "--out", f(blocker, "out")), "--out")
    case("--out is a file", run_in(good, "--out", blocker), f"--out: {blocker} is a file; give a")
    case("--checkpoint under a file", run_in(good, "--checkpoint", f(blocker, "c.pt")),
         "--checkpoint")  # fmt: skip
    case("a full disk: pictures", run_in(good, "--out", f(tmp, "full1")),
         f(tmp, "full1/samples.png"), limit=("disk", 20_000))  # fmt: skip
    case("a full disk: checkpoint", run_in(good, "--out", f(tmp, "full2")),
         f(tmp, "full2/checkpoint.pt"), limit=("disk", 1_000_000))  # fmt: skip
    gib = ("memory", 2**31)  # 2 GiB more than the process has: a small machine
    case("a model too big for memory", run_in(good, "--out", f(tmp, "big"), "--hidden-dim",
         "1000000000"), "out of memory (tried to allocate 2,920.6 GiB): lower --hidden-dim",
         limit=gib)  # fmt: skip

    def ckpt(name, *extra):
        return ["--data-dir", good, "--out", f(tmp, name), *extra]

    case("no checkpoint", ckpt("none", "--eval-only"), f(tmp, "none/checkpoint.pt"))
    case("a truncated checkpoint", ckpt("trunc", "--resume"), f(tmp, "trunc/checkpoint.pt"))
    case("a foreign checkpoint", ckpt("foreign", "--generate", "4"), "not a checkpoint written")
    case("a code-running checkpoint", ckpt("evil", "--eval-only"), "could run code")
    case("another script's checkpoint", ckpt("conv", "--resume"), "written by vae_conv.py")
    case("a mismatched checkpoint", ["--out", mlp, "--eval-only", "--latent-dim", "8"],
         "--latent-dim 20, not 8")  # fmt: skip
    case("--resume past the last epoch", ["--out", mlp, "--data-dir", good, "--resume"],
         "--resume --epochs 11")  # fmt: skip
    case("--device that is not there", ["--device", "cuda"], "--device cuda")
    case("--generate too many for memory", ["--out", mlp, "--generate", "10000000000"],
         "out of memory (tried to allocate 745.1 GiB): lower --generate", limit=gib)  # fmt: skip
    case("--iw-samples too many for memory", ["--out", mlp, "--data-dir", good, "--eval-only",
         "--iw-samples", "10000000000"], "out of memory (tried to allocate 745.1 GiB): lower "
         "--iw-samples", limit=gib)  # fmt: skip
    for flags in (["--generate", "0"], ["--epochs", "0"], ["--lr", "nan"], ["--beta", "-1"],
                  ["--seed", "200000000000000"], ["--epoch", "3"], ["--latent", "8"],
                  ["--dataset", "cifar"], ["--iw-samples", "-1"], ["--train-k", "0"]):  # fmt: skip
        case(" ".join(flags), flags, flags[0], code=2)
    return cases


@pytest.fixture(scope="module")
def bad_runs(data_dir, tmp_path_factory):
    """Every case of bad_cases run as its own process, two at a time."""
    tmp = str(tmp_path_factory.mktemp("bad"))
    write_idx(os.path.join(tmp, "good"))
    open(os.path.join(tmp, "a-file"), "w").write("not a folder")
    mlp, conv = os.path.join(tmp, "mlp"), os.path.join(tmp, "conv")
    train(vae_mlp, os.path.join(tmp, "good"), mlp, "--iw-samples", "0")
    train(vae_conv, os.path.join(tmp, "good"), conv, "--iw-samples", "0", "--latent-dim", "4")
    for name in ("trunc", "foreign", "evil"):
        os.makedirs(os.path.join(tmp, name))
    truncate_to = os.path.join(tmp, "trunc", "checkpoint.pt")
    open(truncate_to, "wb").write(open(os.path.join(mlp, "checkpoint.pt"), "rb").read()[:5000])
    torch.save({"weights": torch.zeros(3)}, os.path.join(tmp, "foreign", "checkpoint.pt"))
    RunsCode.mark = os.path.join(tmp, "code-ran")
    state = load(os.path.join(mlp, "checkpoint.pt"))
    state["final"] = RunsCode()
    torch.save(state, os.path.join(tmp, "evil", "checkpoint.pt"))
    cases = bad_cases(tmp)

    # Each case is its own process, forked from a server that imported torch once (a fresh
    # interpreter per case would spend minutes importing it); it runs what `python vae_mlp.py`
    # runs, common.exit_fast(common.run(main, argv)), with its stderr in a file. Windows has no fork
    # server: there each case is a fresh interpreter (slower, the same checks).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        imports = ["pytest", "torch.distributions", "matplotlib.image", "matplotlib.figure"]
        ctx.set_forkserver_preload(["vae_conv", "vae_mlp", "torchvision.datasets", *imports])
    else:
        ctx = multiprocessing.get_context("spawn")
    names, results = [n for n in cases if runs_here(cases[n][3])], {}
    for start in range(0, len(names), 4):  # four at a time
        running = {}
        for i, name in enumerate(names[start : start + 4], start):
            argv, _, _, limit = cases[name]
            err = os.path.join(tmp, f"stderr-{i}.txt")
            running[name] = ctx.Process(target=script_process, args=(argv, limit, err)), err
            running[name][0].start()
        for name, (proc, err) in running.items():
            proc.join(timeout=120)
            with open(err) as f:
                results[name] = subprocess.CompletedProcess(
                    cases[name][0], proc.exitcode, "", f.read()
                )
            os.remove(err)
    return tmp, cases, results


def runs_here(limit):
    """Disk limits need POSIX's RLIMIT_FSIZE, memory limits Linux's /proc too."""
    return not limit or os.name == "posix" and (limit[0] == "disk" or os.path.exists("/proc"))


def script_process(argv, limit, err_path):
    """`python vae_mlp.py ARGV` in a forked process; stdout dropped, stderr into err_path."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    if limit:  # POSIX only (the cases are skipped on Windows)
        import resource

        kind, size = limit
        if kind == "disk":  # a disk that is full after `size` bytes of any one file
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        else:  # `size` bytes more memory than now, whatever the system's overcommit policy
            with open("/proc/self/statm") as f:
                now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (now + size, now + size))
    torch.set_num_threads(1)
    sys.argv = ["vae_mlp.py", *argv]
    common.exit_fast(common.run(vae_mlp.main, argv))


def pytest_generate_tests(metafunc):
    """The cases of test_bad_input_is_one_line, named at collection: not at import, which
    every case's process does too."""
    if "case" in metafunc.fixturenames:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            write_idx(os.path.join(tmp, "good"))
            metafunc.parametrize("case", list(bad_cases(tmp)))


def test_bad_input_is_one_line(case, bad_runs):
    tmp, cases, results = bad_runs
    argv, names, code, limit = cases[case]
    if not runs_here(limit):
        pytest.skip(f"a {limit[0]} limit cannot be set on {sys.platform}")
    r = results[case]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and names in lines[0], r.stderr
    assert not os.path.exists(os.path.join(tmp, "code-ran"))  # the crafted pickle never ran
    for root, _, files in os.walk(tmp):  # no temporary or half-written file anywhere
        assert not [n for n in files if n.startswith(".")], (root, files)
        if "checkpoint.pt" in files and os.path.basename(root) not in ("trunc", "evil"):
            load(os.path.join(root, "checkpoint.pt"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0 (see --help)"),
        (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # never abbreviated
        (["--seed", str(2**32)], "--seed: must be an integer from 0 to 2^32 - 1"),
    ],
)
def test_a_bad_flag_is_one_line_with_exit_code_2(argv, words, capsys):
    """README: a bad flag is one line on stderr, exit code 2; from a notebook, SystemExit(2)."""
    with pytest.raises(SystemExit) as stop:
        vae_mlp.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("vae_mlp.py: error: ") and words in err
    assert len(err.splitlines()) == 1


def test_compile_that_cannot_run_stops_with_one_line(data_dir, tmp_path, monkeypatch, capsys):
    def too_old(fn, *a, **kw):  # what Inductor raises on its first call on a GTX 10xx or P100
        def call(*a, **kw):
            raise RuntimeError("Found NVIDIA TITAN X which is too old to be supported by the "
                               "triton GPU compiler, which is used as the backend.")  # fmt: skip

        return call

    monkeypatch.setattr(torch, "compile", too_old)
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--compile"]
    code, err = exit_of(vae_conv.main, argv, capsys)
    assert code == 1 and err.count("\n") == 1 and "--compile" in err and "too old" in err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_changed_model_cannot_load_an_old_checkpoint(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")
    ckpt = load(tmp_path / "checkpoint.pt")
    ckpt["model"]["encoder.1.weight"] = torch.zeros(3, 3)  # as if the code had changed
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    code, err = exit_of(vae_mlp.main, ["--out", str(tmp_path), "--generate", "4"], capsys)
    assert code == 1 and "does not fit this vae_mlp.py's model" in err


def test_help_shows_each_scripts_defaults(capsys):
    assert vae_mlp.get_args([]).lr == 7e-3 and vae_conv.get_args([]).lr == 2e-3
    with pytest.raises(SystemExit):
        vae_mlp.get_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: 0.007)" in out and "--train-k K" in out
    words = " ".join(out.split())  # --beta's help, unwrapped
    assert "--train-k K > 1, of log p(z) - log q(z|x) inside L_K's logsumexp" in words


# ----------------------------------------------------------------------------
# The same protocol on every device and platform


def test_each_epoch_draws_its_own_order_binarization_and_noise(data_dir, tmp_path, monkeypatch):
    """A CPU generator keeps only the low 32 bits of a seed: epoch seeds that differ above them
    would repeat epoch 1's randomness in every epoch."""
    draws, now = {}, {"epoch": 0}
    train_epoch = vae_mlp.train_epoch

    def in_epoch(model, opt, x, args, epoch):
        now["epoch"] = epoch
        return train_epoch(model, opt, x, args, epoch)

    def recorded(name, draw):
        def wrapper(*a, **kw):
            out = draw(*a, **kw)
            if kw.get("generator") is None:  # training's draws; evaluation has its generator
                draws.setdefault((name, now["epoch"]), out.clone())
            return out

        return wrapper

    monkeypatch.setattr(vae_mlp, "train_epoch", in_epoch)
    for name in ("randperm", "bernoulli", "randn"):  # data order, binarization, eps
        monkeypatch.setattr(torch, name, recorded(name, getattr(torch, name)))
    train(vae_mlp, data_dir, tmp_path, "--epochs", "2", "--binarize", "dynamic")
    for name in ("randperm", "bernoulli", "randn"):
        assert not torch.equal(draws[name, 1], draws[name, 2]), name


class Float64Finder(torch.overrides.TorchFunctionMode):
    """Every torch call whose result is float64 (Apple GPUs have none)."""

    def __init__(self):
        super().__init__()
        self.found = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.found.add(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_float64_tensor_in_a_whole_run(name, data_dir, tmp_path):
    argv = ["--latent-dim", "2", "--binarize", "dynamic"]  # every picture, the 2-D ones too
    with Float64Finder() as finder:
        result = train(SCRIPTS[name], data_dir, tmp_path, *argv)
        SCRIPTS[name].main(["--out", str(tmp_path), "--data-dir", data_dir, "--eval-only"])
        SCRIPTS[name].main(["--out", str(tmp_path), "--generate", "4"])
    assert math.isfinite(result["iwae_nll"])
    assert not finder.found


def test_the_bound_decodes_in_calls_sized_for_the_device(monkeypatch):
    assert common.decodes_per_call(torch.device("cpu"), 128) == 512  # cache-sized
    for device in ("cuda", "mps"):  # a few training batches, whatever the test set or K
        assert common.decodes_per_call(torch.device(device), 128) == 8 * 128
        assert common.decodes_per_call(torch.device(device), 32) == 8 * 32
    model, sizes, encoded = vae_mlp.VAE(latent_dim=3).eval(), [], []
    decode, encode = model.decode, model.encode
    monkeypatch.setattr(model, "decode", lambda z: sizes.append(len(z)) or decode(z))
    monkeypatch.setattr(model, "encode", lambda x: encoded.append(len(x)) or encode(x))
    x_u8 = (torch.rand(40, 1, 28, 28) > 0.5).to(torch.uint8) * 255
    for k, max_decodes in ((1000, 300), (10, 16), (1, 16)):  # small K: many images per draw
        sizes.clear(), encoded.clear()
        vae_mlp.iwae_nll(model, x_u8, k, "bernoulli", max_decodes=max_decodes)
        assert max(sizes) <= max_decodes and sum(sizes) == 40 * k, k
        assert max(encoded) <= max_decodes and sum(encoded[1:]) == 40, k  # [0]: D, one image


def test_runs_without_posix_only_calls(data_dir, tmp_path, monkeypatch):
    """As on Windows with Python 3.12: no os.fchmod, no os.O_DIRECTORY."""
    monkeypatch.delattr(os, "fchmod", raising=False)
    monkeypatch.delattr(os, "O_DIRECTORY", raising=False)
    train(vae_mlp, data_dir, tmp_path)
    for name in ("checkpoint.pt", "samples.png", "metrics.csv"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o666 & ~umask())


def test_out_of_memory_on_a_gpu_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    def oom(*a, **kw):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "3.68 GiB of which 1.02 GiB is free."
        )

    monkeypatch.setattr(vae_conv, "train_epoch", oom)
    argv = ["--data-dir", data_dir, "--out", str(tmp_path)]
    code, err = exit_of(vae_conv.main, argv, capsys)
    assert code == 1
    assert err == "error: out of memory (tried to allocate 2.00 GiB): lower --batch-size\n"
    code, err = exit_of(vae_conv.main, [*argv, "--channels", "64", "--batch-size=64"], capsys)
    assert err == (
        "error: out of memory (tried to allocate 2.00 GiB): lower --batch-size or --channels\n"
    )
    monkeypatch.setattr(vae_conv, "train_epoch", lambda *a: 1 / 0)  # a bug stays a traceback
    with pytest.raises(ZeroDivisionError):
        common.run(vae_conv.main, argv)


def test_checkpoint_is_on_the_cpu_and_resume_picks_fused_adam_by_device(data_dir, tmp_path):
    train(vae_mlp, data_dir, tmp_path, "--epochs", "2", "--iw-samples", "0")
    ckpt = load(tmp_path / "checkpoint.pt")
    tensors = [*ckpt["model"].values()]
    tensors += [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    assert len(tensors) == 3 * len(ckpt["model"]) + len(ckpt["model"])  # weights, step, 2 moments
    assert all(t.device.type == "cpu" for t in tensors)
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is True  # fused Adam on the CPU
    args = vae_mlp.get_args(["--out", str(tmp_path), "--resume", "--epochs", "3"])
    for saved_fused in (True, False):  # as saved on a CPU or CUDA, or on an Apple GPU
        for fused in (True, False):  # what this device wants
            ckpt["optimizer"]["param_groups"][0]["fused"] = saved_fused
            model = vae_mlp.VAE()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
            common.resume(args, ckpt, opt)
            assert opt.param_groups[0]["fused"] is fused
            vae_mlp.neg_elbo(model, torch.rand(4, 1, 28, 28), "bernoulli")[2].backward()
            opt.step()  # the moved state works with the chosen Adam


def test_compile_is_not_taken_from_a_checkpoint(data_dir, tmp_path):
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")
    ckpt = load(tmp_path / "checkpoint.pt")
    ckpt["args"]["compile"] = True  # as if trained with --compile
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    args = vae_mlp.get_args(["--out", str(tmp_path), "--resume", "--epochs", "2"])
    common.load_checkpoint(args, vae_mlp.MODEL_FLAGS)
    assert args.compile is False and args.epochs == 2  # typed now: wins
    args = vae_mlp.get_args(["--out", str(tmp_path), "--resume", "--epochs", "2", "--compile"])
    common.load_checkpoint(args, vae_mlp.MODEL_FLAGS)
    assert args.compile is True


REAL = {
    "mnist": os.path.join(HERE, "data", "MNIST", "raw"),  # CI copies them there
    "fashion": "/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
}


@pytest.mark.parametrize("dataset, other", [("mnist", "fashion"), ("fashion", "mnist")])
def test_the_other_data_sets_files_are_refused(dataset, other):
    if not os.path.isfile(os.path.join(REAL[other], "t10k-labels-idx1-ubyte.gz")):
        pytest.skip(f"the real {other} files are not on this machine")
    args = vae_mlp.get_args(["--dataset", dataset, "--data-dir", REAL[other]])
    with pytest.raises(common.UserError, match=f"is {common.NAMES[other]}'s, not") as e:
        common.load_data(args, "cpu")
    assert f"--dataset {other}" in str(e.value)
    args = vae_mlp.get_args(["--dataset", other, "--data-dir", REAL[other]])
    assert len(common.load_data(args, "cpu")["test"][0]) == 10_000  # the right ones load


def test_a_new_run_replaces_the_old_run_and_says_so(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path, "--epochs", "3", "--iw-samples", "0", "--latent-dim", "2")
    vae_mlp.main(["--out", str(tmp_path), "--generate", "4"])
    before = sorted(os.listdir(tmp_path))
    argv = ["--out", str(tmp_path), "--data-dir", str(tmp_path / "metrics.csv")]  # a file
    code, err = exit_of(vae_mlp.main, argv, capsys)
    assert code == 1 and sorted(os.listdir(tmp_path)) == before  # a failed start removes nothing
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")  # 1 epoch, latent 20
    err = capsys.readouterr().err.splitlines()
    assert err == [  # a finished run: only a longer one would continue it
        f"note: {tmp_path}/ held a run at epoch 3 of 3 ({tmp_path / 'checkpoint.pt'}; --resume "
        "--epochs N with N > 3 would have trained it further); starting a new run in its place"
    ]
    left = sorted(os.listdir(tmp_path))
    assert "samples_epoch_02.png" not in left and "manifold.png" not in left, left
    assert "generated.png" not in left and len(read_metrics(tmp_path)) == 1
    assert load(tmp_path / "checkpoint.pt")["epoch"] == 1
    ckpt = load(tmp_path / "checkpoint.pt")
    ckpt["args"]["epochs"] = 5  # as a 5-epoch run stopped after its first epoch leaves it
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")
    err = capsys.readouterr().err
    assert "at epoch 1 of 5 (" in err and "; --resume would have continued it)" in err


def test_metrics_columns_measure_what_they_say(data_dir, tmp_path):
    result = train(vae_mlp, data_dir, tmp_path, "--epochs", "2")
    rows = read_metrics(tmp_path)
    for row in rows:
        train_s, test_s = float(row["train_s"]), float(row["test_s"])
        assert float(row["images_per_s"]) == pytest.approx((N_TRAIN // 32) * 32 / train_s)
        assert 0 < test_s and 0 < train_s
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed[0] >= float(rows[0]["train_s"]) + float(rows[0]["test_s"])
    assert elapsed[1] - elapsed[0] >= float(rows[1]["train_s"]) + float(rows[1]["test_s"])
    assert result["metrics"][1]["elapsed_s"] == pytest.approx(elapsed[1])


# ----------------------------------------------------------------------------
# What a course shows: the pictures' arithmetic, active units, one folder per experiment


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_active_units_count_dimensions_whose_means_vary(module):
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.0, 0.05, 0.09, 0.11, 1.0, 3.0])  # sd of each dimension's mean
    mu = torch.randn(10_000, 6, generator=g)
    mu = (mu - mu.mean(0)) / mu.std(0, correction=0) * spread + 5  # exactly those variances
    assert module.active_units(mu) == 3  # variances 0.0121, 1 and 9 are above 0.01
    assert module.active_units(torch.zeros(7, 4)) == 0  # a collapsed posterior


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_traversal_sweeps_one_dimension_per_row(module):
    torch.manual_seed(0)
    model = module.VAE(latent_dim=12).eval()
    x = torch.rand(4, 1, 28, 28)
    unit = torch.randn(100, 12)
    unit = (unit - unit.mean(0)) / unit.std(0)  # each column: mean 0, variance exactly 1
    mu_test = unit * torch.linspace(0.1, 1.2, 12)  # so dimension 11 varies most, then 10, ...
    pictures = module.grids(model, x, torch.randn(64, 12), mu_test)
    images, nrow, x_axis, y_axis = pictures["traversal.png"]
    assert nrow == 11 and y_axis[1] == [f"z[{u}]" for u in range(11, 1, -1)]  # 10, most first
    assert x_axis[1] == pytest.approx([-2.5 + 0.5 * i for i in range(11)])
    with torch.no_grad():
        mu = model.encode(x)[0][0]  # the first test image's posterior mean
        for row, u in enumerate(range(11, 1, -1)):
            z = mu.repeat(11, 1)
            z[:, u] = torch.linspace(-2.5, 2.5, 11)  # this row's dimension, and only it
            expected = torch.sigmoid(model.decode(z))
            torch.testing.assert_close(images[row * 11 : (row + 1) * 11], expected)


def test_manifold_covers_the_test_means_with_its_values_on_the_axes():
    torch.manual_seed(0)
    model = vae_mlp.VAE(latent_dim=2).eval()
    mu_test = torch.tensor([[-3.0, 0.5], [1.0, -1.0], [2.0, 4.0]])
    pictures = vae_mlp.grids(model, torch.rand(2, 1, 28, 28), torch.randn(64, 2), mu_test)
    images, nrow, (xl, x_values), (yl, y_values) = pictures["manifold.png"]
    assert (xl, yl, nrow, images.shape) == ("z[0]", "z[1]", 20, (400, 1, 28, 28))
    assert x_values == pytest.approx(torch.linspace(-3, 2, 20).tolist())  # left to right
    assert y_values == pytest.approx(torch.linspace(4, -1, 20).tolist())  # top to bottom
    with torch.no_grad():  # row 0 is the top: z[1] = 4; its first column z[0] = -3
        corner = torch.sigmoid(model.decode(torch.tensor([[-3.0, 4.0]])))
    torch.testing.assert_close(images[:1], corner)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_interpolations_and_reconstructions_by_hand(module):
    torch.manual_seed(0)
    model = module.VAE(latent_dim=5).eval()
    x = torch.rand(6, 1, 28, 28)  # 3 pairs
    pictures = module.grids(model, x, torch.randn(64, 5), torch.randn(50, 5))
    with torch.no_grad():
        mu = model.encode(x)[0]
        mean = lambda z: torch.sigmoid(model.decode(z))  # noqa: E731
        images, nrow = pictures["interpolation.png"]
        assert nrow == 12
        rows = images.view(3, 12, 1, 28, 28)
        for r, (a, b) in enumerate(((0, 1), (2, 3), (4, 5))):  # x_a, 10 steps a -> b, x_b
            assert torch.equal(rows[r, 0], x[a]) and torch.equal(rows[r, 11], x[b])
            walk = torch.stack([mu[a] + j / 9 * (mu[b] - mu[a]) for j in range(10)])
            torch.testing.assert_close(rows[r, 1:11], mean(walk))
        images, nrow = pictures["reconstructions.png"]
        assert nrow == 3  # test images above their reconstructions from the posterior mean
        expected = torch.cat([x[:3], mean(mu[:3]), x[3:], mean(mu[3:])])
        torch.testing.assert_close(images, expected)


def test_the_sample_grids_decode_the_same_z_every_epoch(data_dir, tmp_path):
    """samples.png and each frame of samples.gif: the fixed z ~ N(0, I) of --seed, decoded by
    that epoch's model."""
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--iw-samples", "0"]
    argv += ["--latent-dim", "3", "--seed", "7"]
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(7))

    def decoded(ckpt):
        model = vae_mlp.VAE(**ckpt["config"])
        model.load_state_dict(ckpt["model"])
        with torch.no_grad():
            return common.grid_pixels(torch.sigmoid(model.decode(z)), 8)

    assert vae_mlp.main([*argv, "--epochs", "1"])["exit_code"] == 0
    first = decoded(load(tmp_path / "checkpoint.pt"))
    png = (imread(tmp_path / "samples.png") * 255).round()
    assert (png == first).all()
    assert vae_mlp.main([*argv, "--resume", "--epochs", "2"])["exit_code"] == 0
    second = decoded(load(tmp_path / "checkpoint.pt"))
    frames = gif_pixels(tmp_path / "samples.gif")
    assert frames == [first.tobytes(), second.tobytes()]


@pytest.mark.parametrize(
    "flags, folder",
    [
        ([], "vae_mlp"),
        (["--epochs", "3", "--iw-samples", "0", "--seed", "1"], "vae_mlp"),  # same experiment
        (["--beta", "4"], "vae_mlp-beta4"),
        (["--latent-dim", "2"], "vae_mlp-latent-dim2"),
        (["--beta=0", "--likelihood", "gaussian"], "vae_mlp-likelihood-gaussian-beta0"),
        (["--lr", "1e-3", "--batch-size", "32"], "vae_mlp-batch-size32-lr0.001"),
        (["--beta", "4", "--out", "mine"], "mine"),  # --out wins
    ],
)
def test_each_experiment_has_its_own_default_folder(flags, folder):
    args = vae_mlp.get_args(flags)
    assert args.out == (folder if folder == "mine" else os.path.join("results", folder))
    assert args.checkpoint == os.path.join(args.out, "checkpoint.pt")


def test_progress_line_shows_in_jupyter_not_in_a_pipe(monkeypatch, capsys):
    import io

    class OutStream(io.StringIO):  # ipykernel's stdout, which draws "\r" as a terminal does
        pass

    OutStream.__module__ = "ipykernel.iostream"
    for stdout, shown in ((OutStream(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stdout", stdout)
        bar = common.Progress("epoch 1/2", 10)
        bar.last -= 1  # a second after the last redraw
        bar.update(3, torch.tensor(101.5))
        assert ("\repoch 1/2  3/10  loss  101.50" in stdout.getvalue()) is shown


def test_samples_gif_has_every_epoch_across_a_resume(data_dir, tmp_path):
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--iw-samples", "0"]
    assert vae_mlp.main([*argv, "--epochs", "2"])["exit_code"] == 0
    before = gif_pixels(tmp_path / "samples.gif")
    assert vae_mlp.main([*argv, "--resume", "--epochs", "3"])["exit_code"] == 0
    after = gif_pixels(tmp_path / "samples.gif")
    assert len(before) == 2 and after[:2] == before and len(after) == 3


def test_resume_keeps_the_checkpoints_settings_unless_typed(data_dir, tmp_path):
    """README: the checkpoint's settings are used unless typed again, and with the cosine
    schedule --resume --epochs 4 after 2 goes on along the 4-epoch curve."""
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--iw-samples", "0"]
    assert vae_mlp.main([*argv, "--epochs", "2", "--lr", "1e-3", "--beta", "0.5"])["exit_code"] == 0
    rows = vae_mlp.main([*argv, "--resume", "--epochs", "4"])["metrics"]
    cosine = [1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 5e-4, *cosine[2:]])
    assert [r["kl_weight"] for r in rows] == [0.5] * 4  # --beta from the checkpoint
    rows = vae_mlp.main([*argv, "--resume", "--epochs", "5", "--lr", "2e-3"])["metrics"]
    assert rows[-1]["lr"] == pytest.approx(2e-3 * (1 + math.cos(math.pi * 4 / 5)) / 2)  # typed


def test_no_torchvision_and_no_matplotlib_until_needed(data_dir, tmp_path, monkeypatch):
    """README (Speed): torchvision only to download, matplotlib only at the first figure."""
    for name in ("vae_mlp.py", "vae_conv.py", "common.py"):  # at import time: the top level
        with open(os.path.join(HERE, name)) as f:
            top = ast.parse(f.read()).body
        imported = [a.name for s in top if isinstance(s, ast.Import) for a in s.names]
        imported += [s.module for s in top if isinstance(s, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] in ("torchvision", "matplotlib")]
    seen, real_import = [], builtins.__import__

    def spy(name, *args, **kwargs):  # every import statement that runs, in order
        seen.append(name.split(".")[0])
        return real_import(name, *args, **kwargs)

    def marked(draw):  # where the drawing of a figure starts
        return lambda *args, **kwargs: seen.append("FIGURE") or draw(*args, **kwargs)

    for name in ("save_loss_curves", "save_latent", "save_labelled_grid"):
        monkeypatch.setattr(common, name, marked(getattr(common, name)))
    monkeypatch.setattr(builtins, "__import__", spy)
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")
    monkeypatch.undo()
    assert "torchvision" not in seen and seen.index("FIGURE") < seen.index("matplotlib")


def gif_pixels(path):
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        return [f.convert("L").tobytes() for f in ImageSequence.Iterator(gif)]


# ----------------------------------------------------------------------------
# The prepared GPU check runs end to end on a CPU


def test_gpu_check_runs_on_a_cpu_and_reports_every_case(data_dir, tmp_path):
    """benchmarks/gpu_check.py with the MLP's default run only (one run of the script): exit
    0, a report with every section, and each case with its numbers or why it has none."""
    report = tmp_path / "report.md"
    cmd = [sys.executable, os.path.join(HERE, "benchmarks", "gpu_check.py"), "--device", "cpu",
           "--data-dir", data_dir, "--scratch", str(tmp_path / "scratch"), "--report",
           str(report), "--scripts", "vae_mlp", "--epochs", "1", "--cases", "default",
           "quality"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = report.read_text()
    assert text in done.stdout  # the same section on stdout
    sections = ("1. The default commands", "2. The bound at K=1000", "3. Numerical check")
    sections += ("4. Evidence", "5. Time to the tutorial's test -ELBO")
    for part in ("### GPU check: CPU only", "torch ", "Python ", *sections):
        assert part in text
    rows = []  # the cells after the script's name, table by table
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "vae_mlp" in cells:
            rows.append(cells[cells.index("vae_mlp") + 1 :])
    assert len(rows) == 3 + 6 + 1  # default, bound, check; the 6 training runs of 4; quality
    default = rows[0]
    assert all(float(v.split(" ")[0]) >= 0 for v in default) and "(K=10)" in default[-1]
    assert rows[1][0] == rows[2][0] == "skipped: not in --cases"
    assert [r[0] for r in rows[3:9]].count("skipped: not in --cases") == 5  # all but the default
    # 5: the tutorial's 1 epoch; ours, the shortest --epochs N of at most 1, is the default run
    target, epochs, tutorial_s, n, ours_s, elbo, speedup, where = rows[9]
    assert (epochs, n, ours_s, elbo) == ("1", "1", default[0], default[-2])
    tutorial_s, ours_s = float(tutorial_s), float(ours_s)  # each rounded to 0.1 s
    low, high = (tutorial_s - 0.05) / (ours_s + 0.05), (tutorial_s + 0.05) / (ours_s - 0.05)
    assert low - 0.005 <= float(speedup) <= high + 0.005
    assert where.startswith("1 (") if float(elbo) <= float(target) else where == "—"
    assert 0 < float(target) < 784 * math.log(2)  # below a model that says 0.5 for each pixel


# ----------------------------------------------------------------------------
# What the README says of the numbers and of the scripts


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_the_numbers_the_readme_explains(module):
    x = (torch.rand(3, 1, 28, 28) > 0.5).float()
    coin = module.recon_nll(torch.zeros(3, 1, 28, 28), x, "bernoulli")  # p = 0.5 everywhere
    assert (
        coin.tolist() == pytest.approx([784 * math.log(2)] * 3)
        and round(coin[0].item(), 1) == 543.4
    )
    x = torch.rand(3, 1, 28, 28) * 0.98 + 0.01
    exact = module.recon_nll(torch.logit(x), x, "gaussian")  # x_hat = x: only the constant
    assert exact.tolist() == pytest.approx([392 * math.log(2 * math.pi)] * 3, rel=1e-5)
    assert round(exact[0].item(), 1) == 720.4


def test_the_scripts_are_twins_outside_the_model():
    """`diff vae_mlp.py vae_conv.py` shows the model, its flags, the defaults of --lr,
    --batch-size, --train-k and --train-k-epochs and the script's name, nothing else."""

    def shared(name):
        with open(os.path.join(HERE, name)) as f:
            text = f.read()
        start, end = text.index("class VAE(nn.Module):"), text.index("    def encode(self, x):")
        text = text[:start] + text[end:]  # the model's layers
        flags = ("channels", "hidden-dim", "latent-dim", "lr", "batch-size", "train-k")
        flags += ("train-k-epochs",)
        own = [*(f'"--{f}",' for f in flags), "vae_mlp", "vae_conv", "MODEL_FLAGS ="]
        own += ["fully-connected", "convolutional", "Adam's learning rate (", "Adam step ("]
        return [line for line in text.splitlines() if not any(w in line for w in own)]

    assert shared("vae_mlp.py") == shared("vae_conv.py")


def test_main_leaves_the_global_random_state_and_tf32_as_they_were(data_dir, tmp_path):
    """A notebook's torch after main: its random generator where it was, TF32 as it set it."""
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.equal(torch.get_rng_state(), before)


def test_a_checkpoint_named_without_out_writes_beside_it(data_dir, tmp_path, monkeypatch):
    """--resume, --eval-only and --generate with --checkpoint X and no --out write into X's
    folder, never into the default run's folder; a new run that keeps its checkpoint
    elsewhere removes the old run's checkpoint from --out."""
    monkeypatch.chdir(tmp_path)  # where results/vae_mlp/, the default --out, would be
    first, beta = tmp_path / "first", tmp_path / "beta4"
    train(vae_mlp, data_dir, first, "--iw-samples", "0")
    train(vae_mlp, data_dir, beta, "--iw-samples", "0", "--beta", "4")
    before, ckpt = read_metrics(first), str(beta / "checkpoint.pt")
    argv = ["--data-dir", data_dir, "--checkpoint", ckpt, "--iw-samples", "0"]
    assert vae_mlp.main([*argv, "--resume", "--epochs", "2"])["exit_code"] == 0
    assert len(read_metrics(beta)) == 2 and read_metrics(first) == before
    vae_mlp.main([*argv, "--eval-only"])
    assert vae_mlp.main(["--checkpoint", ckpt, "--generate", "4"])["exit_code"] == 0
    assert (beta / "generated.png").exists() and not (tmp_path / "results").exists()
    elsewhere = tmp_path / "elsewhere.pt"
    train(vae_mlp, data_dir, first, "--iw-samples", "0", "--checkpoint", str(elsewhere))
    assert load(elsewhere)["epoch"] == 1 and not (first / "checkpoint.pt").exists()


def test_printed_commands_are_quoted_for_the_platforms_shell(monkeypatch):
    """cmd.exe keeps POSIX quotes as part of a path: on Windows, its own quoting."""
    args = vae_mlp.get_args(["--out", "results\\vae mlp", "--data-dir", "C:\\data"])
    words = ["python", "vae_mlp.py", "--resume", "--out", "results\\vae mlp"]
    words += ["--data-dir", "C:\\data"]
    monkeypatch.setattr(common, "WINDOWS", True)
    line = 'python vae_mlp.py --resume --out "results\\vae mlp" --data-dir C:\\data'
    assert common.command(args, "--resume") == line
    monkeypatch.setattr(common, "WINDOWS", False)
    assert shlex.split(common.command(args, "--resume")) == words


def test_no_torchvision_and_no_data_is_one_line(tmp_path, monkeypatch):
    """README: torchvision is needed only to download."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    args = vae_mlp.get_args(["--data-dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="torchvision, which would download it, is not"):
        common.load_data(args, "cpu")
    write_idx(tmp_path / "MNIST" / "raw")
    assert len(common.load_data(args, "cpu")["test"][0]) == N_TEST  # files on disk: no need


def test_a_script_copied_alone_or_beside_another_common_finds_its_own(tmp_path):
    """Without common.py: one line that says so. With another module named common first on
    sys.path (a PyPI package of that name, say): the common.py beside the script."""
    alone, other = tmp_path / "alone", tmp_path / "other"
    alone.mkdir(), other.mkdir()
    shutil.copy(os.path.join(HERE, "vae_mlp.py"), alone)
    run = [sys.executable, str(alone / "vae_mlp.py"), "--help"]
    done = subprocess.run(run, capture_output=True, text=True, cwd=alone, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"error: vae_mlp.py needs common.py beside it in {alone}: copy it from the same "
        "repository (it holds the data files, pictures and checkpoints)"
    ]
    (other / "common.py").write_text("raise ImportError('the other common')\n")
    code = f"import sys; sys.path.append({HERE!r}); import vae_mlp; print(vae_mlp.common.__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=other)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == os.path.join(HERE, "common.py")


def test_an_older_python_is_told_in_one_line():
    """README: Python 3.9 or newer; below it, one line (as if this were Python 3.8)."""
    code = (
        "import runpy, sys, torch; sys.version_info = (3, 8, 18, 'final', 0); "
        f"sys.argv = ['vae_mlp.py', '--help']; runpy.run_path({vae_mlp.__file__!r}, "
        "run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "error: vae_mlp.py and vae_conv.py need Python 3.9 or newer, not 3.8.18\n"


def test_loss_png_shows_the_epochs_after_the_first():
    """The first steps (hundreds of nats) are off the y axis, which fits the rest; a note on
    each panel says where they start."""
    recon = torch.cat([torch.linspace(540, 90, 10), torch.linspace(90, 80, 20)])  # 3 epochs
    steps = torch.stack([recon, torch.full((30,), 20.0)], 1)  # per-step recon, KL
    rows = [{"epoch": e, "test_recon": 75.0 - e, "test_kl": 20.0, "test_loss": 95.0 - e}
            for e in (1, 2, 3)]  # fmt: skip
    total, terms = common.loss_figure(rows, steps).axes
    assert 110 <= total.get_ylim()[1] < 120 and total.get_ylim()[0] <= 92
    assert 90 <= terms.get_ylim()[1] < 100 and terms.get_ylim()[0] <= 20
    assert [t.get_text() for t in total.texts] == ["starts at 560 (off the axis)"]
    assert [t.get_text() for t in terms.texts] == ["starts at 540 (off the axis)"]


def test_tf32_is_off(data_dir, tmp_path):
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    common.get_device("auto")
    assert torch.backends.cudnn.allow_tf32 is False  # plain float32 on a GPU too
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_the_readme_results_are_the_benchmark_records():
    """Each row of the README's Results table for a script is one record of benchmarks/RESULTS.md:
    its mean ± sd numbers all stand in one "mean ± sd" row there (a number typed into the README
    but never measured, or one from another run, fails)."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(HERE, "benchmarks", "RESULTS.md")) as f:
        records = [line for line in f if line.startswith("| mean ± sd |")]
    table = readme[readme.index("## Results") : readme.index("The rows, in order:")]
    rows = [line for line in table.splitlines() if line.startswith("| `vae_")]
    assert len(rows) == 5, rows
    for row in rows:
        numbers = re.findall(r"\d+\.\d+ ± \d+\.\d+", row)
        assert numbers, row
        assert any(all(f"| {n} |" in record for n in numbers) for record in records), row


def test_the_speed_benchmark_finds_the_shortest_run(monkeypatch):
    """speed.py --quality and gpu_check.py's quality case: from any first guess, the search
    ends at the fewest epochs whose run ends at or below the target (at the longest run if none
    does), as a scan of every length finds it where a longer run never ends worse."""
    monkeypatch.syspath_prepend(os.path.join(HERE, "benchmarks"))
    from speed import shortest

    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        ends = (torch.rand(20, generator=gen) * 10).sort(descending=True).values.tolist()
        target = torch.rand(1, generator=gen).item() * 12 - 1  # sometimes below every end
        scan = next((n for n in range(1, 21) if ends[n - 1] <= target), 20)
        final = dict(zip(range(1, 21), ends)).__getitem__  # a run of n epochs ends at ends[n - 1]
        for guess in (None, *range(1, 21)):
            assert shortest(target, guess, final) == scan


def test_the_readme_speed_tables_are_the_benchmark_records():
    """Each row of the README's CPU speed tables is one row that benchmarks/speed.py wrote into
    benchmarks/RESULTS.md: the same script and every one of its numbers (a time typed into the
    README, or kept from an older run, fails)."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(HERE, "benchmarks", "RESULTS.md")) as f:
        records = [line.split("|")[1:-1] for line in f if re.match(r"\| (mlp|conv) \|", line)]
    start = readme.index("## Speed")
    section = readme[start : readme.index("On a GPU", start)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) == 6, rows  # time to quality: 2 per script; equal epochs: 1 per script
    for row in rows:
        case = re.search(r"vae_(mlp|conv)", row).group(1)
        numbers = set(re.findall(r"\d+\.\d+", row))
        assert numbers, row
        assert any(
            cells[0].strip() == case and numbers <= {c.strip().rstrip("x") for c in cells}
            for cells in records
        ), row


def test_the_readme_flags_table_gives_the_defaults():
    """Each default in the README's Flags table is the script's own (a changed default that the
    README kept would mislead every reader of the table)."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    table = text[text.index("## Flags") : text.index("## Data, offline")]
    checked = 0
    for name, module in SCRIPTS.items():
        defaults, short = vars(module.get_args([])), name.split("_")[1]  # mlp, conv
        for line in table.splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            model = re.search(r"\((mlp|conv)\)", cells[0]) if len(cells) == 4 else None
            if len(cells) != 4 or model and model.group(1) != short:
                continue  # not a row, or the other script's model
            flags = [f.replace("-", "_") for f in re.findall(r"--([a-z][a-z-]*)", cells[1])]
            cell = cells[2].replace("`", "")
            if not flags or not cell or "<" in cell or "DIR" in cell or flags[0] == "compile":
                continue  # no default, or one made from others (--out, --checkpoint)
            own = re.search(rf"([^,]+) \({short}\)", cell)  # "7e-3 (mlp), 2e-3 (conv)"
            values = [own.group(1).strip()] if own else [v.strip() for v in cell.split(",")]
            for flag, value in zip(flags, values):
                default = defaults[flag]
                if isinstance(default, (int, float)):
                    assert float(value) == default, (name, flag, value, default)
                else:
                    assert value == default, (name, flag, value, default)
                checked += 1
    assert checked >= 2 * 16, checked  # every row with a plain default, for both scripts
