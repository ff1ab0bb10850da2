#!/usr/bin/python3
"""PyTorch baseline for lmsgd-bench: torchvision ResNet training step throughput on CPU.

Same work as lmsgd's step: forward, cross-entropy, backward, SGD (momentum 0.9, weight
decay 1e-4, the constant lr lmsgd-bench gives both sides) on a fixed random batch. Its best
configuration on CPU: --channels_last, and torch.autocast("cpu", dtype=torch.bfloat16) for
--precision=bf16. Warm-up runs until three consecutive steps agree within 10% (at most
--max_warmup), then --iterations steps are timed. Prints every step's time and loss and, last,
"pytorch_img_s=<median images/s>". Run with Debian's /usr/bin/python3 (python3-torch).
"""
import argparse
import contextlib
import statistics
import sys
import time


def settled(t):
    return len(t) >= 3 and max(t[-3:]) <= 1.1 * min(t[-3:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.0125)
    p.add_argument("--max_warmup", type=int, default=10)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels_last", action="store_true")
    a = p.parse_args()

    import torch
    import torchvision

    torch.set_num_threads(a.threads)  # Debian's torch starts with 1 thread
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(num_classes=1000)
    model.train()
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=1e-4)
    y = torch.randint(0, 1000, (a.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if a.precision == "bf16"
                else contextlib.nullcontext())
    name = f"pytorch {a.precision}{' channels_last' if a.channels_last else ''}"
    warm, times = [], []
    i = 0
    while True:
        timing = settled(warm) or len(warm) >= a.max_warmup
        if timing and len(times) == a.iterations:
            break
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        (times if timing else warm).append(dt)
        print(f"{name} iter {i} {'' if timing else 'warmup '}{dt:.3f} s loss {loss.item():.4f}", flush=True)
        i += 1
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}; {len(warm)} warm-up steps", flush=True)
    print(f"pytorch_img_s={a.batch / statistics.median(times):.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
