"""Reinforcement learning from verifiable rewards: the advantages of RLOO and GRPO, the k3 estimator of the KL to a
reference, and PPO's clipped policy loss aggregated as GRPO, BNPO, DAPO or Dr. GRPO.

Built in notebooks/12_rl_verifiable_rewards.ipynb, where the advantages, the loss and the policy's gradients are
proved equal to TRL's GRPOTrainer on a batch it sampled itself; then a from-scratch GRPO loop (sample_groups,
train_grpo) and pass@k.
"""

# Exported from notebooks/12_rl_verifiable_rewards.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/12_rl_verifiable_rewards.ipynb · 1.1 · The policy gradient and its baselines
import math
import random
import time

import torch
from tqdm.auto import tqdm

from course_utils.errors import CourseError
from course_utils.evaluation import as_conversation, padding, split_example, stop_token_ids

SCALES = ("group", "batch", "none")


def group_advantages(rewards, group_size, *, scale="group"):
    """GRPO's advantage: each reward minus its group's mean, divided by the group's std + 1e-4 (scale="group",
    the std Bessel-corrected as in TRL), by the whole batch's std + 1e-4 ("batch"), or not divided ("none").
    `rewards` holds consecutive groups of `group_size` completions of one prompt."""
    grouped = check_groups(rewards, group_size, scale=scale)  # [prompts, group_size]; next cell
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        return centred / (grouped.std(dim=1).repeat_interleave(group_size) + 1e-4)
    if scale == "batch":
        return centred / (grouped.std() + 1e-4)
    return centred


def rloo_advantages(rewards, group_size):
    """RLOO's advantage: each reward minus the mean of the other group_size - 1 rewards of its prompt."""
    grouped = check_groups(rewards, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).flatten()


# %% notebooks/12_rl_verifiable_rewards.ipynb · 1.1 · The policy gradient and its baselines
def check_groups(rewards, group_size, *, scale="group") -> torch.Tensor:
    """The rewards as a float tensor [prompts, group_size]; a CourseError for a bad group size or scale."""
    if scale not in SCALES:
        raise CourseError(f"scale={scale!r}: use one of {SCALES} (TRL's scale_rewards).")
    rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if int(group_size) != group_size or group_size < 2:
        raise CourseError(f"group_size={group_size!r}: a group needs at least 2 completions of the same prompt, "
                          "or no completion has a sibling to be compared with (the baseline is undefined).")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise CourseError(f"{rewards.numel()} rewards do not split into groups of {group_size}: pass all "
                          f"{group_size} completions of every prompt, one group after the other.")
    return rewards.view(-1, int(group_size))


