"""Plausible wrong answers to notebook 12's exercises (tests/test_exercise_cells.py)."""
import torch


def silent_groups(rewards, group_size):
    # Only the all-wrong groups: an all-correct group is silent too (every reward equals the mean).
    grouped = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return (grouped == 0).all(dim=1)


def token_weights(lengths, loss_type, max_completion_length):
    # Every loss type as the token-level mean: misses GRPO's per-sequence mean and Dr. GRPO's constant.
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    return mask / sum(lengths)


def kl_term_gradient(logits, ref_logits, corrected):
    # The forward-KL gradient for both: misses that the ratio correction turns it into the reverse KL's.
    return logits.softmax(-1) - ref_logits.softmax(-1)


# ---- The oracle: the checks' expected values, measured by autograd through course_utils.rl. The notebook loads
# them from data/exercises/12_rl_verifiable_rewards.pt (tests/test_rl.py recomputes them and rewrites the file when
# run as a script), so that no visible cell computes an answer a learner could call.


def measured_silent(rewards, group_size):
    """Per group: True when GRPO gives every completion of it an advantage of 0."""
    from course_utils.rl import group_advantages
    return group_advantages(rewards, group_size).view(-1, group_size).abs().amax(dim=1) < 1e-6


def measured_weights(lengths, loss_type, max_completion_length):
    """d loss / d logp for each token at ratio 1 and advantage -1 (one row per completion, 0 past its end)."""
    from course_utils.rl import policy_loss
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    logps = torch.zeros(len(lengths), width, requires_grad=True)
    loss, _ = policy_loss(logps, logps.detach(), -torch.ones(len(lengths)), mask, loss_type=loss_type,
                          max_completion_length=max_completion_length)
    loss.backward()
    return logps.grad


def measured_kl_gradient(logits, ref_logits, corrected):
    """The expected gradient w.r.t. the logits of policy_loss's KL term (beta 1, advantage 0) over one token drawn
    from softmax(logits): every token's autograd gradient weighted by its probability."""
    from course_utils.rl import policy_loss
    logits = logits.detach().clone().requires_grad_()
    logps, ref_logps = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    expected = torch.zeros_like(logits)
    for token in range(logits.numel()):
        logp = logps[token].view(1, 1)
        loss, _ = policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 1), beta=1.0,
                              ref_logps=ref_logps[token].view(1, 1), bias_correction_kl=corrected)
        expected += logps[token].exp().detach() * torch.autograd.grad(loss, logits, retain_graph=True)[0]
    return expected


def exercise_cases_12() -> dict:
    """{'silent', 'weights', 'kl'}: lists of (arguments, expected value) for the three checks."""
    silent = []
    for rewards, g in (([0, 0, 0, 0, 1, 0, 0, 1], 4), ([1, 1, 1, 1, 0, 0, 0, 0], 4), ([0.5, 0.5, 1, 0, 0, 0], 2),
                       ([0.2, 0.2, 0.2, 0.7, 0.7, 0.7], 3)):
        rewards = torch.tensor(rewards, dtype=torch.float32)
        silent.append(((rewards, g), measured_silent(rewards, g)))
    weights = [((lengths, loss_type, cap), measured_weights(lengths, loss_type, cap))
               for lengths, cap in (([3, 1, 5], 6), ([2, 2], 2), ([4, 1, 1, 2], 8))
               for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo")]
    generator, kl = torch.Generator().manual_seed(12), []
    for vocab, spread in ((3, 1.0), (5, 2.0), (6, 4.0)):
        logits, ref_logits = (spread * torch.randn(vocab, generator=generator, dtype=torch.float64) for _ in range(2))
        kl += [((logits, ref_logits, c), measured_kl_gradient(logits, ref_logits, c)) for c in (False, True)]
    same = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # the policy is the reference: nothing to pull toward
    kl += [((same, same.clone(), c), measured_kl_gradient(same, same, c)) for c in (False, True)]
    return {"silent": silent, "weights": weights, "kl": kl}
