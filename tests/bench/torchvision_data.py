"""The torchvision baseline of `lmsgd-bench data`: ImageFolder + RandomResizedCrop(224) +
RandomHorizontalFlip + ToTensor + Normalize in a DataLoader with --threads workers (one core
each; torch's intra-op threads set to 1 in the workers, as DataLoader does), batches of --batch
from the first --images of a seeded random order. Times from the end of the first batch to
the last (worker start-up excluded, as on lmsgd's side) and prints, last,
  torchvision_img_s=<x>
Run with Debian's /usr/bin/python3 (python3-torch, python3-torchvision, python3-pil)."""
import argparse
import time

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--path", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--images", type=int, default=0)
    a = p.parse_args()
    tf = transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(a.path, tf)
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(ds), generator=g).tolist()
    if a.images > 0:
        order = order[: a.images]
    loader = DataLoader(Subset(ds, order), batch_size=a.batch, shuffle=False, num_workers=a.threads,
                        drop_last=True, prefetch_factor=2, persistent_workers=False)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    images = 0
    for x, _ in it:
        images += x.shape[0]
    s = time.perf_counter() - t0
    if images == 0:
        raise SystemExit("fewer than 2 batches: use more --images or a smaller --batch")
    print(f"torchvision {torch.__version__}: {images} images in {s:.2f} s")
    print(f"torchvision_img_s={images / s:.1f}")


if __name__ == "__main__":
    main()
