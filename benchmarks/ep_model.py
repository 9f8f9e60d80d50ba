"""A performance model of expert parallelism for the 48-layer Qwen3-30B-A3B at ep 4 and 8 (one rank per GPU,
ep = world size): per-layer times measured on one GPU at the shapes each rank sees, plus the bytes each
dispatcher sends, counted by the dispatcher's own code, divided by an NVLink bandwidth. A prediction, which the
multi-GPU issue checks.

Two stages:
  measure  (GPU) times, forward and forward+backward, of one decoder layer's pieces at seq 4096, batch 1, bf16:
           attention + norms + projections; the router; the experts (a MoE block of E/ep experts fed the rows a
           rank receives, on a grid of row counts; also all experts, ep 1, to check the pieces against the whole
           layer); the layer whole at ep 1; everything outside the layers
           (embedding, final norm, lm_head + loss, from a one-layer model's step minus its layer); AdamW on the
           parameters one rank holds (non-expert weights sharded over the world by FSDP2, experts over ep).
  model    (CPU) reads that JSON; routes W ranks' tokens through a randomly initialised router (own) and
           automoe.moe.router.balanced_route (balanced); counts the rows each rank sends and receives with
           automoe.distributed.dispatch.rows_per_destination (deduplicated dispatcher) and per token copy (the
           old dispatcher); counts FSDP2's all-gather / reduce-scatter bytes from the model's parameters; writes
           EP_MODEL.md and ep_model.json.

GPU:  python benchmarks/ep_model.py measure --out $OUT
CPU:  python benchmarks/ep_model.py model --measured $OUT/ep_model_measured.json --md benchmarks/EP_MODEL.md \
          --out benchmarks/results
Dry run of both on CPU: add --tiny --device cpu to measure, --tiny to model.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

EPS = (4, 8)
ROWS_GRID = (0.75, 1.0, 1.25, 1.5)  # rows a rank's experts receive, in units of its own tokens x top-k
ANCHOR_TPS = 4069  # shared/BENCHMARKS.md: v5 + FSDP2, 48-layer qwen3-30b-a3b, 4 H200, step TPS/GPU (measured)
NVLINK_GBPS = 450.0  # H200 NVLink 4: 900 GB/s bidirectional per GPU, 450 each way (published)
A2A_EFFICIENCY = 0.75  # assumed fraction of it NCCL's all-to-all reaches (not measured: no multi-GPU machine)


def _config(tiny: bool, layers: int | None = None):
    from automoe.bench.workload import make_config

    return make_config("tiny" if tiny else "qwen3-30b-a3b", layers)


def _seq(tiny: bool) -> int:
    return 64 if tiny else 4096


# ---------------------------------------------------------------- measure

def _median_ms(fn, device: torch.device, reps: int, warmup: int) -> float:
    if device.type == "cuda":
        from automoe.bench.measure import median_cuda_ms

        return median_cuda_ms(fn, reps=reps, warmup=warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _timed(forward, inputs: list[torch.Tensor], device: torch.device, reps: int, warmup: int) -> dict:
    """forward(*inputs) -> a tensor; ms of the forward alone (graph built, then dropped) and of forward+backward
    (against a fixed random output gradient), with the gradients dropped between calls."""
    grad = None

    def fwd():
        return forward(*inputs)

    def fwd_bwd():
        nonlocal grad
        out = forward(*inputs)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        for t in inputs:
            t.grad = None

    fwd_bwd()
    out = {"fwd_ms": _median_ms(fwd, device, reps, warmup), "fwd_bwd_ms": _median_ms(fwd_bwd, device, reps, warmup)}
    out["bwd_ms"] = out["fwd_bwd_ms"] - out["fwd_ms"]
    return out


class _NoMLP(nn.Module):
    """Stands in for a decoder layer's MoE block so that the layer times attention, norms and projections only
    (the post-attention norm still runs and is differentiated)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


def _build(config, device: torch.device, router: str, kernels: str):
    from automoe import AutoMoEForCausalLM

    options = {"kernels": kernels, "fused_loss": True, "router": router}
    with device:
        return AutoMoEForCausalLM.from_config(config, automoe_options=options, dtype=torch.bfloat16,
                                              attn_implementation="sdpa")


