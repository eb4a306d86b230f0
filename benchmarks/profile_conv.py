"""The conv net's training step on the CPU, layer by layer, against its floor (issue 29, item 3).

    python benchmarks/profile_conv.py                 # appends its tables to RESULTS.md
    python benchmarks/profile_conv.py --no-record --rounds 3

1. What this machine's libraries reach: a float32 GEMM through torch.mm (MKL on x86), square and
   in the FC layers' shapes, and oneDNN's convolution in the encoder's second layer, GFLOP/s.
2. Each layer of vae_conv.VAE at batch 64, alone, forward and forward + backward, in the layout
   the script trains in (channels_last, common.speed_up) and in the default NCHW; its FLOPs
   (2 per multiply-add; backward twice forward, once for the first layer, whose input needs no
   gradient) and the rate it runs at.
3. The whole step of train_epoch at batch 64 (the ELBO; L_2 too): forward and loss, backward,
   Adam; the floor = its FLOPs at the best rate of part 1.
4. Variants of the same math, whole steps, alternating in rounds (median ms per step): the layout,
   one thread, the last transposed convolution without oneDNN.
FLOPs are counted by torch.utils.flop_counter (convolutions and matrix products, forward and
backward) and printed beside the count by hand from the layer shapes, to compare.
"""

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quality import machine  # noqa: E402
from speed import record  # noqa: E402

import vae_conv  # noqa: E402

B = 64  # the script's --batch-size
STEPS = 60000 // B  # training steps per epoch (the last incomplete batch is dropped)


