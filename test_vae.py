"""Tests for vae_mlp.py, vae_conv.py and common.py. CPU only, no network: pytest -q"""

import csv
import gzip
import math
import os
import re
import signal
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from matplotlib.image import imread

import common
import vae_conv
import vae_mlp

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"vae_mlp": vae_mlp, "vae_conv": vae_conv}
N_TRAIN, N_TEST = 256, 64

# ----------------------------------------------------------------------------
# A tiny dataset in the real IDX format, so torchvision's readers run


def idx_bytes(t):
    """IDX (SN3 "Pascal Vincent") encoding of a uint8 tensor: magic, big-endian dims, data."""
    header = struct.pack(">I", 0x0800 + t.dim()) + b"".join(struct.pack(">I", d) for d in t.shape)
    return header + t.contiguous().numpy().tobytes()


def tiny_split(n, seed):
    """n 28x28 images of a bright disc whose place depends on the label, with noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    cx = 7 + 14 * (y % 5).float() / 4
    cy = 9 + 10 * (y // 5).float()
    disc = ((rows - cy[:, None, None]) ** 2 + (cols - cx[:, None, None]) ** 2 < 25).float()
    x = (disc * 200 + torch.rand(n, 28, 28, generator=g) * 55).to(torch.uint8)
    return x, y.to(torch.uint8)


def write_idx(folder, n_train=N_TRAIN, n_test=N_TEST, gz=False):
    os.makedirs(folder, exist_ok=True)
    for (images, labels), (n, seed) in zip(common.SPLITS.values(), ((n_train, 1), (n_test, 2))):
        x, y = tiny_split(n, seed)
        for name, t in ((images, x), (labels, y)):
            data = idx_bytes(t)
            if gz:
                with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_idx(root / "MNIST" / "raw")  # torchvision's layout
    return str(root)


def run_script(name, *args, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def train(module, data_dir, out, *extra):
    args = ["--data-dir", data_dir, "--out", str(out), "--epochs", "1", "--batch-size", "32", "--iw-samples", "4", *extra]
    assert module.main(args) == 0


def read_metrics(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("latent_dim", [1, 2, 20])
@pytest.mark.parametrize("batch", [1, 5])
def test_shapes(name, latent_dim, batch):
    model = SCRIPTS[name].VAE(latent_dim=latent_dim)
    x = torch.rand(batch, 1, 28, 28)
    logits, mu, logvar = model(x)
    assert logits.shape == (batch, 1, 28, 28)
    assert mu.shape == logvar.shape == (batch, latent_dim)
    assert model.decode(torch.randn(batch, latent_dim)).shape == (batch, 1, 28, 28)


def test_kl_closed_form_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(common.kl_std_normal(mu, logvar), expected)
    assert torch.all(common.kl_std_normal(torch.zeros(3, 4), torch.zeros(3, 4)) == 0)


def test_bernoulli_reconstruction_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    x = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    # -sum_i [x_i log s(l_i) + (1 - x_i) log(1 - s(l_i))], s = sigmoid, written out per row
    p = lambda l: 1 / (1 + math.exp(-l))
    row0 = -math.log(p(0.0)) - math.log(1 - p(2.0))
    row1 = -(0.5 * math.log(p(-1.0)) + 0.5 * math.log(1 - p(-1.0))) - math.log(p(3.0))
    torch.testing.assert_close(common.recon_nll(logits, x), torch.tensor([row0, row1]))
    # stable where sigmoid-then-BCE gives log(0)
    assert torch.isfinite(common.recon_nll(torch.tensor([[200.0, -200.0]]), torch.tensor([[0.0, 1.0]]))).all()


def test_gaussian_likelihood_is_normal_log_prob():
    g = torch.Generator().manual_seed(1)
    logits, x = torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, 1, 28, 28, generator=g)
    expected = -Normal(torch.sigmoid(logits), 1.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(common.recon_nll(logits, x, "gaussian"), expected)


@pytest.mark.parametrize("name", SCRIPTS)
def test_gradients_reach_encoder_through_sampling(name):
    model = SCRIPTS[name].VAE()
    x = torch.rand(4, 1, 28, 28)
    logits, mu, logvar = model(x)
    common.recon_nll(logits, x).mean().backward()  # no KL: the gradient must flow through z
    first = model.encoder[1] if name == "vae_mlp" else model.encoder[0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_log_normal_matches_torch_distributions():
    z, mu, logvar = torch.randn(3, 6), torch.randn(3, 6), torch.randn(3, 6)
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(common.log_normal(z, mu, logvar), expected)


# ----------------------------------------------------------------------------
# Importance-weighted bound


@pytest.mark.parametrize("name", SCRIPTS)
def test_iwae_k1_is_single_sample_elbo(name):
    module = SCRIPTS[name]
    torch.manual_seed(0)
    model = module.VAE(latent_dim=3).eval()
    x_u8 = (torch.rand(10, 1, 28, 28) > 0.5).to(torch.uint8) * 255
    nll = module.iwae_nll(model, x_u8, 1, "bernoulli")
    # the same eps as iwae_nll draws: the evaluation generator, one (1, B, D) draw
    x = common.to_float(x_u8)
    mu, logvar = model.encode(x)
    eps = torch.randn((1, *mu.shape), generator=common.eval_generator(x.device))[0]
    z = mu + torch.exp(0.5 * logvar) * eps
    elbo = (-common.recon_nll(model.decode(z), x) + Normal(0.0, 1.0).log_prob(z).sum(1)
            - Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(1))
    assert nll == pytest.approx(-elbo.mean().item(), rel=1e-5)


@pytest.mark.parametrize("name", SCRIPTS)
def test_iwae_bound_tightens_with_k_and_chunking_agrees(name):
    module = SCRIPTS[name]
    torch.manual_seed(0)
    model = module.VAE(latent_dim=4).eval()
    x_u8 = (torch.rand(40, 1, 28, 28) > 0.7).to(torch.uint8) * 255
    nlls = [module.iwae_nll(model, x_u8, k, "bernoulli") for k in (1, 10, 100)]
    assert nlls[0] > nlls[1] > nlls[2]  # L_1 <= L_10 <= L_100 on average
    whole = module.iwae_nll(model, x_u8, 50, "bernoulli", batch_size=40, max_images=40 * 50)
    chunked = module.iwae_nll(model, x_u8, 50, "bernoulli", batch_size=40, max_images=40 * 7)
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_chunk_sizes():
    assert common.chunk_sizes(10, 4) == [4, 4, 2]
    assert common.chunk_sizes(3, 5) == [3]


# ----------------------------------------------------------------------------
# Data


def test_loads_torchvision_layout_and_flat_gz_folder(data_dir, tmp_path):
    a = common.load_data("mnist", data_dir, "cpu")
    write_idx(tmp_path / "flat", gz=True)  # like Debian's /usr/share/datasets/fashion-mnist/
    b = common.load_data("fashion", str(tmp_path / "flat"), "cpu")
    x, y = tiny_split(N_TRAIN, 1)
    assert a["train"][0].shape == (N_TRAIN, 1, 28, 28) and a["train"][0].dtype == torch.uint8
    assert torch.equal(a["train"][0][:, 0], x) and torch.equal(a["train"][1], y.long())
    for split in ("train", "test"):
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])


def test_dynamic_binarization(data_dir):
    d1 = common.load_data("mnist", data_dir, "cpu", binarize="dynamic")
    d2 = common.load_data("mnist", data_dir, "cpu", binarize="dynamic")
    assert torch.equal(d1["test"][0], d2["test"][0])  # the binarized test set is fixed
    assert set(d1["test"][0].unique().tolist()) <= {0, 255}
    x_u8 = d1["train"][0][:64]
    a, b = common.to_float(x_u8, "dynamic"), common.to_float(x_u8, "dynamic")
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, b)  # a fresh sample every batch
    assert torch.equal(common.to_float(x_u8), x_u8.float() / 255)


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    batches = common.epoch_order(100, 32, seed=1, epoch=1, device="cpu")
    assert len(batches) == 3 and all(len(b) == 32 for b in batches)  # the last 4 are dropped
    assert len(torch.cat(batches).unique()) == 96
    assert all(torch.equal(a, b) for a, b in zip(batches, common.epoch_order(100, 32, 1, 1, "cpu")))
    assert not torch.equal(batches[0], common.epoch_order(100, 32, 1, 2, "cpu")[0])
    assert len(common.epoch_order(10, 32, 1, 1, "cpu")[0]) == 10  # smaller than one batch


def test_missing_data_is_one_line_exit_1(tmp_path):
    r = run_script("vae_mlp", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte.gz" in lines[0] and "MNIST/raw" in lines[0]


def test_corrupt_and_mismatched_data_files(tmp_path):
    folder = tmp_path / "bad"
    write_idx(folder)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(common.UserError, match="not a valid IDX file"):
        common.load_data("mnist", str(folder), "cpu")
    write_idx(folder)
    x, _ = tiny_split(N_TRAIN - 1, 1)
    path.write_bytes(idx_bytes(x))  # one image fewer than labels
    with pytest.raises(common.UserError, match=f"{N_TRAIN - 1} images but .* {N_TRAIN} labels"):
        common.load_data("mnist", str(folder), "cpu")
    r = run_script("vae_mlp", "--data-dir", str(folder), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "labels" in r.stderr


# ----------------------------------------------------------------------------
# End to end: each script's main on the tiny dataset


def grid_size(n, nrow, padding=2, size=28):
    """(height, width) of torchvision's make_grid for n images of `size`."""
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    return rows * (size + padding) + padding, cols * (size + padding) + padding


