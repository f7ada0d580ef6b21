"""Hugging Face transformers integration: a model's MoE blocks computed by the expert tier.

``attach(model, client)`` replaces the computation of every MoE block of a transformers causal
LM (or its base model) by a call to ``client.forward(decoder_layer_index, hidden_states)``: the
block receives the post-attention-norm hidden states and returns the routed plus shared experts'
output, which is exactly what the worker's forward API computes. Attention, norms, embeddings,
dense MLP layers and the LM head stay local, so ``model.generate(...)`` runs with the experts
remote. Written against transformers 5.25 (fixtures/requirements.txt), whose MoE blocks are:

| model_type   | block class (``decoder_layer.mlp``) | shared experts (computed by the tier) |
|--------------|-------------------------------------|---------------------------------------|
| qwen2_moe    | Qwen2MoeSparseMoeBlock              | ``shared_expert`` x sigmoid(``shared_expert_gate``) |
| qwen3_moe    | Qwen3MoeSparseMoeBlock              | none                                  |
| mixtral      | MixtralSparseMoeBlock               | none                                  |
| deepseek_v2  | DeepseekV2Moe                       | ``shared_experts``                    |
| deepseek_v3  | DeepseekV3MoE                       | ``shared_experts``                    |

Dense layers (Qwen ``mlp_only_layers`` / ``decoder_sparse_step``, DeepSeek
``first_k_dense_replace``) keep their local MLP.
"""

from __future__ import annotations

from typing import Any

# model_type -> the class name of its MoE block in transformers 5.25's modeling code.
MOE_BLOCKS = {
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "mixtral": "MixtralSparseMoeBlock",
    "deepseek_v2": "DeepseekV2Moe",
    "deepseek_v3": "DeepseekV3MoE",
}
ROUTING = ("remote", "local")


class UnsupportedModelError(ValueError):
    """The model is not of a family the expert tier serves (or not laid out as expected)."""


def _decoder_layers(model: Any):
    """The decoder layer list of a causal LM (``model.model.layers``) or base model (``model.layers``)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if layers is not None and hasattr(layers, "__len__"):
            return layers
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder layers (expected model.model.layers or model.layers)")


class Attachment:
    """What :func:`attach` did: ``layers`` (decoder-layer indices now served remotely).
    ``detach()`` restores the local computation; also a context manager."""

    def __init__(self, model: Any, client: Any, blocks: dict[int, Any]):
        self.model, self.client = model, client
        self._blocks = blocks
        self.layers = sorted(blocks)

    @property
    def attached(self) -> bool:
        return bool(self._blocks)

    def detach(self) -> None:
        for block in self._blocks.values():
            # The patched forward is an instance attribute shadowing the class's method.
            block.__dict__.pop("forward", None)
        self._blocks = {}

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<moe_client.hf.Attachment {state} layers={self.layers}>"


def _remote_forward(block: Any, client: Any, layer: int, routing: str):
    def forward(hidden_states, *args, **kwargs):
        if args or kwargs:
            raise TypeError(f"the MoE block of decoder layer {layer} takes only hidden_states")
        if routing == "local":
            # Run the model's own router here and send its choice (weights used as given).
            _, weights, ids = block.gate(hidden_states.reshape(-1, hidden_states.shape[-1]))
            return client.forward(layer, hidden_states, topk_ids=ids, topk_weights=weights)
        return client.forward(layer, hidden_states)

    return forward


def attach(model: Any, client: Any, *, routing: str = "remote") -> Attachment:
    """Serve every MoE block of ``model`` through ``client`` (a :class:`moe_client.ExpertClient`).

    Each MoE block's ``forward`` becomes ``client.forward(d, hidden_states)`` with ``d`` its
    decoder-layer index (the checkpoint's ``model.layers.{d}``). ``routing="local"`` runs the
    block's router here and sends the chosen experts and weights along (for attention tiers that
    run the gate themselves); the default lets the expert tier route.

    Raises :class:`UnsupportedModelError` for a model of another family, or one that is already
    attached. Returns an :class:`Attachment`; ``attachment.detach()`` undoes it.
    """
    if routing not in ROUTING:
        raise ValueError(f"routing must be one of {ROUTING}, got {routing!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    block_class = MOE_BLOCKS.get(model_type)
    if block_class is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) is not served by the expert tier: "
            f"supported are {', '.join(sorted(MOE_BLOCKS))}")
    blocks: dict[int, Any] = {}
    for index, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        if block is None or type(block).__name__ != block_class:
            continue  # a dense layer: its MLP stays local
        if "forward" in block.__dict__:
            raise UnsupportedModelError(
                f"decoder layer {index}'s MoE block is already attached (detach the earlier attachment first)")
        blocks[index] = block
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model_type}) has no {block_class} in its decoder layers")
    for index, block in blocks.items():
        block.forward = _remote_forward(block, client, index, routing)
    return Attachment(model, client, blocks)
