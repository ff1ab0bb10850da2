#!/usr/bin/env python3
"""PyTorch's ResNet-50 training throughput on one GPU: the baseline of lmsgd-gpu-check.

torchvision resnet50, channels_last, SGD (momentum 0.9, weight decay 1e-4), cudnn.benchmark,
a synthetic batch made on the GPU once (as lmsgd-gpu-check stages its batch once). Precisions:
  fp32  TF32 off for cuDNN and cuBLAS
  tf32  TF32 on
  bf16  torch.autocast(bfloat16) (TF32 on for what stays fp32)
Median step time over --iters steps after --warmup, from CUDA events; one JSON object per line:
  {"kind": "speed", "impl": "pytorch", "precision": .., "batch": .., "img_s": .., "step_ms": ..}
"""
import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--precisions", default="fp32,tf32,bf16")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import torch
    import torchvision

    if not torch.cuda.is_available():
        print("pytorch_gpu_train: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    out = open(args.json, "a") if args.json else None
    dev = torch.device("cuda", 0)
    print(f"pytorch {torch.__version__}, torchvision {torchvision.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name(0)}")
    for prec in args.precisions.split(","):
        tf32 = prec != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        for batch in [int(b) for b in args.batches.split(",")]:
            row = {"kind": "speed", "impl": "pytorch", "precision": prec, "batch": batch}
            model = opt = x = y = None
            try:
                torch.manual_seed(0)
                model = torchvision.models.resnet50().to(dev).to(memory_format=torch.channels_last)
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
                x = torch.randn(batch, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)
                y = torch.randint(0, 1000, (batch,), device=dev)
                loss_fn = torch.nn.CrossEntropyLoss()

                def step():
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
                        loss = loss_fn(model(x), y)
                    loss.backward()
                    opt.step()
                    return loss

                for _ in range(args.warmup):
                    step()
                torch.cuda.synchronize()
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters + 1)]
                ev[0].record()
                for i in range(args.iters):
                    loss = step()
                    ev[i + 1].record()
                torch.cuda.synchronize()
                ms = [ev[i].elapsed_time(ev[i + 1]) for i in range(args.iters)]
                med = statistics.median(ms)
                if not torch.isfinite(loss).item():
                    raise RuntimeError(f"loss is {loss.item()}")
                row.update(img_s=round(batch / (med / 1000.0), 1), step_ms=round(med, 3))
                print(f"{prec:6s} {batch:6d} {row['img_s']:12.1f} {med:10.2f}", flush=True)
            except Exception as e:  # report and go on (e.g. out of memory at a large batch)
                row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"{prec:6s} {batch:6d} ERROR {row['error']}", flush=True)
            finally:
                model = opt = x = y = loss = None
                torch.cuda.empty_cache()
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
