"""Evaluation: perplexity by the standard protocol, drift from the reference, quality gates, the report.

- ``perplexity``: ``tokenize_documents``, ``window_spans``, ``perplexity`` (torch).
- ``divergence``: ``compare_to_reference``, ``ReferenceLogprobs`` + ``compare_to_reference_logprobs`` (torch).
- ``gates``: ``check_gates`` (no heavy imports).
- ``report``: ``render_report`` (no heavy imports).

Nothing is re-exported here, so importing ``pipeline.eval.gates`` or ``pipeline.eval.report`` never imports torch.
"""
