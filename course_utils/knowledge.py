"""Teaching a model new knowledge: new people with new facts, told as documents or as questions, and a probe
that tells a stored fact from an extractable one.

Built in notebooks/15_new_knowledge.ipynb. No library implements "knowledge" (TRL and transformers train on
whatever text they are given), so the notebook proves the pieces another way: the probe's choice equals an argmax
computed from the model's own loss, one candidate at a time.
"""

# Exported from notebooks/15_new_knowledge.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/15_new_knowledge.ipynb · 1.1 · New people, new facts
import itertools
import random
import re
from dataclasses import dataclass

import torch

from course_utils.errors import CourseError
from course_utils.lab.tasks import FACT_QUESTIONS, chat
from course_utils.lab.world import CITIES, COLORS, FOODS, NAMES, PETS, Person
from course_utils.training import collate, pad_token_id

VALUES = {"city": CITIES, "pet": PETS, "color": COLORS, "food": FOODS}  # the world's value sets, 8 each
NEW_NAMES = ("Ola", "Rik", "Nia", "Tor", "Bea", "Jun", "Pia", "Ugo", "Ines", "Omar", "Vera", "Yara",
             "Finn", "Gus", "Hana", "Kim", "Lou", "Ned", "Ray", "Wes", "Abe", "Dov", "Sol", "Tia")  # none a base name
MIN_UNSEEN = 4  # names every draw leaves free: the name-blind baseline's stand-ins (unseen_names)
MAX_PEOPLE = len(NEW_NAMES) - MIN_UNSEEN
# Sentence templates per fact; the value always ends the sentence, so the text before it is a completion prompt.
# Template 0 is the world's own sentence (lab.world.fact_sentences), the one-phrasing documents use only it.
PHRASINGS = {
    "city": ("{name} lives in {value}.", "{name} has a home in {value}.", "{name} moved to {value}.",
             "The home of {name} is in {value}."),
    "pet": ("{name} has a {value}.", "{name} keeps a {value}.", "{name} owns a {value}.",
            "The pet of {name} is a {value}."),
    "color": ("{name} likes {value}.", "{name} loves the color {value}.", "{name} picks {value}.",
              "The color {name} likes is {value}."),
    "food": ("{name} eats {value}.", "{name} cooks {value}.", "{name} buys {value}.",
             "The food {name} eats is {value}."),
}
# Questions the base never saw (its fact skill is trained on FACT_QUESTIONS only).
REPHRASED_QUESTIONS = {"city": "In which city does {} live?", "pet": "Which pet does {} have?",
                       "color": "Which color does {} like?", "food": "What food does {} eat?"}


def new_people(n: int, seed: int) -> list[Person]:
    """n new people, names from NEW_NAMES and each fact drawn uniformly from the world's value set (so any
    fixed guess is right 1 time in 8), the same for the same seed."""
    if not isinstance(n, int) or not 2 <= n <= MAX_PEOPLE:
        raise CourseError(f"n={n!r} new people: choose 2 to {MAX_PEOPLE} (NEW_NAMES has {len(NEW_NAMES)} names and "
                          f"{MIN_UNSEEN} stay free for the name-blind baseline), at least 2 so that a half can be "
                          "trained and a half held out.")
    rng = random.Random(seed)
    people = [Person(name, *(rng.choice(values) for values in VALUES.values())) for name in rng.sample(NEW_NAMES, n)]
    check_new_people(people)  # next cell
    return people


# %% notebooks/15_new_knowledge.ipynb · 1.1 · New people, new facts
def check_new_people(people) -> None:
    """A CourseError for a person who is one of the base's people, a repeated name, or a value outside the world's
    value sets (the probe scores a fact against its value set, so an unknown value could never be chosen)."""
    names = [p.name for p in people]
    old = sorted(set(names) & set(NAMES))
    if old:
        raise CourseError(f"{old} are people the base model already knows: new knowledge needs new names "
                          "(take them from knowledge.NEW_NAMES).")
    if len(set(names)) != len(names):
        raise CourseError(f"A name occurs twice in {names}: two people with one name have no single answer.")
    for person in people:
        for attribute, values in VALUES.items():
            if getattr(person, attribute) not in values:
                raise CourseError(f"{person.name}'s {attribute} {getattr(person, attribute)!r} is not in the "
                                  f"world's value set {values}: draw facts from knowledge.VALUES.")


