"""moe_client: a model's MoE layers computed by a moe-operator worker group (the expert tier).

    from moe_client import ExpertClient
    client = ExpertClient(["http://10.0.0.5:8081", "http://10.0.0.6:8081"], token="...")
    out = client.forward(layer=3, hidden_states=x)        # x: torch bf16/f32 or numpy f32, [..., H]

    import moe_client.hf
    attachment = moe_client.hf.attach(model, client)    # transformers Qwen2/3-MoE, Mixtral, DeepSeek-V2/V3
    model.generate(...)                                 # the experts run on the worker group
    attachment.detach()

The wire format is docs/forward-api.md of the moe-operator repository.
"""

from .client import ExpertClient
from .transport import ExpertConnectionError, ExpertError, ExpertTimeout
from .wire import WireError

__all__ = ["ExpertClient", "ExpertError", "ExpertConnectionError", "ExpertTimeout", "WireError", "hf"]
__version__ = "0.1.0"


def __getattr__(name):
    # moe_client.hf needs no torch at import, but load it only when asked for.
    if name == "hf":
        from . import hf

        return hf
    raise AttributeError(f"module 'moe_client' has no attribute {name!r}")
