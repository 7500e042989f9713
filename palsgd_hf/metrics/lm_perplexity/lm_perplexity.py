"""An ``evaluate`` metric shipped inside palsgd_hf: perplexity of a causal LM from its losses.

The Hub's ``perplexity`` metric runs a model itself and its script lives on the Hub, so it cannot
load offline. This one takes what a training loop already has, the mean cross-entropy of each
evaluated batch and the number of predicted tokens in it, and returns the token-weighted mean loss
and its exponential. Load it by path, which needs no network::

    from palsgd_hf.metrics import load_metric
    ppl = load_metric("lm_perplexity")
    ppl.compute(losses=[2.1, 2.3], num_tokens=[4096, 4096])   # {'loss': 2.2, 'perplexity': 9.03}
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Token-weighted mean cross-entropy (nats) of causal-LM batches and its exponential, the perplexity."
_KWARGS_DESCRIPTION = """
Args:
    losses: mean cross-entropy (natural log) of each evaluated batch.
    num_tokens: number of predicted tokens in each batch (the weights of the mean).
Returns:
    loss: the token-weighted mean cross-entropy.
    perplexity: exp(loss) (inf if the loss is too large to exponentiate).
"""
_CITATION = ""


class LmPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"losses": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, losses, num_tokens):
        if len(losses) == 0:
            raise ValueError("lm_perplexity needs at least one batch loss; got none.")
        total = sum(num_tokens)
        if total <= 0 or any(n < 0 for n in num_tokens):
            raise ValueError(f"num_tokens must be non-negative with a positive sum; got {list(num_tokens)[:8]}...")
        loss = sum(l * n for l, n in zip(losses, num_tokens)) / total
        perplexity = math.exp(loss) if loss < 700 else float("inf")
        return {"loss": loss, "perplexity": perplexity}
