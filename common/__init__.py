"""Small shared plumbing for fkd.py, bake.py, meal_v2.py and frskd.py: one module per concern, listed
in the README's "Layout"; each module's docstring says what it holds and why."""
