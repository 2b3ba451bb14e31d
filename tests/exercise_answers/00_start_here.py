"""Plausible wrong answers to notebook 00's exercises (tests/test_exercise_cells.py)."""


def attention_parameters(model):
    # Forgets grouped-query attention: every projection taken as hidden x hidden, biases ignored.
    c = model.config
    return 4 * c.hidden_size * c.hidden_size * c.num_hidden_layers


def exact_match_score(predictions, answers):
    # Compares without stripping whitespace.
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


def assistant_mask(tokenizer, messages):
    # Marks the reply's text but not the <|im_end|> that ends the turn.
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    header, spans, cursor = "<|im_start|>assistant\n", [], 0
    for message in messages:
        if message["role"] == "assistant":
            start = text.index(header + message["content"], cursor) + len(header)
            cursor = start + len(message["content"])
            spans.append((start, cursor))
    return [int(any(lo <= begin < hi for lo, hi in spans)) for begin, _ in offsets]
