"""evaluate: perplexity of the deployable model, KL divergence / top-1 agreement against the reference on the
same tokens of a held-out text (DESIGN.md §6), lm-eval task accuracy (``eval.tasks``) and generation sanity
(``eval.sanity``). Gates are judged by the runner from these metrics.

The reference is computed once per plan and shared by every variant: its log-probs on the eval tokens and its
greedy generations on the sanity prompts are cached under the plan's root,

    <root>/reference-<key12>/                 key: download folder (its cache key), dtype, device type
        logprobs-<key12>/                     key: sha256 of the eval token ids (text, max_tokens, tokenizer), seq_len
        sanity-<key12>.json                   key: the prompt set's sha256, its token ids, max_new_tokens
        tasks-<key12>.json                    key: tasks, task_limit, task folders, seq_len (the reference's
                                              task scores: ``metrics["ref_tasks"]``, beside ``metrics["tasks"]``)

each written through a temporary name and renamed into place (a concurrent writer's copy is discarded), read by
every later evaluate run. Log-probs that would take more than ``REFERENCE_CACHE_BYTES`` on disk (tokens x
vocab x 4) are not cached: the reference then runs beside each candidate, and ``metrics["reference"]`` says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import METRICS, clean_stale, model_path, new_tmp_dir, write_json
from pipeline.stages import StageContext
from pipeline.textdata import join_documents, read_documents
from pipeline.resources import releases_models

REFERENCE_CACHE_BYTES = 4 << 30
GENERATIONS = "generations.json"


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _ids_sha(ids: Any) -> str:
    import torch

    return hashlib.sha256(torch.as_tensor(ids, dtype=torch.int64).contiguous().numpy().tobytes()).hexdigest()


class _Reference:
    """The reference model of a plan, loaded only when a cached figure is missing."""

    def __init__(self, ctx: StageContext, device: Any, dtype: Any) -> None:
        self.ctx, self.device, self.dtype = ctx, device, dtype
        self.folder = model_path(ctx.inputs["download"])
        self.root = ctx.out.parent / ("reference-" + _key(
            {"download": ctx.inputs["download"].name, "dtype": str(dtype), "device": device.type})[:12])
        self._model = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from pipeline.engines.transformers_engine import load_model

            variant = self.ctx.recipe.variant
            self._model, _ = load_model(self.folder, device=str(self.device), dtype=self.dtype,
                                        allow_pickle=variant.model.allow_pickle,
                                        trust_remote_code=variant.model.trust_remote_code)
        return self._model

    def release(self) -> None:
        """Drop the loaded reference model (its figures are cached): memory for the evaluated server."""
        self._model = None

    def vocab_size(self) -> int:
        try:
            config = json.loads((self.folder / "config.json").read_text())
            return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
        except (OSError, ValueError, TypeError):
            return 0

    def logprobs(self, ids: Any, seq_len: int, batch_size: int) -> Any:
        """``ReferenceLogprobs`` of ``ids``: read from the cache, else computed once and cached."""
        from pipeline.eval.divergence import ReferenceLogprobs

        final = self.root / ("logprobs-" + _key({"ids": _ids_sha(ids), "seq_len": seq_len})[:12])
        if (final / "reference.json").is_file():
            self.ctx.log.info("reference log-probs cached (%s/%s)", self.root.name, final.name)
            return ReferenceLogprobs.load(final)
        self.root.mkdir(parents=True, exist_ok=True)
        clean_stale(self.root)  # what a killed evaluate left half-written
        tmp = new_tmp_dir(final)
        try:
            ReferenceLogprobs.compute(self.model, ids, seq_len, batch_size=batch_size, folder=tmp)
            if not final.exists():
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return ReferenceLogprobs.load(final)

    def generations(self, tokenizer: Any, prompts: list[dict], max_new_tokens: int) -> dict[str, Any]:
        """``{"eos_ids", "outputs"}``: the reference's greedy generations of ``prompts``, cached."""
        from pipeline.eval import sanity

        token_ids = [sanity.prompt_ids(tokenizer, p["messages"]) for p in prompts]
        path = self.root / ("sanity-" + _key({"prompts": sanity.prompts_sha256(prompts), "ids": token_ids,
                                              "max_new_tokens": max_new_tokens})[:12] + ".json")
        if path.is_file():
            self.ctx.log.info("reference generations cached (%s/%s)", self.root.name, path.name)
            return json.loads(path.read_text())
        eos = sanity.eos_token_ids(tokenizer, self.model)
        outputs = sanity.generate_all(self.model, tokenizer, prompts, max_new_tokens, eos)
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"eos_ids": eos, "max_new_tokens": max_new_tokens, "outputs": outputs}
        write_json(path, data)
        return data

    def tasks(self, tokenizer: Any, names: list[str], **kwargs: Any) -> dict[str, Any]:
        """The reference's lm-eval scores (``pipeline.eval.tasks.run_tasks``), cached."""
        from pipeline.eval.tasks import run_tasks

        path = self.root / ("tasks-" + _key({"tasks": names, **kwargs})[:12] + ".json")
        if path.is_file():
            return json.loads(path.read_text())
        scores = run_tasks(self.model, tokenizer, names, **kwargs)
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(path, scores)
        return scores


