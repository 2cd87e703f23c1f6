"""OpenAI-compatible serving of keye checkpoints: chat messages -> prompts (chat.py), a batching queue in front of
the model's generate (batching.py) and the HTTP API (app.py, started by `keye serve`)."""
