"""Write the shipped instruction-tuning sample: dtcollie/assets/sft/{train,val}.jsonl.

    python tools/make_sft_sample.py [--out dtcollie/assets/sft]

Synthetic question/answer pairs simple enough that a ~2M-parameter model visibly learns them in a
few hundred steps (the answer format at once, the easy tasks soon after), so an sft run shows its
loss falling. Rows are {"input": "Question: ...\\nAnswer:", "output": " ...."}; the output starts
with a space so that encode(input) + encode(output) tokenizes like the joined text.

For the rule-based tasks (arithmetic, counting, spelling) val questions never occur in train, so
val measures the learned rule; capitals are facts, so val asks the ones train taught.
The output is fully determined by SEED: rerunning gives identical files.
"""

import argparse
import json
import random
from pathlib import Path

from dtcollie.cli import run_main

SEED = 1234
VAL_FRACTION = 0.1

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Ireland": "Dublin", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Peru": "Lima",
    "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana", "Russia": "Moscow",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Australia": "Canberra", "Argentina": "Buenos Aires", "Brazil": "Brasilia", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Scotland": "Edinburgh", "Wales": "Cardiff",
    "England": "London", "Nigeria": "Abuja",
}

WORDS = """
apple house river stone bread chair table light green water music paper plant horse money
night cloud dream earth field glass heart lemon metal ocean piano queen sugar tiger voice watch
bird cake door fish gold hand kite lamp milk nest pear ring ship tree wind book cold dark fire
hill lake moon rain road salt snow star town wolf cat dog sun cup hat pen box egg map key
bag bed bus car cow fox jam leg owl pig rat sea sky toy van web yak zip ant bee bell coat
duck farm gate king leaf mark nose park rose sand tent wall yard bank boat coin deer frog
""".split()


def arithmetic() -> list[tuple[str, str]]:
    pairs = [(f"What is {a} plus {b}?", f"{a + b}.") for a in range(40) for b in range(40)]
    pairs += [(f"What is {a} minus {b}?", f"{a - b}.") for a in range(40) for b in range(a + 1)]
    return pairs


def counting() -> list[tuple[str, str]]:
    return [(f"What number comes after {n}?", f"{n + 1}.") for n in range(500)]


def spelling() -> list[tuple[str, str]]:
    pairs = [(f"Write the word {w} in capital letters.", f"{w.upper()}.") for w in WORDS]
    pairs += [(f"Spell the word {w} backwards.", f"{w[::-1]}.") for w in WORDS]
    pairs += [(f"What is the first letter of the word {w}?", f"{w[0]}.") for w in WORDS]
    return pairs


def capitals() -> list[tuple[str, str]]:
    return [(f"What is the capital of {country}?", f"{city}.") for country, city in CAPITALS.items()]


def row(question: str, answer: str) -> dict:
    return {"input": f"Question: {question}\nAnswer:", "output": f" {answer}"}


def make_splits(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, val = [], []
    for task in (arithmetic, counting, spelling):
        pairs = task()
        rng.shuffle(pairs)
        num_val = int(len(pairs) * VAL_FRACTION)
        val += pairs[:num_val]
        train += pairs[num_val:]
    facts = capitals()
    train += facts * 5  # facts need repetition to be memorised
    val += facts
    rng.shuffle(train)
    rng.shuffle(val)
    return [row(*p) for p in train], [row(*p) for p in val]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dtcollie/assets/sft")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "val"), make_splits()):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {out / name}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    run_main(main)