@releases_models
def run(ctx: StageContext) -> dict:
    """The evaluate stage: perplexity, KL and top-1 against the reference, sanity and tasks, gates' inputs."""
    import torch

    from pipeline.eval.divergence import compare_to_reference, compare_to_reference_logprobs
    from pipeline.eval.perplexity import model_device, tokenize_documents
    from pipeline.stages.compile import load_for_eval

    cfg = ctx.config
    artifact = ctx.inputs["compile"]
    served = _served(ctx, artifact)  # before any loading: eval.through: endpoint without a server fails here
    # The deployable model through its target's in-process runtime (transformers, ONNX Runtime, llama.cpp, ...):
    # anything ``model(input_ids) -> logits`` (pipeline.eval.perplexity.model_logits); for an engine that does not
    # run here, the quantized checkpoint through the embedded runtime, labelled so in ``runtime``. KL and top-1
    # always come from it (they need full logits); with an endpoint, perplexity, sanity and tasks come from that.
    model, tokenizer, runtime = load_for_eval(artifact)
    in_process = f"in process: {runtime}"
    device = model_device(model)
    params = getattr(model, "parameters", None)
    half = next(params()).dtype if params is not None and device.type != "cpu" else torch.float32
    reference = _Reference(ctx, device, half)
    text_path = ctx.recipe.resolve(cfg.text)
    ids = tokenize_documents(tokenizer, join_documents(read_documents(cfg.text, text_path)))
    if cfg.max_tokens:
        ids = ids[: cfg.max_tokens]
    ctx.progress(0, 1, f"{ids.numel()} tokens")
    cache_bytes = ids.numel() * reference.vocab_size() * 4
    ref_lp = None
    if cache_bytes <= REFERENCE_CACHE_BYTES:
        ref_lp = reference.logprobs(ids, cfg.seq_len, cfg.batch_size)
        metrics = compare_to_reference_logprobs(ref_lp, model, batch_size=cfg.batch_size)
        ref_note = f"cached once per plan in {reference.root.name}"
    else:
        metrics = compare_to_reference(reference.model, model, ids, cfg.seq_len, batch_size=cfg.batch_size)
        ref_note = (f"run beside this variant: its log-probs would take {cache_bytes / 2**30:.1f} GiB "
                    f"(cache limit {REFERENCE_CACHE_BYTES / 2**30:.0f} GiB)")
    metrics = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    metrics["runtime"] = runtime
    metrics["reference"] = ref_note
    metrics["text"] = str(text_path.name)
    metrics["seq_len"] = cfg.seq_len
    through = {"perplexity": in_process, "kl_top1": in_process}
    ctx.progress(1, 3, f"ppl {metrics.get('ppl', float('nan')):.2f}")
    task_args = dict(limit=cfg.task_limit, include_paths=[str(ctx.recipe.resolve(p)) for p in cfg.task_paths],
                     max_length=cfg.seq_len, batch_size=cfg.batch_size)
    if served is None:
        if cfg.sanity:
            metrics["sanity"], through["sanity"] = _sanity(ctx, model, tokenizer, reference, runtime), in_process
        ctx.progress(2, 3, "sanity" if cfg.sanity else "")
        if cfg.tasks:
            from pipeline.eval.tasks import run_tasks

            metrics["tasks"], through["tasks"] = run_tasks(model, tokenizer, cfg.tasks, **task_args), in_process
    else:
        # The reference's figures first (computed once per plan, then read back), and the in-process figures are
        # done: neither the reference nor the candidate stays loaded beside the server (weights twice in memory).
        # The candidate is loaded again only if the server refuses prompt log-probs and tasks must run in process.
        if cfg.sanity:
            reference.generations(tokenizer, _prompts(ctx)[1], cfg.sanity_max_new_tokens)
        if cfg.tasks:
            metrics["ref_tasks"] = reference.tasks(tokenizer, list(cfg.tasks), **task_args)
        reference.release()
        from pipeline.eval.sanity import eos_token_ids
        from pipeline.resources import free_memory

        model_eos = eos_token_ids(tokenizer, model)
        model = ref_lp = params = None  # noqa: F841 -- the last references to the weights and reference log-probs
        free_memory()
        _through_endpoint(ctx, served, artifact, model_eos, tokenizer, reference, ids, metrics, through, task_args)
    if cfg.tasks and "ref_tasks" not in metrics:
        metrics["ref_tasks"] = reference.tasks(tokenizer, list(cfg.tasks), **task_args)
    metrics["through"] = through
    write_json(ctx.out / METRICS, metrics)
    ctx.progress(3, 3, f"ppl {metrics.get('ppl', float('nan')):.2f}")
    return metrics


