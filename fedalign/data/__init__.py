"""Data layer: datasets (embedded AG News, TFDS builders), partitioners, tokenizers,
prompt formatting and fixed-shape client batches.

TFDS builders live in :mod:`fedalign.data.builders` (imported on demand: it imports
tensorflow_datasets); raw-file readers in :mod:`fedalign.data.sources`.

Example:
    >>> from fedalign import data
    >>> train, test = data.load_embedded_agnews()
    >>> parts = data.dirichlet_partition(train.label, num_clients=10, alpha=0.5, seed=0)
    >>> len(parts)
    10
"""

from fedalign.data.agnews import (
    AGNEWS_CLASSES,
    AGNEWS_LABEL_WORDS,
    AGNEWS_TEMPLATE,
    TextSplit,
    load_embedded_agnews,
)
from fedalign.data.batching import (
    client_rng,
    group_clients_by_size,
    make_client_batches,
    padding_fraction,
    planned_padding_fraction,
    steps_per_client,
    unpad_client_batches,
)
from fedalign.data.formatting import (
    format_classification,
    format_hellaswag,
    format_instruction,
    format_label_word_choices,
    format_mmlu,
    format_multiple_choice,
    label_word_ids,
    single_token_ids,
)
from fedalign.data.partition import (
    dirichlet_partition,
    group_partition,
    iid_partition,
    label_counts,
    label_skew,
    pathological_partition,
    plot_label_counts,
)
from fedalign.data.tokenize import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "AGNEWS_CLASSES",
    "AGNEWS_LABEL_WORDS",
    "AGNEWS_TEMPLATE",
    "TextSplit",
    "load_embedded_agnews",
    "client_rng",
    "group_clients_by_size",
    "make_client_batches",
    "padding_fraction",
    "planned_padding_fraction",
    "steps_per_client",
    "unpad_client_batches",
    "format_classification",
    "format_hellaswag",
    "format_instruction",
    "format_label_word_choices",
    "format_mmlu",
    "format_multiple_choice",
    "label_word_ids",
    "single_token_ids",
    "dirichlet_partition",
    "group_partition",
    "iid_partition",
    "label_counts",
    "label_skew",
    "pathological_partition",
    "plot_label_counts",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_bpe",
]
