"""The worked example's reward (docs/data_and_rewards.md): is the completion the right sum?

A reward is any ``fn(completion, sample) -> float``. ``completion`` is the model's response text only;
``sample`` is the prompt's row from the data file, with every field the row has (here ``answer``).
"""


def exact_answer(completion: str, sample: dict) -> float:
    """1.0 when the completion's first line is the row's ``answer``; 0.1 for any number; else 0.0."""
    first = completion.strip().split("\n", 1)[0].strip()
    if first == str(sample["answer"]):
        return 1.0
    return 0.1 if first.isdigit() else 0.0
