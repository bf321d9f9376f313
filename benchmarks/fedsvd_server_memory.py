"""Peak memory and time of the FedSVD server step (``aggregate_lora("fedsvd", ...)``) for a 7B Llama adapter.

LoRA rank ``r`` on all 7 projections of 32 decoder layers (hidden 4096, intermediate 11008): 224 pairs, random
factors, ``--clients`` client B matrices. Prints the peak-RSS increase over the inputs (the new float32 adapter is
included) and the wall time, on one torch thread.

    python benchmarks/fedsvd_server_memory.py            # r = 16, 2 clients
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
          "gate": (4096, 11008), "up": (4096, 11008), "down": (11008, 4096)}  # name -> (d_in, d_out)


def main(argv: list[str] | None = None) -> int:
    from hf_svd_plugins.fedsvd.core import aggregate_lora

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--clients", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    r = args.rank
    global_weights = {
        f"{layer}.{name}": (torch.randn(r, d_in, generator=g), 1e-3 * torch.randn(d_out, r, generator=g))
        for layer in range(args.layers) for name, (d_in, d_out) in SHAPES.items()
    }
    clients = [{k: (None, b + 1e-4 * torch.randn(b.shape, generator=g)) for k, (_, b) in global_weights.items()}
               for _ in range(args.clients)]
    n = sum(a.numel() + b.numel() for a, b in global_weights.values())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    aggregate_lora("fedsvd", global_weights, clients, [1] * args.clients)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"r={r}, {args.layers} layers, {args.clients} clients: N = {n} LoRA entries ({4 * n / 1e6:.0f} MB float32); "
          f"peak RSS +{peak - before:.0f} MB over the inputs ({(peak - before) * 2**20 / n:.1f} bytes per entry), "
          f"{seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
