"""The training loop, chat batches, generation, exact match and perplexity, on cases with known answers."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course_utils.errors import CourseError
from course_utils.evaluation import exact_match, generate, perplexity
from course_utils.lab.model import load_lab_model
from course_utils.lab.tasks import chat
from course_utils.training import IGNORE_INDEX, chat_batches, collate, learning_rate_at, tokenize_chat, train


@pytest.fixture(scope="module")
def lab():
    return load_lab_model()


def tiny_llama(vocab_size=32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------- training


def test_learning_rate_schedule_warms_up_and_decays_to_zero():
    rates = [learning_rate_at(s, lr=1.0, steps=10, warmup_steps=2, decay=True) for s in range(10)]
    assert rates[:2] == [0.5, 1.0]
    assert rates[2] == 1.0 and all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert rates[-1] == pytest.approx(1 / 8)
    assert learning_rate_at(7, lr=0.1, steps=10, warmup_steps=0, decay=False) == 0.1


def test_train_lowers_the_loss_on_a_tiny_problem():
    model = tiny_llama()
    sequence = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 2])
    batches = [{"input_ids": sequence, "labels": sequence}]
    history = train(model, batches, steps=60, lr=1e-2, progress=False)
    assert len(history.losses) == 60 and history.seconds > 0
    assert history.losses[0] > 3.0  # about ln(32): nothing learned yet
    assert history.final_loss < 0.5 * history.losses[0]
    assert not model.training  # train() leaves the model in eval mode


def test_train_only_updates_trainable_parameters_and_can_stop_early():
    model = tiny_llama()
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    sequence = torch.tensor([[1, 2, 3, 4, 5, 6]])
    history = train(model, [{"input_ids": sequence, "labels": sequence}], steps=50, lr=1e-2,
                    progress=False, callback=lambda step, loss: step == 7)
    assert len(history.losses) == 7
    assert torch.equal(frozen, before)


def test_train_adds_extra_loss_to_the_gradient():
    # A huge pull of one weight towards 5 must win over the language-model loss; without the
    # extra term the weight stays near its initial value (1, an RMSNorm scale).
    model = tiny_llama()
    weight = model.model.norm.weight
    sequence = torch.tensor([[1, 2, 3, 4, 5, 6]])
    batches = [{"input_ids": sequence, "labels": sequence}]
    pull = lambda m: 100.0 * (m.model.norm.weight[0] - 5.0) ** 2  # noqa: E731
    plain = train(copy.deepcopy(model), batches, steps=3, lr=1e-2, progress=False)
    history = train(model, batches, steps=200, lr=5e-2, progress=False, extra_loss=pull)
    assert abs(weight[0].item() - 5.0) < 0.5
    assert history.losses[0] > plain.losses[0] + 100  # the recorded loss is the total


def test_train_explains_an_exhausted_iterator_and_a_frozen_model():
    model = tiny_llama()
    sequence = torch.tensor([[1, 2, 3]])
    with pytest.raises(CourseError, match="ran out"):
        train(model, iter([{"input_ids": sequence, "labels": sequence}]), steps=3, lr=1e-3, progress=False)
    model.requires_grad_(False)
    with pytest.raises(CourseError, match="no trainable parameters"):
        train(model, [{"input_ids": sequence}], steps=1, lr=1e-3, progress=False)


def test_train_keeps_position_id_packed_samples_apart(lab):
    # A row packed by position ids alone (DataCollatorWithFlattening, no mask) must train on each sample as if it
    # were alone. With the config's use_cache=True a transformers model builds a KV cache even in train mode and
    # no longer detects the packed samples: they attend to each other and the loss changes.
    from transformers import DataCollatorWithFlattening

    model, tokenizer = lab
    model = copy.deepcopy(model)
    assert model.config.use_cache  # the default that causes the leak
    samples = [tokenize_chat(tokenizer, chat(f"Repeat: {words}", words)) for words in ("red cat", "blue sky now", "a b c d")]
    flat = dict(DataCollatorWithFlattening()(samples))
    with torch.no_grad():
        padded_loss = model(**collate(samples, tokenizer.pad_token_id), use_cache=False).loss.item()
    history = train(model, [flat], steps=1, lr=0.0, progress=False)  # lr 0: one forward pass in train mode
    assert history.losses[0] == pytest.approx(padded_loss, abs=1e-5)


def test_chat_batches_train_only_on_the_answer(lab):
    _, tokenizer = lab
    messages = [{"role": "user", "content": "Repeat: red cat"}, {"role": "assistant", "content": "red cat"}]
    example = tokenize_chat(tokenizer, messages)
    trained = [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "red cat<|im_end|>"

    short = {"messages": [{"role": "user", "content": "Count: red"}, {"role": "assistant", "content": "1"}]}
    batch = next(chat_batches(tokenizer, [short, {"messages": messages}], batch_size=2, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()


def test_collate_pads_on_the_right():
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_chat_batches_need_enough_examples(lab):
    _, tokenizer = lab
    one = {"messages": [{"role": "user", "content": "Count: red"}, {"role": "assistant", "content": "1"}]}
    with pytest.raises(CourseError, match="batch"):
        next(chat_batches(tokenizer, [one], batch_size=2))


# ---------------------------------------------------------------- evaluation


def test_exact_match_scores_right_and_wrong_references(lab):
    model, tokenizer = lab
    examples = [{"messages": chat(prompt, answer)} for prompt, answer in [
        ("Repeat: red cat 7", "red cat 7"),
        ("First word: lake old soup", "lake"),
        ("Last word: lake old soup", "lake"),  # wrong on purpose: the model answers "soup"
    ]]
    accuracy, predictions = exact_match(model, tokenizer, examples, return_predictions=True)
    assert predictions == ["red cat 7", "lake", "soup"]
    assert accuracy == pytest.approx(2 / 3)


def test_batched_generation_equals_one_by_one(lab):
    model, tokenizer = lab
    prompts = ["Repeat: red cat lake", "Repeat: gold happy beans black lake", "Count: red cat dog",
               [{"role": "user", "content": "Where does Mia live?"}]]
    together = generate(model, tokenizer, prompts, batch_size=4)
    alone = [generate(model, tokenizer, [p])[0] for p in prompts]
    assert together == alone
    assert together[0] == "red cat lake"


def test_sampling_with_a_seed_repeats(lab):
    model, tokenizer = lab
    prompts = ["Tell me about Mia's pet."] * 8
    first = generate(model, tokenizer, prompts, do_sample=True, seed=3)
    assert first == generate(model, tokenizer, prompts, do_sample=True, seed=3)


def test_perplexity_of_a_model_with_uniform_predictions_is_the_vocabulary_size(lab):
    _, tokenizer = lab
    model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: every token has probability 1/V
    texts = ["Mia lives in Rome.", "The old dog sleeps near the river. Tom counts 1 2 3."]
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(len(tokenizer), rel=1e-4)


def test_perplexity_is_one_number_over_all_tokens_whatever_the_batch_size(lab):
    model, tokenizer = lab
    texts = ["Mia lives in Rome.", "The old dog sleeps near the river.", "Kai counts 3 4 5 6."]
    together = perplexity(model, tokenizer, texts, batch_size=3)
    assert together == pytest.approx(perplexity(model, tokenizer, texts, batch_size=1), rel=1e-4)
    assert 1.0 < together < 10.0  # the lab model knows this kind of text
    scrambled = perplexity(model, tokenizer, ["river the near sleeps dog old The."])
    assert scrambled > together and math.isfinite(scrambled)


def test_evaluation_explains_bad_input(lab):
    model, tokenizer = lab
    with pytest.raises(CourseError):
        exact_match(model, tokenizer, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(CourseError):
        generate(model, tokenizer, [42])
    with pytest.raises(CourseError):
        perplexity(model, tokenizer, [])


def test_trl_assistant_only_loss_masks_the_same_tokens_as_chat_batches(lab, tmp_path):
    """TRL's SFTTrainer finds the answer tokens through the template's {% generation %} block."""
    from trl import SFTConfig, SFTTrainer

    from course_utils.data import load_task

    model, tokenizer = lab
    rows = load_task("reverse", "train").select(range(4))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, bf16=False, use_cpu=True,
                     activation_checkpointing=False, report_to=[], max_steps=1, per_device_train_batch_size=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    for row, tokenized in zip(rows, trainer.train_dataset):
        ours = tokenize_chat(tokenizer, row["messages"])
        assert tokenized["input_ids"] == ours["input_ids"]
        assert tokenized["labels"] == ours["labels"]  # -100 everywhere but "answer<|im_end|>"
