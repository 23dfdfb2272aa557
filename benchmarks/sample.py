"""`python bench.py sample`: batch-1 greedy decode tokens/s on engine.Engine against transformers'
generate, fp32, bf16 and int8 weights; how closely bf16 and int8 follow fp32.
Figures: docs/benchmarks.md#decoding-python-benchpy-sample-2026-12-02-zen-5-quiet."""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import cpu_name, decode_models, named_shapes, print_auto_precision, time_of, timed

HELP = "batch-1 greedy decode tokens/s, ours vs transformers' generate"


def add_arguments(parser) -> None:
    """The section's options; each default is run()'s."""
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    parser.add_argument("--checkpoint", default=None,
                        help="also a trained checkpoint's val loss with each weight layout (e.g. make demo's run directory)")
    parser.add_argument("--data", default="data/shakespeare", help="its data directory, for the val shards (default: data/shakespeare)")
    parser.add_argument("--compile", action="store_true", help="also time the fp32 decode step under torch.compile")
    parser.add_argument("--shapes", default="small,124m", help="small, 124m or both (default: small,124m)")


def measure_bandwidth(gigabytes: float = 1.0, reps: int = 5) -> float:
    """Bytes/s of reading one large fp32 tensor (a sum: no matmul, bound by memory), the best of reps."""
    t = torch.ones(int(gigabytes * 2**30) // 4)
    t.sum()
    best = min(time_of(t.sum) for _ in range(reps))
    return t.numel() * 4 / best


def _agreement(reference, other, ids: list[int]) -> tuple[float, float]:
    """Teacher-forced over `ids` (one sequence): how often two decoding models' most likely next
    tokens agree, and the mean KL(reference || other) of their next-token distributions (nats)."""
    idx = torch.tensor([ids])
    with torch.inference_mode():
        ref = torch.log_softmax(reference(idx)[0][0].float(), dim=-1)
        oth = torch.log_softmax(other(idx)[0][0].float(), dim=-1)
    top1 = (ref.argmax(-1) == oth.argmax(-1)).float().mean().item()
    return top1, (ref.exp() * (ref - oth)).sum(-1).mean().item()


def _val_loss_by_weights(checkpoint: str, data: str, windows: int = 64) -> None:
    """A trained model's val loss with each decoding layout of its weights, teacher-forced over the
    first `windows` windows of the val shards (the difference int8 and bf16 make to a real model)."""
    import numpy as np

    import checkpoints
    from decode_weights import WEIGHTS, prepare
    from shards import ShardLoader, list_shards

    directory, _, model = checkpoints.load_latest(checkpoint, checkpoints.load_model, need_state=False, warn=print)
    loader = ShardLoader(list_shards(data, "val"), model.config.block_size, 1, shuffle=False)
    tokens = loader.read_windows(np.arange(min(windows, loader.num_windows)))  # (N, T + 1)
    print(f"\nval loss of {directory} over {tokens[:, 1:].numel():,} val tokens of {data}, by weights:\n")
    print("| weights | val loss | minus fp32's |")
    print("|---|---|---|")
    losses = {}
    for weights in WEIGHTS:
        decoding, _ = prepare(model, weights)
        with torch.inference_mode():
            logits = torch.cat([decoding(tokens[i : i + 8, :-1])[0].float() for i in range(0, len(tokens), 8)])
        losses[weights] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
        print(f"| {weights} | {losses[weights]:.4f} | {losses[weights] - losses['float32']:+.4f} |")


def _compiled_decode_rate(decoding, ids: list[int], params) -> tuple[float, float]:
    """Batch-1 tokens/s of the engine with its decode step's forward (model.hidden_states with
    per-row positions) under torch.compile (dynamic shapes: the attention span grows every step),
    and the seconds the first generation took (compiling)."""
    from engine import Engine

    eager = decoding.hidden_states
    compiled = torch.compile(eager, dynamic=True)
    decoding.hidden_states = lambda idx, cache=None, positions=None: (
        compiled(idx, cache, positions) if positions is not None else eager(idx, cache, positions))
    try:
        engine = Engine(decoding, max_batch=1)
        first = time_of(lambda: engine.generate([ids], params))
        seconds = statistics.median(time_of(lambda: engine.generate([ids], params)) for _ in range(3))
    finally:
        del decoding.hidden_states
    return params.max_tokens / seconds, first


def run(new_tokens: int = 128, shapes: str = "small,124m", checkpoint: str | None = None,
        data: str = "data/shakespeare", compile: bool = False) -> None:
    """Batch-1 greedy decode tokens/s on engine.Engine against transformers' generate with the same
    weights, at small.py's shape and GPT-2 124M: fp32 through torch's linear only, fp32 as the
    engine lays it out (decode_weights: the fastest of torch's, oneDNN's and split linears per
    shape), bf16 and int8 weights; how closely bf16 and int8 follow fp32; and the limit memory bandwidth puts on each (every new
    token reads every matmul weight once). With `checkpoint`, also a trained model's val loss
    (its val shards in `data`) with each layout; with `compile`, fp32 with the decode step under
    torch.compile too."""
    from decode_weights import prepare
    from engine import Engine
    from sampling import SamplingParams

    print(f"decode benchmark: batch 1, 16-token prompt, up to {new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads on {cpu_name()}")
    bandwidth = measure_bandwidth()
    print(f"memory bandwidth measured now (sum of a 1 GiB fp32 tensor): {bandwidth / 1e9:.1f} GB/s")
    print_auto_precision("decode", dict(named_shapes(shapes)))
    kinds = {"torch fp32": ("float32", "torch"), "fp32": ("float32", "auto"), "bf16": ("bfloat16", "auto"),
             "int8": ("int8", "auto")}
    agreement = []
    print("\n| shape | transformers fp32 | ours, fp32, torch's linear | ours, fp32 | ours / transformers | same tokens "
          "| ours, bf16 | ours, int8 | bf16 / fp32 | int8 / fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape in named_shapes(shapes):
        ours, hf = decode_models(shape)
        decoding = {k: prepare(ours, w, linear) for k, (w, linear) in kinds.items()}
        prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
        n = min(new_tokens, shape["block_size"] - prompt.size(1))  # transformers stops at the context length
        params = SamplingParams(max_tokens=n, temperature=0.0)
        ids = prompt[0].tolist()
        engines = {k: Engine(m, max_batch=1) for k, (m, _) in decoding.items()}
        runs = {"hf": lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, 16:].tolist(),
                **{k: (lambda e=e: e.generate([ids], params)[0]) for k, e in engines.items()}}
        seconds, outputs = timed(runs)
        rate = {k: n / t for k, t in seconds.items()}
        same = "yes" if outputs["fp32"] == outputs["hf"] == outputs["torch fp32"] else "no"
        print(f"| {name}, {n} new tokens | {rate['hf']:,.1f} | {rate['torch fp32']:,.1f} | {rate['fp32']:,.1f} "
              f"| {rate['fp32'] / rate['hf']:.2f}x | {same} | {rate['bf16']:,.1f} | {rate['int8']:,.1f} "
              f"| {rate['bf16'] / rate['fp32']:.2f}x | {rate['int8'] / rate['fp32']:.2f}x |", flush=True)
        text = ids + outputs["fp32"]
        for k in ("bf16", "int8"):
            greedy = next((i for i, (a, b) in enumerate(zip(outputs["fp32"], outputs[k])) if a != b), n)
            agreement.append((name, k, greedy, n, *_agreement(decoding["fp32"][0], decoding[k][0], text)))
        if name == "GPT-2 124M":
            matmul = ours.num_params() - ours.transformer.wpe.weight.numel()  # every weight but the position table
            limit = {"fp32": bandwidth / (4 * matmul), "bf16": bandwidth / (2 * matmul), "int8": bandwidth / matmul}
            print(f"\n124M reads {4 * matmul / 1e6:.0f} MB of fp32 matmul weights per token (bf16 half, int8 a quarter); "
                  f"at {bandwidth / 1e9:.1f} GB/s, fp32 reaches {rate['fp32'] / limit['fp32']:.0%} of its limit "
                  f"({limit['fp32']:.1f} tokens/s; torch's linear only: {rate['torch fp32'] / limit['fp32']:.0%}), "
                  f"bf16 {rate['bf16'] / limit['bf16']:.0%} of {limit['bf16']:.1f}, int8 {rate['int8'] / limit['int8']:.0%} "
                  f"of {limit['int8']:.1f}")
        print(f"fp32 layout at {name}: {decoding['fp32'][1]}", flush=True)
        if compile:
            # torch's linears: inductor picks its own kernels (it cannot trace oneDNN's packed weights)
            compiled, first = _compiled_decode_rate(prepare(ours, "float32", "torch")[0], ids, params)
            print(f"fp32 with the decode step compiled: {compiled:,.1f} tokens/s ({compiled / rate['fp32']:.2f}x the "
                  f"eager fp32 layout; the first generation, compiling, took {first:.1f} s)", flush=True)
    print("\nHow closely bf16 and int8 follow fp32 (random weights: near-ties are commoner than in a trained model), "
          "teacher-forced over the prompt and fp32's greedy text:\n")
    print("| shape | weights | greedy tokens equal to fp32's | top-1 agreement | mean KL from fp32 (nats) |")
    print("|---|---|---|---|---|")
    for name, k, greedy, n, top1, kl in agreement:
        print(f"| {name} | {k} | first {greedy} of {n} | {top1:.1%} | {kl:.4f} |")
    if checkpoint:
        _val_loss_by_weights(checkpoint, data)