@pytest.mark.parametrize("name", SCRIPTS)
def test_end_to_end(name, data_dir, tmp_path):
    module = SCRIPTS[name]
    out = tmp_path / "out"
    train(module, data_dir, out, "--latent-dim", "2")
    expected = {
        "samples.png": grid_size(64, 8),
        "samples_epoch_01.png": grid_size(64, 8),
        "reconstructions.png": grid_size(32, 8),
        "interpolation.png": grid_size(8 * 12, 12),
        "manifold.png": (20 * 28, 20 * 28),
        "latent.png": (500, 600),
        "loss.png": (400, 1000),
    }
    for png, (h, w) in expected.items():
        assert imread(out / png).shape[:2] == (h, w), png
    rows = read_metrics(out)
    assert len(rows) == 1 and set(rows[0]) == set(common.METRIC_FIELDS)
    assert all(math.isfinite(float(v)) for v in rows[0].values())
    t = rows[0]
    assert float(t["test_loss"]) == pytest.approx(float(t["test_recon"]) + float(t["test_kl"]), rel=1e-5)

    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["script"] == name and ckpt["epoch"] == 1 and ckpt["config"]["latent_dim"] == 2
    assert math.isfinite(ckpt["final"]["iwae_nll"])
    rebuilt = module.VAE(**ckpt["config"])
    rebuilt.load_state_dict(ckpt["model"])
    z = torch.randn(5, 2)
    original = module.VAE(**ckpt["config"])
    original.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    torch.testing.assert_close(rebuilt.decode(z), original.decode(z), rtol=0, atol=0)
    # and the same test numbers as training printed
    args = module.get_args(["--likelihood", "bernoulli"])
    x_test = common.load_data("mnist", data_dir, "cpu")["test"][0]
    assert module.evaluate(rebuilt, x_test, args)["loss"] == pytest.approx(float(t["test_loss"]), rel=1e-5)


