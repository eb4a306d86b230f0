"""Tests for vae_mlp.py, vae_conv.py and common.py. CPU only, no network: pytest -q"""

import ast
import builtins
import csv
import gzip
import math
import os
import re
import shlex
import signal
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
    test, mu_all = module.evaluate(model, x_u8, "bernoulli")
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
    assert test["neg_elbo"] == pytest.approx((recon + kl).mean().item(), rel=1e-5)
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
    x_u8 = (torch.rand(20, 1, 28, 28) > 0.7).to(torch.uint8) * 255
    nlls = [module.iwae_nll(model, x_u8, k, "bernoulli") for k in (1, 10, 100)]
    assert nlls[0] > nlls[1] > nlls[2]  # L_1 <= L_10 <= L_100 on average
    few = x_u8[:8]
    whole = module.iwae_nll(model, few, 30, "bernoulli", max_decodes=8 * 30)
    for max_decodes in (8 * 7, 13, 1):  # 7 samples, a part of one, one z per decoder call
        chunked = module.iwae_nll(model, few, 30, "bernoulli", max_decodes=max_decodes)
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


@pytest.mark.parametrize("module", [vae_mlp])  # the twin of vae_conv's
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
    x_u8 = (x.view(1, 1, 28, 28) * 255).to(torch.uint8).repeat(64, 1, 1, 1)
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
def test_train_k_after_trains_on_the_elbo_then_on_l_k(module):
    def ks(epochs, after):
        args = module.get_args(
            ["--epochs", str(epochs), "--train-k", "4", "--train-k-after", after]
        )
        return [module.train_k(epoch, args) for epoch in range(1, epochs + 1)]

    assert ks(5, "3") == [1, 1, 1, 4, 4]  # the ELBO, then L_4
    assert ks(5, "0") == [4] * 5 and ks(5, "9") == [1] * 5
    assert ks(20, "10")[:5] == ks(5, "10")  # an epoch's K is not the run's length's


def test_the_conv_default_is_the_run_the_results_table_measured():
    """The Results table's conv rows trained on the ELBO for 10 epochs, then on L_2 for 10
    (at 6279afb): the default 20-epoch run still does; the MLP's trains on the ELBO alone."""
    args = vae_conv.get_args([])
    assert (args.epochs, args.train_k, args.train_k_after) == (20, 2, 10)
    assert [vae_conv.train_k(epoch, args) for epoch in range(1, 21)] == [1] * 10 + [2] * 10
    assert args.out == os.path.join("results", "vae_conv")
    args = vae_mlp.get_args([])
    assert [vae_mlp.train_k(epoch, args) for epoch in range(1, 21)] == [1] * 20


def test_train_k_after_is_the_elbo_run_step_for_step_up_to_e(data_dir, tmp_path):
    flags = ("--epochs", "2", "--latent-dim", "4", "--iw-samples", "0", "--train-k")
    elbo = train(vae_mlp, data_dir, tmp_path / "elbo", *flags, "1")["metrics"]
    late = train(vae_mlp, data_dir, tmp_path / "late", *flags, "3", "--train-k-after", "1")
    late = late["metrics"]
    assert late[0]["train_neg_elbo"] == elbo[0]["train_neg_elbo"]
    assert late[1]["train_neg_elbo"] != elbo[1]["train_neg_elbo"]


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
    write_idx(tmp_path / "FashionMNIST" / "raw")  # torchvision's layout for --dataset fashion
    args = vae_mlp.get_args(["--dataset", "fashion", "--data-dir", str(tmp_path)])
    assert torch.equal(common.load_data(args, "cpu")["test"][0], a["test"][0])
    write_idx(tmp_path / "big", size=32)  # any size: the models take the shape from the data
    args = vae_mlp.get_args(["--data-dir", str(tmp_path / "big")])
    assert common.load_data(args, "cpu")["train"][0].shape == (N_TRAIN, 1, 32, 32)
    assert args.shape == (1, 32, 32)


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
        "traversal.png": grid_size(2 * 11, 11),  # 2 rows (the latent's 2 dimensions) of 11
        "manifold.png": grid_size(20 * 20, 20),
        "latent.png": (500, 600),
        "loss.png": (400, 1000),
    }
    for png, (h, w) in expected.items():
        assert imread(tmp_path / png).shape[:2] == (h, w), png
    assert gif_frames(tmp_path / "samples.gif") == [grid_size(64, 8)] * 2  # one per epoch
    assert not [n for n in os.listdir(tmp_path) if n.startswith("samples_epoch")]
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and len(rows[0]) == 15
    assert all(math.isfinite(float(v)) for row in rows for v in row.values())
    t = rows[-1]
    test_terms = float(t["test_recon"]) + float(t["test_kl"])
    assert float(t["test_neg_elbo"]) == pytest.approx(test_terms)
    assert [r["epoch"] for r in result["metrics"]] == [1, 2]
    assert float(rows[1]["test_neg_elbo"]) < float(rows[0]["test_neg_elbo"])  # it learns
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
    test, mu = module.evaluate(rebuilt, x_test, args.likelihood)
    assert test["neg_elbo"] == pytest.approx(float(t["test_neg_elbo"]), rel=1e-5)
    assert mu.shape == (N_TEST, 2)


def gif_frames(path):
    """The (height, width) of each frame of a GIF."""
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        return [f.size[::-1] for f in ImageSequence.Iterator(gif)]


@pytest.mark.parametrize("n, nrow, padding, c", [(64, 8, 2, 1), (10, None, 2, 3), (7, 12, 2, 1),
                                                 (9, 3, 0, 3)])  # fmt: skip
