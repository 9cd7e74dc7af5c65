"""GPU figures of iclit's engine: tokens/s for ICL capture and batched LoRA tuning, the
fraction of the GPU's bf16 peak, and peak memory; on the default model and on a
LLaMA-2-7B-shaped model with random weights built from its config (no download).

    python benchmarks/gpu.py                     # both models, bf16, on cuda
    python benchmarks/gpu.py --models llama2-7b-shape gemma-3-270m-shape --dtype bfloat16
    python benchmarks/gpu.py --smoke --device cpu  # tiny shapes, to check the script itself

FLOPs are counted as 2·N per token for a forward pass and 6·N for a training step (forward,
backward through activations and weights' inputs; LoRA skips the frozen weights' gradients,
so 6·N over-counts its work and the "fraction of peak" is an upper estimate), N = the
model's non-embedding parameters. The peak is measured in the same process with a large
bf16 matrix multiply (and the datasheet figure is printed beside it when known).
Prints one ``GPU name=… tokens_per_s=… mfu=… peak_mem_gib=…`` line per measurement.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

import torch

from iclit.engine.capture import capture
from iclit.engine.flops import matmul_rate
from iclit.models import load_model, prepare
from iclit.tasks import get_task
from iclit.tuning import TuningRecipe, tuned_many

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
GEMMA3_270M = dict(
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    vocab_size=262144,
    max_position_embeddings=32768,
    sliding_window=512,
    query_pre_attn_scalar=256,
)
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=4096,
)
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def body_params(model: torch.nn.Module) -> int:
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    emb |= {id(p) for p in head.parameters()} if head is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def random_model(name: str, config: dict, device: torch.device, dtype: torch.dtype):
    """A model of that shape with random weights (no download); the tiny tokenizer's ids
    (< 600) fit every vocabulary, and a random model needs no real one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from iclit.models.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    cls, cfg = (Gemma3ForCausalLM, Gemma3TextConfig) if name.startswith("gemma") else (LlamaForCausalLM, LlamaConfig)
    with torch.device(device):
        model = cls(cfg(**config)).to(dtype)
    return prepare(model, build_tiny_tokenizer(), name=name, device=str(device))


def peak_mem(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench(lm, device: torch.device, peak: float, args: argparse.Namespace) -> None:
    task = get_task("sentiment")
    ex = task.examples
    model, tok = lm.model, lm.tokenizer
    n = body_params(model)
    # ICL capture: k demonstrations, many queries on one cached prefix
    demos, queries = ex[: args.icl_k], ex[args.icl_k : args.icl_k + args.queries]
    prefix = task.template.icl_prefix(demos)
    prompts = [task.template.icl_prompt(demos, q) for q in queries]
    tokens = sum(len(tok(p)["input_ids"]) for p in prompts)
    capture(model, tok, prompts[:4], prefixes=[prefix] * 4, batch_size=args.batch_size)  # warm-up
    reset_mem(device)
    sync(device)
    start = time.perf_counter()
    capture(model, tok, prompts, prefixes=[prefix] * len(prompts), batch_size=args.batch_size)
    sync(device)
    seconds = time.perf_counter() - start
    rate = tokens / seconds
    print(
        f"GPU name={lm.name}:icl_capture tokens_per_s={rate:.0f} mfu={2 * n * rate / peak:.3f} "
        f"peak_mem_gib={peak_mem(device):.2f} seconds={seconds:.2f} tokens={tokens}",
        flush=True,
    )
    # batched LoRA tuning: N adapters × k demonstrations
    sets = [
        [task.template.training_pair(d) for d in ex[i * args.it_k : (i + 1) * args.it_k]] for i in range(args.adapters)
    ]
    recipe = TuningRecipe(epochs=args.epochs)
    train_tokens = sum(len(tok(p + a)["input_ids"]) for s in sets for p, a in s) * args.epochs
    reset_mem(device)
    sync(device)
    start = time.perf_counter()
    with tuned_many(model, tok, sets, recipe, seeds=list(range(args.adapters)), max_tokens=args.train_tokens) as (
        _,
        _,
        results,
    ):
        sync(device)
        seconds = time.perf_counter() - start
    rate = train_tokens / seconds
    print(
        f"GPU name={lm.name}:it_tuning tokens_per_s={rate:.0f} mfu={6 * n * rate / peak:.3f} "
        f"peak_mem_gib={peak_mem(device):.2f} seconds={seconds:.2f} tokens={train_tokens} adapters={args.adapters} "
        f"final_loss_max={max(r.final_loss for r in results):.2e}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["gemma-3-270m", "llama2-7b-shape"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--icl-k", type=int, default=8)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--it-k", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and little work (checks the script on a CPU)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.smoke:
        args.queries, args.adapters, args.epochs, args.batch_size, args.train_tokens = 8, 2, 1, 8, 768
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = matmul_rate(device, dtype, 256 if args.smoke else 8192)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    print(
        f"{datetime.now(UTC):%Y-%m-%d} device {name}, {args.dtype}, torch {torch.__version__}; "
        f"measured matmul peak {peak / 1e12:.0f} TFLOP/s" + (f", datasheet {sheet / 1e12:.0f}" if sheet else ""),
        flush=True,
    )
    for model_name in args.models:
        if model_name.endswith("-shape"):
            shape = {"llama2-7b-shape": LLAMA2_7B, "gemma-3-270m-shape": GEMMA3_270M}[model_name]
            lm = random_model(model_name, SMOKE if args.smoke else shape, device, dtype)
        else:
            try:
                lm = load_model(model_name, device=args.device, dtype=args.dtype)
            except LookupError as e:  # e.g. the embedded model's package is not installed on a bare GPU machine
                print(f"{model_name}: {e}; measuring {model_name}-shape (random weights) instead", flush=True)
                lm = random_model(f"{model_name}-shape", SMOKE if args.smoke else GEMMA3_270M, device, dtype)
        bench(lm, device, peak, args)
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
