"""Release: the model card and publishing of a variant whose quality gates passed.

``card.render_card`` turns what a run measured into the README.md of the publishable folder (hub metadata header,
method, eval table, serve commands); ``publish`` assembles that folder from the compile artifact (hard links, the
card, a manifest with provenance), verifies it (``pipeline.verify``) and copies it to a folder or commits it to a
Hugging Face hub repo. The ``publish`` stage (``pipeline/stages/publish.py``) and ``pipeline publish RUN_DIR`` call it.
"""
