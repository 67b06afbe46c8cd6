"""Run folders read back: a trained policy from a run, and its export to Hugging Face."""