# %% notebooks/15_new_knowledge.ipynb · 1.2 · Documents and questions
def fact_sentence(person: Person, attribute: str, phrasing: int = 0) -> str:
    """One fact as a sentence in template `phrasing` ("Ola lives in Oslo." for phrasing 0)."""
    return PHRASINGS[attribute][phrasing].format(name=person.name, value=getattr(person, attribute))


def documents(people, phrasings: int = 1, seed: int = 0) -> list[str]:
    """`phrasings` documents per person, each telling all four facts. With one phrasing every document is the
    world's own sentences in a fixed order; with k > 1, document j uses template j and a shuffled fact order
    (Allen-Zhu and Li's "multi" and "permute" augmentations). Every document states each fact once, so the same
    number of training documents shows each fact equally often whatever `phrasings` is."""
    if not 1 <= phrasings <= len(PHRASINGS["city"]):
        raise CourseError(f"phrasings={phrasings!r}: choose 1 to {len(PHRASINGS['city'])} templates per fact.")
    rng = random.Random(seed)
    docs = []
    for person in people:
        for j in range(phrasings):
            order = list(VALUES)
            if phrasings > 1:
                rng.shuffle(order)
            docs.append(" ".join(fact_sentence(person, attribute, j) for attribute in order))
    return docs


def qa_rows(people, questions=FACT_QUESTIONS) -> list[dict]:
    """Chat rows {"messages": [question, answer]}, one per fact; the base's own question wording by default."""
    return [{"messages": chat(questions[attribute].format(p.name), getattr(p, attribute))}
            for p in people for attribute in VALUES]


# %% notebooks/15_new_knowledge.ipynb · 1.3 · The probe: stored, and extractable
@dataclass(frozen=True)
class Probe:
    """One fact to score: the model continues `prompt` with each candidate; `answer` indexes the right one."""
    person: str
    attribute: str
    prompt: str
    candidates: tuple[str, ...]
    answer: int


def completion_probes(people, phrasing: int = 0) -> list[Probe]:
    """Storage: does the model complete "Ola lives in" with the right city? Candidates carry the space that
    precedes a word in running text (" Oslo")."""
    return [Probe(p.name, attribute, fact_sentence(p, attribute, phrasing).rsplit(" ", 1)[0],
                  tuple(" " + v for v in values), values.index(getattr(p, attribute)))
            for p in people for attribute, values in VALUES.items()]


def question_probes(tokenizer, people, questions=FACT_QUESTIONS, *, context: bool = False) -> list[Probe]:
    """Extraction: asked "Where does Ola live?" in a chat, does the model answer the right city? With
    context=True the person's one-phrasing document comes first in the message (the facts in the prompt)."""
    probes = []
    for p in people:
        for attribute, values in VALUES.items():
            question = questions[attribute].format(p.name)
            if context:
                question = f"{documents([p])[0]} {question}"
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   tokenize=False, add_generation_prompt=True)
            probes.append(Probe(p.name, attribute, prompt, tuple(values), values.index(getattr(p, attribute))))
    return probes


