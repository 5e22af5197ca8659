"""The browser demo: NTP vs NPP side by side. `backend` holds the logic (no gradio), `demo` the UI and CLI."""