def _served(ctx: StageContext, artifact: Path) -> tuple[Any, str, str] | None:
    """``(serve command or None for the embedded server, API key, label)`` when perplexity, sanity and tasks go
    through the target's endpoint (``eval.through``), else None. ``endpoint`` with no server here: RecipeError
    (recipe validation, ``pipeline.rules``, refuses most such recipes before any stage; this catches what only the
    artifact tells, e.g. a server whose packages are missing)."""
    import secrets

    from pipeline.errors import RecipeError, TargetUnavailable
    from pipeline.stages.compile import read_engine
    from pipeline.stages.serve import engine_server
    from pipeline.targets import TARGETS

    through = ctx.config.through
    if through == "in_process":
        return None
    api_key = secrets.token_urlsafe(24)  # a fresh key per run: nothing else on the machine can use the server
    try:
        command, why_not = engine_server(artifact, "127.0.0.1", 0, api_key)
    except TargetUnavailable as e:  # the engine runs here but its server's packages are missing
        command, why_not = None, str(e)
    engine = read_engine(artifact)
    if why_not:
        if through == "endpoint":
            raise RecipeError(
                f"eval.through: endpoint, but compile.target {engine['target']!r} has no server that runs on this "
                f"machine ({why_not}). Set eval.through: auto (the endpoint where the target's server runs, else "
                "in process, labelled so) or in_process, or evaluate on a machine that runs the engine."
            )
        ctx.log.info("evaluating in process: the target's server does not run here (%s)", why_not)
        return None
    if command is None:
        label = f"embedded server ({engine['target']})"
    else:
        prog = Path(command.argv[0]).name
        if prog.startswith("python") and command.argv[1:2] == ["-m"]:
            prog = f"python -m {command.argv[2]}"
        label = f"{TARGETS[engine['target']].engine} server ({prog})"
    return command, api_key, label


