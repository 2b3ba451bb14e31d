"""Plausible wrong answers to notebook 14's exercises (tests/test_exercise_cells.py)."""
from course_utils.errors import CourseError


def merge_ia3(weight, bias, scaling, scale_input):
    # The right axis each time, but the bias left alone when the output is scaled: l * (W x + b) scales b too.
    if scale_input:
        return weight * scaling.unsqueeze(0), bias
    return weight * scaling.unsqueeze(1), bias


def prefix_parameters(num_layers, hidden_size, num_attention_heads, num_key_value_heads, n, projection_hidden):
    # Sizes every layer's keys and values by the hidden size (the query heads), as if there were no grouped-query
    # attention, and forgets the projection's biases.
    if n < 1:
        raise CourseError("a prefix needs at least one virtual token")
    per_token = num_layers * 2 * hidden_size
    if projection_hidden is None:
        return n * per_token
    return n * hidden_size + hidden_size * projection_hidden + projection_hidden * per_token
