"""From a cross-layer transcoder to circuits: the replacement model, attribution graphs and their pruning
(Ameisen et al. 2025, "Circuit Tracing: Revealing Computational Graphs in Language Models").

    prompt = record_prompt(model, clt, tokens)            # the real forward, what is frozen
    graph = attribute(model, clt, tokens)                 # every direct effect, one backward per target
    pruned = prune(graph)                                 # <= ~100 nodes, by influence on the logits
    write_graph_json(pruned, "graph.json")

``replacement``: the frozen replacement (reproduces the real logits on its prompt) and the unfrozen
one's CE/KL; ``attribution``: direct effects; ``pruning``: influence, pruning, the graph's JSON;
``view``: the static HTML view of a pruned graph; ``contexts``: features' top activating contexts
for the view; ``validation``: edges validated by intervention (``validate_edges``).
"""
from .attribution import Graph, attribute
from .pruning import graph_to_json, influence, prune, write_graph_json
from .replacement import (
                          Features,
                          PromptRecord,
                          active_features,
                          record_prompt,
                          replacement_ce_kl,
                          replacement_forward,
                          replacement_summary,
)

__all__ = ["Features", "Graph", "PromptRecord", "active_features", "attribute", "graph_to_json", "influence", "prune",
           "record_prompt", "replacement_ce_kl", "replacement_forward", "replacement_summary", "write_graph_json"]
