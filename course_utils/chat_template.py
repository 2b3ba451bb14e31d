"""The ChatML chat template shared by SmolLM2 and the lab model.

Both render conversations as SmolLM2 does (`<|im_start|>role\\ncontent<|im_end|>\\n`),
with a `{% generation %}` block around each assistant reply and its `<|im_end|>`: that is
what `return_assistant_tokens_mask` and TRL's `assistant_only_loss` use to find the tokens
to train on.
"""


def chatml_template(default_system_prompt: str | None = None) -> str:
    """A ChatML Jinja template; with a default system prompt, it is added when the first message is not one."""
    system = ""
    if default_system_prompt is not None:
        system = ("{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\\n" + default_system_prompt + "<|im_end|>\\n' }}"
                  "{% endif %}")
    return (
        "{% for message in messages %}"
        + system
        + "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
