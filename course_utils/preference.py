"""Preference tuning from scratch: sequence log-probs, the DPO family of losses, KTO, batches in TRL's layout.

Built step by step in notebooks/08_preference_tuning.ipynb, where every loss, reward and gradient is proved
equal to TRL 1.16's DPOTrainer ("sigmoid", "hinge", "ipo") and KTOTrainer on fixed batches.

    batch = preference_batch(tokenizer, rows)            # [2B, T]: B prompt+chosen rows, then B prompt+rejected
    logps = completion_logps(policy, **batch)             # sum of the completion tokens' log-probs, [2B]
    losses, r_chosen, r_rejected = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=0.1)
"""

# Exported from notebooks/08_preference_tuning.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/08_preference_tuning.ipynb · 1.2 · Sequence log-probabilities from logits
import math

import torch
import torch.nn.functional as F

from course_utils import training
from course_utils.errors import CourseError

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def check_beta(beta) -> float:
    """beta > 0, as a float: the strength of the KL leash to the reference model."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise CourseError(f"beta={beta!r}: beta must be a number > 0 (the DPO paper uses 0.1). At beta = 0 the "
                          "reference model no longer matters and the loss cannot be computed.")
    return float(beta)


def _same_shape(**tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        shown = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise CourseError(f"Shapes differ: {shown}. Pass one value per example for each (chosen row i of the "
                          "policy goes with chosen row i of the reference).")


# %% notebooks/08_preference_tuning.ipynb · 1.2 · Sequence log-probabilities from logits
def token_logps(logits, input_ids, completion_mask) -> torch.Tensor:
    """Per-token log-probs of the completion tokens, 0 elsewhere: [N, T - 1] (logit t predicts token t + 1)."""
    per_token = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return per_token * completion_mask[:, 1:].to(per_token.dtype)


def sequence_logps(logits, input_ids, completion_mask, average: bool = False) -> torch.Tensor:
    """Per-row log-probability of the completion tokens from logits [N, T, V]: logit t predicts token t + 1.

    The sum over completion tokens (the DPO paper, TRL), or the mean when average=True.
    """
    per_token = token_logps(logits, input_ids, completion_mask)
    counts = completion_mask[:, 1:].sum(-1).to(per_token.dtype)
    if (counts == 0).any():
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise CourseError(
            f"Rows {rows} have no completion tokens in completion_mask: their log-probs would be 0 for policy and "
            "reference alike, and the DPO loss would sit at log 2 = 0.693 whatever the model does. Mark the "
            "answer's tokens with 1 (preference_batch does), and check that truncation did not cut the answer off.")
    total = per_token.sum(-1)
    return total / counts if average else total


def completion_logps(model, input_ids, attention_mask, completion_mask, average: bool = False) -> torch.Tensor:
    """Per-row log-probability of the completion tokens under `model` (the sum; the mean with average=True)."""
    _same_shape(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return sequence_logps(logits, input_ids, completion_mask, average)


# %% notebooks/08_preference_tuning.ipynb · 1.3 · DPO and its relatives
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses and the implicit rewards beta * (policy - reference) of the chosen and rejected answers.

    loss_type: "sigmoid" (DPO; label_smoothing eps > 0 gives conservative DPO, -(1-eps) log s(bh) - eps log s(-bh)),
    "robust" (robust DPO, unbiased under eps label noise, as TRL's), "hinge" (SLiC: relu(1 - beta h)) or "ipo"
    ((h - 1/(2 beta))^2; pass length-averaged log-probs, as TRL does). h is the log-ratio difference.
    """
    beta = check_beta(beta)
    if loss_type not in LOSS_TYPES:
        raise CourseError(f"Unknown loss_type {loss_type!r}: the known ones are {', '.join(LOSS_TYPES)}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise CourseError(f"label_smoothing={label_smoothing!r} must lie in [0, 0.5): it is the share of pairs "
                          "whose label you believe flipped, and at 0.5 the labels carry no information.")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise CourseError(f"label_smoothing applies to 'sigmoid' and 'robust' only, not {loss_type!r}.")
    _same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# %% notebooks/08_preference_tuning.ipynb · 1.4 · KTO: good and bad examples, no pairs