def test_grids_are_laid_out_as_torchvision_does(n, nrow, padding, c, tmp_path):
    from torchvision.utils import save_image

    images = torch.rand(n, c, 28, 20, generator=torch.Generator().manual_seed(n))
    ours = common.save_grid(images, str(tmp_path), "ours.png", nrow, padding)
    save_image(
        images, tmp_path / "theirs.png", nrow=nrow or math.ceil(math.sqrt(n)), padding=padding
    )
    theirs = (imread(tmp_path / "theirs.png")[..., :c] * 255).round().reshape(ours.shape)
    assert ours.shape == theirs.shape and (ours == theirs).all()
    assert ((imread(tmp_path / "ours.png") * 255).round() == ours).all()  # and the PNG file


def test_gaussian_warmup_and_schedules_run(data_dir, tmp_path, capsys):
    argv = ["--likelihood", "gaussian", "--kl-warmup", "2", "--epochs", "3", "--lr", "0.002"]
    train(vae_mlp, data_dir, tmp_path, *argv, "--binarize", "dynamic")
    rows = read_metrics(tmp_path)  # the weight at the last of each epoch's 8 steps
    assert [float(r["kl_weight"]) for r in rows] == [7 / 16, 15 / 16, 1.0]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.002, 0.0015, 0.0005])
    assert float(rows[-1]["test_recon"]) > 784 * 0.5 * math.log(2 * math.pi)  # the constant
    assert "warning" not in capsys.readouterr().err


def test_a_typed_train_k_that_no_epoch_uses_is_warned_of(capsys):
    """`vae_conv.py --epochs 2 --train-k 5` trains on the ELBO alone: the header says so."""
    data = {"train": (torch.zeros(3, 1, 28, 28), None), "test": (torch.zeros(2, 1, 28, 28), None)}
    for argv, warned in (
        (["--epochs", "2", "--train-k", "5"], True),
        (["--epochs", "11", "--train-k", "5"], False),  # epoch 11 trains on L_5
        (["--epochs", "2", "--train-k", "5", "--train-k-after", "1"], False),
        (["--epochs", "2"], False),  # the default K, not typed
    ):
        common.print_header(vae_conv.get_args(argv), nn.Linear(1, 1), data)
        err = capsys.readouterr().err
        words = "warning: --train-k 5 applies only after epoch 10 (--train-k-after), so this"
        assert (words in err) is warned and err.count("\n") == warned, argv


def test_eval_only_and_generate(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path)
    capsys.readouterr()
    argv = ["--out", str(tmp_path), "--data-dir", data_dir]
    result = vae_mlp.main([*argv, "--eval-only", "--iw-samples", "4"])
    printed = capsys.readouterr().out
    assert "-ELBO" in printed and "IWAE" in printed and math.isfinite(result["iwae_nll"])
    assert vae_mlp.main(["--out", str(tmp_path), "--generate", "10"])["exit_code"] == 0
    assert imread(tmp_path / "generated.png").shape[:2] == grid_size(10, 4)
    assert capsys.readouterr().out == f"wrote 10 samples to {tmp_path}/generated.png\n"


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
    fast.to(memory_format=torch.channels_last)  # as main does
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


# ----------------------------------------------------------------------------
# Interrupt and resume, at epoch granularity


def final_numbers(out):
    rows = read_metrics(out)
    return [(r["epoch"], r["train_neg_elbo"], r["test_neg_elbo"], r["test_kl"]) for r in rows]


RESUMABLE = ["--epochs", "3", "--batch-size", "16", "--binarize", "dynamic", "--iw-samples", "4"]
RESUMABLE += ["--train-k", "2", "--train-k-after", "2"]  # epoch 3 on L_2: resumes cross the switch


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
    assert result["test"]["neg_elbo"] == ckpt["metrics"][0]["test_neg_elbo"]
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
    assert "stopped; nothing was saved" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


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
    assert f"stopped; {tmp_path / 'checkpoint.pt'} holds epoch 1; go on with: " in err
    assert shlex.split(err.split("go on with: ")[1])[-3:] == ["--eval-only", "--out", str(tmp_path)]
    assert load(tmp_path / "checkpoint.pt")["epoch"] == 1  # the trained model is kept


