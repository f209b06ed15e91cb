"""MuseTalk v1.5 real-time lip-sync engine (core: no Pipecat, no Gradio)."""

__version__ = "0.1.0"