def kto_loss(policy_logps, ref_logps, desirable, kl, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Per-example KTO losses and rewards beta * (policy - reference), for unpaired examples.

    desirable: a boolean tensor; kl: the reference point z0 (a number or a 0-d tensor, no gradient).
    Desirable: w_d * (1 - sigmoid(beta (r - z0))); undesirable: w_u * (1 - sigmoid(beta (z0 - r))).
    """
    beta = check_beta(beta)
    _same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        raise CourseError("desirable must be a boolean tensor (True for a desirable example), "
                          f"got {getattr(desirable, 'dtype', type(desirable).__name__)}.")
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not weight > 0:
            raise CourseError(f"{name}={weight!r} must be > 0 (the KTO paper balances them so that "
                              "w_d * n_desirable / (w_u * n_undesirable) lies in [1, 4/3]).")
    ratio = policy_logps - ref_logps
    z0 = torch.as_tensor(kl, dtype=ratio.dtype, device=ratio.device).detach()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))
    return losses, beta * ratio.detach()


# %% notebooks/08_preference_tuning.ipynb · 1.5 · Batches in TRL's layout
def _ids(tokenizer, text_or_messages, **kwargs) -> list[int]:
    if isinstance(text_or_messages, str):
        return list(tokenizer(text_or_messages)["input_ids"])
    return list(tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def split_completion(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL tokenizes them: the chat template for messages, and the completion
    starts where prompt and prompt + completion diverge. A plain-text completion gets the EOS token."""
    if isinstance(prompt, str) != isinstance(completion, str):
        raise CourseError("prompt and completion must both be strings or both be lists of messages.")
    if isinstance(prompt, str):
        if not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        prompt_ids, full = _ids(tokenizer, prompt), _ids(tokenizer, prompt + completion)
    else:
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full = _ids(tokenizer, prompt + completion)
    shared = 0
    while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
        shared += 1
    if shared == len(full):
        raise CourseError(f"The completion {completion!r:.60} adds no tokens after the prompt: an empty answer "
                          "gives DPO nothing to compare.")
    return prompt_ids[:shared], full[shared:]


def _pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def rows_to_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, prefix: str = "") -> dict:
    """Right-padded input_ids, attention_mask and completion_mask (keys prefixed by `prefix`) of prompt + completion."""
    ids = [p + c for p, c in zip(prompts, completions)]
    return {f"{prefix}input_ids": _pad_rows(ids, pad_id),
            f"{prefix}attention_mask": _pad_rows([[1] * len(i) for i in ids], 0),
            f"{prefix}completion_mask": _pad_rows([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0)}


# %% notebooks/08_preference_tuning.ipynb · 1.5 · Batches in TRL's layout
def preference_batch(tokenizer, rows) -> dict:
    """{"prompt", "chosen", "rejected"} rows -> input_ids, attention_mask, completion_mask of shape [2B, T]:
    the B prompt + chosen rows first, then the B prompt + rejected rows, right-padded (TRL's layout)."""
    rows = list(rows)
    if not rows:
        raise CourseError("preference_batch got no rows: pass {'prompt', 'chosen', 'rejected'} rows.")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rows[0]]
    if missing:
        raise CourseError(f"A preference row needs 'prompt', 'chosen' and 'rejected'; this one lacks {missing}.")
    prompts, chosen, rejected = [], [], []
    for row in rows:
        p_c, c = split_completion(tokenizer, row["prompt"], row["chosen"])
        p_r, r = split_completion(tokenizer, row["prompt"], row["rejected"])
        shared = min(len(p_c), len(p_r))  # TRL: the shorter common prefix is the prompt
        prompts.append(p_c[:shared])
        chosen.append(p_c[shared:] + c)
        rejected.append(p_r[shared:] + r)
    return rows_to_batch(prompts + prompts, chosen + rejected, training.pad_token_id(tokenizer))


