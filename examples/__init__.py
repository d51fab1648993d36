"""Worked examples of extending the trainer from outside `trainer/` (README: "Add your own tasks")."""
