"""Streamgate: OpenAI-compatible streaming chat completions on AWS Lambda."""
