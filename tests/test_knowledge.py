"""course_utils.knowledge (exported from notebook 15): new people, documents, probes, CPT batches, bad input."""

import pytest
import torch

from course_utils.errors import CourseError
from course_utils.knowledge import (MAX_PEOPLE, MIN_UNSEEN, NEW_NAMES, PHRASINGS, VALUES, Probe, adam_step_bound,
                                    candidate_logprobs,
                                    check_new_people, completion_probes, document_batches, documents, new_people,
                                    probe, qa_rows, question_probes, replay_token_share, unseen_names)
from course_utils.lab.world import NAMES, PEOPLE, Person
from course_utils.models import load_model


@pytest.fixture(scope="module")
def lab():
    return load_model("lab", device="cpu")


def test_new_people_are_new_deterministic_and_drawn_from_the_value_sets():
    # Catches a draw that ignores the seed, reuses a base name, or invents a value the probe cannot choose.
    people = new_people(8, seed=3)
    assert people == new_people(8, seed=3) and people != new_people(8, seed=4)
    assert not {p.name for p in people} & set(NAMES) and not set(NEW_NAMES) & set(NAMES)
    assert len({p.name for p in people}) == 8
    assert all(getattr(p, a) in values for p in people for a, values in VALUES.items())


@pytest.mark.parametrize("n", [1, 0, MAX_PEOPLE + 1, len(NEW_NAMES), 2.5])
def test_bad_people_counts_raise(n):
    with pytest.raises(CourseError):
        new_people(n, seed=0)


@pytest.mark.parametrize("people", [[PEOPLE[0]], [Person("Ola", "Oslo", "cat", "red", "rice")] * 2,
                                    [Person("Ola", "Paris", "cat", "red", "rice")]])
def test_old_repeated_or_unknown_people_raise(people):
    # Catches a check that lets a base person (a fact to overwrite, not new knowledge), a name twice, or a value
    # outside the value set through.
    with pytest.raises(CourseError):
        check_new_people(people)