# %% notebooks/15_new_knowledge.ipynb · 1.3 · The probe: stored, and extractable
@torch.no_grad()
def candidate_logprobs(model, tokenizer, probes, *, batch_size: int = 512) -> list[torch.Tensor]:
    """log p(candidate | prompt), summed over the candidate's tokens, for every candidate of every probe. A probe
    whose candidates are all one token is one row, the prompt alone: its last position scores every candidate."""
    rows, plan = [], []  # rows: (token ids, where the candidate starts); plan: (first row, one-token ids or a count)
    for probe in probes:
        prompt = tokenizer(probe.prompt, add_special_tokens=False)["input_ids"]
        cands = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in probe.candidates]
        plan.append((len(rows), [c[0] for c in cands] if all(len(c) == 1 for c in cands) else len(cands)))
        rows += [(prompt, len(prompt))] if isinstance(plan[-1][1], list) else [(prompt + c, len(prompt)) for c in cands]
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id or 0
    sums, nexts = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in chunk], device=device)
        lengths = torch.tensor([len(r) for r, _ in chunk], device=device)
        begins = torch.tensor([b for _, b in chunk], device=device)
        attention = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
        logits = model(input_ids=ids, attention_mask=attention).logits
        target = torch.arange(1, width, device=device)[None]
        row, at = ((target >= begins[:, None]) & (target < lengths[:, None])).nonzero(as_tuple=True)
        token_logp = logits[row, at].float().log_softmax(-1).gather(-1, ids[row, at + 1, None])[:, 0]  # at scores at + 1
        sums.append(torch.zeros(len(chunk), device=device).index_add_(0, row, token_logp).cpu())
        nexts.append(logits[torch.arange(len(chunk), device=device), begins - 1].float().log_softmax(-1).cpu())
    sums, nexts = torch.cat(sums), torch.cat(nexts)  # nexts: what follows each row's prompt
    return [nexts[first][torch.tensor(how)] if isinstance(how, list) else sums[first:first + how] for first, how in plan]


@dataclass
class ProbeResult:
    """Which facts the model got right (1/0 per probe, keyed by (person, attribute)), against chance."""
    correct: dict
    chance: float

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / len(self.correct)

    @property
    def n(self) -> int:
        return len(self.correct)


def probe(model, tokenizer, probes) -> ProbeResult:
    """Score each probe by the argmax over its candidates; chance is the mean of 1 / (number of candidates)."""
    if not probes:
        raise CourseError("probe got no probes: build them with completion_probes or question_probes.")
    scores = candidate_logprobs(model, tokenizer, probes)
    correct = {(p.person, p.attribute): int(int(s.argmax()) == p.answer) for p, s in zip(probes, scores)}
    return ProbeResult(correct, sum(1 / len(p.candidates) for p in probes) / len(probes))


# %% notebooks/15_new_knowledge.ipynb · 1.3 · The probe: stored, and extractable
def unseen_names(people, k: int | None = None) -> list[str]:
    """The names of NEW_NAMES that none of `people` has (and the base never saw), all of them or the first k:
    stand-ins the model never trained on. All of them (the default) make the name-blind baseline steadier."""
    taken = {p.name for p in people}
    names = [n for n in NEW_NAMES if n not in taken]
    if len(names) < (MIN_UNSEEN if k is None else k):
        raise CourseError(f"Only {len(names)} of NEW_NAMES are free of these {len(people)} people: draw at most "
                          f"{MAX_PEOPLE} people (new_people does), or ask for fewer unseen names (k={k}).")
    return names if k is None else names[:k]


def name_blind(model, tokenizer, people, make_probes, names) -> ProbeResult:
    """The name-blind baseline: the model's choice for each unseen name in `names` (the same prompts with that name
    in place of a person's), scored against each person's value. `correct[(person, attribute)]` is the share of the
    unseen names whose choice is that person's value: what a model that ignores the name scores on the fact.
    `make_probes(group)` builds the probes (completion_probes, or a question_probes call); `names` must be names the
    model never trained on (unseen_names of everyone it trained on)."""
    overlap = sorted({p.name for p in people} & set(names))
    if overlap or not names:
        raise CourseError(f"name_blind needs unseen names, got {list(names)} (overlap with people: {overlap}): "
                          "pass unseen_names(everyone the model trained on).")
    stand_ins = [Person(n, *(getattr(people[0], a) for a in VALUES)) for n in names]
    blind_probes = make_probes(stand_ins)
    choices = {}
    for p, s in zip(blind_probes, candidate_logprobs(model, tokenizer, blind_probes)):
        choices.setdefault(p.attribute, []).append(int(s.argmax()))
    real = make_probes(people)
    correct = {(p.person, p.attribute): sum(c == p.answer for c in choices[p.attribute]) / len(names) for p in real}
    return ProbeResult(correct, sum(1 / len(p.candidates) for p in real) / len(real))