def ms(fn, reps):
    """Median milliseconds of one call of fn over 5 timings of `reps` calls, after a warm-up."""
    for _ in range(max(5, reps // 5)):
        fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps * 1e3)
    return statistics.median(times)


def gflops(flop, millis):
    return flop / millis / 1e6


def library_rates():
    """(name, GFLOP/s) for a GEMM and for oneDNN's convolution on this machine."""
    rows = []
    for m, k, n in ((2048, 2048, 2048), (B, 3136, 256), (B, 256, 3136)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        t = ms(lambda a=a, b=b: a @ b, 3 if m == 2048 else 200)
        rows.append((f"torch.mm ({m} x {k}) @ ({k} x {n})", gflops(2 * m * k * n, t)))
    conv = nn.Conv2d(32, 64, 4, stride=2, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(B, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t = ms(lambda: conv(x), 200)
    name = "oneDNN conv 32->64, 4x4 stride 2, on (64, 32, 14, 14), channels_last"
    rows.append((name, gflops(2 * B * 64 * 7 * 7 * 32 * 16, t)))
    return rows


def hand_flops(layer, x, y, first):
    """FLOPs of one layer's forward and backward, by hand from its shapes (None: no GEMM)."""
    if isinstance(layer, nn.Linear):
        macs = x.shape[0] * layer.in_features * layer.out_features
    elif isinstance(layer, nn.Conv2d):
        macs = y.numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    elif isinstance(layer, nn.ConvTranspose2d):
        macs = x.numel() * layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
    else:
        return None
    return 2 * macs, 2 * macs * (1 if first else 2)


def layers_table(reps):
    """One row per layer: name, output shape, FLOPs fwd/bwd, ms fwd and fwd+bwd per layout."""
    torch.manual_seed(0)
    rows, total = [], [0, 0]
    model = vae_conv.VAE()
    h = {"enc": torch.rand(B, 1, 28, 28), "dec": torch.randn(B, model.decoder[0].in_features)}
    for part, seq in (("encoder", model.encoder), ("decoder", model.decoder)):
        x = h[part[:3]]
        for i, layer in enumerate(seq):
            first = part == "encoder" and i == 0
            y = layer(x).detach()
            flops = hand_flops(layer, x, y, first)
            times = {}
            for layout in ("channels_last", "NCHW"):  # NCHW last: the layer ends as it began
                cl = layout == "channels_last" and x.dim() == 4
                fmt = torch.channels_last if cl else torch.contiguous_format
                layer.to(memory_format=fmt)  # in place; only 4-D weights change
                xin = x.contiguous(memory_format=fmt).requires_grad_(not first)
                grad = torch.randn_like(layer(xin))

                def both(layer=layer, xin=xin, grad=grad):
                    layer(xin).backward(grad)

                with torch.no_grad():
                    fwd = ms(lambda layer=layer, xin=xin: layer(xin), reps)
                times[layout] = (fwd, ms(both, reps))
            if flops:
                total = [total[0] + flops[0], total[1] + flops[1]]
            rows.append((f"{part}[{i}] {type(layer).__name__}", tuple(y.shape), flops, times))
            x = y
    return rows, total


def counted_flops(model, x, k=1):
    """FLOPs of a step's forward and backward, as torch.utils.flop_counter counts them."""
    with FlopCounterMode(display=False) as counter:
        step_loss(model, x, k).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_loss(model, x, k):
    if k == 1:
        return vae_conv.neg_elbo(model, x, "bernoulli")[2]
    return vae_conv.neg_iwae(model, x, "bernoulli", k)[2]


def make(layout="channels_last", last_deconv_onednn=True):
    """The model and fused Adam as main() builds them (seed 0), in the given layout."""
    torch.manual_seed(0)
    model = vae_conv.VAE()
    if layout == "channels_last":
        model.to(memory_format=torch.channels_last)
    if not last_deconv_onednn:  # the 32 -> 1 transposed convolution through ATen's own kernel
        last = model.decoder[-1]
        forward = last.forward

        def no_onednn(z, forward=forward):
            with torch.backends.mkldnn.flags(enabled=False):
                return forward(z)

        last.forward = no_onednn
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, fused=True)
    return model, opt


def step_parts(reps, k):
    """ms of the forward with the loss, the backward, Adam's step and the whole step."""
    model, opt = make()
    x = torch.rand(B, 1, 28, 28)
    parts = {}
    parts["forward + loss"] = ms(lambda: step_loss(model, x, k), reps)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        step_loss(model, x, k).backward()

    parts["backward"] = ms(fwd_bwd, reps) - parts["forward + loss"]
    fwd_bwd()
    parts["Adam (fused)"] = ms(opt.step, reps)

    def step():
        fwd_bwd()
        opt.step()

    parts["whole step"] = ms(step, reps)
    return parts, counted_flops(model, x, k)


VARIANTS = {
    "as the script trains (channels_last, 2 threads)": {},
    "NCHW (no channels_last)": {"layout": "NCHW"},
    "1 thread": {"threads": 1},
    "last transposed conv without oneDNN": {"last_deconv_onednn": False},
    "NCHW, last transposed conv without oneDNN": {"layout": "NCHW", "last_deconv_onednn": False},
}


def variants(rounds, reps):
    """Median ms per ELBO step of each variant, alternating in rounds."""
    x = torch.rand(B, 1, 28, 28)
    times = {name: [] for name in VARIANTS}
    threads = torch.get_num_threads()
    for _ in range(rounds):
        for name, v in VARIANTS.items():
            torch.set_num_threads(v.get("threads", threads))
            model, opt = make(v.get("layout", "channels_last"), v.get("last_deconv_onednn", True))

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                step_loss(model, x, 1).backward()
                opt.step()

            times[name].append(ms(step, reps))
    torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=100, help="calls per timing (5 timings each)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the variants")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args()

    rates = library_rates()
    gemm = max(r for name, r in rates if name.startswith("torch.mm"))
    best = max(r for _, r in rates)
    layer_rows, (fwd_flops, bwd_flops) = layers_table(args.reps)
    lines = [
        "### profile: the conv step at batch 64 on the CPU",
        "",
        f"`python benchmarks/profile_conv.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"{datetime.date.today()}, {machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median ms of 5 timings of {args.reps} calls",
        "",
        "| what this machine's libraries reach, float32 | GFLOP/s |",
        "| --- | --- |",
        *(f"| {name} | {rate:.0f} |" for name, rate in rates),
        "",
        "| layer (batch 64) | output | MFLOP fwd / bwd | ms fwd, channels_last | ms fwd+bwd, "
        "channels_last | GFLOP/s | ms fwd | ms fwd+bwd, NCHW |",
        "| --- " * 8 + "|",
    ]
    for name, shape, flops, times in layer_rows:
        (f_cl, fb_cl), (f_n, fb_n) = times["channels_last"], times["NCHW"]
        mflop = f"{flops[0] / 1e6:.1f} / {flops[1] / 1e6:.1f}" if flops else "-"
        rate = f"{gflops(sum(flops), fb_cl):.0f}" if flops else "-"
        lines.append(
            f"| {name} | {shape} | {mflop} | {f_cl:.3f} | {fb_cl:.3f} | {rate} | {f_n:.3f} | "
            f"{fb_n:.3f} |"
        )
    layers_cl = sum(t["channels_last"][1] for *_, t in layer_rows)
    lines += [
        f"| all layers | | {fwd_flops / 1e6:.0f} / {bwd_flops / 1e6:.0f} | | {layers_cl:.2f} "
        f"| {gflops(fwd_flops + bwd_flops, layers_cl):.0f} | | |",
        "",
        "| step (batch 64) | forward + loss ms | backward ms | Adam ms | whole step ms | "
        f"GFLOP (flop_counter) | floor at {gemm:.0f} GFLOP/s (GEMM) | floor at {best:.0f} "
        f"(best rate above) | s per epoch ({STEPS} steps) |",
        "| --- " * 9 + "|",
    ]
    for k in (1, 2):
        parts, flop = step_parts(args.reps, k)
        lines.append(
            f"| {'ELBO' if k == 1 else 'L_2'} | {parts['forward + loss']:.2f} | "
            f"{parts['backward']:.2f} | {parts['Adam (fused)']:.2f} | {parts['whole step']:.2f} "
            f"| {flop / 1e9:.2f} | {flop / gemm / 1e6:.2f} ms | {flop / best / 1e6:.2f} ms | "
            f"{parts['whole step'] * STEPS / 1e3:.1f} |"
        )
    hand = fwd_flops + bwd_flops
    lines += [
        "",
        f"FLOPs by hand from the layer shapes: {hand / 1e9:.3f} GFLOP per ELBO step "
        f"({hand / B / 1e6:.1f} MFLOP per image, {hand / B * 60000 / 1e12:.2f} TFLOP per epoch).",
        "",
        f"| variant, the same math (median of {args.rounds} alternating rounds) | ms per step |"
        " x the script's |",
        "| --- | --- | --- |",
    ]
    times = variants(args.rounds, args.reps)
    base = next(iter(times.values()))
    lines += [f"| {name} | {t:.2f} | {base / t:.2f} |" for name, t in times.items()]
    record(lines, args)


if __name__ == "__main__":
    main()
