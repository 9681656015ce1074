"""Write the shipped chat sample and its tokenizer: dtcollie/assets/chat/{train,val}.jsonl and
dtcollie/assets/chat_tokenizer/.

    python tools/make_chat_sample.py [--sft dtcollie/assets/sft] [--out dtcollie/assets]

Conversations of one to three question/answer turns, taken in order from the shipped instruction
set (so val conversations hold only val questions), half of them opening with a system message.
train.jsonl uses the `messages` format, val.jsonl the ShareGPT `conversations` format, so the
shipped run reads both. The tokenizer is the shipped BPE plus ChatML's <|im_start|>/<|im_end|>
and its chat template (dtcollie.data.chat.make_chatml_tokenizer). Fully determined by SEED.
"""

import argparse
import json
import random
from pathlib import Path

from dtcollie.cli import run_main
from dtcollie.data.chat import make_chatml_tokenizer

SEED = 4321
SYSTEM = "You answer in one short sentence."


def conversations(pairs: list[dict], rng: random.Random) -> list[list[dict]]:
    result, start = [], 0
    while start < len(pairs):
        turns = pairs[start: start + rng.randint(1, 3)]
        start += len(turns)
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        for pair in turns:
            question = pair["input"].removeprefix("Question: ").removesuffix("\nAnswer:")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": pair["output"].strip()}]
        result.append(messages)
    return result


def sharegpt(messages: list[dict]) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="dtcollie/assets/sft", help="folder of the shipped instruction set")
    parser.add_argument("--out", default="dtcollie/assets", help="writes OUT/chat/ and OUT/chat_tokenizer/")
    args = parser.parse_args()
    rng = random.Random(SEED)
    out = Path(args.out)
    (out / "chat").mkdir(parents=True, exist_ok=True)
    for split, encode in (("train", lambda m: {"messages": m}), ("val", sharegpt)):
        pairs = [json.loads(line) for line in (Path(args.sft) / f"{split}.jsonl").read_text().splitlines()]
        chats = conversations(pairs, rng)
        (out / "chat" / f"{split}.jsonl").write_text("".join(json.dumps(encode(m)) + "\n" for m in chats))
        print(f"wrote {out / 'chat' / f'{split}.jsonl'}: {len(chats)} conversations")
    tokenizer = make_chatml_tokenizer("dtcollie/assets/tokenizer", str(out / "chat_tokenizer"))
    print(f"wrote {out / 'chat_tokenizer'}: vocab {len(tokenizer)}, eos {tokenizer.eos_token}")


if __name__ == "__main__":
    run_main(main)
