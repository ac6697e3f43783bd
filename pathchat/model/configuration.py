"""`PathChatConfig`: a composite config with a `text_config` sub-config, like transformers' `LlavaConfig`.

Three parts, two of them configured here: the connector (a type-tagged dict that the connector
registry rebuilds) and the language model (`text_config`, any causal LM config). There is no tile
encoder: the model sees cached tile features. `num_slide_tokens` (k) is checked against the
connector's own k and never silently changed. Importing this module registers `"pathchat"` with
`AutoConfig`, so no `trust_remote_code` is needed.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from pathchat.model.connectors import DEFAULT_CONNECTOR, ConnectorConfig
from pathchat.model.connectors.registry import CONNECTORS
from pathchat.model.conversation import SLIDE_TOKEN

__all__ = ["PathChatConfig", "connector_config_dict"]


def connector_config_dict(connector: ConnectorConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The full, type-tagged dict form of a connector config (a new dict; the input is not changed).

    Args:
        connector: a config object, its dict form (dispatched on `"type"`), or None for the default
            connector with every default value.

    Raises:
        ValueError: unknown type or fields (from `ConnectorConfig.from_dict`).
        TypeError: anything else.
    """
    if connector is None:
        return CONNECTORS[DEFAULT_CONNECTOR][0]().to_dict()
    if isinstance(connector, ConnectorConfig):
        return connector.to_dict()
    if isinstance(connector, dict):
        return ConnectorConfig.from_dict(dict(connector)).to_dict()
    raise TypeError(f"connector must be a ConnectorConfig, a dict with a 'type' or None, got {type(connector)}")


class PathChatConfig(PretrainedConfig):
    """Configuration of `PathChatForConditionalGeneration`.

    Attributes:
        text_config: the language model's config (dict or config object; a dict without
            `model_type` is read as Qwen2). Any model `AutoModelForCausalLM` can build.
        connector: the connector config as a dict with its `"type"` tag (default: the
            scale-invariant connector with its defaults); stored with every field filled in.
        feature_dim: d_enc, the width of the cached tile features.
        num_slide_tokens: k, placeholders per slide; must equal the connector's k. Derived from
            the connector when None.
        slide_token: the marker users write where the slide goes.
        slide_token_id, slide_placeholder_id: token ids from `add_slide_tokens(tokenizer)`, set by
            the caller (`build_pathchat` does); the placeholder id is what the model replaces.
        slide_token_labels: text rendered before each slide token (one per token; None: none), so
            the LLM reads which grid cell a token covers instead of learning it (`slide_block`).
    """

    model_type = "pathchat"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PretrainedConfig | None = None
    connector: dict | None = None
    feature_dim: int = 1024
    num_slide_tokens: int | None = None
    slide_token: str = SLIDE_TOKEN
    slide_token_id: int | None = None
    slide_placeholder_id: int | None = None
    slide_token_labels: list[str] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.connector = connector_config_dict(self.connector)
        connector_k = ConnectorConfig.from_dict(self.connector).num_tokens  # type: ignore[attr-defined]
        if self.num_slide_tokens is None:
            self.num_slide_tokens = int(connector_k)
        elif int(self.num_slide_tokens) != int(connector_k):
            raise ValueError(f"num_slide_tokens={self.num_slide_tokens} but the {self.connector['type']!r} "
                             f"connector outputs {connector_k} tokens; leave num_slide_tokens unset to derive it")
        if self.slide_token_labels is not None:
            self.slide_token_labels = [str(label) for label in self.slide_token_labels]
            if len(self.slide_token_labels) != self.num_slide_tokens or not all(self.slide_token_labels):
                raise ValueError(f"slide_token_labels needs {self.num_slide_tokens} non-empty labels (one per "
                                 f"slide token), got {self.slide_token_labels!r}")
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {self.feature_dim}")
        # The language model's own config decides whether its lm_head is tied (LlavaConfig does the same).
        text_config = self.text_config
        if not self.tie_word_embeddings and getattr(text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True


AutoConfig.register(PathChatConfig.model_type, PathChatConfig, exist_ok=True)
