"""The System tab: device, versions, folders, every weight file, and fetching the weights.

API names: `system_info`, `load_models`, `fetch_weights`.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from musetalk.panel.boundary import PROGRESS, operator_errors
from musetalk.panel.engine import Engine
from musetalk.panel.text import WEIGHT_COLUMNS, models_banner, system_markdown, weight_rows


class SystemActions:
    """The tab's actions, bound to one engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def system_info(self) -> dict:
        """Device, GPU, versions, model files present/missing/damaged and the command that fetches them, folders.

        Returns:
            the facts (JSON)
        """
        return self.engine.system_info()

    @operator_errors
    def load_models_now(self, progress=PROGRESS) -> str:
        """Load the models now (e.g. after fetching the weights); reports what is missing otherwise.

        Returns:
            the device and precision the models run on
        """
        models = self.engine.models(
            on_wait=lambda: progress(0.0, desc="Waiting for the weights and models (fetch or first load)")
        )
        return f"Models ready: {models.describe()}"

    @operator_errors
    def fetch_weights(self, progress=PROGRESS) -> str:
        """Fetch every missing or damaged weight file from the model hub (HF_ENDPOINT mirrors work), then load the models.

        Present files are kept; a broken transfer resumes. The models load in the background
        afterwards: the banner turns to ready without a restart.

        Returns:
            what was fetched, and one line per file that could not be
        """
        progress(0.0, desc="Checking the weight files")
        report = self.engine.fetch_weights(progress=lambda p: progress(p.fraction, desc=p.describe()))
        lines = []
        if report.fetched:
            lines.append(f"Fetched {len(report.fetched)} files: " + ", ".join(f"`{f}`" for f in report.fetched) + ".")
        lines += [f"- {line}" for line in report.errors]
        missing = report.missing_required
        if missing:
            lines.append(f"**{len(missing)} required files are still missing**: the models cannot load yet.")
        elif not report.fetched and not report.errors:
            lines.append("All weight files were already present.")
        else:
            lines.append("All required weights are present: the models load in the background (see the banner).")
        return "\n\n".join(lines)

    def view(self) -> tuple[str, pd.DataFrame]:
        info = self.engine.system_info()
        table = pd.DataFrame(weight_rows(info["weight_files"]), columns=list(WEIGHT_COLUMNS))
        return system_markdown(info), table

    def view_when_settled(self) -> tuple[str, pd.DataFrame, str]:
        """The tab and the banner once the models have loaded (or failed to) after a fetch."""
        self.engine.wait_settled(timeout=600)
        return (*self.view(), self.banner())

    def banner(self) -> str:
        return models_banner(self.engine)


def build() -> SimpleNamespace:
    """The tab's components."""
    with gr.Tab("System", id="system") as tab:
        system_md = gr.Markdown()
        weights_table = gr.Dataframe(
            headers=list(WEIGHT_COLUMNS), label="Weight files", interactive=False, wrap=True, elem_id="weights-table"
        )
        with gr.Row():
            system_btn = gr.Button("Refresh", elem_id="system-refresh-btn")
            fetch_btn = gr.Button("Fetch weights", variant="primary", elem_id="fetch-weights-btn")
            load_btn = gr.Button("Load models", elem_id="load-models-btn")
        fetch_note = gr.Markdown(min_height=60, elem_id="fetch-note")
        load_note = gr.Markdown()
    return SimpleNamespace(
        tab=tab, system_md=system_md, weights_table=weights_table, system_btn=system_btn,
        fetch_btn=fetch_btn, load_btn=load_btn, fetch_note=fetch_note, load_note=load_note,
    )  # fmt: skip


def wire(actions: SystemActions, c: SimpleNamespace, banner: gr.Markdown) -> None:
    view_out = [c.system_md, c.weights_table]
    c.tab.select(actions.view, None, view_out, api_visibility="private")
    c.system_btn.click(actions.view, None, view_out, api_visibility="private")
    c.fetch_btn.click(
        actions.fetch_weights, None, c.fetch_note,
        api_name="fetch_weights", concurrency_id="fetch_weights", concurrency_limit=1, show_progress_on=c.fetch_note,
    ).then(actions.view, None, view_out, api_visibility="private").then(
        actions.banner, None, banner, api_visibility="private"
    ).then(
        actions.view_when_settled, None, [*view_out, banner], api_visibility="private", concurrency_limit=None,
        show_progress="hidden",
    )  # fmt: skip
    c.load_btn.click(
        actions.load_models_now, None, c.load_note, api_name="load_models", concurrency_id="load_models"
    ).then(actions.view, None, view_out, api_visibility="private").then(
        actions.banner, None, banner, api_visibility="private"
    )
    gr.api(actions.system_info, api_name="system_info", concurrency_limit=None)
