#!/usr/bin/python3
"""Writes a torchvision ResNet's state_dict as a safetensors file, as safetensors.torch.save_file
would (that package is not in Debian, so the format is written here with the standard library).

Usage: torchvision_save_safetensors.py OUT.safetensors resnet18|resnet50 [num_classes]
The weights are torchvision's seeded initialization with random BN running statistics (so the
buffers are not all 0 and 1). Prints one line per probe, "probe NAME INDEX VALUE", with VALUE the
float32 written at that flat index, for the caller to compare with what it loaded.
Exit 3 when torch/torchvision are missing (the caller skips).
"""
import json
import struct
import sys


def main():
    try:
        import torch
        import torchvision
    except ImportError as e:
        print(f"torch/torchvision missing: {e}")
        return 3
    out, arch = sys.argv[1], sys.argv[2]
    classes = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    torch.manual_seed(5)
    model = getattr(torchvision.models, arch)(num_classes=classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
    state = model.state_dict()
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in state.items():
        t = t.detach().contiguous()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        data = t.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    for name, index in [("conv1.weight", 0), ("conv1.weight", 77), ("bn1.running_mean", 3),
                        ("bn1.running_var", 2), ("fc.weight", 1234), ("fc.bias", 1)]:
        print(f"probe {name} {index} {state[name].flatten()[index].item():.9g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
