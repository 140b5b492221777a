"""publish: send a variant whose quality gates passed to ``publish.to`` (a hub repo or a folder).

The runner runs this stage only after the variant's evaluate (and serve, when the recipe serves) finished and its
gates passed; a variant that failed a gate is skipped, so nothing of it leaves the machine. The publishable folder
is assembled in a temporary folder beside the run's artifacts (``pipeline.release.publish``), verified, sent, and
removed; this stage's own artifact is the receipt ``publication.json`` (destination, commit, every file's sha256).
"""

from __future__ import annotations

from pipeline.artifacts import new_tmp_dir, write_json
from pipeline.stages import StageContext


def run(ctx: StageContext) -> dict:
    from pipeline.eval.collect import read_plan
    from pipeline.plan import publish_destination
    from pipeline.release.publish import RECEIPT, publish_release, release_for

    root = ctx.inputs["compile"].parent
    plan = read_plan(root)
    variant = next(r["variants"][0] for r in plan["runs"] if r["id"] == ctx.run_id)
    config = {**ctx.config.model_dump(), "to": publish_destination(ctx.config.to, ctx.recipe.name, variant)}
    gates = ctx.recipe.variant.eval.gates.model_dump() if ctx.recipe.variant.eval else {}
    release = release_for(root, variant, config, gates)
    ctx.progress(0, 2, f"assembling for {release.destination}")
    receipt = publish_release(release, new_tmp_dir(root / f"release-{variant}"))
    ctx.progress(2, 2, f"{receipt['status']}: {receipt['destination']}")
    ctx.log.info("%s: %s %s (%d files, %d bytes)", ctx.run_id, receipt["status"], receipt["destination"],
                 len(receipt["files"]), receipt["bytes"])
    write_json(ctx.out / RECEIPT, receipt)
    return {k: v for k, v in receipt.items() if k != "files"}