def test_nan_loss_stops_with_the_epoch_and_keeps_checkpoint(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--resume", "--epochs", "20"]
    code, err = exit_of(vae_mlp.main, [*argv, "--lr", "1e6"], capsys)
    go_on = shlex.split(err.split("try a lower rate: ")[1])  # the whole command
    expected = ["--data-dir", data_dir, "--epochs", "20", "--resume", "--lr", "500000"]
    assert code == 1 and go_on == ["python", "vae_mlp.py", *expected, "--out", str(tmp_path)]
    assert err.count("\n") == 1 and "the loss became nan in epoch 2: training" in err
    assert f"{tmp_path / 'checkpoint.pt'} keeps epoch 1;" in err  # what is on disk
    ckpt = load(tmp_path / "checkpoint.pt")  # the last good one
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_loss_in_epoch_1_says_nothing_was_saved(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path / "old", "--iw-samples", "0")  # an older run is there
    argv = ["--data-dir", data_dir, "--out", str(tmp_path / "old"), "--lr", "1e30"]
    code, err = exit_of(vae_mlp.main, argv, capsys)
    assert code == 1 and "in epoch 1: training diverged; nothing was saved" in err
    assert "keeps" not in err and not (tmp_path / "old" / "checkpoint.pt").exists()
    go_on = shlex.split(err.split("try a lower rate: ")[1])  # a new run: no --resume
    assert go_on == ["python", "vae_mlp.py", *argv[:2], "--lr", "5e+29", "--out", argv[3]]


@pytest.mark.parametrize("after_rename", [False, True])
def test_a_signal_while_the_checkpoint_is_written_names_the_epoch_on_disk(
    after_rename, data_dir, tmp_path, monkeypatch, capsys
):
    """Ctrl-C while epoch 2's checkpoint is written: before its rename the file still holds
    epoch 1, after it epoch 2; the message and what main returns say the same."""
    replace, calls = os.replace, []

    def replace_then_signal(src, dst):
        calls.append(dst) if str(dst).endswith("checkpoint.pt") else None
        if len(calls) == 2 and not after_rename:
            raise KeyboardInterrupt
        replace(src, dst)
        if len(calls) == 2 and after_rename:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_signal)
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "3", "--iw-samples", "0"]
    result = vae_mlp.main(argv)
    monkeypatch.undo()
    on_disk = 2 if after_rename else 1
    ckpt = load(tmp_path / "checkpoint.pt")
    assert result["exit_code"] == 130 and ckpt["epoch"] == on_disk
    assert f"holds epoch {on_disk}; go on with: " in capsys.readouterr().err
    assert [r["epoch"] for r in result["metrics"]] == list(range(1, on_disk + 1))
    assert result["test"]["neg_elbo"] == ckpt["metrics"][-1]["test_neg_elbo"]
    for name, value in result["model"].state_dict().items():
        assert torch.equal(value, ckpt["model"][name]), name
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_a_diverged_last_step_is_caught_before_anything_is_drawn_or_saved(
    data_dir, tmp_path, capsys
):
    """One step an epoch: the losses computed before each step never see what it did."""
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--iw-samples", "0"]
    argv += ["--batch-size", str(N_TRAIN)]
    code, err = exit_of(vae_mlp.main, [*argv, "--lr", "1e30"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "in epoch 1: training diverged; nothing was saved" in err
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "latent.png").exists()
    assert vae_mlp.main([*argv, "--epochs", "1"])["exit_code"] == 0
    code, err = exit_of(vae_mlp.main, [*argv, "--resume", "--epochs", "3", "--lr", "1e30"], capsys)
    assert code == 1 and f"in epoch 2: training diverged; {tmp_path}" in err
    assert "keeps epoch 1;" in err
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert vae_mlp.main([*argv, "--resume", "--epochs", "2", "--lr", "1e-3"])["exit_code"] == 0


def test_a_longer_resumed_run_trains_as_the_longer_run(data_dir, tmp_path, capsys):
    """README: after --epochs 2, --resume --epochs 6 trains epochs 3-6 as a new 6-epoch run
    trains them: its rate, KL weight and L_K epochs."""
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--iw-samples", "0", "--train-k", "2"]
    argv += ["--train-k-after", "1", "--kl-warmup", "3", "--batch-size", "64"]
    assert vae_mlp.main([*argv, "--epochs", "2"])["exit_code"] == 0
    rows = vae_mlp.main([*argv, "--resume", "--epochs", "6"])["metrics"]
    six = vae_mlp.get_args([*argv, "--epochs", "6"])
    two = vae_mlp.get_args([*argv, "--epochs", "2"])
    runs = [(two, 1), (two, 2), *((six, epoch) for epoch in range(3, 7))]
    assert [r["train_k"] for r in rows] == [vae_mlp.train_k(e, a) for a, e in runs]
    assert [r["train_k"] for r in rows] == [1, 2, 2, 2, 2, 2]
    assert [r["lr"] for r in rows] == pytest.approx([vae_mlp.learning_rate(e, a) for a, e in runs])
    kl_weights = [vae_mlp.kl_weight(e * 4 - 1, 4, a) for a, e in runs]  # at each last step
    assert [r["kl_weight"] for r in rows] == pytest.approx(kl_weights)
    assert [int(r["train_k"]) for r in read_metrics(tmp_path)] == [1, 2, 2, 2, 2, 2]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    common.atomic_write(path, lambda f: torch.save({"epoch": 1}, f))

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        common.atomic_write(path, lambda f: torch.save({"epoch": 2}, f))
    monkeypatch.undo()
    assert load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


# ----------------------------------------------------------------------------
# Bad input: one line on stderr naming the file or flag, exit 2 for flags and 1 otherwise,
# never a traceback, never a half-written file


def exit_of(main, argv, capsys):
    """(exit code, stderr) of a script run as from the shell, in this process."""
    try:
        code = common.run(main, argv)
    except SystemExit as e:  # a bad flag: argparse's exit
        code = e.code
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
    """[(case, script args, what stderr must name, exit code)]."""
    good = os.path.join(tmp, "good")
    mlp = os.path.join(tmp, "mlp")  # a trained vae_mlp run
    cases = []

    def data(name, edit, **kw):
        folder = os.path.join(tmp, name)
        write_idx(folder, gz=name.startswith("gz"), **kw)
        if edit:
            edit(folder)
        return folder

    def case(name, argv, names, code=1):
        cases.append((name, argv, names, code))

    def bad_data(name, folder, names):
        case(name, ["--data-dir", folder, "--out", os.path.join(folder, "out")], names)

    f = lambda d, n: os.path.join(d, n)  # noqa: E731
    d = data("gz-truncated", lambda d: truncate(f(d, "train-images-idx3-ubyte.gz"), 5000))
    bad_data("truncated .gz", d, f(d, "train-images-idx3-ubyte.gz"))
    d = data("gz-empty", lambda d: truncate(f(d, "t10k-labels-idx1-ubyte.gz"), 0))
    bad_data("empty .gz", d, f(d, "t10k-labels-idx1-ubyte.gz"))
    d = data("gz-magic", lambda d: open(f(d, "train-labels-idx1-ubyte.gz"), "wb").write(
        gzip.compress(b"\x00\x00\x08\x03" + bytes(100))))  # fmt: skip
    bad_data("wrong magic .gz", d, f(d, "train-labels-idx1-ubyte.gz"))
    d = data("plain-truncated", lambda d: truncate(f(d, "t10k-images-idx3-ubyte"), 1000))
    bad_data("truncated IDX", d, f(d, "t10k-images-idx3-ubyte"))
    d = data("plain-empty", lambda d: truncate(f(d, "train-labels-idx1-ubyte"), 0))
    bad_data("empty IDX", d, f(d, "train-labels-idx1-ubyte"))
    d = data("plain-magic", lambda d: open(f(d, "train-images-idx3-ubyte"), "r+b").write(b"PK"))
    bad_data("wrong magic IDX", d, f(d, "train-images-idx3-ubyte"))

    def folder_instead(d):
        os.remove(f(d, "t10k-images-idx3-ubyte"))
        os.makedirs(f(d, "t10k-images-idx3-ubyte"))

    d = data("folder", folder_instead)
    bad_data("a folder where a file is expected", d, "lacks t10k-images-idx3-ubyte.gz")
    d = data("three", lambda d: os.remove(f(d, "t10k-labels-idx1-ubyte")))
    bad_data("3 of the 4 files", d, "lacks t10k-labels-idx1-ubyte.gz")
    bad_data("no data", os.path.join(tmp, "empty"), "MNIST/raw")
    case("--data-dir is a file", ["--data-dir", f(good, "train-images-idx3-ubyte"), "--out",
         f(tmp, "df")], "no mnist data")  # fmt: skip
    x, _ = tiny_split(N_TRAIN - 1, 1)
    d = data("counts", lambda d: open(f(d, "train-images-idx3-ubyte"), "wb").write(idx_bytes(x)))
    bad_data("images and labels of different counts", d, "labels")
    bad_data("a 1-image test set", data("one", None, n_test=1), "1 test images, fewer than 2")
    case("--batch-size above the training set", ["--data-dir", good, "--out", f(tmp, "bs"),
         "--batch-size", "1000"], "fewer than 1000")  # fmt: skip
    blocker = f(tmp, "a-file")
    case("--out under a file", ["--data-dir", good, "--out", f(blocker, "out")], "--out")
    case("--out is a file", ["--data-dir", good, "--out", blocker], "--out: cannot write to")

    def ckpt(name, *extra):
        return ["--data-dir", good, "--out", f(tmp, name), *extra]

    case("no checkpoint", ckpt("none", "--eval-only"), f(tmp, "none/checkpoint.pt"))
    case("a truncated checkpoint", ckpt("trunc", "--resume"), f(tmp, "trunc/checkpoint.pt"))
    case("a foreign checkpoint", ckpt("foreign", "--generate", "4"), "not a checkpoint of vae_mlp")
    case("a code-running checkpoint", ckpt("evil", "--eval-only"), "could run code")
    case("another script's checkpoint", ckpt("conv", "--resume"), "not a checkpoint of vae_mlp")
    case("a mismatched checkpoint", ["--out", mlp, "--eval-only", "--latent-dim", "8"],
         "--latent-dim 20, not 8")  # fmt: skip
    further = f"to train further: python vae_mlp.py --data-dir {good} --resume --epochs 11"
    case("--resume past the last epoch", ["--out", mlp, "--data-dir", good, "--resume"], further)
    case("--device that is not there", ["--device", "cuda"], "--device cuda")
    for flags in (["--generate", "0"], ["--epochs", "0"], ["--lr", "nan"], ["--beta", "-1"],
                  ["--seed", "200000000000000"], ["--epoch", "3"], ["--latent", "8"],
                  ["--dataset", "cifar"], ["--iw-samples", "-1"], ["--train-k", "0"]):  # fmt: skip
        case(" ".join(flags), flags, flags[0], code=2)
    return cases


def test_bad_input_is_one_line(data_dir, tmp_path, capsys):
    """Each case as the command runs it: one line on stderr naming the file or flag, exit 2
    for a flag and 1 otherwise, never a traceback, a half-written file, or code run."""
    tmp = str(tmp_path)
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
    capsys.readouterr()
    for name, argv, names, code in bad_cases(tmp):
        got, err = exit_of(vae_mlp.main, argv, capsys)
        assert got == code and err.count("\n") == 1 and names in err, (name, err)
    assert not os.path.exists(os.path.join(tmp, "code-ran"))  # the crafted pickle never ran
    for root, _, files in os.walk(tmp):  # no temporary or half-written file anywhere
        assert not [n for n in files if n.endswith(".tmp")], (root, files)


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


def test_help_shows_each_scripts_defaults(capsys):
    assert vae_mlp.get_args([]).lr == 7e-3 and vae_conv.get_args([]).lr == 2e-3
    with pytest.raises(SystemExit):
        vae_mlp.get_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: 0.007)" in out and "--train-k K" in out and "--train-k-after E" in out
    assert "(default: None)" not in out and "(default: False)" not in out