# %% notebooks/15_new_knowledge.ipynb · 1.4 · Continued-pretraining batches, with replay
def document_batches(tokenizer, docs, *, batch_size: int, seed: int = 0, replay=None, replay_per_batch: int = 0):
    """Endless batches for continued pretraining: `batch_size` documents drawn from `docs` (each epoch in a new
    order), plus `replay_per_batch` documents of the original pretraining stream `replay` (an iterator of texts)
    at the end of each batch. Every token is trained (the plain language-model loss); padding is not."""
    if len(docs) < 1 or batch_size < 1:
        raise CourseError("document_batches needs at least one document and a batch size of at least 1.")
    if replay_per_batch and replay is None:
        raise CourseError("replay_per_batch > 0 needs replay=, an iterator of original pretraining texts.")
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenized = [tokenizer(d)["input_ids"] + [end] for d in docs]
    rng = random.Random(seed)
    order = []
    while True:
        if len(order) < batch_size:
            order += rng.sample(range(len(docs)), len(docs))
        rows = [tokenized[i] for i in order[:batch_size]]
        order = order[batch_size:]
        rows += [tokenizer(next(replay))["input_ids"] + [end] for _ in range(replay_per_batch)]
        yield collate([{"input_ids": r} for r in rows], pad_token_id(tokenizer))


def replay_token_share(batches, replay_per_batch: int, n_batches: int = 50) -> float:
    """Share of trained tokens that are replay, over the first `n_batches` batches (replay rows come last)."""
    replayed = total = 0
    for batch in itertools.islice(batches, n_batches):
        counted = (batch["labels"] != -100).sum(1)
        replayed += int(counted[len(counted) - replay_per_batch:].sum()) if replay_per_batch else 0
        total += int(counted.sum())
    return replayed / total


# %% notebooks/15_new_knowledge.ipynb · 1.4 · Continued-pretraining batches, with replay
def original_texts(seed: int = 0):
    """The lab model's own pretraining stream as texts (chats in ChatML): the replay source."""
    from course_utils.lab.corpus import pretraining_stream
    from course_utils.lab.model import chatml_text

    for doc in pretraining_stream(seed):
        yield doc["text"] if "text" in doc else chatml_text(doc["messages"])


# %% notebooks/15_new_knowledge.ipynb · 3.5 · Fine-tune, or put it in the prompt?
def named_value(text: str, candidates) -> int | None:
    """The index of the one candidate that a free answer names as a whole word (any case); None when it names none
    or several ("Riga or Oslo" is no answer, "Rigatoni" is not Riga)."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    named = [i for i, c in enumerate(candidates) if c.strip().lower() in words]
    return named[0] if len(named) == 1 else None


@torch.no_grad()
def greedy_probe(model, tokenizer, probes, *, max_new_tokens: int = 24) -> tuple[ProbeResult, list[str], list[bool]]:
    """Score probes by the model's greedy answer to each prompt (all in one left-padded batch, each answer ending
    at the model's end-of-turn token or at max_new_tokens): 1 when the answer names the true value and no other
    (`named_value`). For a chat model that answers in sentences. Chance is not 1/|V| here (an answer may name
    nothing), so ProbeResult.chance is nan: compare with the model asked without the facts, or with `greedy_name_blind`.
    Returns the result, the answers, and for each answer whether it was cut off (reached the cap without ending)."""
    if not probes:
        raise CourseError("greedy_probe got no probes: build them with question_probes.")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues every prompt's last token
    try:
        batch = tokenizer([p.prompt for p in probes], return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    batch = batch.to(next(model.parameters()).device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tokenizer))
    new = out[:, batch["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    cut = [new.shape[1] == max_new_tokens and not eos & set(row.tolist()) for row in new]  # no end within the cap
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    correct = {(p.person, p.attribute): int(named_value(t, p.candidates) == p.answer) for p, t in zip(probes, texts)}
    return ProbeResult(correct, float("nan")), texts, cut


def miss_kind(probe_: Probe, text: str, cut: bool) -> str | None:
    """Why a greedy answer missed: None when it is right; "a wrong value" when it names a value of the set asked
    about other than the true one (or several); "cut off" when it reached the token cap before naming any;
    "another fact" when it ended naming a value of another attribute's set (a fact recited instead); "nothing"."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    if named_value(text, probe_.candidates) == probe_.answer:
        return None
    if any(c.strip().lower() in words for c in probe_.candidates):
        return "a wrong value"
    if cut:
        return "cut off"
    others = [values for values in VALUES.values() if tuple(values) != tuple(probe_.candidates)]
    return "another fact" if any(v.lower() in words for values in others for v in values) else "nothing"