# %% notebooks/12_rl_verifiable_rewards.ipynb · 1.2 · PPO's clipped ratio, the KL term and the aggregations
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def kl_k3(logps, ref_logps):
    """Per-token k3 estimate of KL(policy || reference) from the policy's samples: exp(d) - d - 1, d = ref - logp."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(logps, old_logps, advantages, completion_mask, *, ref_logps=None, beta=0.0, epsilon=0.2,
                epsilon_high=None, loss_type="grpo", max_completion_length=None, bias_correction_kl=False):
    """PPO's clipped surrogate per completion token plus beta * k3 KL, aggregated by `loss_type` (LOSS_TYPES);
    bias_correction_kl multiplies the KL by the ratio (TRL 1.16's default, from DeepSeek-V3.2).
    logps, old_logps, ref_logps, completion_mask: [B, T]; advantages: [B]. Returns (loss, metrics)."""
    epsilon_high = check_policy_inputs(logps, completion_mask, ref_logps, beta, epsilon, epsilon_high, loss_type,
                                       max_completion_length)  # next cell
    mask = completion_mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)  # exactly 1 at the first update, where old_logps = logps.detach()
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = kl_k3(logps, ref_logps) if ref_logps is not None else None
    if beta != 0.0:
        per_token = per_token + beta * (kl * ratio if bias_correction_kl else kl)
    if loss_type == "grpo":  # the mean over sequences of each sequence's token mean
        loss = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    elif loss_type in ("bnpo", "dapo"):  # every completion token of the batch counts once
        loss = (per_token * mask).sum() / mask.sum()
    else:  # dr_grpo: a constant normaliser, B x max_completion_length
        loss = (per_token * mask).sum() / (mask.shape[0] * max_completion_length)
    with torch.no_grad():
        tokens = mask.sum()
        is_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
        metrics = {"clip_fraction": (is_clipped * mask).sum() / tokens, "ratio": (ratio * mask).sum() / tokens,
                   "kl": (kl * mask).sum() / tokens if kl is not None else torch.tensor(float("nan"))}
    return loss, metrics


# %% notebooks/12_rl_verifiable_rewards.ipynb · 1.2 · PPO's clipped ratio, the KL term and the aggregations
def check_policy_inputs(logps, completion_mask, ref_logps, beta, epsilon, epsilon_high, loss_type,
                        max_completion_length) -> float:
    """epsilon_high (epsilon when None); a CourseError for an input policy_loss would silently get wrong."""
    if loss_type not in LOSS_TYPES:
        raise CourseError(f"loss_type={loss_type!r}: use one of {LOSS_TYPES}.")
    if not epsilon > 0:
        raise CourseError(f"epsilon={epsilon!r}: the clip range must be > 0 (0.2 is PPO's and GRPO's choice).")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if not epsilon_high > 0:
        raise CourseError(f"epsilon_high={epsilon_high!r} must be > 0 (DAPO's clip-higher uses 0.28).")
    if beta < 0 or (beta > 0 and ref_logps is None):
        raise CourseError(f"beta={beta!r} needs beta >= 0, and ref_logps (the reference model's per-token "
                          "log-probs of the same completions) when beta > 0.")
    if completion_mask.shape != logps.shape:
        raise CourseError(f"completion_mask has shape {tuple(completion_mask.shape)}, logps {tuple(logps.shape)}.")
    empty = torch.nonzero(completion_mask.sum(-1) == 0).flatten().tolist()
    if empty:
        raise CourseError(f"Completions {empty} have no token in completion_mask: their mean is 0/0. Keep at "
                          "least the end-of-sequence token of every sampled completion.")
    if loss_type == "dr_grpo" and not (max_completion_length and max_completion_length >= logps.shape[1]):
        raise CourseError(f"loss_type='dr_grpo' needs max_completion_length >= the completions' width "
                          f"({logps.shape[1]}): the sampling cap, the same for every batch.")
    return epsilon_high


# %% notebooks/12_rl_verifiable_rewards.ipynb · 1.3 · Log-probabilities of sampled completions
def completion_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, temperature=1.0):
    """Per-token log-probs [B, C] of the completion tokens under `model`, from logits divided by the sampling
    temperature (as TRL does); logit t predicts token t + 1."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, prompt_ids.shape[1] - 1:-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # at least float32
    return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


# %% notebooks/12_rl_verifiable_rewards.ipynb · 3.1 · The loop
@torch.no_grad()
def sample_groups(model, tokenizer, prompts, *, group_size, max_new_tokens, temperature=1.0, seed=None) -> dict:
    """Sample `group_size` completions of every prompt (a user string or a message list), prompts repeated group
    by group as GRPO needs them. Returns prompt_ids and prompt_mask (left-padded), completion_ids and
    completion_mask (1 up to and including the first end-of-turn token) and the completions' texts."""
    if int(group_size) != group_size or group_size < 1 or max_new_tokens < 1:
        raise CourseError(f"group_size={group_size!r}, max_new_tokens={max_new_tokens!r}: both must be positive "
                          "integers (pass@k may sample 1 completion a prompt; GRPO needs groups of 2 or more).")
    texts = [tokenizer.apply_chat_template(as_conversation(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    device = next(model.parameters()).device
    with padding(tokenizer, "left"):  # every prompt ends at the same column, where the completions start
        prompt = tokenizer([t for t in texts for _ in range(int(group_size))], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(device)
        pad_id = tokenizer.pad_token_id
    if seed is not None:
        torch.manual_seed(seed)
    stops = stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    out = model.generate(**prompt, do_sample=True, temperature=temperature, top_k=None, top_p=None,
                         max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id, use_cache=True)
    model.train(was_training)
    completion_ids = out[:, prompt["input_ids"].shape[1]:]
    is_stop = torch.isin(completion_ids, torch.tensor(stops, device=device)).long()
    completion_mask = ((is_stop.cumsum(1) - is_stop) == 0).long()  # no stop token before this one
    texts = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
             for ids, mask in zip(completion_ids, completion_mask)]
    return {"prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
            "completion_ids": completion_ids, "completion_mask": completion_mask, "texts": texts}


# %% notebooks/12_rl_verifiable_rewards.ipynb · 3.1 · The loop
def exact_reward(texts, answers) -> list[float]:
    """The verifiable reward: 1.0 when the completion is the answer exactly (spaces at the ends aside), else 0.0."""
    return [float(text.strip() == answer.strip()) for text, answer in zip(texts, answers)]


def train_grpo(model, tokenizer, examples, reward_fn=exact_reward, *, steps, prompts_per_step=16, group_size=8,
               max_new_tokens=16, lr=3e-4, loss_type="grpo", scale="group", temperature=1.0, seed=0,
               ref_model=None, beta=0.0, max_grad_norm=1.0, callback=None, progress=True) -> dict:
    """GRPO from scratch, on-policy: each step samples `group_size` completions of `prompts_per_step` prompts of
    `examples` ({"messages": [user, assistant]} rows), scores them with reward_fn(texts, answers), turns the
    rewards into group advantages and takes one AdamW step on policy_loss (one update per batch: ratio 1).
    `callback(step, history)` runs after every step. Returns the history: per step the mean reward, the share of
    silent groups (all rewards equal: no signal) and of solved ones (every reward 1: all right, for a 0/1 reward),
    the mean completion length, the loss, the gradient norm before clipping and the seconds spent sampling and in
    the whole step."""
    if beta > 0 and ref_model is None:
        raise CourseError(f"beta={beta!r} needs ref_model, the frozen model the KL is measured against.")
    prompts, answers = zip(*map(split_example, examples))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: no reward, no change
    rng, history = random.Random(seed), {key: [] for key in ("reward", "silent", "solved", "length", "loss",
                                                              "grad_norm", "sampling_s", "total_s")}
    for step in tqdm(range(steps), desc="GRPO", disable=not progress, mininterval=1.0):
        start = time.perf_counter()
        picked = rng.sample(range(len(prompts)), prompts_per_step)
        batch = sample_groups(model, tokenizer, [prompts[i] for i in picked], group_size=group_size,
                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 100_003 + step)
        sampled = time.perf_counter()
        rewards = torch.tensor(reward_fn(batch["texts"], [answers[i] for i in picked for _ in range(group_size)]))
        advantages = group_advantages(rewards, group_size, scale=scale).to(batch["completion_ids"].device)
        ids = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
        ref_logps = None
        if beta > 0:
            with torch.no_grad():
                ref_logps = completion_token_logps(ref_model, *ids)
        model.train()
        logps = completion_token_logps(model, *ids)
        loss, _ = policy_loss(logps, logps.detach(), advantages, batch["completion_mask"], ref_logps=ref_logps,
                              beta=beta, loss_type=loss_type, max_completion_length=max_new_tokens)
        loss.backward()
        history["grad_norm"].append(torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item())  # before clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history["reward"].append(rewards.mean().item())
        history["loss"].append(loss.item())
        history["silent"].append((rewards.view(-1, group_size).std(dim=1) == 0).float().mean().item())
        history["solved"].append((rewards.view(-1, group_size) == 1).all(dim=1).float().mean().item())
        history["length"].append(batch["completion_mask"].sum(1).float().mean().item())
        history["sampling_s"].append(sampled - start)
        history["total_s"].append(time.perf_counter() - start)
        if callback is not None:
            callback(step + 1, history)
    model.eval()
    return history


# %% notebooks/12_rl_verifiable_rewards.ipynb · 3.1 · The loop
def pass_at_k(n, c, k) -> float:
    """The chance that at least one of k completions drawn without replacement from n sampled ones, c of them
    correct, is correct: Chen et al. 2021's unbiased estimate of pass@k, 1 - C(n - c, k) / C(n, k)."""
    if not (0 < k <= n and 0 <= c <= n):
        raise CourseError(f"pass_at_k(n={n}, c={c}, k={k}) needs 0 < k <= n and 0 <= c <= n: k draws from the n "
                          "completions sampled, c of them correct.")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
