"""Training: the policy, the PPO and SFT steps, their builder, the trainers and their shared loop."""