# ----------------------------------------------------------------------------
# The same protocol on every device and platform


def test_each_epoch_draws_its_own_order_binarization_and_noise(data_dir, tmp_path, monkeypatch):
    """A CPU generator keeps only the low 32 bits of a seed: epoch seeds that differ above them
    would repeat epoch 1's randomness in every epoch."""
    draws, now = {}, {"epoch": 0}
    train_epoch = vae_mlp.train_epoch

    def in_epoch(model, opt, x, args, epoch, *rest):
        now["epoch"] = epoch
        return train_epoch(model, opt, x, args, epoch, *rest)

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


def test_no_float64_tensor_in_a_whole_run(data_dir, tmp_path):
    """Apple GPUs have no float64; vae_conv.py is vae_mlp.py's twin outside the model."""
    argv = ["--latent-dim", "2", "--binarize", "dynamic"]  # every picture, the 2-D ones too
    with Float64Finder() as finder:
        result = train(vae_conv, data_dir, tmp_path, *argv)
        vae_conv.main(["--out", str(tmp_path), "--data-dir", data_dir, "--eval-only"])
        vae_conv.main(["--out", str(tmp_path), "--generate", "4"])
    assert math.isfinite(result["iwae_nll"])
    assert not finder.found


def test_checkpoint_is_on_the_cpu(data_dir, tmp_path):
    train(vae_mlp, data_dir, tmp_path, "--epochs", "2", "--iw-samples", "0")
    ckpt = load(tmp_path / "checkpoint.pt")
    tensors = [*ckpt["model"].values()]
    tensors += [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    assert len(tensors) == 3 * len(ckpt["model"]) + len(ckpt["model"])  # weights, step, 2 moments
    assert all(t.device.type == "cpu" for t in tensors)
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is True  # fused Adam on the CPU


def test_a_new_run_replaces_the_old_run(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0", "--latent-dim", "2")  # 1 epoch
    vae_mlp.main(["--out", str(tmp_path), "--generate", "4"])
    before = sorted(os.listdir(tmp_path))
    argv = ["--out", str(tmp_path), "--data-dir", str(tmp_path / "metrics.csv")]  # a file
    code, err = exit_of(vae_mlp.main, argv, capsys)
    assert code == 1 and sorted(os.listdir(tmp_path)) == before  # a failed start removes nothing
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")  # 1 epoch, latent 20
    left = sorted(os.listdir(tmp_path))
    assert "manifold.png" not in left and "generated.png" not in left, left
    assert len(read_metrics(tmp_path)) == 1 and load(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_reading_a_run_finds_it_whatever_training_flags_are_added(data_dir, tmp_path, capsys):
    """--resume, --eval-only and --generate without --out read the run that the same command
    started: the folder named by the most typed flags that holds a checkpoint."""
    base = ["--data-dir", data_dir, "--epochs", "1", "--batch-size", "32", "--iw-samples", "0"]
    os.chdir(tmp_path)  # results/ here; pytest's tmp_path, restored below
    try:
        for flags in ([], ["--beta", "4"]):
            assert vae_mlp.main([*base, *flags])["exit_code"] == 0
        beta4 = os.path.join("results", "vae_mlp-beta4-batch-size32")
        resumed = vae_mlp.main([*base, "--beta", "4", "--resume", "--epochs", "2", "--lr", "1e-3"])
        assert [r["epoch"] for r in resumed["metrics"]] == [1, 2] and resumed["exit_code"] == 0
        assert load(os.path.join(beta4, "checkpoint.pt"))["epoch"] == 2
        for flags in (
            ["--eval-only", "--seed", "3"],
            ["--generate", "4", "--lr-schedule", "constant"],
        ):
            args = vae_mlp.get_args([*base, "--beta", "4", *flags])
            assert args.out == beta4, flags
        args = vae_mlp.get_args([*base, "--resume", "--lr", "1e-3"])  # no --beta 4: the other
        assert args.out == os.path.join("results", "vae_mlp-batch-size32")
        code, err = exit_of(vae_mlp.main, [*base, "--resume", "--latent-dim", "3"], capsys)
        assert code == 1 and "no checkpoint at results/vae_mlp-latent-dim3-batch-size32/" in err
    finally:
        os.chdir(HERE)


def test_the_binarized_test_set_is_the_same_for_every_seed(data_dir, tmp_path, monkeypatch):
    """The Results table's seeds score one test set: binarized once, whatever --seed."""
    seen, evaluate = {}, vae_mlp.evaluate

    def spy(model, x_test, *a, **kw):
        seen.setdefault(len(seen), x_test.clone())
        return evaluate(model, x_test, *a, **kw)

    monkeypatch.setattr(vae_mlp, "evaluate", spy)
    for seed in ("1", "2"):
        train(vae_mlp, data_dir, tmp_path / seed, "--binarize", "dynamic", "--seed", seed)
    assert set(seen[0].unique().tolist()) == {0, 255} and torch.equal(seen[0], seen[1])


def test_figures_are_drawn_after_the_first_and_last_epoch_and_every_few_minutes(
    data_dir, tmp_path, monkeypatch
):
    """The grids every epoch; samples.gif and the figures after the first and the last epoch,
    and after an epoch that ends DRAW_EVERY_S or more after they were last drawn."""
    drawn, loss_figure = [], common.loss_figure
    monkeypatch.setattr(
        common, "loss_figure", lambda rows: drawn.append(len(rows)) or loss_figure(rows)
    )
    argv = ("--epochs", "3", "--iw-samples", "0")
    train(vae_mlp, data_dir, tmp_path / "a", *argv)
    assert drawn == [1, 3] and common.DRAW_EVERY_S == 300
    assert len(gif_frames(tmp_path / "a" / "samples.gif")) == 3
    monkeypatch.setattr(common, "DRAW_EVERY_S", 0)
    train(vae_mlp, data_dir, tmp_path / "b", *argv)
    assert drawn == [1, 3, 1, 2, 3]
    assert not (tmp_path / "a" / "manifold.png").exists()  # latent 20: no manifold


def test_metrics_columns_measure_what_they_say(data_dir, tmp_path):
    result = train(vae_mlp, data_dir, tmp_path, "--epochs", "2", "--train-k", "3", "--beta", "2")
    rows = read_metrics(tmp_path)
    assert [r["train_k"] for r in rows] == ["3", "3"]
    for row in rows:  # the -ELBO's terms, whatever the epochs trained on (here L_3, beta 2)
        terms = float(row["train_recon"]) + float(row["train_kl"])
        assert float(row["train_neg_elbo"]) == pytest.approx(terms)
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


def test_traversal_sweeps_one_dimension_per_row():
    torch.manual_seed(0)
    model = vae_conv.VAE(latent_dim=12).eval()
    x = torch.rand(4, 1, 28, 28)
    unit = torch.randn(100, 12)
    unit = (unit - unit.mean(0)) / unit.std(0)  # each column: mean 0, variance exactly 1
    mu_test = unit * torch.linspace(0.1, 1.2, 12)  # so dimension 11 varies most, then 10, ...
    with torch.no_grad():
        mu0 = model.encode(x)[0][0]  # the first test image's posterior mean
    pictures = common.latent_grids(model.decode, mu0, mu_test)
    images, nrow = pictures["traversal.png"]
    assert nrow == 11 and len(images) == 10 * 11  # the 10 most used dimensions, most first
    with torch.no_grad():
        mu = model.encode(x)[0][0]  # the first test image's posterior mean
        for row, u in enumerate(range(11, 1, -1)):
            z = mu.repeat(11, 1)
            z[:, u] = torch.linspace(-2.5, 2.5, 11)  # this row's dimension, and only it
            expected = torch.sigmoid(model.decode(z))
            torch.testing.assert_close(images[row * 11 : (row + 1) * 11], expected)


def test_manifold_covers_the_test_means():
    torch.manual_seed(0)
    model = vae_mlp.VAE(latent_dim=2).eval()
    mu_test = torch.tensor([[-3.0, 0.5], [1.0, -1.0], [2.0, 4.0]])
    pictures = common.latent_grids(model.decode, torch.zeros(2), mu_test)
    images, nrow = pictures["manifold.png"]
    assert (nrow, images.shape) == (20, (400, 1, 28, 28))
    corners = torch.tensor([[-3.0, 4.0], [2.0, 4.0], [-3.0, -1.0], [2.0, -1.0]])
    with torch.no_grad():  # row 0 is the top: z[1] = 4; z[0] grows left to right
        expected = torch.sigmoid(model.decode(corners))
    torch.testing.assert_close(images[[0, 19, 380, 399]], expected)


@pytest.mark.parametrize("module", SCRIPTS.values())
def test_interpolations_and_reconstructions_by_hand(module):
    torch.manual_seed(0)
    model = module.VAE(latent_dim=5).eval()
    x = torch.rand(6, 1, 28, 28)  # 3 pairs
    pictures = module.grids(model, x, torch.randn(64, 5))
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
            return common.save_grid(torch.sigmoid(model.decode(z)), str(tmp_path), "z.png", 8)

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

    for name in ("loss_figure", "latent_figure"):
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
    --batch-size, --train-k and --train-k-after and the script's name, nothing else."""

    def shared(name):
        with open(os.path.join(HERE, name)) as f:
            text = f.read()
        start, end = text.index("class VAE(nn.Module):"), text.index("    def encode(self, x):")
        text = text[:start] + text[end:]  # the model's layers
        flags = ("channels", "hidden-dim", "latent-dim", "lr", "batch-size", "train-k")
        flags += ("train-k-after", "image-size")
        own = [*(f'"--{f}",' for f in flags), "vae_mlp", "vae_conv", "MODEL_FLAGS ="]
        own += ["fully-connected", "convolutional", "Adam's learning rate (", "Adam step ("]
        own += ["side of a folder's images"]
        return [line for line in text.splitlines() if not any(w in line for w in own)]

    assert shared("vae_mlp.py") == shared("vae_conv.py")


def test_printed_commands_are_quoted_for_the_shell():
    args = vae_mlp.get_args(["--out", "results/vae mlp", "--data-dir", "my data", "--lr=0.01"])
    words = ["python", "vae_mlp.py", "--data-dir", "my data", "--lr=0.01", "--resume"]
    assert shlex.split(common.command(args, "--resume")) == [*words, "--out", "results/vae mlp"]


def test_no_torchvision_and_no_data_is_one_line(tmp_path, monkeypatch):
    """README: torchvision is needed only to download."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    args = vae_mlp.get_args(["--data-dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="no mnist data: .*/ lacks train-images"):
        common.load_data(args, "cpu")
    write_idx(tmp_path / "MNIST" / "raw")
    assert len(common.load_data(args, "cpu")["test"][0]) == N_TEST  # files on disk: no need


def test_loss_png_draws_each_term_of_each_epoch():
    terms = {"recon": 1.0, "kl": 2.0, "neg_elbo": 3.0}
    rows = [{"epoch": e, **{f"{s}_{k}": v * e for s in ("train", "test") for k, v in terms.items()}}
            for e in (1, 2, 3)]  # fmt: skip
    total, terms = common.loss_figure(rows).axes
    lines = {
        line.get_label(): line.get_ydata().tolist() for ax in (total, terms) for line in ax.lines
    }
    assert lines == {f"{s} {n}": [v, 2 * v, 3 * v] for s in ("train", "test")
                     for n, v in (("recon", 1), ("KL", 2), ("-ELBO", 3))}  # fmt: skip


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


def test_the_readme_speed_table_is_the_benchmark_records():
    """Each row of the README's CPU speed table is one row that benchmarks/speed.py wrote into
    benchmarks/RESULTS.md: the same script and every one of its numbers (a time typed into the
    README, or kept from an older run, fails)."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(HERE, "benchmarks", "RESULTS.md")) as f:
        records = [line.split("|")[1:-1] for line in f if re.match(r"\| (mlp|conv) \|", line)]
    start = readme.index("## Speed")
    section = readme[start : readme.index("On a GPU", start)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) == 4, rows  # time to the tutorial's quality: 2 per script
    for row in rows:
        case = re.search(r"vae_(mlp|conv)", row).group(1)
        numbers = set(re.findall(r"\d+\.\d+", row))
        assert numbers, row
        assert any(
            cells[0].strip() == case and numbers <= {c.strip().rstrip("x") for c in cells}
            for cells in records
        ), row


def test_the_readme_flags_table_gives_the_defaults_and_every_flag_of_help(capsys):
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
            if not flags or not cell or "<" in cell or "DIR" in cell:
                continue  # no default, or one made from others (--out)
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
    typed = set(re.findall(r"`(--[a-z][a-z-]*)", table))  # and every flag of --help, no other
    for module in SCRIPTS.values():
        with pytest.raises(SystemExit):
            module.get_args(["--help"])
    helps = set(re.findall(r"  (--[a-z][a-z-]*)", capsys.readouterr().out)) - {"--help"}
    assert typed == helps


# ----------------------------------------------------------------------------
# The prepared GPU check runs end to end on a CPU


def gpu_check(data_dir, tmp_path, *flags):
    """benchmarks/gpu_check.py on the CPU with the MLP only, one epoch: exit 0 and a whole
    report; for each of its four tables, the cells after "vae_mlp" of each row that has it."""
    report = tmp_path / "report.md"
    cmd = [sys.executable, os.path.join(HERE, "benchmarks", "gpu_check.py"), "--device", "cpu",
           "--data-dir", data_dir, "--scratch", str(tmp_path / "scratch"), "--report",
           str(report), "--scripts", "vae_mlp", "--epochs", "1", *flags]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = report.read_text()
    assert text in done.stdout  # the same report on stdout
    sections = ("1. `python SCRIPT.py --epochs 1`", "2. `python SCRIPT.py --eval-only", "3. cpu")
    for part in ("### GPU check: CPU only", "torch ", "Python ", *sections, "4. The shortest"):
        assert part in text, part
    assert "not run yet" not in text and "vae_conv" not in text
    tables = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("| ")]
        if lines:
            cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
            tables.append([row[1:] for row in cells if row[0] == "vae_mlp"])
    assert len(tables) == 4, text
    return tables


def test_gpu_check_runs_on_a_cpu_and_reports_every_case(data_dir, tmp_path):
    """The CPU smoke mode of gpu_check.py (default, bound, check; the MLP only): exit 0, and
    each case it ran with its numbers in its own table, the case it did not run said so. On a
    CPU the check compares the default run with itself when it has the check's epochs."""
    flags = ["--check-epochs", "1", "--bound-k", "10", "--cases", "default", "bound", "check"]
    default, bound, check, quality = gpu_check(data_dir, tmp_path, *flags)
    assert len(default) == len(bound) == len(check) == len(quality) == 1
    wall, startup, s_epoch, images_s, peak, elbo, bound_s, nll = default[0]
    assert 0 < float(startup) < float(wall) and float(s_epoch) > 0 and float(images_s) > 0
    assert float(peak) > 0 and float(bound_s) >= 0 and nll.endswith(" (K=10)")
    assert 0 < float(nll.split()[0]) < 784 * math.log(2)  # a bound, below a coin per pixel
    wall, bound_s, peak, test_elbo, nll_again = bound[0]  # --eval-only on its checkpoint
    assert float(wall) > float(bound_s) >= 0 and float(peak) > 0
    assert (test_elbo, nll_again) == (elbo, nll)  # the same model, data and noise
    dev_elbo, cpu_elbo, difference, verdict, files, dev_wall, cpu_wall = check[0]
    assert (verdict, files, difference) == ("PASS", "all present", "0.00")
    assert dev_elbo == cpu_elbo == elbo and dev_wall == cpu_wall == default[0][0]  # one run
    assert 0 < float(dev_wall) and quality == [["skipped: not in --cases"]]


# ----------------------------------------------------------------------------
# Your own images: --dataset folder


def draw_images(folder, n, colour, seed=0):
    """n PIL-drawn images of mixed sizes and modes: a disc on a background, grey or coloured."""
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        w, h, r, c = (int(v) for v in torch.randint(20, 60, (4,), generator=g))
        mode = ("RGB", "RGBA", "P")[i % 3] if colour else ("L", "RGB")[i % 2]
        image = Image.new("RGB", (w, h), (c, c, c))
        fill = (255, 4 * c, 0) if colour else (250, 250, 250)
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, w // 4 + r // 2, h // 4 + r // 2), fill)
        image.convert(mode).save(os.path.join(folder, f"{i:03d}.{('png', 'bmp')[i % 2]}"))


def test_a_folder_of_colour_images_trains_resumes_and_generates(tmp_path, monkeypatch, capsys):
    """Labels from subfolders, a fixed 10% test split, RGB pictures, the folder in the default
    --out, the shape in the checkpoint: --generate needs no images."""
    draw_images(tmp_path / "shapes" / "red", 30, colour=True)
    draw_images(tmp_path / "shapes" / "grey", 20, colour=False, seed=1)
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "folder", "--data-dir", "shapes", "--image-size", "16"]
    argv += ["--batch-size", "8", "--iw-samples", "2", "--latent-dim", "2"]
    for name, module in SCRIPTS.items():
        capsys.readouterr()
        assert module.main([*argv, "--epochs", "1"])["exit_code"] == 0
        out = tmp_path / "results" / f"{name}-latent-dim2-folder-shapes-image-size16-batch-size8"
        header = capsys.readouterr().out.splitlines()[0]
        assert "shapes: 45 train / 5 test images, RGB 16x16" in header, header
        result = module.main([*argv, "--epochs", "2", "--resume"])
        assert result["exit_code"] == 0 and len(result["metrics"]) == 2
        samples = imread(out / "samples.png")
        assert samples.shape == (*grid_size(64, 8, size=16), 3)
        assert not (samples[..., 0] == samples[..., 1]).all()  # in colour
        for png in ("traversal.png", "manifold.png", "interpolation.png", "latent.png"):
            assert imread(out / png).shape[2] in (3, 4), png
        assert load(out / "checkpoint.pt")["config"]["shape"] == (3, 16, 16)
        os.rename("shapes", "elsewhere")  # sampling needs only the checkpoint
        assert module.main([*argv, "--generate", "9"])["exit_code"] == 0
        assert imread(out / "generated.png").shape == (*grid_size(9, 3, size=16), 3)
        os.rename("elsewhere", "shapes")


def test_the_folder_split_and_labels(tmp_path):
    draw_images(tmp_path / "a" / "cats", 25, colour=False)
    draw_images(tmp_path / "a" / "dogs", 15, colour=False, seed=1)
    for seed in ("1", "7"):  # the same test images whatever --seed
        argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "a"), "--batch-size", "8"]
        data = common.load_data(vae_mlp.get_args([*argv, "--seed", seed]), "cpu")
        (x, y), (x_test, y_test) = data["train"], data["test"]
        assert x.shape == (36, 1, 32, 32) and x_test.shape == (4, 1, 32, 32)  # grey: one channel
        assert sorted(y.tolist() + y_test.tolist()) == [0] * 25 + [1] * 15  # cats 0, dogs 1
        if seed == "1":
            first = x_test
        assert torch.equal(x_test, first)
    draw_images(tmp_path / "b" / "train", 12, colour=True)  # train/ and test/: the two splits
    draw_images(tmp_path / "b" / "test", 3, colour=True, seed=1)
    args = vae_mlp.get_args(["--dataset", "folder", "--data-dir", str(tmp_path / "b")])
    args.batch_size = 4
    data = common.load_data(args, "cpu")
    assert data["train"][0].shape == (12, 3, 32, 32) and data["test"][0].shape == (3, 3, 32, 32)
    assert (data["test"][1] == -1).all() and args.shape == (3, 32, 32)  # no labels
    fig = common.latent_figure(torch.randn(3, 4), data["test"][1])  # one colour, no legend
    assert fig.axes[0].get_legend() is None and len(fig.axes[0].lines) == 1


