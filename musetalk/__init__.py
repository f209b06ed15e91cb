"""MuseTalk v1.5 real-time lip-sync engine.

The core modules of this package import neither Pipecat nor Gradio; `musetalk.bot` adapts the core
to Pipecat, `musetalk.panel` is the Gradio control panel and `musetalk.serve` the optional Ray Serve
backend (see the README's "Layout").
"""

__version__ = "0.1.0"
