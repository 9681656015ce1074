"""BOS and EOS as the model's own tokenizer adds them, against transformers' tokenizers (and lm-eval's
"hf" model), for tokenizer folders shaped like Llama 3, Llama 2 and Qwen (see hf_tokenizers.py)."""

import dataclasses
import json
import shutil
from functools import cache

import pytest
import torch
from hf_tokenizers import STYLES, write_folder
from transformers import AutoTokenizer

from dtcollie.config import Data
from dtcollie.data import build_dataset, load_tokenizer
from dtcollie.data.chat import load_chat_tokenizer, tokenize_conversations
from dtcollie.loss import IGNORE_INDEX
from dtcollie.data.sft import tokenize_examples
from dtcollie.data.shards import open_corpus
from dtcollie.data.tokenize_corpus import tokenize_corpus
from dtcollie.models.hf import save_hf
from dtcollie.models.llama import FLAVORS, Transformer

TEXTS = ["the dog sat on the red mat.", "hello, cat!", "what is 4 plus 3? it is 7.", "a", "the end of the park"]
DOCUMENTS = [f"{text} the story of the {word} is near its end." for text in TEXTS
             for word in ("cat", "red ball", "park")]  # only characters the tokenizers were trained on
# What transformers 5 puts before a text. llama2_config_only: with a tokenizer.json, transformers 5
# ignores tokenizer_config.json's add_bos_token / add_eos_token; the post-processor decides.
PREFIX = {"llama3": ["<|begin_of_text|>"], "llama2": ["<s>"], "llama2_eos": ["<s>"], "llama2_config_only": [],
          "qwen": []}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 4 plus 3?"},
            {"role": "assistant", "content": "it is 7."}, {"role": "user", "content": "and the cat?"},
            {"role": "assistant", "content": "the cat sat on the mat."}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    return {style: str(write_folder(root / style, style)) for style in STYLES}


@cache
def transformers_tokenizer(folder: str):
    return AutoTokenizer.from_pretrained(folder)


def theirs(folder: str, text: str, special: bool = True) -> list[int]:
    return transformers_tokenizer(folder)(text, add_special_tokens=special)["input_ids"]


def their_document(folder: str, text: str) -> list[int]:
    """transformers' encoding of a document with EOS after it, unless it already ends with EOS."""
    ids, eos = theirs(folder, text), transformers_tokenizer(folder).eos_token_id
    return ids if ids[-1] == eos else ids + [eos]


@pytest.mark.parametrize("style", STYLES)
def test_prefix_and_suffix_are_what_transformers_adds_around_a_text(folders, style):
    folder, hf = folders[style], transformers_tokenizer(folders[style])
    tok = load_tokenizer(folder)
    assert tok.prefix_ids == hf.convert_tokens_to_ids(PREFIX[style])
    assert tok.suffix_ids == ([hf.eos_token_id] if style == "llama2_eos" else [])
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in TEXTS:
        assert tok.prefix_ids + tok.encode(text) + tok.suffix_ids == theirs(folder, text)
        assert tok.encode_documents([text]) == [their_document(folder, text)]
        # A prompt is continued, so it never ends with the suffix's EOS.
        assert tok.encode_prompt(text) == theirs(folder, text)[:-1 if style == "llama2_eos" else None]


