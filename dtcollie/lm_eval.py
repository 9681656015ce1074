"""dtcollie checkpoints in EleutherAI's lm-evaluation-harness.

    python -m dtcollie.lm_eval run --model dtcollie --model_args checkpoint=DIR[,tokenizer=DIR,base=DIR,dtype=fp32,
        device=cpu,batch_size=8] --tasks hellaswag [...any lm_eval option]

`python -m dtcollie.lm_eval` is lm-eval's own command line with the "dtcollie" model registered; in
Python, `import dtcollie.lm_eval` registers it for `lm_eval.simple_evaluate(model="dtcollie", ...)`.
Any checkpoint `python -m dtcollie.generate` reads works (dtcollie.inference). Log-likelihoods
use the same scoring as the trainer's multiple-choice evaluator (dtcollie.evals), rolling
log-likelihoods lm-eval's own token windows, and generation dtcollie's greedy KV-cached decoding.
Texts are encoded as lm-eval's "hf" model encodes them by default (add_bos_token unset: the
tokenizer's own special tokens, so BOS for Llama): `Tokenizer.encode_prompt`.
"""

import lm_eval.models  # noqa: F401  (lm-eval's own models register first; a registry with ours alone looks complete)
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dtcollie.cli import run_main
from dtcollie.data.tokenizer import load_tokenizer
from dtcollie.evals import continuation_tokens, loglikelihoods, start_token
from dtcollie.generation import generate
from dtcollie.inference import DTYPES, build_inference_model, load_weights, pick_device, tokenizer_folder


@register_model("dtcollie")
class DtcollieLM(LM):
    def __init__(self, checkpoint: str, tokenizer: str | None = None, base: str | None = None, dtype: str = "fp32",
                 device: str | None = "auto", batch_size: int | str = 8, **unused):
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer_folder(checkpoint, tokenizer))
        self.model = build_inference_model(*load_weights(checkpoint, base), pick_device(device), DTYPES[dtype])
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [continuation_tokens(self.tokenizer, *request.args) for request in requests]
        return loglikelihoods(self.model, pairs, self.model.args.max_seq_len, self.tokenizer.pad_id, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            tokens = self.tokenizer.encode_prompt(request.args[0])  # BOS scored too, as lm-eval's "hf" does
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                tokens, start_token(self.tokenizer), self.model.args.max_seq_len, 1)]
            scores = loglikelihoods(self.model, windows, self.model.args.max_seq_len, self.tokenizer.pad_id,
                                    self.batch_size)
            results.append(sum(score for score, _ in scores))
        return results

    def generate_until(self, requests) -> list[str]:
        results = []
        for request in requests:
            context, options = request.args
            until = options.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.tokenizer.encode_prompt(context)[-(self.model.args.max_seq_len - 1):]
            new = min(int(options.get("max_gen_toks", 256)), self.model.args.max_seq_len - len(prompt))
            tokens = generate(self.model, [prompt], new, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)[0]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cuts = [text.index(stop) for stop in until if stop and stop in text]
            results.append(text[:min(cuts)] if cuts else text)
        return results


if __name__ == "__main__":
    run_main(cli_evaluate)
