"""The control panel (Gradio), one module per job.

* `engine`: what the panel shares between browser sessions and API callers (models loaded
  and weights fetched in the background, the avatar store, the bot runner, kept source
  videos, system facts); no Gradio.
* `boundary`: operator errors become `gr.Error` messages, never tracebacks.
* `text`: Markdown and tables shown in the panel; no Gradio.
* `avatars`, `live`, `render`, `system`: one tab each (components, actions, wiring).
* `library`: the Avatars tab's library view (gallery, table, details), built and wired by `avatars`.
* `ui`: the Blocks app that puts the tabs together; `app.py` parses flags and launches it.
"""
