#!/usr/bin/python3
"""PyTorch baseline for lmsgd-bench: torchvision ResNet training step throughput on CPU.

Same work as lmsgd's step: forward, cross-entropy, backward, SGD (momentum 0.9, weight
decay 1e-4) on a fixed random batch. Prints per-iteration times and, last,
"pytorch_img_s=<median images/s>". Run with Debian's /usr/bin/python3 (python3-torch).
"""
import argparse
import statistics
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    a = p.parse_args()

    import torch
    import torchvision

    torch.set_num_threads(a.threads)  # Debian's torch starts with 1 thread
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(num_classes=1000)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    y = torch.randint(0, 1000, (a.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for i in range(a.warmup + a.iterations):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
        print(f"pytorch iter {i} {'warmup ' if i < a.warmup else ''}{dt:.3f} s loss {loss.item():.4f}", flush=True)
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}", flush=True)
    print(f"pytorch_img_s={a.batch / statistics.median(times):.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
