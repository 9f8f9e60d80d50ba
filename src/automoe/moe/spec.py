"""A family's MoE block described as data: what differs between families is named here, not forked."""

from __future__ import annotations

from dataclasses import dataclass

SCORE_FUNCS = ("softmax", "sigmoid", "topk_softmax")
# "hf_gate": the HF experts class's own `_apply_gate` (DeepSeek-V4's and HY-V4's clamped SwiGLU), run on the torch
# path only: no kernel computes it, so act_name stays None
ACTIVATIONS = ("swiglu", "clamped_swiglu", "hf_gate")
# the expert activation functions automoe's kernels compute exactly (recognition names the model's act_fn by
# probing it against each; an act_fn that matches none keeps act_name None and runs the torch path)
ACT_NAMES = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu", "relu2")


@dataclass(frozen=True)
class RouterSpec:
    """How router logits become top-k expert ids and weights.

    score_func: "softmax" (softmax over all experts, then top-k), "sigmoid" (sigmoid scores, top-k chosen on
        scores + e_score_correction_bias within the best `topk_group` of `n_group` groups), "topk_softmax"
        (GPT-OSS: top-k on the logits, softmax over the k chosen).
    """

    num_experts: int
    top_k: int
    score_func: str = "softmax"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    has_bias: bool = False
    has_correction_bias: bool = False
    logits_in_fp32: bool = False
    weights_in_fp32: bool = False
    renorm_eps: float = 0.0

    def __post_init__(self) -> None:
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"unknown router score_func {self.score_func!r}; known: {SCORE_FUNCS}")
        if self.num_experts % self.n_group:
            raise ValueError(
                f"n_group={self.n_group} does not divide num_experts={self.num_experts}; fix the config."
            )


@dataclass(frozen=True)
class ExpertsSpec:
    """The expert MLP: SwiGLU-style gate/up, down, and how the fused tensors are laid out.

    act_name: which of ACT_NAMES the model's act_fn computes; None when it is none of them (then every path
        calls the act_fn module itself). Never assumed: recognition sets it by probing the act_fn.
    has_gate: False for plain up/down experts (NemotronH: act(x @ up) @ down, tensors up_proj / down_proj).
    interleaved: gate and up alternate along the 2I axis (GPT-OSS) instead of [gate; up].
    transposed: weights stored [E, in, out] (GPT-OSS) instead of HF's usual [E, out, in].
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str = "swiglu"
    act_name: str | None = None
    has_gate: bool = True
    interleaved: bool = False
    transposed: bool = False
    has_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def tensor_names(self) -> tuple[str, str, str, str]:
        """HF's names of (first projection, down projection, their biases)."""
        first = "gate_up_proj" if self.has_gate else "up_proj"
        return first, "down_proj", f"{first}_bias", "down_proj_bias"

    def __post_init__(self) -> None:
        if not self.has_gate and self.activation != "swiglu":
            raise ValueError(f"experts without a gate have no {self.activation!r} activation")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown experts activation {self.activation!r}; known: {ACTIVATIONS}")
        if self.activation == "hf_gate" and self.act_name is not None:
            raise ValueError("the hf_gate activation runs HF's own _apply_gate; it takes no act_name")
        if self.act_name is not None and self.act_name not in ACT_NAMES:
            raise ValueError(f"unknown expert act_name {self.act_name!r}; known: {ACT_NAMES} or None")


SHARED_COMBINES = ("sum", "average")


@dataclass(frozen=True)
class BlockSpec:
    """Where the parts live in the HF block (attribute names are kept so state_dict keys match HF).

    router: the rule automoe's Router reproduces, or None where no RouterSpec does (PhiMoE's sparsemixer, ERNIE 4.5's
        corrected softmax, ...): then the HF router module itself runs, called as the HF block calls it: on
        [batch, seq, hidden] where router_batched, else on [tokens, hidden], then router_args by name, each the
        block's own tensor (AFMoE's expert_bias, MiniMax-M2's e_score_correction_bias) or one of its inputs.
    block_inputs: what the HF block's forward takes after the hidden states, by keyword (DeepSeek-V4's input_ids, for
        its hash router); one the router does not take is unused by the HF block too, as its numerical check shows.
    """

    router: RouterSpec | None
    experts: ExpertsSpec
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    # a block that scales the experts' weighted sum itself (Beam) rather than in its router
    routed_output_scale: float = 1.0
    # LatentMoE (Nemotron 3 Super/Ultra): Linear projections into the experts' width before dispatch and back after
    latent_in_attr: str | None = None
    latent_out_attr: str | None = None
    returns_router_scores: bool = False
    jitter_noise: float = 0.0
    router_args: tuple[str, ...] = ()
    block_inputs: tuple[str, ...] = ()
    router_batched: bool = False
    # a norm the block applies to its output, after routed and shared experts are combined (A.X-K1)
    post_norm_attr: str | None = None
    # "average": the block returns (routed + shared) / 2 (Cohere2-MoE) instead of their sum
    shared_combine: str = "sum"

    @property
    def router_tensors(self) -> tuple[str, ...]:
        """The block's own tensors its HF router takes (the MoE block keeps them under their HF names)."""
        return tuple(name for name in self.router_args if name not in self.block_inputs)

    def __post_init__(self) -> None:
        if self.shared_combine not in SHARED_COMBINES:
            raise ValueError(f"unknown shared_combine {self.shared_combine!r}; known: {SHARED_COMBINES}")
