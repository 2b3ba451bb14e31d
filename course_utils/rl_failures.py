"""When RL from a verifiable reward goes wrong: the gradient each loss aggregation gives one token (the length bias
of GRPO's per-sequence mean against DAPO's and Dr. GRPO's normalisers), a partial credit a policy can game and one
only the answer earns, and a reward wrapper that keeps what every GRPO step sampled.

Built in notebooks/16_rl_failure_modes.ipynb on top of course_utils.rl (notebook 12):

    token_weights(batch["completion_mask"], advantages, "grpo")     # d loss / d logp of every token, ratio 1
    train_grpo(model, tok, rows, RecordedReward(digit_credit, tok), steps=15)   # the hack, recorded
"""

# Exported from notebooks/16_rl_failure_modes.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/16_rl_failure_modes.ipynb · 1.1 · The weight one token gets
import torch

from course_utils.errors import CourseError
from course_utils.rl import check_policy_inputs, exact_reward


def token_weights(completion_mask, advantages, loss_type, max_completion_length=None) -> torch.Tensor:
    """d loss / d logp_t of policy_loss at a batch's first update (ratio 1, no KL term), in closed form: -A_i times
    the share of the loss the aggregation gives token t of completion i. [B, T], 0 past a completion's end.
    grpo: 1 / (B |o_i|); bnpo and dapo: 1 / sum_j |o_j|; dr_grpo: 1 / (B L), L = max_completion_length."""
    mask = torch.as_tensor(completion_mask).float()
    check_policy_inputs(mask, mask, None, 0.0, 0.2, None, loss_type, max_completion_length)  # notebook 12's checks
    advantages = torch.as_tensor(advantages, dtype=torch.float32).flatten()
    if advantages.numel() != mask.shape[0]:
        raise CourseError(f"{advantages.numel()} advantages for {mask.shape[0]} completions: one per completion.")
    if loss_type == "grpo":
        share = mask / (mask.shape[0] * mask.sum(-1, keepdim=True))
    elif loss_type in ("bnpo", "dapo"):
        share = mask / mask.sum()
    else:  # dr_grpo
        share = mask / (mask.shape[0] * max_completion_length)
    return -advantages.view(-1, 1) * share


# %% notebooks/16_rl_failure_modes.ipynb · 1.2 · Two partial credits, and a recorder
def check_pairs(texts, answers) -> None:
    """A CourseError unless texts and answers are two lists of strings of the same length."""
    if isinstance(texts, str) or isinstance(answers, str) or len(texts) != len(answers):
        raise CourseError(f"a reward takes two lists of the same length (completions, answers); got {type(texts).__name__} "
                          f"and {type(answers).__name__}: wrap a single completion as [text], [answer].")


def digit_credit(texts, answers) -> list[float]:
    """A partial credit a policy can game: the characters of the completion that are digits of the answer, over
    the answer's digit count. The answer scores 1, any shuffle of it too, the answer padded with its digits more."""
    check_pairs(texts, answers)
    scores = []
    for text, answer in zip(texts, answers):
        digits = {c for c in answer if c.isdigit()}
        scores.append(sum(c in digits for c in text) / max(1, sum(c.isdigit() for c in answer)))
    return scores


def position_credit(texts, answers) -> list[float]:
    """A partial credit only the answer earns in full: the items (space-separated) in their right place, over the
    longer of the two item lists. An extra item, a missing one or a shuffle each cost; only the answer scores 1."""
    check_pairs(texts, answers)
    scores = []
    for text, answer in zip(texts, answers):
        got, want = text.split(), answer.split()
        scores.append(sum(g == w for g, w in zip(got, want)) / max(len(got), len(want), 1))
    return scores


class RecordedReward:
    """reward_fn(texts, answers), wrapped to keep what every call scored (train_grpo calls it once a step): per
    step the texts, their rewards, their exact match and their lengths in tokens (the end-of-turn token aside)."""

    def __init__(self, reward_fn, tokenizer):
        self.reward_fn, self.tokenizer, self.steps = reward_fn, tokenizer, []

    def __call__(self, texts, answers):
        rewards = list(self.reward_fn(texts, answers))
        tokens = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        self.steps.append({"texts": list(texts), "answers": list(answers), "reward": rewards,
                           "exact": exact_reward(texts, answers), "tokens": tokens})
        return rewards

    def per_step(self, key, where=None) -> list[float]:
        """Per step, the mean of `key` over its completions: all of them (where=None), or those exactly "right" or
        "wrong"; NaN for a step with none."""
        if where not in (None, "right", "wrong"):
            raise CourseError(f"where={where!r}: use None, 'right' or 'wrong'.")
        means = []
        for step in self.steps:
            kept = [v for v, e in zip(step[key], step["exact"]) if where is None or (e == 1.0) == (where == "right")]
            means.append(sum(kept) / len(kept) if kept else float("nan"))
        return means