def _hidden(num_tokens: int, hidden: int, device: torch.device) -> torch.Tensor:
    return torch.randn(1, num_tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)


def _layer_pieces(config, seq: int, device, kernels: str, reps: int, warmup: int) -> dict:
    """The layer at ep 1 (all experts), its attention part, its router, and the rest of the model."""
    model = _build(config, device, "model", kernels)
    model.train()
    layer = model.model.layers[0]
    x = _hidden(seq, config.hidden_size, device)
    position_ids = torch.arange(seq, device=device)[None]
    rope = tuple(t.detach() for t in model.model.rotary_emb(x, position_ids))

    def run_layer(h):
        out = layer(h, position_embeddings=rope, position_ids=position_ids)
        return out[0] if isinstance(out, tuple) else out

    pieces = {"layer_ep1": _timed(run_layer, [x], device, reps, warmup)}
    router = layer.mlp.gate
    pieces["router"] = _timed(lambda h: router(h)[1], [_hidden(seq, config.hidden_size, device)], device, reps,
                              warmup)
    mlp, layer.mlp = layer.mlp, _NoMLP()
    pieces["attention"] = _timed(run_layer, [x], device, reps, warmup)
    layer.mlp = mlp
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    whole = _median_ms(step, device, reps, warmup)
    layers = config.num_hidden_layers
    pieces["model_1layer_fwd_bwd_ms"] = whole
    pieces["outside_layers"] = {"fwd_bwd_ms": whole - layers * pieces["layer_ep1"]["fwd_bwd_ms"]}
    return pieces


def _experts_grid(config, seq: int, ep: int, device, kernels: str, reps: int, warmup: int) -> list[dict]:
    """A MoE block of E/ep experts (the balanced router spreads rows evenly over them) at each row count of
    ROWS_GRID: what one rank's experts compute on the tokens they receive."""
    num_local = config.num_experts // ep
    top_k = min(config.num_experts_per_tok, num_local)
    local = type(config)(**{**config.to_dict(), "num_experts": num_local, "num_experts_per_tok": top_k,
                            "num_hidden_layers": 1})
    block = _build(local, device, "balanced", kernels).model.layers[0].mlp
    block.train()
    grid = []
    for scale in ROWS_GRID:
        rows = int(scale * seq * config.num_experts_per_tok)
        tokens = rows // top_k
        timing = _timed(block, [_hidden(tokens, config.hidden_size, device)], device, reps, warmup)
        grid.append({"rows": tokens * top_k, "tokens": tokens, **timing})
        print(f"  experts ep {ep} ({num_local} local): {tokens * top_k} rows {timing['fwd_bwd_ms']:.2f} ms",
              file=sys.stderr, flush=True)
    return grid


