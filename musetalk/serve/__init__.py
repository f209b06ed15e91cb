"""The generation service past one process: Ray Serve deployment, client and backend choice.

Only this package imports Ray, and only when the `ray` backend is chosen
(`musetalk.serve.backend.make_backend`); the default in-process backend needs no Ray.
"""