def test_documents_state_every_fact_once_per_document():
    # Catches a document that drops or repeats a fact, or a phrasing count that is not honoured.
    people = new_people(4, seed=0)
    for k in (1, 2, len(PHRASINGS["city"])):
        docs = documents(people, k, seed=1)
        assert len(docs) == 4 * k
        for i, doc in enumerate(docs):
            person = people[i // k]
            for attribute in VALUES:
                assert doc.count(f" {getattr(person, attribute)}.") == 1, (doc, attribute)
    assert documents(people[:1])[0] == "{0} lives in {1}. {0} has a {2}. {0} likes {3}. {0} eats {4}.".format(
        people[0].name, people[0].city, people[0].pet, people[0].color, people[0].food)
    with pytest.raises(CourseError):
        documents(people, 0)


def test_qa_rows_and_probes_point_at_the_true_value(lab):
    _, tokenizer = lab
    people = new_people(3, seed=2)
    rows = qa_rows(people)
    assert len(rows) == 12 and rows[0]["messages"][1]["content"] == people[0].city
    for probes in (completion_probes(people), question_probes(tokenizer, people),
                   question_probes(tokenizer, people, context=True)):
        assert len(probes) == 12
        for p in probes:  # Catches an answer index that points at another value.
            assert p.candidates[p.answer].strip() == getattr(next(q for q in people if q.name == p.person), p.attribute)
    assert completion_probes(people)[0].prompt == f"{people[0].name} lives in"


def test_probe_matches_the_models_own_loss_and_knows_the_base_facts(lab):
    # Catches a misaligned or padded sum (it would differ from the unpadded loss) and a probe that cannot see what
    # the base knows (its 64 facts, both ways).
    model, tokenizer = lab
    probes = completion_probes(PEOPLE[:2]) + question_probes(tokenizer, PEOPLE[:1], context=True)
    scores = candidate_logprobs(model, tokenizer, probes)
    for p, s in zip(probes, scores):
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        for c, got in zip(p.candidates, s):
            ids = prompt + tokenizer(c, add_special_tokens=False)["input_ids"]
            labels = torch.tensor([[-100] * len(prompt) + ids[len(prompt):]])
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
            assert got.item() == pytest.approx(-loss * (len(ids) - len(prompt)), abs=1e-4)
    assert probe(model, tokenizer, completion_probes(PEOPLE)).accuracy > 0.9
    assert probe(model, tokenizer, question_probes(tokenizer, PEOPLE)).accuracy > 0.9
    assert probe(model, tokenizer, completion_probes(PEOPLE)).chance == pytest.approx(1 / 8)
    with pytest.raises(CourseError):
        probe(model, tokenizer, [])


def test_document_batches_and_replay_share(lab):
    # Catches replay rows that are not appended, padding that is trained, or a share that counts rows.
    _, tokenizer = lab
    docs = documents(new_people(4, seed=0))
    replay = iter(["one two three four five six seven eight nine ten eleven twelve"] * 1000)
    batch = next(document_batches(tokenizer, docs, batch_size=4, seed=0, replay=replay, replay_per_batch=2))
    assert batch["input_ids"].shape[0] == 6
    assert ((batch["labels"] != -100) == batch["attention_mask"].bool()).all()
    share = replay_token_share(document_batches(tokenizer, docs, batch_size=4, seed=0, replay=replay,
                                                replay_per_batch=2), 2, n_batches=3)
    counted = (batch["labels"] != -100).sum(1)
    assert share == pytest.approx(float(counted[-2:].sum() / counted.sum()))
    with pytest.raises(CourseError):
        next(document_batches(tokenizer, docs, batch_size=4, replay_per_batch=1))


def test_name_blind_scores_the_unseen_names_choices_against_each_person(lab):
    # Catches a baseline scored against the stand-in's own values (or the wrong person's), and unseen names that
    # overlap the people trained on.
    from course_utils.knowledge import name_blind

    model, tokenizer = lab
    people = new_people(4, seed=1)
    names = unseen_names(people)  # all free names by default
    assert len(names) == len(NEW_NAMES) - 4 and not set(names) & ({p.name for p in people} | set(NAMES))
    assert unseen_names(people, k=3) == names[:3]
    stand_in = Person(names[0], *(getattr(people[0], a) for a in VALUES))
    probes = completion_probes([stand_in])
    choice = {p.attribute: p.candidates[int(s.argmax())].strip()
              for p, s in zip(probes, candidate_logprobs(model, tokenizer, probes))}
    twins = [Person(n, *(choice[a] for a in VALUES)) for n in ("Ola", "Rik")] if names[0] not in ("Ola", "Rik") else None
    if twins is not None:  # people who all have the stand-in's choices: a name-blind model gets every fact
        assert name_blind(model, tokenizer, twins, completion_probes, names[:1]).accuracy == 1.0
    result = name_blind(model, tokenizer, people, completion_probes, names)
    expected = {(p.name, a): sum(c == getattr(p, a) for c in [
        {q.attribute: q.candidates[int(s.argmax())].strip() for q, s in zip(
            completion_probes([Person(n, *(getattr(people[0], b) for b in VALUES))]),
            candidate_logprobs(model, tokenizer, completion_probes([Person(n, *(getattr(people[0], b) for b in VALUES))])))}[a]
        for n in names]) / len(names) for p in people for a in VALUES}
    assert result.correct == pytest.approx(expected)
    with pytest.raises(CourseError):
        name_blind(model, tokenizer, people, completion_probes, [people[0].name])
    with pytest.raises(CourseError):
        unseen_names(new_people(MAX_PEOPLE, seed=0), k=MIN_UNSEEN + 1)


def test_the_most_people_leave_enough_unseen_names():
    # Catches a cap that lets new_people take names the name-blind baseline needs (N_PEOPLE=20 used to raise there).
    people = new_people(MAX_PEOPLE, seed=0)
    assert len(people) == MAX_PEOPLE and len(unseen_names(people)) == MIN_UNSEEN >= 1
    with pytest.raises(CourseError, match=str(MAX_PEOPLE)):
        new_people(MAX_PEOPLE + 1, seed=0)


def _adamw_steps(grads, betas=(0.9, 0.999)):
    """The change of one coordinate at each step of torch's AdamW (lr 1, no decay, eps 0) fed these gradients."""
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([x], lr=1.0, betas=betas, eps=0.0, weight_decay=0.0)
    changes = []
    for g in grads:
        before = x.detach().clone()
        x.grad = torch.tensor([float(g)], dtype=torch.float64)
        opt.step()
        changes.append(abs(float(x.detach() - before)))
    return changes


@pytest.mark.parametrize("t", [1, 2, 20, 80])
def test_adam_step_bound_is_reached_by_torch_and_never_passed(t):
    # Catches a bound without bias correction or with the wrong r: the built sequence g_s = (b1/b2)^(t-s) is the
    # Cauchy-Schwarz equality case, so torch's step t equals c_t; random sequences stay under it at every step.
    b1, b2 = 0.9, 0.999
    built = [(b1 / b2) ** (t - s) for s in range(1, t + 1)]
    assert _adamw_steps(built)[-1] == pytest.approx(adam_step_bound(t, (b1, b2)), rel=1e-9)
    generator = torch.Generator().manual_seed(t)
    for _ in range(20):
        grads = (torch.randn(t, generator=generator, dtype=torch.float64)
                 * torch.rand(t, generator=generator, dtype=torch.float64) ** 4).tolist()
        changes = _adamw_steps(grads)
        assert all(change <= adam_step_bound(s, (b1, b2)) * (1 + 1e-9) for s, change in enumerate(changes, 1))


def test_adam_step_bound_values_and_bad_input():
    # Catches a slip in the formula's shape: 1 at the first step, 2.02 at 80 and 7.27 in the limit for (0.9, 0.999).
    assert adam_step_bound(1) == pytest.approx(1.0)
    assert adam_step_bound(80) == pytest.approx(2.0168, abs=1e-4)
    assert adam_step_bound(100_000) == pytest.approx(0.1 / (0.001 * (1 - 0.81 / 0.999)) ** 0.5, rel=1e-6)
    for t, betas in ((0, (0.9, 0.999)), (5, (0.9, 0.5)), (5, (1.0, 0.999))):
        with pytest.raises(CourseError, match="betas"):
            adam_step_bound(t, betas)


@pytest.mark.parametrize("text, expected", [
    ("Riga", 1), ("Finn lives in Riga.", 1), ("riga", 1),
    ("Riga or Oslo", None),  # two values named: no single answer
    ("Rigatoni", None),  # a word that contains a value is not the value
    ("Finn is a curious and", None), ("", None),
])
def test_named_value_takes_one_whole_word_value(text, expected):
    # Catches substring matching (which counts "Rigatoni" as Riga) and an answer naming two values scored as right.
    from course_utils.knowledge import named_value
    assert named_value(text, ("Oslo", "Riga", "Lima")) == expected


def test_greedy_probe_scores_answers_and_restores_padding(lab):
    # Catches a batch padded on the right for generation (the answers would continue the padding), a padding side
    # left changed for the caller, and answers scored against the wrong probe; bad input raises.
    from course_utils.knowledge import greedy_probe
    model, tokenizer = lab
    side = tokenizer.padding_side
    probes = question_probes(tokenizer, PEOPLE[:4])  # the base answers its own people's facts (the card's skill)
    result, answers, cut = greedy_probe(model, tokenizer, probes)
    assert tokenizer.padding_side == side and len(answers) == len(probes)
    assert result.accuracy > 0.9, list(zip(answers, probes))
    assert not any(cut), answers  # each one-word answer ends at the end-of-turn token, well within the cap
    swapped = [Probe(p.person, p.attribute, p.prompt, p.candidates, (p.answer + 1) % len(p.candidates)) for p in probes]
    assert greedy_probe(model, tokenizer, swapped)[0].accuracy < 0.1
    with pytest.raises(CourseError):
        greedy_probe(model, tokenizer, [])


def test_greedy_probe_marks_answers_cut_off_at_the_cap(lab):
    # Catches a cut-off flag that ignores the cap (every answer "ended") or that looks for the end token in the
    # prompt or the padding: one new token is the value itself, never followed by the end-of-turn token.
    from course_utils.knowledge import greedy_probe, miss_kind
    model, tokenizer = lab
    probes = question_probes(tokenizer, PEOPLE[:2])
    result, answers, cut = greedy_probe(model, tokenizer, probes, max_new_tokens=1)
    assert all(cut) and result.accuracy > 0.9, answers  # right, but cut off: the value came, the end did not
    assert [miss_kind(p, a, c) for p, a, c in zip(probes, answers, cut)] == [None] * len(probes)
    assert miss_kind(probes[0], "Finn is a curious and", True) == "cut off"


@pytest.mark.parametrize("text, cut, expected", [
    ("Oslo", False, None), ("Riga", False, "a wrong value"), ("Riga", True, "a wrong value"),
    ("Oslo or Riga", False, "a wrong value"),  # several values: no single answer
    ("Finn is a curious and", True, "cut off"),  # still going at the cap, no value of the set yet
    ("Finn has a cat.", False, "another fact"), ("Finn has a cat and", True, "cut off"),
    ("I do not know.", False, "nothing"),
])
def test_miss_kind_sorts_every_branch(text, cut, expected):
    # Catches a wrong value counted as a cut-off (or the reverse), a recited fact counted as nothing, and a right
    # answer counted as a miss.
    from course_utils.knowledge import miss_kind
    person = Person("Finn", "Oslo", "cat", "red", "rice")
    city = _city_probe(person)
    assert miss_kind(city, text, cut) == expected


def _city_probe(person):
    return Probe(person.name, "city", "Where does Finn live?", tuple(VALUES["city"]), VALUES["city"].index(person.city))


def test_greedy_name_blind_scores_each_fact_by_the_other_names_answers(lab):
    # Catches a baseline scored against the wrong person's value or counted over the wrong names: the base answers
    # its own people's facts, so with the other old people as stand-ins each fact scores the share of them that
    # share the value. Names that overlap the people raise.
    from course_utils.knowledge import greedy_name_blind
    model, tokenizer = lab
    people, others = PEOPLE[:3], PEOPLE[3:9]
    result = greedy_name_blind(model, tokenizer, people, lambda g: question_probes(tokenizer, g),
                               [p.name for p in others])
    expected = {(p.name, a): sum(getattr(o, a) == getattr(p, a) for o in others) / len(others)
                for p in people for a in VALUES}
    assert result.correct.keys() == expected.keys()
    assert sum(abs(result.correct[k] - v) for k, v in expected.items()) / len(expected) < 0.05, result.correct
    with pytest.raises(CourseError):
        greedy_name_blind(model, tokenizer, people, lambda g: question_probes(tokenizer, g), [people[0].name])
