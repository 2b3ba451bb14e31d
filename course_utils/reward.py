"""Reward models and RLHF: the Bradley-Terry loss (with TRL's margin and centering), a reward model (a language
model with a scalar head on the last token) and its loop, best-of-N selection and its KL, RAFT, the lab's gold rule
and preference pools, and PPO's generalised advantage estimation.

Built in notebooks/13_reward_models.ipynb, where the loss is proved equal to TRL's RewardTrainer, the scores to
AutoModelForSequenceClassification's and GAE to the discounted sum of TD errors; then reward models against the
gold rule, best-of-N, over-optimisation and DPO against online RL on the lab model.
"""

# Exported from notebooks/13_reward_models.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/13_reward_models.ipynb · 1.1 · From comparisons to a reward: Bradley-Terry
import copy
import itertools
import math
import random

import torch
import torch.nn.functional as F

from course_utils import training
from course_utils.errors import CourseError
from course_utils.preference import pair_order, preference_batch, rows_to_batch, split_completion
from course_utils.rl import completion_token_logps, sample_groups


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coefficient=0.0):
    """The reward model's loss: mean of -log sigmoid(r_chosen - r_rejected - margin) over the pairs, plus
    center_coefficient * mean((r_chosen + r_rejected)^2) (TRL's center_rewards_coefficient)."""
    check_reward_pairs(chosen_rewards, rejected_rewards, margin, center_coefficient)  # next cell
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


# %% notebooks/13_reward_models.ipynb · 1.1 · From comparisons to a reward: Bradley-Terry
def check_reward_pairs(chosen_rewards, rejected_rewards, margin, center_coefficient) -> None:
    """A CourseError for inputs bradley_terry_loss would silently get wrong (broadcasting hides a shape mismatch)."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1 or not len(chosen_rewards):
        raise CourseError(f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
                          f"{tuple(rejected_rewards.shape)} must be two 1-D tensors of the same length, one reward "
                          "per pair (pair i: rows i and B + i of the batch).")
    if margin is not None and torch.as_tensor(margin).shape not in ((), chosen_rewards.shape):
        raise CourseError(f"margin has shape {tuple(torch.as_tensor(margin).shape)}: give one margin per pair "
                          f"({len(chosen_rewards)}) or a single number.")
    if center_coefficient < 0:
        raise CourseError(f"center_coefficient={center_coefficient!r} must be >= 0 (TRL suggests 0.01).")


# %% notebooks/13_reward_models.ipynb · 1.2 · A reward model: the language model with a scalar head
class RewardModel(torch.nn.Module):
    """A causal LM's body with a scalar head: the reward of a sequence is the head at its last real token
    (right padding: the last position the attention mask keeps). head_init_std: the head's initial weights' std."""

    def __init__(self, causal_lm, head_init_std: float = 0.02):
        super().__init__()
        self.body = copy.deepcopy(causal_lm.model)  # the transformer without its vocabulary head
        self.score = torch.nn.Linear(causal_lm.config.hidden_size, 1, bias=False)
        torch.nn.init.normal_(self.score.weight, std=head_init_std)

    def token_values(self, input_ids, attention_mask):
        """The head at every position [B, T]: PPO's value of each prefix (section 1.4)."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.score(hidden).squeeze(-1)

    def forward(self, input_ids, attention_mask, **_):
        values = self.token_values(input_ids, attention_mask)
        last = attention_mask.sum(dim=1) - 1  # right padding: the last kept token of each row
        return values[torch.arange(len(values)), last]


# %% notebooks/13_reward_models.ipynb · 1.2 · A reward model: the language model with a scalar head
def train_reward_model(model, batch, *, steps, lr, batch_size=16, seed=0, margin=None, center_coefficient=0.0,
                       progress=False) -> list[float]:
    """Bradley-Terry on one preference_batch (pair i: rows i and B + i), `batch_size` pairs a step in an order drawn
    from `seed`, AdamW through training.train. `margin`: one per pair, or None. Returns the loss per step."""
    pairs = batch["input_ids"].shape[0] // 2
    margins = None if margin is None else torch.as_tensor(margin, dtype=torch.float32).expand(pairs)
    parts = ({"input_ids": batch["input_ids"][torch.cat([rows, rows + pairs])],
              "attention_mask": batch["attention_mask"][torch.cat([rows, rows + pairs])],
              **({} if margins is None else {"margin": margins[rows]})}
             for rows in pair_order(pairs, batch_size, steps, seed))

    def step_loss(model, part):
        chosen, rejected = model(part["input_ids"], part["attention_mask"]).chunk(2)
        return bradley_terry_loss(chosen, rejected, margin=part.get("margin"), center_coefficient=center_coefficient)

    return training.train(model, parts, steps=steps, lr=lr, progress=progress, description="reward model",
                          loss_fn=step_loss).losses