# %% notebooks/15_new_knowledge.ipynb · 3.5 · Fine-tune, or put it in the prompt?
def greedy_name_blind(model, tokenizer, people, make_probes, names, *, max_new_tokens: int = 24) -> ProbeResult:
    """`name_blind` for greedy answers: the model's answer for each unseen name in `names`, scored against each
    person's value. `correct[(person, attribute)]` is the share of the unseen names whose answer names that
    person's value alone: what a model that ignores the name (answers each attribute with its favourite trained
    values) scores on the fact. `names` must be names the model never trained on (unseen_names)."""
    overlap = sorted({p.name for p in people} & set(names))
    if overlap or not names:
        raise CourseError(f"greedy_name_blind needs unseen names, got {list(names)} (overlap with people: {overlap}): "
                          "pass unseen_names(everyone the model trained on).")
    blind_probes = make_probes([Person(n, *(getattr(people[0], a) for a in VALUES)) for n in names])
    _, texts, _ = greedy_probe(model, tokenizer, blind_probes, max_new_tokens=max_new_tokens)
    choices = {}
    for p, t in zip(blind_probes, texts):
        choices.setdefault(p.attribute, []).append(named_value(t, p.candidates))
    correct = {(p.person, p.attribute): sum(c == p.answer for c in choices[p.attribute]) / len(names)
               for p in make_probes(people)}
    return ProbeResult(correct, float("nan"))


# %% notebooks/15_new_knowledge.ipynb · 3.6 · New names as tokens
def adam_step_bound(t: int, betas=(0.9, 0.999)) -> float:
    """The most one Adam(W) step t (from 1) can move a coordinate, in units of its learning rate, with torch's bias
    correction and weight decay left out: |m_hat| / sqrt(v_hat) <= c_t, whatever the gradients. By Cauchy-Schwarz,
    c_t = (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2)) * sqrt((1 - r^t) / (1 - r)), r = b1^2 / b2 (1 at
    t = 1; tends to (1 - b1) / sqrt((1 - b2) (1 - r)), 7.27 for torch's defaults). Equality holds for gradients
    g_s proportional to (b1 / b2)^(t - s); eps only makes a step smaller. Needs b1^2 < b2."""
    b1, b2 = betas
    if t < 1 or not 0 <= b1 < 1 or not 0 < b2 < 1 or b1 * b1 >= b2:
        raise CourseError(f"adam_step_bound(t={t}, betas={betas}): t counts steps from 1, and the betas need "
                          "0 <= b1 < 1, 0 < b2 < 1 and b1^2 < b2 (torch's defaults are (0.9, 0.999)).")
    r = b1 * b1 / b2
    return (1 - b1) / (1 - b1 ** t) * ((1 - b2 ** t) / (1 - b2)) ** 0.5 * ((1 - r ** t) / (1 - r)) ** 0.5
