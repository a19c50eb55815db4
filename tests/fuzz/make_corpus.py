#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_load.c into tests/fuzz/corpus/ (format: src/checkpoint.c).

Valid checkpoints for each of the fuzz target's three layer shapes, and a few
broken ones. Run once; the output is committed."""
import math, os, struct, zlib

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def ckpt(channels, affine, track, nbt=3, eps=1e-5, momentum=0.1, layout=0, reduction=0, version=2,
         dtype=0, activation=0, v2_fields=None):
    k = channels * (2 * affine + 2 * track)
    head = b"SYNCBNCK" + struct.pack("<6I", version, affine, track, layout, reduction, 0)
    head += struct.pack("<qddqQ", channels, eps, momentum, nbt, k)
    if v2_fields if v2_fields is not None else version >= 2:
        head += struct.pack("<2I", dtype, activation)
    data = struct.pack("<%df" % k, *[0.25 * i - 1 for i in range(k)])
    body = head + data
    return body + struct.pack("<I", zlib.crc32(body))


seeds = {
    # version 1 (syncbn <= 0.2): no dtype/activation words; loads into any of them
    "valid_c3_full": ckpt(3, 1, 1, version=1),
    "valid_c3_nhwc_repro": ckpt(3, 1, 1, layout=1, reduction=1, momentum=math.nan, nbt=1 << 40, version=1),
    "valid_c2_affine": ckpt(2, 1, 0, nbt=0, version=1),
    "valid_c1_bare": ckpt(1, 0, 0, nbt=7, version=1),
    # version 2
    "valid_v2_c3_full": ckpt(3, 1, 1),
    "valid_v2_c3_bf16_relu": ckpt(3, 1, 1, dtype=1, activation=1, nbt=5),
    "valid_v2_c2_affine": ckpt(2, 1, 0, nbt=0),
    "valid_v2_c1_bare": ckpt(1, 0, 0, nbt=7, momentum=math.nan),
    "bad_v2_relu_f32_c3": ckpt(3, 1, 1, activation=1),  # no f32 relu layer of this shape
    "bad_version2": ckpt(3, 1, 1, version=2, v2_fields=False),  # a version-1 body
    "bad_version3": ckpt(3, 1, 1, version=3),
    "bad_channels": ckpt(4, 1, 1),
    "bad_truncated": ckpt(3, 1, 1)[:-9],
    "bad_crc": ckpt(3, 1, 1)[:-1] + b"\x00",
    "bad_magic": b"SYNCBNCX" + ckpt(1, 0, 0)[8:],
    "empty": b"",
}
os.makedirs(HERE, exist_ok=True)
for name, blob in seeds.items():
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(blob)
