"""The lab model's room: its small world, its tasks, its corpus, the model itself and its card.

Notebooks load the model through `course_utils.models.load_model("lab")`; this room is where it is built and
described (`python -m course_utils.lab.model train | evaluate`).
"""
