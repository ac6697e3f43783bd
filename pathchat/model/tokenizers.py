"""Small tokenizers built fully offline, for tests and tiny random language models.

A byte-level BPE is trained in memory on a fixed few-KB corpus of English and pathology
text, so it needs no download and gives the same ids on every run. Each style carries the
special tokens and a real Jinja chat template of its model family (Qwen2's ChatML, Llama 3),
so chat rendering and loss masks are tested against the same template code paths as real
checkpoints. Size a model's embedding with ``len(tokenizer)`` (added tokens included).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["TOKENIZER_STYLES", "TokenizerStyle", "build_test_tokenizer"]

# Qwen2-Instruct's template (ChatML, default system prompt when none is given).
_QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama-3-Instruct's template (bos once, header blocks, content trimmed, <|eot_id|> ends a turn).
_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerStyle:
    """Special tokens and chat template of one model family."""

    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str  # the end-of-turn token of the instruct template
    pad_token: str
    chat_template: str


TOKENIZER_STYLES: dict[str, TokenizerStyle] = {
    "qwen2": TokenizerStyle(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_QWEN2_TEMPLATE,
    ),
    "llama3": TokenizerStyle(
        special_tokens=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        chat_template=_LLAMA3_TEMPLATE,
    ),
}

# Fixed training text: enough English and pathology vocabulary that test sentences do not
# fall apart into single bytes. Changing it changes every id, so leave it alone.
_CORPUS = """\
You are a helpful assistant. What is shown in this slide? Describe the tissue and the findings.
The slide shows invasive ductal carcinoma of the breast with a solid and trabecular growth pattern.
Tumour cells have pleomorphic nuclei, prominent nucleoli and frequent mitotic figures.
There is lymphovascular invasion and the surgical margins are free of tumour.
The histological grade is high. The stroma is desmoplastic with a lymphocytic infiltrate.
Hematoxylin and eosin staining shows necrosis in the centre of the tumour nests.
Is there evidence of metastasis in the lymph nodes? No metastatic carcinoma is identified.
What is the diagnosis? The diagnosis is adenocarcinoma of the colon, moderately differentiated.
Glands are irregular and infiltrate the muscularis propria. Mucin is present in some areas.
The squamous epithelium shows dysplasia. Keratin pearls suggest squamous cell carcinoma.
Normal lung parenchyma with alveoli, bronchioles and blood vessels. Fibrosis is mild.
Renal cell carcinoma, clear cell type, with a delicate vascular network and clear cytoplasm.
The prognosis depends on the stage, the grade, the margins and the presence of vascular invasion.
Immunohistochemistry for estrogen receptor, progesterone receptor and HER2 is recommended.
Please answer the question about the whole slide image. Answer with a short sentence.
What is 2+2? Two plus two is four. What is the capital of France? The capital of France is Paris.
Hello, how are you today? I am fine, thank you. Can you help me? Yes, I can help you with that.
The quick brown fox jumps over the lazy dog. A small model learns from a small corpus.
Cells, nuclei, glands, stroma, fat, muscle, nerve, vessel, lymphocyte, macrophage, neutrophil.
Benign, malignant, atypical, reactive, inflammatory, ulcerated, hemorrhagic, necrotic, cystic.
Low magnification, high magnification, microns per pixel, tiles, features, coordinates, slide.
Multiple choice: A) benign B) malignant C) inflammatory D) normal. The answer is B.
Summarise the report: tumour size 2.5 cm, grade 3, margins clear, 0 of 12 lymph nodes positive.
Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 and punctuation: , . ; : ! ? ( ) [ ] - _ / ' "
"""


def build_test_tokenizer(style: str = "qwen2", vocab_size: int = 1024,
                         corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE in memory and dress it as a ``style`` chat tokenizer.

    Args:
        style: "qwen2" (ChatML) or "llama3".
        vocab_size: target BPE vocabulary, special tokens included (the corpus may yield fewer).
        corpus: extra training lines (e.g. a dataset's own text, so a tiny model trained from
            scratch on it sees whole words instead of letters).

    Returns:
        A fast tokenizer with the family's special tokens, eos/pad/bos and ``chat_template``.

    Raises:
        ValueError: unknown style.
    """
    if style not in TOKENIZER_STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; choose one of {sorted(TOKENIZER_STYLES)}")
    spec = TOKENIZER_STYLES[style]

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    backend.train_from_iterator([*_CORPUS.splitlines(), *corpus], trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        pad_token=spec.pad_token,
        unk_token=None,
        model_max_length=4096,
    )
    tokenizer.chat_template = spec.chat_template
    return tokenizer
