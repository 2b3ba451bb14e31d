"""course_utils.sft (exported from notebook 11): the SFT loss, its prompt weight, new tokens, bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F

from course_utils.errors import CourseError
from course_utils.sft import add_tokens, repetition_rate, sft_loss, sft_loss_fn


@pytest.fixture(scope="module")
def batch():
    """Random logits over 11 tokens for 2 rows of 6, the second row padded after 4 tokens."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator)
    ids = torch.randint(0, 11, (2, 6), generator=generator)
    assistant = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return logits, ids, assistant, attention


def ce(logits, ids, row, t):
    """Cross-entropy of token t of a row, predicted from position t - 1 (computed one token at a time)."""
    return F.cross_entropy(logits[row, t - 1][None], ids[row, t][None]).item()


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 1.0])
def test_loss_is_the_weighted_mean_of_shifted_cross_entropies(batch, weight):
    # Catches an unshifted target, padding counted, or a prompt weight applied to the answer.
    logits, ids, assistant, attention = batch
    terms = [(1.0 if assistant[r, t] else weight, ce(logits, ids, r, t))
             for r in range(2) for t in range(1, 6) if attention[r, t]]
    expected = sum(w * c for w, c in terms) / sum(w for w, _ in terms)
    got = sft_loss(logits, ids, assistant, attention, prompt_loss_weight=weight).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_weight_one_is_the_models_language_model_loss(model):
    # Catches a weight-1 loss that differs from pretraining's (e.g. padding or the first token counted).
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(2))
    attention = torch.ones_like(ids)
    attention[2, 6:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention, labels=ids.masked_fill(attention == 0, -100))
    assistant = torch.zeros_like(ids)
    assistant[:, -2] = 1
    assistant[2, 4] = 1
    got = sft_loss(out.logits, ids, assistant, attention, prompt_loss_weight=1.0)
    torch.testing.assert_close(got, out.loss, rtol=1e-5, atol=1e-6)


def test_no_attention_mask_means_every_token_counts(batch):
    logits, ids, assistant, _ = batch
    torch.testing.assert_close(sft_loss(logits, ids, assistant, None, prompt_loss_weight=0.3),
                               sft_loss(logits, ids, assistant, torch.ones_like(ids), prompt_loss_weight=0.3))


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_a_weight_outside_zero_one_is_refused(batch, weight):
    logits, ids, assistant, attention = batch
    with pytest.raises(CourseError, match=r"outside \[0, 1\]"):
        sft_loss(logits, ids, assistant, attention, prompt_loss_weight=weight)


def test_a_batch_without_assistant_tokens_is_refused(batch):
    # The silent nan (0/0) case: also when the only assistant tokens sit on padding or at position 0.
    logits, ids, _, attention = batch
    only_unscored = torch.zeros_like(ids)
    only_unscored[:, 0] = 1
    only_unscored[1, 5] = 1  # padding
    for mask in (torch.zeros_like(ids), only_unscored):
        with pytest.raises(CourseError, match="no assistant token"):
            sft_loss(logits, ids, mask, attention, prompt_loss_weight=0.5)


def test_mismatched_mask_shape_is_refused(batch):
    logits, ids, assistant, attention = batch
    with pytest.raises(CourseError, match="shape"):
        sft_loss(logits, ids, assistant[:, :5], attention)


def test_loss_fn_reads_the_assistant_mask_from_the_labels(model):
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        expected = model(**batch).loss  # the model's own loss on those labels is assistant-only SFT
        torch.testing.assert_close(sft_loss_fn(0.0)(model, batch), expected, rtol=1e-5, atol=1e-6)


def test_loss_fn_calls_a_model_without_use_cache():
    """A plain module whose forward has no use_cache (nor **kwargs) is called without it; a transformers model gets
    use_cache=False. Catches the loss hard-coding use_cache (TypeError on the plain module)."""
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 11)

        def forward(self, input_ids, attention_mask=None):
            return type("Output", (), {"logits": self.embed(input_ids)})()

    plain, ids = Plain(), torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    expected = sft_loss(plain(ids).logits, ids, labels != -100, batch["attention_mask"])
    torch.testing.assert_close(sft_loss_fn(0.0)(plain, batch), expected)


def test_repetition_rate():
    assert repetition_rate(["a b c", "a a a a"]) == pytest.approx((0 + 0.75) / 2)
    assert repetition_rate(["", "x"]) == 0.0
    with pytest.raises(CourseError):
        repetition_rate([])


# ---------------------------------------------------------------- new tokens


@pytest.fixture(scope="module")
def lab():
    from course_utils.models import load_model
    return load_model("lab", device="cpu")


@pytest.mark.parametrize("init", ["mean", "random"])
def test_add_tokens_keeps_old_rows_ties_output_and_makes_one_token(lab, init):
    model, tokenizer = copy.deepcopy(lab[0]), copy.deepcopy(lab[1])
    old = model.get_input_embeddings().weight.detach().clone()
    assert len(tokenizer("Quinn", add_special_tokens=False)["input_ids"]) > 1  # the test's premise
    ids = add_tokens(model, tokenizer, ["Quinn", "Yara"], init=init)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == old.shape[0] + 2 and ids == [old.shape[0], old.shape[0] + 1]
    assert torch.equal(weight[:old.shape[0]], old)
    assert model.get_output_embeddings().weight is weight
    assert tokenizer("Quinn", add_special_tokens=False)["input_ids"] == [ids[0]]
    mean = old.mean(dim=0)
    if init == "mean":
        torch.testing.assert_close(weight[ids[0]], mean)
    else:
        assert not torch.allclose(weight[ids[0]], mean) and not torch.equal(weight[ids[0]], weight[ids[1]])


def test_add_tokens_refuses_known_repeated_or_no_tokens_and_bad_init(lab):
    model, tokenizer = copy.deepcopy(lab[0]), copy.deepcopy(lab[1])
    for tokens in (["Mia"], ["Quinn", "Quinn"], []):
        with pytest.raises(CourseError):
            add_tokens(model, tokenizer, tokens)
    with pytest.raises(CourseError, match="init"):
        add_tokens(model, tokenizer, ["Quinn"], init="zeros")
    assert "Quinn" not in tokenizer.get_vocab()  # a refused call changes nothing


def test_add_tokens_untied_output_grows_with_zero_rows(lab):
    # Catches a change to the untied branch's stated choice, zero output rows (the new token's logit is 0 until it is
    # trained; Hewitt 2021 recommends the mean of the output rows, also a sound choice, not the one add_tokens makes),
    # an old output row moved, or the layers tied by the resize.
    model, tokenizer = copy.deepcopy(lab[0]), copy.deepcopy(lab[1])
    model.config.tie_word_embeddings = False
    model.get_output_embeddings().weight = torch.nn.Parameter(model.get_output_embeddings().weight.detach() + 0.01)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = add_tokens(model, tokenizer, ["Quinn", "Yara"])
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert outputs is not inputs and outputs.shape == inputs.shape == (old_in.shape[0] + 2, old_in.shape[1])
    assert torch.equal(inputs[:old_in.shape[0]], old_in) and torch.equal(outputs[:old_out.shape[0]], old_out)
    torch.testing.assert_close(inputs[ids], old_in.mean(dim=0).expand(2, -1))
    assert torch.count_nonzero(outputs[ids]) == 0
    with torch.no_grad():  # the new tokens' logits are 0 (a bias-free output layer), whatever the input
        logits = model(input_ids=torch.tensor([[ids[0], 5, 7]])).logits
    assert torch.count_nonzero(logits[..., ids]) == 0
