"""Entry points: the soundshard command and the pipelines it runs."""
