"""GPT-OSS: its MLP returns (hidden_states, router_scores) where other families return hidden_states.

Everything else (top-k-then-softmax router with bias, interleaved transposed experts with biases, clamped
SwiGLU) is read off the module structure and checked numerically by the recogniser."""

BLOCK_OVERRIDES = {"returns_router_scores": True}