def unpaired_batch(tokenizer, rows, kl_block: int | None = None) -> dict:
    """{"prompt", "completion", "label"} rows -> TRL KTOTrainer's batch: input_ids, attention_mask,
    completion_mask, label (bool), and the KL_ rows: each prompt with the completion of the row before it
    (rotated by one within blocks of kl_block rows, TRL's per_device_train_batch_size; default: all rows)."""
    rows = list(rows)
    kl_block = kl_block or len(rows)
    if len(rows) < 2 or kl_block < 2:
        raise CourseError("KTO's reference point needs mismatched pairs: pass at least 2 rows (and kl_block >= 2); "
                          "with one row the 'mismatched' completion is its own and the KL term equals the reward.")
    split = [split_completion(tokenizer, r["prompt"], r["completion"]) for r in rows]
    prompts, completions = [p for p, _ in split], [c for _, c in split]
    rotated = []
    for start in range(0, len(rows), kl_block):
        block = completions[start:start + kl_block]
        rotated += block[-1:] + block[:-1]
    batch = rows_to_batch(prompts, completions, training.pad_token_id(tokenizer))
    batch.update(rows_to_batch(prompts, rotated, training.pad_token_id(tokenizer), prefix="KL_"))
    batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
    return batch


@torch.no_grad()
def kto_reference_point(policy, reference, batch) -> torch.Tensor:
    """KTO's z0: mean over the mismatched (KL_) rows of policy - reference log-probs, clamped at 0, no gradient."""
    keys = ("KL_input_ids", "KL_attention_mask", "KL_completion_mask")
    if any(k not in batch for k in keys):
        raise CourseError("The batch has no KL_ rows: build it with unpaired_batch(tokenizer, rows).")
    args = [batch[k] for k in keys]
    return (completion_logps(policy, *args) - completion_logps(reference, *args)).mean().clamp(min=0)


# %% notebooks/08_preference_tuning.ipynb · 1.6 · The training loop
_KEYS = ("input_ids", "attention_mask", "completion_mask")
ADAMW_DECAY = 0.01  # torch.optim.AdamW's default weight decay, which these loops have always trained with


def pair_order(n: int, batch_size: int | None, steps: int, seed: int) -> list[torch.Tensor]:
    """The pair indices of every step: all n, or batch_size a step from seeded permutations (epoch by epoch)."""
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)] * steps
    generator, order = torch.Generator().manual_seed(seed), []
    while len(order) < steps:
        perm = torch.randperm(n, generator=generator)
        order += [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return order[:steps]


# %% notebooks/08_preference_tuning.ipynb · 1.6 · The training loop
def train_dpo(policy, reference, batch, *, steps: int, lr: float, beta: float = 0.1, loss_type: str = "sigmoid",
              label_smoothing: float = 0.0, sft_weight: float = 0.0, average: bool = False,
              batch_size: int | None = None, seed: int = 0, max_grad_norm: float | None = 1.0,
              progress: bool = True, description: str = "DPO", callback=None) -> list[dict]:
    """DPO with a frozen reference: AdamW for `steps` steps on the pairs of one preference_batch, all of them
    each step, or `batch_size` pairs a step in an order drawn from `seed` (every pair once per epoch).

    average=True (and always for "ipo") feeds length-averaged log-probs to the loss; sft_weight > 0 adds RPO's
    NLL of the chosen answers (TRL's "sft" term: mean over the chosen tokens). Returns one dict per step with
    the metrics TRL logs (before that step's update): loss, rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected (sums over completion tokens), and h, the mean log-ratio
    difference the loss saw (length-averaged where the loss was). callback(step, policy), if given, runs after
    every update (step counts from 1), e.g. to evaluate along the way. The loop is training.train's: this
    function gives it the DPO loss of a step's pairs as its `loss_fn`.
    """
    with torch.no_grad():
        all_ref = completion_logps(reference, **batch)
    all_counts = batch["completion_mask"][:, 1:].sum(-1)
    normalise = average or loss_type == "ipo"
    pairs = batch["input_ids"].shape[0] // 2
    steps_rows = (torch.cat([rows, rows + pairs]) for rows in pair_order(pairs, batch_size, steps, seed))
    parts = ({**{k: batch[k][rows] for k in _KEYS}, "ref": all_ref[rows], "counts": all_counts[rows]}
             for rows in steps_rows)
    history = []

    def dpo_step(policy, part):
        ref_chosen, ref_rejected = part["ref"].chunk(2)
        counts_chosen, counts_rejected = part["counts"].chunk(2)
        chosen, rejected = completion_logps(policy, *(part[k] for k in _KEYS)).chunk(2)
        if normalise:
            losses, _, _ = dpo_loss(chosen / counts_chosen, rejected / counts_rejected, ref_chosen / counts_chosen,
                                    ref_rejected / counts_rejected, beta=beta, loss_type=loss_type,
                                    label_smoothing=label_smoothing)
        else:
            losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                                    label_smoothing=label_smoothing)
        loss = losses.mean()
        fed_h = ((chosen / counts_chosen - ref_chosen / counts_chosen) - (rejected / counts_rejected - ref_rejected
                 / counts_rejected)) if normalise else (chosen - ref_chosen) - (rejected - ref_rejected)
        if sft_weight:
            loss = loss + sft_weight * -(chosen.sum() / counts_chosen.sum())
        r_chosen, r_rejected = beta * (chosen.detach() - ref_chosen), beta * (rejected.detach() - ref_rejected)
        history.append({"loss": loss.item(), "rewards/chosen": r_chosen.mean().item(),
                        "rewards/rejected": r_rejected.mean().item(),
                        "rewards/margins": (r_chosen - r_rejected).mean().item(),
                        "rewards/accuracies": (r_chosen > r_rejected).float().mean().item(),
                        "logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item(),
                        "h": fed_h.detach().mean().item()})
        return loss

    after_step = None if callback is None else lambda step, _loss: callback(step, policy) and False  # never stops
    training.train(policy, parts, steps=steps, lr=lr, weight_decay=ADAMW_DECAY, max_grad_norm=max_grad_norm,
                   progress=progress, description=description, callback=after_step, loss_fn=dpo_step)
    return history


