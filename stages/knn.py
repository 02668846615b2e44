"""Stage ``knn``: the label-set kNN graph of the training split, written to ``knn.h5``."""

from __future__ import annotations

from retdmctl.config import Config, check
from retdmctl.data.dataset import read_dataset
from retdmctl.errors import InputError
from retdmctl.knn import build_graph, write_graph
from retdmctl.pipeline import Context, Stage
from retdmctl.training.labels import announce, training_view


def _blocked(cfg: Config) -> str | None:
    return check(cfg, "knn.k", "knn.index")


def run(ctx: Context) -> dict:
    ws, cfg = ctx.ws, ctx.cfg
    # the graph's label sets are the observed training label sets (unknown read as 0)
    info, _, labels_summary = training_view(read_dataset(ws.dataset), cfg)
    announce(ctx.console, labels_summary)
    try:
        graph = build_graph(info.labels, info.split("train"), cfg.knn.k, cfg.knn.index)
    except ValueError as exc:
        raise InputError(f"{ws.rel(ws.dataset)}: {exc}") from None
    write_graph(ws.knn, graph, cfg.sections(STAGE.sections), ids=info.ids_digest)
    sizes = graph.set_ptr[1:] - graph.set_ptr[:-1]
    ctx.console.print(
        f"{len(graph.label_sets)} distinct training label sets, k = {graph.k}"
        + (f" (capped from {cfg.knn.k})" if graph.k < cfg.knn.k else "")
        + f"; {_describe(graph.index)}"
        + f"; images per set: median {int(sorted(sizes)[len(sizes) // 2])}, max {int(sizes.max())}"
    )
    return {"label_sets": int(len(graph.label_sets)), "k": int(graph.k), "index": graph.index, **labels_summary}


def _describe(index: dict) -> str:
    params = ", ".join(f"{k} {v}" for k, v in index.items() if k not in ("kind", "requested", "seed"))
    return f"{index['kind']} search" + (f" ({params})" if params else "")


STAGE = Stage(
    name="knn",
    command="retdmctl knn",
    sections=("knn", "labels"),
    inputs=lambda ws, cfg: [ws.dataset],
    outputs=lambda ws, cfg: [ws.knn],
    run=run,
    blocked=_blocked,
)