@pytest.mark.parametrize("style", STYLES)
def test_pretrain_rows_are_transformers_documents_and_bos_starts_each_document(folders, style, write):
    folder = folders[style]
    tok = load_tokenizer(folder)
    cfg = Data(train_files=[write("docs.jsonl", [{"text": d} for d in DOCUMENTS])], val_fraction=0.0,
               document_mask=True)
    ds = build_dataset(cfg, tok, seq_len=16, split="train")
    stream = [t for document in DOCUMENTS for t in their_document(folder, document)]
    blocks = torch.tensor(stream[: len(stream) // 17 * 17]).view(-1, 17)
    assert len(ds) == len(blocks) > 10
    assert ds.input_ids.tolist() == blocks[:, :-1].tolist()
    ids, positions, labels = ds.input_ids, ds.positions, ds.labels
    after_eos = torch.zeros_like(ids, dtype=torch.bool)
    after_eos[:, 1:] = ids[:, :-1] == tok.eos_id
    assert torch.equal(positions[:, 1:] == 0, after_eos[:, 1:])  # documents start right after EOS ...
    first = ids[after_eos].tolist()
    assert len(first) >= 10 and (set(first) == {tok.bos_id} if PREFIX[style] else tok.bos_id not in first)
    assert (labels[ids == tok.eos_id] == IGNORE_INDEX).all()  # ... and no EOS is trained to predict the next BOS
    assert (labels[labels != IGNORE_INDEX] == blocks[:, 1:][labels != IGNORE_INDEX]).all()


@pytest.mark.parametrize("style", ["llama3", "llama2_eos", "qwen"])
def test_token_shards_hold_the_documents_pre_training_packs(folders, style, write, tmp_path):
    folder = folders[style]
    source = write("docs.jsonl", [{"text": d} for d in DOCUMENTS])
    tokenize_corpus([source], str(tmp_path / "corpus"), folder, workers=1, progress=False)
    corpus = open_corpus(str(tmp_path / "corpus"), load_tokenizer(folder))
    stored = corpus.read(0, 0, corpus.shards[0].tokens).tolist()
    assert stored == [t for document in DOCUMENTS for t in their_document(folder, document)]
    manifest = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    assert manifest["job"]["prefix_ids"] == transformers_tokenizer(folder).convert_tokens_to_ids(PREFIX[style])


@pytest.mark.parametrize("style", ["llama3", "llama2", "qwen"])
def test_sft_rows_are_the_prompt_as_transformers_encodes_it_then_the_answer_and_eos(folders, style):
    folder = folders[style]
    tok = load_tokenizer(folder)
    examples = [("what is 4 plus 3?", " it is 7."), ("hello, cat!", " the cat sat on the mat.")]
    rows = tokenize_examples(tok, examples, seq_len=64, split="train")
    for (prompt, answer), (tokens, is_output) in zip(examples, rows):
        expected_prompt, expected_answer = theirs(folder, prompt), theirs(folder, answer, special=False)
        assert tokens == expected_prompt + expected_answer + [tok.eos_id]
        assert is_output == [False] * len(expected_prompt) + [True] * (len(expected_answer) + 1)


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_chat_rows_equal_apply_chat_template_with_one_bos(folders, style):
    folder = folders[style]
    hf = transformers_tokenizer(folder)
    [(tokens, trained)] = tokenize_conversations(load_chat_tokenizer(folder), [("line 1", MESSAGES)], 128, "train")
    expected = hf.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]
    assert tokens == expected
    assert tokens.count(hf.bos_token_id) == (1 if style == "llama3" else 0) and sum(trained) > 10
    if style == "llama3":
        assert tokens[0] == hf.bos_token_id
    # generate --chat encodes the rendered prompt with no special tokens of its own
    prompt = hf.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert load_tokenizer(folder).encode(prompt) == \
        hf.apply_chat_template(MESSAGES[:2], tokenize=True, add_generation_prompt=True)["input_ids"]


def test_the_shipped_debug_tokenizers_add_nothing_but_eos(assets):
    tok = load_tokenizer(str(assets / "tokenizer"))
    assert (tok.prefix_ids, tok.suffix_ids, tok.bos_id) == ([], [], None)
    assert tok.encode_documents(["It is", "Emma"]) == [[1170, 370, 0], [38, 78, 78, 66, 0]]
    assert tok.encode_prompt("It is") == [1170, 370]
    chat = load_tokenizer(str(assets / "chat_tokenizer"))
    assert (chat.prefix_ids, chat.suffix_ids, chat.bos_id) == ([], [], None)
    assert chat.encode_documents(["It is"]) == [[1170, 370, 2049]]


@pytest.fixture(scope="module")
def llama3_model(folders, tmp_path_factory) -> str:
    """A tiny random Llama as an HF folder with the Llama 3 style tokenizer."""
    folder = tmp_path_factory.mktemp("llama3_model")
    tok = load_tokenizer(folders["llama3"])
    args = dataclasses.replace(FLAVORS["debug"], vocab_size=tok.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    save_hf(model.state_dict(), args, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{folders['llama3']}/{name}", folder / name)
    return str(folder)


def test_generate_encodes_the_prompt_as_transformers_and_continues_as_its_model(llama3_model, capsys):
    from transformers import LlamaForCausalLM

    from dtcollie.generate import main

    prompt = "the dog sat on the"
    main(["--checkpoint", llama3_model, "--prompt", prompt, "--max-new-tokens", "8", "--dtype", "fp64"])
    ours = capsys.readouterr().out
    hf, model = transformers_tokenizer(llama3_model), LlamaForCausalLM.from_pretrained(llama3_model,
                                                                                    dtype=torch.float64)

    def their_completion(ids: list[int]) -> str:
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=hf.eos_token_id,
                             pad_token_id=hf.eos_token_id)
        return hf.decode(out[0, len(ids):], skip_special_tokens=True)

    with_bos = their_completion(theirs(llama3_model, prompt))
    assert ours == with_bos + "\n"
    assert with_bos != their_completion(theirs(llama3_model, prompt, special=False))  # BOS changes the answer


def test_lm_eval_dtcollie_model_equals_its_hf_model_which_adds_bos(llama3_model):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from dtcollie.lm_eval import DtcollieLM

    hf_lm = HFLM(pretrained=llama3_model, device="cpu", dtype="float64", batch_size=2)
    ours = DtcollieLM(checkpoint=llama3_model, dtype="fp64", device="cpu", batch_size=2)
    bos = hf_lm.tokenizer.bos_token_id
    assert hf_lm.add_bos_token is None and hf_lm.tok_encode("the cat")[0] == bos  # the default: BOS added

    def requests(kind: str, arguments: list[tuple]) -> list:
        return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]

    pairs = requests("loglikelihood", [("the dog sat on the", " mat."), ("", "hello, cat!"),
                                       ("what is 4 plus 3?", " 7")])
    their_lls, our_lls = hf_lm.loglikelihood(pairs), ours.loglikelihood(pairs)
    assert [g for _, g in our_lls] == [g for _, g in their_lls]
    assert torch.allclose(torch.tensor([ll for ll, _ in our_lls]), torch.tensor([ll for ll, _ in their_lls]),
                          rtol=0, atol=1e-5)
    rolling = requests("loglikelihood_rolling", [("the story of the dogs is near its end.",)])
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf_lm.loglikelihood_rolling(rolling), abs=1e-5)
    until = requests("generate_until", [("the cat sat", {"until": ["."], "max_gen_toks": 6})])
    assert ours.generate_until(until) == hf_lm.generate_until(until)
