"""`PathChatForConditionalGeneration`: connector + causal language model, the LLaVA recipe for slides.

Cached tile features go through the connector into k slide tokens, which replace the k
placeholder ids of each sample with `masked_scatter` (into a new tensor, after a loud count
check), and the language model does the rest. The connector runs only on the prefill step of
`generate`: `prepare_inputs_for_generation` forwards tile inputs only when `is_first_iteration`
(or without a cache), exactly as transformers drops `pixel_values` after prefill for LLaVA.
`save_pretrained` writes safetensors plus a sha256 manifest that `from_pretrained` verifies.
`build_pathchat` and `from_pretrained` pick the attention kernel once (`choose_attn_implementation`:
FlashAttention-2 on CUDA with bf16/fp16 when installed, else SDPA; overridable) and default to
bf16 on CUDA, fp32 on CPU. The slide tokens never reach the language model as embeddings (see
`init_slide_embeddings`), so their rows need no training under LoRA.
Importing this module registers the model with `AutoModelForCausalLM` and
`AutoModelForImageTextToText` (no `trust_remote_code`).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from pathchat.model.attention_backend import choose_attn_implementation, default_dtype
from pathchat.model.checkpoint import verify_manifest as verify_checkpoint_manifest
from pathchat.model.checkpoint import write_manifest
from pathchat.model.configuration import PathChatConfig
from pathchat.model.connectors import Connector, ConnectorConfig, build_connector
from pathchat.model.conversation import add_slide_tokens

__all__ = [
    "TILE_INPUT_NAMES",
    "PathChatCausalLMOutputWithPast",
    "PathChatForConditionalGeneration",
    "build_pathchat",
    "init_slide_embeddings",
]

logger = logging.getLogger(__name__)

TILE_INPUT_NAMES = ("tile_features", "tile_coords", "tile_mask", "tile_scale", "slide_size_um")
"""Forward arguments that feed the connector; `generate` passes them on the prefill step only."""


@dataclass
class PathChatCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the connector's evidence (None on steps where it did not run).

    Attributes:
        tile_relevance: `[b, n]` how much each tile contributed (sums to 1 over valid tiles).
        token_relevance: `[b, k, n]` each slide token's weights over tiles, when the connector gives them.
    """

    tile_relevance: Tensor | None = None
    token_relevance: Tensor | None = None


class PathChatForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Connector + causal LM; no tile encoder (features are cached offline).

    Args:
        config: a `PathChatConfig`.
        language_model: an already built causal LM whose config is `config.text_config`, adopted
            as is (its weights are kept); None builds one from `config.text_config`.
    """

    config_class = PathChatConfig
    config: PathChatConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: PathChatConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        text_config = config.text_config
        assert isinstance(text_config, PretrainedConfig)  # __post_init__ built it
        self.connector: Connector = build_connector(config.connector or {}, config.feature_dim,
                                                    text_config.hidden_size)
        if self.connector.num_tokens != config.num_slide_tokens:
            raise ValueError(f"config.num_slide_tokens={config.num_slide_tokens} but the connector "
                             f"outputs {self.connector.num_tokens} tokens")
        # The connector initialises itself (its own Parameters included); keep post_init's generic
        # `_init_weights` off it.
        for module in self.connector.modules():
            setattr(module, "_is_hf_initialized", True)  # noqa: B010 (a flag transformers reads)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(text_config)
        else:
            if language_model.config is not text_config:
                raise ValueError("language_model.config must be config.text_config (build the config "
                                 "with text_config=language_model.config, as build_pathchat does)")
            for module in language_model.modules():  # pretrained weights: never re-initialise them
                setattr(module, "_is_hf_initialized", True)  # noqa: B010
        self.language_model = language_model
        self.post_init()
        # Never generate the slide tokens: their embeddings must not reach the language model.
        if self.generation_config is not None:
            suppress = list(self.generation_config.suppress_tokens or [])
            for token_id in (config.slide_token_id, config.slide_placeholder_id):
                if token_id is not None and int(token_id) not in suppress:
                    suppress.append(int(token_id))
            self.generation_config.suppress_tokens = suppress or None

    # ----------------------------------------------------------------- embeddings (delegated)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # ----------------------------------------------------------------- placeholders

    def _placeholder_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor) -> Tensor:
        """`[b, L]` bool, True at slide placeholders (compared by embedding when only embeds are given)."""
        placeholder_id = self.config.slide_placeholder_id
        if placeholder_id is None:
            raise ValueError("config.slide_placeholder_id is not set; call add_slide_tokens(tokenizer) "
                             "and set it (build_pathchat does)")
        if input_ids is not None:
            return input_ids == placeholder_id
        embed = self.get_input_embeddings()(torch.tensor(placeholder_id, device=inputs_embeds.device))
        return (inputs_embeds == embed.to(inputs_embeds.dtype)).all(dim=-1)

    def _check_counts(self, placeholder_mask: Tensor, num_slides: int) -> None:
        """Raise unless there are k placeholders per sample, one slide per sample."""
        k = int(self.config.num_slide_tokens or 0)
        batch = placeholder_mask.shape[0]
        if num_slides != batch:
            raise ValueError(f"tile_features hold {num_slides} slides but the input batch has {batch} "
                             "samples; PathChat takes exactly one slide per sample")
        per_sample = placeholder_mask.sum(dim=1).tolist()
        total, expected = int(sum(per_sample)), k * num_slides
        if total != expected:
            bad = next(i for i, c in enumerate(per_sample) if c != k)
            raise ValueError(f"the input holds {total} slide placeholder tokens but {num_slides} slides x "
                             f"k={k} need {expected}; sample {bad} has {per_sample[bad]} placeholders, "
                             f"expected {k}")
        for i, count in enumerate(per_sample):
            if count != k:
                raise ValueError(f"sample {i} has {count} slide placeholder tokens but its 1 slide "
                                 f"needs k={k}")

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        tile_features: Tensor | None = None,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        tile_scale: Tensor | None = None,
        slide_size_um: Tensor | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: Any | None = None,
        past_key_values: Any | None = None,
        position_ids: Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        logits_only_at_labels: bool = False,
        **kwargs: Any,
    ) -> PathChatCausalLMOutputWithPast:
        """Embed, put slide tokens where the placeholders are, run the language model.

        Args:
            input_ids: `[b, L]` token ids, k placeholder ids per sample when tile_features are given.
            attention_mask: `[b, L]`, or a custom `[b, 1, L, L]` boolean mask (True = may attend; from
                isolated packing), turned into the additive mask eager / SDPA attention take.
            tile_features: `[b, n, d_enc]` cached tile features, one slide per sample.
            tile_coords: `[b, n, 2]` float, each tile's top-left (x, y) in micrometres.
            tile_mask: `[b, n]` bool, True for real tiles (None: all real).
            tile_scale: `[b, n]` long magnification index (None: all 0).
            slide_size_um: `[b, 2]` float (width, height) of each scanned slide in micrometres, for
                connectors that place tiles on the glass (`position_frame="slide"`); others ignore it.
            labels: `[b, L]`, -100 where no loss; shifted inside the language model.
            inputs_embeds: `[b, L, d_llm]` instead of input_ids (placeholders found by embedding).
            cache / past_key_values: the KV cache (transformers 5 calls it `cache`; both accepted).
            position_ids, use_cache, logits_to_keep, kwargs: passed to the language model.
            logits_only_at_labels: with `labels`, project only the positions a label follows onto the
                vocabulary (the same loss; in supervised fine-tuning most tokens carry no label, so the
                LM head's work and the `[b, L, vocab]` logits shrink to the answer tokens). `logits` is
                then `[num_labelled, vocab]`, in row-major order of the labelled positions.
            cache_position: accepted for older callers and ignored (transformers 5.24 dropped it).

        Returns:
            `PathChatCausalLMOutputWithPast`; `tile_relevance` / `token_relevance` are set on calls
            that ran the connector.

        Raises:
            ValueError: neither or both of input_ids and inputs_embeds; tile_features for a batch of
                another size; placeholder counts that are not k per sample (both numbers and the
                sample named); placeholders on a prefill without tile_features.
        """
        del cache_position
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is None:
            cache = past_key_values
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.get_input_embeddings()(input_ids)
        assert inputs_embeds is not None

        tile_relevance = token_relevance = None
        if tile_features is not None:
            mask = self._placeholder_mask(input_ids, inputs_embeds)
            self._check_counts(mask, tile_features.shape[0])
            out = self.connector(tile_features, tile_coords, tile_mask, tile_scale, slide_size_um)
            slide_tokens = out.tokens.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
            # masked_scatter returns a new tensor: neither input_ids nor the caller's embeds change.
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device),
                                                         slide_tokens)
            tile_relevance, token_relevance = out.relevance, out.token_relevance
        elif (input_ids is not None and (cache is None or cache.get_seq_length() == 0)
              and self.config.slide_placeholder_id is not None
              and bool((input_ids == self.config.slide_placeholder_id).any())):
            # A prefill (or cache-less step) that shows placeholders must get the slide; later
            # decode steps may sample the placeholder id and are left alone.
            raise ValueError("input_ids hold slide placeholder tokens but no tile_features were given")

        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            attention_mask = self._additive_mask(attention_mask, inputs_embeds.dtype)
        if logits_only_at_labels and labels is not None:
            # transformers slices the hidden states with a boolean [b, L] mask before the LM head,
            # and its causal-LM loss takes the already shifted labels of those positions.
            next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            logits_to_keep = next_labels != -100
            kwargs["shift_labels"] = next_labels[logits_to_keep]
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return PathChatCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            tile_relevance=tile_relevance,
            token_relevance=token_relevance,
        )

    def _additive_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """A custom `[b, 1, q, k]` boolean mask (True = may attend; isolated packing) as the additive
        float mask that eager and SDPA attention both take, in the activations' dtype."""
        implementation = getattr(self.language_model.config, "_attn_implementation", None)
        if implementation not in ("eager", "sdpa"):
            raise ValueError(f"a 4-D attention mask (isolated packing) needs eager or sdpa attention, "
                             f"not {implementation}")
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    # ----------------------------------------------------------------- generation

    def prepare_inputs_for_generation(  # type: ignore[override]
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        cache: Any | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """GenerationMixin's inputs, with the tile inputs kept only for the prefill step.

        After prefill the slide tokens live in the KV cache and the new input ids hold no
        placeholders, so the connector must not run again (transformers drops `pixel_values`
        the same way). Without a cache every step re-reads the whole prompt, so they are kept.
        """
        tile_inputs = {name: kwargs.pop(name) for name in TILE_INPUT_NAMES if name in kwargs}
        model_inputs: dict[str, Any] = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update(tile_inputs)
        return model_inputs

    # ----------------------------------------------------------------- checkpoints

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | os.PathLike[str], is_main_process: bool = True, **kwargs: Any
    ) -> None:
        """`PreTrainedModel.save_pretrained` (safetensors), then the sha256 manifest of the folder."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_manifest(Path(save_directory))

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any,
        verify_manifest: bool = True, attn_implementation: str | None = None,
        device: torch.device | str | None = None, **kwargs: Any,
    ) -> PathChatForConditionalGeneration:
        """Verify the folder's manifest, then `PreTrainedModel.from_pretrained` on `device`.

        Args:
            pretrained_model_name_or_path: a local checkpoint folder saved by `save_pretrained`.
            verify_manifest: False skips the check (for folders from elsewhere, hub ids).
            attn_implementation: "eager", "sdpa" or "flash_attention_2" to force one; None chooses
                once (`choose_attn_implementation`: FlashAttention-2 on CUDA with bf16/fp16 when
                installed, else SDPA) and logs the choice.
            device: where the model goes (default CPU; ignored when `device_map` is passed).
            kwargs: for `PreTrainedModel.from_pretrained`; `dtype` (or `torch_dtype`) defaults to
                `default_dtype(device)`: bf16 on CUDA, fp32 on CPU.

        Raises:
            ManifestError: missing manifest, missing file, or a file whose sha256 differs (named).
            ValueError: an unknown attention implementation, or flash_attention_2 where it cannot run.
        """
        if verify_manifest:
            verify_checkpoint_manifest(Path(pretrained_model_name_or_path))
        target = torch.device(device if device is not None else "cpu")
        dtype = _as_dtype(kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None), target)
        implementation = choose_attn_implementation(target, dtype, attn_implementation)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, dtype=dtype,
                                        attn_implementation=implementation, **kwargs)
        assert isinstance(model, PathChatForConditionalGeneration)
        model.set_attn_implementation(implementation)  # the language model's config too
        if "device_map" not in kwargs and not _is_quantized(model):
            nn.Module.to(model, target)  # (transformers' typed wrapper of `to` confuses mypy)
        return model


def _as_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype, its name ("bfloat16"), or None (the device's default)."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return resolved


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None)


@torch.no_grad()
def init_slide_embeddings(model: PathChatForConditionalGeneration) -> None:
    """Set the `<slide>` and placeholder rows of the input (and untied output) embeddings to the mean row.

    Neither token ever reaches the language model as an embedding: `<slide>` is expanded into
    placeholders at render time, placeholders are overwritten by connector outputs, and generation
    suppresses both ids (`generation_config.suppress_tokens`). The rows are set to the mean of the
    other rows anyway, so a stray id would look like an average token rather than noise.
    """
    ids = [int(i) for i in (model.config.slide_token_id, model.config.slide_placeholder_id) if i is not None]
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    done: set[int] = set()
    for layer in layers:
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor) or id(weight) in done or weight.dim() != 2:
            continue
        done.add(id(weight))
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[ids] = False
        weight[ids] = weight[keep].float().mean(dim=0).to(weight.dtype)


def build_pathchat(
    language_model_config_or_model: PreTrainedModel | PretrainedConfig | dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    feature_dim: int,
    connector: ConnectorConfig | dict[str, Any] | None = None,
    *,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    slide_token_labels: list[str] | None = None,
) -> PathChatForConditionalGeneration:
    """PathChat around a language model, with slide tokens added to the tokenizer.

    Args:
        language_model_config_or_model: a causal LM instance (adopted with its weights: the model
            takes ownership and resizes its embeddings in place), or its config / config dict
            (copied; a new random LM is built).
        tokenizer: gets `<slide>` and the placeholder as special tokens (in place, idempotent).
        feature_dim: d_enc of the cached tile features.
        connector: connector config (object or type-tagged dict); None is the default connector.
        attn_implementation: "eager", "sdpa" or "flash_attention_2" to force one. None chooses
            once for a new model (FlashAttention-2 on CUDA with bf16/fp16 when installed, else
            SDPA) and keeps an adopted model's own (chosen when it was loaded); logged.
        device: where the model goes; None keeps an adopted model where it is, else CPU.
        dtype: compute dtype; None is bf16 on CUDA, fp32 on CPU for a new model (or when `device`
            is given), and leaves an adopted model's dtype alone (its connector stays float32).
            A quantised language model keeps its own; only the connector is cast.
        slide_token_labels: text before each slide token (`PathChatConfig.slide_token_labels`).

    Returns:
        The model, with embeddings covering `len(tokenizer)`, the slide ids in its config, their
        embedding rows set to the mean row (`init_slide_embeddings`) and both ids suppressed in
        generation.

    Raises:
        ValueError: an unknown attention implementation, or flash_attention_2 where it cannot run.
    """
    slide_id, placeholder_id = add_slide_tokens(tokenizer)
    language_model: PreTrainedModel | None = None
    if isinstance(language_model_config_or_model, PreTrainedModel):
        language_model = language_model_config_or_model
        text_config: PretrainedConfig | dict[str, Any] = language_model.config
    elif isinstance(language_model_config_or_model, PretrainedConfig):
        text_config = copy.deepcopy(language_model_config_or_model)
    else:
        text_config = copy.deepcopy(dict(language_model_config_or_model))
    if language_model is not None:
        # An adopted model was placed and given its kernel when it was loaded: keep both unless asked.
        target = torch.device(device) if device is not None else next(language_model.parameters()).device
        compute_dtype = _as_dtype(dtype, target) if dtype is not None or device is not None else None
        if attn_implementation is None:
            implementation = str(language_model.config._attn_implementation)
            logger.info("attention implementation kept from the adopted language model: %s", implementation)
        else:
            implementation = choose_attn_implementation(target, compute_dtype or language_model.dtype,
                                                        attn_implementation)
    else:
        target = torch.device(device if device is not None else "cpu")
        compute_dtype = _as_dtype(dtype, target)
        implementation = choose_attn_implementation(target, compute_dtype, attn_implementation)
    config = PathChatConfig(
        text_config=text_config,
        connector=connector if not isinstance(connector, ConnectorConfig) else connector.to_dict(),
        feature_dim=feature_dim,
        slide_token_id=slide_id,
        slide_placeholder_id=placeholder_id,
        slide_token_labels=slide_token_labels,
    )
    model = PathChatForConditionalGeneration(config, language_model=language_model)
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, nn.Embedding)
    if embeddings.num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
    init_slide_embeddings(model)
    model.set_attn_implementation(implementation)
    if compute_dtype is None:  # adopted model left as it is; the connector joins it (in float32)
        model.connector.to(device=target)
    elif _is_quantized(model.language_model):
        model.connector.to(device=target, dtype=compute_dtype)
    else:
        nn.Module.to(model, device=target, dtype=compute_dtype)
    return model


AutoModelForCausalLM.register(PathChatConfig, PathChatForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(PathChatConfig, PathChatForConditionalGeneration, exist_ok=True)