def test_mnist_exported_as_png_is_the_idx_data(tmp_path):
    """train/<label>/<i>.png and test/...: at --image-size 28 the very same uint8 tensors."""
    from PIL import Image

    write_idx(tmp_path / "idx")
    args = vae_mlp.get_args(["--data-dir", str(tmp_path / "idx")])
    idx = common.load_data(args, "cpu")
    for split, (x, y) in idx.items():
        for i, (image, label) in enumerate(zip(x, y.tolist())):
            os.makedirs(tmp_path / "png" / split / str(label), exist_ok=True)
            Image.fromarray(image[0].numpy()).save(
                tmp_path / "png" / split / str(label) / f"{i:05d}.png"
            )
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "png"), "--image-size", "28"]
    png = common.load_data(vae_mlp.get_args(argv), "cpu")
    for split, (x, y) in idx.items():
        order = y.argsort(stable=True)  # the folder's order: by label, then by file name
        assert torch.equal(png[split][0], x[order]) and torch.equal(png[split][1], y[order])


def test_bad_folders_are_one_line(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    draw_images(tmp_path / "few", 10, colour=True)
    draw_images(tmp_path / "broken", 40, colour=True)
    (tmp_path / "broken" / "bad.png").write_bytes(b"\x89PNG not really")
    os.makedirs(tmp_path / "all-broken")
    (tmp_path / "all-broken" / "bad.png").write_bytes(b"\x89PNG not really")
    cases = [
        (vae_mlp, ["--data-dir", str(tmp_path / "empty")], 1, "no images under"),
        (vae_mlp, ["--data-dir", str(tmp_path / "all-broken")], 1, "no readable images under"),
        (vae_mlp, ["--data-dir", str(tmp_path / "few")], 1, "9 train images, fewer than 128"),
        (vae_conv, ["--data-dir", str(tmp_path / "few"), "--image-size", "30"], 2, "multiple of 4"),
    ]
    for module, argv, code, words in cases:
        argv = ["--dataset", "folder", *argv, "--out", str(tmp_path / "out")]
        got, err = exit_of(module.main, argv, capsys)
        assert got == code and err.count("\n") == 1 and words in err, err
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "broken"), "--batch-size", "8"]
    argv += ["--epochs", "1", "--iw-samples", "0", "--out", str(tmp_path / "out")]
    assert vae_mlp.main(argv)["exit_code"] == 0
    err = capsys.readouterr().err  # skipped with a count, the file named
    assert f"warning: skipped 1 unreadable images, such as {tmp_path}/broken/bad.png" in err