def test_latent_above_two_dims_has_no_manifold(data_dir, tmp_path):
    train(vae_mlp, data_dir, tmp_path, "--latent-dim", "3", "--iw-samples", "0")
    assert (tmp_path / "latent.png").exists() and not (tmp_path / "manifold.png").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["final"] is None


def test_training_lowers_the_loss(data_dir, tmp_path):
    train(vae_mlp, data_dir, tmp_path, "--epochs", "3", "--iw-samples", "0")
    losses = [float(r["test_loss"]) for r in read_metrics(tmp_path)]
    assert losses[-1] < losses[0]


def test_gaussian_warmup_and_schedules_run(data_dir, tmp_path):
    train(vae_mlp, data_dir, tmp_path, "--likelihood", "gaussian", "--kl-warmup", "2", "--epochs", "2", "--binarize", "dynamic",
          "--lr-schedule", "cosine", "--lr", "0.002")
    rows = read_metrics(tmp_path)
    assert [float(r["kl_weight"]) for r in rows] == [0.5, 1.0]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.002, 0.001])  # cos(0), cos(pi/2)
    assert float(rows[-1]["test_recon"]) > 784 * 0.5 * math.log(2 * math.pi)  # the Gaussian constant


def test_eval_only_and_generate(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path)
    capsys.readouterr()
    assert vae_mlp.main(["--out", str(tmp_path), "--data-dir", data_dir, "--eval-only", "--iw-samples", "4"]) == 0
    printed = capsys.readouterr().out
    assert "-ELBO" in printed and "IWAE" in printed
    assert vae_mlp.main(["--out", str(tmp_path), "--generate", "10"]) == 0
    assert imread(tmp_path / "generated.png").shape[:2] == grid_size(10, 4)