def _through_endpoint(ctx: StageContext, served: tuple[Any, str, str], artifact: Path, model_eos: list[int],
                      tokenizer: Any, reference: _Reference, ids: Any, metrics: dict, through: dict,
                      task_args: dict) -> None:
    """Start the target's server on 127.0.0.1 (a free port, a fresh key), measure perplexity, sanity and tasks
    through its OpenAI endpoint (``pipeline.eval.endpoint``), stop it. A server that refuses token-id prompts or
    prompt log-probs leaves perplexity and tasks in process under ``eval.through: auto`` (labelled with why; the
    in-process model is loaded again for the tasks, after the server stopped) and fails the stage under
    ``eval.through: endpoint``. ``model_eos``: the deployable model's own EOS ids (its generation config)."""
    from pipeline.eval import endpoint as ep_mod
    from pipeline.stages.serve import SERVER_LOG, running_server

    cfg = ctx.config
    command, api_key, label = served
    serve_cfg = getattr(ctx.recipe.variant, "serve", None)
    timeout = serve_cfg.health_timeout_s if serve_cfg is not None else 600.0
    # The embedded server decodes eagerly here: perplexity is prefill and the sanity replies are a few tokens, so
    # capturing and compiling a CUDA graph per batch bucket (decode: auto) would cost more than it saves (measured
    # on the 8B run: 19-34 s per variant's first evaluate, against ~5 s once inductor's cache was warm). Both
    # decode paths give the same tokens (tests/test_graph_step.py); the serve stage runs the recipe's own.
    with running_server(artifact, command, "127.0.0.1", 0, api_key, ctx.out / SERVER_LOG, timeout,
                        limits={"decode": "eager"}) as server:
        ep = ep_mod.Endpoint(server.url, server.model_name, api_key, label)
        ctx.log.info("evaluating through the %s at %s", label, server.url)
        try:
            ep_mod.check_prompt_logprobs(ep, ids[:8].tolist())
            refused = None
        except ep_mod.EndpointRefused as e:
            if cfg.through == "endpoint":
                raise
            refused = e
            ctx.log.warning("perplexity and tasks in process: %s", e.detail)
        in_process = through["perplexity"]
        if refused is None:
            got = ep_mod.endpoint_perplexity(
                ep, ids, cfg.seq_len, progress=lambda d, t: ctx.progress(1, 3, f"endpoint ppl {d}/{t} windows"))
            metrics["ppl_in_process"] = metrics["ppl"]
            for key in ("ppl", "nll_mean", "nll_sum"):
                metrics[key] = round(got[key], 6)
            metrics["ppl_increase_pct"] = round(100.0 * (got["ppl"] / metrics["ref_ppl"] - 1.0), 6)
            through["perplexity"] = f"endpoint: {label}"
        else:
            through["perplexity"] = f"{in_process} (the {label} refused token-id prompts with prompt log-probs)"
            metrics["endpoint_refused"] = refused.detail
        if cfg.sanity:
            metrics["sanity"] = _sanity(ctx, None, tokenizer, reference, label, endpoint=ep, model_eos=model_eos)
            through["sanity"] = f"endpoint: {label}"
        ctx.progress(2, 3, "sanity" if cfg.sanity else "")
        if cfg.tasks and refused is None:
            metrics["tasks"] = ep_mod.endpoint_tasks(ep, _tokenizer_dir(artifact, tokenizer), cfg.tasks, **task_args)
            through["tasks"] = f"endpoint: {label}"
    if cfg.tasks and refused is not None:
        from pipeline.eval.tasks import run_tasks
        from pipeline.stages.compile import load_for_eval

        model, tokenizer, _ = load_for_eval(artifact)
        metrics["tasks"] = run_tasks(model, tokenizer, cfg.tasks, **task_args)
        through["tasks"] = through["perplexity"]