@torch.no_grad()
def pair_rewards(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards of every pair of a preference_batch."""
    return model(batch["input_ids"], batch["attention_mask"]).chunk(2)


def score_texts(model, tokenizer, prompts, texts) -> torch.Tensor:
    """The reward of each answer text to its prompt (a message list), tokenized as the training pairs are. Each
    distinct (prompt, text) is tokenized and scored once, all in one forward: sampled answers repeat."""
    slot, firsts = {}, []  # the row of each distinct (prompt, text), and where it first occurs
    for i, key in enumerate(zip(map(repr, prompts), texts)):
        if key not in slot:
            slot[key] = len(firsts)
            firsts.append(i)
    pieces = [split_completion(tokenizer, prompts[i], [{"role": "assistant", "content": texts[i]}]) for i in firsts]
    batch = rows_to_batch([p for p, _ in pieces], [c for _, c in pieces], training.pad_token_id(tokenizer))
    with torch.no_grad():
        scores = model(batch["input_ids"], batch["attention_mask"])
    return scores[torch.tensor([slot[key] for key in zip(map(repr, prompts), texts)], dtype=torch.long)]


def memo_scorer(reward_model, tokenizer):
    """score_texts with a memory, for a frozen reward model: a (prompt, text) scored once is looked up after that
    (a policy that has found what the reward model likes samples it step after step). Train the model, and the
    memory is stale: make a new scorer."""
    if any(p.requires_grad for p in reward_model.parameters()):
        raise CourseError("memo_scorer remembers scores, so its reward model must be frozen: train it first, then "
                          "reward_model.requires_grad_(False) (trained_reward_model returns it frozen).")
    memory = {}

    def score(prompts, texts) -> torch.Tensor:
        keys = list(zip(map(repr, prompts), texts))
        new = [i for i, key in enumerate(keys) if key not in memory]
        if new:
            values = score_texts(reward_model, tokenizer, [prompts[i] for i in new], [texts[i] for i in new])
            memory.update(zip([keys[i] for i in new], values.tolist()))
        return torch.tensor([memory[key] for key in keys])

    return score


# %% notebooks/13_reward_models.ipynb · 1.3 · Best-of-N, and what it costs in KL
def best_of_n(scores, n):
    """For consecutive groups of n samples in `scores` (1-D), the index into `scores` of each group's best-scored
    sample (the first one on a tie)."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or int(n) != n or n < 1 or len(scores) % n:
        raise CourseError(f"best_of_n needs 1-D scores whose length ({tuple(scores.shape)}) is a multiple of "
                          f"n={n!r} (consecutive groups of n samples of one prompt).")
    return scores.view(-1, int(n)).argmax(dim=1) + torch.arange(0, len(scores), int(n))


def best_of_n_kl(n) -> float:
    """The formula usually quoted for KL(best-of-n || base) in nats: log n - (n - 1) / n (exercise 3: when it holds)."""
    if int(n) != n or n < 1:
        raise CourseError(f"n={n!r}: best-of-n needs a whole number of samples, at least 1.")
    return math.log(n) - (n - 1) / n


def expected_best_of_n(proxy, values, n) -> float:
    """The expected `values` of the best-of-n pick by `proxy` among one prompt's K samples, over every n-subset of
    them (unbiased; WebGPT): sorted by proxy, the i-th lowest is the pick with probability C(i-1, n-1) / C(K, n)."""
    K = len(proxy)
    if not 1 <= n <= K or len(values) != K:
        raise CourseError(f"expected_best_of_n needs 1 <= n={n!r} <= K={K} and one value per sample ({len(values)}).")
    order = torch.argsort(torch.as_tensor(proxy), stable=True)
    weights = torch.tensor([math.comb(i - 1, n - 1) for i in range(1, K + 1)], dtype=torch.float64) / math.comb(K, n)
    return float((weights * torch.as_tensor(values, dtype=torch.float64)[order]).sum())


# %% notebooks/13_reward_models.ipynb · 1.4 · PPO's missing pieces: a value head and GAE
def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over the masked tokens of each row (rewards, values, mask: [B, T]; mask 1 on
    completion tokens). Returns (advantages, returns), 0 off the mask; returns = advantages + values."""
    check_gae_inputs(rewards, values, mask, gamma, lam)  # next cell
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])  # after the last token: nothing more to come
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        kept = mask[:, t] > 0  # a masked-out position passes the next kept token's value and advantage through
        next_value = torch.where(kept, values[:, t], next_value)
        next_advantage = torch.where(kept, advantages[:, t], next_advantage)
    return advantages, (advantages + values) * mask


# %% notebooks/13_reward_models.ipynb · 1.4 · PPO's missing pieces: a value head and GAE
def check_gae_inputs(rewards, values, mask, gamma, lam) -> None:
    """A CourseError for inputs gae would silently get wrong."""
    if not (rewards.shape == values.shape == mask.shape) or values.dim() != 2:
        raise CourseError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                          f"{tuple(mask.shape)} must all be [B, T], one entry per completion token.")
    empty = torch.nonzero(mask.sum(dim=1) == 0).flatten().tolist()
    if empty:
        raise CourseError(f"Rows {empty} have no token in the mask: a completion needs at least one token to get "
                          "an advantage.")
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise CourseError(f"gamma={gamma!r} and lam={lam!r} must lie in [0, 1] (PPO for LLMs uses gamma 1, "
                          "lam 0.95).")


# %% notebooks/13_reward_models.ipynb · 3.1 · The gold rule and the preference pool
from course_utils.lab.tasks import STYLE_MARKER as CLOSING  # the lab corpus's polite closing (notebook 08)
from course_utils.preference_runs import first_sentence  # notebook 08's: the text up to its first period


def gold_reward(texts, facts) -> list[float]:
    """The lab's gold preference: 0.5 when the first sentence is the right fact, plus 0.5 when the closing follows
    it and nothing else does."""
    return [0.5 * (first_sentence(t) == f) + 0.5 * (t == f"{first_sentence(t)} {CLOSING}") for t, f in zip(texts, facts)]


def preference_pool(model, tokenizer, rows, *, samples, temperature, max_new_tokens, seed) -> list[dict]:
    """Pairs labelled by the gold rule: `samples` answers to each row's prompt (08's preference rows; the fact is the
    rejected answer), every two answers of one prompt with different texts and different gold, the better chosen;
    shuffled by seed."""
    facts = [r["rejected"][0]["content"] for r in rows]
    texts = sample_groups(model, tokenizer, [r["prompt"] for r in rows], group_size=samples,
                          max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)["texts"]
    gold = gold_reward(texts, [f for f in facts for _ in range(samples)])
    pairs, seen = [], set()
    for i, row in enumerate(rows):
        for a, b in itertools.combinations(range(i * samples, (i + 1) * samples), 2):
            key = (row["rejected"][0]["content"], *sorted((texts[a], texts[b])))
            if gold[a] == gold[b] or key in seen:
                continue
            seen.add(key)
            better, worse = (a, b) if gold[a] > gold[b] else (b, a)
            pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": texts[better]}],
                          "rejected": [{"role": "assistant", "content": texts[worse]}],
                          "gold_gap": gold[better] - gold[worse]})
    random.Random(seed).shuffle(pairs)
    return pairs


# %% notebooks/13_reward_models.ipynb · 3.2 · Reward models against DPO's implicit reward
@torch.no_grad()
def implicit_rewards(policy, reference, batch, *, beta=0.1, reference_logps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit reward of every pair of a preference_batch, beta * (log pi - log pi_ref) summed over the
    answer: (chosen, rejected). reference_logps: the reference's completion_logps of this batch, if already
    computed (they do not depend on the policy: one forward serves every policy scored on the same pairs)."""
    from course_utils.preference import completion_logps
    keys = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    if reference_logps is None:
        reference_logps = completion_logps(reference, *keys)
    elif reference_logps.shape != (len(batch["input_ids"]),):
        raise CourseError(f"reference_logps has shape {tuple(reference_logps.shape)}: give one summed log-prob per "
                          f"row of the batch ({len(batch['input_ids'])}), the reference's completion_logps of it.")
    return (beta * (completion_logps(policy, *keys) - reference_logps)).chunk(2)