# ----------------------------------------------------------------------------
# Bad input: one line, exit 2 for flags and 1 otherwise, never a traceback


def exit_of(main, argv, capsys):
    """(exit code, stderr) of a script run as from the shell, in this process."""
    with pytest.raises(SystemExit) as e:
        common.run(lambda: main(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


@pytest.mark.parametrize("flags", [
    ["--epochs", "0"], ["--epochs", "-3"], ["--batch-size", "0"], ["--latent-dim", "0"],
    ["--lr", "0"], ["--lr", "-1e-3"], ["--beta", "-1"], ["--epochs", "ten"], ["--lr", "nan"],
    ["--dataset", "cifar"], ["--device", "tpu"], ["--iw-samples", "-1"],
])
def test_bad_flags_exit_2(flags, capsys):
    code, err = exit_of(vae_conv.main, flags, capsys)
    assert code == 2 and flags[0] in err


def test_bad_flag_from_the_shell():
    r = run_script("vae_mlp", "--batch-size", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--batch-size" in r.stderr


def test_each_script_keeps_its_own_learning_rate(capsys):
    # the measured best of benchmarks/RESULTS.md: 3e-3 for the MLP, 1e-3 for the conv net
    assert vae_mlp.get_args([]).lr == 3e-3 and vae_conv.get_args([]).lr == 1e-3
    assert vae_mlp.get_args(["--lr", "1e-4"]).lr == 1e-4
    with pytest.raises(SystemExit):
        vae_mlp.get_args(["--help"])
    assert "(default: 0.003)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_missing_gpu_is_one_line_exit_1(tmp_path, capsys):
    code, err = exit_of(vae_mlp.main, ["--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 1 and err.strip().count("\n") == 0 and "--device cuda" in err


def test_unwritable_out_fails_before_training(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = exit_of(vae_mlp.main, ["--data-dir", data_dir, "--out", str(blocker / "out")], capsys)
    assert code == 1 and "cannot write to output folder" in err


def test_bad_checkpoints_say_what_is_wrong(data_dir, tmp_path, capsys):
    mlp, conv = tmp_path / "mlp", tmp_path / "conv"
    train(vae_mlp, data_dir, mlp, "--iw-samples", "0")
    train(vae_conv, data_dir, conv, "--iw-samples", "0", "--latent-dim", "4")
    capsys.readouterr()
    cases = {
        "no checkpoint at": (vae_mlp, ["--eval-only", "--out", str(tmp_path / "none")]),
        "written by vae_conv.py, not vae_mlp.py": (vae_mlp, ["--resume", "--checkpoint", str(conv / "checkpoint.pt")]),
        "trained with --latent-dim 4, not 8": (vae_conv, ["--eval-only", "--out", str(conv), "--latent-dim", "8"]),
        "trained with --dataset mnist, not fashion": (vae_mlp, ["--resume", "--out", str(mlp), "--dataset", "fashion"]),
    }
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((mlp / "checkpoint.pt").read_bytes()[:5000])
    cases["it may be truncated"] = (vae_mlp, ["--eval-only", "--checkpoint", str(truncated)])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    cases["not a checkpoint written by these scripts"] = (vae_mlp, ["--generate", "4", "--checkpoint", str(foreign)])
    for message, (module, argv) in cases.items():
        code, err = exit_of(module.main, ["--data-dir", data_dir, *argv], capsys)
        assert code == 1 and message in err, (argv, err)


def test_nan_loss_stops_with_epoch_batch_and_keeps_checkpoint(data_dir, tmp_path, capsys):
    train(vae_mlp, data_dir, tmp_path, "--iw-samples", "0")
    code, err = exit_of(vae_mlp.main, ["--data-dir", data_dir, "--out", str(tmp_path), "--resume", "--epochs", "20",
                                       "--lr", "1e6"], capsys)
    assert code == 1 and re.search(r"loss became (nan|inf|-inf) at epoch \d+, batch \d+", err) and "lower --lr" in err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)  # the last good one
    assert ckpt["epoch"] < 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"epoch": 1})

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        common.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


# ----------------------------------------------------------------------------
# Fast paths compute what the plain path computes


def test_learning_rate_schedules():
    assert [common.learning_rate(e, 1e-3, 4, "constant") for e in (1, 4)] == [1e-3, 1e-3]
    cosine = [common.learning_rate(e, 1e-3, 4, "cosine") for e in (1, 2, 3, 4)]
    assert cosine[0] == 1e-3 and all(a > b > 0 for a, b in zip(cosine, cosine[1:]))


def loss_and_grads(model, x, eps_seed=0):
    logits, mu, logvar = model(x, generator=torch.Generator().manual_seed(eps_seed))
    loss = (common.recon_nll(logits, x) + common.kl_std_normal(mu, logvar)).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads


@pytest.mark.parametrize("name", SCRIPTS)
def test_channels_last_gives_the_same_loss_and_gradients(name):
    torch.manual_seed(0)
    plain = SCRIPTS[name].VAE()
    fast = SCRIPTS[name].VAE()
    fast.load_state_dict(plain.state_dict())
    common.speed_up(fast, False, torch.device("cpu"))
    if name == "vae_conv":
        assert fast.encoder[2].weight.is_contiguous(memory_format=torch.channels_last)
        assert not plain.encoder[2].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(16, 1, 28, 28)
    (l1, g1), (l2, g2) = loss_and_grads(plain, x), loss_and_grads(fast, x)
    assert torch.allclose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_adam_takes_the_same_steps():
    torch.manual_seed(0)
    models = [vae_conv.VAE(latent_dim=4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.Adam(models[0].parameters(), lr=1e-3), torch.optim.Adam(models[1].parameters(), lr=1e-3, fused=True)]
    x = torch.rand(8, 1, 28, 28)
    for step in range(3):
        for model, opt in zip(models, opts):
            _, grads = loss_and_grads(model, x, step)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        # Adam moves every weight by about lr = 1e-3 per step; the two differ by float rounding only
        assert torch.allclose(a, b, rtol=0, atol=3e-5)


def test_compiled_model_gives_the_same_loss_on_cpu():
    """torch.compile (--compile) on the CPU, where its C++ backend runs: same loss and gradients."""
    torch.manual_seed(0)
    model = vae_mlp.VAE(hidden_dim=64, latent_dim=4)
    compiled = common.speed_up(model, True, torch.device("cpu"))
    x = torch.rand(16, 1, 28, 28)
    (l1, g1), (l2, g2) = loss_and_grads(model, x), loss_and_grads(compiled, x)
    assert torch.allclose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# Interrupt and resume


def final_numbers(out):
    return [(r["epoch"], r["train_loss"], r["test_loss"], r["test_kl"]) for r in read_metrics(out)]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(vae_mlp, data_dir, out, "--epochs", "3", "--batch-size", "16", "--binarize", "dynamic")
    return out


def test_sigint_mid_epoch_then_resume_matches(data_dir, uninterrupted, tmp_path, monkeypatch, capsys):
    """A real SIGINT at batch 5 of epoch 2: exit 130, then --resume ends where the uninterrupted run ends."""
    check = common.check_finite

    def interrupt_at_batch_5_of_epoch_2(losses, i, epoch, lr):
        if (epoch, i) == (2, 4):
            os.kill(os.getpid(), signal.SIGINT)
        return check(losses, i, epoch, lr)

    monkeypatch.setattr(common, "check_finite", interrupt_at_batch_5_of_epoch_2)
    argv = ["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "3", "--batch-size", "16",
            "--binarize", "dynamic", "--iw-samples", "4"]
    code, err = exit_of(vae_mlp.main, argv, capsys)
    assert code == 130
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["partial"]["batch"] == 5
    monkeypatch.undo()
    assert vae_mlp.main(["--out", str(tmp_path), "--data-dir", data_dir, "--resume"]) == 0
    assert final_numbers(tmp_path) == final_numbers(uninterrupted)
    iwae = [torch.load(o / "checkpoint.pt", weights_only=False)["final"]["iwae_nll"] for o in (tmp_path, uninterrupted)]
    assert iwae[0] == iwae[1]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_training_process_saves_and_resumes(sig, code, data_dir, uninterrupted, tmp_path):
    argv = [sys.executable, os.path.join(HERE, "vae_mlp.py"), "--data-dir", data_dir, "--out", str(tmp_path),
            "--epochs", "3", "--batch-size", "16", "--binarize", "dynamic", "--iw-samples", "4"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("epoch   1/3"):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "resume with: python vae_mlp.py --resume" in out
    r = run_script("vae_mlp", "--out", str(tmp_path), "--data-dir", data_dir, "--resume")
    assert r.returncode == 0, r.stderr
    assert final_numbers(tmp_path) == final_numbers(uninterrupted)
