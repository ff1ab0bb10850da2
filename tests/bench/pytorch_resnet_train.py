#!/usr/bin/python3
"""PyTorch baseline for lmsgd-bench: torchvision ResNet training step throughput on CPU.

Same work as lmsgd's step: forward, cross-entropy, backward, SGD (momentum 0.9, weight
decay 1e-4, the constant lr lmsgd-bench gives both sides) on a fixed random batch. Its best
configuration on CPU: --channels_last, and torch.autocast("cpu", dtype=torch.bfloat16) for
--precision=bf16. It steps until the last --iterations steps all lie within 10% of their
median (at most --max_steps) and reports that window's median. Prints every step's time and loss and, last,
"pytorch_img_s=<median images/s>". Run with Debian's /usr/bin/python3 (python3-torch).
"""
import argparse
import contextlib
import statistics
import sys
import time


def stable(t, n):
    """The last n steps all lie within 10% of their median (lmsgd-bench's rule)."""
    if len(t) < max(n, 3):
        return False
    w = t[-n:]
    m = statistics.median(w)
    return min(w) >= 0.9 * m and max(w) <= 1.1 * m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.0125)
    p.add_argument("--max_steps", type=int, default=30)
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
    times = []
    while not stable(times, a.iterations) and len(times) < a.max_steps:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        times.append(dt)
        print(f"{name} iter {len(times) - 1} {dt:.3f} s loss {loss.item():.4f}", flush=True)
    window = times[-a.iterations:]
    note = "" if stable(times, a.iterations) else "; not stable by --max_steps"
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}; "
          f"{len(times) - len(window)} warm-up steps{note}", flush=True)
    print(f"pytorch_img_s={a.batch / statistics.median(window):.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