def _tokenizer_dir(artifact: Path, tokenizer: Any) -> Path:
    """A folder holding the tokenizer the in-process runtime uses (lm-eval loads it by path)."""
    from pipeline.stages.compile import engine_model_dir, read_engine

    for cand in (getattr(tokenizer, "name_or_path", None), engine_model_dir(artifact),
                 read_engine(artifact).get("source_model_dir")):
        if cand and (Path(cand) / "tokenizer_config.json").is_file():
            return Path(cand)
    return engine_model_dir(artifact)


def _prompts(ctx: StageContext) -> tuple[Path, list[dict]]:
    from pipeline.eval import sanity

    cfg = ctx.config
    path = ctx.recipe.resolve(cfg.sanity_prompts) if cfg.sanity_prompts else sanity.SHIPPED_PROMPTS
    return path, sanity.load_prompts(path)


def _sanity(ctx: StageContext, model: Any, tokenizer: Any, reference: Any, runtime: str = "",
            endpoint: Any = None, model_eos: list[int] | None = None) -> dict[str, Any]:
    """Sanity figures of the deployable model's greedy generations vs the reference's (``pipeline.eval.sanity``);
    the generations themselves go to ``generations.json`` beside ``metrics.json``. With ``endpoint``
    (``pipeline.eval.endpoint.Endpoint``) the generations are the server's chat replies, and both sides are scored
    on their re-tokenized text (``endpoint.as_text_tokens``). If the runtime cannot decode, the figures are None with
    a ``not_measured`` reason (a sanity gate then fails on it)."""
    from pipeline.eval import sanity

    cfg = ctx.config
    path, prompts = _prompts(ctx)
    ref = reference.generations(tokenizer, prompts, cfg.sanity_max_new_tokens)
    model_eos = sanity.eos_token_ids(tokenizer, model) if model_eos is None else model_eos
    eos = sorted(set(ref["eos_ids"]) | set(model_eos))
    progress = lambda done, total: ctx.progress(1, 3, f"sanity {done}/{total}")  # noqa: E731
    ref_outputs = ref["outputs"]
    try:
        if endpoint is None:
            outputs = sanity.generate_all(model, tokenizer, prompts, cfg.sanity_max_new_tokens, eos, progress=progress)
        else:
            from pipeline.eval.endpoint import as_text_tokens, chat_generations

            outputs = chat_generations(endpoint, tokenizer, prompts, cfg.sanity_max_new_tokens, eos, progress)
            ref_outputs = as_text_tokens(ref_outputs, tokenizer, eos)
    except Exception as e:  # noqa: BLE001 -- any runtime failure: the other figures stand, the gates say why
        how = f"chat completions from the {runtime}" if endpoint is not None else \
            f"greedy decoding through {runtime or type(model).__name__}"
        reason = f"{how} failed ({type(e).__name__}: {e})"
        ctx.log.warning("sanity not measured: %s", reason)
        return {"repetition": None, "eos_rate": None, "reference_overlap": None, "not_measured": reason,
                "prompt_set": path.name}
    write_json(ctx.out / GENERATIONS, {"prompts": str(path.name), "outputs": outputs, "reference_outputs": ref_outputs})
    figures = sanity.score_generations(outputs, ref_outputs, eos, cfg.sanity_max_new_tokens)
    figures["prompt_set"] = path.name
    if endpoint is not None:
        # The server's templated prompt vs the model's chat template, in tokens: a different count is a template
        # (or tokenizer) mismatch in the deployment, whatever the generations then score.
        counted = [o for o in outputs if o.get("prompt_tokens") is not None]
        figures["prompt_token_mismatches"] = (
            sum(o["prompt_tokens"] != o["prompt_tokens_expected"] for o in counted) if counted else None)
        figures["tokens"] = "re-tokenized text of the served replies (and of the reference's)"
    return figures
