"""Gene feature tables: one vector per gene symbol, from the data or from a protein language model.

:class:`GeneEmbeddings` is the table; :func:`data_gene_embeddings` derives one from control-cell
co-expression, :func:`embed_fasta` from a local ESM2 model (``vcell genes embed``).
"""

from vcell._lazy import lazy_exports

_EXPORTS = {
    ".genes": ["GeneEmbeddings", "data_gene_embeddings"],
    ".perturbations": ["PertFeatures", "check_sources", "parse_sources"],
    ".protein": ["embed_fasta"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
