"""Reinforcement learning from verifiable rewards: the advantages of RLOO and GRPO, the k3 estimator of the KL to a
reference, and PPO's clipped policy loss aggregated as GRPO, BNPO, DAPO or Dr. GRPO.

Built in notebooks/12_rl_verifiable_rewards.ipynb, where the advantages, the loss and the policy's gradients are
proved equal to TRL's GRPOTrainer on a batch it sampled itself.
"""

# Exported from notebooks/12_rl_verifiable_rewards.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/12_rl_verifiable_rewards.ipynb · 1.1 · The policy gradient and its baselines
import torch

from course_utils.errors import CourseError

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
