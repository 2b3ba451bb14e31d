"""Plausible wrong answers to notebook 11's exercises (tests/test_exercise_cells.py)."""


def assistant_labels(input_ids, assistant_mask, attention_mask):
    # Masks only the padding, as in pretraining: the prompt trains too (the loss at prompt weight 1).
    return input_ids.masked_fill(~attention_mask.bool(), -100)


def loss_at_weight(loss_0, loss_1, n_answer, n_prompt, w):
    # Interpolates linearly between the two measured losses: the loss is a weighted mean, not linear in w.
    return (1 - w) * loss_0 + w * loss_1
