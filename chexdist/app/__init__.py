"""The local web app (`chexdist app`): FastAPI over one exported run, with a plain HTML/CSS/JS page
shipped in `static/`; it imports evaluation, data, models and runs, and nothing imports it."""
