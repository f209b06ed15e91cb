"""The generation service past one process: Ray Serve deployment, client and backend choice.

Ray is imported only here and by the bot worker processes (`musetalk.bot.workers`), and only when
the `ray` backend is chosen (`musetalk.serve.backend.make_backend`); the default in-process backend
needs no Ray.
"""
