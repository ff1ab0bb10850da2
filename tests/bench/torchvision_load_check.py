#!/usr/bin/python3
"""Loads an lmsgd checkpoint (safetensors) into torchvision's ResNet with strict=True.

Usage: torchvision_load_check.py MODEL_FILE.safetensors resnet50 [num_classes]
Reads the file with the standard library + torch only (the safetensors package is not in
Debian), checks every key and shape against the torchvision model's state_dict, loads it, runs
one inference forward and prints "torchvision_load=ok keys=<n> params=<n>".
Exit 3 when torch/torchvision are missing (the caller skips).
"""
import json
import struct
import sys


def read_safetensors(path):
    import torch
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = {"F32": torch.float32, "I64": torch.int64}[info["dtype"]]
        t = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def main():
    try:
        import torch
        import torchvision
    except ImportError as e:
        print(f"torch/torchvision not available: {e}")
        return 3
    path, arch = sys.argv[1], sys.argv[2]
    classes = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    state = read_safetensors(path)
    model = getattr(torchvision.models, arch)(num_classes=classes)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad_shape:
        print(f"mismatch: missing={missing[:5]} extra={extra[:5]} bad_shape={bad_shape[:5]}")
        return 1
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        y = model(torch.zeros(1, 3, 224, 224))
    assert y.shape == (1, classes), y.shape
    params = sum(p.numel() for p in model.parameters())
    print(f"torchvision_load=ok keys={len(state)} params={params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