def shard_numels(config, world: int, ep: int) -> tuple[list[int], int, int]:
    """Sizes of the parameter shards one rank holds: experts split over ep, every other weight over the world
    (FSDP2's dim-0 chunks, rounded up); also the model's expert and non-expert parameter counts."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes, expert, other = [], 0, 0
    for name, param in model.named_parameters():
        if ".experts." in name:
            expert += param.numel()
            sizes.append(param.numel() // ep)
        else:
            other += param.numel()
            sizes.append(-(-param.shape[0] // world) * (param.numel() // param.shape[0]))
    return sizes, expert, other


def _adamw(config, ep: int, device, kernels: str, reps: int, warmup: int) -> dict:
    from automoe.kernels import AdamW

    sizes, _, _ = shard_numels(config, ep, ep)
    params = [nn.Parameter(torch.zeros(n, device=device, dtype=torch.bfloat16)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = AdamW(params, lr=1e-5, weight_decay=0.01, kernels=kernels)
    ms = _median_ms(optimizer.step, device, reps, warmup)
    out = {"params": sum(sizes), "step_ms": ms}
    del optimizer, params
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    full = _config(args.tiny)
    seq = _seq(args.tiny)
    torch.manual_seed(0)
    started = time.perf_counter()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/ep_model.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "seq": seq, "kernels": args.kernels,
    }
    result["pieces"] = _layer_pieces(_config(args.tiny, 1), seq, device, args.kernels, args.reps, args.warmup)
    print(json.dumps(result["pieces"]), file=sys.stderr, flush=True)
    _free(device)
    result["experts"] = {}
    for ep in (1, *EPS):  # ep 1: all experts, to check the pieces against the whole layer
        result["experts"][str(ep)] = _experts_grid(full, seq, ep, device, args.kernels, args.reps, args.warmup)
        _free(device)
    result["adamw"] = {}
    for ep in EPS:
        result["adamw"][str(ep)] = _adamw(full, ep, device, args.kernels, max(3, args.reps // 2), 2)
        print(f"  AdamW ep {ep}: {result['adamw'][str(ep)]}", file=sys.stderr, flush=True)
        _free(device)
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ep_model_measured.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


# ---------------------------------------------------------------- model

def _router(config):
    """The router and the norm before it of a randomly initialised automoe model of this shape (HF's init),
    with experts and vocabulary shrunk, which the routing does not depend on."""
    from automoe import AutoMoEForCausalLM

    small = type(config)(**{**config.to_dict(), "moe_intermediate_size": 16, "intermediate_size": 16,
                            "vocab_size": 256, "num_hidden_layers": 1})
    torch.manual_seed(0)
    layer = AutoMoEForCausalLM.from_config(small, dtype=torch.float32).model.layers[0]
    return layer.post_attention_layernorm, layer.mlp.gate


@torch.no_grad()
def routed_ids(norm: nn.Module, router: nn.Module, config, world: int, seq: int) -> dict[str, list[torch.Tensor]]:
    """Top-k ids of each rank's `seq` tokens, per router. The router's input is the norm of iid normal hidden
    states of the init's scale: at initialisation the residual stream is the tokens' embedding rows (iid normal)
    plus a small attention output, and random token ids rarely repeat."""
    from automoe.moe.router import balanced_route

    out = {"own": [], "balanced": []}
    for rank in range(world):
        x = torch.randn(seq, config.hidden_size, generator=torch.Generator().manual_seed(rank))
        logits, _, ids = router(norm(x * config.initializer_range))
        out["own"].append(ids)
        out["balanced"].append(balanced_route(logits, router.spec)[1])
    return out


def row_matrices(ids_per_rank: list[torch.Tensor], num_experts: int, ep: int) -> dict[str, torch.Tensor]:
    """[source, destination] rows: 'dedup' what the deduplicated dispatcher sends (its own rows_per_destination),
    'copies' one row per token copy (the old dispatcher's rows, and the rows each rank's experts compute on)."""
    from automoe.distributed.dispatch import rows_per_destination

    per_rank = num_experts // ep
    dedup = torch.stack([rows_per_destination(ids, num_experts, ep) for ids in ids_per_rank])
    copies = torch.stack([torch.bincount((ids // per_rank).reshape(-1), minlength=ep) for ids in ids_per_rank])
    return {"dedup": dedup.to(torch.int64), "copies": copies}


def bottleneck_rows(matrix: torch.Tensor) -> int:
    """Rows of the busiest rank's all-to-all: the most any rank sends to or receives from the others."""
    remote = matrix - torch.diag(torch.diagonal(matrix))
    return int(torch.maximum(remote.sum(1), remote.sum(0)).max())


def payload(config, router: nn.Module) -> dict[str, dict[str, int]]:
    """Bytes per row of each all-to-all of a layer, and the number of all-to-alls (the count exchange included),
    counted: distributed/dispatch.py's AllToAllDispatcher runs one layer forward and backward in a world-size-1
    gloo group, on bf16 hidden states and routing weights in the router's output dtype, and every
    all_to_all_single it makes is recorded (the payload all-to-all is the one with the most bytes a row)."""
    import torch.distributed as dist
    from ep_loopback import init_world_of_one  # this folder's script, on sys.path when run as one

    from automoe.distributed.dispatch import AllToAllDispatcher

    tokens, k = 16, config.num_experts_per_tok
    weight_dtype = torch.float32 if router.spec.weights_in_fp32 or router.spec.logits_in_fp32 else torch.bfloat16
    hidden = torch.randn(tokens, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.stack([torch.randperm(config.num_experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, dtype=weight_dtype, requires_grad=True)
    calls = {"fwd": [], "bwd": []}
    phase, original = "fwd", dist.all_to_all_single

    def counting(output, inp, *args, **kwargs):
        if inp.shape[0]:
            calls[phase].append(inp[0].numel() * inp.element_size())
        return original(output, inp, *args, **kwargs)

    init_world_of_one(torch.device("cpu"))
    dist.all_to_all_single = counting
    try:
        dispatcher = AllToAllDispatcher(config.num_experts, dist.group.WORLD)
        out, _ = dispatcher(hidden, ids, weights, lambda x, rows: x * 2)
        phase = "bwd"
        (out.float().sum() + weights.float().sum()).backward()
    finally:
        dist.all_to_all_single = original
        dist.destroy_process_group()
    fwd, bwd = calls["fwd"], calls["bwd"]
    return {"fwd": {"dispatch": max(fwd), "combine": fwd[-1], "calls": len(fwd)},
            "bwd": {"dispatch": max(bwd), "combine": bwd[0], "calls": len(bwd)}}


def fsdp_bytes(config, world: int) -> dict[str, float]:
    """Bytes one rank receives in FSDP2's all-gathers and sends in its reduce-scatters in one step (bf16 weights
    and gradients, no mixed-precision policy; experts are outside FSDP2 when ep = world, see parallelize.py):
    decoder layers gather twice (forward, and backward after reshard_after_forward) and reduce once; the root
    (embedding, final norm, lm_head) gathers once and reduces once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0.") and
                ".experts." not in n)
    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    share = 2 * (world - 1) / world  # bf16 bytes of the other ranks' shards
    return {"layer_gather": 2 * layer * share, "layer_reduce": layer * share, "root_gather": root * share,
            "root_reduce": root * share, "layer_params": layer, "root_params": root}


def interpolate(grid: list[dict], rows: float, key: str) -> float:
    """Piecewise-linear in rows through the measured grid, extended along its end segments."""
    points = sorted((g["rows"], g[key]) for g in grid)
    (x0, y0), (x1, y1) = points[0], points[1]
    for a, b in zip(points, points[1:], strict=False):
        (x0, y0), (x1, y1) = a, b
        if rows <= x1:
            break
    return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)


def pipelined(compute: float, comm_in: float, comm_out: float, chunks: int) -> float:
    """Time of dispatch -> experts -> combine cut into `chunks` chunks on a communication stream: the link
    carries all of the communication and the experts all of the compute; the first chunk's dispatch and the
    last one's combine cannot overlap compute, one chunk's compute cannot overlap communication."""
    return max(compute + (comm_in + comm_out) / chunks, comm_in + comm_out + compute / chunks)


def predict(measured: dict, config, sizes_per_phase: dict, ep: int, rows: dict, bandwidth: float,
            assume: dict) -> dict:
    """Step time of one rank at ep = world size, with and without overlap. Times in ms, bandwidth in GB/s."""
    seq = measured["seq"]
    pieces, grid = measured["pieces"], measured["experts"][str(ep)]
    dedup_rows, gemm_rows = rows["dedup_bottleneck"], rows["gemm_rows_max"]
    fsdp = fsdp_bytes(config, ep)
    per_ms = bandwidth * 1e6  # bytes per ms
    fsdp_layer_ms = (fsdp["layer_gather"] + fsdp["layer_reduce"]) / per_ms
    fsdp_exposed = (fsdp["root_gather"] + fsdp["root_reduce"]) / per_ms
    # FSDP2 prefetches a layer's weights while the previous one computes: its traffic fits in the time the link
    # has nothing else to carry (attention and router); only what exceeds that is exposed
    link_idle = sum(pieces[p]["fwd_bwd_ms"] for p in ("attention", "router"))
    fsdp_layer_exposed = max(0.0, fsdp_layer_ms - link_idle)
    overhead = assume.get("ep_overhead_per_layer_ms", 0.0)
    out = {}
    for overlap in (False, True):
        layer = overhead + fsdp_layer_exposed
        for phase in ("fwd", "bwd"):
            sizes = sizes_per_phase[phase]
            comm_in = dedup_rows * sizes["dispatch"] / per_ms
            comm_out = dedup_rows * sizes["combine"] / per_ms
            latency = sizes["calls"] * assume["all_to_all_latency_ms"]
            experts = interpolate(grid, gemm_rows, f"{phase}_ms")
            rest = pieces["attention"][f"{phase}_ms"] + pieces["router"][f"{phase}_ms"]
            if overlap:  # the splits' device-to-host copy overlaps too: no exposed host sync
                layer += rest + latency + pipelined(experts, comm_in, comm_out, assume["chunks"])
            else:
                sync = assume["host_sync_ms"] if phase == "fwd" else 0.0
                layer += rest + latency + sync + experts + comm_in + comm_out
        step = (config.num_hidden_layers * layer + pieces["outside_layers"]["fwd_bwd_ms"] + fsdp_exposed +
                measured["adamw"][str(ep)]["step_ms"])
        out["overlap" if overlap else "no_overlap"] = {
            "layer_ms": layer, "step_ms": step, "step_tps_per_gpu": seq / step * 1e3,
            "fwd_bwd_tps_per_gpu": seq / (step - measured["adamw"][str(ep)]["step_ms"]) * 1e3,
        }
    return out


def _rows_summary(m: dict[str, torch.Tensor]) -> dict:
    received = m["copies"].sum(0)
    out = {"dedup_rows_sent": int(m["dedup"].sum()), "copies_sent": int(m["copies"].sum()),
           "dedup_bottleneck": bottleneck_rows(m["dedup"]), "copies_bottleneck": bottleneck_rows(m["copies"]),
           "gemm_rows_max": int(received.max()), "gemm_rows_mean": float(received.float().mean())}
    out["dedup_ratio"] = out["dedup_bottleneck"] / out["copies_bottleneck"]
    return out


def routing_table(norm: nn.Module, router: nn.Module, config, seq: int) -> dict:
    """Per ep and router: the row matrices' summaries, counted over W = ep ranks' routed tokens."""
    out = {}
    for ep in EPS:
        for name, per_rank in routed_ids(norm, router, config, ep, seq).items():
            out[f"{ep}/{name}"] = _rows_summary(row_matrices(per_rank, config.num_experts, ep))
    return out


def loopback_inputs(path: str | None) -> dict:
    """From benchmarks/ep_loopback.py's JSON: the EP code's own per-layer cost at ep 1 (the loopback step minus
    the single-device step, over its workload's layers), and its single-device forward+backward."""
    if path is None:
        return {}
    from automoe.bench.workload import make_config

    run = json.loads(Path(path).read_text())
    single, loop = run["columns"]["single"], run["columns"]["loopback"]
    layers = make_config(run["args"]["workload"]).num_hidden_layers
    measured = (loop["step_ms"] - single["step_ms"]) / layers
    # a loopback no slower than the single-device step adds nothing (a negative figure is noise, not a saving)
    return {"ep_overhead_per_layer_ms": max(0.0, measured), "ep_overhead_measured_ms": measured,
            "loopback_layers": layers,
            "single_fwd_bwd_ms": single["fwd_loss_ms"] + single["bwd_ms"], "loopback_json": path,
            "loopback_workload": run["args"]["workload"]}


def _ms(x: float) -> str:
    return f"{x:.2f}"


def markdown(report: dict) -> str:
    m, a, cfg = report["measured"], report["assumptions"], report["shape"]
    lines = [
        "# Expert parallelism: a performance model (a PREDICTION, not a measurement)",
        "",
        f"Predicted step TPS/GPU of full fine-tuning of the {cfg['layers']}-layer Qwen3-30B-A3B shape (hidden "
        f"{cfg['hidden']}, {cfg['experts']} experts top-{cfg['top_k']}, seq {m['seq']}, batch 1, bf16, automoe "
        "AdamW) at ep = world size = 4 and 8, built from times measured on one GPU and bytes counted by the "
        "dispatcher's code. The multi-GPU issue checks it against measured runs.",
        "",
        "Made by:",
        "",
        f"    {m['command']}      # on {m['device']}, torch {m['torch']}, {m['date']}",
        f"    {report['command']}",
        "",
        "## Prediction",
        "",
        f"Link bandwidth: {a['bandwidth_gbps']:.0f} GB/s each way per GPU, **assumed**: "
        f"{a['efficiency']:.0%} of H200 NVLink 4's published 450 GB/s per direction (900 GB/s bidirectional); "
        "NCCL all-to-all is not measured here (no multi-GPU machine). Last column: the same at the full "
        "published 450 GB/s.",
        "",
        f"| ep (= GPUs) | router | dispatch overlap | layer ms | step ms | step TPS/GPU | fwd+bwd TPS/GPU | "
        f"x anchor {ANCHOR_TPS:,} | step TPS/GPU at 450 GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, pred in report["predictions"].items():
        ep, router = key.split("/")
        for mode, p in pred["assumed"].items():
            peak = pred["published_peak"][mode]
            lines.append(f"| {ep} | {router} | {'yes' if mode == 'overlap' else 'no'} | {_ms(p['layer_ms'])} | "
                         f"{p['step_ms']:.1f} | **{p['step_tps_per_gpu']:,.0f}** | {p['fwd_bwd_tps_per_gpu']:,.0f} | "
                         f"{p['step_tps_per_gpu'] / ANCHOR_TPS:.2f} | {peak['step_tps_per_gpu']:,.0f} |")
    lines += [
        "",
        f"Anchor (measured, shared/BENCHMARKS.md): Transformers v5 + FSDP2 (grouped_mm + sdpa), the same 48-layer "
        f"model on 4 H200 (nvidia-h200-x4), 2026-11-22: **{ANCHOR_TPS:,} step TPS/GPU** (forward+backward 4,610), "
        "peak 88.9 GiB. It ran on 4 GPUs; the ep 8 rows compare against that per-GPU figure.",
        "",
        "## Bytes each dispatcher sends (counted)",
        "",
        "Rows per MoE layer, from W = ep ranks of "
        f"{m['seq']} tokens each, routed by a randomly initialised router (own; its input: the norm of iid normal "
        "hidden states at the init's scale, what a freshly initialised model's residual stream is) and by "
        "`balanced_route`. Dedup rows: `automoe.distributed.dispatch.rows_per_destination` (a token once per rank "
        "owning any of its experts); copies: one row per token copy, what the old dispatcher sent. Busiest rank: "
        "the most rows any rank sends to or receives from the others (its own rows stay local).",
        "",
        "| ep | router | dedup rows sent (all ranks) | copies sent | busiest rank: dedup / copies | ratio | "
        "expert rows of the busiest rank (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in report["routing"].items():
        ep, router = key.split("/")
        lines.append(f"| {ep} | {router} | {r['dedup_rows_sent']:,} | {r['copies_sent']:,} | "
                     f"{r['dedup_bottleneck']:,} / {r['copies_bottleneck']:,} | {r['dedup_ratio']:.3f} | "
                     f"{r['gemm_rows_max']:,} ({r['gemm_rows_mean']:,.0f}) |")
    pay = report["payload"]
    lines += [
        "",
        f"Bytes per row (counted from the all-to-alls the dispatcher makes): forward dispatch {pay['fwd']['dispatch']} "
        f"(hidden bf16 + top-k slots int32 + top-k weights, packed into one all-to-all), combine "
        f"{pay['fwd']['combine']}; backward "
        f"{pay['bwd']['dispatch']} and {pay['bwd']['combine']}; all-to-alls per layer: {pay['fwd']['calls']} "
        f"forward (the count exchange included), {pay['bwd']['calls']} backward. The balanced router gives token "
        "i the k consecutive experts (i*k + j) % E, which at E/ep >= k lie on one rank: every token travels once, "
        "a best case that no trained router gives; the own-router rows are the realistic ones.",
        "",
        "FSDP2 (non-expert weights over the world; experts stay outside it at ep = world): "
    ]
    for ep, f in report["fsdp"].items():
        lines.append(f"- ep {ep}: per decoder layer {f['layer_params'] / 1e6:.1f} M weights, "
                     f"{(f['layer_gather'] + f['layer_reduce']) / 1e6:.0f} MB per step through the link "
                     f"(two all-gathers, one reduce-scatter); root {f['root_params'] / 1e6:.0f} M weights, "
                     f"{(f['root_gather'] + f['root_reduce']) / 1e6:.0f} MB, counted exposed.")
    p = m["pieces"]
    lines += [
        "",
        f"## Measured inputs (one GPU: {m['device']}, seq {m['seq']}, bf16, kernels {m['kernels']})",
        "",
        "| piece | forward ms | forward+backward ms |",
        "|---|---|---|",
        f"| attention + norms + projections (a decoder layer without its MoE block) | {_ms(p['attention']['fwd_ms'])} "
        f"| {_ms(p['attention']['fwd_bwd_ms'])} |",
        f"| router ({cfg['experts']} experts) | {_ms(p['router']['fwd_ms'])} | {_ms(p['router']['fwd_bwd_ms'])} |",
        f"| whole decoder layer at ep 1 (all experts, own router) | {_ms(p['layer_ep1']['fwd_ms'])} | "
        f"{_ms(p['layer_ep1']['fwd_bwd_ms'])} |",
        f"| outside the layers: embedding, final norm, lm_head + loss (a one-layer model's step minus its layer) "
        f"| | {_ms(p['outside_layers']['fwd_bwd_ms'])} |",
    ]
    for ep, grid in m["experts"].items():
        for g in grid:
            lines.append(f"| experts, ep {ep} ({cfg['experts'] // int(ep)} local), {g['rows']:,} rows | "
                         f"{_ms(g['fwd_ms'])} | {_ms(g['fwd_bwd_ms'])} |")
    for ep, opt in m["adamw"].items():
        lines.append(f"| AdamW step, ep {ep}: {opt['params'] / 1e9:.2f} B parameters on a rank | | "
                     f"{_ms(opt['step_ms'])} |")
    check = report.get("check")
    sums = report["pieces_check"]
    lines += ["", "## How the prediction is composed", "",
              f"Check of the pieces at ep 1: attention + router + experts ({cfg['experts']} experts, "
              f"{sums['rows']:,} rows) = {sums['pieces_ms']:.2f} ms forward+backward, the whole layer measured "
              f"{sums['layer_ms']:.2f} ms (x{sums['pieces_ms'] / sums['layer_ms']:.3f}).",
              "",
              "Per layer and pass (forward, backward): attention + router + experts at the busiest rank's expert "
              "rows (interpolated in the measured grid) + the all-to-alls (busiest rank's rows x bytes per row / "
              f"bandwidth, plus {a['all_to_all_latency_ms'] * 1e3:.0f} us per all-to-all, assumed). Without overlap, "
              f"dispatch and combine are serial and the forward pays a host sync ({a['host_sync_ms'] * 1e3:.0f} us, "
              f"assumed). With overlap, dispatch/experts/combine are a {a['chunks']}-chunk pipeline on a "
              "communication stream (one chunk's transfer each way and one chunk's compute stay exposed) and the "
              "host sync is hidden. A layer's FSDP2 traffic is prefetched while the link is otherwise idle "
              "(attention and router); only what exceeds that time is added. Step = layers x layer + outside the "
              "layers + AdamW + FSDP2's root all-gather and reduce-scatter (exposed: the embedding is needed first "
              "and its gradient comes last). TPS/GPU = tokens per rank / step.",
              ""]
    if "ep_overhead_per_layer_ms" in a:
        lines.append(f"The EP code's own local work (sorting, gathers, the per-rank expansion and sum) is the "
                     f"loopback benchmark's cost over the single-device step: {a['ep_overhead_measured_ms']:.3f} ms "
                     f"per layer, {a['ep_overhead_per_layer_ms']:.3f} ms added to every layer (none where the "
                     f"loopback was not slower) ({a['loopback_json']}).")
    else:
        lines.append("Not included: the EP code's own local work beyond the single-device fused path (pass "
                     "`--loopback` with benchmarks/ep_loopback.py's JSON to add it).")
    if check:
        lines.append(f"Check of the composition at ep 1: {a['loopback_layers']} x the measured layer + outside the "
                     f"layers = {check['composed_ms']:.1f} ms forward+backward, against {check['single_ms']:.1f} ms "
                     f"measured by the loopback run's single-device column of {a['loopback_workload']} "
                     f"(x{check['ratio']:.3f}).")
    lines += ["", "Not modelled: stragglers beyond the busiest rank's rows, contention between FSDP2's and the "
              "dispatcher's traffic on the link, the optimizer's DTensor overhead under FSDP2, kernel launch gaps; "
              "expert rows are spread evenly over a rank's local experts in the measured grid.", ""]
    return "\n".join(lines)


def model(args: argparse.Namespace) -> dict:
    measured = json.loads(Path(args.measured).read_text())
    if measured["tiny"] != args.tiny:
        raise SystemExit(f"{args.measured} was measured with tiny={measured['tiny']}; run model with the same --tiny")
    config = _config(args.tiny)
    assume = {"efficiency": args.efficiency, "bandwidth_gbps": NVLINK_GBPS * args.efficiency,
              "all_to_all_latency_ms": args.latency_us / 1e3, "host_sync_ms": args.host_sync_us / 1e3,
              "chunks": args.chunks, **loopback_inputs(args.loopback)}
    norm, router = _router(config)
    routing = routing_table(norm, router, config, measured["seq"])
    sizes = payload(config, router)
    predictions = {}
    for key, rows in routing.items():
        ep = int(key.split("/")[0])
        predictions[key] = {
            "assumed": predict(measured, config, sizes, ep, rows, assume["bandwidth_gbps"], assume),
            "published_peak": predict(measured, config, sizes, ep, rows, NVLINK_GBPS, assume),
        }
    report = {
        "command": "python benchmarks/ep_model.py " + " ".join(sys.argv[1:]),
        "shape": {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "experts": config.num_experts,
                  "top_k": config.num_experts_per_tok},
        "measured": measured, "assumptions": assume, "routing": routing, "payload": sizes,
        "fsdp": {str(ep): fsdp_bytes(config, ep) for ep in EPS}, "predictions": predictions,
    }
    pieces, rows = measured["pieces"], measured["seq"] * config.num_experts_per_tok
    report["pieces_check"] = {
        "rows": rows, "layer_ms": pieces["layer_ep1"]["fwd_bwd_ms"],
        "pieces_ms": (pieces["attention"]["fwd_bwd_ms"] + pieces["router"]["fwd_bwd_ms"] +
                      interpolate(measured["experts"]["1"], rows, "fwd_bwd_ms")),
    }
    if "single_fwd_bwd_ms" in assume:
        composed = (assume["loopback_layers"] * pieces["layer_ep1"]["fwd_bwd_ms"] +
                    pieces["outside_layers"]["fwd_bwd_ms"])
        report["check"] = {"composed_ms": composed, "single_ms": assume["single_fwd_bwd_ms"],
                           "ratio": composed / assume["single_fwd_bwd_ms"]}
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(markdown(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ep_model.json").write_text(json.dumps(report, indent=2))
    for key, pred in predictions.items():
        print(key, {mode: round(p["step_tps_per_gpu"]) for mode, p in pred["assumed"].items()})
    print(f"wrote {args.md} and {out / 'ep_model.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    m = sub.add_parser("measure", help="GPU: time the pieces at the per-rank shapes")
    m.add_argument("--out", required=True, help="folder for ep_model_measured.json")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--kernels", default="auto")
    m.add_argument("--reps", type=int, default=10)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--tiny", action="store_true", help="the bench's tiny workload at seq 64 (CPU dry run)")
    p = sub.add_parser("model", help="CPU: count the bytes, predict, write EP_MODEL.md")
    p.add_argument("--measured", required=True, help="ep_model_measured.json from the measure stage")
    p.add_argument("--md", default="benchmarks/EP_MODEL.md")
    p.add_argument("--out", default="benchmarks/results", help="folder for ep_model.json")
    p.add_argument("--loopback", default=None, help="benchmarks/ep_loopback.py's JSON (adds the EP code's cost)")
    p.add_argument("--efficiency", type=float, default=A2A_EFFICIENCY,
                   help="assumed fraction of the published 450 GB/s NVLink that the all-to-all reaches")
    p.add_argument("--latency-us", type=float, default=20.0, help="assumed fixed cost of one all-to-all")
    p.add_argument("--host-sync-us", type=float, default=50.0, help="assumed cost of one host sync")
    p.add_argument("--chunks", type=int, default=2, help="pipeline chunks of the overlapped dispatcher")
    p.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    measure(args) if args.stage == "measure" else model(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