# %% notebooks/08_preference_tuning.ipynb · 1.6 · The training loop
def train_kto(policy, reference, batch, *, steps: int, lr: float, beta: float = 0.1, desirable_weight: float = 1.0,
              undesirable_weight: float = 1.0, block: int | None = None, max_grad_norm: float | None = 1.0,
              progress: bool = True, description: str = "KTO") -> list[dict]:
    """KTO on one unpaired_batch: all rows each step, or consecutive blocks of `block` rows in turn (build the
    batch with kl_block=block, so each block holds its own mismatched rows: TRL's sequential sampling).
    The reference point is re-estimated on every step's KL rows. Returns one dict per step: loss, kl,
    rewards/chosen, rewards/rejected (means over desirable and undesirable rows), logps/chosen, logps/rejected.
    The loop is training.train's, with the KTO loss of a step's block as its `loss_fn`."""
    n = batch["input_ids"].shape[0]
    block = block or n
    blocks = [torch.arange(i, min(i + block, n)) for i in range(0, n, block)]
    with torch.no_grad():
        all_ref = completion_logps(reference, *(batch[k] for k in _KEYS))
    parts = ({**{k: v[rows] for k, v in batch.items()}, "ref": all_ref[rows]}
             for rows in (blocks[step % len(blocks)] for step in range(steps)))
    history = []

    def kto_step(policy, part):
        desirable = part["label"]
        z0 = kto_reference_point(policy, reference, part)
        logps = completion_logps(policy, *(part[k] for k in _KEYS))
        losses, rewards = kto_loss(logps, part["ref"], desirable, z0, beta=beta, desirable_weight=desirable_weight,
                                   undesirable_weight=undesirable_weight)
        loss = losses.mean()
        history.append({"loss": loss.item(), "kl": z0.item(), "rewards/chosen": rewards[desirable].mean().item(),
                        "rewards/rejected": rewards[~desirable].mean().item(),
                        "logps/chosen": logps[desirable].mean().item(),
                        "logps/rejected": logps[~desirable].mean().item()})
        return loss

    training.train(policy, parts, steps=steps, lr=lr, weight_decay=ADAMW_DECAY, max_grad_norm=max_grad_norm,
                   progress=progress, description=description, loss_fn=kto_step)
    return history
