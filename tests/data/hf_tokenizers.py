"""Tokenizer folders shaped like the hub's, built locally with `tokenizers` (there is no hub here).

llama3: byte-level BPE; tokenizer.json's TemplateProcessing puts <|begin_of_text|> before a text;
        PreTrainedTokenizerFast, a chat template that starts with {{ bos_token }}.
llama2: SentencePiece-style (Metaspace, byte fallback) BPE; <s> from the post-processor; the
        LlamaTokenizerFast config with add_bos_token true, as Llama 2 ships it.
llama2_eos: the same with "<s> $A </s>" and add_eos_token true (a text ends with EOS already).
llama2_config_only: add_bos_token true in the config, no post-processor in tokenizer.json.
qwen:   byte-level BPE with Qwen's pre-tokenizer, no BOS, EOS <|endoftext|>, a ChatML template.

Each tokenizer.json is what its tokenizer class builds (transformers 5's Llama and Qwen2 classes
rebuild the normalizer and pre-tokenizer their own way and would otherwise encode text differently).
"""

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from dtcollie.data.chat import CHATML_TEMPLATE

SENTENCES = ["the cat sat on the mat, and the dog sat on the log.", "a dog ran in the park with a red ball!",
             "hello world: the end of the story is near.", "what is 3 plus 4? it is 7, said the cat."] * 5
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
STYLES = ("llama3", "llama2", "llama2_eos", "llama2_config_only", "qwen")
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def byte_level(special: list[str], qwen: bool = False) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen:
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return backend


def sentencepiece_like() -> Tokenizer:
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                               show_progress=False))
    return backend


def template(single: str, backend: Tokenizer, tokens: list[str]):
    return processors.TemplateProcessing(single=single, pair=f"{single} $B:1",
                                         special_tokens=[(t, backend.token_to_id(t)) for t in tokens])


def write_folder(folder: Path, style: str) -> Path:
    """The tokenizer folder of `style` (one of STYLES) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if style == "llama3":
        backend = byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"])
        backend.post_processor = template("<|begin_of_text|> $A", backend, ["<|begin_of_text|>"])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                  "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_CHAT}
    elif style == "qwen":
        backend = byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], qwen=True)
        config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}
    else:
        backend = sentencepiece_like()
        single = {"llama2": "<s> $A", "llama2_eos": "<s> $A </s>"}.get(style)
        if single:
            backend.post_processor = template(single, backend, ["<s>", "</s>"] if "</s>" in single else ["<s>"])
        config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": style == "llama2_eos"}
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
