"""NLU tasks: the task registry and task files, data loading, answer extraction, metrics and evaluation."""
