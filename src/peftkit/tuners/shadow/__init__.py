"""ShadowPEFT: a small trainable shadow network beside a frozen decoder, injected at every block,
`h_in = h + alpha * W_up W_down Dropout(h - s)`, `s' = (1 - g) s + g T(h_out)`, `g = sigmoid(G(h_out))`."""

from ...registry import MethodSpec
from ...utils.peft_types import PeftType
from .cache import ShadowCache
from .config import ShadowConfig
from .detached import DetachedShadowModel
from .layers import ShadowLayer
from .model import ShadowModel

METHOD = MethodSpec(
    peft_type=PeftType.SHADOW,
    config_cls=ShadowConfig,
    tuner_cls=ShadowModel,
    cli_names=("shadow",),
    capabilities=set(),
)

__all__ = ["METHOD", "DetachedShadowModel", "ShadowCache", "ShadowConfig", "ShadowLayer", "ShadowModel"]