def pairwise_accuracy(chosen, rejected) -> float:
    """The share of pairs whose chosen answer gets the higher reward (a tie counts half)."""
    return ((chosen > rejected).float().mean() + 0.5 * (chosen == rejected).float().mean()).item()


# %% notebooks/13_reward_models.ipynb · 3.3 · Best-of-N: gold and proxy against N, and RAFT
def raft_examples(model, tokenizer, rows, reward_model, *, n, max_new_tokens, seed) -> list[dict]:
    """One round of RAFT's data: n answers to each row's prompt (temperature 1), the best by reward_model kept as a
    chat example {"messages": prompt + [answer]} to fine-tune on."""
    prompts = [r["prompt"] for r in rows]
    texts = sample_groups(model, tokenizer, prompts, group_size=n, max_new_tokens=max_new_tokens, seed=seed)["texts"]
    scores = score_texts(reward_model, tokenizer, [p for p in prompts for _ in range(n)], texts)
    return [{"messages": prompts[i // n] + [{"role": "assistant", "content": texts[i]}]}
            for i in best_of_n(scores, n).tolist()]


# %% notebooks/13_reward_models.ipynb · 3.4 · Over-optimisation: RL against the proxy, watched by the gold rule
def learned_reward(reward_model, tokenizer, prompt_of):
    """A reward function for rl.train_grpo (texts, answers) -> rewards: the (frozen) reward model's score of each
    text for its prompt, through a memo_scorer; train_grpo passes each example's reference answer, and prompt_of
    maps it back to the prompt."""
    score = memo_scorer(reward_model, tokenizer)

    def reward_fn(texts, answers):
        return score([prompt_of[a] for a in answers], texts).tolist()
    return reward_fn


# %% notebooks/13_reward_models.ipynb · 3.6 · PPO with a value head, against GRPO on the same budget
def completion_values(value_model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """The value head [B, C] at the state before each completion token (aligned like rl.completion_token_logps)."""
    values = value_model.token_values(torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1))
    return values[:, prompt_ids.shape[1] - 1:-1]


def ppo_step(policy, value_model, reference, batch, scores, optimizer, *, beta, gamma, lam, epochs, epsilon,
             value_coef, max_grad_norm=1.0) -> dict:
    """One PPO update of a sampled batch (sample_groups' dict) with one reward-model score per answer: the KL
    penalty per token and the score at the last token, GAE advantages (whitened over the batch's tokens), then
    `epochs` passes of the clipped policy loss (rl.policy_loss, a mean over tokens) plus value_coef x the values'
    squared error against the GAE returns."""
    from course_utils.rl import policy_loss
    ids = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        old_logps, ref_logps = completion_token_logps(policy, *ids), completion_token_logps(reference, *ids)
        rewards = -beta * (old_logps - ref_logps) * mask  # the KL penalty of every token
        rewards[torch.arange(len(mask)), mask.sum(1).long() - 1] += scores  # the reward model's score at the end
        advantages, returns = gae(rewards, completion_values(value_model, *ids), mask, gamma=gamma, lam=lam)
        mean = advantages.sum() / mask.sum()
        std = (((advantages - mean) * mask) ** 2).sum().div(mask.sum()).sqrt()
        advantages = (advantages - mean) / (std + 1e-8) * mask
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(epochs):  # the first pass has ratio 1; later passes are where the clip can act
        loss, metrics = policy_loss(completion_token_logps(policy, *ids), old_logps, advantages, batch["completion_mask"],
                                    epsilon=epsilon, loss_type="dapo")
        value_loss = (((completion_values(value_model, *ids) - returns) ** 2) * mask).sum() / mask.sum()
        (loss + value_coef * value_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"value loss": value_loss.item(), "clip fraction": metrics["clip_fraction"].item(),
            "summed log-ratio": ((old_logps - ref_logps) * mask).sum(1).mean().item()}
