"""Video-RL and Context-RL as libraries (plain values in and out; the pipeline stage wires them):
rollouts (local | openai engines), rewards (a registry), advantages (GRPO group normalisation, overlong penalty,
zero-variance groups), losses (GRPO / DAPO / Dr.GRPO / GSPO, k3 KL, truncated importance sampling),
dynamic sampling, context_rl and a small GRPO step (grpo.py)."""
