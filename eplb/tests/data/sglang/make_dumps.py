#!/usr/bin/env python3
"""Writes the SGLang expert-distribution dumps used by eplb's tests (needs torch; CI does not run this).

It follows SGLang's recorder in `stat` mode (python/sglang/srt/eplb/expert_distribution.py):
per forward pass a `global_physical_count` int32 [layers][physical slots] is appended to a
`_CircularBuffer` of `expert_distribution_recorder_buffer_size` rows (zeros until filled, the
write index wraps, nothing rotates it); `dump` converts the buffer to logical counts with
`scatter_add_` over `physical_to_logical_map` and saves
`dict(rank=..., logical_count=int32 [buffer][layers][experts], average_utilization_rate_over_window=None)`
with `torch.save`. Layers are decoder layers: the dense ones are never recorded and stay zero.

It also writes an `--init-expert-location` placement as `.pt` (SGLang's
`compute_initial_expert_location_metadata` torch.loads a `.pt` and passes its dict to
`init_by_mapping`): `{"physical_to_logical_map": int64 [layers][physical slots]}`.

Run: python3 make_dumps.py   (writes *.pt and the same data as *.json next to this file)
"""
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = 4  # decoder layers; layer 0 is dense (DeepSeek's first_k_dense_replace = 1)
EXPERTS = 8
TOP_K = 2
RANKS = 4
SLOTS = 12  # 8 experts + 4 redundant


def physical_to_logical_map():
    # Trivial SGLang layout (init_trivial): slot k holds expert k % E, in every layer.
    return torch.arange(SLOTS).repeat(LAYERS, 1) % EXPERTS


def one_pass(gen, p2l):
    count = torch.zeros((LAYERS, SLOTS), dtype=torch.int32)
    tokens = int(torch.randint(16, 64, (1,), generator=gen))
    popularity = torch.tensor([8.0, 5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5])
    for layer in range(1, LAYERS):  # dense layer 0 never reaches the recorder
        topk = torch.multinomial(popularity.repeat(tokens, 1), TOP_K, generator=gen)
        for e in topk.flatten().tolist():
            slots = (p2l[layer] == e).nonzero().flatten().tolist()
            count[layer, slots[tokens % len(slots)]] += 1  # one replica per token
    return count


def dump(name, buffer_size, passes, seed):
    gen = torch.Generator().manual_seed(seed)
    p2l = physical_to_logical_map()
    buf = torch.zeros((buffer_size, LAYERS, SLOTS), dtype=torch.int32)
    cur = 0
    for _ in range(passes):
        buf[cur] = one_pass(gen, p2l)
        cur = (cur + 1) % buffer_size
    logical = torch.zeros((buffer_size, LAYERS, EXPERTS), dtype=torch.int32)
    logical.scatter_add_(2, p2l.unsqueeze(0).expand(buffer_size, -1, -1).to(torch.int64), buf)
    torch.save(
        dict(rank=0, logical_count=logical, average_utilization_rate_over_window=None),
        os.path.join(HERE, name + ".pt"),
    )
    with open(os.path.join(HERE, name + ".json"), "w") as f:
        json.dump({"logical_count": logical.tolist()}, f)
        f.write("\n")


def placement(name, seed):
    gen = torch.Generator().manual_seed(seed)
    p2l = physical_to_logical_map()
    for layer in range(1, LAYERS):  # MoE layers: experts relabelled, no rank holds one twice
        p2l[layer] = torch.randperm(EXPERTS, generator=gen)[p2l[layer]]
    torch.save({"physical_to_logical_map": p2l}, os.path.join(HERE, name + ".pt"))
    with open(os.path.join(HERE, name + ".json"), "w") as f:
        json.dump({"physical_to_logical_map": p2l.tolist()}, f)
        f.write("\n")


if __name__ == "__main__":
    placement("init_expert_location", seed=3)
    dump("expert_distribution_partial", buffer_size=6, passes=4, seed=1)  # 2 zero rows
    dump("expert_distribution_wrapped", buffer_size=3, passes=5, seed=2)  # ring wrapped
    print("torch", torch.__version__)
